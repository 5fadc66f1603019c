"""precision: a float32 graph as fp16 or bf16, with float32 islands where low precision hurts.

For backends that take precision from the graph rather than a builder flag (TensorRT 11 strongly
typed networks), the graph itself must say which tensors are fp16 / bf16. Everything runs in the low
type except these islands, kept in float32 with Casts at their boundaries:

* normalisation and softmax: LayerNormalization (and its decomposition ReduceMean -> Sub -> Pow ->
  ReduceMean -> Add -> Sqrt -> Div [-> Mul -> Add], matched by structure), Group/Instance norm,
  Softmax, LogSoftmax;
* every reduction (Reduce*, and ScatterElements / ScatterND with a reduction: ToMe's size-weighted
  sum; ONNX Runtime CPU has no fp16 scatter-add kernel either), Sqrt and Pow (squares overflow fp16
  above 256);
* decisions: TopK, ArgMax, ArgMin and what feeds them, i.e. ToMe's similarity metric (normalised
  keys, the score MatMul, its mask and ReduceMax; Bolya et al., ICLR 2023, Sec. 3) and EViT's
  class-attention ranking. The walk back from a decision stops at a layer with weights (a MatMul /
  Gemm / Conv with a constant operand, left in low precision), at a normalisation, and at an
  averaging reduction (ReduceMean / ReduceSum / ReduceL2 ..., itself kept in float32); it passes
  through ReduceMax / ReduceMin, which select rather than accumulate;
* ops whose ONNX schema (at the graph's opset) has no fp16 / bf16 type for a float input or output
  (e.g. Range), ops of other domains, and ops with a float dtype attribute (EyeLike, Random*).

Float initializers are stored in the type of their consumers (one copy per type when both use them;
fp16 values beyond +-65504 are clamped to the largest finite fp16, logged). Graph inputs and outputs
stay float32 with a Cast at the edge, so runtimes keep a float32 interface. Tolerances (vs the
float32 graph, per precision) are :data:`vitfold.metrics.TOLERANCES` ``precision-pass:fp16`` /
``precision-pass:bf16``.
"""

from __future__ import annotations

import logging
from typing import Iterable

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..metrics import TOLERANCES, Tolerance
from ._registry import register_pass
from .merge_as_matmul import onnx_dtype

log = logging.getLogger(__name__)

#: precision option -> (numpy dtype, ONNX enum, ONNX schema type string).
LOW_TYPES = {
    "fp16": (np.dtype(np.float16), onnx.TensorProto.FLOAT16, "tensor(float16)"),
    "bf16": (np.dtype(ml_dtypes.bfloat16), onnx.TensorProto.BFLOAT16, "tensor(bfloat16)"),
}
FLOAT = onnx.TensorProto.FLOAT

NORMALISATIONS = {"LayerNormalization", "GroupNormalization", "InstanceNormalization", "BatchNormalization",
                  "Softmax", "LogSoftmax"}
#: Reductions that select one element (passed through by the decision walk) vs accumulate (stop it).
SELECTING = {"ReduceMax", "ReduceMin"}
REDUCTIONS = SELECTING | {"ReduceMean", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
                          "ReduceLogSumExp", "ReduceSumSquare"}
DECISIONS = {"TopK", "ArgMax", "ArgMin"}
#: Op types always kept in float32.
FP32_OPS = NORMALISATIONS | REDUCTIONS | DECISIONS | {"Sqrt", "Pow"}
#: Ops whose float output type comes from an attribute this pass does not rewrite.
_TYPED_BY_ATTRIBUTE = {"EyeLike", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                       "Multinomial", "Bernoulli"}


def precision_tolerance(precision: str = "fp16") -> Tolerance:
    """The harness tolerance of the pass for ``precision`` (logit cosine / top-1 vs the float32 graph)."""
    return TOLERANCES[f"precision-pass:{precision}"]


def _is_float32(tensor: gs.Tensor) -> bool:
    return bool(tensor.name) and tensor.dtype is not None and onnx_dtype(tensor.dtype) == FLOAT


