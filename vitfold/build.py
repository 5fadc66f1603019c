"""One build: a timm ViT + a method -> a checked, profiled build directory with its dense twin.

Stages run in data-flow order for both variants (dense twin in ``dense/``, reduced at the top):
reduce -> export (+ ORT vs torch) -> passes (verified) -> backend build (+ backend vs torch) ->
profile (interleaved latency, FLOPs, fidelity). Everything is written to a temporary directory
beside the target and renamed into place at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from . import runtimes
from .artifact import atomic_directory, read_manifest, write_manifest
from .outdir import claim
from .export.models import create_model
from .export.onnx import DEFAULT_OPSET, INPUT_NAME, export_and_validate, output_name
from .images import batches, list_images, load_images
from .metrics import Tolerance, compare
from .profiles.flops import ModelDims
from .profiles.report import LatencyOptions, profile_build
from .profiles.schedule_report import AUTO_JSON
from .compile import compile_onnx, fuses_after_quantization
from .capacity import DEFAULT_PERCENTILE, calibrate_capacity, check_capacity, check_percentile
from .errors import ArtifactError, SpecError
from .quantize.calibration import DEFAULT_SUBSET, load_calibration
from .reduce import Schedule, TokenLayout, create_method
from .reduce.features import TASKS, DenseFeatures, for_features
from .runtimes import BuildConfig, get_backend
from .spec import ModelSpec

REFERENCE = "reference.npy"


@dataclass(frozen=True)
class BuildRequest:
    """Everything ``deploy.py build`` asks for."""

    spec: ModelSpec
    method: str = "tome"
    params: dict = field(default_factory=dict)
    build: BuildConfig = field(default_factory=BuildConfig)
    out: Optional[Path] = None
    images: Optional[Path] = None
    opset: int = DEFAULT_OPSET
    latency: LatencyOptions = field(default_factory=LatencyOptions)
    task: str = "classify"
    dense_dir: Optional[Path] = None
    dense_f32_dir: Optional[Path] = None  # a shared dense f32 build for a non-f32 build's whole gain (sweeps)
    profile: bool = True
    calibrate: Optional[Path] = None  # images for a gate's capacity and int8 ranges (default: the check photos)
    calibration_size: int = DEFAULT_SUBSET  # int8: images drawn from ``calibrate`` (seeded)
    tolerance: Optional[dict] = None  # overrides of the backend's tolerance (Tolerance field -> value)
    percentile: float = DEFAULT_PERCENTILE  # gated methods: nearest-rank percentile of the kept counts
    force: bool = False  # replace an existing build of another request at ``out``
    export_only: bool = False  # stop before the backend build: the device builds (python -m vitfold.device build)
    auto_schedule: Optional[dict] = None  # the planner's record (vitfold.plan.auto_schedule), written before profiling

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise SpecError(f"task {self.task!r} unknown; choose one of {', '.join(TASKS)}")
        check_percentile(self.percentile)
        self.check_tolerance()  # unknown backend / precision / weight mode, bad overrides: SpecError

    def check_tolerance(self) -> Tolerance:
        """The tolerance this build is checked with: the backend's for the precision (or weight mode),
        with the user's overrides (``--min-cosine``, ``--min-top1``, ``--min-token-cosine``).

        Raises:
            SpecError: a precision or weight mode the backend does not build; an override outside [-1, 1].
        """
        tolerance = get_backend(self.build.backend).tolerance_for(self.build)
        overrides = dict(self.tolerance or {})
        for key, value in overrides.items():
            if key not in ("min_cosine", "min_top1", "min_token_cosine") or not -1.0 <= float(value) <= 1.0:
                raise SpecError(f"--{key.replace('_', '-')} {value}: give a value in [-1, 1]")
        return replace(tolerance, **overrides)

    def identity(self) -> dict:
        """Everything that defines the artifact (not where it goes or how it is timed): model spec,
        method and parameters, backend settings, opset, task, check images, gate calibration."""
        folder = lambda p: str(Path(p).resolve()) if p is not None else None  # noqa: E731
        return {
            "spec": {**self.spec.to_json(), "checkpoint": folder(self.spec.checkpoint)},
            "method": self.method,
            "params": self.params,
            "build": self.build.to_json(),
            "opset": self.opset,
            "task": self.task,
            "images": folder(self.images),
            "calibrate": folder(self.calibrate),
            "percentile": self.percentile,
            **({"calibration_size": self.calibration_size} if self.build.precision == "int8" else {}),
            **({"tolerance": self.tolerance} if self.tolerance else {}),
            **({"export_only": True} if self.export_only else {}),
        }

    def key(self) -> str:
        """sha256 (12 hex digits) of :meth:`identity`: equal keys, same artifact. Recorded in the
        manifest as ``request_key``; a build into a directory holding the same key is a rebuild."""
        return _digest(self.identity(), 12)

    def name(self) -> str:
        """Default build name. The recipe: ``<model>-<method>-<params>[-features][-fused]-<backend>-<precision>-b<batch>``
        (params sorted by name, ``-`` in a value written ``m``: ``r16_m1.0`` for ``--r 16 --inflect -1``),
        then ``-<8 hex digits>`` when any setting not spelled out differs from its default (image size,
        checkpoint, pretrained weights, opset, image folder, threads, gate calibration folder and
        percentile): the hash of those settings. E.g. ``deit_small_patch16_224-tome-r13-openvino-f32-b1``.
        Two different requests never share a name."""
        params = "-".join(_fmt(k, v) for k, v in sorted(self.params.items()))
        task = "features" if self.task == "features" else ""
        fused = "fused" if self.build.extra.get("fused_ops") else ""
        parts = [self.spec.slug, self.method, params, task, fused, self.build.backend, self.build.label,
                 f"b{self.spec.batch_size}"]
        identity = self.identity()
        unnamed = {"img_size": self.spec.img_size, "checkpoint": identity["spec"]["checkpoint"], "pretrained": self.spec.pretrained,
                   "opset": self.opset, "images": identity["images"], "threads": self.build.threads,
                   "calibrate": identity["calibrate"], "percentile": self.percentile,
                   "calibration_size": identity.get("calibration_size", DEFAULT_SUBSET), "tolerance": self.tolerance}
        defaults = {"img_size": None, "checkpoint": None, "pretrained": False, "opset": DEFAULT_OPSET, "images": None,
                    "threads": None, "calibrate": None, "percentile": DEFAULT_PERCENTILE, "calibration_size": DEFAULT_SUBSET,
                    "tolerance": None}
        given = {k: v for k, v in unnamed.items() if v != defaults[k]}
        if given:
            parts.append(_digest(given, 8))
        return "-".join(p for p in parts if p)


def _digest(value, digits: int) -> str:
    """The first ``digits`` hex digits of the sha256 of ``value`` as canonical JSON."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:digits]


