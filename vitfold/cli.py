"""The command line (``python deploy.py ...`` or ``vitfold ...``): parses options, calls the library.

Exit codes: 0 success, 2 bad input (unknown model, infeasible schedule, bad checkpoint, missing
backend), 1 a check failed (export contract, parity with torch, a pass changing outputs).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import VitfoldError
from .native import FUSED_TARGETS
from .runtimes.backends import BACKENDS
from .runtimes.base import PRECISIONS

#: Choices read from the backend records (vitfold/runtimes/backends.py): adding a backend adds it here.
BACKEND_NAMES = list(BACKENDS)
#: Backends that build and time on this machine without a device (sweep runs here).
HOST_BACKEND_NAMES = [name for name, b in BACKENDS.items() if not b.needs_device]
PRECISION_NAMES = [p for p in PRECISIONS if any(p in b.precisions for b in BACKENDS.values())]

console = Console(stderr=False, highlight=False)
err = Console(stderr=True, highlight=False)


def _run(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except VitfoldError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        sys.exit(exc.exit_code)


def parse_r(text: str):
    """``13`` -> 13; ``8,8,4`` -> [8, 8, 4]."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: give an int (13) or one int per block (8,8,8,...)") from None
    return values[0] if len(values) == 1 and "," not in text else values


def parse_floats(text: str, what: str):
    """``0.7`` -> 0.7; ``0.9,0.7`` -> [0.9, 0.7]."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: give {what} as a number (0.7) or comma-separated numbers") from None
    return values[0] if len(values) == 1 and "," not in text else values


def parse_value(text: str):
    """A ``--param`` value: JSON where it parses (numbers, lists, true/false), else the string."""
    import json

    try:
        return json.loads(text)
    except ValueError:
        return text


def method_params(method: str, *, r=None, inflect=None, prop_attn=None, mode=None, keep_rate=None, locations=None,
                  fuse=None, extra=(), keep_mass=None, capacity=None) -> dict:
    """Method parameters from the options the user actually gave (the method rejects any it does not take).

    ToMe without ``--r`` gets r=13, the main job's default.
    """
    params = {}
    if r is not None:
        r_value = parse_r(r)
        params["r"] = (r_value, float(inflect)) if inflect is not None else r_value
    elif inflect is not None:
        raise click.BadParameter("--inflect needs --r")
    elif method == "tome":
        params["r"] = 13
    if prop_attn is not None:
        params["prop_attn"] = prop_attn
    if mode is not None:
        params["mode"] = mode
    if keep_rate is not None:
        params["keep_rate"] = parse_floats(keep_rate, "a keep rate")
    if locations is not None:
        params["locations"] = [int(v) for v in parse_floats(locations, "block indices")] if "," in locations else [int(locations)]
    if fuse is not None:
        params["fuse"] = fuse
    if keep_mass is not None:
        params["keep_mass"] = parse_floats(keep_mass, "a keep mass")
    if capacity is not None:
        try:
            values = [int(v) for v in capacity.split(",") if v.strip()]
        except ValueError:
            raise click.BadParameter(f"--capacity {capacity!r}: give an int (100) or one int per location (100,80,60)") from None
        params["capacity"] = values[0] if len(values) == 1 and "," not in capacity else values
    for item in extra:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"--param {item!r}: write KEY=VALUE, e.g. --param clusters=64")
        params[key.strip().replace("-", "_")] = parse_value(value.strip())
    return params


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="vitfold")
def main() -> None:
    """vitfold: compile token-reduced Vision Transformers (ToMe, ...) to ONNX Runtime and OpenVINO,
    check them against torch on real photos, and profile them against the dense model."""
    signal.signal(signal.SIGTERM, _terminated)


def _terminated(signum, frame) -> None:
    """SIGTERM (``timeout``, ``kill``, a container stop) unwinds like Ctrl-C: staging directories and
    locks are removed on the way out, and the process exits 143 (128 + SIGTERM) with one line.

    Plain ``sys.stderr``, not rich: the signal can land in the middle of an import (rich imports its
    emoji table lazily, and printing then re-enters the half-imported module)."""
    sys.stderr.write("error: terminated (SIGTERM); unfinished builds were removed\n")
    raise SystemExit(128 + signal.SIGTERM)


@main.command()
@click.option("--model", default="deit_small_patch16_224", show_default=True, help="timm model name (a VisionTransformer), or hf:DIR (a transformers save_pretrained directory; [hf] extra).")
@click.option("--method", default="tome", show_default=True, help="Token reduction method: tome (merge), evit (prune + fuse), topk (prune), and the clustering methods; `deploy.py methods` lists them.")
@click.option("--r", "r", default=None, help="ToMe: tokens merged per block; an int or one int per block (8,8,4,...). [default for tome: 13]")
@click.option("--inflect", type=click.FloatRange(-1, 1), default=None, help="ToMe: schedule inflection (-1 decreasing, 0 constant, +1 increasing).")
@click.option("--prop-attn/--no-prop-attn", default=None, help="ToMe: proportional attention (log token size added to the logits). [default: on]")
@click.option("--mode", type=click.Choice(["merge", "prune"]), default=None, help="ToMe: average matched tokens (merge) or drop them (prune). [default: merge]")
@click.option("--keep-rate", "--keep", "keep_rate", default=None, help="EViT / Top-K: share of tokens kept at each location, one value or one per location (0.7 or 0.9,0.7,0.5). [default: 0.7]")
@click.option("--locations", default=None, help="EViT / Top-K: 0-indexed reduction blocks. [default: 3,6,9]")
@click.option("--fuse/--no-fuse", default=None, help="EViT / Top-K: fuse the pruned tokens into one, weighted by class attention. [default: evit on, topk off]")
@click.option("--param", "extra_params", multiple=True, metavar="KEY=VALUE", help="Any other method parameter (e.g. --param clusters=64); repeatable.")
@click.option("--keep-mass", default=None, help="EViT with a per-image gate (method evit-mass; --method evit switches to it): keep the fewest tokens holding this share of the class attention, in (0, 1], one value or one per location.")
@click.option("--capacity", default=None, help="evit-mass: kept-token capacity of the static graph per location (an int or one per location). [default: calibrated]")
@click.option("--calibrate", type=click.Path(file_okay=False, path_type=Path), default=None, help="Folder of images (like those the model will see) to calibrate on: int8 activation ranges, and evit-mass's capacity. [default: the check photos, with a warning]")
@click.option("--calibration-size", type=click.IntRange(min=1), default=128, show_default=True, help="int8: images drawn (seeded) from --calibrate.")
@click.option("--weights", type=click.Choice(["int8", "int4"]), default=None, help="Weight-only compression (OpenVINO, NNCF): weights stored in int8 / int4, activations at --precision.")
@click.option("--min-cosine", type=float, default=None, help="Fidelity gate: minimum per-image cosine against the f32 torch model (default: the backend's for the precision; int8: 0.95).")
@click.option("--min-top1", type=float, default=None, help="Fidelity gate: minimum top-1 agreement with the f32 torch model, classification (int8 default: 0.8).")
@click.option("--min-token-cosine", type=float, default=None, help="Fidelity gate: minimum mean per-token cosine, --task features (int8 default: 0.95).")
@click.option("--percentile", type=float, default=100.0, show_default=True, help="evit-mass calibration: nearest-rank percentile of the kept counts per location (100 = the largest seen).")
@click.option("--task", type=click.Choice(["classify", "features"]), default="classify", show_default=True, help="features: output the full patch grid [B, H/p*W/p, C], restored after the reduced blocks (dense prediction).")
@click.option("--backend", type=click.Choice(BACKEND_NAMES), default="openvino", show_default=True, help="Runtime to build for.")
@click.option("--precision", type=click.Choice(PRECISION_NAMES), default="f32", show_default=True, help="Inference precision (f32 matches torch; OpenVINO runs bf16 on bf16-capable CPUs only when asked; int8: post-training quantization calibrated on --calibrate, the token reduction kept float).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Static batch size of the exported graph.")
@click.option("--img-size", type=click.IntRange(min=1), default=None, help="Input size in pixels (default: the model's).")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None, help="timm state dict (.safetensors or .pth); the head size is read from it.")
@click.option("--pretrained", is_flag=True, help="Load timm's hub weights (needs network). Default: random weights, seed 0.")
@click.option("--images", type=click.Path(file_okay=False, path_type=Path), default=None, help="Folder of photos for the checks and fidelity (default: the shipped photos).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Build directory (default: builds/<name> under the current directory). Must be absent, empty, or a vitfold build of the same request; a folder of yours is never touched.")
@click.option("--force", is_flag=True, help="Replace the vitfold build at --out even when it was built from another request.")
@click.option("--export-only", is_flag=True, help="Stop before the backend build: ONNX, passes, lint, (quantization,) reference outputs and manifest, no GPU needed. Build on the device with `python -m vitfold.device build DIR`.")
@click.option("--tensorrt-version", default=None, help="--backend tensorrt --export-only: the device's TensorRT (e.g. 8.5, 10.3) whose passes and lint rules to apply (default: the installed one).")
@click.option("--fused-ops", is_flag=True, help="OpenVINO f32 / int8, --method tome, evit or topk: run each reduction site as one fused op (vitfold.ToMeMergeWavg, ToMe's matching and size-weighted merge; vitfold.EViTPrune; an OpenVINO extension compiled here once with cmake and a C++ compiler) instead of ~15-30 graph nodes; checked against the graph form. Fewer kernels per site: most worth it at batch 1. ONNX Runtime f32 / int8: the same kernels as a custom-op library (needs ONNX Runtime's C API header: ONNXRUNTIME_ROOT). TensorRT 10+ f32: vitfold's plugins (compiled with nvcc and the TensorRT headers; not yet run on a GPU).")
@click.option("--dense-from", "dense_from", type=click.Path(file_okay=False, path_type=Path), default=None, help="Use this dense twin (another build's dense/ directory, same model, weights, task and backend settings) instead of building one: saves its disk space (half of a build) and time.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Inference threads (default: one per core).")
@click.option("--opset", type=click.IntRange(min=16), default=18, show_default=True, help="ONNX opset (>= 18 for ToMe source tracing).")
@click.option("--min-runs", type=click.IntRange(min=3), default=50, show_default=True, help="Latency: timed runs per variant, at least.")
@click.option("--min-seconds", type=click.FloatRange(min=0), default=3.0, show_default=True, help="Latency: timed seconds per variant, at least.")
@click.option("--schedule", type=click.Choice(["given", "auto"]), default="given", show_default=True, help="auto: pick the schedule (tome: per-block r; evit/topk: keep rate per location) from the latency curve measured on this backend to meet --target-speedup or --latency-budget with the fewest tokens removed.")
@click.option("--target-speedup", type=float, default=None, help="--schedule auto: speedup over the dense model, measured on this backend.")
@click.option("--latency-budget", type=float, default=None, help="--schedule auto: latency budget in ms per batch.")
@click.option("--curve", "curve_path", type=click.Path(path_type=Path), default=None, help="--schedule auto: a block curve from `deploy.py curve` for this model and backend (default: measure one, a few minutes).")
@click.option("--max-merge-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None, help="--schedule auto: most of a block's tokens one block may merge or prune (default 0.2 for tome, whose matching allows up to 0.5: large single merges cost fidelity; 0.5 for evit/topk, i.e. keep rate >= 0.5).")
def build(model, method, r, inflect, prop_attn, mode, keep_rate, locations, fuse, extra_params, keep_mass, capacity,
          calibrate, calibration_size, weights, min_cosine, min_top1, min_token_cosine, percentile, task, backend, precision, batch, img_size, checkpoint, pretrained, images, out, force, export_only, tensorrt_version, fused_ops, dense_from,
          threads, opset, min_runs, min_seconds, schedule, target_speedup, latency_budget, curve_path, max_merge_fraction) -> None:
    """Build the dense twin and the reduced model, check both against torch, profile, report."""
    from .build import BuildRequest, build as run_build
    from .profiles.report import LatencyOptions
    from .runtimes import BuildConfig
    from .spec import ModelSpec

    if keep_mass is not None and method == "evit":
        method = "evit-mass"  # EViT's gate with a per-image keep count
    params = method_params(method, r=r, inflect=inflect, prop_attn=prop_attn, mode=mode, keep_rate=keep_rate,
                           locations=locations, fuse=fuse, extra=extra_params, keep_mass=keep_mass, capacity=capacity)
    spec = ModelSpec(model, checkpoint=str(checkpoint) if checkpoint else None, pretrained=pretrained,
                     img_size=img_size, batch_size=batch)
    if export_only and schedule == "auto":
        raise click.BadParameter("--schedule auto times the backend here; with --export-only give the schedule (--r / --keep-rate)")
    if tensorrt_version is not None and backend != "tensorrt":
        raise click.BadParameter("--tensorrt-version applies to --backend tensorrt")
    if fused_ops:
        if precision not in FUSED_TARGETS.get(backend, ()) or weights is not None:
            raise click.BadParameter("--fused-ops runs on OpenVINO and ONNX Runtime at f32 or int8 and on TensorRT 10+ at "
                                     "f32 (the kernels are float32); use --backend openvino / onnxruntime --precision f32 "
                                     "or int8, or --backend tensorrt --precision f32, or drop --fused-ops")
        if method not in ("tome", "evit", "topk") or params.get("mode", "merge") != "merge" or task != "classify":
            raise click.BadParameter("--fused-ops fuses the reduction sites of --method tome (merge mode), evit and topk "
                                     "with --task classify (features builds trace sources); drop --fused-ops")
    extra = {**({"tensorrt_version": tensorrt_version} if tensorrt_version else {}), **({"fused_ops": True} if fused_ops else {})}
    cfg = _run(BuildConfig, backend=backend, precision=precision, weights=weights, threads=threads, extra=extra)
    if fused_ops and not export_only and backend in ("openvino", "onnxruntime"):
        from . import native

        # The fused ops' library first (compiled once, cached): a missing compiler or header stops here, before the export.
        _run(native.openvino_ops if backend == "openvino" else native.onnxruntime_ops,
             log=lambda msg: console.print(f"[dim]{escape(msg)}[/]"))
    overrides = {k: v for k, v in (("min_cosine", min_cosine), ("min_top1", min_top1),
                                   ("min_token_cosine", min_token_cosine)) if v is not None}
    auto = None
    if schedule == "auto":
        from .plan.auto_schedule import auto_schedule

        if r is not None:
            raise click.BadParameter("--schedule auto picks r itself; drop --r")
        if keep_rate is not None:
            raise click.BadParameter("--schedule auto picks the keep rate per location itself; drop --keep-rate")
        params, auto = _run(auto_schedule, spec, cfg, method=method, params=params, target_speedup=target_speedup,
                            latency_budget_ms=latency_budget, curve=curve_path, max_merge_fraction=max_merge_fraction,
                            log=lambda msg: console.print(f"[dim]{escape(msg)}[/]"))
    elif target_speedup is not None or latency_budget is not None or curve_path is not None:
        raise click.BadParameter("--target-speedup, --latency-budget and --curve need --schedule auto")
    request = _run(
        BuildRequest,
        spec=spec,
        method=method,
        params=params,
        build=cfg,
        out=out,
        images=images,
        opset=opset,
        latency=LatencyOptions(min_runs=min_runs, min_seconds=min_seconds),
        task=task,
        calibrate=calibrate,
        calibration_size=calibration_size,
        tolerance=overrides or None,
        percentile=percentile,
        force=force,
        export_only=export_only,
        dense_dir=dense_from,
        auto_schedule=auto,
    )
    directory, report = _run(run_build, request, log=lambda msg: console.print(f"[dim]{escape(msg)}[/]"))
    if report is None:  # --export-only
        console.print(f"exported: {directory} ({_disk_use(directory)}); copy it to the device and run "
                      f"`python -m vitfold.device build {directory.name}`", soft_wrap=True)
        return
    print_report(report)
    if auto is not None:
        from .profiles.schedule_report import describe

        a = report["auto_schedule"]
        console.print(f"auto schedule {describe(a)}: predicted {a['predicted_ms']:.2f} ms ({a['predicted_speedup']:.2f}x), "
                      f"measured {a['measured_ms']:.2f} ms ({a['measured_speedup']:.2f}x): target "
                      + ("met" if a["met_target"] else "[yellow]missed[/]"))
    console.print(f"build: {directory} ({_disk_use(directory)})", soft_wrap=True)


def _disk_use(directory: Path) -> str:
    """``507 MB on disk: reduced 250 MB, dense twin 257 MB``: what a build costs, so users can plan."""
    size = lambda root: sum(p.stat().st_size for p in root.rglob("*") if p.is_file())  # noqa: E731
    total, dense = size(directory), size(directory / "dense") if (directory / "dense").is_dir() else 0
    mb = lambda n: f"{n / 1e6:.0f} MB"  # noqa: E731
    return f"{mb(total)} on disk: reduced {mb(total - dense)}, dense twin {mb(dense)}" if dense else f"{mb(total)} on disk"


@main.command()
@click.option("--model", default="deit_small_patch16_224", show_default=True, help="timm model name (a VisionTransformer), or hf:DIR (a transformers save_pretrained directory; [hf] extra).")
@click.option("--methods", "methods_spec", required=True,
              help='Points to build: "tome:r=4,8,13,16 evit:keep=0.5,0.7,0.9 topk:keep=0.7"; after a method, '
                   "':'-separated key=v1,v2 settings, every combination is a point (keep = keep_rate).")
@click.option("--backend", type=click.Choice(HOST_BACKEND_NAMES), default="openvino", show_default=True, help="Runtime to build for.")
@click.option("--precision", type=click.Choice(PRECISION_NAMES), default="f32", show_default=True, help="Inference precision.")
@click.option("--precisions", default=None, help="Several precisions, one sweep each (e.g. f32,bf16,int8); overrides --precision. Non-f32 points also report the whole gain over dense f32.")
@click.option("--calibrate", type=click.Path(file_okay=False, path_type=Path), default=None, help="int8: folder of images for the activation ranges (default: the check photos, with a warning).")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Static batch size.")
@click.option("--img-size", type=click.IntRange(min=1), default=None, help="Input size in pixels (default: the model's).")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None, help="timm state dict (.safetensors or .pth).")
@click.option("--task", type=click.Choice(["classify", "features"]), default="classify", show_default=True, help="Output logits or the restored patch grid.")
@click.option("--images", type=click.Path(file_okay=False, path_type=Path), default=None, help="Folder of photos (default: the shipped photos).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Sweep directory (default: sweeps/<model>-<backend>-<precision>-b<batch>).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Inference threads (default: one per core).")
@click.option("--reprofile", is_flag=True, help="Re-measure points already built (default: reuse their reports).")
@click.option("--eval", "eval_data", type=click.Path(file_okay=False, path_type=Path), default=None, help="Labeled folder (ImageFolder): an accuracy column in the table and plot (`deploy.py eval` on every point).")
@click.option("--eval-labels", type=click.Path(dir_okay=False, path_type=Path), default=None, help="--eval: folder name of class i on line i.")
@click.option("--min-runs", type=click.IntRange(min=3), default=50, show_default=True, help="Latency: timed runs per variant, at least.")
@click.option("--min-seconds", type=click.FloatRange(min=0), default=3.0, show_default=True, help="Latency: timed seconds per variant, at least.")
def sweep(model, methods_spec, backend, precision, precisions, calibrate, batch, img_size, checkpoint, task, images, out,
          threads, reprofile, eval_data, eval_labels, min_runs, min_seconds) -> None:
    """Build every point once (cached by spec hash), profile each against one dense baseline, and
    write sweep.json, sweep.md and sweep.png (speedup vs fidelity, one curve per method)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .build import BuildRequest
    from .profiles.report import LatencyOptions
    from .runtimes import BuildConfig
    from .spec import ModelSpec
    from .sweep import accuracy_cell, parse_points, run_sweep

    points = _run(parse_points, methods_spec)
    chosen = [p.strip() for p in precisions.split(",") if p.strip()] if precisions else [precision]
    unknown = [p for p in chosen if p not in PRECISION_NAMES]
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)}: choose from {', '.join(PRECISION_NAMES)}", param_hint="--precisions")
    bases = [_run(
        BuildRequest,
        spec=ModelSpec(model, checkpoint=str(checkpoint) if checkpoint else None, img_size=img_size, batch_size=batch),
        build=_run(BuildConfig, backend=backend, precision=p, threads=threads),
        images=images,
        calibrate=calibrate if p == "int8" else None,
        latency=LatencyOptions(min_runs=min_runs, min_seconds=min_seconds),
        task=task,
    ) for p in chosen]  # every precision is checked before anything is built
    table = Table(title=f"sweep {model} ({backend} {', '.join(chosen)}, batch {batch})")
    for column in ("precision", "method", "params", "GMACs", "FLOP ratio", "speedup", "vs dense f32", "fidelity", "top-1 vs dense"):
        table.add_column(column, justify="right")
    if eval_data is not None:
        table.add_column("accuracy (drop)", justify="right")
    for base in bases:
        p = base.build.precision
        where = (out / p if len(bases) > 1 else out) if out else Path("sweeps") / f"{base.spec.slug}-{backend}-{p}-b{batch}"
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console, transient=False) as progress:
            task_id = progress.add_task(f"sweep {p}", total=len(points) + 1)
            summary = _run(run_sweep, base, points, where, reprofile=reprofile, eval_data=eval_data, eval_labels=eval_labels,
                           log=lambda msg: progress.console.print(f"[dim]{escape(msg)}[/]"),
                           advance=lambda label: progress.update(task_id, advance=1, description=f"sweep {p}: {label} done"))
        for r in sorted(summary["points"], key=lambda r: (r["method"], -r["gmacs"])):
            top1 = "n/a" if r["top1_agreement"] is None else f"{r['top1_agreement']:.0%}"
            whole = "" if r.get("speedup_vs_dense_f32") is None else f"{r['speedup_vs_dense_f32']:.2f}x"
            accuracy = [] if eval_data is None else [accuracy_cell(r)]
            table.add_row(p, r["method"], r["label"], f"{r['gmacs']:.3f}", f"{r['flop_ratio']:.2f}x", f"{r['speedup']:.2f}x",
                          whole, f"{r['fidelity']:.4f}", top1, *accuracy)
        console.print(f"sweep {p}: {Path(where).resolve()} (sweep.md, sweep.json, sweep.png)")
    console.print(table)