def _producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def _has_weights(node: gs.Node) -> bool:
    """A learned layer: a float constant operand of rank >= 2 (MatMul / Gemm / Conv weights)."""
    return any(isinstance(t, gs.Constant) and _is_float32(t) and t.values.ndim >= 2 for t in node.inputs)


def _constant_scalar(tensor: gs.Tensor, value: float | None = None) -> bool:
    if not isinstance(tensor, gs.Constant) or tensor.values.size != 1:
        return False
    return value is None or float(tensor.values.reshape(-1)[0]) == value


def _only_consumer(tensor: gs.Tensor, op: str) -> gs.Node | None:
    nodes = [n for n in tensor.outputs if n.op == op]
    return nodes[0] if len(nodes) == 1 else None


def layernorm_chains(graph: gs.Graph) -> list[list[gs.Node]]:
    """Decomposed layer norms, matched by structure: ``ReduceMean -> Sub -> Pow(2) | Mul(d, d) ->
    ReduceMean -> Add(eps) -> Sqrt -> Div`` plus a trailing ``Mul(gamma) -> Add(beta)`` when present.

    Returns:
        The nodes of each chain found, ``[[node, ...], ...]``.
    """
    chains = []
    for mean in (n for n in graph.nodes if n.op == "ReduceMean"):
        x = mean.inputs[0]
        sub = next((n for n in mean.outputs[0].outputs if n.op == "Sub" and n.inputs[0] is x), None)
        if sub is None:
            continue
        diff = sub.outputs[0]
        square = next((n for n in diff.outputs if (n.op == "Pow" and _constant_scalar(n.inputs[1], 2.0))
                       or (n.op == "Mul" and n.inputs[0] is diff and n.inputs[1] is diff)), None)
        var = _only_consumer(square.outputs[0], "ReduceMean") if square is not None else None
        add = _only_consumer(var.outputs[0], "Add") if var is not None else None
        sqrt = _only_consumer(add.outputs[0], "Sqrt") if add is not None else None
        div = _only_consumer(sqrt.outputs[0], "Div") if sqrt is not None else None
        if div is None or div.inputs[0] is not diff:
            continue
        chain = [mean, sub, square, var, add, sqrt, div]
        scale = _only_consumer(div.outputs[0], "Mul")
        if scale is not None and len(div.outputs[0].outputs) == 1 and any(isinstance(t, gs.Constant) for t in scale.inputs):
            chain.append(scale)
            shift = _only_consumer(scale.outputs[0], "Add")
            if shift is not None and len(scale.outputs[0].outputs) == 1 and any(isinstance(t, gs.Constant) for t in shift.inputs):
                chain.append(shift)
        chains.append(chain)
    return chains


def _decision_slice(decisions: Iterable[gs.Node]) -> set[int]:
    """Ids of the nodes feeding TopK / ArgMax / ArgMin up to weights, normalisations or accumulating
    reductions (see the module docstring)."""
    kept: set[int] = set()
    stack = list(decisions)
    while stack:
        node = stack.pop()
        if id(node) in kept:
            continue
        kept.add(id(node))
        if node.op in NORMALISATIONS or (node.op in REDUCTIONS and node.op not in SELECTING):
            continue
        for tensor in node.inputs:
            producer = _producer(tensor)
            if producer is not None and _is_float32(tensor) and not _has_weights(producer):
                stack.append(producer)
    return kept


def _schema_allows(node: gs.Node, opset: int, low_type: str) -> bool:
    """True when ``node``'s ONNX schema admits the low type for each of its float32 inputs/outputs."""
    try:
        schema = onnx.defs.get_schema(node.op, opset, node.domain or "")
    except onnx.defs.SchemaError:
        return False
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}

    def ok(formals, actuals) -> bool:
        for index, tensor in enumerate(actuals):
            if not _is_float32(tensor) or not formals:
                continue
            type_str = formals[min(index, len(formals) - 1)].type_str
            if low_type not in allowed.get(type_str, {type_str}):
                return False
        return True

    return ok(schema.inputs, node.inputs) and ok(schema.outputs, node.outputs)


