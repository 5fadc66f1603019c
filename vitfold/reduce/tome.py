"""ToMe: token merging as a patch of timm's VisionTransformer.

Source: Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023. Between each block's attention
and MLP, the ``r`` most similar token pairs (bipartite soft matching on the attention keys averaged
over heads, Sec. 3) are merged by size-weighted average; attention adds ``log(size)`` to its logits
(proportional attention). Reference: facebookresearch/ToMe ``tome/patch/timm.py``; this patch
computes the same function, and differs in how it is built:

* it calls the block's own submodules (``ls1``/``ls2`` layer scale, ``q_norm``/``k_norm``, the
  attention gate), so DeiT-3 and DINOv2 keep their layer scale (the reference drops it);
* per-forward state (token sizes, sources) is created by ``ToMeBlocks.forward`` and passed to each
  block explicitly, so ``forward_features`` works on its own and there is no shared ``pop``ped list;
* classes live at module level: patched models pickle and deep-copy, and :meth:`ToMe.remove` undoes
  the patch;
* blocks with ``r == 0`` before any merge run timm's own forward, so ``r=0`` is the dense model bit
  for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ..errors import SpecError
from ._registry import MaxRemoved, SchedulePlan, TokenLayout, model_patch, register_method
from .patching import patchable_copy, swap_classes, unpatch
from .matching import bipartite_soft_matching, max_merge, merge_source, merge_wavg
from .schedule import Schedule, ScheduleError, parse_r


#: How a merged token takes its RoPE row on rotary models (:mod:`vitfold.reduce.eva`).
ROPE_MERGES = ("dst", "mean")


@dataclass
class ToMeState:
    """Per-forward state. ``size``: ``[B, N, 1]`` patches per token (None until the first merge);
    ``source``: ``[B, N, N0]`` membership of the original tokens (only with ``trace_source``)."""

    size: Optional[torch.Tensor] = None
    source: Optional[torch.Tensor] = None


class ToMeAttention(Attention):
    """timm ``Attention`` plus :meth:`forward_tome`. Its ``forward`` is timm's, unchanged."""

    def forward_tome(self, x: torch.Tensor, size: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention with proportional attention; also returns the keys the matching metric is taken from.

        Args:
            x: ``[B, N, C]`` normalised tokens.
            size: ``[B, N, 1]`` token sizes, or None for plain attention.

        Returns:
            ``([B, N, C] attention output, [B, H, N, head_dim] keys)``; the metric is their mean over
            heads (:class:`ToMeSite`), taken there so that a fused site reads the keys directly.
        """
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        bias = None if size is None else size.log()[:, None, None, :, 0]  # [B, 1, 1, N]
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                attn = attn + bias
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = self.norm(x.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x)), k


class ToMeSite(nn.Module):
    """One reduction site's bipartite matching and sum merge (Sec. 3), as a module of its own: the
    exporter then names the site's nodes after it (``blocks.L.tome_site``), so that
    :func:`vitfold.passes.fuse_sites.fuse_sites` can replace them with one fused op. No weights.

    ``forward(x [B, N, C], keys [B, H, N, d], r, num_protected) -> [B, N - r, C]``; the metric is the
    keys' mean over heads, as the reference. The size weighting (:func:`merge_wavg`) stays outside.
    """

    def forward(self, x: torch.Tensor, keys: torch.Tensor, r: int, num_protected: int) -> torch.Tensor:
        merge, _ = bipartite_soft_matching(keys.mean(1), r, num_protected)
        return merge(x, mode="sum")


class ToMeBlock(Block):
    """timm ``Block`` plus :meth:`forward_tome`: merge ``r`` tokens between attention and MLP."""

    tome_site: ToMeSite

    def forward_tome(self, x: torch.Tensor, state: ToMeState, r: int, cfg: "ToMeBlocks") -> torch.Tensor:
        """Args: ``x`` ``[B, N, C]``; returns ``[B, N - r, C]`` and updates ``state`` in place."""
        prop_size = state.size if cfg.prop_attn else None
        if r == 0 and prop_size is None:
            return Block.forward(self, x)  # exactly timm's block
        x_attn, keys = self.attn.forward_tome(self.norm1(x), prop_size)
        x = x + self.drop_path1(self.ls1(x_attn))
        if r > 0 and cfg.mode == "merge" and not cfg.trace_source:  # the fusable site: one module call
            site = lambda t, mode: self.tome_site(t, keys, r, cfg.num_protected)  # noqa: E731 (merge_wavg sums)
            x, state.size = merge_wavg(site, x, state.size)
        elif r > 0:
            merge, _ = bipartite_soft_matching(keys.mean(1), r, cfg.num_protected)
            if cfg.trace_source:
                state.source = merge_source(merge, x, state.source)
            if cfg.mode == "prune":
                x = merge(x, mode="drop")  # sizes stay None: every kept token is one patch
            else:
                x, state.size = merge_wavg(merge, x, state.size)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class ToMeBlocks(nn.Sequential):
    """``model.blocks`` after patching: runs each block with its ``r`` and a fresh :class:`ToMeState`.

    Attributes (plain Python, fixed at patch time): ``r`` per block, ``prop_attn``, ``trace_source``,
    ``num_protected``; ``last_state`` holds the state of the latest forward (sizes, sources) for
    inspection and unmerging.
    """

    r: tuple[int, ...]
    prop_attn: bool
    trace_source: bool
    num_protected: int
    mode: str

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = ToMeState()
        for index, block in enumerate(self):
            x = block.forward_tome(x, state, self.r[index], self)
        self.last_state = state
        return x

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """Unmerge: tokens after the last block ``[B, N_L, C]`` -> ``[B, N_0, C]`` in the original order.

        Every original token takes the features of the merged token that holds it (in prune mode:
        the partner it was matched to). Needs ``trace_source``; the identity when nothing merged.
        """
        state = getattr(self, "last_state", None)
        if state is None or state.source is None:
            return x
        return state.source.transpose(1, 2) @ x


@register_method("tome")
class ToMe:
    """Token Merging (Bolya et al., ICLR 2023).

    Args:
        r: tokens merged per block: an int, a per-block list, or ``(r, inflect)`` (Sec. 4.1 schedules).
            As in the reference, a block merges at most half of its unprotected tokens; where ``r``
            asks for more, the schedule records the cap in its notes.
        prop_attn: proportional attention (add ``log(size)`` to the logits); the paper's default for
            off-the-shelf models.
        trace_source: keep ``[B, N, N0]`` token sources (for unmerging / visualisation); costs memory
            and ops, so off by default.
        mode: ``merge`` (size-weighted average, the paper's method) or ``prune`` (drop each matched
            token and keep its partner unchanged: the "keep one" combination of the paper's Table 1c;
            token sizes stay 1, so proportional attention has no effect).
        rope_merge: RoPE models (timm ``Eva``): the rotary row a merged token takes, ``dst`` (that of
            the token it was merged into) or ``mean`` (size-weighted mean of the rows); see
            :mod:`vitfold.reduce.eva`. No effect on models without RoPE.

    Raises:
        SpecError: unknown ``mode`` or ``rope_merge``.
    """

    name = "tome"
    MODES = ("merge", "prune")

    #: ``--schedule auto``: default cap on one block's merge. On DINOv2 ViT-S/14 (benchmarks/hw_aware.py)
    #: ToMe's own cap (0.5) let the picker merge ~100 tokens in one block and lose feature cosine to
    #: constant r at the same latency; with 0.2 the auto schedule beat constant r at r=8 and r=13.
    plan_max_fraction = 0.2
    schedule_param = "r"

    def plan(self, layout: TokenLayout, max_fraction: float) -> SchedulePlan:
        """The planner's view (:class:`SchedulePlan`): at most ``max_fraction`` of a block's unprotected
        tokens merged per block; calibration at :func:`reference_r`; a schedule's per-block ``r``."""
        P = layout.num_prefix_tokens
        return SchedulePlan(tome_max_removed(P, max_fraction),
                            {"r": reference_r(layout.num_tokens, P, layout.depth)},
                            lambda tokens: {"r": tome_params(tokens)})

    def __init__(self, r: Union[int, list, tuple] = 0, prop_attn: bool = True, trace_source: bool = False,
                 mode: str = "merge", rope_merge: str = "dst"):
        if mode not in self.MODES:
            raise SpecError(f"tome mode {mode!r} unknown; choose one of {', '.join(self.MODES)}")
        if rope_merge not in ROPE_MERGES:
            raise SpecError(f"tome rope_merge {rope_merge!r} unknown; choose one of {', '.join(ROPE_MERGES)}")
        self.r = r
        self.prop_attn = prop_attn
        self.trace_source = trace_source
        self.mode = mode
        self.rope_merge = rope_merge

    def params(self) -> dict:
        return {"r": self.r, "prop_attn": self.prop_attn, "trace_source": self.trace_source, "mode": self.mode,
                "rope_merge": self.rope_merge}

    def schedule(self, layout: TokenLayout) -> Schedule:
        """Token counts per block for this ``r`` on a model with ``layout``.

        Raises:
            ScheduleError: a block is asked to merge more tokens than it has unprotected tokens.
        """
        tokens, notes = [layout.num_tokens], []
        for block, want in enumerate(parse_r(layout.depth, self.r)):
            have = tokens[-1]
            unprotected = have - layout.num_prefix_tokens
            if want > unprotected:
                raise ScheduleError(
                    f"block {block}: r={want} asks to merge more tokens than the block has "
                    f"({have} tokens, {unprotected} mergeable). Use a smaller r or a decreasing schedule."
                )
            cap = max_merge(have, layout.num_prefix_tokens)
            if want > cap:
                notes.append(f"block {block}: r={want} capped to {cap} (bipartite matching merges at most half)")
            tokens.append(have - min(want, cap))
        return Schedule(tokens=tuple(tokens), num_prefix_tokens=layout.num_prefix_tokens, notes=tuple(notes))

    def apply(self, model: VisionTransformer, schedule: Schedule) -> VisionTransformer:
        """Return a ToMe-patched deep copy of ``model`` running ``schedule``.

        Raises:
            NotImplementedError: a block or attention type this patch does not know.
            ScheduleError: the schedule is for a model of another depth or token count.
        """
        patch = model_patch(model)
        if patch is not None:  # timm Eva: vitfold.reduce.eva
            return patch.apply_tome(model, schedule, self.prop_attn, self.trace_source, self.mode, self.rope_merge)
        patched = swap_classes(patchable_copy(model, schedule, self.name), ToMeBlocks, ToMeBlock, ToMeAttention,
                               r=schedule.removed, prop_attn=self.prop_attn, trace_source=self.trace_source,
                               num_protected=model.num_prefix_tokens, mode=self.mode)
        for block in patched.blocks:
            block.tome_site = ToMeSite()
        return patched

    @staticmethod
    def remove(model: VisionTransformer) -> VisionTransformer:
        """Undo :meth:`apply` in place (classes restored, attributes dropped); returns ``model``."""
        patch = model_patch(model)
        if patch is not None:
            return patch.unpatch(model, ("r", "prop_attn", "trace_source", "num_protected", "mode", "rope_merge"))
        for block in model.blocks:
            if "tome_site" in block._modules:
                del block.tome_site
        return unpatch(model, ToMeBlocks, ToMeBlock, ("r", "prop_attn", "trace_source", "num_protected", "mode"))


def tome_max_removed(num_prefix_tokens: int, max_fraction: float = 0.5) -> MaxRemoved:
    """ToMe's limit: bipartite matching merges at most half of a block's unprotected tokens;
    ``max_fraction`` < 0.5 caps each block lower (large single merges cost fidelity that the
    token count does not see)."""
    if not 0.0 < max_fraction <= 0.5:
        raise SpecError(f"max merge fraction {max_fraction} must be in (0, 0.5] (bipartite matching merges at most half)")
    return lambda block, tokens: max(0, min((tokens - num_prefix_tokens) // 2, int(max_fraction * (tokens - num_prefix_tokens))))


def tome_params(tokens: Sequence[int]) -> list[int]:
    """ToMe's per-block ``r`` for a schedule's ``tokens``."""
    return [a - b for a, b in zip(tokens, tokens[1:])]


def reference_r(full: int, num_prefix_tokens: int, depth: int) -> int:
    """The constant ToMe r calibration builds: about half the tokens gone by the last block (DeiT-S: 8)."""
    return max(1, (full - num_prefix_tokens) // (2 * depth))
