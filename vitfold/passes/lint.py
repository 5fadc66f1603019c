"""lint (analysis): backend capability rules, written as data, checked on an ONNX graph.

Each target (a backend at a version) has a table of :class:`Rule` s in :data:`TARGETS`. A rule names
the op types it applies to (``()``: the graph as a whole; ``("*",)``: every node), a conjunction of
:class:`Check` s whose kinds come from a fixed set (:data:`NODE_CHECKS`, :data:`GRAPH_CHECKS`), a
severity (``error``: the backend refuses the graph or computes something else; ``warning``: it builds,
with a cost or a condition the message states) and a message that gives the fix. :func:`lint` returns
one :class:`Finding` per node (or graph fact) on which all of a rule's checks hold.

Sources. Every TensorRT rule cites where its claim comes from (``Rule.source``):
``operators.md 8.5`` is onnx-tensorrt ``docs/operators.md`` on ``release/8.5-GA`` ("TensorRT 8.5
supports operators up to Opset 17"); ``operators.md 10.x`` is the same file for TensorRT 10.15
("opset 9 to opset 24"), the newest table stored, used for 10.3 (JetPack 6) minus the ops the
onnx-tensorrt Changelog adds after 10.3 and for 11 plus the ops the 11.0 release adds;
``Changelog`` is onnx-tensorrt ``docs/Changelog.md``; the ScatterElements plugin is NVIDIA/TensorRT
``plugin/scatterElementsPlugin/README.md``. ONNX Runtime's IR version and opset limits are read off the
installed onnxruntime by loading a one-node model (:func:`onnxruntime_limits`; a table of measured
releases where it is not installed); its bfloat16 rule was measured with onnxruntime 1.31.1 and 1.32.0
(``tests/test_lint.py`` re-measures every ONNX Runtime rule against the installed version). No rule was checked on a TensorRT
device: the tables say what the parser documents, not what a device ran.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import numpy as np
import onnx

from ..errors import SpecError
from ..runtimes.backends import BACKENDS

SEVERITIES = ("error", "warning")


@dataclass(frozen=True)
class Check:
    """One predicate of a rule: ``kind`` (a key of :data:`NODE_CHECKS` or :data:`GRAPH_CHECKS`) and
    its parameters."""

    kind: str
    params: Mapping[str, Any] = field(default_factory=dict)


def check(kind: str, **params) -> Check:
    """``check("attr_not_in", attr="sorted", allowed=(1,), default=1)`` -> a :class:`Check`."""
    return Check(kind, params)


@dataclass(frozen=True)
class Rule:
    """A backend capability rule.

    Attributes:
        id: short name shown on each finding (``topk-k-limit``).
        ops: op types it applies to; ``("*",)`` every node, ``()`` the graph as a whole.
        checks: all must hold for a finding (node rules: node checks; graph rules: one graph check).
        severity: ``error`` or ``warning``.
        message: what is wrong and the fix.
        source: where the claim comes from.
    """

    id: str
    ops: tuple[str, ...]
    checks: tuple[Check, ...]
    severity: str
    message: str
    source: str


@dataclass(frozen=True)
class Finding:
    """One rule that holds on one node (``node``: its name) or graph fact (``node``: a tensor name or
    ``""``). ``message`` = ``detail`` (what was found on this node) + the rule's message (the fix)."""

    target: str
    rule: str
    severity: str
    node: str
    op_type: str
    message: str
    detail: str = ""

    def to_json(self) -> dict:
        return asdict(self)


# --- the graph view the checks read -------------------------------------------------------------

_DEFAULT_DOMAINS = ("", "ai.onnx")


class GraphView:
    """Read-only facts about a model: constants (initializers and ``Constant`` outputs), element
    types after shape inference, opset, IR version, graph inputs, model-local functions."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        try:
            inferred = onnx.shape_inference.infer_shapes(model)
        except Exception:  # noqa: BLE001 - lint still runs without types; dtype checks then stay silent
            inferred = model
        graph = inferred.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in _DEFAULT_DOMAINS), None)
        self.ir_version = model.ir_version
        self.inputs = [v for v in graph.input if v.name not in {i.name for i in graph.initializer}]
        self.functions = {(f.domain, f.name) for f in model.functions}
        self.dtypes: dict[str, int] = {}
        for value in list(graph.input) + list(graph.value_info) + list(graph.output):
            if value.type.HasField("tensor_type") and value.type.tensor_type.elem_type:
                self.dtypes[value.name] = value.type.tensor_type.elem_type
        self._initializers = {t.name: t for t in graph.initializer}
        for t in graph.initializer:
            self.dtypes[t.name] = t.data_type
        self._constant_nodes = {}
        for node in self.nodes():
            if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS:
                self._constant_nodes[node.output[0]] = node
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    self.dtypes[node.output[0]] = value.data_type

    def readers(self, tensor: str) -> list[onnx.NodeProto]:
        """The nodes that read ``tensor`` (top-level graph)."""
        if not hasattr(self, "_readers"):
            self._readers: dict[str, list] = {}
            for node in self.model.graph.node:
                for name in node.input:
                    self._readers.setdefault(name, []).append(node)
        return self._readers.get(tensor, [])

    def nodes(self) -> Iterator[onnx.NodeProto]:
        """Every node, subgraphs (If / Loop / Scan bodies) included."""

        def walk(graph: onnx.GraphProto):
            for node in graph.node:
                yield node
                for attr in node.attribute:
                    if attr.type == onnx.AttributeProto.GRAPH:
                        yield from walk(attr.g)
                    for sub in attr.graphs:
                        yield from walk(sub)

        return walk(self.model.graph)

    def is_constant(self, name: str) -> bool:
        """True for an initializer or the output of a ``Constant`` node (what TensorRT imports as weights)."""
        return name in self._initializers or name in self._constant_nodes

    def value(self, name: str) -> Optional[np.ndarray]:
        """The constant's value, or None when ``name`` is computed at run time (or unreadable)."""
        try:
            if name in self._initializers:
                return onnx.numpy_helper.to_array(self._initializers[name])
            node = self._constant_nodes.get(name)
            if node is not None and node.attribute:
                value = onnx.helper.get_attribute_value(node.attribute[0])
                return onnx.numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else np.asarray(value)
        except Exception:  # noqa: BLE001 - external data not loaded, odd encodings: treat as unknown
            return None
        return None

    def dtype(self, name: str) -> Optional[str]:
        """``FLOAT``, ``INT64``, ... or None when unknown."""
        code = self.dtypes.get(name)
        return onnx.TensorProto.DataType.Name(code) if code else None


