"""Token clustering (DPC-kNN, k-medoids) as patches of timm's VisionTransformer, with static shapes.

Source: Haurum et al., "Which Tokens to Use? Investigating Token Reduction in Vision Transformers",
ICCVW 2023 (reference code: JoakimHaurum/TokenReduction ``models/dpcknn.py``), which takes the
clustering from Zeng et al., "Not All Tokens Are Equal: Human-centric Visual Analysis via Token
Clustering Transformer", CVPR 2022, Sec. 3.2 (TCFormer ``cluster_dpc_knn`` and ``merge_tokens``).

What the reference does, and this module with it:

* **where**: at each reduction location ``l`` (default 3, 6, 9, 0-indexed), *before* block ``l``:
  the block's input tokens (the residual stream, not normalised) are clustered; the prefix tokens
  (class token; here also distillation / register tokens) are set aside and concatenated back in
  front. The blocks themselves are timm's, unchanged (no proportional attention).
* **how many**: ``int(num_patches * keep_rate ** (i + 1))`` clusters at the ``i``-th location, so
  the keep rate compounds and counts refer to the original number of patches.
* **DPC-kNN** (density peaks clustering with k nearest neighbours): distances ``cdist(x, x) / sqrt(C)``;
  local density ``exp(-mean of the k smallest squared distances)`` (the token itself included, k=5);
  each token's distance to the nearest token of higher density (the largest distance in the image for
  the densest token); the ``K`` tokens with the highest ``density * distance`` become cluster centres
  (descending score = cluster order); every token joins its nearest centre (the first on ties), a
  centre always joins itself.
* **merge**: each cluster becomes the average of its member tokens, ``sum(x) / (count + 1e-6)``. The
  reference's learned token weights (``exp(score(x))``) need training; off the shelf they are equal
  (its ``--equal_weight``), which is what runs here. Tokens are not weighted by how many patches
  they already hold, as in the reference.

Differences, none of which change the clustering on untied inputs:

* the reference breaks density ties with ``1e-6 * rand`` noise; here a tie goes to the lower token
  index (deterministic, and the same in torch and ONNX Runtime);
* distances are computed from the Gram matrix (what ``torch.cdist`` does for more than 25 tokens)
  with an exact zero diagonal, densities from squared distances directly;
* assignment and averaging are one-hot matmuls with a fixed number of clusters: no scatter, no
  data-dependent shapes, TopK with constant K;
* a location where the count equals the tokens present is skipped (the reference would reorder the
  tokens and scale them by ``1 / (1 + 1e-6)``), so ``keep_rate=1.0`` is the dense model bit for bit.

**k-medoids** (the same study, ``models/kmedoids.py``, attention-weighted: its training-free variant)
clusters at the same places with the same counts. Token weights are the attention each token
*receives* in the block before (softmax probabilities summed over heads and queries); the ``K``
most-attended tokens start as medoids; ``iters`` rounds (default 3) assign every token to its
nearest medoid (``cdist``, not scaled) and move each medoid to the member ``i`` with the smallest
``w_i * sum_j d(i, j)``, the sum over *all* tokens ``j`` as in the reference (an empty cluster takes
token 0, as the reference's masked argmin does). The medoid tokens themselves (not averages) go on;
for ``restore`` every token maps to its nearest final medoid. The reference's equal-weight variant
starts from a random token and is not reproducible, so it is not offered. The block before a
location computes its attention explicitly (not timm's fused kernel) to get the probabilities.

Schedule: ``tokens[l]`` is the number of tokens *entering* block ``l``, i.e. after the clustering in
front of it. A reduction at location ``l`` therefore appears as ``removed[l - 1]``, which happens
after block ``l - 1``'s MLP (not between its attention and MLP as for ToMe/EViT): the analytic FLOP
count in :mod:`vitfold.profiles.flops`, which charges block ``l - 1``'s MLP at ``tokens[l]``,
undercounts that MLP by ``2 * removed * C * hidden`` and ignores the clustering's own ``N^2 C``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from ._registry import TokenLayout, register_method
from .patching import check_schedule, swap_classes, unpatch
from .schedule import Schedule, ScheduleError

#: The study's reduction locations for 12-block models (``--reduction_loc 3 6 9``), 0-indexed.
DEFAULT_LOCATIONS = (3, 6, 9)
#: Added to the cluster sizes before dividing, as in TCFormer's ``merge_tokens``.
MERGE_EPS = 1e-6


def pairwise_sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances ``[B, Na, Nb]`` between ``a`` ``[B, Na, C]`` and ``b`` ``[B, Nb, C]``.

    Computed as ``|a|^2 + |b|^2 - 2 a.b`` (one MatMul, as ``torch.cdist`` does for large inputs);
    may be slightly negative from rounding, callers clamp where it matters.
    """
    return (a * a).sum(-1)[..., :, None] + (b * b).sum(-1)[..., None, :] - 2.0 * (a @ b.transpose(-1, -2))


