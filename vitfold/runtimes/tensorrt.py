"""TensorRT backend (Jetson and NVIDIA GPUs). Imports tensorrt and cuda-python / pycuda lazily; no torch.

Build (:func:`build`): ONNX parser (every parser error reported with node, op and reason), a builder
config from :func:`translate_config` (per TensorRT version), optimisation profiles for dynamic inputs
(:func:`optimization_profiles`), a persisted timing cache, and a serialized engine, all through the
engine cache of :mod:`.tensorrt_cache`. Run (:func:`load`): deserialize (an engine from another
TensorRT / GPU, or one that does not deserialize, is rebuilt from ``model.opt.onnx``), device buffers
bound with ``set_tensor_address``, ``execute_async_v3`` on a stream, optionally replayed as a CUDA graph.

TensorRT Python calls, per version (Python API reference and migration guides on docs.nvidia.com):

- 8.5, 10.x, 11.x: ``Builder``, ``create_network``, ``OnnxParser.parse_from_file / num_errors /
  get_error``, ``create_builder_config``, ``set_memory_pool_limit(MemoryPoolType.WORKSPACE)``,
  ``create_optimization_profile / set_shape / add_optimization_profile``, ``create_timing_cache /
  set_timing_cache / get_timing_cache().serialize()``, ``build_serialized_network``,
  ``Runtime.deserialize_cuda_engine``, ``num_io_tensors / get_tensor_name / get_tensor_mode /
  get_tensor_shape / get_tensor_dtype / get_tensor_profile_shape``, ``create_execution_context``,
  ``set_input_shape``, ``set_tensor_address``, ``execute_async_v3`` (name-based I/O since 8.5),
  ``IProfiler``, ``ILogger``.
- 8.x only: ``NetworkDefinitionCreationFlag.EXPLICIT_BATCH`` (ignored in 10, networks always explicit batch).
- 8.6+: ``IBuilderConfig.builder_optimization_level`` (8.5 has none).
- 8.5 / 10.x: fp16 through ``BuilderFlag.FP16`` (weak typing, deprecated in 10.12). 11.x removed every
  precision flag: networks are strongly typed and fp16 must already be in the ONNX graph.
- Parser errors: ``code / desc / node`` everywhere, ``node_name / node_operator`` on newer parsers.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import ArtifactError, SpecError
from . import cudamem
from .base import BuildConfig, Session
from ..artifact import sha256 as file_sha256
from .tensorrt_profile import gpu_latency, jetson_state, profile_extras, session_layers  # noqa: F401 (re-exported)
from .tensorrt_cache import EngineCache, cached_engine, detect_platform, engine_mismatch
from .tensorrt_config import (  # noqa: F401  (re-exported: the backend's public API)
    WORKSPACE_MB,
    BuilderSettings,
    _require,
    check_graph_precision,
    diagnose_build_failure,
    format_parser_errors,
    optimization_profiles,
    parse_failure,
    parse_version,
    translate_config,
)

log = logging.getLogger(__name__)

ENGINE, RECORD = "model.engine", "engine.json"
#: No square brackets (``vitfold[tensorrt]``): rich would read them as markup in the CLI's error line.
TRT_INSTALL_HINT = (
    "on x86_64 `pip install \"tensorrt-cu12>=10,<11\" \"cuda-python>=12,<13\"` (vitfold's tensorrt extra); on a Jetson TensorRT "
    "comes with JetPack (`sudo apt install nvidia-jetpack`), use a venv made with --system-site-packages; "
    "README section 'Jetson and NVIDIA GPUs (TensorRT)'"
)


def _trt():
    from . import require

    return require("tensorrt", TRT_INSTALL_HINT)


def installed_version() -> str:
    """The installed TensorRT version (e.g. ``"10.3.0"``), for callers that pick passes by version
    (merge-as-matmul below 10, the precision pass on 11).

    Raises:
        BackendUnavailable: tensorrt is not installed.
    """
    return str(_trt().__version__)


def check_available() -> None:
    """Fail fast (before any export) when TensorRT, the CUDA bindings or a GPU are missing.

    Raises:
        BackendUnavailable: naming what is missing and how to install it.
    """
    _trt()
    cudamem.open_device(0).close()


# ----------------------------------------------------------------------------------- TensorRT side

_LOGGER = None


def _logger(trt):
    """One capturing logger per process (TensorRT 8 treats the logger as a singleton)."""
    global _LOGGER
    if _LOGGER is None:
        warning = int((getattr(trt.ILogger, "Severity", None) or trt.Logger.Severity).WARNING)

        class CapturingLogger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.messages: list[str] = []

            def log(self, severity, msg):
                level = int(severity)
                if level <= warning:  # kept for diagnose_build_failure, errors marked so they are read first
                    self.messages = (self.messages + [f"[{'W' if level == warning else 'E'}] {msg}"])[-200:]
                    log.log(logging.WARNING if level == warning else logging.ERROR, "TensorRT: %s", msg)
                else:
                    log.debug("TensorRT: %s", msg)

            def take(self) -> list[str]:
                messages, self.messages = self.messages, []
                return messages

        _LOGGER = CapturingLogger()
    return _LOGGER


def device_identity(trt, device: cudamem.CudaDevice) -> dict:
    """The machine fields of an engine's cache key: TensorRT version, GPU, compute capability, platform."""
    return {"tensorrt": trt.__version__, "gpu": device.name, "compute_capability": list(device.compute_capability),
            "platform": detect_platform()}


