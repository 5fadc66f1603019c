"""Latency harness: dense and reduced interleaved in one process, raw samples kept.

Runs alternate in blocks (A x k, B x k, A x k, ...) rather than strictly A B A B: ONNX Runtime's
thread pools spin after a run, and strict alternation between two sessions slowed dense from 38 to
62 ms on this machine. Every variant gets at least ``min_runs`` runs and ``min_seconds`` of timed
runs after ``warmup`` runs. ``time.perf_counter_ns`` brackets each call; nothing else is timed.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping

import numpy as np

#: Above this coefficient of variation a measurement is flagged as noisy on its own (see
#: :func:`noisy_variants`). 5% fired on nearly every run of an idle machine: CoV is std / mean, and a
#: few slow runs (a timer tick, a page fault) inflate it while the median barely moves; DeiT-S on a
#: busy 2-core machine measured 5-11%. 20% is about twice that: a run disturbed beyond ordinary
#: sharing (throttling, a bimodal run), where the median of 50 runs is uncertain by ~1.25 * CoV /
#: sqrt(50) = 3.5% (one standard error), the size of the differences between schedules.
NOISY_COV = 0.20


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one variant in ms (median, p10, p90, p99, mean, min, max), its spread (CoV = std /
    mean, ``spread`` = p90 / median), and throughput in images/s at the median; ``samples_ms`` are
    the raw timed runs in order."""

    runs: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    cov: float
    throughput: float
    spread: float
    samples_ms: list[float] = field(repr=False)

    @property
    def noisy(self) -> bool:
        """CoV above :data:`NOISY_COV` (a pair of variants: :func:`noisy_variants`)."""
        return self.cov > NOISY_COV

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_samples(cls, samples_ms: list[float], batch_size: int) -> "LatencyStats":
        data = np.asarray(samples_ms)
        median = float(np.median(data))
        return cls(
            runs=len(data),
            median_ms=median,
            p10_ms=float(np.percentile(data, 10)),
            p90_ms=float(np.percentile(data, 90)),
            p99_ms=float(np.percentile(data, 99)),
            mean_ms=float(data.mean()),
            min_ms=float(data.min()),
            max_ms=float(data.max()),
            cov=float(data.std() / data.mean()) if len(data) > 1 else 0.0,
            throughput=batch_size * 1e3 / median,
            spread=float(np.percentile(data, 90) / median),
            samples_ms=[float(v) for v in data],
        )


def measure_interleaved(
    runners: Mapping[str, Callable[[], object]],
    batch_size: int,
    *,
    warmup: int = 10,
    min_runs: int = 50,
    min_seconds: float = 3.0,
    runs_per_turn: int = 5,
    max_seconds: float = 120.0,
) -> dict[str, LatencyStats]:
    """Time every runner (a no-argument callable running one batch) interleaved, ``runs_per_turn`` runs per turn.

    Args:
        runners: name -> callable; all are timed in the same loop, same process, same input.
        batch_size: images per call, for throughput.
        warmup: untimed runs per runner first.
        min_runs / min_seconds: each runner gets at least this many runs and this much timed time.
        runs_per_turn: consecutive runs of one runner before switching to the next.
        max_seconds: stop even if ``min_runs`` is not reached (very slow models), never below 3 runs.

    Returns:
        name -> :class:`LatencyStats`.
    """
    for run in runners.values():
        for _ in range(warmup):
            run()
    samples: dict[str, list[float]] = {name: [] for name in runners}
    spent: dict[str, float] = {name: 0.0 for name in runners}
    start = time.perf_counter()

    def done(name: str) -> bool:
        enough = len(samples[name]) >= min_runs and spent[name] >= min_seconds * 1e3
        overdue = time.perf_counter() - start > max_seconds and len(samples[name]) >= 3
        return enough or overdue

    while not all(done(name) for name in runners):
        for name, run in runners.items():
            for _ in range(runs_per_turn):
                t0 = time.perf_counter_ns()
                run()
                elapsed = (time.perf_counter_ns() - t0) / 1e6
                samples[name].append(elapsed)
                spent[name] += elapsed
    return {name: LatencyStats.from_samples(values, batch_size) for name, values in samples.items()}


def speedup(dense: LatencyStats, reduced: LatencyStats) -> float:
    """Dense median / reduced median (> 1 means the reduced model is faster)."""
    return dense.median_ms / reduced.median_ms



def intervals_overlap(a: LatencyStats, b: LatencyStats) -> bool:
    """Whether the p10..p90 latency intervals of two variants overlap."""
    return max(a.p10_ms, b.p10_ms) <= min(a.p90_ms, b.p90_ms)


def noisy_variants(dense: LatencyStats, reduced: LatencyStats) -> list[str]:
    """The variants whose spread makes the speedup uncertain (a report's ``noisy``).

    Spread alone is not an alarm: CoV and p90 / median are reported for every variant. The rule:

    * both (``["dense", "reduced"]``) when their p10..p90 intervals overlap: the difference between
      the medians is within the run-to-run spread, so the speedup (or slowdown) is not resolved;
    * otherwise each variant whose CoV is above :data:`NOISY_COV` (20%).
    """
    if intervals_overlap(dense, reduced):
        return ["dense", "reduced"]
    return [name for name, stats in (("dense", dense), ("reduced", reduced)) if stats.noisy]
