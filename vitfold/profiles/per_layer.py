"""Per-block profiles: the backend's own per-layer counters, attributed to blocks and categories.

Two steps, kept apart so that any backend plugs in:

1. :func:`onnx_places` maps every node of the ONNX graph a backend built from to a :class:`Place`:
   its block (``embed``, ``0`` .. ``depth - 1``, ``head``) and category (``attention``, ``mlp``,
   ``reduction``: token matching / TopK / gather / scatter / merge ops, ``other``). The dynamo
   exporter records the module path of each node (``pkg.torch.onnx.name_scopes``, e.g.
   ``blocks.3.attn.qkv``); nodes without one (ops of a reduction method's own forward, nodes a pass
   created) are placed by the graph topology, see :func:`onnx_places`.
2. :func:`attribute` takes the backend's per-layer times as ``(layer name, layer type, ms)`` records
   (OpenVINO ``get_profiling_info``, ONNX Runtime's profiler trace, TensorRT's IProfiler, ...) and
   maps each backend layer to the ONNX nodes it came from (the ``origins`` the backend names, or
   ONNX node names found in the layer name). Layers that match no ONNX node (reorders, layout
   transforms, renamed fusions) take the place of the layers they feed, else of the layers feeding
   them, in the backend's own graph (``inputs``).

A backend takes part by giving its runtime module a function
``profile_layers(directory, manifest, images, *, warmup, runs) -> {"layers": [{"name", "type", "ms",
"origins", "inputs"}, ...], "run_ms": [wall ms per timed run], "settings": {...}}`` where ``ms`` is
the layer's mean over the timed runs (see ``runtimes/openvino.py`` and ``runtimes/ort.py``), or
``"runs": [[record, ...] per run]`` instead of ``"layers"`` (TensorRT), averaged here.
:func:`profile_build_layers` runs it for a build and its dense twin, attributes the layers and
writes ``per_layer.json`` and ``per_layer.png``. No torch here; ``onnx`` reads the graphs.
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np

CATEGORIES = ("attention", "mlp", "reduction", "other")
EMBED, HEAD, UNKNOWN = "embed", "head", "?"
#: Top-level timm VisionTransformer modules before / after the blocks.
EMBED_MODULES = {"patch_embed", "cls_token", "reg_token", "pos_embed", "pos_drop", "patch_drop", "norm_pre", "rope"}
HEAD_MODULES = {"norm", "fc_norm", "head", "head_drop", "attn_pool"}
#: Block submodules and the category they belong to (timm ``Block``; layer scale and drop path too).
SUBMODULE_CATEGORY = {
    "norm1": "attention", "attn": "attention", "ls1": "attention", "drop_path1": "attention",
    "norm2": "mlp", "mlp": "mlp", "ls2": "mlp", "drop_path2": "mlp",
    "tome_site": "reduction",  # ToMe's matching and merge (vitfold.reduce.tome.ToMeSite)
    "prune_site": "reduction",  # EViT's / Top-K's top-k and fusion (vitfold.reduce.evit.PruneSite)
}
#: ONNX ops that carry a fused backend layer's time (a fused FC + bias is the FC's, not the Add's).
HEAVY_OPS = {"MatMul", "Gemm", "Conv", "ConvTranspose", "FusedMatMul", "Einsum"}
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)(?:\.([A-Za-z_]\w*))?")
_SUFFIXES = ("_kernel_time",)
PER_LAYER_JSON, PER_LAYER_PNG = "per_layer.json", "per_layer.png"


@dataclass(frozen=True)
class Place:
    """Where a node's time goes: ``block`` (``embed``, ``"0"``.., ``head``, ``?``) and ``category``
    (one of :data:`CATEGORIES`, or ``unattributed``); ``op`` is the ONNX op type when known."""

    block: str
    category: str
    op: str = ""


UNATTRIBUTED = Place(UNKNOWN, "unattributed")


@dataclass(frozen=True)
class LayerTime:
    """One backend layer's time for one inference.

    Attributes:
        name: the backend's layer name (OpenVINO node name, ONNX Runtime node name, TensorRT layer).
        type: the backend's layer type (``FullyConnected``, ``Gemm``, ...), for the table only.
        ms: time in milliseconds (median over the profiled runs).
        origins: ONNX node names the backend says this layer was built from (OpenVINO
            ``originalLayersNames``); empty: look for ONNX node names inside ``name``.
        inputs: names of the backend layers feeding this one (topology fallback); may be empty.
    """

    name: str
    type: str
    ms: float
    origins: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()

    @classmethod
    def of(cls, record: Union["LayerTime", Sequence, dict]) -> "LayerTime":
        """Accept a ``LayerTime``, a ``(name, type, ms[, origins[, inputs]])`` tuple or a dict."""
        if isinstance(record, LayerTime):
            return record
        if isinstance(record, dict):
            return cls(record["name"], record.get("type", ""), float(record["ms"]),
                       tuple(record.get("origins", ())), tuple(record.get("inputs", ())))
        name, kind, ms, *rest = record
        origins = tuple(rest[0]) if len(rest) > 0 else ()
        inputs = tuple(rest[1]) if len(rest) > 1 else ()
        return cls(str(name), str(kind), float(ms), origins, inputs)


@dataclass(frozen=True)
class AttributedLayer:
    """A backend layer with its place and how it was found: ``name`` (an ONNX node name matched),
    ``topology`` (from neighbouring layers) or ``none``."""

    name: str
    type: str
    ms: float
    block: str
    category: str
    how: str


# --------------------------------------------------------------------------------------- ONNX side


def _scopes(node) -> Optional[list[str]]:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            try:
                return list(ast.literal_eval(prop.value))
            except (ValueError, SyntaxError):
                return None
    return None


def _scope_place(scopes: Optional[list[str]], depth: int) -> tuple[Optional[str], Optional[str]]:
    """``(block, category)`` from a module path; either may be None (unknown, decided by topology)."""
    if not scopes:
        return None, None
    modules = scopes[1:-1]  # scopes[0] is the root '', scopes[-1] the op's own name
    if not modules:
        return None, None
    path = modules[-1]
    match = _BLOCK.search(path)
    if match:
        block = int(match.group(1))
        if block >= depth:
            return None, None
        return str(block), SUBMODULE_CATEGORY.get(match.group(2) or "")
    top = path.split(".")[0]
    if top in EMBED_MODULES:
        return EMBED, "other"
    if top in HEAD_MODULES:
        return HEAD, "other"
    return None, None


def _closure(start: set[int], edges: dict[int, list[int]]) -> set[int]:
    seen, stack = set(start), list(start)
    while stack:
        for nxt in edges.get(stack.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return seen


def onnx_places(onnx_path: Path, source_path: Optional[Path] = None, depth: Optional[int] = None) -> dict[str, Place]:
    """Place every node of an ONNX ViT graph in a block and a category.

    Rules, in order:

    * a node whose module path (dynamo exporter metadata, read from the node itself or from the
      same-named node of ``source_path``, the graph before passes) is ``blocks.L.<sub>`` is in
      block L; ``<sub>`` gives the category (``norm1``/``attn``/``ls1`` attention, ``norm2``/``mlp``/
      ``ls2`` MLP); ``patch_embed``, ``pos_embed``, ... are ``embed``; ``norm``/``head`` are ``head``;
    * any other node is in the latest block among its inputs (embed < 0 < 1 < ... < head); a node
      without inputs (constants) takes its first consumer's block;
    * its category: ``attention`` if it lies between two attention nodes of its block (on a path
      from one to another: the attention internals of a patched forward), the same for ``mlp``; a
      residual ``Add`` whose last-computed input is an attention (MLP) node of its block is attention
      (MLP); every other node inside a
      block is ``reduction`` (matching, TopK, gathers, scatters, merges, token sizes); outside the
      blocks, ``other``.

    Args:
        onnx_path: the graph the backend was built from (``model.opt.onnx``).
        source_path: the exporter's graph (``model.onnx``) whose node metadata survives here by name;
            None: only ``onnx_path``'s own metadata.
        depth: number of blocks; None: read from the graph (highest ``blocks.L`` + 1).

    Returns:
        ONNX node name -> :class:`Place`.
    """
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    scopes: dict[str, list[str]] = {}
    if source_path is not None and Path(source_path).is_file():
        for node in onnx.load(str(source_path), load_external_data=False).graph.node:
            found = _scopes(node)
            if found:
                scopes[node.name] = found
    nodes = list(graph.node)
    for node in nodes:
        found = _scopes(node)
        if found:
            scopes[node.name] = found
    if depth is None:
        found_blocks = [int(m.group(1)) for s in scopes.values() for m in [_BLOCK.search(".".join(s[1:-1]))] if m]
        depth = max(found_blocks) + 1 if found_blocks else 0
    order = {EMBED: -1, HEAD: depth}

    def rank(block: Optional[str]) -> int:
        if block in order:
            return order[block]
        return int(block) if block not in (None, UNKNOWN) else -2

    producer = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    preds = {i: sorted({producer[t] for t in node.input if t in producer}) for i, node in enumerate(nodes)}
    succs: dict[int, list[int]] = defaultdict(list)
    for i, ps in preds.items():
        for p in ps:
            succs[p].append(i)

    block: list[Optional[str]] = []
    category: list[Optional[str]] = []
    for i, node in enumerate(nodes):
        b, c = _scope_place(scopes.get(node.name), depth)
        if b is None:
            ranked = [block[p] for p in preds[i] if block[p] is not None]
            b = max(ranked, key=rank) if ranked else None
        block.append(b)
        category.append(c)
    for i in reversed(range(len(nodes))):  # constants and other input-less nodes: first consumer's block
        if block[i] is None:
            block[i] = next((block[s] for s in succs[i] if block[s] is not None), UNKNOWN)

    cores: dict[tuple[str, str], set[int]] = {}
    for cat in ("attention", "mlp"):
        members: dict[str, set[int]] = defaultdict(set)
        for i, c in enumerate(category):
            if c == cat:
                members[block[i]].add(i)
        for b, anchor in members.items():
            cores[(b, cat)] = _closure(anchor, succs) & _closure(anchor, preds)

    places: dict[str, Place] = {}
    for i, node in enumerate(nodes):
        b, c = block[i], category[i]
        if c is None:
            if b in (EMBED, HEAD, UNKNOWN):
                c = "other"
            elif i in cores.get((b, "attention"), ()):
                c = "attention"
            elif i in cores.get((b, "mlp"), ()):
                c = "mlp"
            elif branch := [p for p in preds[i] if category[p] in ("attention", "mlp") and block[p] == b]:
                # a residual Add: the branch is the input computed last (the other is the stream)
                c = category[max(branch)] if node.op_type in ("Add", "Sum") else "reduction"
            else:
                c = "reduction"
            category[i] = c
        places[node.name] = Place(b, c, node.op_type)
    return places


# ------------------------------------------------------------------------------------ backend side


_SEPARATORS = re.compile(r" \+ |,|/|\[|\]|\{|\}|\.\.\.")


def _candidates(name: str) -> list[str]:
    """ONNX node names a backend layer name may contain, most specific first: the name itself, then
    its parts split on ``/`` (OpenVINO ``node/WithoutBiases``, ONNX Runtime ``node/MatMulAddFusion``),
    `` + `` (TensorRT fused layers), ``,`` and TensorRT's ``{ForeignNode[first...last]}``."""
    for suffix in _SUFFIXES:
        if suffix and name.endswith(suffix):  # 3.8: no str.removesuffix
            name = name[: -len(suffix)]
    parts = [part.strip() for part in _SEPARATORS.split(name)]
    return list(dict.fromkeys(item for item in (name, *parts) if item))