def engine_cache(cfg: BuildConfig) -> Optional[EngineCache]:
    """The engine cache for ``cfg``: ``cfg.cache_dir``, else ``$XDG_CACHE_HOME/vitfold`` (``~/.cache``);
    ``extra={"engine_cache": False}`` turns it off."""
    if cfg.extra.get("engine_cache", True) is False:
        return None
    return EngineCache(Path(cfg.cache_dir) if cfg.cache_dir else Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "vitfold")


def load_plugins(paths: Sequence[str], trt=None) -> list[dict]:
    """Load plugin libraries (``extra["plugins"]``) before parsing; returns their names and sha256.

    Every library is ``dlopen``-ed (``RTLD_GLOBAL``), which registers plugins the old way (static
    ``REGISTER_TENSORRT_PLUGIN`` creators). A library that exports ``getCreators`` (TensorRT 10's
    plugin-library entry point; ``getPluginCreators`` before it) is also handed to
    ``trt.get_plugin_registry().load_library``, which is how TensorRT registers those.

    Raises:
        SpecError: a library is missing, does not load, or TensorRT's registry refuses it.
    """
    loaded = []
    for path in map(Path, paths):
        if not path.is_file():
            raise SpecError(f"TensorRT plugin library {path} does not exist")
        digest = file_sha256(path)
        if digest in _LOADED_PLUGINS:  # registered once per process: TensorRT refuses a second registration
            loaded.append({"name": path.name, "sha256": digest, "loaded_by": _LOADED_PLUGINS[digest]})
            continue
        try:
            library = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        except OSError as exc:
            raise SpecError(f"TensorRT plugin library {path} does not load: {exc}") from exc
        how = "dlopen"
        if trt is not None and (hasattr(library, "getCreators") or hasattr(library, "getPluginCreators")):
            registry = trt.get_plugin_registry()
            if hasattr(registry, "load_library"):
                if registry.load_library(str(path)) is None:
                    raise SpecError(f"TensorRT's plugin registry refused {path} (see the TensorRT log)")
                how = "plugin registry"
        _LOADED_PLUGINS[digest] = how
        loaded.append({"name": path.name, "sha256": digest, "loaded_by": how})
    return loaded


#: sha256 -> how each plugin library was loaded in this process (build copies of one library share it).
_LOADED_PLUGINS: dict[str, str] = {}


