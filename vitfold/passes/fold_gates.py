"""fold-gates: a data-dependent token gate (NonZero compaction) as TopK to a capacity plus a mask.

``evit-mass`` exported as is (:meth:`vitfold.reduce.evit_mass.EViTMass.apply_dynamic`, batch 1) compacts
each gate's tokens with a boolean selection::

    select [1, T] = Concat(keep [1, n] (top-p rule), fused [1, 1])
    picked [u, C] = GatherND(candidates [1, T, C], Transpose(NonZero(select)))      u: data-dependent
    tokens [P + u, C] = Concat(prefix tokens [P, C], picked)

after which every token dimension is dynamic. (vitfold before 0.1.1 selected the prefix with the same
mask; such exports are refused: export again.) This pass rewrites each gate, in order, into the bounded
form of :mod:`vitfold.reduce.evit_mass` with a constant capacity ``K``:

1. ``keep`` (every consumer, the fused-token weights included) becomes ``And(keep, arange(n) < K)``:
   an image that keeps more than ``K`` tokens keeps its ``K`` best and fuses the rest, as the
   re-traced bounded model does;
2. the compaction becomes ``TopK(select * (T - arange(T)), K + 1)`` (distinct keys, so the true
   entries come first in their original order without relying on tie-breaking) and a ``Gather`` of
   those slots: a static ``[K + 1, C]``, ``[P + K + 1, C]`` with the prefix in front;
   ``valid = Concat(true [1, P], values > 0)`` marks the real ones;
3. every ``Softmax`` downstream of the gate (until the next one) gets ``Where(valid, 0, -inf)`` added
   on its last axis, which must be that token axis: invalid slots are never attended to, the class
   token gives them 0 attention, so later gates never keep them and the fused token weighs them 0;
4. shapes are re-inferred and constant-folded, so later gates and Reshape targets become static.

The pass refuses (``PassError``) rather than guess: no NonZero gate, a different number of
capacities than gates, a gate not shaped like the selection above, a batch other than 1, a capacity
outside ``1..n``, a gated Softmax whose last axis is not the gate's token axis, or a mean / max / min
(any reduction but ReduceSum) over an axis as long as a gate's slots or its non-prefix part (e.g.
average pooling, which would count invalid slots: use the re-traced bounded model, which masks
pooling). ReduceSum is let through: in evit-mass graphs it sums attention-weighted tokens (the fused
token), where invalid slots weigh 0; a graph that pools with ReduceSum / count would not be caught. On images whose kept counts fit the capacities the outputs equal the
dynamic graph's up to float summation order (declared tolerance 1e-4, as ONNX Runtime vs torch).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import PassError
from ..runtimes.ort import MAX_IR_VERSION
from ._registry import register_pass

log = logging.getLogger(__name__)

TOLERANCE = 1e-4
_REDUCTIONS = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
               "ReduceLogSumExp", "ReduceSumSquare"}


@dataclass(frozen=True)
class GateSite:
    """One NonZero compaction: the nodes and tensors the rewrite touches."""

    nonzero: gs.Node
    gather: gs.Node
    select: gs.Tensor  # [1, T] bool
    keep: gs.Tensor  # [1, n] bool, the top-p rule
    prefix: int  # P protected tokens, concatenated in front of the selected ones
    candidates: gs.Tensor  # [1, T, C]


def find_gates(graph: gs.Graph) -> list[gs.Node]:
    """The NonZero nodes of ``graph`` in topological order (data-dependent compactions)."""
    return [node for node in graph.toposort().nodes if node.op == "NonZero"]


def _static(tensor: gs.Tensor) -> bool:
    return tensor.shape is not None and all(isinstance(d, int) for d in tensor.shape)


def match_gate(nonzero: gs.Node) -> GateSite:
    """Check that ``nonzero`` is an evit-mass compaction (see the module docstring).

    Raises:
        PassError: naming the node and what differs.
    """
    where = f"gate at {nonzero.name}"
    consumers = nonzero.outputs[0].outputs
    if len(consumers) != 1 or consumers[0].op != "Transpose" or list(consumers[0].attrs.get("perm", [])) != [1, 0]:
        raise PassError(f"{where}: NonZero is not followed by Transpose(perm=[1, 0]) alone; fold-gates folds evit-mass exports only")
    users = consumers[0].outputs[0].outputs
    if len(users) != 1 or users[0].op != "GatherND" or users[0].attrs.get("batch_dims", 0) != 0:
        raise PassError(f"{where}: the NonZero indices do not feed one GatherND; fold-gates folds evit-mass exports only")
    gather = users[0]
    select, candidates = nonzero.inputs[0], gather.inputs[0]
    if not (_static(select) and _static(candidates)) or len(select.shape) != 2 or len(candidates.shape) != 3:
        raise PassError(f"{where}: selection {select.shape} / tokens {candidates.shape} are not static [1, T] / [1, T, C]; "
                        "earlier gates must fold first")
    if select.shape[0] != 1 or candidates.shape[0] != 1 or candidates.shape[1] != select.shape[1]:
        raise PassError(f"{where}: batch {candidates.shape[0]}: fold-gates folds batch-1 exports (the dynamic model "
                        "exports per image); re-trace the bounded model (EViTMass.apply) for other batches")
    concat = select.inputs[0] if select.inputs else None
    if concat is None or concat.op != "Concat" or len(concat.inputs) != 2 or concat.attrs.get("axis") not in (1, -1):
        raise PassError(f"{where}: the selection is not Concat(keep, fused) on the token axis (an export of vitfold "
                        "before 0.1.1 selects the prefix too: export it again)")
    keep, fused = concat.inputs
    if not _static(keep) or len(keep.shape) != 2 or not _static(fused) or fused.shape[1] != 1:
        raise PassError(f"{where}: selection parts {keep.shape}, {fused.shape} are not [1, n], [1, 1]")
    after = [n for n in gather.outputs[0].outputs if n.op == "Concat"]
    front = after[0].inputs[0] if len(after) == 1 and len(after[0].inputs) == 2 and after[0].inputs[1] is gather.outputs[0] \
        and after[0].attrs.get("axis") in (0, -2) else None
    if front is None or not _static(front) or len(front.shape) != 2:
        raise PassError(f"{where}: the selected tokens are not concatenated after the prefix tokens [P, C] (Concat axis 0)")
    return GateSite(nonzero, gather, select, keep, front.shape[0], candidates)


def _layer(graph: gs.Graph, op: str, name: str, inputs: list, dtype, attrs: dict | None = None, outputs: int = 1):
    outs = [gs.Variable(f"{name}_out{i}" if outputs > 1 else f"{name}_out", dtype=dtype if i == 0 else np.int64)
            for i in range(outputs)]
    graph.layer(op=op, name=name, inputs=inputs, outputs=outs, attrs=attrs or {})
    return outs if outputs > 1 else outs[0]


def _rewrite(graph: gs.Graph, site: GateSite, index: int, capacity: int) -> str:
    """Rewrite one gate in place; returns the name of its ``valid [1, P + K + 1]`` bool tensor."""
    name = f"fold_gates_{index}"
    n, T = site.keep.shape[1], site.select.shape[1]
    if not 1 <= capacity <= n:
        raise PassError(f"gate {index} ({site.nonzero.name}): capacity {capacity} outside 1..{n} (the gate ranks {n} tokens)")
    cap_mask = gs.Constant(f"{name}_capacity_mask", (np.arange(n) < capacity)[None])
    clamped = _layer(graph, "And", f"{name}_keep", [site.keep, cap_mask], np.bool_)
    for consumer in list(site.keep.outputs):
        if consumer.name != f"{name}_keep":
            for position, tensor in enumerate(consumer.inputs):
                if tensor is site.keep:
                    consumer.inputs[position] = clamped
    slots = min(T, capacity + 1)
    as_float = _layer(graph, "Cast", f"{name}_select_float", [site.select], np.float32, {"to": onnx.TensorProto.FLOAT})
    rank = gs.Constant(f"{name}_rank", (T - np.arange(T, dtype=np.float32))[None])
    key = _layer(graph, "Mul", f"{name}_key", [as_float, rank], np.float32)
    values, order = _layer(graph, "TopK", f"{name}_topk", [key, gs.Constant(f"{name}_k", np.array([slots], dtype=np.int64))],
                           np.float32, {"axis": 1, "largest": 1, "sorted": 1}, outputs=2)
    valid = _layer(graph, "Greater", f"{name}_valid", [values, gs.Constant(f"{name}_zero", np.array(0, np.float32))], np.bool_)
    flat = _layer(graph, "Squeeze", f"{name}_order", [order, gs.Constant(f"{name}_axis0", np.array([0]))], np.int64)
    picked = _layer(graph, "Gather", f"{name}_gather", [site.candidates, flat], site.candidates.dtype, {"axis": 1})
    out = site.gather.outputs[0]
    site.gather.outputs.clear()
    graph.layer(op="Squeeze", name=f"{name}_tokens", inputs=[picked, gs.Constant(f"{name}_batch", np.array([0]))], outputs=[out])
    out.shape = None
    ones = gs.Constant(f"{name}_prefix_valid", np.ones((1, site.prefix), dtype=np.bool_))  # the prefix, in front
    valid = _layer(graph, "Concat", f"{name}_valid_all", [ones, valid], np.bool_, {"axis": 1})
    return valid.name


def _plain_shapes(graph: gs.Graph) -> None:
    """``Shape(x, start, end)`` -> ``Slice(Shape(x), start, end)``: onnx-graphsurgeon 0.6.1's shape
    folding ignores Shape's ``start`` / ``end`` (opset 15) and would fold the whole shape."""
    for node in list(graph.nodes):
        if node.op != "Shape" or not ({"start", "end"} & set(node.attrs)):
            continue
        start, end = node.attrs.pop("start", 0), node.attrs.pop("end", None)
        if start == 0 and end is None:
            continue
        out = node.outputs[0]
        full = gs.Variable(f"{node.name}_full", dtype=np.int64)
        node.outputs = [full]
        bounds = [gs.Constant(f"{node.name}_start", np.array([start])),
                  gs.Constant(f"{node.name}_end", np.array([np.iinfo(np.int64).max if end is None else end]))]
        graph.layer(op="Slice", name=f"{node.name}_range", inputs=[full, *bounds], outputs=[out])