def _node_input(node: onnx.NodeProto, index: int) -> Optional[str]:
    return node.input[index] if index < len(node.input) and node.input[index] else None


def _attr(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            value = onnx.helper.get_attribute_value(attr)
            return value.decode() if isinstance(value, bytes) else value
    return default


# --- check kinds: node checks return a detail string when they hold, None otherwise ---------------

def _op_not_in(view: GraphView, node, ops) -> Optional[str]:
    return node.op_type if node.domain in _DEFAULT_DOMAINS and node.op_type not in ops else None


def _domain_not_in(view: GraphView, node, domains) -> Optional[str]:
    if node.domain not in _DEFAULT_DOMAINS and node.domain not in domains and (node.domain, node.op_type) not in view.functions:
        return f"custom op {node.domain}::{node.op_type}"
    return None


def _domain_in(view: GraphView, node, domains, ops=None, not_ops=()) -> Optional[str]:
    """A node of one of ``domains`` (given ``ops``, of one of those op types; never of ``not_ops``)."""
    if node.domain not in domains or (ops is not None and node.op_type not in ops) or node.op_type in not_ops:
        return None
    return f"{node.domain}::{node.op_type}"


def _attr_not_in(view: GraphView, node, attr, allowed, default) -> Optional[str]:
    value = _attr(node, attr, default)
    return f"{attr}={value!r}" if value not in allowed else None


def _input_present(view: GraphView, node, index) -> Optional[str]:
    name = _node_input(node, index)
    return f"input {index} ({name}) is given" if name else None


def _input_not_constant(view: GraphView, node, index) -> Optional[str]:
    name = _node_input(node, index)
    if name and not view.is_constant(name):
        return f"input {index} ({name}) is computed at run time, not an initializer"
    return None


def _input_value_at_least(view: GraphView, node, index, limit) -> Optional[str]:
    name = _node_input(node, index)
    value = view.value(name) if name else None
    if value is not None and value.size and int(np.max(value)) >= limit:
        return f"input {index} = {int(np.max(value))} >= {limit}"
    return None


def _input_dtype_in(view: GraphView, node, index, dtypes) -> Optional[str]:
    names = [n for n in node.input if n] if index == "any" else [_node_input(node, index)]
    for name in names:
        dtype = view.dtype(name) if name else None
        if dtype in dtypes:
            return f"input {name} is {dtype}"
    return None


def _input_dtype_not_in(view: GraphView, node, index, dtypes) -> Optional[str]:
    name = _node_input(node, index)
    dtype = view.dtype(name) if name else None
    return f"input {index} ({name}) is {dtype}" if dtype is not None and dtype not in dtypes else None


def _zero_point_not_signed_zero(view: GraphView, node) -> Optional[str]:
    """Q/DQ not in TensorRT's form: a zero point that is absent (uint8 by the ONNX default), not
    INT8, or not all zeros."""
    name = _node_input(node, 2)
    if not name:
        return "no zero point (ONNX then quantizes to uint8)"
    dtype = view.dtype(name)
    if dtype is not None and dtype != "INT8":
        return f"zero point {name} is {dtype}"
    value = view.value(name)
    if value is not None and np.any(value != 0):
        return f"zero point {name} is not 0"
    return None


def _weight_axis_not_output_channel(view: GraphView, node) -> Optional[str]:
    """A per-channel DequantizeLinear of a constant weight whose axis is not the output-channel
    axis of the MatMul / Gemm / Conv reading it (MatMul ``[K, N]``: 1; Gemm: 0 with transB=1, else 1;
    Conv: 0)."""
    weight, scale = _node_input(node, 0), _node_input(node, 1)
    value, scales = (view.value(weight), view.value(scale)) if weight and scale else (None, None)
    if value is None or scales is None or scales.size <= 1:
        return None
    axis = int(_attr(node, "axis", 1)) % value.ndim
    for reader in view.readers(node.output[0]):
        if reader.op_type == "MatMul":
            want = value.ndim - 1
        elif reader.op_type == "Gemm":
            want = 0 if _attr(reader, "transB", 0) else 1
        elif reader.op_type in ("Conv", "ConvTranspose"):
            want = 0 if reader.op_type == "Conv" else 1
        else:
            continue
        if axis != want:
            return f"per-channel axis {axis} of a {list(value.shape)} weight read by {reader.op_type} {reader.name} (output channels: axis {want})"
    return None


# --- graph checks yield (subject, detail) for every fact that holds ------------------------------

def _opset_above(view: GraphView, max):  # noqa: A002 - the table's parameter name
    if view.opset is not None and view.opset > max:
        yield "", f"opset {view.opset} > {max}"


def _ir_version_above(view: GraphView, max):  # noqa: A002
    if view.ir_version > max:
        yield "", f"IR version {view.ir_version} > {max}"


def _ir_version_above_onnxruntime(view: GraphView):
    limits = onnxruntime_limits()
    if view.ir_version > limits.max_ir_version:
        yield "", f"IR version {view.ir_version} > {limits.max_ir_version} ({limits})"


def _opset_above_onnxruntime(view: GraphView):
    limits = onnxruntime_limits()
    if view.opset is not None and view.opset > limits.max_opset:
        yield "", f"opset {view.opset} > {limits.max_opset} ({limits})"


def _dynamic_input_dims(view: GraphView, skip_axes):
    for value in view.inputs:
        dims = value.type.tensor_type.shape.dim
        dynamic = [(axis, d.dim_param or "?") for axis, d in enumerate(dims)
                   if axis not in skip_axes and not d.HasField("dim_value")]
        if dynamic:
            yield value.name, "dynamic dims " + ", ".join(f"{axis}:{name}" for axis, name in dynamic)


def _tensor_dtype_in(view: GraphView, dtypes):
    by_dtype: dict[str, list[str]] = {}
    for name in view.dtypes:
        dtype = view.dtype(name)
        if dtype in dtypes:
            by_dtype.setdefault(dtype, []).append(name)
    for dtype, names in sorted(by_dtype.items()):
        shown = ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
        yield names[0], f"{len(names)} {dtype} tensor(s): {shown}"


#: Node check kinds: ``fn(view, node, **params) -> detail or None``.
NODE_CHECKS: dict[str, Callable[..., Optional[str]]] = {
    "op_not_in": _op_not_in,
    "domain_not_in": _domain_not_in,
    "domain_in": _domain_in,
    "attr_not_in": _attr_not_in,
    "input_present": _input_present,
    "input_not_constant": _input_not_constant,
    "input_value_at_least": _input_value_at_least,
    "input_dtype_in": _input_dtype_in,
    "input_dtype_not_in": _input_dtype_not_in,
    "zero_point_not_signed_zero": _zero_point_not_signed_zero,
    "weight_axis_not_output_channel": _weight_axis_not_output_channel,
}
#: Graph check kinds: ``fn(view, **params) -> iterator of (subject, detail)``.
GRAPH_CHECKS: dict[str, Callable[..., Iterator[tuple[str, str]]]] = {
    "opset_above": _opset_above,
    "ir_version_above": _ir_version_above,
    "ir_version_above_onnxruntime": _ir_version_above_onnxruntime,
    "opset_above_onnxruntime": _opset_above_onnxruntime,
    "dynamic_input_dims": _dynamic_input_dims,
    "tensor_dtype_in": _tensor_dtype_in,
}

# --- the tables ---------------------------------------------------------------------------------

_REDUCE = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
           "ReduceProd", "ReduceSum", "ReduceSumSquare")

