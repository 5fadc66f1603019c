"""Run registered passes in order, verifying each with ONNX Runtime before/after.

Each pass: import with onnx-graphsurgeon, rewrite, export, clamp the IR version to what ONNX Runtime
loads, full ``onnx.checker`` + strict shape inference, then run the graph before and after on the
same inputs and refuse the pass (``PassError``) if any output moves beyond its declared tolerance:
a max abs change (float), or a :class:`~vitfold.metrics.Tolerance` (cosine / top-1, for passes such
as ``precision`` that change every output a little); a pass may declare a callable ``opts ->
tolerance`` when it depends on its options. Pipeline steps are pass names or ``(name, {opts})``.
Messages the pass logs on ``vitfold.passes.*`` (e.g. why a node was left alone) go into its report.
ONNX Runtime CPU has almost no bf16 kernels: a graph with bf16 tensors is checked through
:func:`~vitfold.passes.precision.emulate_bfloat16` (float32 compute, bf16 rounding where each bf16
tensor is produced).
The input file is never modified.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import FidelityError, PassError
from ..metrics import Tolerance, compare
from ..runtimes.ort import MAX_IR_VERSION, run_onnx
from ._registry import PASSES
from .precision import emulate_bfloat16, has_bfloat16

#: A pipeline step: a registered pass name, or ``(name, options)`` passed to the pass as keywords.
Step = Union[str, tuple[str, dict]]



@dataclass(frozen=True)
class PassReport:
    """What one pass did: node counts, wall time (ms), the largest output change it caused, and the
    messages it logged (``notes``: e.g. nodes it left alone, and why)."""

    name: str
    nodes_before: int
    nodes_after: int
    ms: float
    max_abs_change: float
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return asdict(self)


def _outputs(path: Path, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [out for outputs in run_onnx(path, inputs) for out in outputs.values()]


class _Notes(logging.Handler):
    """Collects what passes log on ``vitfold.passes`` while one pass runs."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _check_change(name: str, opts: dict, before: list[np.ndarray], after: list[np.ndarray]) -> float:
    """Largest max-abs output change; raises PassError beyond the pass's declared tolerance."""
    change = max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in zip(before, after))
    tolerance = PASSES[name].tolerance
    if callable(tolerance):
        tolerance = tolerance(**opts)
    if isinstance(tolerance, Tolerance):
        for index, (a, b) in enumerate(zip(before, after)):
            try:
                compare(a, b).check(tolerance, f"pass {name}, output {index}")
            except FidelityError as exc:
                raise PassError(f"{exc}; refused (tolerance {tolerance})") from exc
    elif not change <= tolerance:
        raise PassError(f"pass {name} changed the outputs by {change:.3g} (max abs) > its tolerance {tolerance:g}; refused")
    return change


def apply_pass(proto: onnx.ModelProto, name: str, **opts) -> onnx.ModelProto:
    """Apply pass ``name`` to ``proto`` (unverified); returns a new checked model.

    Raises:
        PassError: unknown pass, the rewrite raises, or the result fails the checker.
    """
    if name not in PASSES:
        raise PassError(f"unknown pass {name!r}; registered: {', '.join(sorted(PASSES))}")
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    try:
        graph = PASSES[name].fn(gs.import_onnx(proto), **opts)
        result = gs.export_onnx(graph)
    except Exception as exc:
        raise PassError(f"pass {name} failed: {type(exc).__name__}: {exc}") from exc
    result.ir_version = min(result.ir_version, MAX_IR_VERSION)
    result.metadata_props.extend(p for p in proto.metadata_props if p.key not in {m.key for m in result.metadata_props})
    try:
        onnx.checker.check_model(result, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise PassError(f"pass {name} produced an invalid graph: {exc}") from exc
    return result


def run_pipeline(
    src: Path, dst: Path, names: Sequence[Step], inputs: Sequence[np.ndarray]
) -> list[PassReport]:
    """Apply ``names`` in order to ``src`` and write ``dst``, verifying each pass on ``inputs``.

    Args:
        src: input ONNX file (never modified).
        dst: output ONNX file.
        names: registered pass names, or ``(name, {option: value})`` steps.
        inputs: ``[B, 3, H, W]`` float32 batches (real images) fed before and after every pass.

    Returns:
        One :class:`PassReport` per pass.

    Raises:
        PassError: a pass fails, breaks the graph, or changes outputs beyond its tolerance.
    """
    proto = onnx.load(str(src))
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    reports = []
    with tempfile.TemporaryDirectory(prefix="vitfold-passes-") as tmp:
        before_path = Path(tmp) / "before.onnx"
        onnx.save(proto, str(before_path))
        before = _outputs(before_path, inputs)
        for index, step in enumerate(names):
            name, opts = (step, {}) if isinstance(step, str) else step
            notes, logger = _Notes(), logging.getLogger("vitfold.passes")
            logger.addHandler(notes)
            try:
                start = time.perf_counter()
                result = apply_pass(proto, name, **opts)
                ms = (time.perf_counter() - start) * 1e3
            finally:
                logger.removeHandler(notes)
            after_path = Path(tmp) / f"after{index}.onnx"
            onnx.save(emulate_bfloat16(result) if has_bfloat16(result) else result, str(after_path))
            after = _outputs(after_path, inputs)
            change = _check_change(name, opts, before, after)
            reports.append(PassReport(name, len(proto.graph.node), len(result.graph.node), ms, change, tuple(notes.messages)))
            proto, before = result, after
    onnx.save(proto, str(dst))
    return reports
