"""Every token-reduction method at matched FLOPs: speedup vs FLOP ratio in one interleaved run.

    python benchmarks/methods.py                               # DeiT-S, OpenVINO f32, batch 1, 0.65 of dense
    python benchmarks/methods.py --target 0.5 --backend onnxruntime
    python benchmarks/methods.py --dinov2 ../shared/data/dinov2_vits14_224.safetensors

For each method the parameter (ToMe r, EViT / Top-K / clustering keep rate) whose analytic MACs come
closest to ``--target`` x dense is picked from the schedule alone, then every variant is exported,
built and timed in ONE interleaved loop with the dense model (ratios from one run; absolute times on
a shared machine move). With ``--dinov2`` the same matching is done on DINOv2 ViT-S/14 (real weights)
and the table adds fidelity vs dense on the shipped photos: class-token feature cosine (torch).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from vitfold.compile import compile_module
from vitfold.build import model_dims
from vitfold.export.models import create_model
from vitfold.export.onnx import torch_outputs
from vitfold.images import batches, list_images, load_images
from vitfold.metrics import compare
from vitfold.runtimes.backends import get_backend
from vitfold.profiles.flops import schedule_macs
from vitfold.profiles.latency import measure_interleaved
from vitfold.reduce import METHODS, TokenLayout, create_method
from vitfold.runtimes import BuildConfig
from vitfold.spec import ModelSpec

#: name -> (method, fixed params, the parameter searched, candidate values)
CANDIDATES = {
    "tome": ("tome", {}, "r", list(range(1, 40))),
    "tome-prune": ("tome", {"mode": "prune"}, "r", list(range(1, 40))),
    "evit": ("evit", {}, "keep_rate", [round(0.3 + 0.01 * i, 2) for i in range(71)]),
    "topk": ("topk", {}, "keep_rate", [round(0.3 + 0.01 * i, 2) for i in range(71)]),
    "dpc-knn": ("dpc-knn", {}, "keep_rate", [round(0.3 + 0.01 * i, 2) for i in range(71)]),
    "kmedoids": ("kmedoids", {}, "keep_rate", [round(0.3 + 0.01 * i, 2) for i in range(71)]),
}


def matched(model, target: float) -> dict[str, tuple]:
    """For each registered method: ``(method, params, schedule, mac ratio)`` closest to ``target``."""
    layout, dims = TokenLayout.of(model), model_dims(model)
    dense = schedule_macs(dims, [layout.num_tokens] * (layout.depth + 1))["total"]
    picks = {}
    for label, (name, fixed, key, values) in CANDIDATES.items():
        if name not in METHODS:
            continue
        best = None
        for value in values:
            method = create_method(name, **fixed, **{key: value})
            try:
                schedule = method.schedule(layout)
            except Exception:  # infeasible for this model: skip the value
                continue
            ratio = schedule_macs(dims, list(schedule.tokens), schedule.site)["total"] / dense
            if best is None or abs(ratio - target) < abs(best[3] - target):
                best = (method, {**fixed, key: value}, schedule, ratio)
        if best is not None:
            picks[label] = best
    return picks


def fidelity_on_dinov2(path: Path, target: float) -> dict[str, tuple[dict, float, float, float]]:
    """Class-token cosine vs dense (mean, min) on the shipped photos for matched-FLOP variants."""
    model, pre = create_model(ModelSpec("vit_small_patch14_dinov2", checkpoint=str(path), img_size=224))
    photos = batches(load_images(list_images(), pre), 1)
    dense = torch_outputs(model, photos)
    out = {}
    for label, (method, params, schedule, ratio) in matched(model, target).items():
        reduced = torch_outputs(method.apply(model, schedule), photos)
        c = compare(dense, reduced)
        out[label] = (params, ratio, c.mean_cosine, c.min_cosine)
    return out


def _fmt(params: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--target", type=float, default=0.65, help="reduced MACs / dense MACs to match")
    parser.add_argument("--backend", default="openvino", choices=["openvino", "onnxruntime"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--min-runs", type=int, default=50)
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--dinov2", type=Path, default=None, help="DINOv2 ViT-S/14 safetensors for fidelity figures")
    args = parser.parse_args()

    console = Console(width=160)
    model, pre = create_model(ModelSpec(args.model))
    picks = matched(model, args.target)
    sample = batches(load_images(list_images(), pre), 1)[0]
    cfg = BuildConfig(backend=args.backend, threads=args.threads)
    sessions = {}
    with tempfile.TemporaryDirectory(prefix="vitfold-methods-") as tmp:
        layout = TokenLayout.of(model)
        variants = {"dense": (model, None)}
        variants.update({label: (p[0].apply(model, p[2]), p) for label, p in picks.items()})
        for label, (module, _) in variants.items():
            console.print(f"[dim]{label}: export, passes, {args.backend} build[/]")
            sessions[label] = compile_module(module, sample.shape, Path(tmp) / label, cfg, sample=sample).open(cfg)
        console.print(f"[dim]measuring {len(sessions)} variants interleaved[/]")
        stats = measure_interleaved({n: (lambda s=s: s(sample)) for n, s in sessions.items()}, 1,
                                    min_runs=args.min_runs, min_seconds=args.min_seconds)
        for s in sessions.values():
            s.close()

    fidelity = fidelity_on_dinov2(args.dinov2, args.target) if args.dinov2 else {}
    table = Table(title=f"{args.model}, {args.backend} f32, batch 1: methods at ~{args.target:.2f} of dense MACs, one interleaved run")
    for column in ("method", "params", "tokens at the end", "MACs / dense", "FLOP ratio", "median ms", "CoV", "speedup",
                   "speedup / FLOP ratio", "DINOv2 params", "DINOv2 cosine mean (min)"):
        table.add_column(column, justify="right")
    dense_ms = stats["dense"].median_ms
    for label, st in stats.items():
        if label == "dense":
            table.add_row("dense", "", str(layout.num_tokens), "1.000", "1.00x", f"{st.median_ms:.2f}", f"{st.cov:.1%}", "1.00x", "", "", "")
            continue
        _, params, schedule, ratio = picks[label]
        speedup = dense_ms / st.median_ms
        fid = fidelity.get(label)
        table.add_row(label, _fmt(params), str(schedule.tokens[-1]), f"{ratio:.3f}", f"{1 / ratio:.2f}x", f"{st.median_ms:.2f}",
                      f"{st.cov:.1%}", f"{speedup:.2f}x", f"{speedup * ratio:.0%}",
                      _fmt(fid[0]) if fid else "", f"{fid[2]:.4f} ({fid[3]:.4f})" if fid else "")
    console.print(table)
    noisy = [n for n, s in stats.items() if s.noisy]
    if noisy:
        console.print(f"[yellow]CoV above 5% for {', '.join(noisy)}: the machine was busy; run again[/]")
    console.print(f"threads: {cfg.resolved_threads}; passes: {', '.join(get_backend(args.backend).pipeline)}")


if __name__ == "__main__":
    main()
