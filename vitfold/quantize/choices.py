"""Token-choice agreement: does a quantized build merge, keep and prune the tokens its f32 build does?

The choices are the scope's *exits* (:func:`exits`): integer tensors the reduction subgraph computes
and the main path reads (the rows ToMe gathers and the slots it scatters into, the tokens EViT keeps
and fuses, the clusters tokens join). Both builds run on the same photos with those tensors as extra
outputs.

Counting (:func:`agreement`), per photo (per batch when the build's batch is above 1) and per
reduction site, in graph order:

* a site is **identical** when it makes the same choices, order aside: exits of equal length are
  read together as tuples (ToMe: each merged token with the token it joins), an index broadcast over
  channels counts once, and the multisets of tuples must be equal (the same tokens merged into the
  same tokens, the same tokens kept);
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
            choices (tuples, as above) the two builds have in common: how far apart they are when
            they are not identical.
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
        ValueError: different run counts.
        KeyError: an exit missing from a run.
    """
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference runs, {len(candidate)} candidate runs")
    identical = first = 0
    shared = total = 0
    for ref, cand in zip(reference, candidate):
        aligned = True
        for k, site in enumerate(sites):
            mine, theirs = _choices(ref, site), _choices(cand, site)
            if k == 0:
                for length in mine:
                    common, size = _common(mine[length], theirs.get(length, []))
                    shared, total = shared + common, total + size
            same = aligned and mine == theirs
            identical += same
            first += same and k == 0
            aligned = aligned and all(np.array_equal(ref[name], cand[name]) for name in site)
    runs = len(reference)
    count = runs * len(sites)
    return ChoiceAgreement(identical / count if count else 1.0, first / runs if runs and sites else 1.0,
                           shared / total if total else 1.0, len(sites), runs)


def _choices(run: dict, site: Sequence[str]) -> dict:
    """A site's choices, order aside: exits of equal length zipped into tuples (ToMe's merged token
    with the token it joins), as a sorted list per length. An index broadcast along its last axis
    (the ``[B, r, C]`` index of a gather over channels) counts once per row."""
    columns: dict[int, list] = {}
    for name in site:
        a = np.asarray(run[name])
        if a.ndim >= 2 and a.shape[-1] > 1 and np.all(a == a[..., :1]):
            a = a[..., 0]
        flat = a.reshape(-1)
        columns.setdefault(flat.size, []).append(flat)
    return {length: sorted(zip(*(c.tolist() for c in cols))) for length, cols in columns.items()}


def _common(a: list, b: list) -> tuple[int, int]:
    """(choices in common as multisets, choices in ``a``)."""
    counts: dict = {}
    for item in b:
        counts[item] = counts.get(item, 0) + 1
    common = 0
    for item in a:
        if counts.get(item, 0):
            counts[item] -= 1
            common += 1
    return common, len(a)


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