@main.command()
def methods() -> None:
    """List the token-reduction methods and their parameters."""
    import inspect as pyinspect

    from .reduce import METHODS

    for name, cls in sorted(METHODS.items()):
        doc = (cls.__doc__ or "").strip().splitlines()
        console.print(f"[bold]{name}[/]: {doc[0] if doc else ''}")
        for param in pyinspect.signature(cls).parameters.values():
            default = "" if param.default is param.empty else f" = {param.default!r}"
            console.print(f"    {param.name}{default}")


@main.command()
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--images", type=click.Path(file_okay=False, path_type=Path), default=None, help="Folder of photos (default: the shipped photos).")
@click.option("--min-runs", type=click.IntRange(min=3), default=50, show_default=True, help="Timed runs per variant, at least.")
@click.option("--min-seconds", type=click.FloatRange(min=0), default=3.0, show_default=True, help="Timed seconds per variant, at least.")
@click.option("--per-layer", is_flag=True, help="Add a pass with the backend's per-layer counters: time per block by category (attention, MLP, reduction overhead), per_layer.png.")
@click.option("--layer-runs", type=click.IntRange(min=1), default=20, show_default=True, help="--per-layer: counted runs per variant (means are reported).")
def profile(build_dir, images, min_runs, min_seconds, per_layer, layer_runs) -> None:
    """Re-measure an existing build against its dense twin (no rebuild); rewrites report.json/md."""
    from .profiles.per_layer import LayerProfileOptions
    from .profiles.report import LatencyOptions, profile_build

    report = _run(profile_build, build_dir, images=images, options=LatencyOptions(min_runs=min_runs, min_seconds=min_seconds),
                  per_layer=LayerProfileOptions(runs=layer_runs) if per_layer else None)
    print_report(report)
    if per_layer:
        print_per_layer(report["per_layer"], Path(build_dir))