#: Short names of method parameters in build names (``keep_rate=0.7`` -> ``keep0.7``).
_ABBREV = {"keep_rate": "keep", "locations": "at", "prop_attn": "propattn", "mode": "", "keep_mass": "mass", "capacity": "cap"}


def _fmt(key: str, value) -> str:
    key = _ABBREV.get(key, key)
    if isinstance(value, bool):
        return key if value else f"no{key}"
    text = json.dumps(value) if not isinstance(value, (int, float, str)) else str(value)
    text = re.sub(r"-(?=[0-9.])", "m", text)  # keep the sign: -1 -> m1
    return key + re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")


def model_dims(model) -> ModelDims:
    """The widths :mod:`vitfold.profiles.flops` needs, read off a timm VisionTransformer or Eva.

    ``mlp_hidden`` is the MAC-equivalent width of a plain two-layer MLP: the MLP's linear weights
    over ``2 * embed_dim`` (a SwiGLU MLP's three matrices of hidden width h count as 1.5 h).
    """
    from torch import nn

    block = model.blocks[0]
    patch = model.patch_embed.proj
    mlp_weights = sum(m.weight.numel() for m in block.mlp.modules() if isinstance(m, nn.Linear))
    return ModelDims(
        embed_dim=model.embed_dim,
        attn_dim=block.attn.head_dim * block.attn.num_heads,
        head_dim=block.attn.head_dim,
        mlp_hidden=mlp_weights // (2 * model.embed_dim),
        num_patches=model.patch_embed.num_patches,
        patch_macs_per_token=patch.out_channels * patch.in_channels * int(np.prod(patch.kernel_size)),
        num_classes=model.num_classes,
    )


def tool_versions() -> dict:
    import onnx
    import timm
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__, "onnx": onnx.__version__}


