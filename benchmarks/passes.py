"""merge-as-matmul vs the scatter form of ToMe's merge, per backend and batch, in one interleaved run.

    python benchmarks/passes.py                               # DeiT-S ToMe r=13, OpenVINO + ONNX Runtime, batch 1 and 8
    python benchmarks/passes.py --backends openvino --batches 1 --r 13

Three variants of one model run interleaved (same process, same input): ``dense``, ``scatter`` (ToMe
after fold-schedule: ScatterElements(add) merges) and ``matmul`` (then merge-as-matmul: one-hot
MatMuls). The table gives median / p90 ms, speedup over dense, and ``matmul vs scatter`` = scatter
median / matmul median (> 1: the MatMul form is faster). Absolute times on a shared machine move;
ratios taken within one interleaved loop are what to compare. The backend's default
pipeline (its record in vitfold/runtimes/backends.py) should include merge-as-matmul only where it wins.

``--per-layer`` adds the backends' own per-layer counters (OpenVINO PERF_COUNT, ONNX Runtime's
profiler): the time of the merge itself in each form, i.e. the layers made from the nodes the pass
removes (ScatterElements and its index Expand) vs those it adds (Transpose, Equal, Cast, MatMul,
Add). Under load these move far less than end-to-end medians.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import onnx

from rich.console import Console
from rich.table import Table

from vitfold import runtimes
from vitfold.export.models import create_model
from vitfold.export.onnx import export_onnx
from vitfold.images import batches, list_images, load_images
from vitfold.compile import compile_onnx
from vitfold.profiles.latency import measure_interleaved
from vitfold.reduce import TokenLayout, create_method
from vitfold.runtimes import BuildConfig
from vitfold.spec import ModelSpec

#: variant -> (ToMe at --r or dense, passes after export)
VARIANTS = {
    "dense": (False, ("fold-schedule",)),
    "scatter": (True, ("fold-schedule",)),
    "matmul": (True, ("fold-schedule", "merge-as-matmul")),
}


def merge_nodes(scatter: Path, matmul: Path) -> dict[str, set[str]]:
    """ONNX node names of the merge in each form: those merge-as-matmul removed, and those it added."""
    before = {n.name for n in onnx.load(str(scatter)).graph.node}
    after = {n.name for n in onnx.load(str(matmul)).graph.node}
    return {"scatter": before - after, "matmul": after - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--r", type=int, default=13, help="ToMe r (tokens merged per block)")
    parser.add_argument("--backends", default="openvino,onnxruntime")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", type=int, default=None, help="inference threads (default: one per core)")
    parser.add_argument("--min-runs", type=int, default=50)
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=1, help="repeat the interleaved measurement; one row each")
    parser.add_argument("--per-layer", action="store_true", help="also time the merge layers with the backend profilers")
    args = parser.parse_args()

    console = Console(width=150)
    model, pre = create_model(ModelSpec(args.model))
    layout = TokenLayout.of(model)
    methods = {True: create_method("tome", r=args.r), False: create_method("tome", r=0)}
    photos = load_images(list_images(), pre)

    table = Table(title=f"{args.model}: ToMe r={args.r} merge as ScatterElements vs one-hot MatMul, interleaved")
    for column in ("backend", "batch", "round", "variant", "median ms", "p90 ms", "CoV", "speedup vs dense", "matmul vs scatter"):
        table.add_column(column, justify="right")
    layers = Table(title="the merge alone: per-layer counters, ms per run (sum over the model's merges)")
    for column in ("backend", "batch", "form", "merge layers", "merge ms", "all layers ms", "merge share"):
        layers.add_column(column, justify="right")
    with tempfile.TemporaryDirectory(prefix="vitfold-bench-passes-") as tmp:
        for batch in [int(b) for b in args.batches.split(",")]:
            sample = batches(photos, batch)[0] if len(photos) >= batch else photos[:1].repeat(batch, axis=0)
            exported = {}
            for reduced in (False, True):
                method = methods[reduced]
                path = Path(tmp) / f"{'tome' if reduced else 'dense'}-b{batch}.onnx"
                export_onnx(method.apply(model, method.schedule(layout)), path, sample.shape)
                exported[reduced] = path
            for backend in args.backends.split(","):
                cfg = BuildConfig(backend=backend, threads=args.threads)
                compiled, sessions = {}, {}
                for name, (reduced, passes) in VARIANTS.items():
                    out = Path(tmp) / f"{backend}-{name}-b{batch}"
                    out.mkdir()
                    compiled[name] = compile_onnx(exported[reduced], out, cfg, sample, passes=passes)
                    sessions[name] = compiled[name].open(cfg)
                    console.print(f"[dim]{name} b{batch}: " + ", ".join(
                        f"{r.name} {r.nodes_before}->{r.nodes_after} nodes, max abs change {r.max_abs_change:.2g}"
                        for r in compiled[name].passes) + "[/]")
                for round_ in range(args.rounds):
                    console.print(f"[dim]measuring {backend} batch {batch} round {round_ + 1} ({', '.join(sessions)})[/]")
                    stats = measure_interleaved({n: (lambda s=s: s(sample)) for n, s in sessions.items()}, batch,
                                                min_runs=args.min_runs, min_seconds=args.min_seconds)
                    for name, st in stats.items():
                        vs_scatter = f"{stats['scatter'].median_ms / st.median_ms:.3f}x" if name == "matmul" else ""
                        table.add_row(backend, str(batch), str(round_ + 1), name, f"{st.median_ms:.2f}", f"{st.p90_ms:.2f}",
                                      f"{st.cov:.1%}", f"{stats['dense'].median_ms / st.median_ms:.3f}x", vs_scatter)
                for s in sessions.values():
                    s.close()
                if args.per_layer:
                    optimized = {name: c.directory / c.files["optimized"] for name, c in compiled.items()}
                    for form, nodes in merge_nodes(optimized["scatter"], optimized["matmul"]).items():
                        c = compiled[form]
                        profile = runtimes.backend_module(backend).profile_layers(
                            c.directory, {"files": c.files, "build": cfg.to_json()}, sample, runs=args.min_runs)
                        merge = [l for l in profile["layers"] if {l["name"], *l["origins"]} & nodes]
                        merge_ms = sum(l["ms"] for l in merge)
                        total_ms = sum(l["ms"] for l in profile["layers"])
                        layers.add_row(backend, str(batch), form, str(len(merge)), f"{merge_ms:.3f}", f"{total_ms:.2f}",
                                       f"{merge_ms / total_ms:.2%}")
    console.print(table)
    if args.per_layer:
        console.print(layers)
    settings = BuildConfig(threads=args.threads)
    console.print(f"threads: {settings.resolved_threads}; OpenVINO f32 hint LATENCY; ONNX Runtime CPU EP, graph optimisation all")


if __name__ == "__main__":
    main()