def _resolve(layer: LayerTime, places: dict[str, Place]) -> Optional[Place]:
    found: list[Place] = []
    for origin in layer.origins or (layer.name,):
        whole, *parts = _candidates(origin)
        found += [places[whole]] if whole in places else [places[p] for p in parts if p in places]
    if not found:
        return None
    heavy = [p for p in found if p.op in HEAVY_OPS]
    pool = heavy or found
    return Counter(pool).most_common(1)[0][0]


def attribute(records: Iterable[Union[LayerTime, Sequence, dict]], places: dict[str, Place]) -> list[AttributedLayer]:
    """Attribute backend layer times to blocks and categories.

    Args:
        records: per-layer times, as :class:`LayerTime` or ``(name, type, ms[, origins[, inputs]])``.
        places: ONNX node name -> :class:`Place`, from :func:`onnx_places`.

    Returns:
        One :class:`AttributedLayer` per record, in order. A layer that matches no ONNX node by name
        takes the most common place among the layers it feeds, else among those feeding it
        (repeated until nothing changes); what is still unplaced is ``unattributed``.
    """
    layers = [LayerTime.of(r) for r in records]
    index = {layer.name: i for i, layer in enumerate(layers)}
    resolved: list[Optional[Place]] = [_resolve(layer, places) for layer in layers]
    how = ["name" if p is not None else "none" for p in resolved]
    preds = [[index[n] for n in layer.inputs if n in index] for layer in layers]
    succs: list[list[int]] = [[] for _ in layers]
    for i, ps in enumerate(preds):
        for p in ps:
            succs[p].append(i)
    changed = True
    while changed:
        changed = False
        for i in range(len(layers)):
            if resolved[i] is not None:
                continue
            for neighbours in (succs[i], preds[i]):
                known = [resolved[j] for j in neighbours if resolved[j] is not None]
                if known:
                    resolved[i] = Counter(Place(p.block, p.category) for p in known).most_common(1)[0][0]
                    how[i] = "topology"
                    changed = True
                    break
    return [
        AttributedLayer(layer.name, layer.type, layer.ms, *(((p.block, p.category) if p else (UNKNOWN, "unattributed"))), h)
        for layer, p, h in zip(layers, resolved, how)
    ]


