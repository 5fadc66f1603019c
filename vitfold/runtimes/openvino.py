"""OpenVINO backend (CPU). Imports only openvino + numpy.

Build: ``convert_model`` from the ONNX file, ``save_model`` to IR with weights kept in f32
(``compress_to_fp16=False``: the default would silently halve the weights). Load: compile with an
explicit performance hint, thread count and ``INFERENCE_PRECISION_HINT`` (f32 unless bf16/fp16 is
asked for: CPUs with avx512_bf16 / AMX otherwise run bf16 and differ from torch by 1e-2).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import BuildConfig, Session

XML, BIN = "model.xml", "model.bin"
_PRECISION = {"f32": "f32", "bf16": "bf16", "fp16": "f16"}


def _ov():
    from . import require

    return require("openvino", 'pip install "vitfold[openvino]"  (or: pip install openvino)')


def build(onnx_path: Path, out_dir: Path, cfg: BuildConfig) -> dict:
    """Convert ``onnx_path`` to OpenVINO IR (``model.xml`` + ``model.bin``) in ``out_dir``.

    Raises:
        BackendUnavailable: openvino is not installed.
    """
    ov = _ov()
    model = ov.convert_model(str(onnx_path))
    ov.save_model(model, str(out_dir / XML), compress_to_fp16=False)
    return {"files": {"backend": XML, "weights": BIN}, "versions": {"openvino": ov.get_version()}}


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

    def __init__(self, xml: Path, cfg: BuildConfig, device: str = "CPU"):
        ov = _ov()
        core = ov.Core()
        config = compile_config(cfg)
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
    return OpenVINOSession(Path(directory) / manifest["files"]["backend"], BuildConfig.from_json(manifest["build"]))