def build_variant(
    model,
    schedule: Schedule,
    directory: Path,
    *,
    request: BuildRequest,
    method: dict,
    check: list[np.ndarray],
    image_names: list[str],
    common: dict,
    log: Callable[[str], None],
    calibration=None,
    cfg: Optional[BuildConfig] = None,
) -> dict:
    """Export, verify, optimise, (quantize) and build one variant into ``directory``; returns its
    manifest. ``cfg``: the backend settings when not the request's (the f32 dense twin of an int8 build)."""
    cfg = cfg or request.build
    what = "dense" if schedule.is_dense else f"{request.method}"
    metadata = {"method": method, "schedule": schedule.to_json(), "model": request.spec.name}
    log(f"[{what}] export to ONNX (opset {request.opset}) and check against torch on {len(image_names)} photos")
    exported, reference = export_and_validate(
        model, directory / "model.onnx", check, opset=request.opset, metadata=metadata, what=what
    )
    np.save(directory / REFERENCE, reference)
    # A fused INT8 build that quantized its fused graph reads its token choices off its graph form: keep the one
    # its check builds (a Q/DQ graph fused after quantization is that graph form itself).
    keep_graph_form = (directory / GRAPH_FORM if cfg.extra.get("fused_ops") and cfg.quantized
                       and not fuses_after_quantization(cfg) and not schedule.is_dense else None)
    compiled = compile_onnx(directory / "model.onnx", directory, cfg, check[0], calibration=calibration,
                            build_backend=not request.export_only, graph_form_dir=keep_graph_form,
                            log=lambda msg: log(f"[{what}] {msg}"))
    manifest = {
        **common,
        "method": method,
        "schedule": schedule.to_json(),
        "opset": request.opset,
        "input": {"name": INPUT_NAME, "shape": list(check[0].shape), "dtype": "float32"},
        "outputs": [output_name(model)],
        "build": cfg.to_json(),
        "files": {**compiled.files, "reference": REFERENCE},
        "versions": {**common["versions"], **compiled.versions},
        "passes": [r.to_json() for r in compiled.passes],
        "lint": {"target": compiled.lint_target, "warnings": [f.to_json() for f in compiled.lint_warnings]},
        "checks": {"images": image_names, "onnxruntime_vs_torch": exported.parity.to_json()},
    }
    if compiled.quantization is not None:
        manifest["quantization"] = compiled.quantization
    key = f"{cfg.backend}:{cfg.label}"
    tolerance = request.check_tolerance() if cfg == request.build else get_backend(cfg.backend).tolerance_for(cfg)
    manifest["checks"]["tolerance"] = {"key": key, **tolerance.to_json()}
    if request.export_only:  # the device builds, checks against reference.npy with this tolerance, profiles
        manifest["stage"] = "exported"
        write_manifest(directory, manifest)
        return manifest
    write_manifest(directory, manifest)
    with runtimes.load(directory, verify=False) as session:  # hashed just above by write_manifest
        outputs = np.concatenate([next(iter(session(batch).values())) for batch in check])
    parity = compare(reference, outputs, classes=output_name(model) == "logits")
    manifest["checks"]["backend_vs_torch"] = parity.to_json()
    if compiled.quantization is not None and not schedule.is_dense:
        manifest["quantization"]["choices"] = token_choices(directory, manifest, check, log=lambda m: log(f"[{what}] {m}"),
                                                            calibration=calibration, graph_form=compiled.graph_form)
    if keep_graph_form is not None:
        shutil.rmtree(keep_graph_form, ignore_errors=True)  # inside the staged build: not part of it
    what_failed = f"{what}: {key} vs torch"
    if cfg.quantized:
        what_failed = (f"{what}: {key} vs its f32 torch model (the quantization fidelity gate; override with --min-cosine / "
                       "--min-top1 / --min-token-cosine, or calibrate on your own images with --calibrate DIR)")
        if request.spec.weights.startswith("random"):
            log(f"[{what}] note: random weights: the quantization fidelity gate is not meaningful (use --pretrained or --checkpoint)")
    parity.check(tolerance, what_failed)
    write_manifest(directory, manifest)
    return manifest


#: Where a fused INT8 build keeps its graph form between its check and its token-choice record (removed after).
GRAPH_FORM = "graph-form.tmp"


