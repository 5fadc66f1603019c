"""ToMe speedup over dense, per backend and batch size, measured in one run (variants interleaved).

    python benchmarks/latency.py                       # DeiT-S, r 8/13/16, OpenVINO + ONNX Runtime, batch 1 and 8
    python benchmarks/latency.py --backends openvino --batches 1 --r 13

Prints one table: median / p90 ms per variant, speedup = dense median / reduced median, the FLOP
ratio from the schedule, and speedup as a fraction of the FLOP ratio. Absolute times on a shared
machine move; the ratios are taken within one interleaved loop and are what to compare.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--r", default="8,13,16", help="comma-separated ToMe r values")
    parser.add_argument("--backends", default="openvino,onnxruntime")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", type=int, default=None, help="inference threads (default: one per core)")
    parser.add_argument("--min-runs", type=int, default=50)
    parser.add_argument("--min-seconds", type=float, default=3.0)
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
    for column in ("backend", "batch", "variant", "median ms", "p90 ms", "CoV", "speedup", "FLOP ratio", "speedup / FLOP ratio"):
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
                for name, st in stats.items():
                    speedup = stats["dense"].median_ms / st.median_ms
                    ratio = macs["dense"] / macs[name]
                    table.add_row(backend, str(batch), name, f"{st.median_ms:.2f}", f"{st.p90_ms:.2f}", f"{st.cov:.1%}",
                                  f"{speedup:.2f}x", f"{ratio:.2f}x", f"{speedup / ratio:.0%}")
                for s in sessions.values():
                    s.close()
    console.print(table)
    settings = BuildConfig(threads=args.threads)
    console.print(f"threads: {settings.resolved_threads}; OpenVINO f32 hint LATENCY; ONNX Runtime CPU EP, graph optimisation all")


if __name__ == "__main__":
    main()
