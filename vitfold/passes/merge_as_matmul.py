"""merge-as-matmul: a token-axis ScatterElements(add) merge as a one-hot MatMul.

ToMe (Bolya et al., ICLR 2023, Sec. 3) merges the ``r`` matched tokens of set A into set B with one
``ScatterElements(reduction="add")`` along the token axis of ``dst [B, N, C]``, its indices
``[B, r, C]`` a ``[B, r, 1]`` index broadcast over channels (see :mod:`vitfold.reduce.matching`).
TensorRT before 10 (JetPack 5) has no scatter reduction and TensorRT 10 needs a plugin for it; the
same sum is a tiny matrix product::

    hit    [B, N, r] = Equal(arange(N)[N, 1], Transpose(idx [B, r, 1]) [B, 1, r])
    out    [B, N, C] = dst + MatMul(Cast(hit), src [B, r, C])

The pattern is matched by structure, never by names: any rank-R float ScatterElements whose axis is
R-2 (the token axis of ``[..., N, C]``), with a static N, whose indices and updates cover the data on
every other axis, and whose indices are provably constant over the last (channel) axis: an Expand or
Tile of a tensor whose last dim is 1, or a constant with equal values along it. Anything else is
left as it is, with the reason logged (the pipeline records it in the pass report).

Reductions: ``add`` becomes the MatMul above (the same sum in a different order: declared
tolerance :data:`TOLERANCE`). ``max`` / ``min`` (ToMe's source tracing uses ``amax``) have no matrix
product form; with ``reductions=("add", "max", "min")`` they become an exact masked reduction
(``Max(dst, ReduceMax(Where(hit, src, -inf)))``, bit-equal to the scatter for finite inputs, but it
materialises ``[B, N, r, C]``), and by default they are left alone. ``mul`` and ``none`` always stay.

Indices: ScatterElements accepts negative indices (counted from the end); the one-hot does not. When
the indices cannot be traced to non-negative sources (ArgMax, TopK indices, a non-negative
constant, sums and products of those), a ``Where(idx < 0, idx + N, idx)`` on the small ``[B, 1, r]`` index is inserted so the
rewrite stays exact. Non-finite updates differ: ``0 * inf`` is NaN in the product.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ._registry import register_pass

log = logging.getLogger(__name__)

#: Max abs output change the pass may cause: float32 sums in a different order (measured on DeiT-S
#: random weights and DINOv2 real weights, see tests/test_merge_as_matmul.py and the report).
TOLERANCE = 1e-4

#: Reductions with an exact dense form, and the identity each one fills unmatched slots with.
_FILL = {"max": -np.inf, "min": np.inf}
_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
#: Ops that move or select index values without changing them (data input first).
VALUE_PRESERVING = {"Unsqueeze", "Squeeze", "Reshape", "Expand", "Tile", "Transpose", "Slice", "Identity",
                     "Gather", "GatherElements", "GatherND", "Flatten"}


def onnx_dtype(dtype) -> Optional[int]:
    """ONNX ``TensorProto`` enum of a gs tensor dtype (numpy, ml_dtypes or already an enum); None if unknown."""
    if dtype is None:
        return None
    if isinstance(dtype, int):
        return dtype
    if np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16):
        return onnx.TensorProto.BFLOAT16
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


@dataclass
class ScatterMatch:
    """One ScatterElements node and the verdict: ``column`` is the ``[..., r, 1]`` index tensor the
    indices broadcast from (None when refused), ``reason`` why it is left alone (None when matched)."""

    node: gs.Node
    reduction: str
    column: Optional[gs.Tensor] = None
    reason: Optional[str] = None


def _same_dim(a, b) -> bool:
    return a == b and a is not None


def _channel_column(indices: gs.Tensor) -> tuple[Optional[gs.Tensor], str]:
    """The tensor ``indices`` broadcasts from along its last axis (last dim 1), or (None, why not)."""
    if indices.shape is not None and indices.shape[-1] == 1:
        return indices, ""
    if isinstance(indices, gs.Constant):
        values = indices.values
        if values.ndim and np.all(values == values[..., :1]):
            return gs.Constant(f"{indices.name}_column", np.ascontiguousarray(values[..., :1])), ""
        return None, "constant indices differ along the channel axis"
    producer = indices.inputs[0] if indices.inputs else None
    if producer is not None and producer.op in ("Expand", "Tile"):
        source = producer.inputs[0]
        if source.shape is None:
            return None, f"the {producer.op} input {source.name} has an unknown shape"
        if len(source.shape) == 0 or source.shape[-1] == 1:
            if producer.op == "Tile" and len(source.shape) != len(indices.shape):
                return None, "Tile input rank differs from the indices rank"
            return source, ""
        return None, f"{producer.op} input {source.name} {list(source.shape)} is not broadcast over channels (last dim != 1)"
    made_by = f"{producer.op} node {producer.name}" if producer is not None else "a graph input"
    return None, f"indices come from {made_by}, not provably constant over channels (need Expand/Tile of [..., r, 1] or a constant)"


def match_scatter(node: gs.Node, reductions: Sequence[str] = ("add",)) -> ScatterMatch:
    """Decide whether ``node`` (a ScatterElements) is a token-axis merge this pass can rewrite exactly.

    Args:
        node: a ScatterElements node; data ``[..., N, C]``, indices / updates ``[..., r, C]``.
        reductions: reductions to rewrite (``add``; ``max`` / ``min`` for the masked-reduce form).

    Returns:
        A :class:`ScatterMatch` with ``column`` set, or ``reason`` saying why the node must stay.
    """
    reduction = node.attrs.get("reduction", "none")
    found = ScatterMatch(node, reduction)
    data, indices, updates = node.inputs
    if reduction not in reductions:
        if reduction == "none":
            found.reason = "reduction 'none': a plain scatter (it overwrites), not a merge"
        elif reduction not in ("add", *_FILL):
            found.reason = f"reduction {reduction!r} has no one-hot matrix form"
        else:
            found.reason = f"reduction {reduction!r} not enabled (reductions={tuple(reductions)})"
        return found
    if onnx_dtype(data.dtype) not in _FLOATS:
        found.reason = f"data {data.name} is not floating point ({data.dtype})"
        return found
    if data.shape is None or indices.shape is None or updates.shape is None:
        found.reason = "data, indices or updates has an unknown shape (run shape inference / fold-schedule first)"
        return found
    rank = len(data.shape)
    axis = node.attrs.get("axis", 0)
    axis = axis + rank if axis < 0 else axis
    if rank < 2 or axis != rank - 2:
        found.reason = f"axis {node.attrs.get('axis', 0)} of a rank-{rank} tensor is not the token axis (rank - 2)"
        return found
    if not isinstance(data.shape[axis], int):
        found.reason = f"token count {data.shape[axis]!r} is not static"
        return found
    if len(indices.shape) != rank or list(indices.shape) != list(updates.shape):
        found.reason = f"indices {list(indices.shape)} and updates {list(updates.shape)} do not share one rank-{rank} shape"
        return found
    partial = [d for d in range(rank) if d != axis and not _same_dim(indices.shape[d], data.shape[d])]
    if partial:
        found.reason = f"indices {list(indices.shape)} cover only part of data {list(data.shape)} on axis {partial[0]}"
        return found
    column, why = _channel_column(indices)
    if column is None:
        found.reason = why
    elif len(column.shape) < 2 or column.shape[-2] != indices.shape[-2]:
        found.reason = f"index column {list(column.shape)} is also broadcast along the token axis (need r = {indices.shape[-2]} rows)"
    else:
        found.column = column
    return found


def _non_negative(tensor: gs.Tensor, depth: int = 12) -> bool:
    """True when ``tensor``'s integer values are provably >= 0 (traced back through value-preserving ops)."""
    if isinstance(tensor, gs.Constant):
        return bool(np.all(tensor.values >= 0))
    if depth == 0 or not tensor.inputs:
        return False
    producer = tensor.inputs[0]
    if producer.op in ("ArgMax", "ArgMin", "NonZero", "Shape", "Size"):
        return True
    if producer.op == "TopK":
        return tensor is producer.outputs[1]
    if producer.op in VALUE_PRESERVING:
        return _non_negative(producer.inputs[0], depth - 1)
    if producer.op in ("Concat", "Add", "Mul", "Max"):  # non-negative inputs give a non-negative result
        return all(_non_negative(t, depth - 1) for t in producer.inputs)
    return False


