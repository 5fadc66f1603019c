"""OpenVINO backend (CPU). Imports only openvino + numpy.

Build: ``convert_model`` from the ONNX file, ``save_model`` to IR with weights kept in f32
(``compress_to_fp16=False``: the default would silently halve the weights). Load: compile with an
explicit performance hint, thread count and ``INFERENCE_PRECISION_HINT`` (f32 unless bf16/fp16 is
asked for: CPUs with avx512_bf16 / AMX otherwise run bf16 and differ from torch by 1e-2).

``--fused-ops`` builds (``cfg.extra["fused_ops"]``): the ONNX file holds ``vitfold.ToMeMerge`` /
``vitfold.EViTPrune`` nodes, which convert through :mod:`vitfold.native`'s extension; the build copies the extension library next to
the IR (``files["extension"]``) and loading registers it before reading the IR.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from .base import BuildConfig, Session

XML, BIN = "model.xml", "model.bin"
# int8: the quantized IR carries its own int8 ops (FakeQuantize); the rest runs f32.
_PRECISION = {"f32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}


def _ov():
    from . import require

    return require("openvino", 'pip install "vitfold[openvino]"  (or: pip install openvino)')


def build(onnx_path: Path, out_dir: Path, cfg: BuildConfig) -> dict:
    """Convert ``onnx_path`` to OpenVINO IR (``model.xml`` + ``model.bin``) in ``out_dir``; an IR
    (``.xml``, e.g. the quantize stage's) is read and saved as the build's.

    Raises:
        BackendUnavailable: openvino is not installed.
    """
    ov = _ov()
    path = Path(onnx_path)
    files = {"backend": XML, "weights": BIN}
    if cfg.extra.get("fused_ops"):  # the ONNX graph, or the quantize stage's IR, may hold vitfold's ops
        from ..native import LIBRARY, PRUNE_OP, TOME_OP, TOME_WAVG_OP, load_openvino_ops, openvino_ops

        library = openvino_ops()
        if path.suffix == ".xml":
            core = ov.Core()
            load_openvino_ops(core, library)
            model = core.read_model(str(path))
        else:
            model = ov.convert_model(str(path), extension=str(library))
        if any(op.get_type_name() in (TOME_OP, TOME_WAVG_OP, PRUNE_OP) for op in model.get_ops()):  # the dense twin has no site
            shutil.copy2(library, out_dir / LIBRARY)
            files["extension"] = LIBRARY
    else:
        model = ov.Core().read_model(str(path)) if path.suffix == ".xml" else ov.convert_model(str(path))
    ov.save_model(model, str(out_dir / XML), compress_to_fp16=False)
    return {"files": files, "versions": {"openvino": ov.get_version()}}


def compile_config(cfg: BuildConfig) -> dict:
    """The CPU plugin properties for ``cfg`` (all explicit, recorded in reports)."""
    config = {
        "PERFORMANCE_HINT": cfg.hint,
        "INFERENCE_PRECISION_HINT": _PRECISION[cfg.precision],
        "INFERENCE_NUM_THREADS": cfg.resolved_threads,
    }
    if cfg.cache_dir:
        config["CACHE_DIR"] = cfg.cache_dir
    return config


class OpenVINOSession(Session):
    backend = "openvino"

    def __init__(self, xml: Path, cfg: BuildConfig, device: str = "CPU", perf_count: bool = False,
                 extension: Optional[Path] = None):
        ov = _ov()
        core = ov.Core()
        if extension is not None:  # a --fused-ops build: its ops are defined there
            from ..native import load_openvino_ops

            load_openvino_ops(core, extension)
        config = compile_config(cfg)
        if perf_count:  # per-layer counters (get_profiling_info); they cost a little time per layer
            config["PERF_COUNT"] = True
        self._compiled = core.compile_model(core.read_model(str(xml)), device, config)
        self._request = self._compiled.create_infer_request()
        inputs = self._compiled.inputs
        settings = {
            "backend": self.backend,
            "openvino": ov.get_version(),
            "device": device,
            "precision": cfg.precision,
            **{k.lower(): v for k, v in config.items()},
            "execution_precision": str(self._compiled.get_property("INFERENCE_PRECISION_HINT")),
            "num_streams": str(self._compiled.get_property("NUM_STREAMS")),
        }
        super().__init__(
            inputs[0].get_any_name(),
            tuple(inputs[0].get_shape()),
            [o.get_any_name() for o in self._compiled.outputs],
            settings,
        )

    def _run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        self._request.infer({0: images})
        return {
            name: self._request.get_output_tensor(i).data.copy() for i, name in enumerate(self.output_names)
        }

    def close(self) -> None:
        self._request = None
        self._compiled = None


def load(directory: Path, manifest: dict) -> Session:
    return OpenVINOSession(Path(directory) / manifest["files"]["backend"], BuildConfig.from_json(manifest["build"]),
                           extension=_extension(directory, manifest))


def _extension(directory: Path, manifest: dict) -> Optional[Path]:
    """The build's OpenVINO extension (``--fused-ops``), or None."""
    name = manifest["files"].get("extension")
    return Path(directory) / name if name else None


def profile_layers(directory: Path, manifest: dict, images: np.ndarray, *, warmup: int = 5, runs: int = 20) -> dict:
    """Run a build with OpenVINO's per-layer counters (``PERF_COUNT``) on ``images`` ``[B, 3, H, W]``.

    The CPU plugin's counters are a running mean over every inference of the compiled model, in
    whole microseconds (``get_profiling_info`` after each call shows a slowly moving average, not
    that call). The mean over the timed runs alone is therefore taken from the totals after the
    warm-up and after the last run: ``(mean_end * (warmup + runs) - mean_warm * warmup) / runs``
    (floor rounding costs under 1.5 us per layer). The compiled (runtime) model gives, per layer,
    the ONNX nodes it was fused from (``originalLayersNames``) and the layers feeding it.

    Returns:
        ``{"layers": [{name, type, ms, origins, inputs}, ...], "run_ms": [wall ms per timed run],
        "settings": {...}}``: ``ms`` is the layer's mean over the timed runs; wall time is
        ``perf_counter`` around ``infer`` (counters on).
    """
    import time

    session = OpenVINOSession(Path(directory) / manifest["files"]["backend"], BuildConfig.from_json(manifest["build"]),
                              perf_count=True, extension=_extension(directory, manifest))
    graph = {}
    for op in session._compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        origins = info["originalLayersNames"].astype(str) if "originalLayersNames" in info else ""
        graph[op.get_friendly_name()] = (
            tuple(o for o in origins.split(",") if o),
            tuple(i.get_source_output().get_node().get_friendly_name() for i in op.inputs()),
        )

    def means() -> dict:
        return {p.node_name: (p.node_type, p.real_time.total_seconds() * 1e3) for p in session._request.get_profiling_info()}

    images = np.ascontiguousarray(images, dtype=np.float32)
    for _ in range(warmup):
        session(images)
    warm = means() if warmup else {}
    run_ms = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        session(images)
        run_ms.append((time.perf_counter_ns() - t0) / 1e6)
    layers = []
    for name, (kind, mean_ms) in means().items():
        total = mean_ms * (warmup + runs) - warm.get(name, (kind, 0.0))[1] * warmup
        origins, inputs = graph.get(name, ((), ()))
        layers.append({"name": name, "type": kind, "ms": max(0.0, total / runs), "origins": origins, "inputs": inputs})
    settings = session.settings
    session.close()
    return {"layers": layers, "run_ms": run_ms, "settings": settings}