def _block_order(block: str) -> tuple[int, int]:
    if block == EMBED:
        return (0, 0)
    if block == HEAD:
        return (2, 0)
    if block == UNKNOWN:
        return (3, 0)
    return (1, int(block))


def summarize(rows: Sequence[AttributedLayer], run_ms: float) -> dict:
    """Totals of an attribution against the measured run time ``run_ms`` (mean wall ms per run).

    Returns:
        ``blocks``: block -> category -> ms; ``categories``: category -> ms; ``counted_ms`` (sum of
        all layer times), ``attributed_ms`` (placed in a block and category), ``run_ms``,
        ``coverage`` (attributed / run), ``reduction_ms`` and ``reduction_pct`` (of the run),
        ``by_how``: ms found by name / by topology / not at all.
    """
    blocks: dict[str, dict[str, float]] = {}
    categories: dict[str, float] = defaultdict(float)
    by_how: dict[str, float] = defaultdict(float)
    for row in rows:
        by_how[row.how] += row.ms
        categories[row.category] += row.ms
        if row.category != "unattributed":
            blocks.setdefault(row.block, dict.fromkeys(CATEGORIES, 0.0))[row.category] += row.ms
    blocks = {b: blocks[b] for b in sorted(blocks, key=_block_order)}
    attributed = sum(sum(v.values()) for v in blocks.values())
    reduction = categories.get("reduction", 0.0)
    return {
        "run_ms": run_ms,
        "counted_ms": float(sum(r.ms for r in rows)),
        "attributed_ms": attributed,
        "coverage": attributed / run_ms if run_ms > 0 else 0.0,
        "reduction_ms": reduction,
        "reduction_pct": reduction / run_ms if run_ms > 0 else 0.0,
        "categories": {c: categories.get(c, 0.0) for c in (*CATEGORIES, "unattributed")},
        "blocks": blocks,
        "by_how": dict(by_how),
    }


