"""Capacity calibration for data-dependent gates (``evit-mass``): how many tokens to reserve per gate.

The dynamic model (reference semantics) runs on a folder of images and records, per image and gate,
how many tokens the top-p rule keeps. The capacity of a gate is a percentile of those counts, by the
nearest-rank method: with ``M`` images and percentile ``q`` in (0, 100], the ``ceil(q / 100 * M)``-th
smallest count (``q = 100``, the default, is the largest count seen). A capacity is then clamped to
what the bounded form can hold (with fusion, one slot less than the gate ranks; see
:meth:`vitfold.reduce.evit_mass.EViTMass.capacities`), with a note. An image fits when its count at every
gate is at most that gate's capacity; the bounded model equals the dynamic one exactly on those.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch

from .errors import SpecError
from .reduce import TokenLayout

DEFAULT_PERCENTILE = 100.0


@dataclass(frozen=True)
class Calibration:
    """Capacities from one calibration run.

    Attributes:
        source: where the images came from (a folder path, or ``check photos``).
        images: how many images were run.
        percentile: nearest-rank percentile of the kept counts, in (0, 100].
        locations: gate blocks (0-indexed), one per capacity.
        capacity: kept slots per gate (tokens, prefix and fused token excluded).
        counts: per gate, ``{min, median, mean, max}`` of the kept counts seen.
        notes: clamps applied (capacity above what a gate can hold).
    """

    source: str
    images: int
    percentile: float
    locations: tuple[int, ...]
    capacity: tuple[int, ...]
    counts: tuple[dict, ...]
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {**asdict(self), "locations": list(self.locations), "capacity": list(self.capacity),
                "counts": list(self.counts), "notes": list(self.notes)}


def check_percentile(percentile: float) -> float:
    """Return ``percentile`` as a float.

    Raises:
        SpecError: not in (0, 100].
    """
    if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 0.0 < float(percentile) <= 100.0:
        raise SpecError(f"percentile {percentile!r} must be in (0, 100] (100 = the largest kept count seen)")
    return float(percentile)


def nearest_rank(counts: np.ndarray, percentile: float = DEFAULT_PERCENTILE) -> list[int]:
    """Per column of ``counts`` ``[M, G]``: the ``ceil(percentile / 100 * M)``-th smallest value.

    Raises:
        SpecError: no rows, or ``percentile`` outside (0, 100].
    """
    percentile = check_percentile(percentile)
    counts = np.asarray(counts)
    if counts.ndim != 2 or counts.shape[0] == 0:
        raise SpecError("calibration needs at least one image (kept counts [images, gates])")
    rank = max(1, math.ceil(percentile / 100.0 * counts.shape[0]))
    return [int(v) for v in np.sort(counts, axis=0)[rank - 1]]


def exceeding(counts: np.ndarray, capacity: Sequence[int]) -> np.ndarray:
    """``[M]`` bool: images whose kept count passes the capacity at some gate (``counts`` ``[M, G]``)."""
    return (np.asarray(counts) > np.asarray(capacity)[None]).any(axis=1)


def kept_counts(dynamic_model: torch.nn.Module, images: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """Run a gated model (``EViTMass.apply_dynamic``) on ``images`` ``[M, 3, H, W]``; returns the
    ``[M, G]`` int64 kept counts per image and gate (from ``blocks.last_state``)."""
    rows = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size]))
            dynamic_model(batch)
            rows.append(dynamic_model.blocks.last_state.counts(len(batch)).numpy())
    return np.concatenate(rows)


def fit_capacity(method, layout: TokenLayout, wanted: Sequence[int]) -> tuple[list[int], list[str]]:
    """Clamp ``wanted`` (one per gate) to what the bounded form holds, gate by gate; returns the
    capacities and a note per clamp."""
    P, fused = layout.num_prefix_tokens, (1 if method.fuse else 0)
    gates = [b for b, p in enumerate(method.masses(layout.depth)) if p is not None]
    slots, out, notes = layout.num_tokens - P, [], []
    for block, k in zip(gates, wanted):
        most = slots - fused
        if k > most:
            notes.append(f"block {block}: capacity {k} clamped to {most} (with fusion one of the {slots} slots is the "
                         f"fused token); images keeping all {slots} exceed it")
        out.append(max(1, min(k, most)))
        slots = out[-1] + fused
    return out, notes


def calibrate_capacity(method, model: torch.nn.Module, images: np.ndarray, *, percentile: float = DEFAULT_PERCENTILE,
              source: str = "", batch_size: int = 8):
    """Capacities for ``method`` (an :class:`~vitfold.reduce.evit_mass.EViTMass`) on ``model`` from ``images``.

    Args:
        images: ``[M, 3, H, W]`` float32, preprocessed as the model expects.
        percentile: nearest-rank percentile of the kept counts, (0, 100]; 100 = the largest seen.

    Returns:
        ``(method with the capacities, Calibration)``.

    Raises:
        SpecError: no images, or ``percentile`` outside (0, 100].
        ScheduleError: the method does not fit the model (locations, keep mass list).
    """
    percentile = check_percentile(percentile)
    if len(images) == 0:
        raise SpecError(f"calibration folder {source or '(none)'} holds no images; give --calibrate a folder of photos")
    layout = TokenLayout.of(model)
    counts = kept_counts(method.apply_dynamic(model), images, batch_size)
    gates = [b for b, p in enumerate(method.masses(layout.depth)) if p is not None]
    capacity, notes = fit_capacity(method, layout, nearest_rank(counts, percentile)) if gates else ([], [])
    by_gate = iter(capacity)
    per_location = [next(by_gate) if b in gates else 1 for b in method.locations]  # p = 1 locations: unused
    stats = tuple({"min": int(c.min()), "median": float(np.median(c)), "mean": float(c.mean()), "max": int(c.max())}
                  for c in counts.T)
    result = Calibration(source=source, images=int(len(images)), percentile=percentile, locations=tuple(gates),
                         capacity=tuple(capacity), counts=stats, notes=tuple(notes))
    return method.with_capacity(per_location), result


def check_capacity(method, model: torch.nn.Module, images: np.ndarray, names: Sequence[str], batch_size: int = 8) -> dict:
    """How the bounded form (``method``'s capacities) compares with the dynamic model on ``images``.

    Returns:
        ``{"images", "exceeded", "exceeded_images", "max_abs_fitting"}``: the images whose kept count
        passes a capacity (the bounded model differs from the dynamic one on those, by design) and
        the largest output difference (max abs) between the two torch models on the others.
    """
    layout = TokenLayout.of(model)
    dynamic = method.apply_dynamic(model)
    bounded = method.apply(model, method.schedule(layout))
    counts = kept_counts(dynamic, images, batch_size)
    capacity = [k for k in method.capacities(layout) if k is not None]
    over = exceeding(counts, capacity) if capacity else np.zeros(len(images), dtype=bool)
    fitting = images[~over]
    max_abs = None
    if len(fitting):
        with torch.no_grad():
            x = torch.from_numpy(np.ascontiguousarray(fitting))
            max_abs = float((dynamic(x) - bounded(x)).abs().max())
    return {"images": int(len(images)), "exceeded": int(over.sum()),
            "exceeded_images": [n for n, o in zip(names, over) if o], "max_abs_fitting": max_abs}
