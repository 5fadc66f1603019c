"""ONNX -> ONNX rewrites with onnx-graphsurgeon, registered once and run as a verified pipeline.

A pass is ``fn(graph: gs.Graph, **opts) -> gs.Graph`` registered with :func:`register_pass` under a
name, with the output tolerance it declares. :func:`run_pipeline` (in :mod:`.pipeline`) runs passes in
order and refuses any pass whose outputs move beyond that tolerance on the check inputs.
Adding a pass is one module plus one import line at the bottom of this file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import onnx_graphsurgeon as gs

PassFn = Callable[..., gs.Graph]


@dataclass(frozen=True)
class Pass:
    """A registered rewrite: ``fn``, the max abs output change it may cause, and what it does."""

    name: str
    fn: PassFn
    tolerance: float
    description: str


PASSES: dict[str, Pass] = {}


def register_pass(name: str, *, tolerance: float = 0.0) -> Callable[[PassFn], PassFn]:
    """Decorator: register ``fn`` as pass ``name`` (first docstring line = description).

    Raises:
        ValueError: ``name`` is already registered.
    """

    def wrap(fn: PassFn) -> PassFn:
        if name in PASSES:
            raise ValueError(f"pass {name!r} is already registered by {PASSES[name].fn.__module__}")
        doc = (fn.__doc__ or "").strip().splitlines()
        PASSES[name] = Pass(name, fn, tolerance, doc[0] if doc else "")
        return fn

    return wrap


#: Passes each backend's default pipeline runs, in order. merge-as-matmul: TensorRT 8.5 has no
#: scatter reduction and 10 needs a plugin. On the CPU backends (benchmarks/passes.py, DeiT-S ToMe
#: r=13, batch 1 and 8, 2 loaded cores) the MatMul form measured a median 1.01x (ONNX Runtime) and
#: 1.01-1.03x (OpenVINO) over the scatter form, inside run-to-run noise, the merge itself being
#: 0.5-2% of a run in either form: no win to take, so they keep the exported scatter. Re-measured
#: after the merge moved to row gathers (batch 1): 0.98x (OpenVINO), 0.97x (ONNX Runtime).
DEFAULT_PIPELINES: dict[str, tuple[str, ...]] = {
    "onnxruntime": ("fold-schedule",),
    "openvino": ("fold-schedule",),
    "tensorrt": ("fold-schedule", "merge-as-matmul"),
}
#: What TensorRT 8.5 (JetPack 5) needs on top: no LayerNormalization importer (8.6 adds it), TopK over
#: FP32/FP16 values only, operators read with opset-17 rules (Reduce axes as an attribute). After
#: these, DeiT-S with ToMe, EViT, Top-K and a folded evit-mass gate lints clean for tensorrt-8.5.
TENSORRT_8_5_PASSES: tuple = ("topk-float-values", "decompose-layernorm", ("downgrade-opset", {"opset": 17}))

from . import fold_schedule  # noqa: E402,F401
from . import merge_as_matmul  # noqa: E402,F401
from . import precision  # noqa: E402,F401
from . import fold_gates  # noqa: E402,F401
from . import decompose_layernorm  # noqa: E402,F401
from . import topk_float  # noqa: E402,F401
from . import downgrade_opset  # noqa: E402,F401
