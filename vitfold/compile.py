"""The compile path: every caller that turns a torch module into something it runs goes through here.

Stages, in order: export (:mod:`vitfold.export`) -> the backend's pass pipeline, each pass verified
on a sample (:mod:`vitfold.passes`) -> lint for the backend's target (an error stops) -> quantize
(int8 or weight compression only, :mod:`vitfold.quantize`; a Q/DQ graph is linted again) -> backend
build (:mod:`vitfold.runtimes`) -> open. ``build`` (with its manifest and torch checks), ``curve``, the
auto-schedule calibration and the benchmarks all call :func:`compile_onnx` / :func:`compile_module`, so
the graph that is timed for a cost model is the graph a build ships. Each stage reads the files the
previous one wrote in ``directory`` (``model.onnx`` -> ``model.opt.onnx`` -> the backend's files).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from . import runtimes
from .export.onnx import export_onnx
from .passes import TENSORRT_8_5_PASSES
from .passes.lint import Finding, require_clean, target_for
from .passes.pipeline import PassReport, run_pipeline
from .runtimes import BuildConfig, Session, get_backend


@dataclass(frozen=True)
class Compiled:
    """A compiled variant in ``directory``: ``files`` (role -> name: ``onnx``, ``optimized`` and the
    backend's), backend ``versions``, the pass reports, the lint target and its warnings."""

    directory: Path
    files: dict
    versions: dict
    passes: list[PassReport]
    lint_target: str
    lint_warnings: list[Finding]
    quantization: Optional[dict] = None
    graph_form: Optional["Compiled"] = None  # a --fused-ops build's graph form, when kept (``graph_form_dir``)

    def open(self, cfg: BuildConfig) -> Session:
        """Load the built artifact (no manifest needed): a ready :class:`~vitfold.runtimes.Session`."""
        return runtimes.backend_module(cfg.backend).load(self.directory, {"files": self.files, "build": cfg.to_json()})


def fuses_after_quantization(cfg: BuildConfig) -> bool:
    """Whether a ``--fused-ops`` build quantizes its graph form and then fuses the sites of the Q/DQ graph,
    rather than quantizing the fused graph. A Q/DQ quantizer (ONNX Runtime's) calibrates in a session of its
    own, which cannot load vitfold's op library; the reduction stays float, so each site is intact in the
    Q/DQ graph, which is also the graph form quantized alike. NNCF quantizes the fused graph with the
    OpenVINO extension loaded, so an OpenVINO build reads its token choices off a separate graph form."""
    quantizer = get_backend(cfg.backend).quantizer or ""
    return bool(cfg.extra.get("fused_ops")) and cfg.quantized and quantizer.startswith("qdq-")


def pipeline_for(cfg: BuildConfig) -> tuple[list, str]:
    """The pass steps and the lint target for a backend build.

    TensorRT depends on the installed version: 8.5 / 8.6 / 9 / 10 / 11 have their own lint rules; 8.5
    also gets :data:`~vitfold.passes.TENSORRT_8_5_PASSES` (LayerNormalization, integer TopK, opset 17),
    8.6 the opset-17 downgrade alone; on
    TensorRT 11 (strongly typed networks, no fp16 builder flag) an fp16 build gets its precision from
    the graph through the ``precision`` pass.

    ``cfg.extra["tensorrt_version"]`` names the TensorRT that will build the engine (an export on a
    workstation for a Jetson); without it the installed one is asked.

    Raises:
        BackendUnavailable: TensorRT requested, not installed, and no ``tensorrt_version`` given.
    """
    passes: list = list(get_backend(cfg.backend).pipeline)
    version = None
    if cfg.backend == "tensorrt":
        from .runtimes.tensorrt import installed_version

        version = cfg.extra.get("tensorrt_version") or installed_version()  # the device's, for --export-only
        target = target_for(cfg.backend, version)
        if target == "tensorrt-8.5":
            passes.extend(TENSORRT_8_5_PASSES)
        elif target == "tensorrt-8.6":  # LayerNormalization and INT32 TopK are in; opset-17 reading is not
            passes.append(("downgrade-opset", {"opset": 17}))
        if int(version.split(".")[0]) >= 11 and cfg.precision in ("fp16", "bf16"):
            passes.append(("precision", {"precision": cfg.precision}))
    return passes, target_for(cfg.backend, version)



def compile_onnx(onnx_path: Path, directory: Path, cfg: BuildConfig, sample: np.ndarray, *,
                 passes: Optional[Sequence] = None, calibration=None, build_backend: bool = True,
                 graph_form_dir: Optional[Path] = None, log: Callable[[str], None] = lambda msg: None) -> Compiled:
    """Passes -> lint -> backend build for an exported ONNX file, into ``directory``.

    Args:
        onnx_path: the exported model (read only); ``directory / "model.opt.onnx"`` is written.
        sample: one ``[B, 3, H, W]`` float32 batch each pass is verified on (real photos where there are).
        passes: the steps to run instead of :func:`pipeline_for`'s (benchmarks comparing pipelines).
        calibration: a :class:`vitfold.quantize.Calibration`, needed for ``--precision int8``.
        build_backend: False stops before the backend build (``--export-only``: the device builds
            from the files written here, :mod:`vitfold.device`).
        graph_form_dir: ``--fused-ops``: build the graph form the fused build is checked against here
            and keep it (``Compiled.graph_form``; the caller removes it) instead of in a temporary folder,
            for a later step that reads it (an INT8 build's token choices).

    Raises:
        PassError: a pass failed or moved the outputs beyond its tolerance, or lint found an error.
        BackendUnavailable: the backend is not installed here.
    """
    directory = Path(directory)
    steps, lint_target = pipeline_for(cfg)
    steps = list(steps if passes is None else passes)
    optimized = directory / "model.opt.onnx"
    log(f"passes: {', '.join(p if isinstance(p, str) else p[0] for p in steps) or 'none'}")
    reports = run_pipeline(Path(onnx_path), optimized, steps, [sample])
    warnings = require_clean(optimized, lint_target)
    source, quantized, fused = optimized, None, None
    fuse_after = fuses_after_quantization(cfg)
    if cfg.extra.get("fused_ops") and not fuse_after:
        fused = _fuse_sites(optimized, directory, cfg, log)
        source = fused.path if fused is not None else source
    if cfg.quantized:
        from .quantize import quantize

        log(f"quantize ({cfg.label}) with {get_backend(cfg.backend).quantizer}, the reduction kept float")
        quantized = quantize(source, directory, cfg, calibration)
        source = quantized["path"]
        if source.suffix == ".onnx":  # a Q/DQ graph: the target's Q/DQ rules
            warnings = warnings + require_clean(source, lint_target)
    if fuse_after:
        fused = _fuse_sites(source, directory, cfg, log)
        source = fused.path if fused is not None else source
    onnx_name = Path(onnx_path).name if Path(onnx_path).parent.resolve() == directory.resolve() else str(onnx_path)
    files = {"onnx": onnx_name, "optimized": optimized.name, **(quantized["files"] if quantized else {})}
    record = quantized["record"] if quantized else None
    if fused is not None:
        files["fused"] = fused.path.name
    if not build_backend:
        return Compiled(directory, files, {}, reports, lint_target, warnings, record)
    log(f"build {cfg.backend} ({cfg.label})")
    built = runtimes.build(source, directory, cfg)
    graph_form = None
    if fused is not None:
        report, graph_form = _check_fused(fused, optimized, directory, {**files, **built["files"]}, cfg, sample,
                                          calibration, graph_form_dir, log)
        reports = reports + [report]
    return Compiled(directory, {**files, **built["files"]}, built["versions"], reports, lint_target, warnings, record,
                    graph_form)


@dataclass(frozen=True)
class _Fused:
    path: Path
    sites: str  # "3 sites into vitfold.EViTPrune"
    nodes_before: int
    nodes_after: int
    ms: float


def _fuse_sites(optimized: Path, directory: Path, cfg: BuildConfig, log: Callable[[str], None]) -> Optional[_Fused]:
    """``--fused-ops``: each reduction site of ``optimized`` as one ``vitfold`` node (``ToMeMerge``, on the
    CPU backends ``ToMeMergeWavg``, ``EViTPrune``) in ``model.fused.onnx`` (:mod:`vitfold.passes.fuse_sites`); None when the model has no
    site (the dense twin).

    Raises:
        PassError: a site could not be fused; SpecError: a backend or precision the fused op does not run on.
    """
    import json
    import time

    import onnx

    from .errors import SpecError
    from .native import FUSED_TARGETS, SITE_PREFIXES, WEIGHTED_BACKENDS
    from .passes.fuse_sites import fuse_sites

    if cfg.weights is not None or cfg.precision not in FUSED_TARGETS.get(cfg.backend, ()):
        raise SpecError(f"--fused-ops builds for OpenVINO and ONNX Runtime at f32 or int8 and TensorRT at f32 (the kernels "
                        f"are float32; int8 keeps the reduction float); this build is {cfg.backend} {cfg.label}: drop --fused-ops")
    proto = onnx.load(str(optimized))
    if not any(node.name.startswith(SITE_PREFIXES) for node in proto.graph.node):
        schedule = next((json.loads(p.value) for p in proto.metadata_props if p.key == "vitfold.schedule"), None)
        tokens = schedule["tokens"] if schedule else []
        if not any(b < a for a, b in zip(tokens, tokens[1:])):
            return None  # nothing reduced (the dense twin): the graph form, no extension
        fuse_sites(proto)  # reduced but untagged: raises, naming what cannot be fused
    start = time.perf_counter()
    result, counts = fuse_sites(proto, weighted=cfg.backend in WEIGHTED_BACKENDS)
    ms = (time.perf_counter() - start) * 1e3
    path = directory / "model.fused.onnx"
    onnx.save(result, str(path))
    sites = ", ".join(f"{n} sites into vitfold.{op}" for op, n in counts.items())
    log(f"fused {sites} ({len(proto.graph.node)} -> {len(result.graph.node)} nodes)")
    return _Fused(path, sites, len(proto.graph.node), len(result.graph.node), ms)


def _check_fused(fused: _Fused, graph_form: Path, directory: Path, files: dict, cfg: BuildConfig,
                 sample: np.ndarray, calibration, keep_in: Optional[Path],
                 log: Callable[[str], None]) -> tuple[PassReport, Optional[Compiled]]:
    """Build the graph form beside the fused build (int8: quantized with the same ``calibration``) and run
    both on ``sample``: outputs within :data:`~vitfold.native.FUSED_TOLERANCE` of their scale (the same
    token choices, :func:`~vitfold.native.check_fused_outputs`) or the build stops.
    The graph form is built in ``keep_in`` and returned when given, else in a temporary folder (None).

    Raises:
        FidelityError: the fused build moved an output beyond the tolerance.
    """
    import tempfile
    from dataclasses import replace

    from .native import check_fused_outputs

    plain = replace(cfg, extra={k: v for k, v in cfg.extra.items() if k != "fused_ops"})
    kept = None
    with tempfile.TemporaryDirectory(prefix="vitfold-graph-form-") as tmp:
        where = Path(tmp) if keep_in is None else Path(keep_in)
        where.mkdir(parents=True, exist_ok=True)
        compiled = compile_onnx(graph_form, where, plain, sample, passes=[], calibration=calibration)
        with compiled.open(plain) as reference:
            expected = reference(sample)
        if keep_in is not None:
            kept = compiled
    with runtimes.backend_module(cfg.backend).load(directory, {"files": files, "build": cfg.to_json()}) as session:
        got = session(sample)
    change = check_fused_outputs(expected, got, "", cfg.backend)
    log(f"fused sites match the graph form on {cfg.backend}: max abs {change:.2g}")
    return PassReport("fuse-sites", fused.nodes_before, fused.nodes_after, fused.ms, change,
                      (f"fused {fused.sites}, checked on {cfg.backend} against the graph form",)), kept


def compile_module(module, input_shape: Sequence[int], directory: Path, cfg: BuildConfig, *,
                   sample: Optional[np.ndarray] = None, passes: Optional[Sequence] = None, calibration=None,
                   metadata: Optional[dict] = None, log: Callable[[str], None] = lambda msg: None) -> Compiled:
    """Export ``module`` at ``input_shape`` to ``directory / "model.onnx"`` (static shapes), then
    :func:`compile_onnx`. ``sample``: the batch the passes are verified on (default: a seeded normal one).
    ``metadata``: as :func:`~vitfold.export.onnx.export_onnx`'s (a reduced model's ``schedule``, which
    ``--fused-ops`` reads).

    Raises:
        ExportError: the graph breaks the static export contract; and as :func:`compile_onnx`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    export_onnx(module, directory / "model.onnx", tuple(input_shape), metadata=metadata)
    if sample is None:
        sample = np.random.default_rng(0).standard_normal(tuple(input_shape)).astype(np.float32)
    return compile_onnx(directory / "model.onnx", directory, cfg, sample, passes=passes, calibration=calibration, log=log)