def _reinfer(graph: gs.Graph) -> gs.Graph:
    """Export, re-run shape inference from scratch (with data propagation), re-import and fold, until
    the graph stops changing: the shapes a folded gate makes static reach the next gate."""
    for _ in range(4):
        model = gs.export_onnx(graph.cleanup().toposort())
        del model.graph.value_info[:]
        model.ir_version = min(model.ir_version, MAX_IR_VERSION)
        graph = gs.import_onnx(onnx.shape_inference.infer_shapes(model, data_prop=True))
        _plain_shapes(graph)
        before = len(graph.nodes)
        graph.fold_constants(fold_shapes=True, error_ok=False).cleanup()
        if len(graph.nodes) == before:
            break
    model = gs.export_onnx(graph.toposort())
    del model.graph.value_info[:]
    return gs.import_onnx(onnx.shape_inference.infer_shapes(model, data_prop=True))


def _gate_of(graph: gs.Graph, sources: dict[str, int]) -> dict[str, int]:
    """Per tensor name: the latest gate (index) it depends on; tensors of no gate are absent."""
    gate: dict[str, int] = dict(sources)
    for node in graph.toposort().nodes:
        upstream = [gate[t.name] for t in node.inputs if t.name in gate]
        if upstream:
            for t in node.outputs:
                gate[t.name] = max(upstream + ([gate[t.name]] if t.name in gate else []))
    return gate