def token_choices(directory: Path, manifest: dict, check: list[np.ndarray], log: Callable[[str], None],
                  calibration=None, graph_form=None) -> dict:
    """Token-choice agreement of a quantized build with its f32 graph on the check photos
    (:mod:`vitfold.quantize.choices`): the f32 graph (``model.opt.onnx``) on ONNX Runtime against the
    quantized model on its backend. TensorRT's engine cannot add outputs after the build: there the
    Q/DQ graph runs on ONNX Runtime instead (said in the record). A ``--fused-ops`` build makes its
    choices inside its ``vitfold`` ops, where no output can read them: the graph form is quantized
    again with the same ``calibration`` and read instead (``graph_form``: the :class:`~vitfold.compile.Compiled`
    graph form the build's check kept, else built here); the build has already checked that the fused
    build gives its outputs (``fuse-sites``, said in the record)."""
    import onnx

    from .quantize import choices
    from .runtimes.openvino import compile_config

    cfg = BuildConfig.from_json(manifest["build"])
    files = manifest["files"]
    reference_model = onnx.load(str(directory / files["optimized"]))
    found = choices.exits(reference_model)
    if not found.sites:
        return {"sites": 0, "note": "no token choice reached the main path"}
    reference = choices.run_onnxruntime(reference_model, found, check, cfg.resolved_threads)
    if cfg.backend == "openvino" and "fused" in files:
        import tempfile

        from .compile import compile_onnx

        plain = BuildConfig.from_json({**manifest["build"], "extra": {k: v for k, v in cfg.extra.items() if k != "fused_ops"}})
        with tempfile.TemporaryDirectory(prefix="vitfold-graph-form-") as tmp:
            if graph_form is None:
                graph_form = compile_onnx(directory / files["optimized"], Path(tmp), plain, check[0], passes=[],
                                          calibration=calibration)
            backend = Path(graph_form.directory) / graph_form.files["backend"]
            candidate = choices.run_openvino(backend, found, check, compile_config(cfg))
        runner = "openvino (the graph form quantized alike: the fused build's choices are inside its vitfold ops)"
    elif cfg.backend == "openvino":
        candidate, runner = choices.run_openvino(directory / files["backend"], found, check, compile_config(cfg)), "openvino"
    else:
        # ONNX Runtime: the Q/DQ graph, which a fused build fuses after quantization (its graph form quantized alike)
        candidate = choices.run_onnxruntime(onnx.load(str(directory / files["quantized"])), found, check, cfg.resolved_threads)
        runner = "onnxruntime (the Q/DQ graph" + ("; the fused build's choices are inside its vitfold ops)" if "fused" in files else ")")
    result = choices.agreement(reference, candidate, found.sites)
    log(f"token choices identical to f32 on {result.identical:.1%} of {result.sites} sites x {result.photos} "
        f"check batches (first site: {result.first_site:.1%} identical, {result.first_site_tokens:.1%} of its indices shared)")
    return {**result.to_json(), "runner": runner}


def build(request: BuildRequest, log: Callable[[str], None] = print) -> tuple[Path, dict]:
    """Run a whole build; returns the build directory and its report.

    The target (``request.out`` or ``builds/<request.name()>``) is claimed first (:func:`vitfold.outdir.claim`):
    a user's folder or another request's build is refused before any work, and the directory is
    locked against a second build.

    Raises:
        VitfoldError subclasses: bad spec / schedule (before any file is written), a target that may
        not be written, export, pass or fidelity failures (the target directory is left untouched).
    """
    if request.export_only:  # the device builds: only the target's passes and lint rules are needed here
        get_backend(request.build.backend)
    else:
        runtimes.backend_module(request.build.backend)  # unknown backend fails before the slow steps
    out = Path(request.out) if request.out else Path.cwd() / "builds" / request.name()
    with claim(out, request.key(), force=request.force, log=log) as target:
        if target.state == "rebuilt":
            log(f"rebuilding {target.target}: it holds a build of the same request")
        elif target.state == "replaced":
            log(f"replacing {target.target}: it holds a build of another request (--force)")
        return _build(request, target.target, log)


