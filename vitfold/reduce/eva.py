"""ToMe and EViT / Top-K on timm's ``Eva`` (EVA-02, DINOv3, Perception Encoder, the RoPE ViTs).

``Eva`` differs from ``VisionTransformer`` where token reduction cares: its attention rotates the
queries and keys of the patch tokens with a rotary position table (RoPE, ``[N - P, 2 * head_dim]``,
sin | cos) that ``forward_features`` passes to every block, its blocks scale with ``gamma_1`` /
``gamma_2``, and some use SwiGLU MLPs. Once tokens merge or drop, each image has its own token set,
so the table becomes per image (``[B, 1, N' - P, 2 * head_dim]``) and travels with the tokens:

* **ToMe** (Bolya et al., ICLR 2023): a merged token takes the rotary row of the token it was merged
  into (``rope_merge="dst"``, the default): bipartite matching keeps every B token in place and adds
  A tokens into it, so the B token's position stands for the merged one. The alternative
  ``rope_merge="mean"`` takes the size-weighted mean of the sources' sin | cos rows (the same
  average ToMe uses for features); it is not RoPE at the mean position, which would need the rotary
  frequencies of each timm RoPE variant. ``benchmarks/models.py`` prints both. The matching metric
  is the keys before rotation (averaged over heads), so that similarity is about content, as in ToMe
  on a ViT without RoPE.
* **EViT / Top-K** (Liang et al., ICLR 2022): kept tokens keep their rows (gathered with the
  tokens); the fused token gets the identity rotation (sin 0, cos 1), like the class token, which
  RoPE leaves unrotated: it stands for many positions, so it gets none.

Blocks with nothing to remove (ToMe ``r=0`` before any merge, an EViT keep rate of 1.0) call
``EvaBlock.forward`` itself, so r=0 / keep 1.0 is the dense model bit for bit. The model's class is
swapped to :class:`ReducedEva` (its ``forward_features`` hands the table to ``model.blocks``); the
patch refuses depth-mixed RoPE, post-norm blocks and attention types it does not know.
"""

from __future__ import annotations

import copy
import sys
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import AttentionRope, apply_rot_embed_cat
from timm.models.eva import Eva, EvaAttention, EvaBlock
from torch import nn

from .evit import PruneBlocks, PruneState, _trace
from .matching import bipartite_soft_matching, merge_source, merge_wavg
from ._registry import register_model_patch
from .patching import check_schedule
from .schedule import Schedule
from .tome import ToMeBlocks, ToMeState

#: The methods this module patches Eva for; the others refuse an Eva (:func:`.patching.swap_classes`).
METHODS = ("tome", "evit", "topk")


def check_eva(model: Eva, method: str) -> None:
    """Raise NotImplementedError unless ``model`` is an ``Eva`` this module patches: ``EvaBlock``
    blocks with ``EvaAttention`` (EVA-02, DINOv3) or ``AttentionRope`` without grouped keys (PE), one
    RoPE table for all blocks."""
    if getattr(model, "rope_mixed", False):
        raise NotImplementedError(f"{method} on Eva: depth-mixed RoPE (one table per block) is not supported")
    for index, block in enumerate(model.blocks):
        if type(block.attn) is AttentionRope and getattr(block.attn, "num_kv_groups", 1) > 1:
            raise NotImplementedError(f"{method} on Eva: grouped-query attention (block {index}) is not supported")
        if type(block) is not EvaBlock or type(block.attn) not in (EvaAttention, AttentionRope):
            raise NotImplementedError(f"{method} patches Eva's EvaBlock/EvaAttention; block {index} is "
                                      f"{type(block).__name__}/{type(block.attn).__name__}")


class ReducedEva(Eva):
    """``Eva`` whose ``forward_features`` passes the RoPE table to ``model.blocks`` (one call), so the
    patched blocks can reduce it with the tokens. Otherwise Eva's own code."""

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         is_causal: bool = False) -> torch.Tensor:
        """``images [B, 3, H, W] -> tokens [B, N_L, C]`` (final norm applied)."""
        if attn_mask is not None or is_causal:
            raise NotImplementedError("a token-reduced Eva takes no attention mask")
        x = self.patch_embed(x)
        x, rope = self._pos_embed(x)
        x = self.norm_pre(x)
        x = self.blocks(x, rope)
        return self.norm(x)


