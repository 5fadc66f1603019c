"""ToMe speedup over dense, per backend and batch size, measured in one run (variants interleaved).

    python benchmarks/latency.py                       # DeiT-S, r 8/13/16, OpenVINO + ONNX Runtime, batch 1 and 8
    python benchmarks/latency.py --backends openvino --batches 1 --r 13

Prints one table: median / p90 ms per variant, speedup = dense median / reduced median, the FLOP
ratio from the schedule, and speedup as a fraction of the FLOP ratio. Absolute times on a shared
machine move; the ratios are taken within one interleaved loop and are what to compare.

``--ceiling`` adds the speedup this backend could give with free token reduction: each dense block
half (``x + attn(norm1(x))`` and ``x + mlp(norm2(x))``) is built alone at every token count of the
schedules and timed interleaved; the ceiling is the dense time over the time of the same halves at
the schedule's token counts (attention at a block's input count, MLP at its output count; patch
embedding and head as in the dense model). The FLOP ratio assumes a token costs the same at any
count; a CPU GEMM does not (its per-row cost grows as the row count falls), and ``speedup /
ceiling`` is the share that the reduction ops themselves leave on the table.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from vitfold import runtimes
from vitfold.build import model_dims
from vitfold.export.models import create_model
from vitfold.export.onnx import export_onnx
from vitfold.passes.pipeline import run_pipeline
from vitfold.images import batches, list_images, load_images
from vitfold.profiles.flops import schedule_macs
from vitfold.profiles.latency import measure_interleaved
from vitfold.reduce import TokenLayout, create_method
from vitfold.runtimes import BuildConfig
from vitfold.spec import ModelSpec


class _Half(torch.nn.Module):
    """One half of a pre-norm ViT block with its residual: ``[B, M, C] -> [B, M, C]``."""

    def __init__(self, block: torch.nn.Module, which: str):
        super().__init__()
        self.block, self.which = block, which

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        if self.which == "attn":
            return x + b.drop_path1(b.ls1(b.attn(b.norm1(x))))
        return x + b.drop_path2(b.ls2(b.mlp(b.norm2(x))))


def block_ceiling(model, schedules: dict, backend: str, batch: int, tmp: Path, threads, min_runs: int) -> dict[str, float]:
    """Zero-overhead speedup per variant (see the module docstring); 'dense' maps to 1.0 by definition.

    Assumes every block has the same cost at a given token count (true of timm ViTs: one width).
    """
    block, dim = model.blocks[0], model.embed_dim
    counts = sorted({n for s in schedules.values() for n in s.tokens})
    cfg = BuildConfig(backend=backend, threads=threads)
    sessions = {}
    for which in ("attn", "mlp"):
        for n in counts:
            path = tmp / f"ceiling-{which}-{n}-b{batch}.onnx"
            export_onnx(_Half(block, which).eval(), path, (batch, n, dim))
            out = tmp / f"ceiling-{backend}-{which}-{n}-b{batch}"
            out.mkdir()
            sessions[which, n] = runtimes.build_session(path, out, cfg)
    sample = {n: np.random.default_rng(n).standard_normal((batch, n, dim)).astype(np.float32) for n in counts}
    stats = measure_interleaved({key: (lambda s=s, x=sample[key[1]]: s(x)) for key, s in sessions.items()}, batch,
                                min_runs=min_runs, min_seconds=0.5)
    for s in sessions.values():
        s.close()
    half = {key: st.median_ms for key, st in stats.items()}

    def blocks_ms(tokens) -> float:
        return sum(half["attn", tokens[i]] + half["mlp", tokens[i + 1]] for i in range(len(tokens) - 1))

    full = counts[-1]
    per_token = {n: (half["attn", n] + half["mlp", n]) / n / ((half["attn", full] + half["mlp", full]) / full) for n in counts}
    print("block cost per token relative to N=%d: " % full + ", ".join(f"{n}: {v:.2f}" for n, v in per_token.items()))
    return {name: blocks_ms(s.tokens) for name, s in schedules.items()}


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
                        help="also time dense block halves at each token count: the zero-overhead speedup")
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
        columns += ["ceiling", "speedup / ceiling"]
    for column in columns:
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory(prefix="vitfold-bench-") as tmp:
        for batch in [int(b) for b in args.batches.split(",")]:
            sample = batches(photos, batch)[0]
            onnx_paths = {}
            for name, method in variants.items():
                path = Path(tmp) / f"{name}-b{batch}.onnx"
                export_onnx(method.apply(model, schedules[name]), path, sample.shape)
                run_pipeline(path, path.with_suffix(".opt.onnx"), ("fold-schedule",), [sample])
                onnx_paths[name] = path.with_suffix(".opt.onnx")
            for backend in args.backends.split(","):
                cfg = BuildConfig(backend=backend, threads=args.threads)
                sessions = {}
                for name, path in onnx_paths.items():
                    out = Path(tmp) / f"{backend}-{name}-b{batch}"
                    out.mkdir()
                    sessions[name] = runtimes.build_session(path, out, cfg)
                console.print(f"[dim]measuring {backend} batch {batch} ({', '.join(sessions)})[/]")
                stats = measure_interleaved({n: (lambda s=s: s(sample)) for n, s in sessions.items()}, batch,
                                            min_runs=args.min_runs, min_seconds=args.min_seconds)
                ideal = None
                if args.ceiling:
                    console.print(f"[dim]measuring {backend} batch {batch} block halves at every token count[/]")
                    ideal = block_ceiling(model, schedules, backend, batch, Path(tmp), args.threads, args.min_runs)
                    fixed = stats["dense"].median_ms - ideal["dense"]  # patch embedding, final norm, head
                for name, st in stats.items():
                    speedup = stats["dense"].median_ms / st.median_ms
                    ratio = macs["dense"] / macs[name]
                    row = [backend, str(batch), name, f"{st.median_ms:.2f}", f"{st.p90_ms:.2f}", f"{st.cov:.1%}",
                           f"{speedup:.2f}x", f"{ratio:.2f}x", f"{speedup / ratio:.0%}"]
                    if ideal is not None:
                        ceiling = stats["dense"].median_ms / (fixed + ideal[name])
                        row += [f"{ceiling:.2f}x", f"{speedup / ceiling:.0%}"]
                    table.add_row(*row)
                for s in sessions.values():
                    s.close()
    console.print(table)
    settings = BuildConfig(threads=args.threads)
    console.print(f"threads: {settings.resolved_threads}; OpenVINO f32 hint LATENCY; ONNX Runtime CPU EP, graph optimisation all")


if __name__ == "__main__":
    main()
