"""torch -> ONNX with static shapes, checked before anything else runs.

``export_onnx`` traces with the dynamo exporter (``torch.onnx.export(..., dynamo=True)``) at opset 18:
the TorchScript exporter turns ToMe's scatter_reduce into ``If`` nodes and an invalid graph, and
opset >= 18 is needed for ScatterElements ``max`` (source tracing). The written file then passes
:func:`check_contract` (full ``onnx.checker``, every shape static after shape inference, no ``If`` or
``NonZero``, constant TopK K) and :func:`validate_onnx` (ONNX Runtime vs torch on real photos).
A data-dependent gate exported as is (``evit-mass``'s dynamic form) breaks that contract on purpose:
``dynamic=True`` is the explicit opt-out (NonZero, computed TopK K and dynamic dimensions allowed;
``If`` / ``Loop`` still refused).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import torch

from ..errors import ExportError
from ..native import PRUNE_SITE_PREFIX, TOME_SITE_PREFIX
from ..metrics import Comparison, compare
from ..runtimes.backends import get_backend
from ..runtimes.ort import MAX_IR_VERSION, run_onnx

DEFAULT_OPSET = 18
INPUT_NAME = "images"
_FORBIDDEN_OPS = {"If": "data-dependent control flow", "Loop": "a loop", "NonZero": "a data-dependent shape"}


@dataclass(frozen=True)
class ExportResult:
    """The exported file, its op histogram and its parity with torch on the check images."""

    path: Path
    op_counts: dict[str, int]
    parity: Comparison


def output_name(model: torch.nn.Module) -> str:
    """``logits`` for a model with a classifier head, ``features`` for a headless one."""
    return "logits" if getattr(model, "num_classes", 0) else "features"


def export_onnx(
    model: torch.nn.Module,
    path: Path,
    input_shape: Sequence[int],
    *,
    opset: int = DEFAULT_OPSET,
    metadata: dict | None = None,
    dynamic: bool = False,
) -> Path:
    """Trace ``model`` at the static ``input_shape`` ``[B, 3, H, W]`` and write ``path``.

    ``metadata`` entries are stored as ONNX ``metadata_props`` (JSON-encoded values, keys prefixed
    ``vitfold.``) so that ``inspect`` can read the schedule back. ``dynamic=True`` checks the graph
    with ``check_contract(path, dynamic=True)`` (for data-dependent gates exported as is).

    Raises:
        ExportError: the exporter fails or the graph breaks the contract (see :func:`check_contract`).
    """
    if opset < 16:
        raise ExportError(f"opset {opset} < 16: ScatterElements add drops duplicate indices; use >= 16")
    dummy = torch.zeros(*input_shape)
    log = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stdout(log):
            program = torch.onnx.export(
                model,
                (dummy,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=[output_name(model)],
                external_data=False,
            )
            program.save(str(path), external_data=False)
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: {exc}\n{log.getvalue()[-2000:]}") from exc
    proto = onnx.load(str(path))
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    tag_sites(proto)
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"vitfold.{key}", json.dumps(value)
    onnx.save(proto, str(path))
    check_contract(path, dynamic=dynamic)
    return Path(path)


_SITE_SCOPE = re.compile(r"^blocks\.(\d+)\.(tome_site|prune_site)$")
_SITE_PREFIX = {"tome_site": TOME_SITE_PREFIX, "prune_site": PRUNE_SITE_PREFIX}


def tag_sites(proto: onnx.ModelProto) -> None:
    """Prefix the names of the nodes each site module call exported (:class:`~vitfold.reduce.tome.ToMeSite`,
    :class:`~vitfold.reduce.evit.PruneSite`) with ``vitfold.tome_site.<block>/`` or
    ``vitfold.prune_site.<block>/``, read from the exporter's name-scope metadata. Node names survive
    the graph passes (metadata does not), so :func:`vitfold.passes.fuse_sites.fuse_sites` finds each
    site's nodes after them."""
    for node in proto.graph.node:
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
        for scope in re.findall(r"'([^']*)'", scopes):
            match = _SITE_SCOPE.match(scope)
            if match:
                node.name = f"{_SITE_PREFIX[match.group(2)]}{match.group(1)}/{node.name}"
                break


