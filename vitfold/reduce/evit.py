"""EViT: keep the tokens the class token attends to most, fuse the rest into one token.

Source: Liang et al., "Not All Patches are What You Need: Expediting Vision Transformers via Token
Reorganizations", ICLR 2022, Sec. 3 (attentive token identification, inattentive token fusion).
Reference: youweiliang/evit ``evit.py`` (``Attention.forward``, ``Block.forward``). At each reduction
block, between attention and MLP:

* the class token's attention to every other token, averaged over heads (softmax probabilities of
  the block's own attention), ranks the non-prefix tokens;
* the top ``k = ceil(keep_rate * (N - P))`` stay, in descending attention order (``topk``
  ``sorted=True``), right after the prefix tokens;
* with fusion, the others become one token: their sum weighted by that attention (not
  renormalised, as in the reference), appended last. A token fused earlier is an ordinary token at
  later reduction blocks, as in the reference.

Differences that leave the numbers unchanged: the class-token row of the attention is recomputed
from ``q[:, :, :1]`` so the block keeps timm's fused attention kernel for its output; the fused
token is a masked sum over all candidates (the complement as a 0/1 mask, one ScatterElements
without reduction) instead of a gather of the complement indices; ``P`` prefix tokens (class,
distillation, registers) are protected where the reference handles only the class token.
"""

from __future__ import annotations

import math
from functools import partial
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ..errors import SpecError
from ._registry import MaxRemoved, SchedulePlan, TokenLayout, model_patch, register_method
from .patching import patchable_copy, swap_classes
from .schedule import Schedule, ScheduleError

#: The reference's reduction blocks for 12-block models (``--drop_loc '(3, 6, 9)'``), 0-indexed.
DEFAULT_LOCATIONS = (3, 6, 9)