def _build(request: BuildRequest, out: Path, log: Callable[[str], None]) -> tuple[Path, dict]:
    spec = request.spec
    method = create_method(request.method, **request.params)
    if request.task == "features":
        method = create_method(request.method, **request.params, **for_features(type(method)))
    gated = getattr(method, "gated", False)
    if request.calibrate is not None and not gated and request.build.precision != "int8":
        raise SpecError(f"--calibrate sets a data-dependent gate's capacity or int8 ranges; {request.method} at "
                        f"{request.build.precision} has neither (use --precision int8, or --keep-mass)")
    model, pre = create_model(spec)
    gate = prepare_gate(method, model, pre, request, log) if gated else None
    if gate is not None:
        method, gate = gate
    layout = TokenLayout.of(model)
    schedule = method.schedule(layout)
    for note in schedule.notes:
        log(f"note: {note}")
    reduced = method.apply(model, schedule)
    dims = model_dims(model)
    if request.task == "features":
        model, reduced = DenseFeatures(model), DenseFeatures(reduced)
        dims = replace(dims, num_classes=0)
    paths = list_images(request.images)
    check = batches(load_images(paths, pre), spec.batch_size)
    common = {
        "name": out.name,
        "request_key": request.key(),
        "spec": spec.to_json(),
        "weights": spec.weights,
        "preprocess": pre.to_json(),
        "task": request.task,
        "dims": dims.to_json(),
        "versions": tool_versions(),
    }
    names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names") if request.task == "classify" else None
    if names:
        common["labels"] = names  # class names of a transformers checkpoint (id2label), for reports and apps
    image_names = [p.name for p in paths]
    dense_schedule = Schedule.dense(layout.depth, layout.num_tokens, layout.num_prefix_tokens)
    calibration = (load_calibration(request.calibrate, pre, spec.batch_size, subset=request.calibration_size, warn=log)
                   if request.build.precision == "int8" else None)
    variant = dict(request=request, check=check, image_names=image_names, common=common, log=log, calibration=calibration)
    dense_link = _shared_dense(request, common, out) if request.dense_dir is not None else "dense"
    report = None
    with atomic_directory(out) as staging:
        if request.dense_dir is None:
            (staging / "dense").mkdir()
            build_variant(model, dense_schedule, staging / "dense", method=DENSE_METHOD, **variant)
        f32 = BuildConfig.from_json({**request.build.to_json(), "precision": "f32", "weights": None})
        dense_f32_link = None
        if request.build.label != "f32" and request.dense_f32_dir is not None:
            dense_f32_link = _shared_dense(replace(request, dense_dir=request.dense_f32_dir, build=f32), common, out)
        elif request.build.label != "f32":  # the whole gain is measured against dense f32
            (staging / DENSE_F32).mkdir()
            build_variant(model, dense_schedule, staging / DENSE_F32, method=DENSE_METHOD, cfg=f32,
                          **{**variant, "calibration": None})
            dense_f32_link = DENSE_F32
        manifest = build_variant(reduced, schedule, staging,
                                 method={"name": request.method, "params": method.params()}, **variant)
        manifest["dense"] = dense_link
        if dense_f32_link is not None:
            manifest["dense_f32"] = dense_f32_link
        if gate is not None:
            manifest["gate"] = gate
        write_manifest(staging, manifest)
        if request.auto_schedule is not None:  # profile_build reports predicted beside measured
            (staging / AUTO_JSON).write_text(json.dumps(request.auto_schedule, indent=2) + "\n")
        if request.profile and not request.export_only:
            log("profile: latency (dense and reduced interleaved), FLOPs, fidelity")
            report = profile_build(staging, images=request.images, options=request.latency)
    return out, report


DENSE_METHOD = {"name": "none", "params": {}}
#: The f32 dense build beside a bf16 / fp16 / int8 / weight-compressed one: the whole gain's baseline.
DENSE_F32 = "dense-f32"


def build_dense(request: BuildRequest, log: Callable[[str], None] = print) -> Path:
    """Build only the dense model of ``request`` (no method) into ``request.out``, to be shared as
    the dense twin of many builds (``BuildRequest.dense_dir``), e.g. by a sweep; returns the directory.

    Raises:
        VitfoldError subclasses, as :func:`build`.
    """
    runtimes.backend_module(request.build.backend)
    model, pre = create_model(request.spec)
    dims = model_dims(model)
    layout = TokenLayout.of(model)
    if request.task == "features":
        model, dims = DenseFeatures(model), replace(dims, num_classes=0)
    paths = list_images(request.images)
    check = batches(load_images(paths, pre), request.spec.batch_size)
    out = Path(request.out) if request.out else Path.cwd() / "builds" / f"{request.spec.slug}-dense"
    common = {
        "name": out.name, "spec": request.spec.to_json(), "weights": request.spec.weights, "preprocess": pre.to_json(),
        "task": request.task, "dims": dims.to_json(), "versions": tool_versions(),
    }
    calibration = (load_calibration(request.calibrate, pre, request.spec.batch_size, subset=request.calibration_size,
                                    warn=log) if request.build.precision == "int8" else None)
    with atomic_directory(out) as staging:
        build_variant(model, Schedule.dense(layout.depth, layout.num_tokens, layout.num_prefix_tokens), staging,
                      method=DENSE_METHOD, request=request, check=check, image_names=[p.name for p in paths],
                      common=common, log=log, calibration=calibration)
    return out


