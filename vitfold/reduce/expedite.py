"""Expedite: training-free token clustering + reconstruction for dense prediction, static shapes.

Source: Liang et al., "Expediting Large-Scale Vision Transformer for Dense Prediction without
Fine-tuning", NeurIPS 2022, Sec. 3 (token clustering layer, token reconstruction layer). Reference
code: the authors' Expedit-LargeScale-Vision-Transformer / Expedit-SAM ``TokenClusteringBlock`` and
``TokenReconstructionBlock``. What runs here, as there:

* **clustering layer**, after block ``location``: the patch tokens (residual stream, prefix tokens
  set aside) form an ``H x W`` map; ``h x w`` cluster centres start as its adaptive average pool;
  ``iters`` rounds of local soft k-means follow: each token's affinity to the centres is
  ``softmax(-|x - s|^2 / temperature)`` over the centres whose grid cell lies within
  ``window // 2`` cells (row and column) of the token's initial cell, and each centre becomes the
  affinity-weighted mean of the tokens. The ``h * w`` centres replace the patch tokens; the
  following blocks run unchanged on ``prefix + h * w`` tokens.
* **reconstruction layer**, on the final (normed) tokens: each original token ``i`` takes
  ``sum_j a_ij z_j`` over the refined clusters ``z_j``, with ``a_ij = exp(-|x_i - s_j|^2 / temperature)``
  from the features *at the clustering layer* (token before clustering, centre after it), kept for
  the ``k`` largest per token and L2-normalised (``F.normalize``, as the reference code; the paper's
  text reads like a softmax, which differs only in scale, not direction).

``temperature`` divides the squared distances, as the reference's Swin variant does
(``self.temperture = 1 / temperture``); the ViT/SAM variants multiply by their ``temperture``, i.e.
their ``t`` is ``1 / temperature`` here.

Differences from the reference, none of which change its numbers where it does not underflow:

* the pooling and the locality window are constant matrices built once at patch time (with timm's
  own ``adaptive_avg_pool2d`` and ``interpolate(mode="nearest")``, as the reference computes them),
  so the graph is MatMul / Softmax / Where only, with static shapes, on CPU (the reference
  hard-codes ``.cuda()`` and Python loops);
* the locality mask is ``-inf`` on the logits instead of ``+1e16`` on the distances;
* reconstruction weights are computed relative to each token's nearest centre
  (``exp(-(d - d_min) / temperature)``): a per-token factor that L2 normalisation cancels, but
  which keeps float32 from underflowing to all-zero weights (and zero tokens) on far-apart features;
* ``grid`` equal to the full patch grid means no clustering: the dense model bit for bit.

What the reference does that this does not: it sets the cluster grid and the clustering layer
per model and task in its configs (for large backbones at segmentation resolutions, where the
patch grid is far larger than a 224 px classifier's); there is no universal default to copy, so
the defaults here were measured on DINOv2 ViT-S/14 (``grid``, ``temperature`` below). It also
runs its own ViT variants with windowed / relative-position attention, which this patch of timm's
global-attention ViT has no counterpart for.

For classification the class token simply goes through the clustered blocks (``restore`` is not
called). Schedule: ``tokens[l]`` counts tokens entering block ``l``; the clustering after block
``location`` shows as ``removed[location]`` and happens after that block's MLP (the analytic FLOP
count charges that MLP at the reduced count, and leaves out clustering and reconstruction).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ._registry import TokenLayout, register_method
from .patching import swap_classes, unpatch
from .cluster import pairwise_sq_dists
from .schedule import Schedule, ScheduleError

Grid = Union[int, Sequence[int]]


def pooling_matrix(patch_grid: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """``[h*w, H*W]`` matrix ``A`` with ``A @ tokens`` = ``adaptive_avg_pool2d`` of the ``H x W``
    token map to ``h x w`` (row-major on both sides): the clustering layer's initial centres."""
    (H, W), (h, w) = patch_grid, grid
    basis = torch.eye(H * W, dtype=torch.float64).reshape(H * W, 1, H, W)
    return F.adaptive_avg_pool2d(basis, (h, w)).reshape(H * W, h * w).T.contiguous().float()


