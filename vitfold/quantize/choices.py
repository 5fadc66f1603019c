"""Token-choice agreement: does a quantized build merge, keep and prune the tokens its f32 build does?

The choices are the scope's *exits* (:func:`exits`): integer tensors the reduction subgraph computes
and the main path reads (the rows ToMe gathers and the slots it scatters into, the tokens EViT keeps
and fuses, the clusters tokens join). Both builds run on the same photos with those tensors as extra
outputs.

Counting (:func:`agreement`), per photo (per batch when the build's batch is above 1) and per
reduction site, in graph order:

* a site is **identical** when each of its exits holds the same indices in every row, order aside
  (the same tokens merged into the same tokens, the same tokens kept);
* indices after a site are positions in the token order that site left, so a later site is compared
  only while every earlier site of that photo left the tokens in exactly the same order; once one
  did not, the later sites of that photo count as not identical (a lower bound, never an overcount).

No torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx

from .scope import ReductionScope, reduction_scope


@dataclass(frozen=True)
class Exits:
    """The token choices of one graph: ``sites[k]`` is the tuple of exit tensor names of site k."""

    sites: tuple[tuple[str, ...], ...]
    dtypes: dict

    @property
    def names(self) -> list[str]:
        return [name for site in self.sites for name in site]


def exits(model: onnx.ModelProto, scope: ReductionScope | None = None) -> Exits:
    """The integer tensors the reduction subgraph hands to the main path, grouped by site.

    An exit belongs to the first site (in graph order) among the decisions upstream of it.
    """
    scope = scope or reduction_scope(model)
    inferred = onnx.shape_inference.infer_shapes(model)
    dtypes = {v.name: v.type.tensor_type.elem_type for v in
              list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input)}
    integer = {onnx.TensorProto.INT64, onnx.TensorProto.INT32}
    nodes = {n.name: n for n in model.graph.node}
    inside = set(scope.nodes)
    producer = {o: n.name for n in model.graph.node for o in n.output if o}
    site_of = {d: k for k, site in enumerate(scope.sites) for d in site}
    readers: dict[str, list[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n.name)
    per_site: dict[int, list[str]] = {}
    for name in scope.nodes:
        for out in nodes[name].output:
            if out and dtypes.get(out) in integer and any(r not in inside for r in readers.get(out, ())):
                site = _upstream_site(out, nodes, producer, inside, site_of)
                if site is not None:
                    per_site.setdefault(site, []).append(out)
    return Exits(tuple(tuple(per_site[k]) for k in sorted(per_site)),
                 {name: dtypes[name] for k in per_site for name in per_site[k]})


def _upstream_site(tensor: str, nodes: dict, producer: dict, inside: set, site_of: dict):
    stack, seen, found = [tensor], set(), []
    while stack:
        t = stack.pop()
        node = producer.get(t)
        if node is None or node in seen or node not in inside:
            continue
        seen.add(node)
        if node in site_of:
            found.append(site_of[node])
        stack.extend(nodes[node].input)
    return min(found) if found else None


@dataclass(frozen=True)
class ChoiceAgreement:
    """Token-choice agreement of a candidate build with its reference.

    Attributes:
        identical: share of sites x photos whose choices are identical (see the module docstring).
        first_site: share of photos whose first site's choices are identical.
        first_site_tokens: at the first site (positions are the original tokens there), the share of
            indices the two builds have in common, row by row (a multiset intersection): how far
            apart the choices are when they are not identical.
        sites / photos: the counts the shares are taken over.
    """

    identical: float
    first_site: float
    first_site_tokens: float
    sites: int
    photos: int

    def to_json(self) -> dict:
        return {"identical": self.identical, "first_site": self.first_site, "first_site_tokens": self.first_site_tokens,
                "sites": self.sites, "photos": self.photos}


def agreement(reference: Sequence[dict], candidate: Sequence[dict], sites: Sequence[Sequence[str]]) -> ChoiceAgreement:
    """Compare exit tensors run by run: ``reference[i]`` / ``candidate[i]`` map exit name -> array for
    photo (batch) i; ``sites`` lists each site's exit names, in graph order.

    Raises:
        ValueError: different run counts, or an exit missing from a run.
    """
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference runs, {len(candidate)} candidate runs")
    identical = first = 0
    shared = total = 0
    for ref, cand in zip(reference, candidate):
        for name in sites[0] if sites else ():
            common, size = _common(ref[name], cand[name])
            shared, total = shared + common, total + size
        aligned = True
        for k, site in enumerate(sites):
            same = aligned and all(_same_rows(ref[name], cand[name]) for name in site)
            identical += same
            first += same and k == 0
            aligned = aligned and all(np.array_equal(ref[name], cand[name]) for name in site)
    runs = len(reference)
    count = runs * len(sites)
    return ChoiceAgreement(identical / count if count else 1.0, first / runs if runs and sites else 1.0,
                           shared / total if total else 1.0, len(sites), runs)


def _common(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """(indices in common row by row as multisets, indices in ``a``)."""
    if a.shape != b.shape:
        return 0, a.size
    rows_a, rows_b = a.reshape(-1, a.shape[-1]) if a.ndim else a.reshape(1, 1), b.reshape(-1, b.shape[-1]) if b.ndim else b.reshape(1, 1)
    common = 0
    for x, y in zip(rows_a, rows_b):
        values, counts = np.unique(x, return_counts=True)
        other = dict(zip(*np.unique(y, return_counts=True)))
        common += int(sum(min(c, other.get(v, 0)) for v, c in zip(values, counts)))
    return common, a.size


def _same_rows(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal indices per row, order within a row aside."""
    if a.shape != b.shape:
        return False
    if a.ndim == 0:
        return bool(a == b)
    return bool(np.array_equal(np.sort(a, axis=-1), np.sort(b, axis=-1)))


def with_outputs(model: onnx.ModelProto, found: Exits) -> onnx.ModelProto:
    """A copy of ``model`` with the exits as extra graph outputs (for ONNX Runtime)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    have = {o.name for o in copy.graph.output}
    for name in found.names:
        if name not in have:
            copy.graph.output.append(onnx.helper.make_tensor_value_info(name, found.dtypes[name], None))
    return copy


def run_onnxruntime(model: onnx.ModelProto, found: Exits, batches: Sequence[np.ndarray], threads: int) -> list[dict]:
    """The exits of ``model`` on each batch, with ONNX Runtime on the CPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(with_outputs(model, found).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0].name
    return [dict(zip(found.names, session.run(found.names, {feed: b}))) for b in batches]


def run_openvino(xml: Path, found: Exits, batches: Sequence[np.ndarray], config: dict) -> list[dict]:
    """The exits of an OpenVINO IR on each batch (OpenVINO keeps the ONNX tensor names)."""
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(xml))
    model.add_outputs(found.names)
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    runs = []
    for b in batches:
        request.infer({0: b})
        runs.append({name: request.get_tensor(name).data.copy() for name in found.names})
    return runs
