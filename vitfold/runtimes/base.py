"""The runtime interface: ``BuildConfig`` in, ``Session`` out. No torch, no onnx-graphsurgeon.

A backend module provides ``build(onnx_path, out_dir, cfg) -> dict`` (files written + settings, for
the manifest) and ``load(directory, manifest) -> Session``. Input checks live here, once; backends
implement only ``_run``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from ..errors import SpecError

PRECISIONS = ("f32", "bf16", "fp16", "int8")
#: Weight-only compression modes (``--weights``): weights stored in int8 / int4, activations at ``precision``.
WEIGHT_MODES = ("int8", "int4")


@dataclass(frozen=True)
class BuildConfig:
    """Every speed-relevant setting of a backend build, recorded in the manifest and reports.

    Attributes:
        backend: ``onnxruntime`` | ``openvino`` | ``tensorrt``.
        precision: inference precision, ``f32`` (parity), ``bf16``, ``fp16`` or ``int8`` (weights and
            activations quantized after calibration, :mod:`vitfold.quantize`).
        weights: weight-only compression (``int8`` | ``int4``), activations at ``precision``; None: none.
        threads: CPU inference threads; None means one per core (``os.cpu_count()``).
        hint: OpenVINO performance hint (``LATENCY`` | ``THROUGHPUT``).
        cache_dir: backend compile cache (OpenVINO model cache, TensorRT timing cache); None: none.
        extra: backend-specific options (e.g. TensorRT workspace), passed through.
    """

    backend: str = "openvino"
    precision: str = "f32"
    weights: Optional[str] = None
    threads: Optional[int] = None
    hint: str = "LATENCY"
    cache_dir: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise SpecError(f"precision {self.precision!r} unknown; choose one of {', '.join(PRECISIONS)}")
        if self.weights is not None and self.weights not in WEIGHT_MODES:
            raise SpecError(f"--weights {self.weights!r} unknown; choose one of {', '.join(WEIGHT_MODES)}")
        if self.weights is not None and self.precision == "int8":
            raise SpecError("--precision int8 already stores the weights in int8; drop --weights, or use it with "
                            "--precision f32 / bf16 for weight-only compression")
        if self.threads is not None and self.threads < 1:
            raise SpecError(f"threads must be >= 1, got {self.threads}")

    @property
    def resolved_threads(self) -> int:
        return self.threads or os.cpu_count() or 1

    @property
    def quantized(self) -> bool:
        """Whether the build has a quantize stage (int8, or weight-only compression)."""
        return self.precision == "int8" or self.weights is not None

    @property
    def label(self) -> str:
        """``int8``, ``f32``, ``f32-w4`` (weights int4, activations f32): for names and tables."""
        return self.precision + (f"-w{self.weights[3:]}" if self.weights else "")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "BuildConfig":
        return cls(**{"weights": None, **data})


class Session:
    """A loaded model: ``session(images [B, 3, H, W] float32) -> {output name: np.ndarray}``.

    Attributes:
        input_name / input_shape: the graph's single image input and its static shape.
        output_names: graph outputs in order.
        settings: backend settings actually in force (threads, hint, precision, versions).
    """

    backend = "base"

    def __init__(self, input_name: str, input_shape: tuple[int, ...], output_names: list[str], settings: dict):
        self.input_name = input_name
        self.input_shape = tuple(input_shape)
        self.output_names = list(output_names)
        self.settings = settings

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """Run one batch.

        Raises:
            SpecError: wrong dtype, rank or shape (names the expected shape).
        """
        images = np.asarray(images)
        if images.dtype != np.float32:
            raise SpecError(f"images must be float32, got {images.dtype}")
        if images.shape != self.input_shape:
            raise SpecError(
                f"images have shape {images.shape}; this build takes {self.input_shape} "
                f"(batch, channels, height, width). Rebuild with --batch/--img-size to change it."
            )
        return self._run(np.ascontiguousarray(images))

    def _run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        """Release backend resources."""

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