#: "Supported: Y" rows of operators.md 8.5 (LayerNormalization, IsInf, Unique, Hardmax, ... are N).
TRT85_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu Clip
Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout Einsum
Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gemm GlobalAveragePool GlobalLpPool
GlobalMaxPool Greater GreaterOrEqual GridSample GRU HardSwish HardSigmoid Identity If ImageScaler
InstanceNormalization IsNaN LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul
Max MaxPool Mean MeanVarianceNormalization Min Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range
Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter ScatterElements
ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt
Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())
#: "Supported: Y" rows of operators.md 10.x (TensorRT 10.15).
_TRT1015_OPS = TRT85_OPS | frozenset("""
Attention BlackmanWindow CastLike DeformConv Gelu GroupNormalization HammingWindow HannWindow Hardmax IsInf
LayerNormalization Mish RMSNormalization RotaryEmbedding STFT TensorScatter
""".split())
#: TensorRT 10.3: the 10.15 table without what the Changelog adds later (window functions 10.4, STFT 10.5)
#: and the opset-23/24 ops (Attention, RMSNormalization, RotaryEmbedding, TensorScatter) of ONNX
#: releases after 10.3's parser (ONNX submodule updated to 1.17 only in 10.6).
TRT10_OPS = _TRT1015_OPS - frozenset(
    "BlackmanWindow HammingWindow HannWindow STFT Attention RMSNormalization RotaryEmbedding TensorScatter".split())
#: TensorRT 11: the 10.15 table plus Swish (11.0 release notes, "Parsers: Added support for Swish").
TRT11_OPS = _TRT1015_OPS | {"Swish"}

#: Ops whose output shape depends on the data (the gate of a dynamic token count).
_DATA_DEPENDENT = ("NonZero", "NonMaxSuppression", "Unique", "Compress")
_MERGE_FIX = "run the merge-as-matmul pass (a one-hot MatMul computes the same sum)"

# onnx-tensorrt Changelog 10.0 EA: "Added support for the reduction attribute in ScatterElements";
# 10.3: "Updated ScatterElements importer to use an updated plugin"; plugin README: "ScatterElements with
# reduce='none' is implemented in TRT core, not this plugin"; known issues: no BFLOAT16 / INT8 data.
_SCATTER_PLUGIN = Rule(
    "scatter-reduction-plugin", ("ScatterElements",),
    (check("attr_not_in", attr="reduction", allowed=("none",), default="none"),), "warning",
    "imported as the ScatterElements plugin (libnvinfer_plugin), not a core layer: the plugin library must be "
    f"loaded where the engine is built and run; to stay in core layers {_MERGE_FIX}",
    "onnx-tensorrt Changelog 10.0 EA + 10.3; NVIDIA/TensorRT plugin/scatterElementsPlugin/README.md")
_SCATTER_PLUGIN_DTYPE = Rule(
    "scatter-reduction-plugin-dtype", ("ScatterElements",),
    (check("attr_not_in", attr="reduction", allowed=("none",), default="none"),
     check("input_dtype_in", index=0, dtypes=("BFLOAT16", "INT8"))), "error",
    f"the ScatterElements plugin has no BFLOAT16 / INT8 kernels; keep the merge in fp32 or {_MERGE_FIX}",
    "NVIDIA/TensorRT plugin/scatterElementsPlugin/README.md, Known issues")
