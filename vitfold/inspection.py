"""Read an ONNX file's structure and vitfold metadata, lint it for a backend, and try every registered
pass on it (``deploy.py inspect``). Needs onnx (and onnx-graphsurgeon + ONNX Runtime for the passes);
no torch. The file is only read, never written.
"""

from __future__ import annotations

import inspect as pyinspect
import json
from collections import Counter
from pathlib import Path
from typing import Optional

import onnx

from .artifact import MANIFEST
from .errors import SpecError, VitfoldError
from .passes.lint import TARGETS, GraphView, errors, lint, load_onnx


def _describe(value: onnx.ValueInfoProto) -> dict:
    t = value.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
    return {"name": value.name, "shape": dims, "dtype": onnx.TensorProto.DataType.Name(t.elem_type).lower()}


def structure(proto: onnx.ModelProto) -> dict:
    """Ops, inputs/outputs with shapes, tensors with dynamic dimensions and ``vitfold.*`` metadata.

    Returns:
        ``{"opset", "ir_version", "nodes", "ops" (op -> count, most common first), "inputs", "outputs"
        ([{"name", "shape", "dtype"}]), "dynamic" (names of tensors with a non-static dim), "metadata"
        (``vitfold.`` keys, JSON-decoded; ``{}`` for a file vitfold did not export)}``.
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception:  # noqa: BLE001 - an un-inferable graph still has ops and I/O to show
        inferred = proto
    graph = inferred.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [v for v in graph.input if v.name not in initializers]
    values = [_describe(v) for v in list(inputs) + list(graph.value_info) + list(graph.output)]
    metadata = {}
    for prop in proto.metadata_props:
        if prop.key.startswith("vitfold."):
            try:
                metadata[prop.key.removeprefix("vitfold.")] = json.loads(prop.value)
            except ValueError:
                metadata[prop.key.removeprefix("vitfold.")] = prop.value
    return {
        "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
        "ir_version": proto.ir_version,
        "nodes": len(proto.graph.node),
        "ops": dict(Counter(n.op_type for n in proto.graph.node).most_common()),
        "inputs": [_describe(v) for v in inputs],
        "outputs": [_describe(v) for v in graph.output],
        "dynamic": sorted({v["name"] for v in values if any(not isinstance(d, int) for d in v["shape"])}),
        "metadata": metadata,
    }


def _needs_options(fn) -> list[str]:
    """Keyword parameters a pass requires (no default), after the graph."""
    params = list(pyinspect.signature(fn).parameters.values())[1:]
    return [p.name for p in params if p.default is pyinspect.Parameter.empty
            and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]


def _default_opset(proto: onnx.ModelProto) -> Optional[int]:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def try_passes(proto: onnx.ModelProto, target: Optional[str] = None) -> list[dict]:
    """Apply every registered pass alone to ``proto`` (unverified: no ONNX Runtime comparison) and say
    what it would do.

    Returns:
        One dict per pass in :data:`vitfold.passes.PASSES`: ``name``, ``description``, ``status``
        (``applies``: the op histogram or the opset changes; ``no change``; ``needs options``: required keyword
        options, listed in ``message``; ``refused``: the pass raised, ``message`` says why),
        ``nodes_before`` / ``nodes_after``, ``ops_delta`` (op -> count change) and, with a ``target``,
        ``errors_after`` / ``warnings_after`` (lint findings on the result).
    """
    from .passes import PASSES
    from .passes.pipeline import apply_pass

    before_ops = Counter(n.op_type for n in proto.graph.node)
    opset_before = _default_opset(proto)
    results = []
    for name, registered in PASSES.items():
        entry = {"name": name, "description": registered.description, "nodes_before": len(proto.graph.node),
                 "nodes_after": None, "ops_delta": {}, "message": ""}
        required = _needs_options(registered.fn)
        if required:
            results.append({**entry, "status": "needs options", "message": "needs " + ", ".join(required)})
            continue
        try:
            result = apply_pass(proto, name)
        except VitfoldError as exc:
            results.append({**entry, "status": "refused", "message": str(exc)})
            continue
        after_ops = Counter(n.op_type for n in result.graph.node)
        delta = {op: after_ops[op] - before_ops[op] for op in sorted(before_ops | after_ops)
                 if after_ops[op] != before_ops[op]}
        opset_after = _default_opset(result)
        if opset_after != opset_before:
            entry["message"] = f"opset {opset_before} -> {opset_after}"
        entry.update(nodes_after=len(result.graph.node), ops_delta=delta,
                     status="applies" if delta or opset_after != opset_before else "no change")
        if target is not None:
            findings = lint(result, target)
            entry.update(errors_after=len(errors(findings)), warnings_after=len(findings) - len(errors(findings)))
        results.append(entry)
    return results


def onnx_of(path: Path) -> Path:
    """The ONNX file to inspect: ``path`` itself, or for a build directory its traced ``model.onnx``
    (the manifest's ``files["onnx"]``; the passes column then shows what each pass would change).

    Raises:
        SpecError: a directory that is not a vitfold build, or a build whose manifest lists no ONNX file.
    """
    path = Path(path)
    if not path.is_dir():
        return path
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise SpecError(f"{path} is a directory, not an ONNX file, and not a vitfold build (no readable {MANIFEST}); "
                        "give an .onnx file") from exc
    name = manifest.get("files", {}).get("onnx") if isinstance(manifest, dict) else None
    if not name:
        raise SpecError(f"{path / MANIFEST} lists no ONNX file; give an .onnx file")
    return path / name


def inspect_onnx(path: Path, target: Optional[str] = None, *, passes: bool = True) -> dict:
    """Everything ``deploy.py inspect`` shows about an ONNX file.

    Args:
        path: the ONNX file (only read).
        target: a lint target (:data:`vitfold.passes.lint.TARGETS`); None lints every target and
            reports counts only.
        passes: also try every registered pass (:func:`try_passes`; seconds on DeiT-S).

    Returns:
        :func:`structure`'s dict plus ``tokens`` (tokens per block from the metadata, or None),
        ``target``, ``lint`` (findings as dicts, with a target) or ``lint_counts`` (target ->
        {"errors", "warnings"}, without), and ``passes`` (:func:`try_passes`, or ``[]``).

    Raises:
        SpecError: the file is missing or not an ONNX model, or the target is unknown.
    """
    proto = load_onnx(path)
    info = structure(proto)
    schedule = info["metadata"].get("schedule")
    info["tokens"] = schedule.get("tokens") if isinstance(schedule, dict) else None
    info["target"] = target
    view = GraphView(proto)
    if target is not None:
        info["lint"] = [f.to_json() for f in lint(view, target)]
    else:
        counts = {}
        for name in TARGETS:
            findings = lint(view, name)
            counts[name] = {"errors": len(errors(findings)), "warnings": len(findings) - len(errors(findings))}
        info["lint_counts"] = counts
    info["passes"] = try_passes(proto, target) if passes else []
    return info


def render(info: dict, console, title: str = "") -> None:
    """Print :func:`inspect_onnx`'s dict as text and rich tables on ``console``."""
    from rich.table import Table

    console.print(f"[bold]{title}[/]  opset {info['opset']}, IR {info['ir_version']}, {info['nodes']} nodes")
    for value in info["inputs"] + info["outputs"]:
        console.print(f"  {value['name']}: {value['shape']} {value['dtype']}")
    console.print("ops: " + ", ".join(f"{op} {n}" for op, n in info["ops"].items()))
    console.print(f"dynamic dimensions: {', '.join(info['dynamic']) or 'none'}")
    if info["tokens"] is not None:
        console.print(f"tokens per block: {info['tokens']}")
    elif info["metadata"]:
        console.print("vitfold metadata without a schedule: tokens per block unknown")
    else:
        console.print("no vitfold metadata (not exported by vitfold): tokens per block unknown")
    if info["target"] is not None:
        findings = info["lint"]
        table = Table(title=f"lint {info['target']}: {sum(f['severity'] == 'error' for f in findings)} errors, "
                            f"{sum(f['severity'] == 'warning' for f in findings)} warnings")
        for column in ("severity", "rule", "node", "op"):
            table.add_column(column, no_wrap=True)
        table.add_column("found", overflow="fold")
        fixes = {}
        for f in findings:
            style = "red" if f["severity"] == "error" else "yellow"
            table.add_row(f"[{style}]{f['severity']}[/]", f["rule"], f["node"] or "(graph)", f["op_type"], f["detail"])
            fixes.setdefault(f["rule"], f["message"].removeprefix(f["detail"] + ": "))
        console.print(table)
        for rule, fix in fixes.items():
            console.print(f"  [bold]{rule}[/]: {fix}")
    else:
        table = Table(title="lint per target (--backend for the findings)")
        for column in ("target", "errors", "warnings"):
            table.add_column(column, justify="right" if column != "target" else "left")
        for name, counts in info["lint_counts"].items():
            table.add_row(name, str(counts["errors"]), str(counts["warnings"]))
        console.print(table)
    if info["passes"]:
        table = Table(title="registered passes, each applied alone (unverified)")
        columns = ["pass", "status", "nodes", "op changes"] + (["lint after"] if info["target"] else []) + ["note"]
        for column in columns:
            table.add_column(column, overflow="fold")
        for p in info["passes"]:
            nodes = f"{p['nodes_before']} -> {p['nodes_after']}" if p["nodes_after"] is not None else str(p["nodes_before"])
            delta = ", ".join(f"{op} {n:+d}" for op, n in p["ops_delta"].items())
            row = [p["name"], p["status"], nodes, delta]
            if info["target"]:
                row.append(f"{p['errors_after']} errors, {p['warnings_after']} warnings" if "errors_after" in p else "")
            table.add_row(*row, p["message"])
        console.print(table)