def _mask_attention(graph: gs.Graph, valid_names: list[str], token_names: list[str], prefixes: list[int]) -> int:
    """Add each gate's ``-inf`` bias to the Softmax nodes it governs; returns how many."""
    tensors = graph.tensors()
    gate = _gate_of(graph, {name: i for i, name in enumerate(token_names)})
    biases: dict[int, gs.Tensor] = {}
    masked = 0
    for node in list(graph.nodes):
        index = max((gate[t.name] for t in node.inputs if t.name in gate), default=None)
        if index is None:
            continue
        slots = tensors[valid_names[index]].shape[1]
        if node.op in _REDUCTIONS:
            data = node.inputs[0]
            axes = node.inputs[1].values.tolist() if len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant) \
                else node.attrs.get("axes")
            rank = len(data.shape or ())
            token_sized = range(slots - prefixes[index] - 1, slots + 1)  # all slots, the non-prefix ones, without the fused
            if axes is None or not _static(data) or any(data.shape[a % rank] in token_sized for a in np.atleast_1d(axes)):
                raise PassError(f"{node.name} ({node.op} over {data.shape}, axes {axes}) may reduce over gate {index}'s "
                                f"{slots} token slots and would count invalid ones (e.g. average pooling); re-trace the "
                                "bounded model (EViTMass.apply), which masks pooling")
        if node.op != "Softmax":
            continue
        logits = node.inputs[0]
        axis = node.attrs.get("axis", -1)
        if not _static(logits) or axis % len(logits.shape) != len(logits.shape) - 1 or logits.shape[-1] != slots:
            raise PassError(f"{node.name} (Softmax over axis {axis} of {logits.shape}) follows gate {index} but its last "
                            f"axis is not the gate's {slots} token slots; cannot mask it")
        if index not in biases:
            zero, ninf = gs.Constant(f"fold_gates_{index}_bias_zero", np.array(0, np.float32)), \
                gs.Constant(f"fold_gates_{index}_bias_ninf", np.array(-np.inf, np.float32))
            flat = _layer(graph, "Where", f"fold_gates_{index}_bias_flat", [tensors[valid_names[index]], zero, ninf], np.float32)
            biases[index] = _layer(graph, "Reshape", f"fold_gates_{index}_bias",
                                   [flat, gs.Constant(f"fold_gates_{index}_bias_shape", np.array([1, 1, 1, slots]))], np.float32)
        biased = _layer(graph, "Add", f"{node.name}_gate_bias", [logits, biases[index]], logits.dtype)
        node.inputs[0] = biased
        masked += 1
    return masked