_SCATTERND_REDUCTION = Rule(
    "scatternd-reduction", ("ScatterND",),
    (check("attr_not_in", attr="reduction", allowed=("none",), default="none"),), "error",
    "TensorRT's scatter layer has no reduction for ScatterND; rewrite as ScatterElements + merge-as-matmul, or a MatMul",
    "operators.md 10.x (ScatterND: reduction other than none is not supported); onnx/onnx-tensorrt#957 (8.x ignores it)")
_UNSUPPORTED = "{target}'s ONNX parser has no importer for it; rewrite it with supported ops (or a plugin)"
#: vitfold's fused ops (``build --fused-ops``, :mod:`vitfold.native`): OpenVINO runs them with the extension.
_FUSED_DOMAIN = "vitfold"
#: The ops vitfold's ONNX Runtime library (vitfold/native/onnxruntime) implements.
_ORT_FUSED_OPS = ("ToMeMerge", "ToMeMergeWavg", "EViTPrune")
_FUSED_FIX = ("vitfold's fused reduction site (build --fused-ops), which runs on OpenVINO (the extension "
              "`python -m vitfold.native` compiles), on ONNX Runtime (its custom-op library) and on TensorRT 10+ "
              "(its plugins); build for this backend without --fused-ops (the graph form)")
_FUSED_ELSEWHERE = Rule(
    "fused-op", ("*",), (check("domain_in", domains=(_FUSED_DOMAIN,)),), "error", _FUSED_FIX,
    "vitfold/native: an OpenVINO extension, an ONNX Runtime custom-op library; the TensorRT plugins need "
    "TensorRT 10+ (IPluginV3)")
_CUSTOM_DOMAIN = Rule(
    "custom-domain", ("*",), (check("domain_not_in", domains=(_FUSED_DOMAIN,)),), "warning",
    "TensorRT imports ops outside the ONNX domain only as plugins registered under the same name",
    "onnx-tensorrt ModelImporter.cpp: no importer -> FallbackPluginImporter")
_TOPK_K_LIMIT = Rule(
    "topk-k-limit", ("TopK",), (check("input_value_at_least", index=1, limit=3840),), "error",
    "TensorRT's TopK layer takes K < 3840; select in stages (TopK of TopKs) or reduce the candidates first",
    "operators.md 10.x (TopK: K input must be less than 3840); TensorRT operator docs, TopK: k <= 3840")
_DATA_DEPENDENT_SHAPE = Rule(
    "data-dependent-shape", _DATA_DEPENDENT, (), "warning",
    "the output shape depends on the data: TensorRT allocates it at run time (output allocator), everything "
    "after it has dynamic shapes; fold the gate into a bounded static form (fold-gates: TopK to a capacity + mask)",
    "onnx-tensorrt Changelog 8.5 GA (NonZero added); operators.md 8.5 / 10.x")
_REDUCE_AXES_CONSTANT = Rule(
    "reduce-axes-constant", _REDUCE, (check("input_not_constant", index=1),), "error",
    "reduction axes must be an initializer; fold them (fold-schedule) or make them constant at export",
    "operators.md 10.x (Reduce*: axes must be an initializer); onnx-tensorrt reduceTensor: 'Axis input must be an initializer!'")
_CONTROL_FLOW = Rule(
    "control-flow", ("If", "Loop"), (), "warning",
    "data-dependent control flow: branch outputs may differ in shape and nothing after it folds; vitfold's "
    "export contract forbids it (trace with the dynamo exporter, keep gates as masks)",
    "DESIGN.md export contract; operators.md 10.x (If: branch outputs must have the same rank)")
_DOUBLE = Rule(
    "double", (), (check("tensor_dtype_in", dtypes=("DOUBLE",)),), "warning",
    "TensorRT casts DOUBLE down to FLOAT, clamping to +-FLT_MAX; cast to float32 in the model",
    "operators.md 8.5 / 10.x: limited support for DOUBLE")
_DYNAMIC_DIMS = Rule(
    "dynamic-dims", (), (check("dynamic_input_dims", skip_axes=(0,)),), "warning",
    "a dynamic dimension other than batch needs an optimisation profile (min/opt/max) at build time and slower "
    "kernels; export with static shapes (the schedule is static) or give the build a profile",
    "TensorRT developer guide, dynamic shapes")

#: TensorRT's explicit quantization (developer guide 8.5 - 11, "Explicit Quantization" / "Q/DQ
#: Layer-Placement Recommendations"): symmetric signed int8 only, so every Q/DQ needs an INT8 zero
#: point of 0; per-channel weight scales along the output-channel axis.
_QDQ_ZERO_POINT = Rule(
    "qdq-zero-point", ("QuantizeLinear", "DequantizeLinear"), (check("zero_point_not_signed_zero"),), "error",
    "TensorRT quantizes symmetrically to signed int8: give every Q/DQ an INT8 zero point of 0 (vitfold's "
    "qdq-s8s8 quantizer does; onnxruntime quantize_static with ActivationSymmetric and QInt8 activations)",
    "TensorRT developer guide, Working with Quantized Types: 'symmetric quantization ... signed INT8'")
_QDQ_WEIGHT_AXIS = Rule(
    "qdq-weight-axis", ("DequantizeLinear",), (check("weight_axis_not_output_channel"),), "error",
    "per-channel weight scales must run along the output channels (MatMul [K, N]: axis 1; Conv: axis 0); "
    "quantize the weights per output channel",
    "TensorRT developer guide, Explicit Quantization: per-channel weight quantization along the output-channel (K) axis")
