"""ToMe's reduction sites as the exported graph against one fused OpenVINO operation per site, one run.

    python benchmarks/fused_ops.py                    # DeiT-S, r=13, batch 1 and 8
    python benchmarks/fused_ops.py --batches 1 --r 13,39/3

A probe for issue 19's "one kernel per site" lever, not part of any build yet.
``benchmarks/ov_ops/tome_op.cpp`` computes ToMe's matching and merge (normalise, similarity, best
partner, edge ranking, gathers, the sum into partners: about 28 ONNX nodes) as one OpenVINO operation.
It is built here with CMake against the headers and CMake config that the ``openvino`` wheel ships
(cmake, ninja and a C++17 compiler). Two tables:

* **one site** (N=197, C=384 + 1 size channel, r=13): the graph form against the op, same inputs;
* **whole model** (DeiT-S, ToMe): dense, the graph form, the fused form and the truncated twin
  (:mod:`vitfold.plan.truncate`: the same token counts, every reduction a Slice), timed interleaved.
  The fused form is exported through a torch custom op (``vitfold::tome_merge``) translated to a
  ``vitfold.ToMeMerge`` ONNX node (an ONNX schema is registered for the exporter), which the
  extension's ONNX frontend mapping turns into the op. ``reduction ops`` = model minus its twin.

Every fused output must equal the graph form's exactly (the same token choices, the same sums) or
the form is not timed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from latency import parse_sites  # benchmarks/latency.py: R/K = R at every K-th block
from vitfold.export.models import create_model
from vitfold.images import batches, list_images, load_images
from vitfold.plan.truncate import truncated_model
from vitfold.profiles.latency import measure_interleaved
from vitfold.reduce import TokenLayout, create_method
from vitfold.reduce.matching import bipartite_soft_matching
from vitfold.reduce.tome import ToMeBlock
from vitfold.spec import ModelSpec

HERE = Path(__file__).resolve().parent / "ov_ops"


class Site(torch.nn.Module):
    """ToMe's matching and sum merge, as the patched blocks run them."""

    def __init__(self, r: int, num_protected: int):
        super().__init__()
        self.r, self.num_protected = r, num_protected

    def forward(self, x: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
        merge, _ = bipartite_soft_matching(metric, self.r, self.num_protected)
        return merge(x, mode="sum")


@torch.library.custom_op("vitfold::tome_merge", mutates_args=())
def tome_merge(x: torch.Tensor, metric: torch.Tensor, r: int, num_protected: int) -> torch.Tensor:
    """ToMe's matching and sum merge as one torch op, so that the exporter can emit one node for it."""
    merge, _ = bipartite_soft_matching(metric, r, num_protected)
    return merge(x, mode="sum")


@tome_merge.register_fake
def _(x, metric, r, num_protected):
    return x.new_empty(x.shape[0], x.shape[1] - r, x.shape[2])


def tome_merge_onnx(x, metric, r: int, num_protected: int):
    """The exporter's translation of ``vitfold::tome_merge``: one ``vitfold.ToMeMerge`` node."""
    import onnxscript

    return onnxscript.values.Opset("vitfold", 1).ToMeMerge(x, metric, r=r, num_protected=num_protected)


def register_schema() -> None:
    """An ONNX schema for ``vitfold.ToMeMerge`` (the exporter's op recorder looks ops up by schema)."""
    from onnx.defs import OpSchema

    if onnx.defs.has("ToMeMerge", "vitfold"):
        return
    formal = OpSchema.FormalParameter
    onnx.defs.register_schema(OpSchema(
        "ToMeMerge", "vitfold", 1, inputs=[formal("x", "T"), formal("metric", "T")], outputs=[formal("y", "T")],
        type_constraints=[("T", ["tensor(float)"], "")],
        attributes=[OpSchema.Attribute("r", OpSchema.AttrType.INT, ""), OpSchema.Attribute("num_protected", OpSchema.AttrType.INT, "")]))


class FusedToMeBlock(ToMeBlock):
    """:class:`~vitfold.reduce.tome.ToMeBlock` with the merge as ``vitfold::tome_merge`` (size-weighted
    average, no proportional attention, no source tracing: DeiT-S ToMe's defaults)."""

    def forward_tome(self, x, state, r, cfg):
        if r == 0:
            return super().forward_tome(x, state, r, cfg)
        x_attn, metric = self.attn.forward_tome(self.norm1(x), state.size if cfg.prop_attn else None)
        x = x + self.drop_path1(self.ls1(x_attn))
        size = state.size if state.size is not None else torch.ones_like(x[..., :1])
        merged = torch.ops.vitfold.tome_merge(torch.cat([x * size, size], dim=-1), metric, r, cfg.num_protected)
        x, state.size = merged[..., :-1] / merged[..., -1:], merged[..., -1:]
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def whole_model(core, settings: dict, work: Path, batch: int, r_values: list[str]) -> tuple[dict, dict]:
    """Dense, and per r value the graph form, the fused form and the truncated twin; returns
    ``(stats by variant, schedules by r value)``."""
    register_schema()
    model, pre = create_model(ModelSpec("deit_small_patch16_224"))
    layout = TokenLayout.of(model)
    sample = batches(load_images(list_images(), pre), batch)[0]
    images = torch.from_numpy(sample)
    torch_models, tables, schedules = {"dense": model}, {}, {}
    for value in r_values:
        method = create_method("tome", r=parse_sites(value, layout.depth))
        schedules[value] = method.schedule(layout)
        torch_models[f"r={value} graph"] = method.apply(model, schedules[value])
        fused = method.apply(model, schedules[value])
        for block in fused.blocks:
            block.__class__ = FusedToMeBlock
        torch_models[f"r={value} fused"] = fused
        tables[f"r={value} fused"] = {torch.ops.vitfold.tome_merge.default: tome_merge_onnx}
        torch_models[f"r={value} truncated"] = truncated_model(model, schedules[value].tokens)
    requests, outputs = {}, {}
    with torch.no_grad():
        for name, torch_model in torch_models.items():
            path = work / f"{name.replace(' ', '_').replace('/', '_')}-b{batch}.onnx"
            extra = {"custom_translation_table": tables[name]} if name in tables else {}
            program = torch.onnx.export(torch_model, (images,), dynamo=True, opset_version=18, input_names=["images"],
                                        output_names=["logits"], **extra)
            program.save(str(path))
            requests[name] = core.compile_model(core.read_model(str(path)), "CPU", settings).create_infer_request()
            outputs[name] = requests[name].infer({"images": sample})[0].copy()
    for value in r_values:
        graph, fused = outputs[f"r={value} graph"], outputs[f"r={value} fused"]
        if not np.array_equal(graph, fused):
            sys.exit(f"r={value}: the fused model's logits differ from the graph form's (max abs "
                     f"{np.abs(graph - fused).max():.3g}); not timing it")
    stats = measure_interleaved({name: (lambda q=q: q.infer({"images": sample})) for name, q in requests.items()}, batch,
                                min_runs=100, min_seconds=20)
    return stats, schedules


def build_extension(work: Path) -> Path:
    """Build ``ov_ops`` with CMake; returns the shared library."""
    import openvino

    for tool in ("cmake", "ninja"):
        if shutil.which(tool) is None:
            sys.exit(f"fused_ops.py needs {tool} on PATH to build the OpenVINO extension")
    config = Path(openvino.__file__).parent / "cmake"
    build = work / "build"
    subprocess.run(["cmake", "-S", str(HERE), "-B", str(build), "-G", "Ninja", f"-DOpenVINO_DIR={config}",
                    "-DCMAKE_BUILD_TYPE=Release"], check=True, capture_output=True)
    subprocess.run(["ninja", "-C", str(build)], check=True, capture_output=True)
    return next(build.glob("libvitfold_ov_ops*.so"))


def one_site(core, settings: dict, work: Path, batch: int, tokens: int = 197, channels: int = 385, r: int = 13):
    """The graph form and the op on the same random inputs: ``(graph stats, fused stats)``."""
    dim = 64
    site = Site(r, 1)
    gen = torch.Generator().manual_seed(batch)
    x, metric = torch.randn(batch, tokens, channels, generator=gen), torch.randn(batch, tokens, dim, generator=gen)
    program = torch.onnx.export(site, (x, metric), dynamo=True, opset_version=18, input_names=["x", "metric"], output_names=["y"])
    program.save(str(work / f"site-graph-b{batch}.onnx"))
    fused_onnx(work / f"site-fused-b{batch}.onnx", batch, tokens, channels, dim, r, 1)
    requests = {form: core.compile_model(core.read_model(str(work / f"site-{form}-b{batch}.onnx")), "CPU", settings)
                .create_infer_request() for form in ("graph", "fused")}
    for seed in range(5):  # identical outputs: the same token choices and the same sums
        gen = torch.Generator().manual_seed(100 + seed)
        feed = {"x": torch.randn(batch, tokens, channels, generator=gen).numpy(),
                "metric": torch.randn(batch, tokens, dim, generator=gen).numpy()}
        out = {form: q.infer(feed)[0].copy() for form, q in requests.items()}
        expected = site(torch.from_numpy(feed["x"]), torch.from_numpy(feed["metric"])).numpy()
        if not (np.array_equal(out["fused"], expected) and np.array_equal(out["graph"], expected)):
            sys.exit(f"batch {batch}: the fused op differs from the graph form (max abs "
                     f"{np.abs(out['fused'] - out['graph']).max():.3g}); not timing it")
    feed = {"x": x.numpy(), "metric": metric.numpy()}
    stats = measure_interleaved({form: (lambda q=q: q.infer(feed)) for form, q in requests.items()}, batch,
                                min_runs=500, min_seconds=10)
    return stats["graph"], stats["fused"]


def fused_onnx(path: Path, batch: int, tokens: int, channels: int, dim: int, r: int, num_protected: int) -> None:
    node = helper.make_node("ToMeMerge", ["x", "metric"], ["y"], domain="vitfold", r=r, num_protected=num_protected)
    graph = helper.make_graph([node], "fused_site",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, tokens, channels]),
                               helper.make_tensor_value_info("metric", TensorProto.FLOAT, [batch, tokens, dim])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, tokens - r, channels])])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("vitfold", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--r", default="13", help="whole model: ToMe r values, R/K = R at every K-th block")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--site-only", action="store_true", help="only the one-site table")
    args = parser.parse_args()
    import openvino as ov

    site_rows, whole_rows = [], []
    with tempfile.TemporaryDirectory(prefix="vitfold-fused-ops-") as tmp:
        work = Path(tmp)
        core = ov.Core()
        core.add_extension(str(build_extension(work)))
        settings = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
        for batch in [int(b) for b in args.batches.split(",")]:
            site_rows.append((batch, *one_site(core, settings, work, batch)))
            if not args.site_only:
                whole_rows.append((batch, *whole_model(core, settings, work, batch, args.r.split(","))))
    print("one ToMe site, N=197, C=384 (+1 size), r=13, OpenVINO f32, interleaved; outputs identical")
    for batch, graph, fused in site_rows:
        print(f"  batch {batch}: graph {graph.median_ms * 1e3:.0f} us (p90 {graph.p90_ms * 1e3:.0f}), "
              f"fused {fused.median_ms * 1e3:.0f} us (p90 {fused.p90_ms * 1e3:.0f}): {graph.median_ms / fused.median_ms:.2f}x")
    for batch, stats, schedules in whole_rows:
        dense = stats["dense"].median_ms
        print(f"DeiT-S ToMe, OpenVINO f32, batch {batch}, interleaved; fused logits identical to the graph form's")
        for value, schedule in schedules.items():
            twin = stats[f"r={value} truncated"].median_ms
            sites = sum(1 for a, b in zip(schedule.tokens, schedule.tokens[1:]) if b < a)
            print(f"  r={value} ({sites} sites): ceiling {dense / twin:.2f}x")
            for form in ("graph", "fused"):
                ms = stats[f"r={value} {form}"].median_ms
                print(f"    {form}: {ms:.2f} ms, speedup {dense / ms:.2f}x, {twin / ms:.0%} of the ceiling, "
                      f"reduction ops {ms - twin:.2f} ms ({(ms - twin) / ms:.1%} of the run)")


if __name__ == "__main__":
    main()