def _onnx_nodes(path: Path) -> list[tuple[str, str]]:
    try:
        import onnx
    except ImportError:
        return []
    return [(n.name, n.op_type) for n in onnx.load(str(path), load_external_data=False).graph.node]


def _network_dtypes(network) -> set[str]:
    dtypes = {str(network.get_input(i).dtype) for i in range(network.num_inputs)}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        dtypes.update(str(layer.get_output(j).dtype) for j in range(layer.num_outputs))
    return dtypes


def obtain_engine(trt, onnx_path: Path, cfg: BuildConfig, plan: BuilderSettings, identity: dict):
    """Parse ``onnx_path``, then return ``(CachedEngine, fields, runtime)``: the cached engine when it is
    valid, else a fresh build (stored in the cache). ``runtime`` must outlive the engine.

    Raises:
        ExportError: parser errors (each node named) or an unsupported layer.
        SpecError: full workspace / out of memory, a dynamic input without a range, fp16 on TRT 11
            from an fp32 graph.
    """
    logger = _logger(trt)
    plugins = load_plugins(cfg.extra.get("plugins", ()), trt)
    if hasattr(trt, "init_libnvinfer_plugins"):
        trt.init_libnvinfer_plugins(logger, "")
    flags = 0
    for name in plan.network_flags:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    builder = trt.Builder(logger)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    logger.take()
    if not parser.parse_from_file(str(onnx_path)):
        raise parse_failure(onnx_path, [parser.get_error(i) for i in range(parser.num_errors)], _onnx_nodes(onnx_path))
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    profiles = optimization_profiles(inputs, cfg.extra)
    check_graph_precision(_network_dtypes(network), plan)
    fields = {**identity, "onnx_sha256": file_sha256(onnx_path), "precision": plan.precision, "profiles": profiles,
              "builder_optimization_level": plan.builder_optimization_level, "workspace_bytes": plan.workspace_bytes,
              "plan": {"network": list(plan.network_flags), "set": list(plan.set_flags), "clear": list(plan.clear_flags),
                       "verbosity": plan.profiling_verbosity}, "plugins": plugins}
    cache = engine_cache(cfg)
    runtime = trt.Runtime(logger)

    def build_plan() -> bytes:
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan.workspace_bytes)
        if plan.builder_optimization_level is not None:
            config.builder_optimization_level = plan.builder_optimization_level
        for flag in plan.set_flags:
            config.set_flag(getattr(trt.BuilderFlag, flag))
        for flag in plan.clear_flags:
            if hasattr(trt.BuilderFlag, flag):
                config.clear_flag(getattr(trt.BuilderFlag, flag))
        config.profiling_verbosity = getattr(trt.ProfilingVerbosity, plan.profiling_verbosity)
        if profiles:
            profile = builder.create_optimization_profile()
            for name, (low, opt, high) in profiles.items():
                profile.set_shape(name, low, opt, high)
            config.add_optimization_profile(profile)
        timing_path = cache.timing_cache(fields) if cache else None
        timing = config.create_timing_cache(timing_path.read_bytes() if timing_path and timing_path.is_file() else b"")
        config.set_timing_cache(timing, False)
        logger.take()
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise diagnose_build_failure(logger.take(), plan)
        if cache:
            cache.save_timing_cache(fields, bytes(config.get_timing_cache().serialize()))
        return bytes(serialized)

    result = cached_engine(cache, fields, runtime.deserialize_cuda_engine, build_plan)
    return result, fields, runtime


