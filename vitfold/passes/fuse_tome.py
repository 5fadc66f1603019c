"""Rewrite ToMe's reduction sites (the graph form) into one fused ``vitfold.ToMeMerge`` node each.

The export names every node a site exported (:class:`~vitfold.reduce.tome.ToMeSite`: bipartite
matching and size-weighted merge, about 40 nodes) ``vitfold.tome_site.<block>/...``
(:func:`vitfold.export.onnx.tag_sites`). This rewrite takes each such group, checks that it is a
closed region of the graph (tensor inputs: the tokens ``[B, N, C]``, the attention keys
``[B, H, N, d]`` whose mean over heads is the matching metric, and, after the first merge, the token
sizes ``[B, N, 1]``; outputs: the merged tokens
``[B, N - r, C]`` and, where anything reads them, the merged sizes ``[B, N - r, 1]``), and replaces
it with one node::

    vitfold.ToMeMerge(x, keys, size; r, num_protected) -> (x [B, N - r, C], size [B, N - r, 1])

which :mod:`vitfold.native`'s OpenVINO extension computes in one kernel. A first site, whose sizes
the graph form makes inside the region (all ones), gets a constant of ones; a site whose merged
sizes nobody reads gets an unread output. ``r`` comes from the static shapes, ``num_protected``
from the schedule the build stored in the model's metadata.

It is not a registered pipeline pass: the pipeline verifies every pass on ONNX Runtime, which has no
kernel for the fused op. ``compile_onnx`` runs it after the pipeline and lint for ``--fused-ops``
builds, and checks the backend build of the fused graph against the graph form's on the same batch.
"""

from __future__ import annotations

import json
from collections import defaultdict

import numpy as np
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
    """``(x, keys, size or None, merged x, merged size or None)`` of a site's region, told apart by
    shape: sizes have one channel, the merged tokens keep the tokens' channels, the keys (``[B, H, N, d]``,
    or a ``[B, N, d]`` metric) are the rest.

    Raises:
        PassError: the shapes do not tell them apart (one-channel tokens, a metric as wide as the tokens).
    """
    flat = [t for t in inputs if len(t.shape) == 3]
    sizes = [t for t in flat if t.shape[2] == 1]
    out_sizes = [t for t in outputs if t.shape[2] == 1]
    wide = [t for t in outputs if len(t.shape) == 3 and t.shape[2] != 1]
    tokens = [t for t in flat if wide and t.shape[2] == wide[0].shape[2]]
    metrics = [t for t in inputs if t not in sizes and t not in tokens]
    if (len(sizes) > 1 or len(out_sizes) > 1 or len(wide) != 1 or len(tokens) != 1 or len(metrics) != 1
            or any(t.shape[0] != tokens[0].shape[0] or t.shape[-2 if t in metrics else 1] != tokens[0].shape[1]
                   for t in inputs)):
        raise PassError(f"block {block}: cannot tell the ToMe site's tokens, metric and sizes apart by shape "
                        f"({[t.shape for t in inputs]} -> {[t.shape for t in outputs]}); build without --fused-ops")
    return tokens[0], metrics[0], (sizes or [None])[0], wide[0], (out_sizes or [None])[0]


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
        if not 2 <= len(inputs) <= 3 or not 1 <= len(outputs) <= 2 or any(
                shape is None or len(shape) not in (3, 4) or not all(isinstance(d, int) for d in shape) for shape in shapes):
            raise PassError(f"block {block}: the ToMe site is not a closed region with static [B, N, C] inputs "
                            f"(tokens, metric, sizes) and outputs (tokens, sizes): {[t.name for t in inputs]} "
                            f"-> {[t.name for t in outputs]}, shapes {shapes}; build without --fused-ops")
        x, keys, size, out, out_size = _roles(block, inputs, outputs)
        r = x.shape[1] - out.shape[1]
        if size is None:  # the first merge: the graph form's sizes are ones made inside the region
            size = gs.Constant(f"{SITE_PREFIX}{block}/ones", np.ones([*x.shape[:2], 1], np.float32))
        if out_size is None:  # nothing reads the merged sizes
            out_size = gs.Variable(f"{SITE_PREFIX}{block}/size", np.float32, [*out.shape[:2], 1])
        for node in nodes:  # detach the graph form; cleanup() drops it
            node.outputs.clear()
        graph.nodes.append(gs.Node(TOME_OP, name=f"{SITE_PREFIX}{block}/{TOME_OP}", domain=DOMAIN,
                                   attrs={"r": r, "num_protected": prefix_tokens}, inputs=[x, keys, size],
                                   outputs=[out, out_size]))
    graph.cleanup().toposort()
    fused = gs.export_onnx(graph)
    fused.ir_version = proto.ir_version
    if not any(o.domain == DOMAIN for o in fused.opset_import):
        fused.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    fused.metadata_props.extend(p for p in proto.metadata_props if p.key not in {m.key for m in fused.metadata_props})
    return fused, len(sites)