def mean_layers(runs: Sequence[Sequence[Union[LayerTime, Sequence, dict]]]) -> list[LayerTime]:
    """Per-layer mean over several runs' records, matched by name, in the first run's order (for
    backends that report each run, e.g. TensorRT's IProfiler: ``{"runs": [[record, ...], ...]}``)."""
    first = [LayerTime.of(r) for r in runs[0]]
    totals: dict[str, float] = defaultdict(float)
    for run in runs:
        for record in run:
            layer = LayerTime.of(record)
            totals[layer.name] += layer.ms
    return [LayerTime(l.name, l.type, totals[l.name] / len(runs), l.origins, l.inputs) for l in first]


# ------------------------------------------------------------------------------------ build driver


@dataclass(frozen=True)
class LayerProfileOptions:
    """Counter pass settings: ``warmup`` untimed runs, then ``runs`` runs whose per-layer times are
    averaged (OpenVINO keeps only running means) and held against the mean wall time of those runs."""

    warmup: int = 5
    runs: int = 20

    def to_json(self) -> dict:
        return asdict(self)


def profile_variant(directory: Path, sample: np.ndarray, options: LayerProfileOptions) -> tuple[list[AttributedLayer], dict]:
    """Counter pass over one build directory (dense or reduced) on ``sample`` ``[B, 3, H, W]``.

    Raises:
        ArtifactError: not a build directory.
        SpecError: the backend has no per-layer profiler.
    """
    from .. import runtimes
    from ..artifact import read_manifest
    from ..errors import SpecError

    directory = Path(directory)
    manifest = read_manifest(directory)
    backend = manifest["build"]["backend"]
    if not runtimes.get_backend(backend).per_layer:
        raise SpecError(f"backend {backend!r} has no per-layer profiler; run `profile` without --per-layer")
    raw = runtimes.backend_module(backend).profile_layers(directory, manifest, sample, warmup=options.warmup, runs=options.runs)
    files = manifest["files"]
    # The graph the backend built: the fused graph of a --fused-ops build, else the optimised one.
    places = onnx_places(directory / files.get("fused", files.get("optimized", files["onnx"])), directory / files["onnx"])
    layers = raw["layers"] if "layers" in raw else mean_layers(raw["runs"])
    rows = attribute(layers, places)
    runs_ms = np.asarray(raw["run_ms"], dtype=float)
    # Layer times are means over the timed runs (OpenVINO's counters only exist as means), so the
    # run time they are held against is the mean wall time of the same runs.
    summary = summarize(rows, float(runs_ms.mean()))
    summary["run_median_ms"] = float(np.median(runs_ms))
    summary["counters_vs_run"] = summary["counted_ms"] / summary["run_ms"]
    if all(isinstance(r, dict) and "kernel_ms" in r for r in layers):
        summary["kernel_ms"] = float(sum(r["kernel_ms"] for r in layers))
    summary["layers_counted"] = len(layers)
    summary["settings"] = raw.get("settings", {})
    summary["run_samples_ms"] = [float(v) for v in runs_ms]
    summary["run_cov"] = float(runs_ms.std() / runs_ms.mean()) if len(runs_ms) > 1 else 0.0
    return rows, summary


