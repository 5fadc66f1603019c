"""Data-dependent gate (evit-mass): dense vs bounded static vs folded vs raw dynamic, one interleaved run.

    python benchmarks/gates.py                                  # DeiT-S, OpenVINO + ONNX Runtime, batch 1 and 8
    python benchmarks/gates.py --backends openvino --batches 1 --keep-mass 0.8
    python benchmarks/gates.py --dinov2 ../shared/data/dinov2_vits14_224.safetensors

The keep mass ``p`` is searched (bisection on the shipped photos) so that the dynamic model's mean
MACs come closest to ``--target`` x dense, unless ``--keep-mass`` is given. Variants, per backend
and batch, timed in ONE interleaved loop (``measure_interleaved``: blocks of runs, medians):

* dense: the timm model, static export, the backend's default passes;
* bounded: ``EViTMass.apply`` re-traced with the capacity calibrated on the photos (the maximum seen),
  static export (TopK to the capacity + validity mask), default passes;
* folded (batch 1): the raw export rewritten by the ``fold-gates`` pass, then ``fold-schedule``;
* dynamic: the raw export (NonZero, dynamic token dimensions) run as is; batch 8 = 8 calls of one
  image (the dynamic graph exports per image). Its time depends on the photo: every runner cycles
  through the same photos, so the dynamic median is over that mix.

With ``--dinov2`` (real weights), a second table: DINOv2 ViT-S/14 class-token feature cosine vs dense
(torch) for the dynamic and bounded forms and for EViT at the same MACs, with the capacity
calibrated on the first ``--calibrate-on`` photos and the photos over it counted.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from vitfold import runtimes
from vitfold.compile import compile_onnx
from vitfold.build import model_dims
from vitfold.capacity import calibrate_capacity, check_capacity, kept_counts
from vitfold.export.models import create_model
from vitfold.export.onnx import export_onnx, torch_outputs
from vitfold.images import list_images, load_images
from vitfold.metrics import compare
from vitfold.runtimes.backends import get_backend
from vitfold.passes.pipeline import run_pipeline
from vitfold.profiles.flops import schedule_macs
from vitfold.profiles.latency import measure_interleaved
from vitfold.reduce import TokenLayout, create_method
from vitfold.runtimes import BuildConfig
from vitfold.spec import ModelSpec

DEFAULT_DINOV2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "dinov2_vits14_224.safetensors"


def dynamic_macs(model, method, photos: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean MACs per image of the dynamic model on ``photos`` (token counts as each image runs) and
    the ``[M, G]`` kept counts."""
    layout, dims = TokenLayout.of(model), model_dims(model)
    counts = kept_counts(method.apply_dynamic(model), photos)
    masses = method.masses(layout.depth)
    totals = []
    for image in range(len(photos)):
        tokens, gate = [layout.num_tokens], 0
        for block in range(layout.depth):
            if masses[block] is None:
                tokens.append(tokens[-1])
                continue
            k = int(counts[image, gate])
            fused = 1 if method.fuse and k < tokens[-1] - layout.num_prefix_tokens else 0  # dropped tokens carry attention
            tokens.append(layout.num_prefix_tokens + k + fused)
            gate += 1
        totals.append(schedule_macs(dims, tokens)["total"])
    return float(np.mean(totals)), counts


def search_mass(model, photos: np.ndarray, target: float) -> float:
    """``p`` (to 0.005) whose dynamic mean MACs are closest to ``target`` x dense (bisection: MACs grow with p)."""
    layout, dims = TokenLayout.of(model), model_dims(model)
    dense = schedule_macs(dims, [layout.num_tokens] * (layout.depth + 1))["total"]
    low, high = 0.05, 0.995
    while high - low > 0.005:
        mid = round((low + high) / 2, 4)
        ratio = dynamic_macs(model, create_method("evit-mass", keep_mass=mid), photos)[0] / dense
        low, high = (mid, high) if ratio < target else (low, mid)
    return round((low + high) / 2, 3)


def session(path: Path, shape: list[int], directory: Path, cfg: BuildConfig, passes) -> runtimes.Session:
    """Optimise (``passes``, may be empty), lint, build and load ``path`` (input ``shape``) for ``cfg``'s backend."""
    directory.mkdir(parents=True, exist_ok=True)
    return compile_onnx(path, directory, cfg, np.zeros(shape, dtype=np.float32), passes=passes).open(cfg)


def cycling(run, inputs: list[np.ndarray]):
    """A no-argument runner that feeds ``inputs`` in turn to ``run``."""
    feed = itertools.cycle(inputs)
    return lambda: run(next(feed))


