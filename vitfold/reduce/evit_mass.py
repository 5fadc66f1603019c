"""Data-dependent gates: EViT with a per-image top-p keep rule (``evit-mass``), dynamic and bounded.

Source: EViT (Liang et al., ICLR 2022, Sec. 3) ranks tokens by the class token's attention and keeps a
fixed share. ``evit-mass`` keeps a per-image number instead, the top-p ("nucleus") rule applied to
that attention: at each location, with ``s`` the class token's softmax attention to the ``n``
non-prefix tokens averaged over heads (EViT's score) and ``s_(1) >= s_(2) >= ...`` those scores in
``torch.topk(sorted=True)`` order, the image keeps the ``k`` most attended tokens, where ``k`` is the
fewest with ``s_(1) + ... + s_(k) >= p * (s_(1) + ... + s_(n))``; equivalently token ``j`` (1-based,
sorted) is kept iff the mass before it, ``s_(1) + ... + s_(j-1)`` (float32 running sum), is below
``p`` times the total. The mass is relative to the non-prefix tokens (the class token's attention to
itself and to registers does not count), so every ``p`` in (0, 1] is reachable; ``p = 1`` keeps
every token and the block is timm's own (the dense model bit for bit). With fusion (EViT's default)
the dropped tokens become one token, ``sum_j s_j x_j`` over the dropped ``j`` (attention weights,
not renormalised, as EViT), appended last, and only when the dropped tokens carry attention
(``sum_j s_j > 0``; EViT fuses nothing when it keeps everything). Kept tokens follow the prefix in
descending score order. A fused token is an ordinary candidate at later locations.

Two forms compute this function:

* dynamic (:meth:`EViTMass.apply_dynamic`, the reference semantics): each image's tokens are
  compacted with a boolean mask (ONNX ``NonZero`` + ``GatherND``), so token dimensions after a gate
  depend on the image. A batch runs one image at a time; the blocks return tokens padded to the
  longest image plus a validity mask (``blocks.last_state.valid``) that pooling respects.
* bounded (:meth:`EViTMass.apply`): ``TopK`` to a constant capacity ``K`` per location plus a
  validity mask. Slots past an image's kept count are invalid: they get ``-inf`` added to the
  attention logits as keys, so no valid token sees them and the class token gives them exactly zero
  attention; hence they add no mass, sort after every valid token and are never kept by later gates,
  weigh nothing in the fused token, and are left out of average pooling. The fused slot is valid only
  when the dropped tokens carry attention. An image whose kept count fits every capacity gets the
  dynamic model's outputs (float summation order aside); one that needs more keeps its ``K`` best
  tokens and fuses the rest (EViT with ``k = K`` for that image). Every shape is static: the graph
  meets the normal export contract. :mod:`vitfold.passes.fold_gates` rewrites a dynamic export into
  the same form.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ..errors import SpecError
from ._registry import TokenLayout, register_method
from .evit import DEFAULT_LOCATIONS, ScoredAttention
from .patching import check_blocks, swap_classes
from .schedule import Schedule, ScheduleError

#: Pool types the bounded / batched dynamic forms can mask (timm ``global_pool``).
MASKABLE_POOLS = ("token", "avg")


@dataclass
class GateState:
    """Per-forward state of a gated model.

    Attributes:
        valid: ``[B, N]`` bool, True for real tokens (None while every slot is valid).
        kept: per gate, ``[B]`` int64: tokens the top-p rule keeps (before any capacity clamp).
        candidates: per gate, ``[B]`` int64: valid non-prefix tokens the gate ranked.
    """

    valid: Optional[torch.Tensor] = None
    kept: list = field(default_factory=list)
    candidates: list = field(default_factory=list)

    def bias(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """``[B, 1, 1, N]`` additive attention bias: 0 for valid keys, ``-inf`` for invalid slots."""
        if self.valid is None:
            return None
        zeros = torch.zeros(self.valid.shape, dtype=dtype, device=self.valid.device)
        return zeros.masked_fill(~self.valid, float("-inf"))[:, None, None, :]

    def counts(self, batch: int) -> torch.Tensor:
        """``[batch, G]`` kept counts, one column per gate (int64; ``G = 0`` without gates)."""
        return torch.stack(self.kept, dim=1) if self.kept else torch.zeros(batch, 0, dtype=torch.int64)


def top_p(scores: torch.Tensor, mass: float):
    """The top-p keep rule on ``scores`` ``[B, n]`` (attention probabilities, >= 0).

    Args:
        scores: ``[B, n]`` class-token attention of the candidates (exactly 0 for invalid slots,
            which the attention bias masks, so they sort after every token with attention and add
            no mass).
        mass: ``p`` in (0, 1): share of the candidates' total attention to reach.

    Returns:
        ``(order [B, n] int64, weight [B, n], keep [B, n] bool)``: candidates in descending score
        order (``torch.topk(sorted=True)``), their scores in that order, and the kept ones: token
        ``j`` is kept iff the running sum before it is below ``mass`` times the total (always a
        prefix of ``order``; never an invalid slot, since the sum before one is the total).
    """
    weight, order = torch.topk(scores, scores.shape[1], dim=1, largest=True, sorted=True)
    total = weight.cumsum(dim=1)
    before = torch.cat([torch.zeros_like(total[:, :1]), total[:, :-1]], dim=1)  # exclusive running sum
    return order, weight, before < mass * total[:, -1:]


def _sorted_tokens(x: torch.Tensor, order: torch.Tensor, prefix: int) -> torch.Tensor:
    """Non-prefix tokens of ``x`` ``[B, N, C]`` in ``order`` ``[B, n]`` -> ``[B, n, C]``."""
    return x[:, prefix:].gather(1, order[..., None].expand(-1, -1, x.shape[2]))


def _fuse(rest: torch.Tensor, weight: torch.Tensor, drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """EViT's fused token ``[B, 1, C]`` (attention-weighted sum of the dropped tokens, not
    renormalised) and whether it exists, ``[B, 1]`` bool: the dropped tokens carry attention."""
    weights = weight * drop
    return (rest * weights[..., None]).sum(dim=1, keepdim=True), weights.sum(dim=1, keepdim=True) > 0


def dynamic_gate(x: torch.Tensor, cls_attn: torch.Tensor, mass: float, prefix: int, fuse: bool):
    """One image's gate with data-dependent output length (exports as ``NonZero`` + ``GatherND``).

    Args:
        x: ``[1, N, C]`` tokens after the block's attention; ``cls_attn``: ``[1, N]``.

    Returns:
        ``(tokens [1, prefix + k (+1 fused), C], k [1] int64)``.
    """
    order, weight, keep = top_p(cls_attn[:, prefix:], mass)
    rest = _sorted_tokens(x, order, prefix)
    candidates, select = [rest], [keep]
    if fuse:
        fused, present = _fuse(rest, weight, ~keep)
        candidates.append(fused)
        select.append(present)
    # The prefix is concatenated after the data-dependent selection, not selected with it: the
    # next gate's candidate count (its TopK K) is then the selected count itself, not (selected -
    # prefix), which torch.export 2.14 cannot prove >= 0 (GuardOnDataDependentSymNode) and OpenVINO
    # refuses as a TopK K whose lower bound is negative.
    picked = torch.cat(candidates, dim=1)[torch.cat(select, dim=1)]  # [k (+1), C]
    return torch.cat([x[0, :prefix], picked])[None], keep.sum(dim=1)


def bounded_gate(x: torch.Tensor, cls_attn: torch.Tensor, mass: float, prefix: int, capacity: int, fuse: bool):
    """The gate at a constant capacity: ``TopK`` slots plus a validity mask (every shape static).

    Args:
        x: ``[B, N, C]`` tokens after the block's attention; ``cls_attn``: ``[B, N]`` (0 on invalid
            slots); capacity: ``K`` kept slots.

    Returns:
        ``(tokens [B, prefix + K (+1), C], valid [B, prefix + K (+1)] bool, k [B])``: the first
        ``min(k, K)`` slots after the prefix are valid, the fused slot when the dropped tokens carry
        attention; ``k`` is the top-p count before clamping to ``K``.
    """
    B, N, _ = x.shape
    order, weight, keep = top_p(cls_attn[:, prefix:], mass)
    rest = _sorted_tokens(x, order, prefix)
    slots = keep & (torch.arange(N - prefix, device=x.device) < capacity)[None]  # [B, n] a prefix of order
    parts = [x[:, :prefix], rest[:, :capacity]]
    valid = [torch.ones(B, prefix, dtype=torch.bool, device=x.device), slots[:, :capacity]]
    if fuse:
        fused, present = _fuse(rest, weight, ~slots)
        parts.append(fused)
        valid.append(present)
    return torch.cat(parts, dim=1), torch.cat(valid, dim=1), keep.sum(dim=1)


class GateBlock(Block):
    """timm ``Block`` plus :meth:`forward_gate`: a gate between attention and MLP, and masked attention."""

    def forward_gate(self, x: torch.Tensor, index: int, cfg: "GateBlocks", state: GateState) -> torch.Tensor:
        """Args: ``x`` ``[B, N, C]``; returns the block's output tokens and updates ``state``.

        A block that is not a gate runs timm's own forward (with the validity bias as ``attn_mask``
        once a bounded gate has run; exactly timm's block before that).
        """
        mass = cfg.mass[index]
        bias = state.bias(x.dtype)
        if mass is None:
            return Block.forward(self, x, attn_mask=bias)
        x_attn, cls_attn = self.attn.forward_scored(self.norm1(x), bias)
        x = x + self.drop_path1(self.ls1(x_attn))
        P = cfg.num_protected
        valid = state.valid
        state.candidates.append(torch.full((x.shape[0],), x.shape[1] - P, device=x.device) if valid is None
                                else valid[:, P:].sum(dim=1))
        if cfg.dynamic:
            x, kept = dynamic_gate(x, cls_attn, mass, P, cfg.fuse)
        else:
            x, state.valid, kept = bounded_gate(x, cls_attn, mass, P, cfg.capacity[index], cfg.fuse)
        state.kept.append(kept)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class GateBlocks(nn.Sequential):
    """``model.blocks`` after patching.

    Attributes (fixed at patch time): ``mass`` per block (None: not a gate), ``capacity`` per block
    (bounded form; None elsewhere), ``dynamic``, ``fuse``, ``num_protected``; ``last_state`` holds the
    latest forward's :class:`GateState` (kept counts per gate, validity mask for pooling).
    """

    mass: tuple[Optional[float], ...]
    capacity: tuple[Optional[int], ...]
    dynamic: bool
    fuse: bool
    num_protected: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N0, C] -> [B, N_L, C]``. Dynamic form with ``B > 1``: one image at a time, outputs
        padded with zeros to the longest image (``last_state.valid`` marks the real tokens)."""
        if self.dynamic and x.shape[0] > 1:
            return self._per_image(x)
        state = GateState()
        for index, block in enumerate(self):
            x = block.forward_gate(x, index, self, state)
        self.last_state = state
        return x

    def _per_image(self, x: torch.Tensor) -> torch.Tensor:
        outputs, states = [], []
        for image in x.split(1):
            outputs.append(self.forward(image))
            states.append(self.last_state)
        longest = max(out.shape[1] for out in outputs)
        lengths = torch.tensor([out.shape[1] for out in outputs], device=x.device)
        padded = torch.cat([F.pad(out, (0, 0, 0, longest - out.shape[1])) for out in outputs])
        self.last_state = GateState(
            valid=torch.arange(longest, device=x.device)[None] < lengths[:, None],
            kept=[torch.cat(column) for column in zip(*(s.kept for s in states))],
            candidates=[torch.cat(column) for column in zip(*(s.candidates for s in states))],
        )
        return padded


