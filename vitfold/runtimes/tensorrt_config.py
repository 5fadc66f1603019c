"""TensorRT build settings as pure functions, per TensorRT version. No TensorRT import; unit-tested.

- :func:`translate_config`: ``BuildConfig`` + TensorRT version -> :class:`BuilderSettings` (network flags,
  builder flags, workspace pool limit, builder optimisation level, strong typing).
- :func:`optimization_profiles`: min / opt / max shapes for inputs left dynamic (batch, tokens).
- :func:`format_parser_errors` / :func:`parse_failure`: every ONNX parser error with node, op, reason.
- :func:`diagnose_build_failure`: names the cause of a failed engine build (workspace, memory,
  unsupported layer) from the TensorRT log.
- :func:`check_graph_precision`: fp16 on strongly typed TensorRT 11 needs an fp16 graph.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

from ..errors import ArtifactError, ExportError, SpecError, VitfoldError
from .base import BuildConfig

WORKSPACE_MB = 1024
BUILDER_LEVEL = 3


def parse_version(version: str) -> tuple[int, int]:
    """``"10.3.0.26"`` -> ``(10, 3)``."""
    match = re.match(r"(\d+)\.(\d+)", str(version))
    if not match:
        raise SpecError(f"cannot read TensorRT version {version!r}")
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class BuilderSettings:
    """Everything the builder is told, for one TensorRT version (recorded in ``engine.json``).

    Attributes:
        network_flags: ``NetworkDefinitionCreationFlag`` names passed to ``create_network``.
        set_flags / clear_flags: ``BuilderFlag`` names set / cleared on the builder config.
        workspace_bytes: ``MemoryPoolType.WORKSPACE`` limit in bytes.
        builder_optimization_level: 0-5, None where TensorRT has no such setting (8.5).
        strongly_typed: the network takes its precision from the graph (TensorRT 11).
        precision_from_graph: fp16 is requested and must be present in the ONNX graph itself.
    """

    tensorrt: str
    precision: str
    network_flags: tuple[str, ...]
    set_flags: tuple[str, ...]
    clear_flags: tuple[str, ...]
    workspace_bytes: int
    builder_optimization_level: Optional[int]
    profiling_verbosity: str
    strongly_typed: bool
    precision_from_graph: bool
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return asdict(self)


def translate_config(cfg: BuildConfig, trt_version: str) -> BuilderSettings:
    """The builder settings for ``cfg`` on TensorRT ``trt_version`` (pure; no TensorRT needed).

    ``cfg.extra`` keys: ``workspace_mb`` (default 1024), ``builder_optimization_level`` (0-5, default 3).
    f32 clears TF32 so matmuls run in true fp32 (parity with torch within 1e-3); fp16 sets
    ``BuilderFlag.FP16`` on 8.5 / 10.x and on 11.x relies on an fp16 graph (see the precision pass).
    int8 builds from a Q/DQ graph (:mod:`vitfold.quantize.qdq`, explicit quantization): on 8.5 - 10.x
    ``BuilderFlag.INT8`` is set, as the 8.x developer guide requires for any quantization ("the INT8
    flag must be set in the builder config", Working with INT8) and 10.x keeps for weakly typed
    networks; on 11.x the network is strongly typed and the guide says precision flags "are not
    required and should not be specified" (Explicit Quantization): the Q/DQ pairs carry the types.
    The float layers between them (the token reduction) run f32 with TF32 cleared.

    Raises:
        SpecError: TensorRT older than 8.5, bf16 asked for, or a bad workspace / level value.
    """
    major, minor = parse_version(trt_version)
    if (major, minor) < (8, 5):
        raise SpecError(f"TensorRT {trt_version} is older than 8.5 (JetPack 5.1): this backend needs the name-based "
                        "I/O API (set_tensor_address, execute_async_v3); upgrade TensorRT / JetPack")
    if cfg.precision == "bf16":
        raise SpecError("--backend tensorrt builds f32 or fp16; bf16 is not supported here: use --precision fp16")
    workspace_mb = cfg.extra.get("workspace_mb", WORKSPACE_MB)
    if not isinstance(workspace_mb, int) or workspace_mb < 1:
        raise SpecError(f"TensorRT workspace_mb must be a positive int (MiB), got {workspace_mb!r}")
    level = cfg.extra.get("builder_optimization_level", BUILDER_LEVEL)
    if level not in range(6):
        raise SpecError(f"TensorRT builder_optimization_level must be 0..5, got {level!r}")
    notes = []
    if (major, minor) < (8, 6):
        notes.append(f"TensorRT {major}.{minor} has no builder optimisation level (added in 8.6); its default search runs")
        level = None
    set_flags, precision_from_graph = [], False
    if cfg.precision == "fp16":
        if major >= 11:
            precision_from_graph = True
            notes.append("TensorRT 11 has no FP16 builder flag: fp16 comes from the graph's own types "
                         "(model.opt.onnx must already be converted by the precision pass)")
        else:
            set_flags.append("FP16")
    if cfg.precision == "int8":
        if major >= 11:
            notes.append("TensorRT 11: int8 from the Q/DQ graph (strongly typed, no INT8 builder flag)")
        else:
            set_flags.append("INT8")
    return BuilderSettings(
        tensorrt=str(trt_version),
        precision=cfg.precision,
        network_flags=("EXPLICIT_BATCH",) if major < 10 else (),
        set_flags=tuple(set_flags),
        clear_flags=("TF32",) if cfg.precision in ("f32", "int8") else (),
        workspace_bytes=workspace_mb << 20,
        builder_optimization_level=level,
        profiling_verbosity="DETAILED",
        strongly_typed=major >= 11,
        precision_from_graph=precision_from_graph,
        notes=tuple(notes),
    )


def optimization_profiles(inputs: Mapping[str, Sequence[int]], extra: Mapping) -> dict[str, list[list[int]]]:
    """Optimisation profile ``{input: [min, opt, max]}`` (each a shape) for inputs with dynamic dims (-1).

    Ranges come from ``extra["batch"] = [min, opt, max]`` (dim 0 of every input) and
    ``extra["dynamic_dims"] = {input: {dim: [min, opt, max]}}`` (e.g. a token axis left dynamic).
    Static inputs need no profile and get none.

    Raises:
        SpecError: a dynamic dimension without a range, or a range that is not 1 <= min <= opt <= max.
    """
    profiles = {}
    for name, shape in inputs.items():
        shape = [int(d) for d in shape]
        if all(d >= 0 for d in shape):
            continue
        low, opt, high = list(shape), list(shape), list(shape)
        per_input = {int(k): v for k, v in extra.get("dynamic_dims", {}).get(name, {}).items()}
        for axis, dim in enumerate(shape):
            if dim >= 0:
                continue
            span = per_input.get(axis, extra.get("batch") if axis == 0 else None)
            if span is None:
                raise SpecError(
                    f"input {name!r} has dynamic dimension {axis} (shape {shape}); give its range: "
                    f"BuildConfig(extra={{'batch': [1, 4, 8]}}) for the batch, or "
                    f"extra={{'dynamic_dims': {{{name!r}: {{{axis}: [min, opt, max]}}}}}}"
                )
            if len(span) != 3 or not 1 <= span[0] <= span[1] <= span[2]:
                raise SpecError(f"range {list(span)} for {name!r} dimension {axis} must be [min, opt, max] with 1 <= min <= opt <= max")
            low[axis], opt[axis], high[axis] = (int(v) for v in span)
        profiles[name] = [low, opt, high]
    return profiles


def _call(obj, attr: str, default):
    fn = getattr(obj, attr, None)
    if fn is None:
        return default
    try:
        return fn() if callable(fn) else fn
    except Exception:
        return default


def format_parser_errors(errors: Sequence, nodes: Sequence[tuple[str, str]] = ()) -> list[str]:
    """One line per ONNX parser error: node index, node name, op and reason.

    Args:
        errors: ``tensorrt.ParserError`` objects (or anything with ``code()``, ``desc()``, ``node()``,
            optionally ``node_name()`` / ``node_operator()``, which older parsers lack).
        nodes: ``(name, op_type)`` per ONNX node index, to name nodes when the parser gives only an index.
    """
    lines = []
    for error in errors:
        index = int(_call(error, "node", -1))
        known = nodes[index] if 0 <= index < len(nodes) else ("", "")
        name = _call(error, "node_name", "") or known[0]
        op = _call(error, "node_operator", "") or known[1]
        code = str(_call(error, "code", "")).rsplit(".", 1)[-1]
        where = f"node {index} {name!r} ({op or '?'})" if index >= 0 else "graph"
        lines.append(f"{where}: {code}: {str(_call(error, 'desc', '')).strip()}")
    return lines


def parse_failure(onnx_path: Path, errors: Sequence, nodes: Sequence[tuple[str, str]] = ()) -> ExportError:
    """The error for an ONNX file TensorRT's parser rejected, with every parser error and the fix."""
    lines = format_parser_errors(errors, nodes)
    unsupported = any("UNSUPPORTED" in line or "No importer" in line for line in lines)
    fix = ("an op or attribute this TensorRT cannot import: run the backend lint and merge-as-matmul passes "
           "(TensorRT < 10 has no ScatterElements reduction; TopK needs a constant K < 3840)" if unsupported
           else "check the graph with `deploy.py inspect` and the TensorRT log above")
    return ExportError(f"TensorRT's ONNX parser rejected {onnx_path} ({len(lines)} error(s)):\n  "
                       + "\n  ".join(lines or ["no error recorded"]) + f"\nFix: {fix}")


def diagnose_build_failure(messages: Sequence[str], plan: BuilderSettings) -> VitfoldError:
    """Name the cause of a failed ``build_serialized_network`` from the TensorRT log lines.

    Lines the logger marked as errors (``[E] ...``) are searched before warnings (``[W] ...``): a
    build logs routine warnings (a tactic that wanted more memory than the workspace, and was
    skipped) that are not why it failed.
    """
    text = "\n".join(messages)
    mb = plan.workspace_bytes >> 20
    causes = (
        (r"insufficient workspace|workspace.*(too small|insufficient)|insufficient memory",
         lambda found: SpecError(f"TensorRT could not build within the {mb} MiB workspace: {found} Fix: raise it, e.g. "
                                 f"BuildConfig(extra={{'workspace_mb': {mb * 2}}}), or free GPU memory (a Jetson shares "
                                 "it with the CPU: close other programs).")),
        (r"out of memory|OutOfMemory|cudaErrorMemoryAllocation",
         lambda found: SpecError(f"the GPU ran out of memory while building: {found} Fix: free GPU memory, lower the "
                                 "batch or the workspace_mb limit.")),
        (r"could not find any implementation|no implementation|not supported|unsupported",
         lambda found: ExportError(f"TensorRT has no implementation for part of the graph: {found} Fix: run the backend "
                                   "lint pass to find the node, and merge-as-matmul for token merges.")),
    )
    errors = [m for m in messages if m.startswith("[E]")]
    for group in (errors, [m for m in messages if m not in errors]):  # every cause in the errors first
        for pattern, make in causes:
            found = next((m for m in group if re.search(pattern, m, re.I)), None)
            if found:
                return make(found.strip())
    tail = "\n  ".join(m.strip() for m in messages[-5:]) or "no error logged"
    return ExportError(f"TensorRT engine build failed:\n  {tail}" if text else "TensorRT engine build failed (nothing logged)")


def check_graph_precision(dtypes: Iterable[str], plan: BuilderSettings) -> None:
    """On strongly typed TensorRT, refuse an fp16 build from a graph with no float16 tensor.

    Raises:
        SpecError: ``plan.precision_from_graph`` and no ``HALF`` among ``dtypes``.
    """
    if plan.precision_from_graph and not any(str(d).rsplit(".", 1)[-1].upper() in ("HALF", "FLOAT16") for d in dtypes):
        raise SpecError(
            f"TensorRT {plan.tensorrt} builds strongly typed networks only (no FP16 builder flag) and this graph has "
            "no float16 tensor, so the engine would run fp32. Fix: convert the graph first (vitfold's precision pass, "
            "or python -m modelopt.onnx.autocast --low_precision_type fp16 --keep_io_types) and build from that "
            "model.opt.onnx, or use --precision f32."
        )


def _require(ok, call: str) -> None:
    """TensorRT's ``set_input_shape`` / ``set_tensor_address`` return False instead of raising (the
    reason goes to the log): raise, so a rejected binding never runs on stale buffers.

    Raises:
        ArtifactError: ``ok`` is False.
    """
    if ok is False:
        raise ArtifactError(f"TensorRT refused {call} (see the TensorRT warnings logged above); rebuild the engine "
                            "for this shape with `deploy.py build --backend tensorrt`")
