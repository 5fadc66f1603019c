"""MACs from the schedule (analytic, per block) and from the exported graph (MatMul/Gemm/Conv shapes).

Analytic count per block ``l`` (ToMe / pruning reduce between attention and MLP, see
:mod:`vitfold.reduce.schedule`): with ``N = tokens[l]`` and ``M = tokens[l + 1]``,

* attention: ``N*C*3A`` (qkv) + ``2*N*N*A`` (QK^T and AV) + ``N*A*C`` (proj), ``A`` = attention dim;
* token matching when the block reduces: ``ceil(N/2)*floor(N/2)*d`` (ToMe's similarity, ``d`` = head dim);
* MLP: ``2*M*C*H`` (``H`` = hidden width).

For schedules whose site is ``block`` (clustering methods reduce after the MLP) the MLP runs on ``N``
and the reduction costs ``N*N*C`` (the pairwise distances that clustering needs; its few iterations
of assignment are not counted).

Plus the patch embedding and the head. Element-wise ops, norms and softmax are not counted (as in
the ToMe and EViT papers). :func:`graph_macs` counts the same linear algebra from the ONNX graph,
as a cross-check that the exported model does what the schedule says.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np


@dataclass(frozen=True)
class ModelDims:
    """The widths the analytic count needs, read off the torch model at build time."""

    embed_dim: int
    attn_dim: int
    head_dim: int
    mlp_hidden: int
    num_patches: int
    patch_macs_per_token: int
    num_classes: int

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ModelDims":
        return cls(**data)


def block_macs(dims: ModelDims, tokens_in: int, tokens_out: int, site: str = "attention") -> dict[str, int]:
    """MACs of one block (batch 1) split into ``attention``, ``matching`` and ``mlp``."""
    n, m, c, a = tokens_in, tokens_out, dims.embed_dim, dims.attn_dim
    attention = n * c * 3 * a + 2 * n * n * a + n * a * c
    if site == "block":
        return {"attention": attention, "matching": n * n * c if m < n else 0, "mlp": 2 * n * c * dims.mlp_hidden}
    matching = ((n + 1) // 2) * (n // 2) * dims.head_dim if m < n else 0
    return {"attention": attention, "matching": matching, "mlp": 2 * m * c * dims.mlp_hidden}


def schedule_macs(dims: ModelDims, tokens: list[int], site: str = "attention") -> dict:
    """Total and per-block MACs (batch 1) for a schedule's ``tokens`` (``depth + 1`` entries) with its
    reduction ``site`` (:class:`vitfold.reduce.schedule.Schedule`)."""
    blocks = [block_macs(dims, n, m, site) for n, m in zip(tokens, tokens[1:])]
    embed = dims.num_patches * dims.patch_macs_per_token
    head = dims.embed_dim * dims.num_classes
    total = embed + head + sum(sum(b.values()) for b in blocks)
    return {"total": total, "embed": embed, "head": head, "blocks": blocks}


def graph_macs(path: Path, batch_size: int) -> Optional[int]:
    """MACs per image of every MatMul, Gemm and Conv in an ONNX file, from inferred static shapes.

    Returns None where the ``onnx`` package is absent: a device install (numpy, Pillow and the backend)
    reports the schedule's MACs (:func:`schedule_macs`) and leaves the graph count out.
    """
    try:
        import onnx
    except ImportError:
        return None

    proto = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    graph = proto.graph
    shapes = {}
    for value in list(graph.value_info) + list(graph.input) + list(graph.output):
        shapes[value.name] = [d.dim_value for d in value.type.tensor_type.shape.dim]
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    total = 0
    for node in graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            a, b = shapes.get(node.input[0]), shapes.get(node.input[1])
            out = shapes.get(node.output[0])
            if not (a and b and out):
                continue
            k = a[-1] if not (node.op_type == "Gemm" and _attr(node, "transA")) else a[-2]
            total += int(np.prod(out)) * k
        elif node.op_type == "Conv":
            w, out = shapes.get(node.input[1]), shapes.get(node.output[0])
            if w and out:
                total += int(np.prod(out)) * int(np.prod(w[1:]))
    return total // batch_size


def _attr(node, name: str) -> int:
    return next((a.i for a in node.attribute if a.name == name), 0)