def latency_table(console, args, model, pre, photos, method, fitted, tmp: Path) -> None:
    layout, dims = TokenLayout.of(model), model_dims(model)
    dense_macs = schedule_macs(dims, [layout.num_tokens] * (layout.depth + 1))["total"]
    bounded_macs = schedule_macs(dims, list(fitted.schedule(layout).tokens))["total"]
    mean_macs, _ = dynamic_macs(model, method, photos)
    dynamic = method.apply_dynamic(model)
    bounded = fitted.apply(model, fitted.schedule(layout))
    capacity = [k for k in fitted.capacities(layout) if k is not None]
    singles = [photos[i:i + 1] for i in range(len(photos))]

    paths = {"dynamic": tmp / "dynamic.onnx", "folded": tmp / "folded.onnx"}
    export_onnx(dynamic, paths["dynamic"], (1, 3, pre.img_size, pre.img_size), dynamic=True)
    run_pipeline(paths["dynamic"], paths["folded"], [("fold-gates", {"capacity": capacity}), "fold-schedule"], singles)
    reference = {"dynamic": torch_outputs(dynamic, singles), "bounded": torch_outputs(bounded, singles)}
    for batch in args.batches:
        for label, module in (("dense", model), ("bounded", bounded)):
            paths[f"{label}-b{batch}"] = tmp / f"{label}-b{batch}.onnx"
            export_onnx(module, paths[f"{label}-b{batch}"], (batch, 3, pre.img_size, pre.img_size))

    table = Table(title=f"{args.model} (random weights), evit-mass p={method.keep_mass} at blocks {list(method.locations)}, "
                        f"capacity {capacity} (max over {len(photos)} photos); one interleaved run per backend and batch")
    for column in ("backend", "batch", "variant", "GMACs / image", "MACs / dense", "median ms", "p90 ms", "CoV",
                   "speedup vs dense", "max abs vs torch"):
        table.add_column(column, justify="right")
    macs = {"dense": dense_macs, "bounded": bounded_macs, "folded": bounded_macs, "dynamic": mean_macs}
    for backend in args.backends:
        cfg = BuildConfig(backend=backend, threads=args.threads)
        where = tmp / backend
        single = [1, 3, pre.img_size, pre.img_size]
        dyn = session(paths["dynamic"], single, where / "dynamic", cfg, ())
        folded = session(paths["folded"], single, where / "folded", cfg, ())
        parity = {
            "dynamic": compare(reference["dynamic"], np.concatenate([dyn(x)[dyn.output_names[0]] for x in singles])).max_abs,
            "folded": compare(reference["bounded"], np.concatenate([folded(x)[folded.output_names[0]] for x in singles])).max_abs,
        }
        for batch in args.batches:
            batch_input = np.ascontiguousarray(np.resize(photos, (batch,) + photos.shape[1:]))
            runners, sessions = {}, [dyn, folded]
            for label in ("dense", "bounded"):
                s = session(paths[f"{label}-b{batch}"], [batch, *single[1:]], where / f"{label}-b{batch}", cfg,
                            get_backend(backend).pipeline)
                sessions.append(s)
                runners[label] = cycling(s, [batch_input, batch_input[::-1].copy()])
                if batch == 1:
                    parity[label] = None
            if batch == 1:
                runners["folded"] = cycling(folded, singles)
                runners["dynamic"] = cycling(dyn, singles)
            else:
                runners["dynamic"] = cycling(lambda b: [dyn(b[i:i + 1]) for i in range(len(b))], [batch_input])
            console.print(f"[dim]{backend} batch {batch}: timing {', '.join(runners)} interleaved[/]")
            stats = measure_interleaved(runners, batch, min_runs=args.min_runs, min_seconds=args.min_seconds)
            for label, st in stats.items():
                table.add_row(backend, str(batch), label + (" (8 x 1)" if label == "dynamic" and batch > 1 else ""),
                              f"{macs[label] / 1e9:.3f}", f"{macs[label] / dense_macs:.3f}", f"{st.median_ms:.2f}",
                              f"{st.p90_ms:.2f}", f"{st.cov:.1%}", f"{stats['dense'].median_ms / st.median_ms:.2f}x",
                              "" if parity.get(label) is None else f"{parity[label]:.2e}")
            for s in sessions[2:]:
                s.close()
        dyn.close()
        folded.close()
    console.print(table)
    console.print("dynamic MACs: mean over the photos of each image's own token counts; bounded / folded: the capacity. "
                  "max abs: dynamic export vs the dynamic torch model, folded graph vs the re-traced bounded torch model "
                  f"({len(photos)} photos, batch 1). threads: {BuildConfig(threads=args.threads).resolved_threads}")