def _qkv(attn: EvaAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``EvaAttention``'s / ``AttentionRope``'s q, k, v ``[B, H, N, d]`` (after q / k norm, before
    RoPE), as their forward computes them."""
    B, N, _ = x.shape
    if attn.qkv is not None:
        if getattr(attn, "q_bias", None) is None:  # AttentionRope: the bias is the Linear's
            qkv = attn.qkv(x)
        else:
            bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            qkv = attn.qkv(x) + bias if attn.qkv_bias_separate else F.linear(x, weight=attn.qkv.weight, bias=bias)
        q, k, v = qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q = attn.q_proj(x).reshape(B, N, attn.num_heads, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(B, N, attn.num_heads, -1).transpose(1, 2)
        v = attn.v_proj(x).reshape(B, N, attn.num_heads, -1).transpose(1, 2)
    return attn.q_norm(q), attn.k_norm(k), v


def _rotate(attn: EvaAttention, t: torch.Tensor, rope: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    if rope is None:
        return t
    P = attn.num_prefix_tokens
    return torch.cat([t[:, :, :P], apply_rot_embed_cat(t[:, :, P:], rope, half=attn.rotate_half)], dim=2).type_as(like)


def _attend(attn: EvaAttention, x: torch.Tensor, q, k, v, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Attention output ``[B, N, C]`` of rotated q, k and v, with ``bias`` ``[B, 1, 1, N]`` on the logits."""
    B, N, C = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    if attn.fused_attn:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        out = (logits if bias is None else logits + bias).softmax(dim=-1) @ v
    out = attn.norm(out.transpose(1, 2).reshape(B, N, -1))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


def _scaled(gamma: Optional[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return x if gamma is None else gamma * x


def _per_image(rope: torch.Tensor, batch: int) -> torch.Tensor:
    """The table as ``[B, 1, N - P, D]`` (one per image; broadcasts over heads)."""
    return rope if rope.dim() == 4 else rope[None, None].expand(batch, 1, -1, -1)


# --------------------------------------------------------------------------------------------- ToMe


class EvaToMeBlock(EvaBlock):
    """``EvaBlock`` plus :meth:`forward_tome`: merge ``r`` tokens (and their RoPE rows) between
    attention and MLP."""

    def forward_tome(self, x: torch.Tensor, rope: Optional[torch.Tensor], state: ToMeState, r: int,
                     cfg: "EvaToMeBlocks") -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Args: ``x`` ``[B, N, C]``, ``rope`` ``[N - P, D]`` or ``[B, 1, N - P, D]``; returns
        ``([B, N - r, C], the table for the N - r tokens)`` and updates ``state``."""
        prop_size = state.size if cfg.prop_attn else None
        if r == 0 and prop_size is None:
            return EvaBlock.forward(self, x, rope=rope), rope  # exactly Eva's block
        attn = self.attn
        y = self.norm1(x)
        q, k, v = _qkv(attn, y)
        metric = k.mean(1)  # [B, N, d]: keys before rotation
        bias = None if prop_size is None else prop_size.log()[:, None, None, :, 0]
        x = x + self.drop_path1(_scaled(self.gamma_1, _attend(attn, y, _rotate(attn, q, rope, v), _rotate(attn, k, rope, v), v, bias)))
        if r > 0:
            P = cfg.num_protected
            merge, _ = bipartite_soft_matching(metric, r, P)
            if rope is not None:
                rope = _merge_rope(merge, _per_image(rope, x.shape[0]), P, state.size, cfg.rope_merge)
            if cfg.trace_source:
                state.source = merge_source(merge, x, state.source)
            if cfg.mode == "prune":
                x = merge(x, mode="drop")
            else:
                x, state.size = merge_wavg(merge, x, state.size)
        return x + self.drop_path2(_scaled(self.gamma_2, self.mlp(self.norm2(x)))), rope


def _merge_rope(merge, rope: torch.Tensor, P: int, size: Optional[torch.Tensor], how: str) -> torch.Tensor:
    """Apply a token merge to the per-image table ``[B, 1, N - P, D]``; returns ``[B, 1, N - r - P, D]``."""
    B, _, _, D = rope.shape
    full = torch.cat([rope.new_zeros(B, P, D), rope[:, 0]], dim=1)  # prefix rows: unused placeholders
    merged = merge(full, mode="drop") if how == "dst" else merge_wavg(merge, full, size)[0]
    return merged[:, None, P:]


class EvaToMeBlocks(ToMeBlocks):
    """``model.blocks`` of a ToMe-patched Eva: as :class:`~vitfold.reduce.tome.ToMeBlocks` (same
    attributes, same ``restore``), plus ``rope_merge``, and the RoPE table as a second input."""

    rope_merge: str

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None) -> torch.Tensor:
        state = ToMeState()
        for index, block in enumerate(self):
            x, rope = block.forward_tome(x, rope, state, self.r[index], self)
        self.last_state = state
        return x


def _patched_copy(model: Eva, schedule: Schedule, method: str, blocks_cls: type, block_cls: type, **attrs) -> Eva:
    """A deep copy of ``model`` as :class:`ReducedEva` with ``blocks_cls`` / ``block_cls`` swapped in
    and ``attrs`` set on its blocks (the Eva counterpart of :func:`.patching.swap_classes`).

    Raises:
        NotImplementedError: see :func:`check_eva`.
        ScheduleError: the schedule is for a model of another depth or token count.
    """
    check_eva(model, method)
    check_schedule(model, schedule)
    patched = copy.deepcopy(model)
    patched.__class__ = ReducedEva
    blocks = patched.blocks
    blocks.__class__ = blocks_cls
    for name, value in attrs.items():
        setattr(blocks, name, value)
    for block in blocks:
        block.__class__ = block_cls
    return patched


def apply_tome(model: Eva, schedule: Schedule, prop_attn: bool, trace_source: bool, mode: str, rope_merge: str) -> Eva:
    """A ToMe-patched copy of ``model`` running ``schedule``."""
    return _patched_copy(model, schedule, "tome", EvaToMeBlocks, EvaToMeBlock, r=schedule.removed, prop_attn=prop_attn,
                         trace_source=trace_source, num_protected=model.num_prefix_tokens, mode=mode,
                         rope_merge=rope_merge)


# ------------------------------------------------------------------------------------- EViT / Top-K


class EvaPruneBlock(EvaBlock):
    """``EvaBlock`` plus :meth:`forward_prune`: keep ``k`` tokens by class attention (their RoPE rows
    with them), optionally fuse the rest into one unrotated token."""

    def forward_prune(self, x: torch.Tensor, rope: Optional[torch.Tensor], keep: int, cfg: "EvaPruneBlocks",
                      state: PruneState) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Args: ``x`` ``[B, N, C]``; returns ``([B, P + keep (+1 fused), C], its table)``."""
        P = cfg.num_protected
        if keep == x.shape[1] - P:
            return EvaBlock.forward(self, x, rope=rope), rope  # exactly Eva's block
        attn = self.attn
        y = self.norm1(x)
        q, k, v = _qkv(attn, y)
        q, k = _rotate(attn, q, rope, v), _rotate(attn, k, rope, v)
        cls_attn = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1).mean(dim=1)[:, 0]  # [B, N]
        x = x + self.drop_path1(_scaled(self.gamma_1, _attend(attn, y, q, k, v, None)))
        B, _, C = x.shape
        scores = cls_attn[:, P:]
        rest = x[:, P:]
        _, idx = torch.topk(scores, keep, dim=1, largest=True, sorted=True)  # [B, keep]
        parts = [x[:, :P], rest.gather(1, idx[..., None].expand(B, keep, C))]
        dropped = torch.ones_like(scores).scatter(1, idx, 0.0)
        if rope is not None:
            table = _per_image(rope, B)
            D = table.shape[-1]
            rows = [table[:, 0].gather(1, idx[..., None].expand(B, keep, D))]
            if cfg.fuse:
                identity = torch.cat([table.new_zeros(B, 1, D // 2), table.new_ones(B, 1, D // 2)], dim=-1)
                rows.append(identity)  # sin 0, cos 1: no rotation
            rope = torch.cat(rows, dim=1)[:, None]
        if cfg.fuse:
            parts.append((rest * (scores * dropped)[..., None]).sum(dim=1, keepdim=True))
        if cfg.trace_source:
            _trace(state, x, idx, dropped, cfg)
        x = torch.cat(parts, dim=1)
        return x + self.drop_path2(_scaled(self.gamma_2, self.mlp(self.norm2(x)))), rope


class EvaPruneBlocks(PruneBlocks):
    """``model.blocks`` of an EViT / Top-K-patched Eva: as :class:`~vitfold.reduce.evit.PruneBlocks`,
    with the RoPE table as a second input."""

    def forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None) -> torch.Tensor:
        state = PruneState()
        for index, block in enumerate(self):
            x, rope = block.forward_prune(x, rope, self.keep[index], self, state)
        state.final = x
        self.last_state = state
        return x


def apply_prune(model: Eva, schedule: Schedule, keep: tuple[int, ...], fuse: bool, trace_source: bool, method: str,
                **fill) -> Eva:
    """An EViT / Top-K-patched copy of ``model`` (``fill``: the ``--task features`` fill settings)."""
    patched = _patched_copy(model, schedule, method, EvaPruneBlocks, EvaPruneBlock, keep=keep, fuse=fuse,
                            num_protected=model.num_prefix_tokens, trace_source=trace_source, **fill)
    patched.blocks.final_norm = [patched.norm]  # a list: a reference, not a second registered submodule
    return patched


def unpatch(model: Eva, attrs: tuple[str, ...]) -> Eva:
    """Undo :func:`apply_tome` / :func:`apply_prune` in place: Eva, ``nn.Sequential`` and ``EvaBlock``
    classes back, patch attributes dropped; returns ``model``."""
    if isinstance(model, ReducedEva):
        model.__class__ = Eva
    blocks = model.blocks
    if isinstance(blocks, (EvaToMeBlocks, EvaPruneBlocks)):
        for attr in (*attrs, "last_state"):
            blocks.__dict__.pop(attr, None)
        blocks.__class__ = nn.Sequential
    for block in blocks:
        if isinstance(block, (EvaToMeBlock, EvaPruneBlock)):
            block.__class__ = EvaBlock
    return model


register_model_patch(Eva, sys.modules[__name__])
