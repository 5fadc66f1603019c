"""decompose-layernorm: LayerNormalization as ReduceMean / Sub / Mul / Sqrt / Div, for parsers without it.

ONNX has ``LayerNormalization`` from opset 17 and the dynamo exporter emits it for every
``nn.LayerNorm``; TensorRT 8.5 (JetPack 5) has no importer for it (added in 8.6 EA, onnx-tensorrt
Changelog). The decomposition is the operator's definition (ONNX operators.md, LayerNormalization
function body), with the variance taken as the mean of squared deviations::

    mean = ReduceMean(x, axes)         d = x - mean
    y    = d / Sqrt(ReduceMean(d * d, axes) + epsilon) * scale + bias

over ``axes = [axis, ..., rank - 1]``, in float32 when ``stash_type`` is 1 (inputs of another float
type are cast in and the normalised value cast back before scale and bias, as the spec says).
Reduce axes are written the way the graph's opset wants them: an input from opset 18, the ``axes``
attribute before. Nodes whose optional ``Mean`` / ``InvStdDev`` outputs are used, or whose input rank
is unknown, are left alone with the reason logged.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ._registry import register_pass

log = logging.getLogger(__name__)

#: Max abs output change: a two-pass variance in float32 against the runtime's fused kernel. Measured
#: 1.1-1.3e-6 on DeiT-S (random weights) with ToMe, EViT, Top-K and evit-mass; tests/test_trt85_passes.py
#: checks the pipeline's result against torch at this bound.
TOLERANCE = 1e-4


def _reduce_mean(graph: gs.Graph, name: str, x: gs.Tensor, axes: list[int], dtype) -> gs.Variable:
    out = gs.Variable(f"{name}_out", dtype=dtype)
    if graph.opset >= 18:
        graph.layer(op="ReduceMean", name=name, inputs=[x, gs.Constant(f"{name}_axes", np.array(axes, dtype=np.int64))],
                    attrs={"keepdims": 1}, outputs=[out])
    else:
        graph.layer(op="ReduceMean", name=name, inputs=[x], attrs={"axes": axes, "keepdims": 1}, outputs=[out])
    return out


def _op(graph: gs.Graph, op: str, name: str, inputs: list, dtype, attrs=None) -> gs.Variable:
    out = gs.Variable(f"{name}_out", dtype=dtype)
    graph.layer(op=op, name=name, inputs=inputs, attrs=attrs or {}, outputs=[out])
    return out


def _decompose(graph: gs.Graph, node: gs.Node) -> None:
    x, scale = node.inputs[0], node.inputs[1]
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    rank = len(x.shape)
    axis = node.attrs.get("axis", -1)
    axis = axis + rank if axis < 0 else axis
    axes = list(range(axis, rank))
    epsilon = float(node.attrs.get("epsilon", 1e-5))
    name = node.name or node.outputs[0].name
    dtype = x.dtype
    compute = np.float32 if node.attrs.get("stash_type", 1) == 1 else dtype
    if compute != dtype:
        x = _op(graph, "Cast", f"{name}_to_stash", [x], compute, {"to": onnx.TensorProto.FLOAT})
    mean = _reduce_mean(graph, f"{name}_mean", x, axes, compute)
    centred = _op(graph, "Sub", f"{name}_centre", [x, mean], compute)
    square = _op(graph, "Mul", f"{name}_square", [centred, centred], compute)
    variance = _reduce_mean(graph, f"{name}_variance", square, axes, compute)
    eps = gs.Constant(f"{name}_epsilon", np.array(epsilon, dtype=np.dtype(compute)))
    shifted = _op(graph, "Add", f"{name}_add_epsilon", [variance, eps], compute)
    std = _op(graph, "Sqrt", f"{name}_std", [shifted], compute)
    normed = _op(graph, "Div", f"{name}_normalise", [centred, std], compute)
    if compute != dtype:
        to = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        normed = _op(graph, "Cast", f"{name}_from_stash", [normed], dtype, {"to": to})
    (y,) = node.outputs[:1]
    if bias is None:
        node.outputs.clear()
        graph.layer(op="Mul", name=f"{name}_scale", inputs=[normed, scale], outputs=[y])
    else:
        scaled = _op(graph, "Mul", f"{name}_scale", [normed, scale], dtype)
        node.outputs.clear()
        graph.layer(op="Add", name=f"{name}_bias", inputs=[scaled, bias], outputs=[y])


@register_pass("decompose-layernorm", tolerance=TOLERANCE)
def decompose_layernorm(graph: gs.Graph) -> gs.Graph:
    """Rewrite LayerNormalization as its defining ops (TensorRT 8.5 has no LayerNormalization importer).

    Args:
        graph: any graph; nodes this pass cannot rewrite exactly are left, with the reason logged on
            ``vitfold.passes.decompose_layernorm``.

    Returns:
        The rewritten graph, cleaned up and sorted.
    """
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(gs.export_onnx(graph)))  # ranks of every input
    for node in [n for n in graph.nodes if n.op == "LayerNormalization" and not n.domain]:
        used_stats = [t.name for t in node.outputs[1:] if t.outputs or t in graph.outputs]
        if used_stats:
            log.warning("decompose-layernorm left %s: its Mean / InvStdDev outputs are used (%s)", node.name,
                        ", ".join(used_stats))
            continue
        if node.inputs[0].shape is None:
            log.warning("decompose-layernorm left %s: input rank unknown (run fold-schedule first)", node.name)
            continue
        _decompose(graph, node)
    return graph.cleanup().toposort()