_TRT_COMMON = (_QDQ_ZERO_POINT, _QDQ_WEIGHT_AXIS, _FUSED_ELSEWHERE, _CUSTOM_DOMAIN, _TOPK_K_LIMIT, _SCATTERND_REDUCTION, _DATA_DEPENDENT_SHAPE, _REDUCE_AXES_CONSTANT,
               _CONTROL_FLOW, _DOUBLE, _DYNAMIC_DIMS)

TRT85_RULES = (
    Rule("unsupported-op", ("*",), (check("op_not_in", ops=TRT85_OPS),), "error", _UNSUPPORTED,
         "operators.md 8.5 (LayerNormalization, IsInf: added in 8.6 EA, Changelog)"),
    Rule("opset", (), (check("opset_above", max=17),), "warning",
         "TensorRT 8.5 parses operators up to opset 17; ops whose signature changed later are read with the "
         "opset-17 rules (see reduce-axes-input); export at opset 17 or rewrite those ops",
         "operators.md 8.5: 'TensorRT 8.5 supports operators up to Opset 17'"),
    Rule("reduce-axes-input", tuple(op for op in _REDUCE if op != "ReduceSum"), (check("input_present", index=1),), "error",
         "axes as an input is opset 18; 8.5's importers read only the axes attribute of opset <= 17 (the input is "
         "ignored and every axis reduced): move the axes into the attribute (opset 17 form)",
         "operators.md 8.5 (opset <= 17); onnx-tensorrt reduceTensor reads attrs 'axes' (ReduceSum alone takes an input, opset 13)"),
    Rule("topk-sorted", ("TopK",), (check("attr_not_in", attr="sorted", allowed=(1,), default=1),), "warning",
         "TensorRT always returns TopK sorted, which sorted=0 allows, but the 10.x parser refuses sorted=0: set "
         "sorted=1 so the graph also builds on JetPack 6",
         "operators.md 10.x (TopK: sorted must be 1); not listed for 8.5"),
    Rule("topk-k-constant", ("TopK",), (check("input_not_constant", index=1),), "error",
         "K must be an initializer; run fold-schedule (a static schedule makes K constant) or export K as a constant",
         "operators.md 8.5 (TopK: K input must be an initializer); Changelog 8.6 EA adds dynamic K"),
    Rule("topk-input-dtype", ("TopK",), (check("input_dtype_not_in", index=0, dtypes=("FLOAT", "FLOAT16")),), "error",
         "TensorRT 8.5's TopK takes FP32/FP16 only (INT64 is cast to INT32, which its importer refuses): Cast the "
         "values to float first (exact below 2**24) or sort a float key",
         "operators.md 8.5 (TopK: FP32, FP16); onnx-tensorrt TopK importer asserts type != INT32; Changelog 8.6 EA adds INT32"),
    Rule("scatter-reduction", ("ScatterElements",),
         (check("attr_not_in", attr="reduction", allowed=("none",), default="none"),), "error",
         f"TensorRT 8.5 has no scatter reduction: its scatter layer overwrites, silently dropping the sum; {_MERGE_FIX}",
         "NVIDIA/TensorRT#2396 (reduction unsupported, feature request), #3750 (8.6 ignores reduction=add, wrong "
         "results); Changelog 10.0 EA adds it"),
    Rule("squeeze-axes-constant", ("Squeeze", "Unsqueeze"), (check("input_not_constant", index=1),), "error",
         "Squeeze / Unsqueeze axes must be an initializer (fold-schedule)",
         "operators.md 8.5 (Squeeze: axes must be an initializer; Unsqueeze: a constant tensor)"),
    Rule("slice-axes-constant", ("Slice",), (check("input_not_constant", index=3),), "error",
         "Slice axes must be an initializer (fold-schedule)", "operators.md 8.5 (Slice: axes must be an initializer)"),
    Rule("bfloat16", (), (check("tensor_dtype_in", dtypes=("BFLOAT16",)),), "error",
         "TensorRT 8.5 has no BF16 (added in 9.0); use fp16 or fp32", "operators.md 8.5 data types; Changelog 9.0 GA"),
    *_TRT_COMMON,
)

_TRT10_TOPK_K_RUNTIME = Rule(
    "topk-k-constant", ("TopK",), (check("input_not_constant", index=1),), "warning",
    "K computed at run time builds (TensorRT >= 8.6), but K < 3840 cannot be checked before it runs; fold it "
    "(fold-schedule) when the schedule is static", "Changelog 8.6 EA (dynamic K); operators.md 10.x (K < 3840)")
