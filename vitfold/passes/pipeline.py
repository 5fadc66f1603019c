"""Run registered passes in order, verifying each with ONNX Runtime before/after.

Each pass: import with onnx-graphsurgeon, rewrite, export, clamp the IR version to what ONNX Runtime
loads, full ``onnx.checker`` + strict shape inference, then run the graph before and after on the
same inputs and refuse the pass (``PassError``) if any output moves beyond its declared tolerance.
The input file is never modified.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import PassError
from ..runtimes.ort import MAX_IR_VERSION, run_onnx
from . import PASSES



@dataclass(frozen=True)
class PassReport:
    """What one pass did: node counts, wall time (ms) and the largest output change it caused."""

    name: str
    nodes_before: int
    nodes_after: int
    ms: float
    max_abs_change: float

    def to_json(self) -> dict:
        return asdict(self)


def _outputs(path: Path, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [out for outputs in run_onnx(path, inputs) for out in outputs.values()]


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
    src: Path, dst: Path, names: Sequence[str], inputs: Sequence[np.ndarray]
) -> list[PassReport]:
    """Apply ``names`` in order to ``src`` and write ``dst``, verifying each pass on ``inputs``.

    Args:
        src: input ONNX file (never modified).
        dst: output ONNX file.
        names: registered pass names.
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
        for index, name in enumerate(names):
            start = time.perf_counter()
            result = apply_pass(proto, name)
            ms = (time.perf_counter() - start) * 1e3
            after_path = Path(tmp) / f"after{index}.onnx"
            onnx.save(result, str(after_path))
            after = _outputs(after_path, inputs)
            change = max(float(np.max(np.abs(a - b))) for a, b in zip(before, after))
            tolerance = PASSES[name].tolerance
            if not change <= tolerance:
                raise PassError(
                    f"pass {name} changed the outputs by {change:.3g} (max abs) > its tolerance {tolerance:g}; refused"
                )
            reports.append(PassReport(name, len(proto.graph.node), len(result.graph.node), ms, change))
            proto, before = result, after
    onnx.save(proto, str(dst))
    return reports