def one_hot(index: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """``[..., num_classes]`` 0/1 encoding of ``index`` (Equal + Cast in ONNX, no OneHot op)."""
    return (index[..., None] == torch.arange(num_classes, device=index.device)).to(dtype)


def cluster_dpc_knn(x: torch.Tensor, num_clusters: int, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """DPC-kNN clustering of ``x`` ``[B, N, C]`` into ``num_clusters`` clusters (TCFormer Sec. 3.2).

    Args:
        x: tokens to cluster (prefix tokens already removed).
        num_clusters: ``K``, ``1 <= K <= N`` (a Python int: the TopK K of the exported graph).
        k: neighbours for the local density, ``1 <= k <= N`` (the token itself is one of them).

    Returns:
        ``(assign [B, N] int64 cluster of each token in [0, K), centers [B, K] int64 token index of
        each cluster's centre)``; clusters are ordered by descending centre score.

    Raises:
        ValueError: ``K`` or ``k`` outside ``[1, N]`` (schedules are validated before this is reached).
    """
    batch, num_tokens, channels = x.shape
    if not 1 <= num_clusters <= num_tokens or not 1 <= k <= num_tokens:
        raise ValueError(f"need 1 <= num_clusters ({num_clusters}) and k ({k}) <= N ({num_tokens})")
    with torch.no_grad():
        index = torch.arange(num_tokens, device=x.device)
        diagonal = index[:, None] == index[None, :]
        sq = (pairwise_sq_dists(x, x) / channels).clamp(min=0.0).masked_fill(diagonal, 0.0)  # d^2 [B, N, N]
        nearest, _ = torch.topk(sq, k, dim=-1, largest=False)
        density = torch.exp(-nearest.mean(dim=-1))  # [B, N]
        # "higher": token j (column) precedes token i (row) in (density desc, index asc) order
        above = density[:, None, :] > density[:, :, None]
        tied = (density[:, None, :] == density[:, :, None]) & (index[None, :] < index[:, None])
        sq_max = sq.flatten(1).amax(dim=-1)[:, None, None]
        parent = torch.where(above | tied, sq, sq_max).amin(dim=-1)  # [B, N] squared distance
        score = parent.sqrt() * density
        _, centers = torch.topk(score, num_clusters, dim=-1)  # [B, K]
        to_centers = sq.gather(1, centers[..., None].expand(batch, num_clusters, num_tokens))  # [B, K, N]
        is_self = centers[..., None] == index  # [B, K, N]: a centre joins its own cluster
        assign = to_centers.masked_fill(is_self, -1.0).argmin(dim=1)  # [B, N]
    return assign, centers


def merge_clusters(x: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """Average each cluster's tokens: ``[B, K, C]`` from ``x`` ``[B, N, C]`` and 0/1 ``members``
    ``[B, N, K]`` (TCFormer ``merge_tokens`` with equal weights: ``sum / (count + 1e-6)``)."""
    counts = members.sum(dim=1)[..., None]  # [B, K, 1]
    return (members.transpose(1, 2) @ x) / (counts + MERGE_EPS)


def cluster_kmedoids(x: torch.Tensor, weights: torch.Tensor, num_clusters: int, iters: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention-weighted k-medoids of ``x`` ``[B, N, C]`` (Haurum et al. 2023, ``k_medoids_fit``).

    Args:
        x: tokens to cluster (prefix tokens already removed).
        weights: ``[B, N]`` token weights (attention received); the ``K`` largest start as medoids.
        num_clusters: ``K``, ``1 <= K <= N`` (a constant TopK K).
        iters: assignment / update rounds (a Python int: the loop is unrolled).

    Returns:
        ``(assign [B, N] int64 medoid of each token in [0, K), medoids [B, K] int64 token indices)``.

    Raises:
        ValueError: ``K`` outside ``[1, N]``.
    """
    batch, num_tokens, _ = x.shape
    if not 1 <= num_clusters <= num_tokens:
        raise ValueError(f"need 1 <= num_clusters ({num_clusters}) <= N ({num_tokens})")
    with torch.no_grad():
        index = torch.arange(num_tokens, device=x.device)
        diagonal = index[:, None] == index[None, :]
        dist = pairwise_sq_dists(x, x).clamp(min=0.0).masked_fill(diagonal, 0.0).sqrt()  # [B, N, N]
        cost = weights * dist.sum(dim=-1)  # [B, N]: w_i * sum_j d(i, j)
        not_member = torch.full_like(cost, num_tokens * 1e6)[:, None, :]  # the reference's masked rows
        slots = torch.arange(num_clusters, device=x.device)[:, None]  # [K, 1]
        _, medoids = torch.topk(weights, num_clusters, dim=-1)  # [B, K]
        for _ in range(iters):
            assign = dist.gather(2, medoids[:, None, :].expand(batch, num_tokens, num_clusters)).argmin(dim=-1)
            members = assign[:, None, :] == slots  # [B, K, N]
            medoids = torch.where(members, cost[:, None, :], not_member).argmin(dim=-1)
        assign = dist.gather(2, medoids[:, None, :].expand(batch, num_tokens, num_clusters)).argmin(dim=-1)
    return assign, medoids


@dataclass
class ClusterState:
    """Per-forward state. ``members``: ``[B, N0, N]`` 0/1, which current token holds each original
    patch token (prefix tokens excluded); None until the first clustering."""

    members: Optional[torch.Tensor] = None


class ClusterBlocks(nn.Sequential):
    """``model.blocks`` after patching: clusters the patch tokens in front of some blocks.

    Attributes (plain Python, fixed at patch time): ``clusters`` per block (0: no clustering in
    front of that block), ``k_neighbors``, ``num_protected``; ``last_state`` holds the latest
    forward's :class:`ClusterState` (for :meth:`restore`).
    """

    clusters: tuple[int, ...]
    k_neighbors: int
    num_protected: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, C]`` -> ``[B, N_L, C]``; every block is the model's own, called unchanged."""
        state = ClusterState()
        for index, block in enumerate(self):
            if self.clusters[index]:
                x = self._cluster(x, self.clusters[index], state)
            x = block(x)
        self.last_state = state
        return x

    def _cluster(self, x: torch.Tensor, num_clusters: int, state: ClusterState) -> torch.Tensor:
        P = self.num_protected
        prefix, tokens = x[:, :P], x[:, P:]
        assign, _ = cluster_dpc_knn(tokens, num_clusters, self.k_neighbors)
        members = one_hot(assign, num_clusters, x.dtype)  # [B, N, K]
        state.members = members if state.members is None else state.members @ members
        return torch.cat([prefix, merge_clusters(tokens, members)], dim=1)

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """Final tokens ``[B, N_L, C]`` -> ``[B, N_0, C]``: prefix tokens, then every original patch
        (grid order) with the features of the cluster that holds it. Identity when nothing was
        clustered. Call after a forward (reads ``last_state``)."""
        state = getattr(self, "last_state", None)
        if state is None or state.members is None:
            return x
        P = self.num_protected
        return torch.cat([x[:, :P], state.members @ x[:, P:]], dim=1)


class WeightedAttention(Attention):
    """timm ``Attention`` plus :meth:`forward_weighted`. Its ``forward`` is timm's, unchanged."""

    def forward_weighted(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention with explicit probabilities; also returns the attention each token receives.

        Args:
            x: ``[B, N, C]`` normalised tokens.

        Returns:
            ``([B, N, C] attention output, [B, N] probabilities summed over heads and queries)``.
        """
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, H, N, N]
        out = self.norm((self.attn_drop(attn) @ v).transpose(1, 2).reshape(B, N, self.attn_dim))
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out)), attn.sum(dim=(1, 2))


class WeightedBlock(Block):
    """timm ``Block`` plus :meth:`forward_weighted` (layer scale and drop path kept)."""

    def forward_weighted(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, N, C]`` -> ``([B, N, C], [B, N] attention received)``."""
        out, received = self.attn.forward_weighted(self.norm1(x))
        x = x + self.drop_path1(self.ls1(out))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))), received


class KMedoidsBlocks(ClusterBlocks):
    """``model.blocks`` after the k-medoids patch: the block before each location reports the
    attention its tokens receive; the medoid tokens replace the patch tokens. Attributes:
    ``clusters`` per block, ``iters``, ``num_protected``; ``last_state`` as :class:`ClusterBlocks`."""

    iters: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, C]`` -> ``[B, N_L, C]``."""
        state, received = ClusterState(), None
        last = len(self) - 1
        for index, block in enumerate(self):
            if self.clusters[index]:
                x = self._medoids(x, received, self.clusters[index], state)
            if index < last and self.clusters[index + 1]:
                x, received = block.forward_weighted(x)
            else:
                x = block(x)
        self.last_state = state
        return x

    def _medoids(self, x: torch.Tensor, received: torch.Tensor, num_clusters: int, state: ClusterState) -> torch.Tensor:
        P = self.num_protected
        prefix, tokens = x[:, :P], x[:, P:]
        assign, medoids = cluster_kmedoids(tokens, received[:, P:], num_clusters, self.iters)
        members = one_hot(assign, num_clusters, x.dtype)
        state.members = members if state.members is None else state.members @ members
        kept = tokens.gather(1, medoids[..., None].expand(-1, -1, tokens.shape[-1]))
        return torch.cat([prefix, kept], dim=1)


def check_locations(locations: Sequence[int], depth: int, first: int) -> tuple[int, ...]:
    """Validate reduction locations: strictly increasing, in ``[first, depth)``.

    Raises:
        ScheduleError: naming the bad location and the allowed range.
    """
    locations = tuple(int(b) for b in locations)
    for block in locations:
        if not first <= block < depth:
            raise ScheduleError(
                f"reduction location {block} is outside {first}..{depth - 1} for this {depth}-block model; "
                f"choose locations in that range"
            )
    if list(locations) != sorted(set(locations)):
        raise ScheduleError(f"reduction locations {list(locations)} must be strictly increasing, e.g. 3 6 9")
    return locations


def cumulative_rates(keep_rate: Union[float, Sequence[float]], locations: tuple[int, ...]) -> list[float]:
    """Share of the original patches kept after each location: ``keep_rate ** (i + 1)`` for one
    rate (the reference's formula), the running product for one rate per location.

    Raises:
        ScheduleError: a rate outside (0, 1] or a list whose length is not the number of locations.
    """
    rates = list(keep_rate) if isinstance(keep_rate, (list, tuple)) else None
    if rates is not None and len(rates) != len(locations):
        raise ScheduleError(
            f"{len(rates)} keep rates for {len(locations)} locations {list(locations)}; give one rate or one per location"
        )
    for rate in rates if rates is not None else [keep_rate]:
        if not 0.0 < float(rate) <= 1.0:
            raise ScheduleError(f"keep rate {rate} must be in (0, 1]")
    if rates is None:
        return [float(keep_rate) ** (i + 1) for i in range(len(locations))]
    return [math.prod(float(r) for r in rates[: i + 1]) for i in range(len(locations))]


class _Clustering:
    """Shared schedule for the clustering methods: counts, locations, validation, patching."""

    name = ""

    def __init__(self, keep_rate: Union[float, Sequence[float]], locations: Sequence[int]):
        self.keep_rate = keep_rate
        self.locations = tuple(int(b) for b in locations)

    def params(self) -> dict:
        rate = list(self.keep_rate) if isinstance(self.keep_rate, (list, tuple)) else self.keep_rate
        return {"keep_rate": rate, "locations": list(self.locations)}

    def _check_step(self, block: int, have: int) -> None:
        """Method-specific checks for clustering ``have`` patch tokens in front of ``block``."""

    def clusters(self, layout: TokenLayout) -> tuple[int, ...]:
        """Patch-token clusters in front of each block (0 where nothing happens).

        Raises:
            ScheduleError: see the class docstring.
        """
        locations = check_locations(self.locations, layout.depth, first=1)
        patches = layout.num_tokens - layout.num_prefix_tokens
        per_block, have = [0] * layout.depth, patches
        for block, share in zip(locations, cumulative_rates(self.keep_rate, locations)):
            count = int(patches * share)
            if count < 1:
                raise ScheduleError(f"block {block}: keep rate {self.keep_rate} leaves no cluster of {patches} patches; use a larger keep rate")
            if count < have:
                self._check_step(block, have)
                per_block[block], have = count, count
        return tuple(per_block)

    def schedule(self, layout: TokenLayout) -> Schedule:
        """Tokens entering each block (prefix included); see the module docstring for where the
        reduction happens.

        Raises:
            ScheduleError: see the class docstring.
        """
        tokens = [layout.num_tokens]
        for count in self.clusters(layout)[1:]:
            tokens.append(layout.num_prefix_tokens + count if count else tokens[-1])
        tokens.append(tokens[-1])
        notes = (f"{self.name} clusters in front of a block: removed[l] happens after block l's MLP",)
        return Schedule(tokens=tuple(tokens), num_prefix_tokens=layout.num_prefix_tokens, site="block",
                        notes=notes if tokens[-1] < tokens[0] else ())

    def _patch(self, model: VisionTransformer, schedule: Schedule) -> tuple[VisionTransformer, tuple[int, ...]]:
        """A deep copy of ``model`` and the clusters per block that ``schedule`` asks for."""
        check_schedule(model, schedule)
        if schedule.tokens[-1] != schedule.tokens[-2]:
            raise ScheduleError(f"{self.name} clusters in front of blocks; a schedule cannot reduce after the last block")
        P = schedule.num_prefix_tokens
        pairs = zip(schedule.tokens[:-1], schedule.tokens[1:-1])
        clusters = (0,) + tuple(after - P if after < before else 0 for before, after in pairs)
        return copy.deepcopy(model), clusters


@register_method("dpc-knn")
class DPCKNN(_Clustering):
    """DPC-kNN token clustering (Haurum et al., ICCVW 2023; Zeng et al., CVPR 2022), training-free.

    Args:
        keep_rate: in (0, 1]; one rate compounds over the locations (``int(P * rate ** (i + 1))``
            clusters at the ``i``-th, ``P`` patches), a list gives one rate per location (running
            product). 1.0 is the dense model.
        locations: 0-indexed blocks in front of which the tokens are clustered (the study's 4th, 7th
            and 10th of 12); each in ``1 .. depth - 1``.
        k_neighbors: neighbours for the local density (the reference's default 5).

    Raises (from :meth:`schedule`):
        ScheduleError: keep rate outside (0, 1], a location outside the model, a step leaving no
            cluster, or ``k_neighbors`` outside ``1 ..`` the tokens being clustered.
    """

    name = "dpc-knn"

    def __init__(self, keep_rate: Union[float, Sequence[float]] = 0.7,
                 locations: Sequence[int] = DEFAULT_LOCATIONS, k_neighbors: int = 5):
        super().__init__(keep_rate, locations)
        self.k_neighbors = int(k_neighbors)

    def params(self) -> dict:
        return {**super().params(), "k_neighbors": self.k_neighbors}

    def _check_step(self, block: int, have: int) -> None:
        if not 1 <= self.k_neighbors <= have:
            raise ScheduleError(
                f"k_neighbors={self.k_neighbors} must be in 1..{have} (the patch tokens clustered in front of block {block})"
            )

    def apply(self, model: VisionTransformer, schedule: Schedule) -> VisionTransformer:
        """Return a patched deep copy of ``model`` running ``schedule``.

        Raises:
            ScheduleError: the schedule is for a model of another depth or token count.
        """
        patched, clusters = self._patch(model, schedule)
        return swap_classes(patched, ClusterBlocks, clusters=clusters, k_neighbors=self.k_neighbors,
                            num_protected=patched.num_prefix_tokens)

    @staticmethod
    def remove(model: VisionTransformer) -> VisionTransformer:
        """Undo :meth:`apply` in place; returns ``model``."""
        return unpatch(model, ClusterBlocks, None, ("clusters", "k_neighbors", "num_protected"))


@register_method("kmedoids")
class KMedoids(_Clustering):
    """Attention-weighted k-medoids token clustering (Haurum et al., ICCVW 2023), training-free.

    Args:
        keep_rate: as :class:`DPCKNN` (``int(P * rate ** (i + 1))`` medoids at the ``i``-th location).
        locations: as :class:`DPCKNN` (each in ``1 .. depth - 1``: the block before gives the weights).
        iters: assignment / update rounds (the reference's ``--cluster_iters`` default 3), ``>= 0``.

    Raises (from :meth:`schedule`):
        ScheduleError: as :class:`DPCKNN`, or ``iters < 0``.
    """

    name = "kmedoids"

    def __init__(self, keep_rate: Union[float, Sequence[float]] = 0.7,
                 locations: Sequence[int] = DEFAULT_LOCATIONS, iters: int = 3):
        super().__init__(keep_rate, locations)
        self.iters = int(iters)

    def params(self) -> dict:
        return {**super().params(), "iters": self.iters}

    def _check_step(self, block: int, have: int) -> None:
        if self.iters < 0:
            raise ScheduleError(f"iters={self.iters} must be >= 0 (the reference uses 3)")

    def apply(self, model: VisionTransformer, schedule: Schedule) -> VisionTransformer:
        """Return a patched deep copy of ``model`` running ``schedule``.

        Raises:
            NotImplementedError: a block before a location is not timm's Block/Attention.
            ScheduleError: the schedule is for a model of another depth or token count.
        """
        patched, clusters = self._patch(model, schedule)
        blocks = patched.blocks
        for index, block in enumerate(blocks):
            if index + 1 < len(blocks) and clusters[index + 1]:
                attn = getattr(block, "attn", None)
                if type(block) is not Block or type(attn) is not Attention:
                    raise NotImplementedError(
                        f"kmedoids weights tokens by timm Block/Attention probabilities; block {index} is "
                        f"{type(block).__name__}/{type(attn).__name__}"
                    )
                block.__class__ = WeightedBlock
                attn.__class__ = WeightedAttention
        return swap_classes(patched, KMedoidsBlocks, clusters=clusters, iters=self.iters,
                            num_protected=patched.num_prefix_tokens)

    @staticmethod
    def remove(model: VisionTransformer) -> VisionTransformer:
        """Undo :meth:`apply` in place; returns ``model``."""
        return unpatch(model, KMedoidsBlocks, WeightedBlock, ("clusters", "iters", "num_protected"))