def fidelity_table(console, args) -> None:
    model, pre = create_model(ModelSpec("vit_small_patch14_dinov2", checkpoint=str(args.dinov2), img_size=224))
    paths = list_images()
    photos = load_images(paths, pre)
    layout, dims = TokenLayout.of(model), model_dims(model)
    dense_macs = schedule_macs(dims, [layout.num_tokens] * (layout.depth + 1))["total"]
    mass = args.keep_mass or search_mass(model, photos, args.target)
    method = create_method("evit-mass", keep_mass=mass)
    mean_macs, counts = dynamic_macs(model, method, photos)
    fitted, calibration = calibrate_capacity(method, model, photos[:args.calibrate_on], source=f"first {args.calibrate_on} photos")
    check = check_capacity(fitted, model, photos, [p.name for p in paths])
    singles = [photos[i:i + 1] for i in range(len(photos))]
    dense = torch_outputs(model, singles)
    dynamic = torch_outputs(method.apply_dynamic(model), singles)
    bounded = torch_outputs(fitted.apply(model, fitted.schedule(layout)), singles)
    bounded_macs = schedule_macs(dims, list(fitted.schedule(layout).tokens))["total"]
    rates = [round(0.3 + 0.005 * i, 3) for i in range(141)]
    evit_rate = min(rates, key=lambda r: abs(schedule_macs(dims, list(create_method("evit", keep_rate=r).schedule(layout).tokens))["total"] - mean_macs))
    evit_method = create_method("evit", keep_rate=evit_rate)
    evit = torch_outputs(evit_method.apply(model, evit_method.schedule(layout)), singles)
    evit_macs = schedule_macs(dims, list(evit_method.schedule(layout).tokens))["total"]

    table = Table(title=f"DINOv2 ViT-S/14 (real weights), {len(photos)} photos: class-token feature cosine vs dense (torch); "
                        f"evit-mass p={mass}, capacity {list(calibration.capacity)} from {calibration.source}")
    for column in ("variant", "MACs / dense", "cosine mean", "cosine min", "kept per gate (min-max over photos)"):
        table.add_column(column, justify="right")
    spread = ", ".join(f"{c.min()}-{c.max()}" for c in counts.T)
    for label, out, macs in (("evit-mass dynamic", dynamic, mean_macs), ("evit-mass bounded", bounded, bounded_macs),
                             (f"evit keep {evit_rate} (same mean MACs)", evit, evit_macs)):
        c = compare(dense, out)
        table.add_row(label, f"{macs / dense_macs:.3f}", f"{c.mean_cosine:.4f}", f"{c.min_cosine:.4f}",
                      spread if "evit-mass" in label else "")
    console.print(table)
    console.print(f"photos over the capacity: {check['exceeded']} of {check['images']} "
                  f"({', '.join(check['exceeded_images']) or 'none'}); bounded vs dynamic on the others: "
                  f"max abs {check['max_abs_fitting']:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--target", type=float, default=0.65, help="dynamic mean MACs / dense MACs to match with p")
    parser.add_argument("--keep-mass", type=float, default=None, help="use this p instead of searching")
    parser.add_argument("--backends", nargs="+", default=["openvino", "onnxruntime"], choices=["openvino", "onnxruntime"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--min-runs", type=int, default=50)
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--dinov2", type=Path, default=DEFAULT_DINOV2 if DEFAULT_DINOV2.is_file() else None,
                        help="DINOv2 ViT-S/14 safetensors for the fidelity table (default: ../shared/data/..., if there)")
    parser.add_argument("--calibrate-on", type=int, default=4, help="DINOv2: photos used for calibration (the rest are unseen)")
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args()

    console = Console(width=200)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    if not args.skip_latency:
        model, pre = create_model(ModelSpec(args.model))
        photos = load_images(list_images(), pre)
        mass = args.keep_mass or search_mass(model, photos, args.target)
        method = create_method("evit-mass", keep_mass=mass)
        fitted, _ = calibrate_capacity(method, model, photos)
        with tempfile.TemporaryDirectory(prefix="vitfold-gates-") as tmp:
            latency_table(console, args, model, pre, photos, method, fitted, Path(tmp))
    if args.dinov2:
        fidelity_table(console, args)


if __name__ == "__main__":
    main()