def fp32_nodes(graph: gs.Graph, precision: str = "fp16") -> set[int]:
    """Ids of the nodes the pass keeps in float32 for ``precision`` (the islands)."""
    low_type = LOW_TYPES[precision][2]
    keep = {id(n) for n in graph.nodes if n.op in FP32_OPS or n.op in _TYPED_BY_ATTRIBUTE or n.domain
            or (n.op in ("ScatterElements", "ScatterND") and n.attrs.get("reduction", "none") != "none")
            or any(isinstance(v, gs.Graph) for v in n.attrs.values())  # If / Loop bodies stay as they are
            or not _schema_allows(n, graph.opset, low_type)}
    keep |= {id(n) for chain in layernorm_chains(graph) for n in chain}
    keep |= _decision_slice(n for n in graph.nodes if n.op in DECISIONS)
    for node in graph.nodes:
        if node.op == "Constant" and not isinstance(node.attrs.get("value"), gs.Constant):
            keep.add(id(node))  # value_float(s) attributes: leave the node, cast its consumers
    return keep


def _low_values(values: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
    if dtype == np.float16:
        limit = float(np.finfo(np.float16).max)
        finite = np.isfinite(values)
        if np.any(finite & (np.abs(values) > limit)):
            log.warning("precision: constant %s has values beyond +-%g; clamped to the largest finite fp16", name, limit)
            values = np.where(finite, np.clip(values, -limit, limit), values)
    return values.astype(dtype)


@register_pass("precision", tolerance=precision_tolerance)
def to_precision(graph: gs.Graph, precision: str = "fp16") -> gs.Graph:
    """Convert a float32 graph to fp16 / bf16 with float32 islands and a float32 interface.

    Args:
        graph: a float32 graph with inferred tensor types (the exporter's output).
        precision: ``fp16`` or ``bf16``.

    Returns:
        The converted graph: float32 inputs and outputs, Casts at every island boundary.

    Raises:
        ValueError: unknown ``precision``.
    """
    if precision not in LOW_TYPES:
        raise ValueError(f"precision {precision!r} unknown; choose fp16 or bf16")
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(gs.export_onnx(graph)))
    low, low_enum, _ = LOW_TYPES[precision]
    keep = fp32_nodes(graph, precision)
    is_low = {id(n): id(n) not in keep for n in graph.nodes}

    # Outputs made in low precision: the producer writes a low copy, a Cast (added last) restores the
    # float32 name.
    edges = []
    for out in graph.outputs:
        producer = _producer(out)
        if producer is None or not is_low[id(producer)] or not _is_float32(out):
            continue
        inner = gs.Variable(f"{out.name}_{precision}", dtype=np.dtype(np.float32), shape=out.shape)  # low below
        for consumer in list(out.outputs):
            consumer.inputs[:] = [inner if t is out else t for t in consumer.inputs]
        producer.outputs[producer.outputs.index(out)] = inner
        edges.append((inner, out))

    homes = {}  # id(tensor) -> True when it now holds low precision values
    for node in graph.nodes:
        for tensor in node.outputs:
            if _is_float32(tensor) and is_low[id(node)]:
                tensor.dtype = low
                homes[id(tensor)] = True

    casts: dict[tuple[int, bool], gs.Tensor] = {}
    lows: dict[int, gs.Constant] = {}
    for node in list(graph.nodes):
        want_low = is_low[id(node)]
        if want_low and node.op == "Cast" and node.attrs.get("to") == FLOAT:
            node.attrs["to"] = low_enum
        if want_low and node.op == "ConstantOfShape" and isinstance(node.attrs.get("value"), gs.Constant):
            value = node.attrs["value"]
            if onnx_dtype(value.dtype) == FLOAT:
                node.attrs["value"] = gs.Constant(value.name, _low_values(value.values, low, value.name))
        if want_low and node.op == "Constant" and isinstance(node.attrs.get("value"), gs.Constant):
            value = node.attrs["value"]
            if onnx_dtype(value.dtype) == FLOAT:
                node.attrs["value"] = gs.Constant(value.name, _low_values(value.values, low, value.name))
        for index, tensor in enumerate(node.inputs):
            if isinstance(tensor, gs.Constant):
                if want_low and _is_float32(tensor):
                    if id(tensor) not in lows:
                        lows[id(tensor)] = gs.Constant(f"{tensor.name}_{precision}", _low_values(tensor.values, low, tensor.name))
                    node.inputs[index] = lows[id(tensor)]
                continue
            if not tensor.name or tensor.dtype is None:
                continue
            holds_low = homes.get(id(tensor), False)
            if onnx_dtype(tensor.dtype) not in (FLOAT, low_enum) or holds_low == want_low:
                continue
            key = (id(tensor), want_low)
            if key not in casts:
                target = low if want_low else np.dtype(np.float32)
                casted = gs.Variable(f"{tensor.name}_to_{precision if want_low else 'float32'}", dtype=target, shape=tensor.shape)
                graph.nodes.append(gs.Node("Cast", name=f"{casted.name}_cast", attrs={"to": onnx_dtype(target)},
                                           inputs=[tensor], outputs=[casted]))
                casts[key] = casted
            node.inputs[index] = casts[key]
    for inner, out in edges:
        graph.nodes.append(gs.Node("Cast", name=f"{out.name}_to_float32", attrs={"to": FLOAT}, inputs=[inner], outputs=[out]))
    return graph.cleanup().toposort()