def _rewrite(graph: gs.Graph, found: ScatterMatch) -> None:
    node = found.node
    data, _, updates = node.inputs
    (out,) = node.outputs
    rank, tokens = len(data.shape), data.shape[-2]
    prefix = f"{out.name}_as_matmul"  # output names are unique, so are these
    column = found.column
    index_dtype = np.dtype(np.int64 if column.dtype is None else onnx.helper.tensor_dtype_to_np_dtype(onnx_dtype(column.dtype)))
    if len(column.shape) < rank:  # broadcast source of lower rank: give it leading 1s
        lead = np.arange(rank - len(column.shape), dtype=np.int64)
        column = graph.layer(op="Unsqueeze", name=f"{prefix}_unsqueeze",
                             inputs=[column, gs.Constant(f"{prefix}_lead_axes", lead)],
                             outputs=[gs.Variable(f"{prefix}_column", dtype=index_dtype)])[0]
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    row = graph.layer(op="Transpose", name=f"{prefix}_transpose", inputs=[column], attrs={"perm": perm},
                      outputs=[gs.Variable(f"{prefix}_row", dtype=index_dtype)])[0]  # [..., 1, r]
    if not _non_negative(found.column):
        zero = gs.Constant(f"{prefix}_zero", np.array(0, dtype=index_dtype))
        count = gs.Constant(f"{prefix}_tokens", np.array(tokens, dtype=index_dtype))
        negative = graph.layer(op="Less", name=f"{prefix}_less", inputs=[row, zero],
                               outputs=[gs.Variable(f"{prefix}_negative", dtype=np.bool_)])[0]
        wrapped = graph.layer(op="Add", name=f"{prefix}_wrap", inputs=[row, count],
                              outputs=[gs.Variable(f"{prefix}_wrapped", dtype=index_dtype)])[0]
        row = graph.layer(op="Where", name=f"{prefix}_normalise", inputs=[negative, wrapped, row],
                          outputs=[gs.Variable(f"{prefix}_row_normalised", dtype=index_dtype)])[0]
    positions = gs.Constant(f"{prefix}_positions", np.arange(tokens, dtype=index_dtype).reshape(tokens, 1))
    hit = graph.layer(op="Equal", name=f"{prefix}_equal", inputs=[positions, row],
                      outputs=[gs.Variable(f"{prefix}_hit", dtype=np.bool_)])[0]  # [..., N, r]
    if found.reduction == "add":
        onehot = graph.layer(op="Cast", name=f"{prefix}_cast", inputs=[hit], attrs={"to": onnx_dtype(data.dtype)},
                             outputs=[gs.Variable(f"{prefix}_onehot", dtype=data.dtype)])[0]
        merged = graph.layer(op="MatMul", name=f"{prefix}_matmul", inputs=[onehot, updates],
                             outputs=[gs.Variable(f"{prefix}_sum", dtype=data.dtype)])[0]  # [..., N, C]
        node.outputs.clear()
        graph.layer(op="Add", name=f"{prefix}_add", inputs=[data, merged], outputs=[out])
        return
    reduce_op, combine_op = {"max": ("ReduceMax", "Max"), "min": ("ReduceMin", "Min")}[found.reduction]
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(onnx_dtype(data.dtype))
    mask = graph.layer(op="Unsqueeze", name=f"{prefix}_mask", inputs=[hit, gs.Constant(f"{prefix}_last", np.array([-1]))],
                       outputs=[gs.Variable(f"{prefix}_hit4", dtype=np.bool_)])[0]  # [..., N, r, 1]
    spread = graph.layer(op="Unsqueeze", name=f"{prefix}_spread", inputs=[updates, gs.Constant(f"{prefix}_row_axis", np.array([-3]))],
                         outputs=[gs.Variable(f"{prefix}_updates4", dtype=data.dtype)])[0]  # [..., 1, r, C]
    fill = gs.Constant(f"{prefix}_identity", np.array(_FILL[found.reduction], dtype=np_dtype))
    masked = graph.layer(op="Where", name=f"{prefix}_where", inputs=[mask, spread, fill],
                         outputs=[gs.Variable(f"{prefix}_masked", dtype=data.dtype)])[0]  # [..., N, r, C]
    reduced = graph.layer(op=reduce_op, name=f"{prefix}_reduce", inputs=[masked, gs.Constant(f"{prefix}_axes", np.array([-2]))],
                          attrs={"keepdims": 0}, outputs=[gs.Variable(f"{prefix}_reduced", dtype=data.dtype)])[0]
    node.outputs.clear()
    graph.layer(op=combine_op, name=f"{prefix}_combine", inputs=[data, reduced], outputs=[out])