class ScoredAttention(Attention):
    """timm ``Attention`` plus :meth:`forward_scored`. Its ``forward`` is timm's, unchanged."""

    def forward_scored(self, x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention that also returns the class token's attention probabilities.

        Args:
            x: ``[B, N, C]`` normalised tokens, class token at position 0.
            bias: ``[B, 1, 1, N]`` added to the logits (a gate's validity mask: 0 for valid keys,
                ``-inf`` for empty slots, which then get exactly 0 attention), or None.

        Returns:
            ``([B, N, C] attention output, [B, N] class-token attention averaged over heads)``.
        """
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        logits_cls = (q[:, :, :1] * self.scale) @ k.transpose(-2, -1)  # [B, H, 1, N]
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            logits = (q * self.scale) @ k.transpose(-2, -1)
            out = (logits if bias is None else logits + bias).softmax(dim=-1) @ v
        cls_attn = (logits_cls if bias is None else logits_cls + bias).softmax(dim=-1)
        out = self.norm(out.transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out)), cls_attn.mean(dim=1)[:, 0]


@dataclass
class PruneState:
    """Per-forward state for dense reconstruction (only with ``trace_source``).

    ``fill="reconstruct"``: ``source`` rows hold each current token's reconstruction weights for the
    originals, ``residual`` ``[B, N0, C]`` what those weights missed of each pruned token where it was
    pruned (its features minus the weighted kept tokens, residual stream), ``final`` the last block's
    output (before the final norm).

    ``source``: ``[B, N, N0]`` 0/1 membership of the original tokens in each current token (the fused
    token holds every token it absorbed). ``frozen``: ``[B, N0, C]`` each original token's features
    when it was dropped without fusion, ``dropped``: ``[B, N0, 1]`` 1 where that happened.
    """

    source: Optional[torch.Tensor] = None
    frozen: Optional[torch.Tensor] = None
    dropped: Optional[torch.Tensor] = None
    residual: Optional[torch.Tensor] = None
    final: Optional[torch.Tensor] = None


def keep_count(num_tokens: int, num_prefix: int, keep_rate: float) -> int:
    """Tokens kept at a reduction block: ``ceil(keep_rate * (N - P))``, the reference's formula."""
    return math.ceil(keep_rate * (num_tokens - num_prefix))


def _prune(x: torch.Tensor, cls_attn: torch.Tensor, keep: int, num_protected: int, fuse: bool,
           trace=None) -> torch.Tensor:
    """One reduction site: the prefix tokens, then the ``keep`` most attended others in falling
    attention order, then (``fuse``) their complement's attention-weighted sum.

    Args:
        x: ``[B, N, C]`` tokens; ``cls_attn``: ``[B, N]`` class-token attention (prefix positions included).
        trace: called with the kept indices ``[B, keep]`` and the dropped mask ``[B, N - P]`` (1 = not kept).

    Returns:
        ``[B, P + keep (+1 when fusing), C]``.
    """
    B, _, C = x.shape
    P = num_protected
    scores = cls_attn[:, P:]  # [B, N - P]
    rest = x[:, P:]
    _, idx = torch.topk(scores, keep, dim=1, largest=True, sorted=True)  # [B, keep]
    parts = [x[:, :P], rest.gather(1, idx[..., None].expand(B, keep, C))]
    dropped = torch.ones_like(scores).scatter(1, idx, 0.0)  # [B, N - P] 1 = not kept
    if fuse:
        parts.append((rest * (scores * dropped)[..., None]).sum(dim=1, keepdim=True))
    if trace is not None:
        trace(idx, dropped)
    return torch.cat(parts, dim=1)


class PruneSite(nn.Module):
    """One reduction site's top-k and fusion (Sec. 3) as a module of its own: the exporter then names
    the site's nodes after it (``blocks.L.prune_site``), so that
    :func:`vitfold.passes.fuse_sites.fuse_sites` can replace them with one fused op. No weights.

    ``forward(x [B, N, C], cls_attn [B, N], keep, num_protected, fuse) -> [B, P + keep (+1), C]``.
    """

    def forward(self, x: torch.Tensor, cls_attn: torch.Tensor, keep: int, num_protected: int, fuse: bool) -> torch.Tensor:
        return _prune(x, cls_attn, keep, num_protected, fuse)


class PruneBlock(Block):
    """timm ``Block`` plus :meth:`forward_prune`: keep ``k`` tokens between attention and MLP."""

    prune_site: PruneSite

    def forward_prune(self, x: torch.Tensor, keep: int, cfg: "PruneBlocks", state: PruneState) -> torch.Tensor:
        """Args: ``x`` ``[B, N, C]``; ``keep`` non-prefix tokens to keep (``N - P`` = no pruning).

        Returns ``[B, P + keep (+1 when fusing), C]``.
        """
        P = cfg.num_protected
        if keep == x.shape[1] - P:
            return Block.forward(self, x)  # exactly timm's block
        x_attn, cls_attn = self.attn.forward_scored(self.norm1(x))
        x = x + self.drop_path1(self.ls1(x_attn))
        if cfg.trace_source:
            x = _prune(x, cls_attn, keep, P, cfg.fuse, partial(_trace, state, x, cfg=cfg))  # traces the x before pruning
        else:  # the fusable site: one module call
            x = self.prune_site(x, cls_attn, keep, P, cfg.fuse)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def forward_restore(self, x: torch.Tensor, cfg: "PruneBlocks", state: PruneState) -> torch.Tensor:
        """timm's block with the full grid rebuilt at the reduction site (:meth:`PruneBlocks.rebuild`).

        Args: ``x`` ``[B, N, C]`` reduced tokens. Returns ``[B, N0, C]``, the original token order.
        """
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        x = cfg.rebuild(x, state)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def _trace(state: PruneState, x: torch.Tensor, idx: torch.Tensor, dropped: torch.Tensor, cfg: "PruneBlocks") -> None:
    """Update ``state`` for a pruning step on ``x`` ``[B, N, C]`` keeping ``idx`` ``[B, k]``.

    ``fill="reconstruct"``: each pruned token's row of ``source`` is spread over the kept tokens with
    :func:`reconstruction_weights` (taken here, where it is pruned), so that :meth:`PruneBlocks.restore`
    rebuilds it from the final tokens; ``fill="source"``: the fused token holds it (EViT), or its
    features at this block are frozen (Top-K).
    """
    B, N, C = x.shape
    P = cfg.num_protected
    if state.source is None:
        state.source = torch.eye(N, dtype=x.dtype, device=x.device)[None].expand(B, N, N)
    source, n0 = state.source, state.source.shape[-1]
    rest = source[:, P:]  # [B, N - P, N0]
    kept = rest.gather(1, idx[..., None].expand(B, idx.shape[1], n0))
    if getattr(cfg, "fill", "source") == "reconstruct":
        rest_x = x[:, P:]
        weights = reconstruction_weights(rest_x, idx, cfg.recon_k, cfg.recon_temperature) * dropped[..., None]
        # What the neighbours miss of each pruned token here, carried to the end for the originals it holds.
        kept_x = rest_x.gather(1, idx[..., None].expand(B, idx.shape[1], C))
        residual = rest.transpose(1, 2) @ ((rest_x - weights @ kept_x) * dropped[..., None])  # [B, N0, C]
        state.residual = residual if state.residual is None else state.residual + residual
        parts = [source[:, :P], kept + weights.transpose(1, 2) @ rest]  # [B, keep, N0]
        if cfg.fuse:
            parts.append(torch.zeros_like(source[:, :1]))  # the fused token stands for no original token
        state.source = torch.cat(parts, dim=1)
        return
    parts = [source[:, :P], kept]
    lost = (rest * dropped[..., None]).amax(dim=1)  # [B, N0] originals leaving without a home
    if cfg.fuse:
        parts.append(lost[:, None])
    else:
        # Remember the dropped tokens' current features for every original they hold.
        weights = rest * dropped[..., None]  # [B, N - P, N0]
        frozen = weights.transpose(1, 2) @ x[:, P:]  # [B, N0, C]
        if state.frozen is None:
            state.frozen, state.dropped = frozen, lost[..., None]
        else:
            state.frozen, state.dropped = state.frozen + frozen, state.dropped + lost[..., None]
    state.source = torch.cat(parts, dim=1)


def reconstruction_weights(tokens: torch.Tensor, idx: torch.Tensor, k: int, temperature: float) -> torch.Tensor:
    """Each token's weights over the kept tokens, for rebuilding it from them after the last block.

    In the manner of Expedit's token reconstruction layer (Liang et al., NeurIPS 2022, Sec. 3; the
    reference ``TokenReconstructionBlock``): affinities are taken where the token leaves (here: the
    pruning block's residual stream), kept for the ``k`` nearest, and applied to the *final* tokens.
    Differences from that layer: the affinity is cosine similarity over ``temperature`` rather than
    a negative squared distance (residual-stream scales differ by model and block; the cosine does
    not), and the ``k`` weights are a softmax (they sum to 1, so a rebuilt token is a convex mix of
    final tokens at their scale) rather than L2-normalised.

    Args:
        tokens: ``[B, M, C]`` non-prefix tokens at the pruning block.
        idx: ``[B, K]`` the kept ones (indices into ``M``).
        k: neighbours per token, capped at ``K``.
        temperature: divides the cosine similarities.

    Returns:
        ``[B, M, K]``: row ``i`` holds token ``i``'s weights over the kept tokens (summing to 1).
    """
    B, M, C = tokens.shape
    unit = F.normalize(tokens, dim=-1)
    kept = unit.gather(1, idx[..., None].expand(B, idx.shape[1], C))
    similarity = unit @ kept.transpose(1, 2)  # [B, M, K]
    top, where = similarity.topk(min(k, idx.shape[1]), dim=-1)
    return torch.zeros_like(similarity).scatter(-1, where, (top / temperature).softmax(dim=-1))


class PruneBlocks(nn.Sequential):
    """``model.blocks`` after patching: each block keeps ``keep[l]`` non-prefix tokens.

    Attributes (fixed at patch time): ``keep`` per block, ``fuse``, ``num_protected``,
    ``trace_source``, the fill settings, ``restore_at`` (the schedule's ``restored_at``: the block
    whose reduction site rebuilds the full grid, or None); ``last_state`` holds the latest forward's
    :class:`PruneState`.
    """

    keep: tuple[int, ...]
    fuse: bool
    num_protected: int
    trace_source: bool
    fill: str
    recon_k: int
    recon_temperature: float
    restore_at: Optional[int] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = PruneState()
        for index, block in enumerate(self):
            if index == self.restore_at:
                x = block.forward_restore(x, self, state)
            else:
                x = block.forward_prune(x, self.keep[index], self, state)
        state.final = x
        self.last_state = state
        return x

    def rebuild(self, x: torch.Tensor, state: PruneState) -> torch.Tensor:
        """Residual-stream tokens ``[B, N, C]`` -> ``[B, N0, C]`` in the original order, inside the network.

        The fill rules of :meth:`restore` without the final norm: a kept token is itself; a pruned one
        is its reconstruction weights' mix of ``x`` plus its ``residual`` (``reconstruct``), or the
        fused token / its features when dropped (``source``). Afterwards ``state`` holds no sources, so
        the later blocks run dense and :meth:`restore` is the identity. Expedit (Liang et al.,
        NeurIPS 2022, Sec. 3.3) likewise places its reconstruction layer before the last blocks.
        """
        if state.source is None:
            return x
        out = state.source.transpose(1, 2) @ x
        if state.residual is not None:
            out = out + state.residual
        elif state.frozen is not None:
            out = out + state.dropped * state.frozen
        state.source = state.residual = state.frozen = state.dropped = None
        return out

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the last block ``[B, N_L, C]`` -> ``[B, N_0, C]`` in the original order.

        Each original token takes the features of the token that holds it at the end. Kept: itself.
        Pruned, ``fill="reconstruct"``: the final norm of the mix of final tokens its reconstruction
        weights name plus what that mix missed of it where it was pruned (``residual``).
        Pruned, ``fill="source"``: the fused token, or (no fusion) its features from when it was
        dropped, passed through the model's final norm like ``x``. Needs ``trace_source``; the
        identity when nothing was pruned.
        """
        state = getattr(self, "last_state", None)
        if state is None or state.source is None:
            return x
        if state.residual is not None:  # fill="reconstruct": mix the final tokens before the final norm
            (norm,) = self.final_norm
            return norm(state.source.transpose(1, 2) @ state.final + state.residual)
        out = state.source.transpose(1, 2) @ x  # [B, N0, C]
        if state.frozen is not None:
            (norm,) = self.final_norm
            out = out + state.dropped * norm(state.frozen)
        return out


@register_method("evit")
class EViT:
    """EViT (Liang et al., ICLR 2022): top-k tokens by class attention, the rest fused into one.

    Args:
        keep_rate: share of the non-prefix tokens kept at each reduction block, in (0, 1]; an int
            list gives one rate per location. 1.0 is the dense model.
        locations: 0-indexed reduction blocks (the paper's 4th, 7th and 10th of 12).
        fuse: inattentive token fusion (Sec. 3.2); off gives plain Top-K pruning.
        trace_source: keep token sources for ``--task features`` (dense reconstruction).
        fill: ``--task features`` only: how a pruned position is filled at the end.
            ``reconstruct`` (default): rebuilt from the final tokens with weights taken where it was
            pruned (:func:`reconstruction_weights`, after Expedit's reconstruction layer).
            ``source``: the token that absorbed it (EViT: the fused token), or its features when it
            was dropped (Top-K). On DINOv2 ViT-S/14, keep 0.7, OpenVINO, the shipped photos and their
            mirror images (``benchmarks/dense_features.py``): mean / p5 patch cosine vs dense, EViT
            0.82 / 0.19 with ``source`` and 0.94 / 0.82 with ``reconstruct``; Top-K 0.47 / 0.11 and
            0.94 / 0.81.
        recon_k, recon_temperature: the reconstruction's neighbours per pruned token and the
            temperature dividing its cosine similarities.
        restore_at: ``--task features`` only: a block whose reduction site rebuilds the full grid
            (:meth:`PruneBlocks.rebuild`) instead of pruning, so that block's MLP and the later
            blocks run on every token (Expedit's reconstruction layer placed before the last
            blocks); locations at or after it do not prune. None (default): the grid is rebuilt
            after the last block. It trades FLOPs for the dense map: on the benchmark above, keep
            0.7, EViT reaches 0.97 / 0.91 with ``restore_at=9`` at a FLOP ratio of 1.26x (1.53x
            without) and 0.95 / 0.83 with ``restore_at=10`` at 1.35x; Top-K 0.97 / 0.91 at 1.27x.
            ToMe r=8 gives 0.99 / 0.98 at 1.25x, so where the map is what matters, ToMe is the
            better buy at that FLOP ratio.

    Raises (from :meth:`schedule`):
        ScheduleError: keep rate outside (0, 1], a location outside the model, a step that
            would keep no patch token, or ``restore_at`` outside the model or without
            ``trace_source`` (``--task features``).
    """

    name = "evit"
    default_fuse = True

    #: ``--schedule auto``: default cap on one location's pruning: keep rate >= 0.5, the lowest the EViT
    #: paper reports (Liang et al., ICLR 2022, Table 2: keep rates 0.5-0.9 at blocks 4, 7, 10).
    plan_max_fraction = 0.5
    schedule_param = "keep_rate"

    def plan(self, layout: TokenLayout, max_fraction: float) -> SchedulePlan:
        """The planner's view (:class:`SchedulePlan`): removal only at this method's locations, at most
        ``max_fraction`` of the patch tokens there; calibration at keep rate 0.7; a schedule's keep
        rate per location.

        Raises:
            SpecError: ``restore_at`` is set (the planner does not place it).
        """
        if self.restore_at is not None:
            raise SpecError("--schedule auto does not place restore_at; give --keep-rate with restore_at, or drop it")
        locations, P, fuse = list(self.locations), layout.num_prefix_tokens, self.fuse
        return SchedulePlan(prune_max_removed(locations, P, fuse, max_fraction), {"keep_rate": 0.7},
                            lambda tokens: {"keep_rate": prune_params(tokens, locations, P, fuse), "locations": locations})

    FILLS = ("reconstruct", "source")

    def __init__(self, keep_rate: Union[float, Sequence[float]] = 0.7,
                 locations: Sequence[int] = DEFAULT_LOCATIONS, fuse: Optional[bool] = None,
                 trace_source: bool = False, fill: str = "reconstruct", recon_k: int = 4,
                 recon_temperature: float = 0.1, restore_at: Optional[int] = None):
        if fill not in self.FILLS:
            raise SpecError(f"{self.name} fill {fill!r} unknown; choose one of {', '.join(self.FILLS)}")
        if int(recon_k) < 1 or not float(recon_temperature) > 0:
            raise SpecError(f"recon_k={recon_k} must be >= 1 and recon_temperature={recon_temperature} > 0")
        self.keep_rate = keep_rate
        self.locations = tuple(int(b) for b in locations)
        self.fuse = self.default_fuse if fuse is None else bool(fuse)
        self.trace_source = trace_source
        self.fill = fill
        self.recon_k = int(recon_k)
        self.recon_temperature = float(recon_temperature)
        if restore_at is not None and (isinstance(restore_at, bool) or not isinstance(restore_at, int)):
            raise SpecError(f"restore_at must be a block index (an int), got {restore_at!r}")
        self.restore_at = restore_at

    def params(self) -> dict:
        rate = list(self.keep_rate) if isinstance(self.keep_rate, (list, tuple)) else self.keep_rate
        return {"keep_rate": rate, "locations": list(self.locations), "fuse": self.fuse,
                "trace_source": self.trace_source, "fill": self.fill, "recon_k": self.recon_k,
                "recon_temperature": self.recon_temperature, "restore_at": self.restore_at}

    def _fill_attrs(self) -> dict:
        return {"fill": self.fill, "recon_k": self.recon_k, "recon_temperature": self.recon_temperature}

    def rates(self, depth: int) -> list[float]:
        """Keep rate per block (1.0 outside the locations)."""
        rates = list(self.keep_rate) if isinstance(self.keep_rate, (list, tuple)) else [self.keep_rate] * len(self.locations)
        if len(rates) != len(self.locations):
            raise ScheduleError(f"{len(rates)} keep rates for {len(self.locations)} locations {list(self.locations)}; give one rate or one per location")
        per_block = [1.0] * depth
        for block, rate in zip(self.locations, rates):
            if not 0 <= block < depth:
                raise ScheduleError(f"reduction location {block} is outside the model's blocks 0..{depth - 1}; choose locations below {depth}")
            if not 0.0 < float(rate) <= 1.0:
                raise ScheduleError(f"keep rate {rate} at block {block} must be in (0, 1]")
            per_block[block] = float(rate)
        return per_block

    def schedule(self, layout: TokenLayout) -> Schedule:
        """Token counts per block (prefix and fused token included).

        Raises:
            ScheduleError: see the class docstring.
        """
        P = layout.num_prefix_tokens
        if P < 1:
            raise ScheduleError(f"{self.name} ranks tokens by class-token attention; this model has no class token. Use tome instead.")
        at = self._check_restore_at(layout.depth)
        tokens, full = [layout.num_tokens], layout.num_tokens
        rates = self.rates(layout.depth)
        pruning = [block for block, rate in enumerate(rates) if rate < 1.0]
        if at is not None and pruning and pruning[0] >= at:
            raise ScheduleError(f"restore_at={at}: nothing is pruned before block {at} (the first location that prunes is "
                                f"{pruning[0]}), so the build would be the dense model; choose a block after {pruning[0]}, "
                                f"or drop restore_at")
        for block, rate in enumerate(rates):
            have = tokens[-1]
            if at is not None and block >= at:
                tokens.append(full)  # rebuilt at block `at`'s site (or never reduced): every token from here on
                continue
            keep = keep_count(have, P, rate)
            if keep < 1:
                raise ScheduleError(f"block {block}: keep rate {rate} keeps no patch token of {have - P}; use a larger keep rate")
            tokens.append(P + keep + int(self.fuse) if keep < have - P else have)
        notes = []
        if self.fuse:
            notes.append("one fused token is appended at each reduction block")
        restored = at if at is not None and tokens[at] < full else None
        if restored is not None:
            later = {0: "", 1: f" and block {at + 1}"}.get(layout.depth - 1 - at, f" and blocks {at + 1}..{layout.depth - 1}")
            notes.append(f"the full grid of {full} tokens is rebuilt at block {at}'s reduction site (restore_at); "
                         f"its MLP{later} run on every token")
            skipped = [b for b, rate in enumerate(rates) if b >= at and rate < 1.0]
            if skipped:
                notes.append(f"locations {skipped} are at or after restore_at={at} and do not prune")
        return Schedule(tokens=tuple(tokens), num_prefix_tokens=P, notes=tuple(notes), restored_at=restored)

    def _check_restore_at(self, depth: int) -> Optional[int]:
        """``restore_at``, checked against the model's ``depth`` and the task."""
        at = self.restore_at
        if at is None:
            return None
        if not self.trace_source:
            raise ScheduleError(f"restore_at={at} rebuilds the full patch grid, which only --task features uses; "
                                f"build with --task features or drop restore_at")
        if not 0 <= at < depth:
            raise ScheduleError(f"restore_at={at} is outside the model's blocks 0..{depth - 1}; choose a block below {depth}")
        return at

    def keeps(self, schedule: Schedule) -> tuple[int, ...]:
        """Non-prefix tokens kept per block, from a schedule this method made."""
        P = schedule.num_prefix_tokens
        out = []
        for before, after in zip(schedule.tokens, schedule.tokens[1:]):
            fused = 1 if self.fuse and after < before else 0
            out.append(after - P - fused)
        return tuple(out)

    def apply(self, model: VisionTransformer, schedule: Schedule) -> VisionTransformer:
        """Return a patched deep copy of ``model`` running ``schedule``.

        Raises:
            NotImplementedError: a block or attention type this patch does not know.
            ScheduleError: the schedule is for a model of another depth or token count.
        """
        patch = model_patch(model)
        if patch is not None and schedule.restored_at is not None:
            raise SpecError(f"restore_at is not implemented for {type(model).__name__} models (their RoPE table "
                            f"would have to be rebuilt too); drop restore_at")
        if patch is not None:  # timm Eva: vitfold.reduce.eva
            return patch.apply_prune(model, schedule, self.keeps(schedule), self.fuse, self.trace_source, self.name,
                                     **self._fill_attrs())
        patched = patchable_copy(model, schedule, self.name)
        patched = swap_classes(patched, PruneBlocks, PruneBlock, ScoredAttention, keep=self.keeps(schedule), fuse=self.fuse,
                               num_protected=model.num_prefix_tokens, trace_source=self.trace_source,
                               final_norm=[patched.norm], restore_at=schedule.restored_at, **self._fill_attrs())  # a list: a reference, not a second registered submodule
        for block in patched.blocks:
            block.prune_site = PruneSite()
        return patched


def prune_max_removed(locations: Sequence[int], num_prefix_tokens: int, fuse: bool,
                      max_fraction: float = 0.5) -> MaxRemoved:
    """EViT's / Top-K's limit: tokens go only at the reduction ``locations``; there at most
    ``max_fraction`` of the patch tokens (keep rate >= 1 - max_fraction), at least one patch token
    kept, plus the fused token when fusing (``P + keep + 1`` tokens after the block).

    Raises:
        SpecError: ``max_fraction`` outside (0, 1).
    """
    if not 0.0 < max_fraction < 1.0:
        raise SpecError(f"max prune fraction {max_fraction} must be in (0, 1): a keep rate of 1 - fraction per location")
    where, extra = frozenset(int(b) for b in locations), int(bool(fuse))

    def limit(block: int, tokens: int) -> int:
        patches = tokens - num_prefix_tokens
        if block not in where or patches < 2 + extra:
            return 0
        keep = max(1, math.ceil((1.0 - max_fraction) * patches))
        return max(0, patches - keep - extra)

    return limit


def prune_params(tokens: Sequence[int], locations: Sequence[int], num_prefix_tokens: int, fuse: bool) -> list[float]:
    """EViT's / Top-K's keep rate per location for a schedule's ``tokens``.

    A location whose count does not fall keeps rate 1.0. Each other rate is ``keep / (N - P)`` to 6
    digits, or ``(keep - 0.5) / (N - P)`` where float rounding would make the reference's keep count
    ``ceil(rate * (N - P))`` land on ``keep + 1``: the method then runs exactly the picked count.

    Raises:
        ScheduleError: the count changes at a block that is not a location, or a location's count
            is not one the method can produce.
    """
    where = [int(b) for b in locations]
    P, extra = num_prefix_tokens, int(bool(fuse))
    for block, (before, after) in enumerate(zip(tokens, tokens[1:])):
        if after != before and block not in where:
            raise ScheduleError(f"block {block} changes the token count ({before} -> {after}) but is not a reduction location {where}")
    rates = []
    for block in where:
        before, after = tokens[block], tokens[block + 1]
        if after == before:
            rates.append(1.0)
            continue
        keep = after - P - extra
        if not 1 <= keep < before - P:
            raise ScheduleError(f"block {block}: {before} -> {after} tokens is no keep count of this method (prefix {P}, fuse {bool(fuse)})")
        rate = math.floor(keep / (before - P) * 1e6) / 1e6
        if keep_count(before, P, rate) != keep:  # e.g. 0.1 * 30 = 3.0000000000000004 rounds up
            rate = round((keep - 0.5) / (before - P), 6)
        assert keep_count(before, P, rate) == keep, (before, after, rate)
        rates.append(rate)
    return rates