@main.command(name="eval")
@click.argument("build_dir", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Labeled images, ImageFolder layout: DIR/<class>/<image>.")
@click.option("--labels", "labels_file", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Folder name of class i on line i (first word; e.g. ImageNet's LOC_synset_mapping.txt). Default: folder names matched to the build's class names, ImageNet synsets / names, or class indices.")
@click.option("--worst", type=click.IntRange(min=1), default=12, show_default=True, help="Disagreements shown in eval_worst.png.")
def evaluate(build_dir, data, labels_file, worst) -> None:
    """Accuracy of a build and its dense twin on a labeled folder (through the backend, no torch)."""
    from rich.progress import Progress

    from .evaluate import evaluate as run_eval

    with Progress(console=err, transient=True) as bar:
        task = bar.add_task("eval: dense twin, then the build", total=None)
        result = _run(run_eval, build_dir, data, labels_file, worst=worst, progress=lambda n: bar.advance(task, n))
    print_eval(result, Path(build_dir))


def print_eval(result: dict, directory: Path) -> None:
    """The eval table: accuracy of both variants, the drop with its interval, agreement, files."""
    table = Table(title=f"{result['images']} images, {result['classes']} classes: {result['metric']}")
    for column in ("variant", "top-1", "top-5"):
        table.add_column(column, justify="right")
    for variant in ("dense", "reduced"):
        top5 = result[variant]["top5"]
        table.add_row(variant, f"{result[variant]['top1']:.2%}", "n/a" if top5 is None else f"{top5:.2%}")
    console.print(table)
    low, high = result["drop"]["interval"]
    console.print(f"top-1 drop {result['drop']['top1']:+.2%} (95% interval {low:+.2%} .. {high:+.2%}, paired bootstrap); "
                  f"top-1 agreement {result['agreement']:.2%}; {result['disagreements']} disagreements")
    files = ", ".join(str(directory / f) for f in result["files"].values())
    console.print(f"written: {directory / 'eval.json'}, {escape(files)}")


@main.command()
@click.option("--model", default="deit_small_patch16_224", show_default=True, help="timm model name (a VisionTransformer), or hf:DIR (a transformers save_pretrained directory; [hf] extra).")
@click.option("--backend", type=click.Choice(BACKEND_NAMES), default="openvino", show_default=True, help="Runtime to measure on.")
@click.option("--block/--whole", "block_mode", default=True, show_default=True, help="One transformer block with a static [B, N, C] input, or the whole model with every block at N tokens.")
@click.option("--tokens", default=None, help="Token counts N: START:STOP:STEP (STOP inclusive) or a list. [default: every 4 from 16 to the full count]")
@click.option("--block-index", type=click.IntRange(min=0), default=0, show_default=True, help="--block: which block to export.")
@click.option("--precision", type=click.Choice(PRECISION_NAMES), default="f32", show_default=True, help="Inference precision.")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Static batch size.")
@click.option("--img-size", type=click.IntRange(min=1), default=None, help="Input size in pixels (sets the full token count; default: the model's).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Inference threads (default: one per core).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Output folder (default: curves/<model>-<block|whole>-<backend>-<precision>-b<batch>).")
@click.option("--min-runs", type=click.IntRange(min=3), default=30, show_default=True, help="Timed runs per token count, at least.")
@click.option("--min-seconds", type=click.FloatRange(min=0), default=0.5, show_default=True, help="Timed seconds per token count, at least.")
@click.option("--stat", type=click.Choice(["median", "p10", "min"]), default="median", show_default=True, help="Statistic steps, plateaus and auto schedules read the curve with; p10 / min resist other processes on a shared machine.")
def curve(model, backend, block_mode, tokens, block_index, precision, batch, img_size, threads, out, min_runs, min_seconds,
          stat) -> None:
    """Measure latency against token count N (one block, or the whole model at a uniform N) and
    write curve.json + curve.png with the steps and plateaus found."""
    from .plan.curve import CurveOptions, measure_curve, write_curve
    from .runtimes import BuildConfig
    from .spec import ModelSpec

    mode = "block" if block_mode else "whole"
    cfg = _run(BuildConfig, backend=backend, precision=precision, threads=threads)
    spec = ModelSpec(model, img_size=img_size, batch_size=batch)
    result = _run(measure_curve, spec, cfg, mode=mode, tokens=tokens, block_index=block_index, stat=stat,
                  options=CurveOptions(min_runs=min_runs, min_seconds=min_seconds),
                  log=lambda msg: console.print(f"[dim]{escape(msg)}[/]"))
    paths = write_curve(result, out or Path("curves") / f"{model}-{mode}-{backend}-{precision}-b{batch}")
    print_curve(result)
    console.print(f"curve: {paths['json']}  chart: {paths['png']}")


@main.command()
@click.argument("model_path", type=click.Path(path_type=Path))
@click.option("--backend", type=click.Choice(BACKEND_NAMES), default=None, help="Lint for this backend and list every finding (default: a count per target).")
@click.option("--trt-version", default=None, help="--backend tensorrt: 8.5 (JetPack 5), 10 (JetPack 6: 10.3) or 11. [default: 10]")
@click.option("--passes/--no-passes", default=True, show_default=True, help="Apply each registered pass alone (unverified) and show what it changes.")
@click.option("--json", "as_json", is_flag=True, help="Print the machine-readable dict instead of tables.")
def inspect(model_path, backend, trt_version, passes, as_json) -> None:
    """Show an ONNX file's ops, dynamic dimensions, tokens per block (vitfold metadata), backend lint
    findings (node and rule) and which passes would apply. Exit code 1 when the chosen backend has
    error findings. The file is only read."""
    import json

    from .inspection import inspect_onnx, onnx_of, render
    from .passes.lint import target_for

    if trt_version is not None and backend != "tensorrt":
        raise click.BadParameter("--trt-version needs --backend tensorrt")
    target = _run(target_for, backend, trt_version) if backend else None
    if model_path.is_dir():
        model_path = _run(onnx_of, model_path)
        if not as_json:
            console.print(f"[dim]build directory: inspecting {escape(str(model_path))} (the traced model)[/]")
    info = _run(inspect_onnx, model_path, target, passes=passes)
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        render(info, console, str(model_path))
    if target is not None and any(f["severity"] == "error" for f in info["lint"]):
        sys.exit(1)


def print_curve(curve: dict) -> None:
    """Console summary of a latency curve: range, slope, steps, plateaus, noise."""
    points, stat = curve["points"], curve.get("stat", "median_ms")
    first, last = points[0], points[-1]
    console.print(f"{curve['model']} {curve['mode']} on {curve['backend']['backend']} {curve['backend']['precision']} ({stat[:-3]}): "
                  f"N={first['tokens']}: {first[stat]:.3f} ms ... N={last['tokens']}: {last[stat]:.3f} ms, "
                  f"{len(points)} counts, mean slope {curve['slope_ms_per_token'] * 1e3:.2f} us/token")
    table = Table(title="steps (latency jumps beyond the mean slope)")
    for column in ("from N", "to N", "jump ms", "jump %"):
        table.add_column(column, justify="right")
    for step in curve["steps"]:
        table.add_row(str(step["from"]), str(step["to"]), f"{step['jump_ms']:.3f}", f"{step['jump_pct']:.1%}")
    console.print(table if curve["steps"] else "no steps found")
    fixed = curve.get("fixed")
    if fixed:
        console.print(f"fixed cost {fixed['fixed_ms']:.3f} ms = {fixed['fixed_share']:.1%} of N={last['tokens']} "
                      "(fit a + bN + cN^2 at N=0): no token reduction removes it")
    for plateau in curve["plateaus"]:
        console.print(f"plateau N={plateau['from']}..{plateau['to']}: {plateau['ms_from']:.3f} -> {plateau['ms_to']:.3f} ms")
    if curve["noisy"]:
        from .profiles.latency import NOISY_COV

        console.print(f"[yellow]warning: CoV above {NOISY_COV:.0%} at N = {', '.join(map(str, curve['noisy']))}; "
                      "the machine was busy, re-run[/]")


def print_per_layer(per_layer: dict, directory: Path) -> None:
    """The console table for a per-layer profile: ms per category, coverage, reduction overhead."""
    from .profiles.latency import NOISY_COV
    from .profiles.per_layer import CATEGORIES

    table = Table(title="time per category (backend counters, mean ms per run)")
    for column in ("variant", "attn", "mlp", "reduce", "other", "run", "covered", "overhead"):
        table.add_column(column, justify="right")
    for v in ("dense", "reduced"):
        if v in per_layer:
            s = per_layer[v]
            table.add_row(v, *(f"{s['categories'][c]:.2f}" for c in CATEGORIES), f"{s['run_ms']:.2f}", f"{s['coverage']:.1%}",
                          f"{s['reduction_pct']:.1%}")
    console.print(table)
    if "reduced" in per_layer:
        s = per_layer["reduced"]
        console.print(f"reduction overhead {s['reduction_ms']:.2f} ms = {s['reduction_pct']:.1%} of the reduced run; "
                      f"counters placed in a block cover {s['coverage']:.1%} of it")
    noisy = [v for v in ("dense", "reduced") if v in per_layer and per_layer[v]["run_cov"] > NOISY_COV]
    if noisy:
        console.print(f"[yellow]warning: counter-pass CoV above {NOISY_COV:.0%} for {', '.join(noisy)}; the machine was busy, re-run[/]")
    console.print(f"per block: {directory / 'report.md'}, chart: {directory / per_layer['png']}")


def print_report(report: dict) -> None:
    """The console table for a build report."""
    from .profiles.report import _pct, fidelity_summary, noise_summary

    table = Table(title=f"{report['name']}  ({report['backend']['backend']} {report['backend']['precision']}, batch {report['batch_size']})")
    for column in ("variant", "median ms", "p90 ms", "CoV", "p90/p50", "GMACs", "max abs vs torch", "top-1 vs torch"):
        table.add_column(column, justify="right")
    for v in ("dense", "reduced"):
        lat, par = report["latency"][v], report["parity_vs_torch"][v]
        table.add_row(v, f"{lat['median_ms']:.2f}", f"{lat['p90_ms']:.2f}", f"{lat['cov']:.1%}", f"{lat['p90_ms'] / lat['median_ms']:.2f}",
                      f"{report['gmacs'][v]:.3f}", f"{par['max_abs']:.2e}", _pct(par["top1_agreement"]))
    console.print(table)
    console.print(f"speedup {report['speedup']:.2f}x  |  FLOP ratio {report['flop_ratio']:.2f}x")
    console.print(f"vs dense: {fidelity_summary(report['fidelity_vs_dense'])}")
    if "speedup_vs_dense_f32" in report:
        console.print(f"whole gain over dense f32 ({report['latency']['dense_f32']['median_ms']:.2f} ms): "
                      f"{report['speedup_vs_dense_f32']:.2f}x; vs dense f32: {fidelity_summary(report['fidelity_vs_dense_f32'])}")
    choices = report.get("quantization", {}).get("choices")
    if choices and choices.get("sites"):
        console.print(f"token choices identical to the f32 graph: {choices['identical']:.1%} of sites x check batches "
                      f"(first site {choices['first_site']:.1%})")
    if report["noisy"]:
        console.print(f"[yellow]warning: {escape(noise_summary(report))}; re-run `profile`[/]")
    if report["weights"].startswith("random"):
        console.print("[yellow]weights are random: parity is meaningful, fidelity vs dense is not (use --checkpoint)[/]")
    if "gate" in report:
        gate, check = report["gate"], report["gate"]["check"]
        console.print(f"gate capacity {gate['capacity']} at blocks {gate['locations']}; check photos over it: "
                      f"{check['exceeded']} of {check['images']}" + (" (the bounded model differs from the dynamic one there)"
                                                                     if check["exceeded"] else ""))


if __name__ == "__main__":
    main()
