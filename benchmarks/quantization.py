"""Token reduction composed with quantization: speedups within a precision and over dense f32, in one run.

    python benchmarks/quantization.py                              # DeiT-S, OpenVINO batch 1 and 8 + ONNX Runtime batch 1
    python benchmarks/quantization.py --dinov2 ../shared/data/dinov2_vits14_224.safetensors   # + fidelity and token choices
    python benchmarks/quantization.py --backends openvino --batches 1 --calibrate ~/photos

Latency table: {dense, ToMe r=13, EViT keep 0.7} x {f32, bf16, int8, f32 with int8 weights} on
OpenVINO (bf16 and weight compression are OpenVINO's) and {f32, int8} on ONNX Runtime, every variant of
one backend and batch built through the compile path and timed in ONE interleaved loop. Columns: the
speedup over dense at the same precision, the speedup over dense f32 (the whole gain), the FLOP ratio
and the share of it the speedup reaches within the precision.

Fidelity table (``--dinov2``; DINOv2 ViT-S/14 real weights, ``--task features``, OpenVINO batch 1, the
shipped photos): per-token cosine of the patch features against dense f32 (mean and p5), and for every
reduced variant below f32 the token-choice agreement with its f32 graph (:mod:`vitfold.quantize.choices`):
bf16, int8 weights, int8 with the ignored scope and int8 without it (the "int8, no scope" row quantizes
the reduction too).

Calibration is on ``--calibrate`` (default: the shipped photos, which are also the fidelity photos:
a favourable case; say so when quoting). Absolute times on a shared machine move; the ratios are what
to compare.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnx
from rich.console import Console
from rich.table import Table

from vitfold import runtimes
from vitfold.build import model_dims
from vitfold.compile import compile_module
from vitfold.export.models import create_model
from vitfold.images import batches, list_images, load_images
from vitfold.metrics import cosine_rows
from vitfold.profiles.flops import schedule_macs
from vitfold.profiles.latency import measure_interleaved
from vitfold.quantize import ReductionScope, load_calibration
from vitfold.quantize import choices as token_choices
from vitfold.quantize import nncf_openvino
from vitfold.reduce import TokenLayout, create_method
from vitfold.reduce.features import DenseFeatures, for_features
from vitfold.runtimes import BuildConfig
from vitfold.spec import ModelSpec

#: variant -> (method, parameters)
METHODS = {"dense": ("tome", {"r": 0}), "tome r=13": ("tome", {"r": 13}), "evit 0.7": ("evit", {"keep_rate": 0.7})}
#: backend -> precision labels (BuildConfig keyword arguments)
PRECISIONS = {
    "openvino": {"f32": {}, "bf16": {"precision": "bf16"}, "int8": {"precision": "int8"}, "f32-w8": {"weights": "int8"}},
    "onnxruntime": {"f32": {}, "int8": {"precision": "int8"}},
}


def reduced_models(model, methods: dict, features: bool = False) -> dict:
    """variant -> (torch module, MACs)."""
    layout, dims = TokenLayout.of(model), model_dims(model)
    out = {}
    for label, (name, params) in methods.items():
        method = create_method(name, **params)
        if features:
            method = create_method(name, **params, **for_features(type(method)))
        schedule = method.schedule(layout)
        module = method.apply(model, schedule)
        out[label] = (DenseFeatures(module) if features else module,
                      schedule_macs(dims, list(schedule.tokens), schedule.site)["total"])
    return out


def latency_table(args, console: Console) -> Table:
    model, pre = create_model(ModelSpec(args.model))
    variants = reduced_models(model, METHODS)
    photos = load_images(list_images(), pre)
    table = Table(title=f"{args.model}: token reduction x precision, interleaved per backend and batch")
    for column in ("backend", "batch", "variant", "precision", "median ms", "CoV", "vs dense same precision",
                   "vs dense f32", "FLOP ratio", "of FLOP ratio"):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory(prefix="vitfold-bench-quant-") as tmp:
        for backend in args.backends.split(","):
            for batch in [int(b) for b in args.batches.split(",")]:
                if backend == "onnxruntime" and batch != 1 and not args.all_batches:
                    continue
                sample = batches(photos, batch)[0]
                calibration = load_calibration(args.calibrate, pre, batch, warn=lambda m: None)
                sessions = {}
                for label, (module, _) in variants.items():
                    for precision, settings in PRECISIONS[backend].items():
                        cfg = BuildConfig(backend, threads=args.threads, **settings)
                        where = Path(tmp) / f"{backend}-b{batch}-{label.replace(' ', '_')}-{precision}"
                        compiled = compile_module(module, sample.shape, where, cfg, sample=sample, calibration=calibration)
                        sessions[(label, precision)] = compiled.open(cfg)
                console.print(f"[dim]measuring {backend} batch {batch}: {len(sessions)} variants interleaved[/]")
                stats = measure_interleaved({f"{k[0]}|{k[1]}": (lambda s=s: s(sample)) for k, s in sessions.items()},
                                            batch, min_runs=args.min_runs, min_seconds=args.min_seconds)
                for (label, precision), session in sessions.items():
                    st = stats[f"{label}|{precision}"]
                    same = stats[f"dense|{precision}"].median_ms / st.median_ms
                    whole = stats["dense|f32"].median_ms / st.median_ms
                    ratio = variants["dense"][1] / variants[label][1]
                    table.add_row(backend, str(batch), label, precision, f"{st.median_ms:.2f}", f"{st.cov:.1%}",
                                  f"{same:.2f}x", f"{whole:.2f}x", f"{ratio:.2f}x", f"{same / ratio:.0%}")
                    session.close()
    return table


def fidelity_table(args, console: Console) -> Table:
    model, pre = create_model(ModelSpec("vit_small_patch14_dinov2", checkpoint=str(args.dinov2), img_size=224))
    methods = {"dense": ("tome", {"r": 0}), "tome r=8": ("tome", {"r": 8}), **{k: v for k, v in METHODS.items() if k != "dense"}}
    variants = reduced_models(model, methods, features=True)
    photos = batches(load_images(list_images(), pre), 1)
    calibration = load_calibration(args.calibrate, pre, 1, warn=lambda m: None)
    table = Table(title="DINOv2 ViT-S/14 features, OpenVINO batch 1: vs dense f32 on the shipped photos")
    for column in ("variant", "precision", "token cosine mean", "token cosine p5", "choices identical",
                   "first site identical", "first site indices shared"):
        table.add_column(column, justify="right")
    rows = [(label, precision) for label in variants for precision in PRECISIONS["openvino"]]
    rows += [(label, "int8, no scope") for label in variants if label != "dense"]
    with tempfile.TemporaryDirectory(prefix="vitfold-bench-quant-fid-") as tmp:
        outputs, exits = {}, {}
        for label, precision in rows:
            module = variants[label][0]
            settings = PRECISIONS["openvino"].get(precision, {"precision": "int8"})
            cfg = BuildConfig("openvino", threads=args.threads, **settings)
            where = Path(tmp) / f"{label.replace(' ', '_')}-{precision.replace(' ', '_').replace(',', '')}"
            if precision == "int8, no scope":  # the same quantizer with nothing kept float
                compiled = compile_module(module, photos[0].shape, where, BuildConfig("openvino", threads=args.threads),
                                          sample=photos[0])
                quantized = nncf_openvino.quantize(where / "model.opt.onnx", where, cfg, calibration, ReductionScope((), {}, ()))
                runtimes.build(quantized["path"], where, cfg)
                xml = where / "model.xml"
            else:
                compiled = compile_module(module, photos[0].shape, where, cfg, sample=photos[0], calibration=calibration)
                xml = where / compiled.files["backend"]
            with runtimes.backend_module("openvino").OpenVINOSession(xml, cfg) as session:
                outputs[(label, precision)] = np.concatenate([next(iter(session(p).values())) for p in photos])
            if precision == "f32" and label != "dense":
                graph = onnx.load(str(where / "model.opt.onnx"))
                found = token_choices.exits(graph)
                exits[label] = (found, token_choices.run_onnxruntime(graph, found, photos, BuildConfig(threads=args.threads).resolved_threads))
            agreement = None
            if precision != "f32" and label != "dense":
                found, reference = exits[label]
                from vitfold.runtimes.openvino import compile_config

                candidate = token_choices.run_openvino(xml, found, photos, compile_config(cfg))
                agreement = token_choices.agreement(reference, candidate, found.sites)
            dense = outputs[("dense", "f32")]
            cos = cosine_rows(dense.reshape(-1, dense.shape[-1]), outputs[(label, precision)].reshape(-1, dense.shape[-1]))
            table.add_row(label, precision, f"{cos.mean():.4f}", f"{np.percentile(cos, 5):.4f}",
                          *(["", "", ""] if agreement is None else
                            [f"{agreement.identical:.1%}", f"{agreement.first_site:.1%}", f"{agreement.first_site_tokens:.1%}"]))
            console.print(f"[dim]{label} {precision}: token cosine {cos.mean():.4f}[/]")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="deit_small_patch16_224")
    parser.add_argument("--backends", default="openvino,onnxruntime")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--all-batches", action="store_true", help="ONNX Runtime at every --batches value too (default: batch 1)")
    parser.add_argument("--calibrate", type=Path, default=None, help="calibration images (default: the shipped photos)")
    parser.add_argument("--dinov2", type=Path, default=None, help="DINOv2 ViT-S/14 weights: adds the fidelity table")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--min-runs", type=int, default=30)
    parser.add_argument("--min-seconds", type=float, default=2.0)
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args()
    console = Console(width=160)
    if not args.skip_latency:
        console.print(latency_table(args, console))
    if args.dinov2 is not None:
        if not args.dinov2.is_file():
            parser.error(f"--dinov2 {args.dinov2}: no such file")
        console.print(fidelity_table(args, console))
    console.print(f"threads: {BuildConfig(threads=args.threads).resolved_threads}; OpenVINO hint LATENCY")


if __name__ == "__main__":
    main()
