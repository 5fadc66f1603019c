"""Dense prediction fidelity: every method's restored patch grid against the dense model, one table.

    python benchmarks/dense_features.py --dinov2 ../shared/data/dinov2_vits14_224.safetensors
    python benchmarks/dense_features.py --dinov2 ... --backend onnxruntime --no-mirror

DINOv2 ViT-S/14 (real weights), ``--task features``: each variant is exported, compiled through the
build's compile path for ``--backend`` (default OpenVINO f32) and run on the shipped photos (and
their mirror images, unless ``--no-mirror``). Columns, against the dense model built the same way:
mean per-token cosine, its 5th percentile (the worst tokens matter to a dense head), the map cosine
(each image's whole grid as one vector), and the FLOP ratio of the schedule. Rows: ToMe r=8 / 13,
EViT and Top-K at keep 0.7 with both fills (``reconstruct``, the default, and ``source``) and with
the full grid rebuilt at block 9's or 10's site (``restore_at``), ``expedite`` at its defaults and at
the old half grid.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from vitfold.build import model_dims
from vitfold.compile import compile_module
from vitfold.export.models import create_model
from vitfold.images import list_images, load_images
from vitfold.metrics import cosine_rows
from vitfold.profiles.flops import schedule_macs
from vitfold.reduce import TokenLayout, create_method
from vitfold.reduce.features import DenseFeatures, for_features
from vitfold.runtimes import BuildConfig
from vitfold.spec import ModelSpec

#: label -> (method, parameters)
VARIANTS = {
    "dense": ("tome", {"r": 0}),
    "tome r=8": ("tome", {"r": 8}),
    "tome r=13": ("tome", {"r": 13}),
    "evit 0.7 (reconstruct)": ("evit", {"keep_rate": 0.7}),
    "evit 0.7 (source)": ("evit", {"keep_rate": 0.7, "fill": "source"}),
    "topk 0.7 (reconstruct)": ("topk", {"keep_rate": 0.7}),
    "topk 0.7 (source)": ("topk", {"keep_rate": 0.7, "fill": "source"}),
    "evit 0.7 restore_at=10": ("evit", {"keep_rate": 0.7, "restore_at": 10}),
    "evit 0.7 restore_at=9": ("evit", {"keep_rate": 0.7, "restore_at": 9}),
    "topk 0.7 restore_at=10": ("topk", {"keep_rate": 0.7, "restore_at": 10}),
    "topk 0.7 restore_at=9": ("topk", {"keep_rate": 0.7, "restore_at": 9}),
    "expedite (defaults)": ("expedite", {}),
    "expedite (8x8 grid, t=0.3)": ("expedite", {"grid": 8, "temperature": 0.3}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dinov2", type=Path, required=True, help="DINOv2 ViT-S/14 timm weights (safetensors)")
    parser.add_argument("--backend", default="openvino", choices=["openvino", "onnxruntime"])
    parser.add_argument("--no-mirror", action="store_true", help="the shipped photos only (default: also mirrored)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if not args.dinov2.is_file():
        parser.error(f"--dinov2 {args.dinov2}: no such file")
    console = Console(width=150)
    model, pre = create_model(ModelSpec("vit_small_patch14_dinov2", checkpoint=str(args.dinov2), img_size=224))
    photos = load_images(list_images(), pre)
    if not args.no_mirror:
        photos = np.concatenate([photos, photos[..., ::-1].copy()])
    layout, dims = TokenLayout.of(model), model_dims(model)
    dense_macs = schedule_macs(dims, [layout.num_tokens] * (layout.depth + 1))["total"]
    cfg = BuildConfig(args.backend, threads=args.threads)
    outputs, ratios = {}, {}
    with tempfile.TemporaryDirectory(prefix="vitfold-bench-features-") as tmp:
        for label, (name, params) in VARIANTS.items():
            method = create_method(name, **params)
            method = create_method(name, **params, **for_features(type(method)))
            schedule = method.schedule(layout)
            module = DenseFeatures(method.apply(model, schedule))
            where = Path(tmp) / re.sub(r"[^A-Za-z0-9.]+", "_", label)
            compiled = compile_module(module, photos[:1].shape, where, cfg, sample=photos[:1])
            with compiled.open(cfg) as session:
                outputs[label] = np.concatenate([next(iter(session(photos[i:i + 1]).values())) for i in range(len(photos))])
            ratios[label] = dense_macs / schedule_macs(dims, list(schedule.tokens), schedule.site)["total"]
            console.print(f"[dim]{label}: built and run on {len(photos)} images[/]")
    dense = outputs["dense"]
    table = Table(title=f"DINOv2 ViT-S/14 --task features, {args.backend} f32, {len(photos)} images: restored patch grid vs dense")
    for column in ("variant", "FLOP ratio", "token cosine mean", "token cosine p5", "token cosine min", "map cosine"):
        table.add_column(column, justify="right")
    for label, out in outputs.items():
        tokens = cosine_rows(dense.reshape(-1, dense.shape[-1]), out.reshape(-1, out.shape[-1]))
        maps = cosine_rows(dense.reshape(len(dense), -1), out.reshape(len(out), -1))
        table.add_row(label, f"{ratios[label]:.2f}x", f"{tokens.mean():.4f}", f"{np.percentile(tokens, 5):.4f}",
                      f"{tokens.min():.3f}", f"{maps.mean():.4f}")
    console.print(table)


if __name__ == "__main__":
    main()