def build(onnx_path: Path, out_dir: Path, cfg: BuildConfig) -> dict:
    """Build (or take from the engine cache) the TensorRT engine for ``onnx_path`` into ``out_dir``.

    Writes ``model.engine`` and ``engine.json`` (the cache-key fields, the builder plan, where the
    engine came from). Returns the manifest entries (files, versions).

    Raises:
        BackendUnavailable: no tensorrt / CUDA bindings / GPU here.
        ExportError / SpecError: see :func:`obtain_engine`.
    """
    trt = _trt()
    files = {"backend": ENGINE, "engine_record": RECORD}
    plugin = _fused_plugin(Path(onnx_path), cfg)
    if plugin is not None:  # a --fused-ops graph: vitfold's plugins parse its vitfold nodes; the build carries them
        shutil.copy2(plugin, Path(out_dir) / plugin.name)
        files["plugin"] = plugin.name
        cfg = _with_plugin(cfg, Path(out_dir) / plugin.name)
    device = cudamem.open_device(int(cfg.extra.get("device", 0)))
    try:
        plan = translate_config(cfg, trt.__version__)
        result, fields, _ = obtain_engine(trt, Path(onnx_path), cfg, plan, device_identity(trt, device))
    finally:
        device.close()
    (out_dir / ENGINE).write_bytes(result.plan)
    record = {**fields, "source": result.source, "cache_note": result.reason, "builder": plan.to_json()}
    (out_dir / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return {"files": files, "versions": {"tensorrt": trt.__version__, "cuda_bindings": device.api}}


def _fused_plugin(onnx_path: Path, cfg: BuildConfig) -> Optional[Path]:
    """``--fused-ops`` builds whose graph holds vitfold ops: the plugin library (compiled here once,
    :func:`vitfold.native.tensorrt_plugin`); else None (the graph form, a dense twin).

    Without the ``onnx`` package (a lean device), the graph's bytes are searched for the plugins' op types.

    Raises:
        SpecError: a vitfold op no plugin implements.
        NativeUnavailable: the plugin cannot be built here (the reason and the fix).
    """
    if not cfg.extra.get("fused_ops"):
        return None
    from ..native import DOMAIN, TENSORRT_OPS, TOME_WAVG_OP, tensorrt_plugin

    try:
        import onnx
    except ImportError:
        data = Path(onnx_path).read_bytes()
        ops = {op for op in (*TENSORRT_OPS, TOME_WAVG_OP) if op.encode() in data}
    else:
        ops = {n.op_type for n in onnx.load(str(onnx_path), load_external_data=False).graph.node if n.domain == DOMAIN}
    if not ops:
        return None
    if not ops <= set(TENSORRT_OPS):
        raise SpecError(f"TensorRT has no vitfold plugin for {', '.join(sorted(ops - set(TENSORRT_OPS)))} (only "
                        f"{', '.join(TENSORRT_OPS)}); build this method for TensorRT without --fused-ops")
    return tensorrt_plugin(log=log.info)


def _with_plugin(cfg: BuildConfig, library: Path) -> BuildConfig:
    """``cfg`` with ``library`` appended to the plugin libraries loaded before parsing."""
    from dataclasses import replace

    return replace(cfg, extra={**cfg.extra, "plugins": [*cfg.extra.get("plugins", ()), str(library)]})


def load(directory: Path, manifest: dict) -> "TensorRTSession":
    """Load a TensorRT build directory into a ready session.

    The engine is used as is only when it was built by this TensorRT on this GPU and platform and it
    deserializes; otherwise it is rebuilt from the directory's ``model.opt.onnx`` through the engine
    cache (the build directory is not modified) and ``settings["engine_source"]`` says why.

    Raises:
        BackendUnavailable, ArtifactError (no engine record), and the errors of :func:`obtain_engine`.
    """
    directory = Path(directory)
    cfg = BuildConfig.from_json(manifest["build"])
    files = manifest["files"]
    if "engine_record" not in files:
        raise ArtifactError(f"{directory} has no TensorRT engine record; rebuild it with `deploy.py build --backend tensorrt`")
    trt = _trt()
    if "plugin" in files:  # a --fused-ops build: its plugin must be registered before the engine deserializes
        cfg = _with_plugin(cfg, directory / files["plugin"])
    device = cudamem.open_device(int(cfg.extra.get("device", 0)))
    try:
        identity = device_identity(trt, device)
        record = json.loads((directory / files["engine_record"]).read_text())
        load_plugins(cfg.extra.get("plugins", ()), trt)
        runtime = trt.Runtime(_logger(trt))
        reasons = engine_mismatch(record, identity)
        engine = None
        if not reasons:
            try:
                engine = runtime.deserialize_cuda_engine((directory / files["backend"]).read_bytes())
            except Exception as exc:
                log.warning("engine does not deserialize: %s", exc)
            reasons = [] if engine is not None else ["the engine file does not deserialize (corrupt or truncated)"]
        source = "build directory"
        if engine is None:
            log.warning("rebuilding the TensorRT engine of %s: %s", directory, "; ".join(reasons))
            plan = translate_config(cfg, trt.__version__)
            source_graph = directory / files.get("fused", files["optimized"])  # the graph the engine was built from
            result, _, runtime = obtain_engine(trt, source_graph, cfg, plan, identity)
            engine, source = result.engine, f"rebuilt ({result.source}): " + "; ".join(reasons)
        return TensorRTSession(trt, engine, runtime, device, cfg, {**identity, "engine_source": source})
    except BaseException:
        device.close()
        raise


class TensorRTSession(Session):
    """A deserialized engine with device buffers bound once (``set_tensor_address``) on one stream.

    ``session(images [B, 3, H, W] float32) -> {output: np.ndarray}`` copies in (H2D), runs
    ``execute_async_v3`` (or replays the CUDA graph captured at load: ``extra["cuda_graph"]``, default
    on, static shapes and cuda-python only), copies out (D2H) and synchronizes.
    """

    backend = "tensorrt"

    def __init__(self, trt, engine, runtime, device: cudamem.CudaDevice, cfg: BuildConfig, identity: dict):
        self._trt, self._engine, self._runtime, self._device = trt, engine, runtime, device
        self._context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if len(inputs) != 1:
            raise ArtifactError(f"the engine has inputs {inputs}; vitfold builds take one image input")
        self._input, self._outputs = inputs[0], [n for n in names if n not in inputs]
        shape = tuple(engine.get_tensor_shape(self._input))
        self.dynamic = any(d < 0 for d in shape)
        if self.dynamic:
            low, opt, high = (tuple(s) for s in engine.get_tensor_profile_shape(self._input, 0))
            self.shape_range = (low, high)
            _require(self._context.set_input_shape(self._input, high), f"set_input_shape({self._input}, {high})")
        self._dtypes = {n: np.dtype(trt.nptype(engine.get_tensor_dtype(n))) for n in names}
        self._ptr, self._host = {}, {}
        for name in names:
            count = int(np.prod(tuple(self._context.get_tensor_shape(name)), dtype=np.int64))
            self._host[name] = device.pinned((count,), self._dtypes[name])
            self._ptr[name] = device.malloc(self._host[name].nbytes)
            _require(self._context.set_tensor_address(name, self._ptr[name]), f"set_tensor_address({name})")
        run_shape = opt if self.dynamic else shape
        self._static_views: dict[str, np.ndarray] = {}
        if self.dynamic:
            _require(self._context.set_input_shape(self._input, run_shape), f"set_input_shape({self._input}, {run_shape})")
        else:  # fixed shapes: one view per tensor, no per-call shape queries
            self._static_views = {name: self._view(name) for name in names}
        self._start, self._computed, self._end = device.event(), device.event(), device.event()
        self._begin = device.event()
        self._graph, graph_note = None, "off"
        settings = {
            "backend": self.backend, **identity, "compute_capability": ".".join(map(str, device.compute_capability)),
            "cuda_bindings": device.api, "precision": cfg.precision, "workspace_mb": cfg.extra.get("workspace_mb", WORKSPACE_MB),
            "io_dtypes": {n: str(d) for n, d in self._dtypes.items()}, "dynamic_input": self.dynamic,
        }
        super().__init__(self._input, run_shape, self._outputs, settings)
        self._run(np.zeros(run_shape, np.float32))  # first enqueue: lazy init, before any capture
        if cfg.extra.get("cuda_graph", True) and not self.dynamic:
            if device.supports_graphs:
                try:
                    self._graph, graph_note = device.capture(self._enqueue), "on"
                except Exception as exc:  # some engines cannot be captured; run them uncaptured
                    graph_note = f"off: capture failed ({exc})"
            else:
                graph_note = f"off: not available with {device.api}"
        self.settings["cuda_graph"] = graph_note

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch; a dynamic engine takes any shape within its optimisation profile.

        Raises:
            SpecError: wrong dtype, or a shape outside the build (names the accepted shape or range).
        """
        if not self.dynamic:
            return super().__call__(images)
        images = np.asarray(images)
        low, high = self.shape_range
        if images.dtype != np.float32 or images.ndim != len(low) or not all(a <= s <= b for a, s, b in zip(low, images.shape, high)):
            raise SpecError(f"images are {images.dtype} {images.shape}; this engine takes float32 from {low} to {high}")
        _require(self._context.set_input_shape(self._input, images.shape), f"set_input_shape({self._input}, {images.shape})")
        return self._run(np.ascontiguousarray(images))

    def _enqueue(self) -> None:
        if not self._context.execute_async_v3(self._device.stream_handle):
            raise RuntimeError("TensorRT execute_async_v3 failed; see the TensorRT log")

    def _view(self, name: str) -> np.ndarray:
        if name in self._static_views:
            return self._static_views[name]
        shape = tuple(self._context.get_tensor_shape(name))
        return self._host[name][: int(np.prod(shape, dtype=np.int64))].reshape(shape)

    def _run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        device = self._device
        staged = self._view(self._input)
        np.copyto(staged, images, casting="same_kind")
        device.record(self._start)
        device.h2d(self._ptr[self._input], staged)
        device.record(self._begin)
        if self._graph is not None:
            device.launch(self._graph)
        else:
            self._enqueue()
        device.record(self._computed)
        outputs = {name: self._view(name) for name in self._outputs}
        for name, view in outputs.items():
            device.d2h(view, self._ptr[name])
        device.record(self._end)
        device.synchronize()
        return {name: view.astype(np.float32, copy=True) for name, view in outputs.items()}

    def timed(self, images: np.ndarray) -> tuple[float, float]:
        """Run once and return ``(compute_ms, end_to_end_ms)`` from CUDA events: the engine alone
        (graph launch or ``execute_async_v3``), and H2D copy + engine + D2H copy."""
        self(images)
        device = self._device
        return device.elapsed_ms(self._begin, self._computed), device.elapsed_ms(self._start, self._end)

    def close(self) -> None:
        """Destroy the execution context and engine, then free device / pinned memory and the stream."""
        if self._device is None:
            return
        self._device.synchronize()
        self._graph = self._context = self._engine = None
        self._device.close()
        self._device = None



def profile_layers(directory: Path, manifest: dict, images: np.ndarray, *, warmup: int = 5, runs: int = 20) -> dict:
    """Per-layer times of a TensorRT build on ``images`` ``[B, 3, H, W]`` (see
    :func:`vitfold.runtimes.tensorrt_profile.session_layers`); the entry point
    :mod:`vitfold.profiles.per_layer` calls for every backend."""
    session = load(directory, manifest)
    try:
        return session_layers(session, images, warmup=warmup, runs=runs)
    finally:
        session.close()


__all__ = [
    "BuilderSettings", "TensorRTSession", "build", "check_available", "check_graph_precision", "diagnose_build_failure",
    "format_parser_errors", "gpu_latency", "installed_version", "jetson_state", "load", "optimization_profiles",
    "parse_failure", "parse_version", "profile_extras", "profile_layers", "translate_config",
]