#: TensorRT 10+: vitfold's IPluginV3 plugins (vitfold/native/tensorrt) implement ToMeMerge and EViTPrune.
_TRT10_FUSED = (
    Rule("fused-op", ("*",), (check("domain_in", domains=(_FUSED_DOMAIN,), ops=("ToMeMerge", "EViTPrune")),), "warning",
         "parses only where vitfold's TensorRT plugin is loaded (`python -m vitfold.native tensorrt` compiles it on "
         "the GPU machine, with nvcc and the TensorRT headers; builds made with --fused-ops carry and load it); "
         "without it, build without --fused-ops",
         "vitfold/native/tensorrt (IPluginV3; onnx-tensorrt FallbackPluginImporter: plugin name = op_type, version 1)"),
    Rule("fused-op-no-plugin", ("*",), (check("domain_in", domains=(_FUSED_DOMAIN,), not_ops=("ToMeMerge", "EViTPrune")),),
         "error",
         "a vitfold op with no TensorRT plugin (vitfold/native/tensorrt has ToMeMerge and EViTPrune); build without --fused-ops",
         "vitfold/native/tensorrt"),
)
_TRT10_COMMON = (
    Rule("topk-sorted", ("TopK",), (check("attr_not_in", attr="sorted", allowed=(1,), default=1),), "error",
         "TensorRT's parser refuses TopK with sorted=0: set sorted=1 (TensorRT returns sorted results anyway)",
         "operators.md 10.x (TopK: sorted must be 1)"),
    _TRT10_TOPK_K_RUNTIME,
    Rule("topk-input-dtype", ("TopK",),
         (check("input_dtype_not_in", index=0, dtypes=("FLOAT", "FLOAT16", "BFLOAT16", "INT32", "INT64")),), "error",
         "TopK takes FP32/FP16/BF16/INT32/INT64 values; Cast them", "operators.md 10.x (TopK types)"),
    _SCATTER_PLUGIN, _SCATTER_PLUGIN_DTYPE,
    Rule("squeeze-axes-constant", ("Squeeze", "Unsqueeze"), (check("input_not_constant", index=1),), "warning",
         "axes must be resolvable to a constant at build time: fold them (fold-schedule)",
         "operators.md 10.x (Squeeze/Unsqueeze: axes must be resolvable to a constant)"),
    *_TRT10_FUSED,
    *(rule for rule in _TRT_COMMON if rule is not _FUSED_ELSEWHERE),
)
TRT10_RULES = (
    Rule("unsupported-op", ("*",), (check("op_not_in", ops=TRT10_OPS),), "error", _UNSUPPORTED,
         "operators.md 10.x minus the ops the Changelog adds after 10.3"),
    Rule("opset", (), (check("opset_above", max=20),), "warning",
         "newer than the opsets TensorRT 10.3's parser was written for (ONNX 1.16): export at opset <= 20",
         "operators.md 10.0-10.5 header (opset 9 to 20); Changelog 10.6 (ONNX 1.17)"),
    *_TRT10_COMMON,
)
TRT11_RULES = (
    Rule("unsupported-op", ("*",), (check("op_not_in", ops=TRT11_OPS),), "error", _UNSUPPORTED,
         "operators.md 10.x + TensorRT 11.0 release notes (Swish)"),
    Rule("opset", (), (check("opset_above", max=24),), "warning",
         "newer than the opsets TensorRT 11's parser documents: export at opset <= 24",
         "operators.md (TensorRT 11.2: opset 9 to 24; 11.5 adds 25)"),
    *_TRT10_COMMON,
)

#: TensorRT 8.6 (x86 wheels 8.6.1, JetPack 6.0 DP) and 9.x: between 8.5 and 10. 8.6 adds
#: LayerNormalization and IsInf, INT32 TopK and K computed at run time (Changelog 8.6 EA) and still
#: reads operators with opset-17 rules ("TensorRT 8.6 supports operators up to Opset 17", NVIDIA's
#: DLA-SW op support page for 8.6); 9.x adds BF16 (Changelog 9.0) and reads up to opset 19
#: (operators.md 9.2). Both lack the scatter reduction ToMe's merge exports (Changelog 10.0 EA adds
#: it; #3750: 8.6 ignores reduction=add).
TRT86_OPS = TRT85_OPS | {"LayerNormalization", "IsInf"}
_TRT86_SCATTER = Rule(
    "scatter-reduction", ("ScatterElements",), (check("attr_not_in", attr="reduction", allowed=("none",), default="none"),),
    "error", f"TensorRT before 10 has no scatter reduction (8.6 ignores it: wrong sums); {_MERGE_FIX}",
    "NVIDIA/TensorRT#3750 (8.6 ignores reduction=add); Changelog 10.0 EA adds it")
_TRT86_TOPK = (
    Rule("topk-sorted", ("TopK",), (check("attr_not_in", attr="sorted", allowed=(1,), default=1),), "warning",
         "set sorted=1 (TensorRT returns TopK sorted; the 10.x parser refuses sorted=0)",
         "operators.md 10.x (TopK: sorted must be 1)"),
    _TRT10_TOPK_K_RUNTIME,
    Rule("topk-input-dtype", ("TopK",), (check("input_dtype_not_in", index=0, dtypes=("FLOAT", "FLOAT16", "INT32", "INT64")),),
         "error", "TopK takes FP32/FP16/INT32 values (INT64 cast to INT32); Cast them", "Changelog 8.6 EA (INT32 TopK)"),
)
TRT86_RULES = (
    Rule("unsupported-op", ("*",), (check("op_not_in", ops=TRT86_OPS),), "error", _UNSUPPORTED,
         "operators.md 8.5 + Changelog 8.6 EA (LayerNormalization, IsInf)"),
    Rule("opset", (), (check("opset_above", max=17),), "warning",
         "TensorRT 8.6 parses operators up to opset 17; ops whose signature changed later are read with the "
         "opset-17 rules (see reduce-axes-input): run downgrade-opset to 17",
         "NVIDIA DLA-SW op support for 8.6: 'TensorRT 8.6 supports operators up to Opset 17'"),
    Rule("reduce-axes-input", tuple(op for op in _REDUCE if op != "ReduceSum"), (check("input_present", index=1),), "error",
         "axes as an input is opset 18; 8.6 reads only the axes attribute (opset <= 17): run downgrade-opset to 17",
         "opset 17 limit (above); onnx-tensorrt 8.6 reduceTensor reads attrs 'axes'"),
    *_TRT86_TOPK,
    _TRT86_SCATTER,
    Rule("bfloat16", (), (check("tensor_dtype_in", dtypes=("BFLOAT16",)),), "error",
         "TensorRT 8.6 has no BF16 (added in 9.0); use fp16 or fp32", "Changelog 9.0 GA"),
    *_TRT_COMMON,
)
TRT9_RULES = (
    Rule("unsupported-op", ("*",), (check("op_not_in", ops=TRT86_OPS),), "error", _UNSUPPORTED,
         "operators.md 8.5 + Changelog 8.6 EA; ops added in 9.x that vitfold's graphs do not use are not listed"),
    Rule("opset", (), (check("opset_above", max=19),), "warning",
         "newer than TensorRT 9's parser reads (opset 19): export at opset <= 19",
         "operators.md 9.2: 'TensorRT 9.2 supports operators up to Opset 19'"),
    *_TRT86_TOPK,
    _TRT86_SCATTER,
    *_TRT_COMMON,
)