def check_contract(path: Path, dynamic: bool = False) -> dict[str, int]:
    """Full ONNX check plus vitfold's export contract; returns the op histogram.

    ``dynamic=True`` is the opt-out for data-dependent gates: NonZero, a computed TopK K and dynamic
    dimensions are then allowed (``If`` / ``Loop`` are not).

    Raises:
        ExportError: checker failure, a forbidden op (If / Loop / NonZero), a TopK whose K is not a
            constant, or any tensor without a fully static shape after shape inference.
    """
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path}: onnx.checker rejected the graph: {exc}") from exc
    proto = onnx.shape_inference.infer_shapes(onnx.load(str(path)), strict_mode=True)
    graph = proto.graph
    constants = {t.name for t in graph.initializer} | {
        out for node in graph.node if node.op_type == "Constant" for out in node.output
    }
    problems = []
    forbidden = {op: why for op, why in _FORBIDDEN_OPS.items() if not (dynamic and op == "NonZero")}
    for node in graph.node:
        if node.op_type in forbidden:
            problems.append(f"{node.name} ({node.op_type}): {forbidden[node.op_type]}")
        if node.op_type == "TopK" and node.input[1] not in constants and not dynamic:
            problems.append(f"{node.name} (TopK): K is computed at run time, not a constant")
    for value in [] if dynamic else list(graph.value_info) + list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        if not value.type.tensor_type.HasField("shape") or any(not d.HasField("dim_value") for d in dims):
            problems.append(f"tensor {value.name}: shape not static ({[d.dim_param or '?' for d in dims]})")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; +{len(problems) - 8} more" if len(problems) > 8 else "")
        raise ExportError(f"{path} breaks the static export contract: {shown}")
    return dict(Counter(node.op_type for node in graph.node))


def torch_outputs(model: torch.nn.Module, batches: Sequence[np.ndarray]) -> np.ndarray:
    """Run ``model`` on each ``[B, 3, H, W]`` batch; returns the concatenated outputs."""
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(batch)).numpy() for batch in batches])


def validate_onnx(path: Path, reference: np.ndarray, batches: Sequence[np.ndarray], what: str) -> Comparison:
    """ONNX Runtime (CPU, f32) on ``batches`` vs the torch ``reference`` outputs.

    Raises:
        FidelityError: beyond ONNX Runtime's f32 tolerance (:mod:`vitfold.runtimes.backends`: max abs 1e-4).
    """
    results = run_onnx(path, batches)
    name = next(iter(results[0]))
    outputs = np.concatenate([out[name] for out in results])
    tolerance = get_backend("onnxruntime").tolerance("f32")
    return compare(reference, outputs, classes=name == "logits").check(tolerance, f"{what}: ONNX Runtime vs torch")


def export_and_validate(
    model: torch.nn.Module,
    path: Path,
    batches: Sequence[np.ndarray],
    *,
    opset: int = DEFAULT_OPSET,
    metadata: dict | None = None,
    what: str = "model",
    dynamic: bool = False,
) -> tuple[ExportResult, np.ndarray]:
    """Export ``model`` at ``batches[0]``'s shape, then validate it; returns the result and the torch
    reference outputs (reused by later stages' checks). ``dynamic``: see :func:`export_onnx`."""
    export_onnx(model, path, batches[0].shape, opset=opset, metadata=metadata, dynamic=dynamic)
    reference = torch_outputs(model, batches)
    parity = validate_onnx(path, reference, batches, what)
    ops = dict(Counter(node.op_type for node in onnx.load(str(path)).graph.node))
    return ExportResult(Path(path), ops, parity), reference