@register_pass("fold-gates", tolerance=TOLERANCE)
def fold_gates(graph: gs.Graph, capacity: Sequence[int]) -> gs.Graph:
    """Fold NonZero token gates into TopK to a capacity plus an attention mask (static shapes).

    Args:
        graph: a batch-1 evit-mass dynamic export (``export_onnx(..., dynamic=True)``).
        capacity: kept tokens per gate, in gate order (from calibration: the manifest's capacity).

    Raises:
        PassError: see the module docstring.
    """
    capacity = [int(k) for k in capacity]
    gates = find_gates(graph)
    if not gates:
        raise PassError("fold-gates: the graph has no NonZero gate (already static?); nothing to fold")
    if len(gates) != len(capacity):
        raise PassError(f"fold-gates: {len(gates)} gates but {len(capacity)} capacities {capacity}; give one per gate")
    outputs = [t.name for t in graph.outputs]
    graph = _reinfer(graph)
    valid_names, token_names, prefixes = [], [], []
    for index, k in enumerate(capacity):
        site = match_gate(find_gates(graph)[0])
        prefixes.append(site.prefix)
        token_names.append(site.gather.outputs[0].name)
        valid_names.append(_rewrite(graph, site, index, k))
        graph.outputs.append(graph.tensors()[valid_names[-1]])  # kept alive until its Softmax nodes use it
        graph = _reinfer(graph)
        log.info("gate %d: %s -> TopK(%d) + mask (capacity %d)", index, site.nonzero.name,
                 graph.tensors()[valid_names[-1]].shape[1], k)
    masked = _mask_attention(graph, valid_names, token_names, prefixes)
    log.info("masked %d attention Softmax nodes", masked)
    graph.outputs = [graph.tensors()[name] for name in outputs]
    graph = _reinfer(graph)
    left = [n.name for n in graph.nodes if n.op == "NonZero"]
    if left:
        raise PassError(f"fold-gates: NonZero left after folding: {left}")
    return graph.cleanup().toposort()
