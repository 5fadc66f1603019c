"""Token reduction's speedup over dense (ToMe; EViT / Top-K with ``--method``), per backend and batch size,
measured in one run (variants interleaved).

    python benchmarks/latency.py                       # DeiT-S, r 8/13/16, OpenVINO + ONNX Runtime, batch 1 and 8
    python benchmarks/latency.py --backends openvino --batches 1 --r 13
    python benchmarks/latency.py --backends openvino --ceiling --r 13,26/2,39/3   # 12, 6, 4 reduction sites
    python benchmarks/latency.py --backends openvino --ceiling --precision int8 --r 13  # within INT8
    python benchmarks/latency.py --backends openvino --ceiling --fused-ops --r 13,39/3  # + one fused op per site
    python benchmarks/latency.py --backends openvino --ceiling --fused-ops --method evit --keep-rate 0.7
    python benchmarks/latency.py --backends onnxruntime --ceiling --fused-ops --r 13,39/3  # ONNXRUNTIME_ROOT: C API header

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
the reduction ops cost (reduced median minus truncated median; in brackets, its share of the reduced run), and ``budget ms`` is what they may
cost for the speedup to reach ``--target`` x the FLOP ratio (dense median / (target x FLOP ratio)
minus truncated median). A negative budget means no reduction, however cheap, reaches the target on
this backend at this batch size.

``--precision int8`` builds every variant (dense, reduced, truncated twins) as the build does at that
precision (the reduction's own ops kept float: :mod:`vitfold.quantize`), calibrated on ``--calibrate
DIR`` or the check photos, so speedup, ceiling and reduction ms are all within INT8.

``--fused-ops`` (OpenVINO f32 or int8, ONNX Runtime f32) adds, per schedule, the build's ``--fused-ops``
form: each site one ``vitfold.ToMeMerge`` / ``vitfold.EViTPrune`` op (:mod:`vitfold.native`, compiled here
once; ONNX Runtime's library needs its C API header, ``ONNXRUNTIME_ROOT``), checked against the graph form.
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vitfold.build import model_dims
from vitfold.compile import compile_onnx
from vitfold.errors import FidelityError
from vitfold.export.models import create_model
from vitfold.export.onnx import export_onnx
from vitfold.images import batches, list_images, load_images
from vitfold.native import FUSED_TARGETS
from vitfold.plan.truncate import truncated_model
from vitfold.profiles.flops import schedule_macs
from vitfold.profiles.latency import measure_interleaved
from vitfold.quantize import load_calibration
from vitfold.reduce import TokenLayout, create_method
from vitfold.runtimes import BuildConfig
from vitfold.spec import ModelSpec


def safe(label: str) -> str:
    """A variant label as a file name (``r=26/2 truncated`` -> ``r=26_2_truncated``)."""
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", label)


def parse_sites(value: str, depth: int):
    """``"13"`` -> 13 (every block); ``"26/2"`` -> ``[26, 0, 26, 0, ...]`` (every 2nd block, from block 0)."""
    r, _, every = value.partition("/")
    if not every:
        return int(r)
    return [int(r) if block % int(every) == 0 else 0 for block in range(depth)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--method", default="tome", choices=("tome", "evit", "topk"))
    parser.add_argument("--keep-rate", default="0.7", help="--method evit / topk: comma-separated keep rates (default locations)")
    parser.add_argument("--r", default="8,13,16",
                        help="comma-separated ToMe r values; R/K merges R at every K-th block only (blocks 0, K, 2K, ...): "
                             "13,26/2,39/3 compares 12, 6 and 4 reduction sites")
    parser.add_argument("--backends", default="openvino,onnxruntime")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", type=int, default=None, help="inference threads (default: one per core)")
    parser.add_argument("--min-runs", type=int, default=50)
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--precision", default="f32", choices=("f32", "int8"),
                        help="every variant at this precision (int8: the build's quantization, reduction kept float)")
    parser.add_argument("--calibrate", type=Path, default=None, help="--precision int8: calibration images (default: the check photos)")
    parser.add_argument("--fused-ops", action="store_true",
                        help="also each schedule with its sites as one fused op (OpenVINO, ONNX Runtime; compiles vitfold.native once)")
    parser.add_argument("--ceiling", action="store_true",
                        help="also time each schedule with truncation as its reduction: the zero-overhead speedup")
    parser.add_argument("--target", type=float, default=0.9,
                        help="--ceiling: speedup target as a fraction of the FLOP ratio, for the budget column")
    args = parser.parse_args()

    console = Console(width=150)
    model, pre = create_model(ModelSpec(args.model))
    layout = TokenLayout.of(model)
    dims = model_dims(model)
    variants = {"dense": create_method("tome", r=0)}
    if args.method == "tome":
        variants.update({f"r={v}": create_method("tome", r=parse_sites(v, layout.depth)) for v in args.r.split(",")})
    else:
        variants.update({f"keep={v}": create_method(args.method, keep_rate=float(v)) for v in args.keep_rate.split(",")})
    schedules = {name: m.schedule(layout) for name, m in variants.items()}
    macs = {name: schedule_macs(dims, list(s.tokens))["total"] for name, s in schedules.items()}
    photos = load_images(list_images(), pre)

    table = Table(title=f"{args.model}: {args.method} vs dense, {args.precision}, interleaved in one run")
    columns = ["backend", "batch", "variant", "median ms", "p90 ms", "CoV", "speedup", "FLOP ratio", "speedup / FLOP ratio"]
    if args.ceiling:
        columns += ["ceiling", "speedup / ceiling", "reduction ms", f"budget ms ({args.target:g}x FLOP ratio)"]
    for column in columns:
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory(prefix="vitfold-bench-") as tmp:
        for batch in [int(b) for b in args.batches.split(",")]:
            sample = batches(photos, batch)[0]
            calibration = load_calibration(args.calibrate, pre, batch, warn=lambda m: None) if args.precision == "int8" else None
            exported = {}
            def export(torch_model, label: str, schedule=None) -> Path:
                path = Path(tmp) / f"{safe(label)}-b{batch}.onnx"
                export_onnx(torch_model, path, sample.shape, metadata={"schedule": schedule.to_json()} if schedule else None)
                return path

            for name, method in variants.items():
                exported[name] = export(method.apply(model, schedules[name]), name, schedules[name])
                if args.ceiling and name != "dense":  # the same token counts, reduced by truncation
                    exported[f"{name} truncated"] = export(truncated_model(model, schedules[name].tokens), f"{name}-truncated")
            for backend in args.backends.split(","):
                cfg = BuildConfig(backend=backend, threads=args.threads, precision=args.precision)
                sessions = {}
                for name, path in exported.items():  # the build's own compile path: passes, lint, backend build
                    out = Path(tmp) / f"{backend}-{safe(name)}-b{batch}"
                    out.mkdir()
                    if args.fused_ops and args.precision in FUSED_TARGETS.get(backend, ()) and name in schedules and name != "dense":
                        # the fused build is checked against its graph form, built into `out` and timed as the schedule
                        fused_cfg = replace(cfg, extra={"fused_ops": True})
                        fused_dir = Path(tmp) / f"{backend}-{safe(name)}-fused-b{batch}"
                        fused_dir.mkdir()
                        try:
                            compiled = compile_onnx(path, fused_dir, fused_cfg, sample, calibration=calibration,
                                                    graph_form_dir=out)
                        except FidelityError as exc:  # a near-tie ranked otherwise: the build would stop too
                            console.print(f"[yellow]{backend} batch {batch} {name}: no fused variant ({exc})[/]")
                            shutil.rmtree(out)
                            out.mkdir()
                        else:
                            sessions[name] = compiled.graph_form.open(cfg)
                            sessions[f"{name} fused"] = compiled.open(fused_cfg)
                            continue
                    sessions[name] = compile_onnx(path, out, cfg, sample, calibration=calibration).open(cfg)
                console.print(f"[dim]measuring {backend} batch {batch} ({', '.join(sessions)})[/]")
                stats = measure_interleaved({n: (lambda s=s: s(sample)) for n, s in sessions.items()}, batch,
                                            min_runs=args.min_runs, min_seconds=args.min_seconds)
                for name, st in stats.items():
                    if name.endswith(" truncated"):
                        continue
                    base = name.removesuffix(" fused")
                    speedup = stats["dense"].median_ms / st.median_ms
                    ratio = macs["dense"] / macs[base]
                    row = [backend, str(batch), name, f"{st.median_ms:.2f}", f"{st.p90_ms:.2f}", f"{st.cov:.1%}",
                           f"{speedup:.2f}x", f"{ratio:.2f}x", f"{speedup / ratio:.0%}"]
                    if args.ceiling:
                        truncated = stats.get(f"{base} truncated", stats["dense"])
                        ceiling = stats["dense"].median_ms / truncated.median_ms
                        budget = stats["dense"].median_ms / (args.target * ratio) - truncated.median_ms
                        row += [f"{ceiling:.2f}x", f"{speedup / ceiling:.0%}"]
                        spent = st.median_ms - truncated.median_ms
                        row += ["", ""] if name == "dense" else [f"{spent:.2f} ({spent / st.median_ms:.1%})", f"{budget:.2f}"]
                    table.add_row(*row)
                for s in sessions.values():
                    s.close()
    console.print(table)
    settings = BuildConfig(threads=args.threads)
    console.print(f"threads: {settings.resolved_threads}; precision {args.precision}; OpenVINO hint LATENCY; "
                  f"ONNX Runtime CPU EP, graph optimisation all")


if __name__ == "__main__":
    main()