@dataclass(frozen=True)
class RuntimeLimits:
    """The newest ONNX IR version and default-domain opset a runtime loads, and how that was learnt."""

    version: str
    max_ir_version: int
    max_opset: int
    source: str  # "probed" (the installed package loaded a one-node model) or "table" (ORT_MEASURED)

    def __str__(self) -> str:
        how = "probed" if self.source == "probed" else "not installed; newest measured release"
        return f"onnxruntime {self.version}: loads IR <= {self.max_ir_version}, opset <= {self.max_opset}, {how}"


#: (IR version, opset) limits measured here per onnxruntime release, for lint where it is not installed.
ORT_MEASURED = {"1.31": (13, 26), "1.32": (14, 28)}


def _loads(ort, ir_version: int, opset: int) -> bool:
    value = lambda name: onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "probe", [value("x")], [value("y")])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return True
    except Exception:  # noqa: BLE001 - any refusal counts
        return False


@functools.lru_cache(maxsize=1)
def onnxruntime_limits() -> RuntimeLimits:
    """What the installed onnxruntime loads, probed with a one-node Relu model (about 20 ms, once):
    the highest IR version (at opset 18) and opset (at IR 10) it accepts, searched down from three
    above what the installed onnx writes. Without onnxruntime: the newest release in :data:`ORT_MEASURED`."""
    try:
        import onnxruntime as ort
    except ImportError:
        release = max(ORT_MEASURED, key=lambda v: tuple(int(p) for p in v.split(".")))
        return RuntimeLimits(release, *ORT_MEASURED[release], "table")
    ir = next((v for v in range(onnx.IR_VERSION + 3, 2, -1) if _loads(ort, v, 18)), 0)
    opset = next((v for v in range(onnx.defs.onnx_opset_version() + 3, 6, -1) if _loads(ort, 10, v)), 0)
    return RuntimeLimits(ort.__version__, ir, opset, "probed")


#: Ops ONNX Runtime's CPU provider runs in bfloat16 (measured with 1.31 and 1.32); compute ops (MatMul, Add, Mul,
#: Softmax, Reduce*, Erf, Where, ...) have no bf16 kernel and fail at session creation.
ORT_CPU_BF16_OPS = frozenset("Cast CastLike Identity Reshape Transpose Concat Slice Gather GatherElements Unsqueeze "
                             "Squeeze Flatten LayerNormalization Shape Size".split())
ORT_RULES = (
    Rule("ir-version", (), (check("ir_version_above_onnxruntime"),), "error",
         "ONNX Runtime refuses this IR version: set model.ir_version lower (the pass pipeline clamps it)",
         "probed: the installed onnxruntime loads a one-node model at each IR version (ORT_MEASURED without it)"),
    Rule("opset", (), (check("opset_above_onnxruntime"),), "error",
         "ONNX Runtime refuses this opset: export at a lower opset",
         "probed: the installed onnxruntime loads a one-node model at each opset (ORT_MEASURED without it)"),
    Rule("bfloat16-cpu", ("*",),
         (check("op_not_in", ops=ORT_CPU_BF16_OPS), check("input_dtype_in", index="any", dtypes=("BFLOAT16",))), "error",
         "ONNX Runtime's CPU provider has no bfloat16 kernel for this op (NOT_IMPLEMENTED at load): keep it in "
         "fp32 (precision pass islands) or build with --precision f32",
         "measured: onnxruntime 1.31.1 CPU (MatMul, Add, Mul, Softmax, ReduceMax, Erf, Where refuse bf16)"),
    Rule("fused-op", ("*",), (check("domain_in", domains=(_FUSED_DOMAIN,), ops=_ORT_FUSED_OPS),), "warning",
         "runs only where vitfold's ONNX Runtime op library is registered (`python -m vitfold.native onnxruntime` "
         "compiles it against ONNX Runtime's C API header, ONNXRUNTIME_ROOT; builds made with --fused-ops carry "
         "and load it); without it, build without --fused-ops",
         "vitfold/native/onnxruntime (RegisterCustomOps: domain vitfold, CPU execution provider)"),
    Rule("fused-op-no-kernel", ("*",), (check("domain_in", domains=(_FUSED_DOMAIN,), not_ops=_ORT_FUSED_OPS),),
         "error", "a vitfold op that vitfold's ONNX Runtime op library does not implement (it has ToMeMerge, "
         "ToMeMergeWavg and EViTPrune); build without --fused-ops", "vitfold/native/onnxruntime"),
    Rule("custom-domain", ("*",), (check("domain_not_in", domains=("com.microsoft", "ai.onnx.ml", _FUSED_DOMAIN)),), "error",
         "ONNX Runtime has no kernel for ops outside the ONNX, ai.onnx.ml and com.microsoft domains without a "
         "custom-op library", "onnxruntime operator kernels"),
    _CONTROL_FLOW,
)
OPENVINO_RULES = (
    _CONTROL_FLOW,
    Rule("fused-op", ("*",), (check("domain_in", domains=(_FUSED_DOMAIN,)),), "warning",
         "runs only where vitfold's OpenVINO extension is loaded (`python -m vitfold.native` compiles it; "
         "builds made with --fused-ops carry and load it); without it, build without --fused-ops",
         "vitfold/native/openvino/ (OpenVINO OpExtension + ONNX frontend OpExtension per op)"),
)

