"""The backend records: one :class:`Backend` per runtime, the single place that says what it offers.

The CLI's ``--backend`` / ``--precision`` choices, the build's pass pipeline and lint target, the
fidelity tolerances and the optional profiling hooks are all read from here. Adding a backend is its
module (``build``, ``load`` and the hooks it declares) plus one :func:`register_backend` call below;
``tests/test_backends.py`` checks every record against its module. Declaring a record imports nothing
of the backend's own library. No torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Mapping, Optional

from ..errors import SpecError
from ..metrics import Tolerance


@dataclass(frozen=True)
class Backend:
    """One runtime.

    Attributes:
        name: the ``--backend`` value and the manifest's ``build.backend``.
        module: the module providing ``build(onnx_path, out_dir, cfg) -> {"files", "versions"}`` and
            ``load(directory, manifest) -> Session``, imported on first use.
        tolerances: precision -> the tolerance of this backend's outputs against torch on real photos;
            its keys are the precisions a build offers.
        pipeline: the default pass steps (names registered in :mod:`vitfold.passes`, or ``(name, options)``).
        lint_target: the :mod:`vitfold.passes.lint` target; None where the installed version picks it
            (TensorRT: 8.5 / 10 / 11).
        files: the manifest ``files`` entries ``build`` writes (role -> file name).
        per_layer: the module has ``profile_layers(directory, manifest, images, *, warmup, runs)``.
        profile_extras: the module has ``profile_extras(sessions, images)`` (e.g. GPU event timing).
        needs_device: the module has ``check_available()``, run before any slow step.
        quantizer: how ``--precision int8`` is made (:data:`vitfold.quantize.QUANTIZERS`): ``nncf-openvino``
            (NNCF on the OpenVINO model), ``qdq-u8s8`` / ``qdq-s8s8`` (a Q/DQ ONNX from ONNX Runtime's
            quantizer: uint8 activations for x86 CPUs, or symmetric int8 as TensorRT requires).
        weight_modes: the ``--weights`` modes the backend builds (weight-only compression).
    """

    name: str
    module: str
    tolerances: Mapping[str, Tolerance]
    pipeline: tuple = ("fold-schedule",)
    lint_target: Optional[str] = None
    files: Mapping[str, str] = field(default_factory=dict)
    per_layer: bool = False
    profile_extras: bool = False
    needs_device: bool = False
    quantizer: Optional[str] = None
    weight_modes: tuple = ()

    @property
    def precisions(self) -> tuple[str, ...]:
        return tuple(self.tolerances)

    def tolerance(self, precision: str) -> Tolerance:
        """The tolerance against torch at ``precision``.

        Raises:
            SpecError: the backend does not build that precision (the message lists what it does).
        """
        if precision not in self.tolerances:
            raise SpecError(f"--precision {precision} is not built for {self.name}; choose "
                            f"{' or '.join(self.precisions)}")
        return self.tolerances[precision]

    def tolerance_for(self, cfg) -> Tolerance:
        """The tolerance of a build with settings ``cfg`` (a :class:`~vitfold.runtimes.BuildConfig`):
        weight-only compression has its own (:data:`WEIGHT_TOLERANCES`), else :meth:`tolerance`.

        Raises:
            SpecError: a precision or ``--weights`` mode this backend does not build.
        """
        tolerance = self.tolerance(cfg.precision)
        if cfg.weights is None:
            return tolerance
        if cfg.weights not in self.weight_modes:
            raise SpecError(f"--weights {cfg.weights} is not built for {self.name}; "
                            + (f"choose {' or '.join(self.weight_modes)}" if self.weight_modes else
                               "use --backend openvino (NNCF weight compression), or --precision int8"))
        return WEIGHT_TOLERANCES[cfg.weights]

    def load_module(self) -> ModuleType:
        """The backend's module (its own library is imported lazily inside, on build / load)."""
        return importlib.import_module(self.module)


BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Add ``backend`` to :data:`BACKENDS`.

    Raises:
        ValueError: the name is taken.
    """
    if backend.name in BACKENDS:
        raise ValueError(f"backend {backend.name!r} is already registered")
    BACKENDS[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    """The record of ``name``.

    Raises:
        SpecError: unknown backend (the message lists the registered ones).
    """
    if name not in BACKENDS:
        raise SpecError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
    return BACKENDS[name]


#: int8 vs the f32 torch model of the same variant, on real photos (DINOv2 ViT-S/14 features and
#: classification heads; figures in vitfold/quantize/__init__.py). Overridable per build
#: (``--min-cosine``, ``--min-top1``, ``--min-token-cosine``).
INT8 = Tolerance(max_abs=None, min_cosine=0.95, min_top1=0.8, min_token_cosine=0.95)

#: Weight-only compression (activations f32) vs the f32 torch model, per ``--weights`` mode.
WEIGHT_TOLERANCES = {
    "int8": Tolerance(max_abs=None, min_cosine=0.99, min_top1=0.9, min_token_cosine=0.99),
    "int4": Tolerance(max_abs=None, min_cosine=0.9, min_top1=0.6, min_token_cosine=0.9),
}

# Tolerances vs torch on real photos, per precision. f32: float summation order only (ONNX Runtime
# tighter than OpenVINO's fused kernels). bf16 keeps 7 mantissa bits: no max abs, cosine and a top-1
# floor. fp16 on TensorRT: no max abs, cosine 0.999 and top-1 agreement 100%.
# Pipelines: merge-as-matmul for TensorRT (8.5 has no scatter reduction and 10 needs a plugin). On the
# CPU backends (benchmarks/passes.py, DeiT-S ToMe r=13, batch 1 and 8, 2 loaded cores) the MatMul form
# measured a median 1.01x (ONNX Runtime) and 1.01-1.03x (OpenVINO) over the scatter form, inside
# run-to-run noise; re-measured after the merge moved to row gathers (batch 1): 0.98x (OpenVINO), 0.97x
# (ONNX Runtime). So they keep the exported scatter.
register_backend(Backend(
    name="openvino", module="vitfold.runtimes.openvino",
    tolerances={"f32": Tolerance(max_abs=1e-3, min_cosine=0.9999),
                "bf16": Tolerance(max_abs=None, min_cosine=0.99, min_top1=0.85), "int8": INT8},
    lint_target="openvino-cpu", files={"backend": "model.xml", "weights": "model.bin"}, per_layer=True,
    quantizer="nncf-openvino", weight_modes=("int8", "int4"),
))
register_backend(Backend(
    name="onnxruntime", module="vitfold.runtimes.ort",
    tolerances={"f32": Tolerance(max_abs=1e-4, min_cosine=0.99999), "int8": INT8},
    lint_target="onnxruntime-cpu", files={"backend": "model.ort.onnx"}, per_layer=True, quantizer="qdq-u8s8",
))
register_backend(Backend(
    name="tensorrt", module="vitfold.runtimes.tensorrt",
    tolerances={"f32": Tolerance(max_abs=1e-3, min_cosine=0.9999),
                "fp16": Tolerance(max_abs=None, min_cosine=0.999), "int8": INT8},
    pipeline=("fold-schedule", "merge-as-matmul"), lint_target=None, quantizer="qdq-s8s8",
    files={"backend": "model.engine", "engine_record": "engine.json"},
    per_layer=True, profile_extras=True, needs_device=True,
))