def profile_build_layers(directory: Path, sample: np.ndarray, options: Optional[LayerProfileOptions] = None) -> dict:
    """Per-layer counter pass for a build and its dense twin; writes ``per_layer.json`` (every layer
    with its place) and ``per_layer.png`` (time per block by category, dense beside reduced).

    Returns:
        ``{"options", "dense": summary, "reduced": summary, "png"}`` (see :func:`summarize`); ``png`` is
        None where matplotlib is not installed (a device install).
    """
    from ..artifact import read_manifest

    options = options or LayerProfileOptions()
    directory = Path(directory)
    manifest = read_manifest(directory)
    variants = {"dense": directory / manifest["dense"], "reduced": directory} if "dense" in manifest else {"reduced": directory}
    result: dict = {"options": options.to_json()}
    layers: dict = {}
    for label, where in variants.items():
        rows, summary = profile_variant(where, sample, options)
        result[label] = summary
        layers[label] = [asdict(r) for r in rows]
    (directory / PER_LAYER_JSON).write_text(json.dumps({**result, "layers": layers}, indent=1) + "\n")
    try:
        from .plots import plot_block_times
    except ImportError:  # a device install without matplotlib: the tables, no chart
        result["png"] = None
        return result
    per_block = {k: result[k]["blocks"] for k in variants}
    order = sorted({b for v in per_block.values() for b in v}, key=_block_order)
    plot_block_times(per_block, directory / PER_LAYER_PNG, blocks=order,
                     categories=CATEGORIES, title=f"{manifest['name']}: time per block ({manifest['build']['backend']})")
    result["png"] = PER_LAYER_PNG
    return result


def render_markdown(per_layer: dict) -> list[str]:
    """Report lines: time per block and category (dense | reduced), coverage and reduction overhead."""
    variants = [v for v in ("dense", "reduced") if v in per_layer]
    lines = ["", "## Time per block (backend counters)", ""]
    header = "| block | " + " | ".join(f"{v} {c}" for v in variants for c in ("attn", "mlp", "reduction", "other")) + " |"
    lines += [header, "|" + "---|" * (1 + 4 * len(variants))]
    blocks = sorted({b for v in variants for b in per_layer[v]["blocks"]}, key=_block_order)
    for b in blocks:
        cells = []
        for v in variants:
            row = per_layer[v]["blocks"].get(b, dict.fromkeys(CATEGORIES, 0.0))
            cells += [f"{row[c]:.3f}" for c in CATEGORIES]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    lines.append("")
    for v in variants:
        s = per_layer[v]
        lines.append(
            f"- {v}: run {s['run_ms']:.2f} ms (mean, counters on), layers sum to {s['counted_ms']:.2f} ms; "
            f"attributed to a block {s['attributed_ms']:.2f} ms = **{s['coverage']:.1%} coverage** "
            f"(by name {s['by_how'].get('name', 0.0):.2f} ms, by topology {s['by_how'].get('topology', 0.0):.2f} ms); "
            f"reduction overhead **{s['reduction_ms']:.2f} ms = {s['reduction_pct']:.1%}** of the run."
        )
    from .latency import NOISY_COV

    noisy = [f"{v} {per_layer[v]['run_cov']:.1%}" for v in variants if per_layer[v]["run_cov"] > NOISY_COV]
    if noisy:
        lines += ["", f"**Warning: counter-pass CoV above {NOISY_COV:.0%}** ({', '.join(noisy)}): the machine was busy; "
                      "raw run times are in `run_samples_ms`; re-run."]
    chart = per_layer.get("png", PER_LAYER_PNG)
    lines += ["", (f"Chart: `{chart}`; " if chart else "No chart (matplotlib is not installed); ")
              + f"every layer with its place: `{PER_LAYER_JSON}`."]
    return lines
