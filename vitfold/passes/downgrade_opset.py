"""downgrade-opset: rewrite a graph for an older opset (default 17), for parsers that stop there.

TensorRT 8.5 documents operators up to opset 17 and reads opset-18 ops with the opset-17 rules: the
``Reduce*`` ops that take their axes as an input from opset 18 are read from the (absent) ``axes``
attribute, so every axis is reduced, silently. The conversion is ONNX's own version converter
(``onnx.version_converter``), which moves the axes into the attribute; its 18 -> 17 adapter leaves
``noop_with_empty_axes`` on ops that had no such attribute at 13 (only ReduceSum has it), which this
pass removes when it is 0 (the default) and refuses otherwise. Ops that have no form at the target
opset (e.g. ScatterElements ``max``, opset 18) make the converter fail, and the pass with it.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter

from ._registry import register_pass

_NOOP_ATTR_FROM_18 = {"ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                      "ReduceMin", "ReduceProd", "ReduceSumSquare"}


@register_pass("downgrade-opset", tolerance=0.0)
def downgrade_opset(graph: gs.Graph, opset: int = 17) -> gs.Graph:
    """Convert the default-domain opset to ``opset`` with ``onnx.version_converter``.

    Raises:
        ValueError: ``opset`` is above the graph's, or an op has no equivalent at ``opset`` (the
            converter's message, naming the op).
    """
    if opset > graph.opset:
        raise ValueError(f"graph is opset {graph.opset}; downgrade-opset only lowers it (asked for {opset})")
    if opset == graph.opset:
        return graph
    model = gs.export_onnx(graph)
    try:
        converted = version_converter.convert_version(model, opset)
    except Exception as exc:  # the converter raises RuntimeError / ConvertError with the op in the message
        raise ValueError(f"onnx.version_converter cannot take this graph to opset {opset}: {exc}") from exc
    for node in converted.graph.node:
        if node.op_type not in _NOOP_ATTR_FROM_18 or node.domain:
            continue
        for attr in list(node.attribute):
            if attr.name == "noop_with_empty_axes":
                if onnx.helper.get_attribute_value(attr):
                    raise ValueError(f"{node.name} ({node.op_type}): noop_with_empty_axes=1 has no opset-{opset} form")
                node.attribute.remove(attr)
    return gs.import_onnx(converted)
