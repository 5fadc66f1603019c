"""ONNX Runtime backend (CPU execution provider by default). Imports only onnxruntime + numpy."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .base import BuildConfig, Session

ARTIFACT = "model.ort.onnx"
#: Highest ONNX IR version this ONNX Runtime (1.31) loads; newer onnx stamps models with 14.
MAX_IR_VERSION = 10


def _ort():
    from . import require

    return require("onnxruntime", "pip install onnxruntime")


def session_options(cfg: BuildConfig, optimized_path: Path | None = None):
    """Session options with every speed setting explicit (threads, sequential execution)."""
    ort = _ort()
    options = ort.SessionOptions()
    options.intra_op_num_threads = cfg.resolved_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    if optimized_path is not None:
        # Extended (not "all") keeps the saved graph portable across CPUs; layout-specific
        # rewrites are redone at load time.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(optimized_path)
    else:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


def providers() -> list[str]:
    return ["CPUExecutionProvider"]


def build(onnx_path: Path, out_dir: Path, cfg: BuildConfig) -> dict:
    """Optimise ``onnx_path`` with ONNX Runtime and save it as ``model.ort.onnx`` in ``out_dir``.

    Raises:
        BackendUnavailable: onnxruntime is not installed.
        SpecError: precision other than f32 (ONNX Runtime runs the graph's own precision).
    """
    from ..errors import SpecError

    ort = _ort()
    if cfg.precision != "f32":
        raise SpecError("ONNX Runtime CPU runs the graph's precision; use --precision f32 with --backend onnxruntime")
    ort.InferenceSession(str(onnx_path), session_options(cfg, out_dir / ARTIFACT), providers=providers())
    return {"files": {"backend": ARTIFACT}, "versions": {"onnxruntime": ort.__version__}}


class OrtSession(Session):
    backend = "onnxruntime"

    def __init__(self, path: Path, cfg: BuildConfig):
        ort = _ort()
        self._session = ort.InferenceSession(str(path), session_options(cfg), providers=providers())
        inputs = self._session.get_inputs()
        settings = {
            "backend": self.backend,
            "onnxruntime": ort.__version__,
            "providers": self._session.get_providers(),
            "intra_op_threads": cfg.resolved_threads,
            "inter_op_threads": 1,
            "precision": cfg.precision,
            "graph_optimization": "all",
        }
        super().__init__(inputs[0].name, tuple(inputs[0].shape), [o.name for o in self._session.get_outputs()], settings)

    def _run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        values = self._session.run(self.output_names, {self.input_name: images})
        return dict(zip(self.output_names, values))


def load(directory: Path, manifest: dict) -> Session:
    return OrtSession(Path(directory) / manifest["files"]["backend"], BuildConfig.from_json(manifest["build"]))


def run_onnx(path: Path, batches: Sequence[np.ndarray], threads: int | None = None) -> list[dict[str, np.ndarray]]:
    """Run an ONNX file on each ``[B, 3, H, W]`` batch with one CPU session (export checks, passes)."""
    session = OrtSession(Path(path), BuildConfig(backend="onnxruntime", threads=threads))
    return [session._run(np.ascontiguousarray(batch, dtype=np.float32)) for batch in batches]
