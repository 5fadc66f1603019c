"""A model's token counts with a free reduction: the twin that prices a reduction's own ops.

The truncated twin of a schedule runs every block at the schedule's token counts, but each reduction
is a plain truncation (keep the first ``N_l`` tokens: one Slice). Timed beside the reduced model in
one interleaved loop, ``reduced - truncated`` is what the reduction ops cost on that backend, with
the blocks' own time cancelled out exactly; its speedup over dense is the ceiling a free reduction
would reach. Used by ``benchmarks/latency.py --ceiling`` and the planner's calibration
(:func:`vitfold.plan.auto_schedule.fit_cost_model`). torch (export side).
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from timm.models.vision_transformer import VisionTransformer


class TruncatedBlock(torch.nn.Module):
    """A timm block that keeps its first ``keep`` tokens between attention and MLP (``[B, N, C] ->
    [B, keep, C]``): the reduced model's shapes with a free reduction."""

    def __init__(self, block: torch.nn.Module, keep: int):
        super().__init__()
        self.block, self.keep = block, keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        x = x + b.drop_path1(b.ls1(b.attn(b.norm1(x))))
        x = x[:, : self.keep]
        return x + b.drop_path2(b.ls2(b.mlp(b.norm2(x))))


def can_truncate(model: torch.nn.Module) -> bool:
    """Whether :func:`truncated_model` covers ``model`` (a timm ``VisionTransformer``; an ``Eva`` runs
    its blocks in its own loop with a RoPE table, which this twin does not carry)."""
    return isinstance(model, VisionTransformer)


def truncated_model(model: torch.nn.Module, tokens: Sequence[int]) -> torch.nn.Module:
    """A deep copy of ``model`` running ``tokens`` (a schedule's ``depth + 1`` counts), each reduction a
    truncation.

    Raises:
        ValueError: ``model`` is not a timm ``VisionTransformer`` (:func:`can_truncate`), or ``tokens``
            is for another depth.
    """
    if not can_truncate(model):
        raise ValueError(f"truncated twins cover timm VisionTransformer, not {type(model).__name__}")
    if len(tokens) != len(model.blocks) + 1:
        raise ValueError(f"{len(tokens)} token counts for a model of {len(model.blocks)} blocks (need depth + 1)")
    twin = copy.deepcopy(model)
    twin.blocks = torch.nn.Sequential(*[TruncatedBlock(b, n) for b, n in zip(twin.blocks, tokens[1:])])
    return twin.eval()
