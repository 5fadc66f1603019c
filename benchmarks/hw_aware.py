"""Hardware-aware schedules vs the papers' constant ones, at matched latency, in one run.

    python benchmarks/hw_aware.py                                     # DINOv2 ViT-S/14 weights, OpenVINO, ToMe
    python benchmarks/hw_aware.py --backend onnxruntime --r 8,13 --curve curves/<...>/curve.json
    python benchmarks/hw_aware.py --method evit --keep 0.7,0.5        # EViT: auto keep rates vs constant ones

For each constant r (ToMe) or keep rate (EViT / Top-K, at the method's locations): predict its
latency from the block curve measured on this backend (calibrated with a dense and a reduced
whole-model build), pick the auto schedule for the same predicted latency
(vitfold.plan.auto_schedule), then build every variant and time them all in one interleaved loop
against the dense model. If an auto schedule measures slower than its constant partner, its budget
is scaled down by the measured ratio once and it is rebuilt, so the pairs compare at matched measured
latency. Fidelity is measured against the dense model on the shipped photos (or --images): feature
cosine for a headless backbone (DINOv2), top-1 agreement and logit cosine for classifiers.

Weights: the real DINOv2 ViT-S/14 at ../shared/data/dinov2_vits14_224.safetensors when present
(fidelity is meaningful); otherwise --model with random weights (fidelity is not).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from vitfold.compile import compile_module
from vitfold.build import model_dims
from vitfold.errors import ScheduleError
from vitfold.export.models import create_model
from vitfold.images import batches, list_images, load_images
from vitfold.metrics import compare
from vitfold.plan.auto_schedule import describe, fit_cost_model, pick_schedule, planner, site_inputs, sparse_reference
from vitfold.plan.curve import CurveOptions, measure_curve, read_curve, write_curve
from vitfold.profiles.flops import schedule_macs
from vitfold.profiles.latency import measure_interleaved
from vitfold.reduce import TokenLayout, create_method
from vitfold.runtimes import BuildConfig
from vitfold.spec import ModelSpec

DINOV2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "dinov2_vits14_224.safetensors"


def build_session(model, method_name: str, params: dict, name: str, work: Path, cfg: BuildConfig,
                  check: list[np.ndarray]):
    """Export ``method_name(**params)`` of ``model``, run the backend's pass pipeline, build and load it."""
    method = create_method(method_name, **params)
    layout = TokenLayout.of(model)
    schedule = method.schedule(layout)
    reduced = method.apply(model, schedule)
    session = compile_module(reduced, check[0].shape, work / name, cfg, sample=check[0]).open(cfg)
    return session, list(schedule.tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="timm name (default: vit_small_patch14_dinov2 with the real "
                                                      "weights when present, else deit_small_patch16_224)")
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--backend", default="openvino")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--method", default="tome", choices=["tome", "evit", "topk"])
    parser.add_argument("--r", default="8,13", help="tome: constant r values to match (comma-separated)")
    parser.add_argument("--keep", default="0.7,0.5", help="evit / topk: constant keep rates to match (comma-separated)")
    parser.add_argument("--curve", type=Path, default=None, help="block curve.json for this model/backend (default: measure)")
    parser.add_argument("--max-merge-fraction", type=float, default=0.5,
                        help="auto schedules remove at most this share of a block's tokens (ToMe's own cap: 0.5; "
                             "evit / topk: keep rate >= 1 - this)")
    parser.add_argument("--stat", default="median", choices=["median", "p10", "min"],
                        help="curve statistic the schedules are picked from (p10 / min resist a busy machine)")
    parser.add_argument("--images", type=Path, default=None, help="photos for fidelity (default: the shipped ones)")
    parser.add_argument("--min-runs", type=int, default=50)
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks") / "hw_aware", help="curve and results JSON")
    parser.add_argument("--compare-per-token", action="store_true",
                        help="also pick each auto schedule with the reduction cost all per token (no per-site cost), "
                             "the planner before sites were charged")
    args = parser.parse_args()

    console = Console(width=160)
    if args.model is None and args.checkpoint is None and DINOV2.is_file():
        args.model, args.checkpoint, args.img_size = "vit_small_patch14_dinov2", DINOV2, args.img_size or 224
    args.model = args.model or "deit_small_patch16_224"
    spec = ModelSpec(args.model, checkpoint=str(args.checkpoint) if args.checkpoint else None, img_size=args.img_size)
    cfg = BuildConfig(args.backend, threads=args.threads)
    log = lambda msg: console.print(f"[dim]{msg}[/]")  # noqa: E731
    model, pre = create_model(spec)
    layout = TokenLayout.of(model)
    dims = model_dims(model)
    check = batches(load_images(list_images(args.images), pre), 1)
    args.out.mkdir(parents=True, exist_ok=True)

    curve = read_curve(args.curve) if args.curve else measure_curve(spec, cfg, mode="block", stat=args.stat, log=log)
    if not args.curve:
        write_curve(curve, args.out / "curve")
    cap, reference, to_params = planner(args.method, {}, layout.num_tokens, layout.num_prefix_tokens, layout.depth,
                                        args.max_merge_fraction)
    sparse = sparse_reference(args.method, reference, to_params, layout.num_tokens, layout.num_prefix_tokens, layout.depth, cap)
    cost, calibration = fit_cost_model(spec, cfg, curve, method=args.method, params=reference, sparse_params=sparse,
                                       options=CurveOptions(), log=log)
    # the planner before per-site costs: all of the reference model's reduction cost per token entering a site
    ref_tokens = calibration["reference_tokens"]
    entering = sum(site_inputs(ref_tokens))
    per_token = replace(cost, site_ms=0.0, merge_us_per_token=max(0.0, calibration["reference_reduction_ms"]) / entering * 1e3)
    console.print(f"cost model: outside blocks {cost.base_ms:.2f} ms, reduction overhead {cost.site_ms:.3f} ms per site + "
                  f"{cost.merge_us_per_token:.2f} us/token (per-token only: {per_token.merge_us_per_token:.2f} us/token); "
                  f"calibrated dense {calibration['dense_ms']:.2f} ms, {args.method} {calibration['reference_params']} "
                  f"{calibration['reference_ms']:.2f} ms (reductions {calibration['reference_reduction_ms']:.2f} ms)"
                  + (f", at half the sites {calibration['sparse_ms']:.2f} ms (reductions {calibration['sparse_reduction_ms']:.2f} ms)"
                     if sparse else ""))

    if args.method == "tome":
        constants = {f"r={v}": {"r": int(v)} for v in args.r.split(",")}
    else:
        constants = {f"keep={v}": {"keep_rate": float(v)} for v in args.keep.split(",")}
    plan = {}
    for label, params in constants.items():
        constant = list(create_method(args.method, **params).schedule(layout).tokens)
        budget = cost.predict(constant)
        auto = pick_schedule(cost, layout.depth, layout.num_tokens, layout.num_prefix_tokens, budget, cap, constant)
        plan[label] = {"tokens": constant, "params": params, "predicted_ms": budget}
        plan[f"auto@{label}"] = {"tokens": auto, "params": to_params(auto), "predicted_ms": cost.predict(auto),
                                 "budget_ms": budget}
        if args.compare_per_token and cost.site_ms > 0:  # the same budget, picked without a per-site cost
            old = pick_schedule(per_token, layout.depth, layout.num_tokens, layout.num_prefix_tokens,
                                per_token.predict(constant), cap, constant)
            plan[f"auto@{label} per-token"] = {"tokens": old, "params": to_params(old), "predicted_ms": cost.predict(old),
                                               "budget_ms": per_token.predict(constant), "model": "per_token"}

    with tempfile.TemporaryDirectory(prefix="vitfold-hw-aware-") as tmp:
        work = Path(tmp)
        sessions = {"dense": build_session(model, "tome", {"r": 0}, "dense", work, cfg, check)[0]}
        for name, entry in plan.items():
            log(f"build {name}: {describe(entry['params'])}")
            sessions[name], _ = build_session(model, args.method, entry["params"], name.replace("@", "_"), work, cfg, check)

        def run_all() -> dict:
            sample = check[0]
            return measure_interleaved({k: (lambda s=s: s(sample)) for k, s in sessions.items()}, 1,
                                       min_runs=args.min_runs, min_seconds=args.min_seconds)

        latency = run_all()
        refined = False
        for name, entry in plan.items():  # one refinement: an auto schedule slower than its partner
            if not name.startswith("auto@"):
                continue
            partner = latency[name.split("@", 1)[1].removesuffix(" per-token")].median_ms
            mine = latency[name].median_ms
            if mine > partner * 1.02:
                budget = entry["budget_ms"] * partner / mine
                model_of = per_token if entry.get("model") == "per_token" else cost
                try:
                    tokens = pick_schedule(model_of, layout.depth, layout.num_tokens, layout.num_prefix_tokens, budget, cap)
                except ScheduleError as exc:  # nothing faster than the schedule it has: keep that one
                    log(f"{name}: no faster schedule ({exc})")
                    continue
                log(f"{name}: measured {mine:.2f} ms vs {partner:.2f} ms; budget {entry['budget_ms']:.2f} -> {budget:.2f} ms")
                entry.update(tokens=tokens, params=to_params(tokens), predicted_ms=cost.predict(tokens), budget_ms=budget,
                             refined=True)
                sessions[name].close()
                sessions[name], _ = build_session(model, args.method, entry["params"], name.replace("@", "_") + "-refined",
                                                  work, cfg, check)
                refined = True
        if refined:
            latency = run_all()
        outputs = {k: np.concatenate([next(iter(s(b).values())) for b in check]) for k, s in sessions.items()}
        for session in sessions.values():
            session.close()

    weights = "real DINOv2 weights" if args.checkpoint else "random weights: fidelity not meaningful"
    table = Table(title=f"{args.model} ({weights}) on {args.backend}: {args.method} auto vs constant schedules at matched latency")
    for column in ("variant", "sites", "tokens in last block", "GMACs", "predicted ms", "measured ms", "CoV", "speedup",
                   "cosine vs dense", "top-1 vs dense"):
        table.add_column(column, justify="right")
    dense_ms = latency["dense"].median_ms
    results = {"model": args.model, "method": args.method, "weights": weights, "backend": cfg.to_json(), "calibration": calibration,
               "max_merge_fraction": args.max_merge_fraction, "stat": curve.get("stat", "median_ms"),
               "cost_model": cost.to_json(), "variants": {}}
    for name in ["dense", *plan]:
        tokens = plan[name]["tokens"] if name in plan else [layout.num_tokens] * (layout.depth + 1)
        fidelity = compare(outputs["dense"], outputs[name]).to_json()
        stats = latency[name]
        row = {"tokens": tokens, "params": plan.get(name, {}).get("params", {}), "gmacs": schedule_macs(dims, tokens)["total"] / 1e9,
               "predicted_ms": plan.get(name, {}).get("predicted_ms", cost.predict(tokens)), "latency": stats.to_json(),
               "speedup": dense_ms / stats.median_ms, "fidelity": fidelity, "refined": plan.get(name, {}).get("refined", False)}
        results["variants"][name] = row
        top1 = fidelity.get("top1_agreement") if model.num_classes else None  # argmax of features means nothing
        table.add_row(name, str(cost.sites(tokens)[0]), str(tokens[-2]), f"{row['gmacs']:.3f}", f"{row['predicted_ms']:.2f}", f"{stats.median_ms:.2f}",
                      f"{stats.cov:.1%}", f"{row['speedup']:.2f}x", f"{fidelity['mean_cosine']:.4f}",
                      "n/a" if top1 is None else f"{top1:.0%}")
    console.print(table)
    for name, entry in plan.items():
        console.print(f"{name}: {describe(entry['params'])}")
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    console.print(f"results: {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
