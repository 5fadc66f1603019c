"""PNG charts for reports, drawn with matplotlib's object API (``Figure``; no pyplot, no display).

* :func:`plot_block_times`: time per block, stacked by category, one bar per variant side by side.
* :func:`plot_curve`: latency vs token count, with the detected steps marked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

from matplotlib.figure import Figure

COLOURS = {"attention": "#4C72B0", "mlp": "#55A868", "reduction": "#C44E52", "other": "#8C8C8C"}
HATCHES = ("", "//", "..", "xx")


def plot_block_times(variants: Mapping[str, Mapping[str, Mapping[str, float]]], path: Path, *, blocks: Sequence[str],
                     categories: Sequence[str], title: str = "") -> Path:
    """Stacked bars: for each block, one bar per variant (e.g. dense, reduced), split by category.

    Args:
        variants: label -> block -> category -> ms (the ``blocks`` of :func:`per_layer.summarize`).
        path: PNG to write.
        blocks: the blocks in x-axis order; categories: the stacking order (keys of :data:`COLOURS`).
        title: chart title.

    Returns:
        ``path``.
    """
    labels = list(variants)
    width = 0.8 / max(1, len(labels))
    fig = Figure(figsize=(min(14.0, max(6.0, 0.45 * len(blocks) * max(1, len(labels)))), 4.8), layout="constrained")
    ax = fig.add_subplot()
    for k, label in enumerate(labels):
        bottoms = [0.0] * len(blocks)
        xs = [i + (k - (len(labels) - 1) / 2) * width for i in range(len(blocks))]
        for category in categories:
            heights = [variants[label].get(b, {}).get(category, 0.0) for b in blocks]
            ax.bar(xs, heights, width * 0.95, bottom=bottoms, color=COLOURS[category], hatch=HATCHES[k % len(HATCHES)],
                   edgecolor="white", linewidth=0.5, label=f"{label}: {category}" if any(heights) else None)
            bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.set_xticks(range(len(blocks)), blocks)
    ax.set_xlabel("block" + ("  (bars left to right: " + ", ".join(labels) + ")" if len(labels) > 1 else ""))
    ax.set_ylabel("ms per inference")
    ax.set_title(title, fontsize=10)
    fig.legend(fontsize=7, ncol=4, loc="outside lower center")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=120)
    return Path(path)


def plot_curve(tokens: Sequence[int], median_ms: Sequence[float], path: Path, *, p10_ms: Optional[Sequence[float]] = None,
               p90_ms: Optional[Sequence[float]] = None, steps: Sequence[dict] = (), title: str = "",
               label: str = "median") -> Path:
    """Latency vs token count with a p10-p90 band and the steps marked.

    Args:
        tokens: token counts N (x axis).
        median_ms: latency at each N (the curve's statistic, named by ``label``).
        p10_ms / p90_ms: spread at each N (optional band).
        steps: ``{"from": N, "to": N', "jump_ms": ...}`` entries (from :func:`curve.find_steps`).
        path: PNG to write.

    Returns:
        ``path``.
    """
    fig = Figure(figsize=(7.0, 4.0), layout="constrained")
    ax = fig.add_subplot()
    if p10_ms is not None and p90_ms is not None:
        ax.fill_between(tokens, p10_ms, p90_ms, alpha=0.25, color="#4C72B0", label="p10-p90")
    ax.plot(tokens, median_ms, "o-", markersize=3, color="#4C72B0", label=label)
    for k, step in enumerate(steps):
        ax.axvspan(step["from"], step["to"], color="#C44E52", alpha=0.2, label="step" if k == 0 else None)
    ax.set_xlabel("tokens N")
    ax.set_ylabel("ms")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return Path(path)
