"""ONNX -> ONNX rewrites with onnx-graphsurgeon, registered once and run as a verified pipeline.

A pass is ``fn(graph: gs.Graph, **opts) -> gs.Graph`` registered with :func:`register_pass` under a
name, with the output tolerance it declares. Each backend's default pipeline is in its record
(:mod:`vitfold.runtimes.backends`). :func:`run_pipeline` (in :mod:`.pipeline`) runs passes in
order and refuses any pass whose outputs move beyond that tolerance on the check inputs.
Adding a pass is one module (registering itself through :mod:`._registry`) plus one import line at
the bottom of this file.
"""

from __future__ import annotations

from ._registry import PASSES, Pass, PassFn, register_pass  # noqa: F401 (the package's API)

#: What TensorRT 8.5 (JetPack 5) needs on top: no LayerNormalization importer (8.6 adds it), TopK over
#: FP32/FP16 values only, operators read with opset-17 rules (Reduce axes as an attribute). After
#: these, DeiT-S with ToMe, EViT, Top-K and a folded evit-mass gate lints clean for tensorrt-8.5.
TENSORRT_8_5_PASSES: tuple = ("topk-float-values", "decompose-layernorm", ("downgrade-opset", {"opset": 17}))

from . import fold_schedule  # noqa: F401
from . import merge_as_matmul  # noqa: F401
from . import precision  # noqa: F401
from . import fold_gates  # noqa: F401
from . import decompose_layernorm  # noqa: F401
from . import topk_float  # noqa: F401
from . import downgrade_opset  # noqa: F401