#: Rules per target. TensorRT targets: 8.5 (JetPack 5), 8.6 (x86 8.6.1, JetPack 6.0 DP), 9, 10 (JetPack 6
#: ships 10.3), 11.
TARGETS: dict[str, tuple[Rule, ...]] = {
    "tensorrt-8.5": TRT85_RULES,
    "tensorrt-8.6": TRT86_RULES,
    "tensorrt-9": TRT9_RULES,
    "tensorrt-10": TRT10_RULES,
    "tensorrt-11": TRT11_RULES,
    "openvino-cpu": OPENVINO_RULES,
    "onnxruntime-cpu": ORT_RULES,
}



def target_for(backend: str, trt_version: Optional[str] = None) -> str:
    """The lint target of a backend: ``("tensorrt", "10.3")`` -> ``tensorrt-10``, ``("tensorrt", "8.5.2")``
    -> ``tensorrt-8.5``, ``("openvino", None)`` -> ``openvino-cpu``; a target name passes through.

    Raises:
        SpecError: unknown backend, or a TensorRT version without rules (the message lists the targets).
    """
    if backend in TARGETS:
        return backend
    if backend in BACKENDS and BACKENDS[backend].lint_target is not None:
        return BACKENDS[backend].lint_target
    if backend == "tensorrt":
        version = str(trt_version or "10")
        parts = version.split(".")
        for candidate in (f"tensorrt-{parts[0]}.{parts[1]}" if len(parts) > 1 else None, f"tensorrt-{parts[0]}"):
            if candidate in TARGETS:
                return candidate
        raise SpecError(f"no lint rules for TensorRT {version}; targets: {', '.join(TARGETS)} "
                        "(JetPack 5 = 8.5, JetPack 6 = 10; 8.5 is the oldest TensorRT vitfold builds for)")
    raise SpecError(f"unknown backend {backend!r} for lint; backends: {', '.join(BACKENDS)}; "
                    f"targets: {', '.join(TARGETS)}")


def load_onnx(path: Union[str, Path]) -> onnx.ModelProto:
    """Read an ONNX file (never modified).

    Raises:
        SpecError: the file is missing, not an ONNX model, or has no graph nodes.
    """
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path} does not exist")
    try:
        model = onnx.load(str(path))
    except (DecodeError, OSError, ValueError) as exc:
        raise SpecError(f"{path} is not an ONNX model ({type(exc).__name__}: {exc})") from exc
    if not model.graph.node:
        raise SpecError(f"{path} is not an ONNX model (no graph nodes)")
    return model


def _holds(rule: Rule, view: GraphView, node) -> Optional[str]:
    details = []
    for c in rule.checks:
        detail = NODE_CHECKS[c.kind](view, node, **c.params)
        if detail is None:
            return None
        details.append(detail)
    return "; ".join(details) or node.op_type


def lint(model: Union[onnx.ModelProto, GraphView, str, Path], target: str) -> list[Finding]:
    """Check ``model`` against ``target``'s rules; errors first, then warnings, in node order.

    Args:
        model: a ``ModelProto``, a :class:`GraphView` of one (reused across targets), or the path of
            an ONNX file (read, never modified).
        target: a key of :data:`TARGETS` (see :func:`target_for` for backend names).

    Raises:
        SpecError: unknown target (the message lists them), or a path that is not an ONNX model.
    """
    if target not in TARGETS:
        raise SpecError(f"unknown lint target {target!r}; targets: {', '.join(TARGETS)}")
    if isinstance(model, GraphView):
        view = model
    else:
        view = GraphView(model if isinstance(model, onnx.ModelProto) else load_onnx(model))
    findings = []
    for rule in TARGETS[target]:
        message = rule.message.format(target=target)
        if not rule.ops:
            kind = rule.checks[0]
            for subject, detail in GRAPH_CHECKS[kind.kind](view, **kind.params):
                findings.append(Finding(target, rule.id, rule.severity, subject, "", f"{detail}: {message}", detail))
            continue
        for index, node in enumerate(view.nodes()):
            if rule.ops != ("*",) and (node.op_type not in rule.ops or node.domain not in _DEFAULT_DOMAINS):
                continue
            detail = _holds(rule, view, node)
            if detail is not None:
                name = node.name or f"#{index} ({node.op_type})"
                findings.append(Finding(target, rule.id, rule.severity, name, node.op_type, f"{detail}: {message}", detail))
    order = {node.name: i for i, node in enumerate(view.nodes())}
    return sorted(findings, key=lambda f: (SEVERITIES.index(f.severity), order.get(f.node, -1)))


def errors(findings: list[Finding]) -> list[Finding]:
    """The findings of severity ``error``."""
    return [f for f in findings if f.severity == "error"]


def summary(findings: list[Finding]) -> dict[str, int]:
    """Finding count per ``severity:rule``, e.g. ``{"error:scatter-reduction": 12}``."""
    counts: dict[str, int] = {}
    for f in findings:
        key = f"{f.severity}:{f.rule}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def require_clean(path: Union[str, Path], target: str) -> list[Finding]:
    """Lint ``path`` for ``target`` before a backend build; returns the warnings.

    Raises:
        PassError: any error finding (the message names node and rule of each, up to 5, and the fix).
    """
    from ..errors import PassError

    findings = lint(path, target)
    bad = errors(findings)
    if bad:
        shown = "; ".join(f"{f.node} ({f.op_type or 'graph'}) [{f.rule}]: {f.message}" for f in bad[:5])
        more = f"; +{len(bad) - 5} more (deploy.py inspect shows all)" if len(bad) > 5 else ""
        raise PassError(f"{path} is not buildable for {target}: {shown}{more}")
    return findings