def has_bfloat16(proto: onnx.ModelProto) -> bool:
    """True when any initializer, value or Cast target of ``proto``'s main graph is bfloat16."""
    graph = proto.graph
    values = list(graph.input) + list(graph.output) + list(graph.value_info)
    return (any(t.data_type == onnx.TensorProto.BFLOAT16 for t in graph.initializer)
            or any(v.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16 for v in values)
            or any(a.name == "to" and a.i == onnx.TensorProto.BFLOAT16 for n in graph.node for a in n.attribute))


def emulate_bfloat16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A float32 model that computes what ``proto`` (with bf16 tensors) computes, for ONNX Runtime CPU,
    which has almost no bf16 kernels: every bf16 tensor is computed in float32 and rounded to bf16
    (``Cast -> bfloat16 -> float``, round to nearest even) where it is produced; bf16 constants are
    widened exactly. This is the storage rounding a bf16 backend does; its kernels may round
    intermediate products differently, so backends are still checked on their own.

    Raises:
        onnx.shape_inference.InferenceError: ``proto`` is not well typed.
    """
    BF16 = onnx.TensorProto.BFLOAT16
    model = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    graph = model.graph
    typed = {v.name: v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.output) + list(graph.value_info)}
    for index, init in enumerate(graph.initializer):
        if init.data_type == BF16:
            graph.initializer[index].CopyFrom(onnx.numpy_helper.from_array(
                onnx.numpy_helper.to_array(init).astype(np.float32), init.name))
    nodes = []
    for node in graph.node:
        for attr in node.attribute:
            if attr.name == "to" and attr.i == BF16:
                attr.i = FLOAT
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == BF16:
                attr.t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(attr.t).astype(np.float32), attr.t.name))
        rounded = []
        for index, name in enumerate(node.output):
            if typed.get(name) == BF16:
                node.output[index] = f"{name}_unrounded"
                rounded += [onnx.helper.make_node("Cast", [f"{name}_unrounded"], [f"{name}_bf16"], to=BF16),
                            onnx.helper.make_node("Cast", [f"{name}_bf16"], [name], to=FLOAT)]
        nodes += [node, *rounded]
    del graph.node[:]
    graph.node.extend(nodes)
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.type.tensor_type.elem_type == BF16:
            value.type.tensor_type.elem_type = FLOAT
    return model