class GatedVisionTransformer(VisionTransformer):
    """timm ``VisionTransformer`` whose pooling skips invalid token slots (``blocks.last_state.valid``)."""

    def pool(self, x: torch.Tensor, pool_type: Optional[str] = None) -> torch.Tensor:
        """``[B, N, C] -> [B, C]``: class token, or the mean of the valid non-prefix tokens."""
        pool_type = self.global_pool if pool_type is None else pool_type
        valid = getattr(self.blocks, "last_state", GateState()).valid
        if valid is None or pool_type == "token":
            return super().pool(x, pool_type)
        start = 0 if self.pool_include_prefix else self.num_prefix_tokens
        weight = valid[:, start:, None].to(x.dtype)
        return (x[:, start:] * weight).sum(dim=1) / weight.sum(dim=1)


@register_method("evit-mass")
class EViTMass:
    """EViT with a per-image keep count: the fewest tokens holding ``keep_mass`` of the class attention.

    Args:
        keep_mass: ``p`` in (0, 1], one value or one per location; 1.0 keeps every token (dense).
        locations: 0-indexed gate blocks (EViT's 4th, 7th and 10th of 12 by default).
        capacity: bounded form: kept slots per location (an int for all, or one per location), each
            at least 1; None: every candidate (minus the fused slot). Usually calibrated
            (:mod:`vitfold.capacity`) rather than given.
        fuse: inattentive token fusion (EViT Sec. 3.2); off drops the rest.

    Raises:
        SpecError: ``keep_mass`` outside (0, 1] or ``capacity`` below 1 (on construction).
        ScheduleError (from :meth:`schedule`): a location outside the model, a list length that does
            not match the locations, a capacity above what the block holds.
    """

    name = "evit-mass"
    gated = True

    def __init__(self, keep_mass: Union[float, Sequence[float]] = 0.9, locations: Sequence[int] = DEFAULT_LOCATIONS,
                 capacity: Union[None, int, Sequence[int]] = None, fuse: bool = True):
        self.keep_mass = list(keep_mass) if isinstance(keep_mass, (list, tuple)) else keep_mass
        self.locations = tuple(int(b) for b in locations)
        self.capacity = list(capacity) if isinstance(capacity, (list, tuple)) else capacity
        self.fuse = bool(fuse)
        for p in self.keep_mass if isinstance(self.keep_mass, list) else [self.keep_mass]:
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < float(p) <= 1.0:
                raise SpecError(f"keep mass {p!r} must be a number in (0, 1] (the share of class attention to keep), e.g. 0.9")
        for k in self.capacity if isinstance(self.capacity, list) else [self.capacity]:
            if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
                raise SpecError(f"capacity {k!r} must be an int >= 1 (kept tokens per image at a location), or calibrated with --calibrate DIR")

    def params(self) -> dict:
        return {"keep_mass": self.keep_mass, "locations": list(self.locations), "capacity": self.capacity, "fuse": self.fuse}

    def with_capacity(self, capacity: Sequence[int]) -> "EViTMass":
        """This method with ``capacity`` (one per location), e.g. from calibration."""
        return EViTMass(self.keep_mass, self.locations, list(capacity), self.fuse)

    def _per_location(self, value, what: str) -> list:
        values = list(value) if isinstance(value, list) else [value] * len(self.locations)
        if len(values) != len(self.locations):
            raise ScheduleError(f"{len(values)} {what} values for {len(self.locations)} locations {list(self.locations)}; "
                                f"give one value or one per location")
        return values

    def masses(self, depth: int) -> list[Optional[float]]:
        """``p`` per block: None where the block is no gate (not a location, or ``p = 1``).

        Raises:
            ScheduleError: a location outside ``0..depth-1``, repeated, or a list of the wrong length.
        """
        per_block: list[Optional[float]] = [None] * depth
        if len(set(self.locations)) != len(self.locations):
            raise ScheduleError(f"locations {list(self.locations)} repeat a block; give each block once")
        for block, p in zip(self.locations, self._per_location(self.keep_mass, "keep mass")):
            if not 0 <= block < depth:
                raise ScheduleError(f"gate location {block} is outside the model's blocks 0..{depth - 1}; choose locations below {depth}")
            per_block[block] = None if float(p) == 1.0 else float(p)
        return per_block

    def capacities(self, layout: TokenLayout) -> list[Optional[int]]:
        """Capacity ``K`` per block (None where the block is no gate); default: every candidate.

        With fusion, a gate on ``n`` slots holds at most ``n - 1`` kept tokens (the fused token takes
        the last slot; a token count never grows).

        Raises:
            ScheduleError: see the class docstring; ``layout`` without a class token.
        """
        P = layout.num_prefix_tokens
        if P < 1:
            raise ScheduleError(f"{self.name} ranks tokens by class-token attention; this model has no class token. Use tome instead.")
        masses = self.masses(layout.depth)
        wanted = dict(zip(self.locations, self._per_location(self.capacity, "capacity")))
        out: list[Optional[int]] = [None] * layout.depth
        slots = layout.num_tokens - P
        for block in range(layout.depth):
            if masses[block] is None:
                continue
            most = slots - (1 if self.fuse else 0)
            k = most if wanted[block] is None else wanted[block]
            if not 1 <= k <= most:
                raise ScheduleError(
                    f"block {block}: capacity {k} does not fit: the gate ranks {slots} token slots and holds at most {most} "
                    f"kept tokens{' (one slot is the fused token)' if self.fuse else ''}; give a capacity in 1..{most}")
            out[block] = k
            slots = k + (1 if self.fuse else 0)
        return out

    def schedule(self, layout: TokenLayout) -> Schedule:
        """Token counts per block of the bounded form (prefix and fused slot included).

        Raises:
            ScheduleError: see :meth:`capacities`.
        """
        P = layout.num_prefix_tokens
        tokens = [layout.num_tokens]
        for k in self.capacities(layout):
            tokens.append(tokens[-1] if k is None else P + k + (1 if self.fuse else 0))
        notes = (f"data-dependent gate (top-p {self.keep_mass}): token counts are the bounded form's capacities; "
                 "invalid slots are masked",)
        return Schedule(tokens=tuple(tokens), num_prefix_tokens=P, notes=notes)

    def _patch(self, model: VisionTransformer, masses: list, capacities: list, dynamic: bool) -> VisionTransformer:
        if type(model) is not VisionTransformer:
            raise NotImplementedError(f"{self.name} patches timm VisionTransformer; got {type(model).__name__}")
        if model.attn_pool is not None or model.global_pool not in MASKABLE_POOLS:
            raise NotImplementedError(f"{self.name}: pooling {model.global_pool!r} cannot skip masked tokens; "
                                      f"supported: {', '.join(MASKABLE_POOLS)}")
        check_blocks(model, self.name)
        patched = copy.deepcopy(model)
        patched.__class__ = GatedVisionTransformer
        return swap_classes(patched, GateBlocks, GateBlock, ScoredAttention, mass=tuple(masses), capacity=tuple(capacities),
                            dynamic=dynamic, fuse=self.fuse, num_protected=model.num_prefix_tokens)

    def apply(self, model: VisionTransformer, schedule: Schedule) -> VisionTransformer:
        """The bounded form: a patched deep copy of ``model`` with ``schedule``'s capacities.

        Raises:
            NotImplementedError: a block, attention or pooling type this patch does not know.
            ScheduleError: ``schedule`` is not this method's bounded schedule for ``model``.
        """
        layout = TokenLayout.of(model)
        if schedule != self.schedule(layout):
            raise ScheduleError(f"schedule {list(schedule.tokens)} is not {self.name}'s bounded schedule for this model "
                                f"({list(self.schedule(layout).tokens)}); build it with method.schedule(layout)")
        return self._patch(model, self.masses(layout.depth), self.capacities(layout), dynamic=False)

    def apply_dynamic(self, model: VisionTransformer) -> VisionTransformer:
        """The dynamic form (reference semantics): a patched deep copy whose token counts depend on
        each image. ``model(images [B, 3, H, W])`` works for any ``B``; it exports at ``B = 1`` only
        (NonZero, dynamic token dimensions: ``export_onnx(..., dynamic=True)``).

        Raises:
            NotImplementedError / ScheduleError: as :meth:`apply`.
        """
        layout = TokenLayout.of(model)
        self.capacities(layout)  # validates locations and masses on this model
        return self._patch(model, self.masses(layout.depth), [None] * layout.depth, dynamic=True)


def gate_blocks(model: nn.Module) -> list[int]:
    """Indices of the gate blocks of a model patched by :class:`EViTMass` (either form)."""
    return [i for i, p in enumerate(model.blocks.mass) if p is not None]

