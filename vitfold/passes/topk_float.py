"""topk-float-values: TopK over integer values run on a float32 copy of them, for TensorRT 8.5.

TensorRT 8.5's TopK takes FP32 / FP16 values only (operators.md 8.5; INT32 arrives in 8.6 EA), and
ToMe sorts integer token indices (the reference's ``unm_idx.sort()``, which puts the class token
back in front). Sorting a float32 copy gives the same order, ties included (TopK breaks ties by
position either way), and the same values after a Cast back, as long as every value is an integer
of magnitude <= 2**24 (float32 represents those exactly). The pass rewrites only TopKs whose input it
can prove is such an index: TopK indices or ArgMax / ArgMin output over an axis of static size
<= 2**24, reached through ops that move values without changing them. Any other integer TopK is
left with the reason logged.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ._registry import register_pass
from .merge_as_matmul import VALUE_PRESERVING, onnx_dtype

log = logging.getLogger(__name__)

#: float32 represents every integer of magnitude up to this exactly.
EXACT_LIMIT = 2 ** 24
_INTEGER = {onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32, onnx.TensorProto.INT64,
            onnx.TensorProto.UINT8, onnx.TensorProto.UINT16, onnx.TensorProto.UINT32, onnx.TensorProto.UINT64}


def index_bound(tensor: gs.Tensor, depth: int = 16) -> Optional[int]:
    """An upper bound on ``|value|`` for an integer index tensor, or None when none can be proven.

    Indices from TopK / ArgMax / ArgMin are bounded by the size of the axis they index; Concat takes
    the largest bound of its inputs; other value-preserving ops pass the bound of their data input.
    """
    if isinstance(tensor, gs.Constant):
        return int(np.abs(tensor.values).max()) if tensor.values.size else 0
    if depth == 0 or not tensor.inputs:
        return None
    producer = tensor.inputs[0]
    if producer.op in ("TopK", "ArgMax", "ArgMin"):
        if producer.op == "TopK" and tensor is not producer.outputs[1]:
            return None
        data = producer.inputs[0]
        if data.shape is None:
            return None
        axis = producer.attrs.get("axis", -1 if producer.op == "TopK" else 0)
        size = data.shape[axis]
        return size if isinstance(size, int) else None
    if producer.op == "Concat":
        bounds = [index_bound(t, depth - 1) for t in producer.inputs]
        return None if any(b is None for b in bounds) else max(bounds)
    if producer.op in VALUE_PRESERVING:
        return index_bound(producer.inputs[0], depth - 1)
    return None


@register_pass("topk-float-values", tolerance=0.0)
def topk_float_values(graph: gs.Graph) -> gs.Graph:
    """Sort integer index values as float32 (exact below 2**24); TensorRT 8.5's TopK takes FP32/FP16 only.

    Returns:
        The rewritten graph, cleaned up and sorted. Integer TopKs whose values cannot be proven to be
        indices below 2**24 are left, with the reason logged on ``vitfold.passes.topk_float``.
    """
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(gs.export_onnx(graph)))
    for node in [n for n in graph.nodes if n.op == "TopK" and not n.domain]:
        values = node.inputs[0]
        dtype = onnx_dtype(values.dtype)
        if dtype not in _INTEGER:
            continue
        bound = index_bound(values)
        if bound is None or bound > EXACT_LIMIT:
            why = "not traceable to TopK / ArgMax indices" if bound is None else f"values up to {bound} > 2**24"
            log.warning("topk-float-values left %s (TopK over %s): %s", node.name, onnx.TensorProto.DataType.Name(dtype), why)
            continue
        name = node.name or node.outputs[0].name
        as_float = gs.Variable(f"{name}_float_in", dtype=np.float32)
        graph.layer(op="Cast", name=f"{name}_to_float", inputs=[values], attrs={"to": onnx.TensorProto.FLOAT},
                    outputs=[as_float])
        node.inputs[0] = as_float
        top_values = node.outputs[0]
        float_values = gs.Variable(f"{name}_float_out", dtype=np.float32)
        node.outputs[0] = float_values
        graph.layer(op="Cast", name=f"{name}_to_int", inputs=[float_values],
                    attrs={"to": dtype}, outputs=[top_values])
    return graph.cleanup().toposort()
