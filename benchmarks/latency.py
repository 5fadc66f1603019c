"""ToMe speedup over dense, per backend and batch size, measured in one run (variants interleaved).

    python benchmarks/latency.py                       # DeiT-S, r 8/13/16, OpenVINO + ONNX Runtime, batch 1 and 8
    python benchmarks/latency.py --backends openvino --batches 1 --r 13

Prints one table: median / p90 ms per variant, speedup = dense median / reduced median, the FLOP
ratio from the schedule, and speedup as a fraction of the FLOP ratio. Absolute times on a shared
machine move; the ratios are taken within one interleaved loop and are what to compare.

``--ceiling`` adds the speedup this backend could give with free token reduction: for each schedule
the dense model with every reduction replaced by a truncation (keep the first ``N_l`` tokens, one
Slice) is built and timed in the same interleaved loop. Its speedup over dense is the ceiling; the
FLOP ratio assumes a token costs the same at any count, which a CPU GEMM does not (its per-row cost
grows as the row count falls). ``speedup / ceiling`` is the share that the reduction ops themselves
(matching, sorting, gathers, merges, proportional attention) leave on the table.

With ``--ceiling`` two more columns say whether a target is reachable at all: ``reduction ms`` is what
the reduction ops cost (reduced median minus truncated median), and ``budget ms`` is what they may
cost for the speedup to reach ``--target`` x the FLOP ratio (dense median / (target x FLOP ratio)
minus truncated median). A negative budget means no reduction, however cheap, reaches the target on
this backend at this batch size.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from vitfold.build import model_dims
from vitfold.compile import compile_onnx
from vitfold.export.models import create_model
from vitfold.export.onnx import export_onnx
from vitfold.images import batches, list_images, load_images
from vitfold.profiles.flops import schedule_macs
from vitfold.profiles.latency import measure_interleaved
from vitfold.reduce import TokenLayout, create_method
from vitfold.runtimes import BuildConfig
from vitfold.spec import ModelSpec


class _TruncatedBlock(torch.nn.Module):
    """A timm block that keeps its first ``keep`` tokens between attention and MLP: the reduced
    model's shapes with a free reduction (a Slice), for :func:`truncated_model`."""

    def __init__(self, block: torch.nn.Module, keep: int):
        super().__init__()
        self.block, self.keep = block, keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        x = x + b.drop_path1(b.ls1(b.attn(b.norm1(x))))
        x = x[:, : self.keep]
        return x + b.drop_path2(b.ls2(b.mlp(b.norm2(x))))


def truncated_model(model: torch.nn.Module, tokens) -> torch.nn.Module:
    """``model`` running ``tokens`` (a schedule's counts) with each reduction a plain truncation."""
    twin = copy.deepcopy(model)
    twin.blocks = torch.nn.Sequential(*[_TruncatedBlock(b, n) for b, n in zip(twin.blocks, tokens[1:])])
    return twin.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--r", default="8,13,16", help="comma-separated ToMe r values")
    parser.add_argument("--backends", default="openvino,onnxruntime")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", type=int, default=None, help="inference threads (default: one per core)")
    parser.add_argument("--min-runs", type=int, default=50)
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--ceiling", action="store_true",
                        help="also time each schedule with truncation as its reduction: the zero-overhead speedup")
    parser.add_argument("--target", type=float, default=0.9,
                        help="--ceiling: speedup target as a fraction of the FLOP ratio, for the budget column")
    args = parser.parse_args()

    console = Console(width=150)
    model, pre = create_model(ModelSpec(args.model))
    layout = TokenLayout.of(model)
    dims = model_dims(model)
    r_values = [int(v) for v in args.r.split(",")]
    variants = {"dense": create_method("tome", r=0)}
    variants.update({f"r={r}": create_method("tome", r=r) for r in r_values})
    schedules = {name: m.schedule(layout) for name, m in variants.items()}
    macs = {name: schedule_macs(dims, list(s.tokens))["total"] for name, s in schedules.items()}
    photos = load_images(list_images(), pre)

    table = Table(title=f"{args.model}: ToMe vs dense, interleaved in one run")
    columns = ["backend", "batch", "variant", "median ms", "p90 ms", "CoV", "speedup", "FLOP ratio", "speedup / FLOP ratio"]
    if args.ceiling:
        columns += ["ceiling", "speedup / ceiling", "reduction ms", f"budget ms ({args.target:g}x FLOP ratio)"]
    for column in columns:
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory(prefix="vitfold-bench-") as tmp:
        for batch in [int(b) for b in args.batches.split(",")]:
            sample = batches(photos, batch)[0]
            exported = {}
            def export(torch_model, label: str) -> Path:
                path = Path(tmp) / f"{label}-b{batch}.onnx"
                export_onnx(torch_model, path, sample.shape)
                return path

            for name, method in variants.items():
                exported[name] = export(method.apply(model, schedules[name]), name)
                if args.ceiling and name != "dense":  # the same token counts, reduced by truncation
                    exported[f"{name} truncated"] = export(truncated_model(model, schedules[name].tokens), f"{name}-truncated")
            for backend in args.backends.split(","):
                cfg = BuildConfig(backend=backend, threads=args.threads)
                sessions = {}
                for name, path in exported.items():  # the build's own compile path: passes, lint, backend build
                    out = Path(tmp) / f"{backend}-{name.replace(' ', '-')}-b{batch}"
                    out.mkdir()
                    sessions[name] = compile_onnx(path, out, cfg, sample).open(cfg)
                console.print(f"[dim]measuring {backend} batch {batch} ({', '.join(sessions)})[/]")
                stats = measure_interleaved({n: (lambda s=s: s(sample)) for n, s in sessions.items()}, batch,
                                            min_runs=args.min_runs, min_seconds=args.min_seconds)
                for name, st in stats.items():
                    if name.endswith(" truncated"):
                        continue
                    speedup = stats["dense"].median_ms / st.median_ms
                    ratio = macs["dense"] / macs[name]
                    row = [backend, str(batch), name, f"{st.median_ms:.2f}", f"{st.p90_ms:.2f}", f"{st.cov:.1%}",
                           f"{speedup:.2f}x", f"{ratio:.2f}x", f"{speedup / ratio:.0%}"]
                    if args.ceiling:
                        truncated = stats.get(f"{name} truncated", stats["dense"])
                        ceiling = stats["dense"].median_ms / truncated.median_ms
                        budget = stats["dense"].median_ms / (args.target * ratio) - truncated.median_ms
                        row += [f"{ceiling:.2f}x", f"{speedup / ceiling:.0%}"]
                        row += ["", ""] if name == "dense" else [f"{st.median_ms - truncated.median_ms:.2f}", f"{budget:.2f}"]
                    table.add_row(*row)
                for s in sessions.values():
                    s.close()
    console.print(table)
    settings = BuildConfig(threads=args.threads)
    console.print(f"threads: {settings.resolved_threads}; OpenVINO f32 hint LATENCY; ONNX Runtime CPU EP, graph optimisation all")


if __name__ == "__main__":
    main()
