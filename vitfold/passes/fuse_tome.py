"""Rewrite ToMe's reduction sites (the graph form) into one fused ``vitfold.ToMeMerge`` node each.

The export names every node a site exported (:class:`~vitfold.reduce.tome.ToMeSite`: the keys' head
mean, bipartite matching and sum merge, about 30 nodes) ``vitfold.tome_site.<block>/...``
(:func:`vitfold.export.onnx.tag_sites`). This rewrite takes each such group, checks that it is a
closed region of the graph (two tensor inputs: the merged tokens ``[B, N, C]``, here the size-weighted
tokens and their sizes as one tensor, and the attention keys ``[B, H, N, d]``; one output
``[B, N - r, C]``), and replaces it with one node::

    vitfold.ToMeMerge(x, keys; r, num_protected) -> [B, N - r, C]

which :mod:`vitfold.native`'s OpenVINO extension computes in one kernel. ``r`` comes from the static
shapes, ``num_protected`` from the schedule the build stored in the model's metadata. The size
weighting around the site (``x * size``, ``/ size``) stays in the graph: the op's sums then equal the
graph form's bit for bit, which INT8 builds need (a last-bit change before a FakeQuantize flips a
rounding).

It is not a registered pipeline pass: the pipeline verifies every pass on ONNX Runtime, which has no
kernel for the fused op. ``compile_onnx`` runs it after the pipeline and lint for ``--fused-ops``
builds, and checks the backend build of the fused graph against the graph form's on the same batch.
"""

from __future__ import annotations

import json
from collections import defaultdict

import onnx
import onnx_graphsurgeon as gs

from ..errors import PassError
from ..native import DOMAIN, SITE_PREFIX, TOME_OP


def _num_protected(proto: onnx.ModelProto) -> int:
    schedule = next((p.value for p in proto.metadata_props if p.key == "vitfold.schedule"), None)
    if schedule is None:
        raise PassError("the model carries no vitfold schedule (vitfold.schedule metadata), so the sites' protected "
                        "prefix tokens are unknown; fuse models that deploy.py build exported")
    return int(json.loads(schedule)["num_prefix_tokens"])


def _is_constant(tensor) -> bool:
    return isinstance(tensor, gs.Constant) or bool(tensor.inputs and tensor.inputs[0].op == "Constant")


def _roles(block: int, inputs: list, outputs: list) -> tuple:
    """``(x, keys, merged x)`` of a site's region, told apart by shape: the merged tokens keep the
    tokens' channels; the keys (``[B, H, N, d]``, or a ``[B, N, d]`` metric) are the other input.

    Raises:
        PassError: the shapes do not tell them apart (a metric as wide as the tokens).
    """
    (out,) = outputs
    tokens = [t for t in inputs if len(t.shape) == 3 and t.shape[2] == out.shape[2]]
    keys = [t for t in inputs if t not in tokens]
    if len(tokens) != 1 or len(keys) != 1 or keys[0].shape[0] != tokens[0].shape[0] or keys[0].shape[-2] != tokens[0].shape[1]:
        raise PassError(f"block {block}: cannot tell the ToMe site's tokens from its keys by shape "
                        f"({[t.shape for t in inputs]} -> {out.shape}); build without --fused-ops")
    return tokens[0], keys[0], out


def fuse_tome_sites(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Replace each tagged ToMe site in ``proto`` (not modified) with one ``vitfold.ToMeMerge`` node.

    Returns:
        ``(fused model, number of sites fused)``; the model imports the ``vitfold`` opset 1.

    Raises:
        PassError: no tagged site (not a ToMe merge build, or ``trace_source`` / prune mode, whose sites
            are not fusable), no schedule metadata, or a site that is not a closed region with the
            inputs, outputs and shapes above (the message names the block).
    """
    prefix_tokens = _num_protected(proto)
    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(proto))
    sites: dict[int, list] = defaultdict(list)
    for node in graph.nodes:
        if node.name.startswith(SITE_PREFIX):
            sites[int(node.name[len(SITE_PREFIX):].split("/", 1)[0])].append(node)
    if not sites:
        raise PassError("no ToMe merge site to fuse: --fused-ops fuses the merge sites of --method tome on timm "
                        "VisionTransformer models (not --mode prune, not --task features, whose sites also trace "
                        "sources, and not Eva models yet); build without --fused-ops")
    outputs_of_graph = {t.name for t in graph.outputs}
    for block, nodes in sorted(sites.items()):
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
                shape is None or len(shape) not in (3, 4) or not all(isinstance(d, int) for d in shape) for shape in shapes):
            raise PassError(f"block {block}: the ToMe site is not a closed region with static inputs (tokens [B, N, C], "
                            f"keys [B, H, N, d]) and one output: {[t.name for t in inputs]} -> "
                            f"{[t.name for t in outputs]}, shapes {shapes}; build without --fused-ops")
        x, keys, out = _roles(block, inputs, outputs)
        r = x.shape[1] - out.shape[1]
        for node in nodes:  # detach the graph form; cleanup() drops it
            node.outputs.clear()
        graph.nodes.append(gs.Node(TOME_OP, name=f"{SITE_PREFIX}{block}/{TOME_OP}", domain=DOMAIN,
                                   attrs={"r": r, "num_protected": prefix_tokens}, inputs=[x, keys], outputs=[out]))
    graph.cleanup().toposort()
    fused = gs.export_onnx(graph)
    fused.ir_version = proto.ir_version
    if not any(o.domain == DOMAIN for o in fused.opset_import):
        fused.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    fused.metadata_props.extend(p for p in proto.metadata_props if p.key not in {m.key for m in fused.metadata_props})
    return fused, len(sites)
