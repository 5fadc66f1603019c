"""One ToMe reduction site: the graph form against the fused ``vitfold.ToMeMerge`` op, one interleaved run.

    python benchmarks/fused_ops.py                    # N=197, C=384 (+1 size channel), r=13, batch 1 and 8

The op is :mod:`vitfold.native`'s OpenVINO extension (compiled here once, cmake and a C++ compiler).
Every output of both forms must equal the torch site's exactly (the same token choices, the same sums)
or nothing is timed. Whole models with fused sites: ``benchmarks/latency.py --ceiling --fused-ops``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from vitfold.native import DOMAIN, TOME_OP, openvino_ops
from vitfold.profiles.latency import measure_interleaved
from vitfold.reduce.tome import ToMeSite


class Site(torch.nn.Module):
    """ToMe's matching and sum merge at fixed ``r``, exactly as the patched blocks' :class:`ToMeSite` runs it."""

    def __init__(self, r: int, num_protected: int):
        super().__init__()
        self.site, self.r, self.num_protected = ToMeSite(), r, num_protected

    def forward(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return self.site(x, keys, self.r, self.num_protected)


def one_site(core, settings: dict, work: Path, batch: int, tokens: int = 197, channels: int = 385, r: int = 13):
    """The graph form and the op on the same random inputs: ``(graph stats, fused stats)``."""
    heads, dim = 6, 64
    site = Site(r, 1)

    def inputs(seed: int) -> dict:
        gen = torch.Generator().manual_seed(seed)
        return {"x": torch.randn(batch, tokens, channels, generator=gen),
                "keys": torch.randn(batch, heads, tokens, dim, generator=gen)}

    program = torch.onnx.export(site, tuple(inputs(batch).values()), dynamo=True, opset_version=18,
                                input_names=["x", "keys"], output_names=["y"])
    program.save(str(work / f"site-graph-b{batch}.onnx"))
    fused_onnx(work / f"site-fused-b{batch}.onnx", batch, tokens, channels, heads, dim, r, 1)
    requests = {form: core.compile_model(core.read_model(str(work / f"site-{form}-b{batch}.onnx")), "CPU", settings)
                .create_infer_request() for form in ("graph", "fused")}
    for seed in range(5):  # identical outputs: the same token choices and the same sums
        feed = inputs(100 + seed)
        with torch.no_grad():
            expected = site(*feed.values()).numpy()
        feed = {k: v.numpy() for k, v in feed.items()}
        for form, q in requests.items():
            got = q.infer(feed)[0]
            if not np.array_equal(got, expected):
                sys.exit(f"batch {batch}: the {form} form differs from the torch site (max abs "
                         f"{np.abs(got - expected).max():.3g}); not timing it")
    feed = {k: v.numpy() for k, v in inputs(batch).items()}
    stats = measure_interleaved({form: (lambda q=q: q.infer(feed)) for form, q in requests.items()}, batch,
                                min_runs=500, min_seconds=10)
    return stats["graph"], stats["fused"]


def fused_onnx(path: Path, batch: int, tokens: int, channels: int, heads: int, dim: int, r: int, num_protected: int) -> None:
    node = helper.make_node(TOME_OP, ["x", "keys"], ["y"], domain=DOMAIN, r=r, num_protected=num_protected)
    value = helper.make_tensor_value_info
    graph = helper.make_graph([node], "fused_site",
                              [value("x", TensorProto.FLOAT, [batch, tokens, channels]),
                               value("keys", TensorProto.FLOAT, [batch, heads, tokens, dim])],
                              [value("y", TensorProto.FLOAT, [batch, tokens - r, channels])])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid(DOMAIN, 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args()
    import openvino as ov

    rows = []
    with tempfile.TemporaryDirectory(prefix="vitfold-fused-ops-") as tmp:
        core = ov.Core()
        core.add_extension(str(openvino_ops(log=print)))
        settings = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        for batch in [int(b) for b in args.batches.split(",")]:
            rows.append((batch, *one_site(core, settings, Path(tmp), batch)))
    print("one ToMe site (keys' head mean, matching, sum merge), N=197, C=384 (+1 size), r=13, OpenVINO f32, "
          "interleaved; outputs identical to torch's")
    for batch, graph, fused in rows:
        print(f"  batch {batch}: graph {graph.median_ms * 1e3:.0f} us (p90 {graph.p90_ms * 1e3:.0f}), "
              f"fused {fused.median_ms * 1e3:.0f} us (p90 {fused.p90_ms * 1e3:.0f}): {graph.median_ms / fused.median_ms:.2f}x")


if __name__ == "__main__":
    main()
