"""Read an ONNX file's structure and vitfold metadata (no torch, no runtime)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .errors import SpecError


def inspect_onnx(path: Path) -> dict:
    """Ops, inputs/outputs with shapes, dynamic dimensions and ``vitfold.*`` metadata of an ONNX file.

    Raises:
        SpecError: the file is missing or not an ONNX model.
    """
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path} does not exist")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError) as exc:
        raise SpecError(f"{path} is not an ONNX model ({type(exc).__name__}: {exc})") from exc
    if not proto.graph.node:
        raise SpecError(f"{path} is not an ONNX model (no graph nodes)")
    proto = onnx.shape_inference.infer_shapes(proto)

    def describe(value) -> dict:
        t = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
        return {"name": value.name, "shape": dims, "dtype": onnx.TensorProto.DataType.Name(t.elem_type).lower()}

    values = [describe(v) for v in list(proto.graph.input) + list(proto.graph.value_info) + list(proto.graph.output)]
    metadata = {}
    for prop in proto.metadata_props:
        if prop.key.startswith("vitfold."):
            metadata[prop.key.removeprefix("vitfold.")] = json.loads(prop.value)
    return {
        "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
        "ir_version": proto.ir_version,
        "nodes": len(proto.graph.node),
        "ops": dict(Counter(n.op_type for n in proto.graph.node).most_common()),
        "inputs": [describe(v) for v in proto.graph.input],
        "outputs": [describe(v) for v in proto.graph.output],
        "dynamic": sorted({v["name"] for v in values if any(not isinstance(d, int) for d in v["shape"])}),
        "metadata": metadata,
    }