def locality_mask(patch_grid: tuple[int, int], grid: tuple[int, int], window: int) -> torch.Tensor:
    """``[h*w, H*W]`` bool: centre ``s`` may take token ``p`` when the grid cell ``p`` starts in
    (``interpolate(mode="nearest")`` of the cell labels, as the reference) is within ``window // 2``
    rows and columns of ``s``'s cell."""
    (H, W), (h, w) = patch_grid, grid
    labels = torch.arange(h * w, dtype=torch.float32).reshape(1, 1, h, w)
    start = F.interpolate(labels, size=(H, W), mode="nearest").reshape(H * W).long()  # [L]
    cells = torch.arange(h * w)
    radius = window // 2
    rows = ((start // w)[None, :] - (cells // w)[:, None]).abs() <= radius
    cols = ((start % w)[None, :] - (cells % w)[:, None]).abs() <= radius
    return rows & cols


def soft_kmeans(tokens: torch.Tensor, pool: torch.Tensor, allowed: torch.Tensor, iters: int,
                temperature: float) -> torch.Tensor:
    """The token clustering layer: ``[B, L, C]`` tokens -> ``[B, M, C]`` centres.

    Args:
        tokens: patch tokens in row-major grid order.
        pool: ``[M, L]`` initial averaging (:func:`pooling_matrix`).
        allowed: ``[M, L]`` locality (:func:`locality_mask`); every token must have a centre.
        iters: soft k-means rounds (0: the pooled centres).
        temperature: divides the squared distances in the softmax.
    """
    centres = pool.to(tokens.dtype) @ tokens
    for _ in range(iters):
        logits = (-pairwise_sq_dists(centres, tokens) / temperature).masked_fill(~allowed, -torch.inf)
        affinity = logits.softmax(dim=1)  # [B, M, L]: each token spreads over its nearby centres
        centres = (affinity @ tokens) / affinity.sum(dim=2, keepdim=True).clamp(min=1e-16)
    return centres


def reconstruct(x: torch.Tensor, before: torch.Tensor, after: torch.Tensor, k: int,
                temperature: float) -> torch.Tensor:
    """The token reconstruction layer: ``[B, M, C]`` refined clusters -> ``[B, L, C]`` tokens.

    Args:
        x: refined cluster tokens (after the remaining blocks and the final norm).
        before: ``[B, L, C]`` tokens at the clustering layer, before clustering.
        after: ``[B, M, C]`` centres at the clustering layer.
        k: neighbours per token, ``1 <= k <= M`` (a constant TopK K; ties at the k-th weight are kept,
            as the reference's ``>=`` mask).
        temperature: as in :func:`soft_kmeans`.
    """
    sq = pairwise_sq_dists(before, after).clamp(min=0.0)  # [B, L, M]
    weight = torch.exp(-(sq - sq.amin(dim=-1, keepdim=True)) / temperature)
    kth = torch.topk(weight, k, dim=-1).values[..., -1:]
    weight = torch.where(weight >= kth, weight, torch.zeros_like(weight))
    return F.normalize(weight, dim=-1) @ x


@dataclass
class ExpediteState:
    """Per-forward state for :meth:`ExpediteBlocks.restore`: patch tokens before clustering
    (``before`` ``[B, L, C]``) and the centres (``after`` ``[B, M, C]``) at the clustering layer."""

    before: Optional[torch.Tensor] = None
    after: Optional[torch.Tensor] = None


class ExpediteBlocks(nn.Sequential):
    """``model.blocks`` after patching: clusters after block ``location``; :meth:`restore` rebuilds
    the full grid. Attributes fixed at patch time: ``location`` (None: no clustering), ``iters``,
    ``temperature``, ``k``, ``num_protected``; buffers ``pool`` and ``allowed`` (``[M, L]``, not in
    the state dict). ``last_state`` holds the latest forward's :class:`ExpediteState`."""

    location: Optional[int]
    iters: int
    temperature: float
    k: int
    num_protected: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, N, C]`` -> ``[B, N_L, C]``; every block is the model's own, called unchanged."""
        state = ExpediteState()
        for index, block in enumerate(self):
            x = block(x)
            if index == self.location:
                P = self.num_protected
                state.before = x[:, P:]
                state.after = soft_kmeans(state.before, self.pool, self.allowed, self.iters, self.temperature)
                x = torch.cat([x[:, :P], state.after], dim=1)
        self.last_state = state
        return x

    def restore(self, x: torch.Tensor) -> torch.Tensor:
        """Final tokens ``[B, P + M, C]`` -> ``[B, P + L, C]``: prefix tokens, then the full patch grid
        from the reconstruction layer. Identity when nothing was clustered. Call after a forward."""
        state = getattr(self, "last_state", None)
        if state is None or state.before is None:
            return x
        P = self.num_protected
        return torch.cat([x[:, :P], reconstruct(x[:, P:], state.before, state.after, self.k, self.temperature)], dim=1)


def _pair(grid: Grid) -> tuple[int, int]:
    if isinstance(grid, (list, tuple)):
        if len(grid) != 2:
            raise ScheduleError(f"grid {list(grid)} must be one int or two (rows, columns)")
        return int(grid[0]), int(grid[1])
    return int(grid), int(grid)


@register_method("expedite")
class Expedite:
    """Token clustering + reconstruction (Liang et al., NeurIPS 2022), training-free.

    Args:
        location: 0-indexed block after which the tokens are clustered; None: ``depth // 2 - 1``.
        grid: cluster grid ``h`` (square) or ``(h, w)``, at most the patch grid; None: 5/8 of the
            patch grid per side, rounded (16x16 -> 10x10, 39% of the patch tokens; 14x14 -> 9x9).
            The full patch grid is the dense model. Measured on DINOv2 ViT-S/14 (the shipped photos
            and their mirror images, ``--task features``): half the grid (8x8) gives mean patch
            cosine 0.888 at a FLOP ratio of 1.60x, 10x10 gives 0.953 (p5 0.863) at 1.45x, 12x12
            0.972 at 1.29x.
        iters: soft k-means rounds (the reference's 5).
        temperature: divides squared distances in both layers, so it depends on the feature scale.
            The default 0.2 was chosen on DINOv2 ViT-S/14 and the shipped photos (layer scale keeps
            its residual features small: squared distances to the pooled centres ~0.7 at block 5;
            at the 10x10 grid, 0.1 / 0.2 / 0.3 give mean patch cosine 0.940 / 0.953 / 0.950, and
            1.0 over-smooths). Without layer scale the
            distances are far larger and 0.3 makes both layers hard assignments; the reference's
            ViT/SAM settings correspond to 10 and 100. Small temperatures make the reconstructed
            tokens sensitive to float32 noise (sensitivity ~ |z| * distance / temperature): on DINOv2
            at 0.3, float32 and float64 torch differ by ~2e-4 on the restored features.
        window: locality window in grid cells, odd (the reference ViT/SAM default 5).
        k: reconstruction neighbours per token, ``1 .. h * w`` (the reference ViT/SAM default 20).

    Raises (from :meth:`schedule`):
        ScheduleError: any parameter outside its range, with the range.
    """

    name = "expedite"

    def __init__(self, location: Optional[int] = None, grid: Optional[Grid] = None, iters: int = 5,
                 temperature: float = 0.2, window: int = 5, k: int = 20):
        self.location = None if location is None else int(location)
        self.grid = None if grid is None else (_pair(grid) if isinstance(grid, (list, tuple)) else int(grid))
        self.iters = int(iters)
        self.temperature = float(temperature)
        self.window = int(window)
        self.k = int(k)

    def params(self) -> dict:
        grid = list(self.grid) if isinstance(self.grid, tuple) else self.grid
        return {"location": self.location, "grid": grid, "iters": self.iters, "temperature": self.temperature,
                "window": self.window, "k": self.k}

    def resolve(self, layout: TokenLayout, patch_grid: Optional[tuple[int, int]] = None) -> tuple[int, tuple[int, int], tuple[int, int]]:
        """``(location, (h, w), (H, W))`` for a model, defaults filled in.

        Raises:
            ScheduleError: see the class docstring.
        """
        patches = layout.num_tokens - layout.num_prefix_tokens
        if patch_grid is None:
            side = math.isqrt(patches)
            if side * side != patches:
                raise ScheduleError(f"expedite needs a square patch grid to plan without the model; {patches} patches is not one")
            patch_grid = (side, side)
        H, W = patch_grid
        location = layout.depth // 2 - 1 if self.location is None else self.location
        if not 0 <= location < layout.depth:
            raise ScheduleError(f"location {location} is outside the model's blocks 0..{layout.depth - 1}; choose a block in that range")
        h, w = (max(1, round(H * 5 / 8)), max(1, round(W * 5 / 8))) if self.grid is None else _pair(self.grid)
        if not (1 <= h <= H and 1 <= w <= W):
            raise ScheduleError(f"grid {h}x{w} must be between 1x1 and the patch grid {H}x{W}")
        if self.iters < 0:
            raise ScheduleError(f"iters={self.iters} must be >= 0")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ScheduleError(f"temperature={self.temperature} must be a positive number")
        if self.window < 1 or self.window % 2 == 0:
            raise ScheduleError(f"window={self.window} must be an odd number of grid cells >= 1, e.g. 5")
        if (h, w) != (H, W) and not 1 <= self.k <= h * w:
            raise ScheduleError(f"k={self.k} must be in 1..{h * w} (the {h}x{w} clusters); use a smaller k or a larger grid")
        return location, (h, w), (H, W)

    def schedule(self, layout: TokenLayout) -> Schedule:
        """Tokens entering each block (prefix included): ``N`` up to block ``location``, then
        ``prefix + h * w``.

        Raises:
            ScheduleError: see the class docstring.
        """
        return self._plan(layout, *self.resolve(layout))

    @staticmethod
    def _plan(layout: TokenLayout, location: int, grid: tuple[int, int], patch_grid: tuple[int, int]) -> Schedule:
        if grid == patch_grid:
            return Schedule.dense(layout.depth, layout.num_tokens, layout.num_prefix_tokens)
        (h, w), (H, W) = grid, patch_grid
        reduced = layout.num_prefix_tokens + h * w
        tokens = (layout.num_tokens,) * (location + 1) + (reduced,) * (layout.depth - location)
        notes = (f"expedite clusters to {h}x{w} after block {location}'s MLP; --task features reconstructs the {H}x{W} grid",)
        return Schedule(tokens=tokens, num_prefix_tokens=layout.num_prefix_tokens, site="block", notes=notes)

    def apply(self, model: VisionTransformer, schedule: Schedule) -> VisionTransformer:
        """Return a patched deep copy of ``model`` running ``schedule``.

        Raises:
            ScheduleError: the schedule is not this method's plan for this model.
        """
        layout = TokenLayout.of(model)
        location, grid, patch_grid = self.resolve(layout, tuple(model.patch_embed.grid_size))
        dense = grid == patch_grid
        if schedule.tokens != self._plan(layout, location, grid, patch_grid).tokens:
            raise ScheduleError(f"schedule {list(schedule.tokens)} is not expedite's plan for this model ({self.params()})")
        patched = swap_classes(copy.deepcopy(model), ExpediteBlocks, location=None if dense else location, iters=self.iters,
                               temperature=self.temperature, k=self.k, num_protected=layout.num_prefix_tokens)
        blocks = patched.blocks
        blocks.register_buffer("pool", pooling_matrix(patch_grid, grid), persistent=False)
        blocks.register_buffer("allowed", locality_mask(patch_grid, grid, self.window), persistent=False)
        return patched

    @staticmethod
    def remove(model: VisionTransformer) -> VisionTransformer:
        """Undo :meth:`apply` in place; returns ``model``."""
        if isinstance(model.blocks, ExpediteBlocks):
            for name in ("pool", "allowed"):
                model.blocks._buffers.pop(name, None)
        return unpatch(model, ExpediteBlocks, None, ("location", "iters", "temperature", "k", "num_protected"))