def _twin_settings(build: Optional[dict]) -> Optional[dict]:
    """Backend settings as a dense twin sees them: ``--fused-ops`` changes nothing in a model with no
    reduction site (its dense twin is the graph form), so a plain dense build serves a fused build."""
    if not build:
        return build
    extra = {k: v for k, v in build.get("extra", {}).items() if k != "fused_ops"}
    return {**build, "extra": extra}


def _shared_dense(request: BuildRequest, common: dict, out: Path) -> str:
    """Check that ``request.dense_dir`` is the dense twin this build needs; return its path relative
    to ``out`` (the staging directory is a sibling of ``out``, so the link holds after the rename).

    Raises:
        ArtifactError: not a build, or built from another model, weights, task or backend setting.
    """
    dense_dir = Path(request.dense_dir).resolve()
    manifest = read_manifest(dense_dir)
    for key, want in (("spec", common["spec"]), ("task", common["task"]), ("build", _twin_settings(request.build.to_json())),
                      ("method", DENSE_METHOD)):
        have = _twin_settings(manifest.get(key)) if key == "build" else manifest.get(key)
        if have != want:
            raise ArtifactError(f"{dense_dir} cannot be the dense twin: its {key} is {manifest.get(key)}, this build needs {want}")
    return os.path.relpath(dense_dir, Path(out).resolve())


def prepare_gate(method, model, pre, request: BuildRequest, log: Callable[[str], None]) -> tuple:
    """Capacities for a gated method (``evit-mass``) and what the manifest records about them.

    Without ``capacity`` in the method's parameters, the dynamic model is calibrated on
    ``request.calibrate`` (or the check photos) at ``request.percentile``. Then the dynamic model
    runs on the check photos: images whose kept count passes a capacity are counted (the bounded
    model differs from the dynamic one there, by design; the build does not fail for it).

    Returns:
        ``(method with capacities, gate dict)`` for ``manifest["gate"]``.

    Raises:
        SpecError: ``--task features``, ``--capacity`` with ``--calibrate`` or ``--percentile``, or a
            calibration folder without images.
    """
    if request.task == "features":
        raise SpecError(f"{request.method} has no dense reconstruction; use --task classify")
    check_paths = list_images(request.images)
    check_images = load_images(check_paths, pre)
    calibration = None
    if method.capacity is None:
        source = "check photos"
        images = check_images
        if request.calibrate is not None:
            try:
                paths = list_images(request.calibrate)
            except SpecError as exc:
                raise SpecError(f"--calibrate: {exc}; give a folder of photos like those the model will see") from exc
            source, images = str(request.calibrate), load_images(paths, pre)
        method, calibration = calibrate_capacity(method, model, images, percentile=request.percentile, source=source)
        for note in calibration.notes:
            log(f"note: {note}")
        log(f"gate capacity {list(calibration.capacity)} at blocks {list(calibration.locations)} "
            f"(percentile {calibration.percentile:g} of the kept counts on {calibration.images} images, {source})")
    elif request.calibrate is not None or request.percentile != DEFAULT_PERCENTILE:
        raise SpecError("--capacity fixes the capacity; --calibrate / --percentile would compute it: give one or the other")
    check = check_capacity(method, model, check_images, [p.name for p in check_paths])
    if check["exceeded"]:
        log(f"note: {check['exceeded']} of {check['images']} check photos keep more tokens than the capacity "
            f"({', '.join(check['exceeded_images'])}); the bounded model differs from the dynamic one on them")
    layout = TokenLayout.of(model)
    capacity = method.capacities(layout)
    return method, {
        "keep_mass": method.keep_mass,
        "locations": [b for b, k in enumerate(capacity) if k is not None],
        "capacity": [k for k in capacity if k is not None],
        "calibration": calibration.to_json() if calibration else None,
        "check": check,
    }
