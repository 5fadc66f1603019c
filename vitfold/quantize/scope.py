"""The reduction's own subgraph, derived from the ONNX graph: what quantization must leave float.

A token-reduction method adds two kinds of nodes to a ViT:

* **decisions**: TopK, ArgMax, ArgMin and NonZero, whose indices say which tokens are merged, kept,
  pruned or clustered (ToMe's ``argmax`` / ``argsort`` of the similarity, EViT's and Top-K's top-k of
  class attention, the gates' kept counts, clustering's nearest centre);
* **their inputs and index paths**: the computations that feed only decisions (ToMe's metric
  normalisation and similarity MatMul, EViT's class-attention slice and mean, the clustering
  distances), and the computations that read only decisions and constants (index arithmetic, the
  token sizes that proportional attention takes the log of).

Quantizing those flips decisions: a similarity matrix rounded to 256 levels changes which pairs are
most similar. :func:`reduction_scope` finds them without a single hand-typed node name, by two
closures over the graph:

1. backward: a node belongs to the scope when it is a decision, or when every consumer of every
   output it has is in the scope (so it influences the outputs only through decisions);
2. forward: a node belongs to the scope when every input it reads that is not a constant comes from
   the scope (index arithmetic);

and one walk back from each decision's scores (a fused site's, :data:`FUSED_SCORE_INPUT`) and from each Log (proportional attention's log of the
token sizes) through the ops that compute scores from activations (:data:`SCORE_OPS`: an
activation x activation MatMul, Softmax, reductions, slices, reshapes, scaling by a constant), up to
the first op outside that list (a Linear, a LayerNorm, a residual Add). That adds the computations
a decision shares with the main path: EViT's class attention ``softmax(q k^T)`` (its MatMul then stays
float in the blocks where EViT prunes), the slices that take ToMe's keys, the size channel.

Expedite's clustering is soft (each token joins every centre with softmax weights): it makes no hard
choice, its scope is empty and its distances are quantized like attention's ``q k^T``.

A dense ViT has no decision, so its scope is empty and its twin is quantized with no ignored node: the
same calibration, preset and quantizer placement on every layer they share.

No torch; onnx only.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import onnx

#: Ops whose outputs are token choices.
DECISION_OPS = frozenset({"TopK", "ArgMax", "ArgMin", "NonZero"})
#: Ops the walk back from a decision's scores passes through (with no weight: see :func:`_is_score_op`).
SCORE_OPS = frozenset({"MatMul", "Softmax", "Slice", "Gather", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
                       "Flatten", "ReduceMean", "ReduceMax", "ReduceSum", "ReduceL2", "Mul", "Div", "Where", "Log"})

#: vitfold's fused sites (``build --fused-ops``, :mod:`vitfold.passes.fuse_sites`) make their choices
#: inside: ``(domain, op type) -> the input they rank by``, walked back like a decision's scores, so that
#: a fused graph's scope is its graph form's less the fused nodes, and both quantize alike. EViTPrune:
#: the class attention (its MatMul stays float, as in the graph form). ToMeMerge needs no walk: in its
#: graph form the walk stops at the Where that masks the protected tokens (it reads a constant mask),
#: so the scope is the site's own nodes, all inside the fused op.
FUSED_SCORE_INPUT = {("vitfold", "EViTPrune"): 1}


@dataclass(frozen=True)
class ReductionScope:
    """The reduction subgraph of one ONNX graph.

    Attributes:
        nodes: names of every node in the scope (decisions included), in graph order.
        decisions: decision node name -> the name of its index output (TopK: output 1).
        sites: the decisions grouped by reduction site (decisions that read a common non-scope tensor,
            or one another's indices), each a tuple of decision names; sites in graph order.
    """

    nodes: tuple[str, ...]
    decisions: dict
    sites: tuple[tuple[str, ...], ...]

    def __len__(self) -> int:
        return len(self.nodes)

    def to_json(self) -> dict:
        return {"nodes": len(self.nodes), "decisions": len(self.decisions), "sites": len(self.sites)}


def reduction_scope(model: onnx.ModelProto) -> ReductionScope:
    """The nodes of ``model`` that compute token choices, and the choices themselves.

    Node names must be unique and non-empty (the exporter's and onnx-graphsurgeon's are).

    Raises:
        ValueError: a node without a name or two nodes with the same name (the scope could not be
            handed to a quantizer by name).
    """
    graph = model.graph
    nodes = list(graph.node)
    names = [n.name for n in nodes]
    if any(not n for n in names) or len(set(names)) != len(names):
        raise ValueError("every node needs a unique name to be kept out of quantization; run the graph through "
                         "vitfold's passes (onnx-graphsurgeon names them)")
    initializers = {t.name: t for t in graph.initializer}
    constants = set(initializers)
    constants |= {o for n in nodes if n.op_type == "Constant" for o in n.output}
    producer = {o: n.name for n in nodes for o in n.output if o}
    consumers: dict[str, list[str]] = defaultdict(list)
    for n in nodes:
        for i in n.input:
            if i:
                consumers[i].append(n.name)
    graph_outputs = {o.name for o in graph.output}
    by_name = {n.name: n for n in nodes}

    scope = {n.name for n in nodes if n.op_type in DECISION_OPS}
    decisions = {n.name: (n.output[1] if n.op_type == "TopK" else n.output[0])
                 for n in nodes if n.op_type in DECISION_OPS}
    changed = True
    while changed:
        changed = False
        for n in reversed(nodes):  # backward: every consumer in the scope
            if n.name in scope or n.op_type == "Constant":
                continue
            outs = [o for o in n.output if o]
            users = [c for o in outs for c in consumers[o]]
            if users and not any(o in graph_outputs for o in outs) and all(c in scope for c in users):
                scope.add(n.name)
                changed = True
        for n in nodes:  # forward: every non-constant input from the scope
            if n.name in scope:
                continue
            live = [i for i in n.input if i and i not in constants]
            if live and all(producer.get(i) in scope for i in live):
                scope.add(n.name)
                changed = True
    exclusive = set(scope)
    for n in nodes:  # the scores decisions share with the main path, and the size channel's log
        fused = FUSED_SCORE_INPUT.get((n.domain, n.op_type))
        if n.op_type in DECISION_OPS or n.op_type == "Log" or fused is not None:
            stack, seen = [n.input[0 if fused is None else fused]], set()
            while stack:  # through the scope's own nodes too: a fused site has none, its graph form has
                source = producer.get(stack.pop())
                if source is None or source in seen or not _is_score_op(by_name[source], constants, initializers):
                    continue
                seen.add(source)
                scope.add(source)
                stack.extend(by_name[source].input)
        if n.op_type == "Log":
            scope.add(n.name)
    return ReductionScope(
        nodes=tuple(n for n in names if n in scope),
        decisions={n: decisions[n] for n in names if n in decisions},
        sites=_sites(by_name, producer, exclusive, list(decisions)),
    )


def _is_score_op(node: onnx.NodeProto, constants: set, initializers: dict) -> bool:
    """A node the walk back from a decision passes: in :data:`SCORE_OPS`, reading no weight (an
    initializer with more than one element), and for Mul / Div scaling by a constant."""
    if node.op_type not in SCORE_OPS:
        return False
    if any(i in initializers and _size(initializers[i]) > 1 for i in node.input if i):
        return False
    if node.op_type in ("Mul", "Div"):
        return any(i in constants for i in node.input[:2])
    return True


def _size(tensor: onnx.TensorProto) -> int:
    size = 1
    for d in tensor.dims:
        size *= d
    return size


def _sites(by_name: dict, producer: dict, scope: set, decisions: list[str]) -> tuple[tuple[str, ...], ...]:
    """Group decisions into reduction sites (union-find): two decisions share a site when one reads
    the other's output through scope nodes, or both read the same tensor from outside the scope."""
    parent = {d: d for d in decisions}

    def find(d: str) -> str:
        while parent[d] != d:
            parent[d] = parent[parent[d]]
            d = parent[d]
        return d

    boundary_owner: dict[str, str] = {}
    for d in decisions:
        stack, seen = list(by_name[d].input), set()
        while stack:
            tensor = stack.pop()
            if not tensor or tensor in seen:
                continue
            seen.add(tensor)
            source = producer.get(tensor)
            if source is None or source not in scope:  # a graph input, constant or main-path tensor
                if source is not None:
                    other = boundary_owner.setdefault(tensor, d)
                    parent[find(d)] = find(other)
                continue
            if source in parent and source != d:  # another decision: same site
                parent[find(d)] = find(source)
                continue
            stack.extend(by_name[source].input)
    groups: dict[str, list[str]] = defaultdict(list)
    for d in decisions:
        groups[find(d)].append(d)
    return tuple(tuple(g) for g in groups.values())
