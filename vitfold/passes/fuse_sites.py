"""Rewrite the reduction sites' graph form into one fused ``vitfold`` node each.

The export names every node a site module exported ``vitfold.<kind>.<block>/...``
(:func:`vitfold.export.onnx.tag_sites`). This rewrite takes each such group, checks that it is a
closed region of the graph (two tensor inputs, one output, static shapes) and replaces it with one node:

* ``vitfold.tome_site.<block>/`` (:class:`~vitfold.reduce.tome.ToMeSite`: the keys' head mean,
  bipartite matching and sum merge, about 30 nodes)::

      vitfold.ToMeMerge(x [B, N, C], keys [B, H, N, d]; r, num_protected) -> [B, N - r, C]

  ``x`` is the size-weighted tokens and their sizes as one tensor (``cat([x * size, size])``, ToMe's
  ``merge_wavg``). With ``weighted`` (OpenVINO and ONNX Runtime builds), the weighting around the site
  (``Mul``, ``Concat``, two ``Slice``, ``Div``: five more nodes and three more passes over the tokens)
  moves into the op::

      vitfold.ToMeMergeWavg(x [B, N, C], keys, size [B, N, 1]; r, num_protected)
          -> (x [B, N - r, C], size [B, N - r, 1])

  Either op's arithmetic is the graph form's, bit for bit, which INT8 builds need (a last-bit change
  before a FakeQuantize flips a rounding). Only that exact pattern is absorbed: a weighting the quantizer
  wrapped in Q/DQ nodes, or one read elsewhere, stays in the graph around a ``ToMeMerge``.
* ``vitfold.prune_site.<block>/`` (:class:`~vitfold.reduce.evit.PruneSite`: EViT's / Top-K's top-k
  of the class attention, row gather and fusion, about 15 nodes)::

      vitfold.EViTPrune(x [B, N, C], attn [B, N]; keep, num_protected, fuse) -> [B, P + keep + fuse, C]

:mod:`vitfold.native`'s OpenVINO extension computes each in one kernel. ``num_protected`` comes from the
schedule the build stored in the model's metadata, ``r`` and ``fuse`` from the static shapes, ``keep``
from the site's TopK.

It is not a registered pipeline pass: the pipeline verifies every pass on ONNX Runtime, which has no
kernel for the fused ops. ``compile_onnx`` runs it after the pipeline and lint for ``--fused-ops``
builds, and checks the backend build of the fused graph against the graph form's on the same batch.
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import PassError
from ..native import DOMAIN, PRUNE_OP, PRUNE_SITE_PREFIX, SITE_PREFIXES, TOME_OP, TOME_SITE_PREFIX, TOME_WAVG_OP


def _num_protected(proto: onnx.ModelProto) -> int:
    schedule = next((p.value for p in proto.metadata_props if p.key == "vitfold.schedule"), None)
    if schedule is None:
        raise PassError("the model carries no vitfold schedule (vitfold.schedule metadata), so the sites' protected "
                        "prefix tokens are unknown; fuse models that deploy.py build exported")
    return int(json.loads(schedule)["num_prefix_tokens"])


def _is_constant(tensor) -> bool:
    return isinstance(tensor, gs.Constant) or bool(tensor.inputs and tensor.inputs[0].op == "Constant")


def _constant_value(tensor):
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if tensor.inputs and tensor.inputs[0].op == "Constant":
        return np.asarray(tensor.inputs[0].attrs["value"].values)
    return None


def _tome_node(block: int, nodes: list, inputs: list, out, num_protected: int) -> gs.Node:
    """ToMe: ``(x, keys)`` told apart by shape (the merged tokens keep the tokens' channels; the keys,
    ``[B, H, N, d]`` or a ``[B, N, d]`` metric, are the other input).

    Raises:
        PassError: the shapes do not tell them apart (a metric as wide as the tokens).
    """
    tokens = [t for t in inputs if len(t.shape) == 3 and t.shape[2] == out.shape[2]]
    keys = [t for t in inputs if t not in tokens]
    if len(tokens) != 1 or len(keys) != 1 or keys[0].shape[0] != tokens[0].shape[0] or keys[0].shape[-2] != tokens[0].shape[1]:
        raise PassError(f"block {block}: cannot tell the ToMe site's tokens from its keys by shape "
                        f"({[t.shape for t in inputs]} -> {out.shape}); build without --fused-ops")
    (x,), (keys,) = tokens, keys
    return gs.Node(TOME_OP, name=f"{TOME_SITE_PREFIX}{block}/{TOME_OP}", domain=DOMAIN,
                   attrs={"r": x.shape[1] - out.shape[1], "num_protected": num_protected}, inputs=[x, keys], outputs=[out])


def _prune_node(block: int, nodes: list, inputs: list, out, num_protected: int) -> gs.Node:
    """EViT / Top-K: ``(x [B, N, C], attn [B, N])``, ``keep`` read off the site's one TopK, ``fuse`` the
    one output token left over.

    Raises:
        PassError: not one TopK with a constant K, inputs of other ranks, or token counts that do not add up.
    """
    tokens = [t for t in inputs if len(t.shape) == 3]
    scores = [t for t in inputs if len(t.shape) == 2]
    topk = [n for n in nodes if n.op == "TopK"]
    k = _constant_value(topk[0].inputs[1]) if len(topk) == 1 else None
    if len(tokens) != 1 or len(scores) != 1 or k is None or k.size != 1:
        raise PassError(f"block {block}: the pruning site is not tokens [B, N, C] and class attention [B, N] into one "
                        f"TopK with a constant K ({[t.shape for t in inputs]}, {len(topk)} TopK); build without --fused-ops")
    (x,), (attn,) = tokens, scores
    keep = int(k.reshape(()))
    fuse = out.shape[1] - num_protected - keep
    if fuse not in (0, 1) or attn.shape != x.shape[:2] or out.shape[2] != x.shape[2]:
        raise PassError(f"block {block}: the pruning site's shapes do not add up ({x.shape}, {attn.shape} -> {out.shape}, "
                        f"keep {keep}, {num_protected} protected); build without --fused-ops")
    return gs.Node(PRUNE_OP, name=f"{PRUNE_SITE_PREFIX}{block}/{PRUNE_OP}", domain=DOMAIN,
                   attrs={"keep": keep, "num_protected": num_protected, "fuse": fuse}, inputs=[x, attn], outputs=[out])


def _last_axis_range(node, width: int):
    """``[start, stop)`` that a ``Slice`` node with constant starts / ends (axis -1 or 2, step 1) takes of a
    last axis of ``width``; None for any other Slice."""
    if node.op != "Slice" or len(node.inputs) < 3:
        return None
    starts, ends = _constant_value(node.inputs[1]), _constant_value(node.inputs[2])
    axes = _constant_value(node.inputs[3]) if len(node.inputs) > 3 else np.array([-1])
    steps = _constant_value(node.inputs[4]) if len(node.inputs) > 4 else np.array([1])
    if any(v is None or v.size != 1 for v in (starts, ends, axes, steps)) or int(axes.flat[0]) not in (-1, 2) \
            or int(steps.flat[0]) != 1:
        return None
    start, stop = (int(v.flat[0]) for v in (starts, ends))
    start, stop = (v + width if v < 0 else v for v in (start, stop))
    return max(0, min(start, width)), max(0, min(stop, width))


def _only_reader(tensor, graph_outputs: set):
    """The one node reading ``tensor``, or None (several readers, or a graph output)."""
    return tensor.outputs[0] if len(tensor.outputs) == 1 and tensor.name not in graph_outputs else None


def _absorb_weighting(node: gs.Node, graph_outputs: set) -> bool:
    """Turn ``node`` (a ``ToMeMerge`` whose tokens are ``Concat(Mul(x, size), size)`` and whose output is
    read by exactly ``Slice [:C]``, ``Slice [C:]`` and ``Div`` of the two) into ``ToMeMergeWavg(x, keys,
    size) -> (Div's output, the size slice)``, in place; False (nothing changed) for any other pattern."""
    weighted, keys = node.inputs
    cat = weighted.inputs[0] if weighted.inputs and _only_reader(weighted, graph_outputs) is node else None
    if cat is None or cat.op != "Concat" or cat.attrs.get("axis") not in (-1, 2) or len(cat.inputs) != 2:
        return False
    product, size = cat.inputs
    mul = product.inputs[0] if product.inputs and _only_reader(product, graph_outputs) is cat else None
    if mul is None or mul.op != "Mul" or size not in mul.inputs or len(mul.inputs) != 2:
        return False
    x = mul.inputs[1] if mul.inputs[0] is size else mul.inputs[0]
    channels = weighted.shape[2] - 1
    if size.shape is None or len(size.shape) != 3 or list(x.shape or ()) != [*size.shape[:2], channels] \
            or size.shape[2] != 1:
        return False
    merged = node.outputs[0]
    if merged.name in graph_outputs or len(merged.outputs) != 2 or any(r.inputs[0] is not merged for r in merged.outputs):
        return False
    slices = {_last_axis_range(reader, channels + 1): reader for reader in merged.outputs}
    tokens, sizes = slices.get((0, channels)), slices.get((channels, channels + 1))
    if tokens is None or sizes is None:
        return False
    div = _only_reader(tokens.outputs[0], graph_outputs)
    if div is None or div.op != "Div" or div.inputs[0] is not tokens.outputs[0] or div.inputs[1] is not sizes.outputs[0]:
        return False
    out_tokens, out_sizes = div.outputs[0], sizes.outputs[0]
    for replaced in (mul, cat, tokens, sizes, div):
        replaced.inputs.clear()
        replaced.outputs.clear()
    node.op, node.name = TOME_WAVG_OP, node.name.replace(TOME_OP, TOME_WAVG_OP)
    node.inputs.clear()
    node.inputs.extend([x, keys, size])
    node.outputs.clear()
    node.outputs.extend([out_tokens, out_sizes])
    return True


#: Each site kind's node-name prefix, its fused node, and the shapes its region's inputs must have.
_KINDS = {TOME_SITE_PREFIX: (_tome_node, "ToMe site (tokens [B, N, C], keys [B, H, N, d])"),
          PRUNE_SITE_PREFIX: (_prune_node, "pruning site (tokens [B, N, C], class attention [B, N])")}


def fuse_sites(proto: onnx.ModelProto, weighted: bool = False) -> tuple[onnx.ModelProto, dict[str, int]]:
    """Replace each tagged site in ``proto`` (not modified) with one ``vitfold`` node; with ``weighted``,
    each ToMe site whose size weighting has the graph form's shape with ``ToMeMergeWavg`` (the weighting
    inside; any other stays ``ToMeMerge``).

    Returns:
        ``(fused model, sites fused per op type)``; the model imports the ``vitfold`` opset 1.

    Raises:
        PassError: no tagged site (not a ToMe merge or EViT / Top-K build, or one whose sites also trace
            sources: ``--mode prune``, ``--task features``), no schedule metadata, or a site that is not
            a closed region with the inputs, outputs and shapes above (the message names the block).
    """
    num_protected = _num_protected(proto)
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(proto))
    sites: dict[tuple[str, int], list] = defaultdict(list)
    for node in graph.nodes:
        prefix = next((p for p in SITE_PREFIXES if node.name.startswith(p)), None)
        if prefix is not None:
            sites[prefix, int(node.name[len(prefix):].split("/", 1)[0])].append(node)
    if not sites:
        raise PassError("no reduction site to fuse: --fused-ops fuses the sites of --method tome (merge mode), evit and "
                        "topk on timm VisionTransformer models (not --mode prune, not --task features, whose sites also "
                        "trace sources, and not Eva models yet); build without --fused-ops")
    outputs_of_graph = {t.name for t in graph.outputs}
    counts: dict[str, int] = defaultdict(int)
    for (prefix, block), nodes in sorted(sites.items(), key=lambda item: item[0][1]):
        make, what = _KINDS[prefix]
        inside = {id(n) for n in nodes}
        produced = {t.name for n in nodes for t in n.outputs}
        inputs = []
        for node in nodes:
            for tensor in node.inputs:
                if tensor.name and tensor.name not in produced and not _is_constant(tensor) and tensor not in inputs:
                    inputs.append(tensor)
        outputs = [t for n in nodes for t in n.outputs
                   if t.name in outputs_of_graph or any(id(reader) not in inside for reader in t.outputs)]
        shapes = [t.shape for t in (*inputs, *outputs)]
        if len(inputs) != 2 or len(outputs) != 1 or any(
                shape is None or len(shape) not in (2, 3, 4) or not all(isinstance(d, int) for d in shape) for shape in shapes):
            raise PassError(f"block {block}: the {what} is not a closed region with static inputs and one output: "
                            f"{[t.name for t in inputs]} -> {[t.name for t in outputs]}, shapes {shapes}; "
                            f"build without --fused-ops")
        fused_node = make(block, nodes, inputs, outputs[0], num_protected)
        for node in nodes:  # detach the graph form; cleanup() drops it
            node.inputs.clear()
            node.outputs.clear()
        graph.nodes.append(fused_node)
        if weighted and fused_node.op == TOME_OP:
            _absorb_weighting(fused_node, outputs_of_graph)
        counts[fused_node.op] += 1
    graph.cleanup().toposort()
    fused = gs.export_onnx(graph)
    fused.ir_version = proto.ir_version
    if not any(o.domain == DOMAIN for o in fused.opset_import):
        fused.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    fused.metadata_props.extend(p for p in proto.metadata_props if p.key not in {m.key for m in fused.metadata_props})
    return fused, dict(counts)