@register_pass("merge-as-matmul", tolerance=TOLERANCE)
def merge_as_matmul(graph: gs.Graph, reductions: Sequence[str] = ("add",)) -> gs.Graph:
    """Rewrite token-axis ScatterElements(add) merges as one-hot MatMuls (TensorRT < 10 has no scatter reduction).

    Args:
        graph: any graph; ScatterElements nodes that do not match are left alone, with the reason
            logged on ``vitfold.passes.merge_as_matmul``.
        reductions: reductions to rewrite; ``("add", "max")`` also rewrites ToMe's amax source
            tracing as an exact masked ReduceMax.

    Returns:
        The rewritten graph, cleaned up and sorted.

    Raises:
        ValueError: a reduction other than add / max / min is requested.
    """
    unknown = set(reductions) - {"add", *_FILL}
    if unknown:
        raise ValueError(f"reductions {sorted(unknown)} have no exact rewrite; choose from add, max, min")
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(gs.export_onnx(graph)))  # shapes of every tensor
    for node in [n for n in graph.nodes if n.op == "ScatterElements" and not n.domain]:
        found = match_scatter(node, reductions)
        if found.reason is not None:
            log.warning("merge-as-matmul left %s (ScatterElements, reduction %s): %s", node.name or "<unnamed>",
                        found.reduction, found.reason)
            continue
        _rewrite(graph, found)
    return graph.cleanup().toposort()
