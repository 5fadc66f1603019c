"""Latency vs token count on the target backend: one transformer block, or the whole model.

Latency is not linear in the token count: SIMD widths, cache sizes and GEMM tile sizes make it move
in steps with flat stretches between them, so removing one more token can cost nothing or save a
lot (Eliopoulos et al., "Pruning One More Token is Enough", WACV 2025). :func:`measure_curve`
exports, for each token count N,

* ``block`` mode: one timm ``Block`` with a static ``[B, N, C]`` input;
* ``whole`` mode: the whole model with every block at the same N (the first N tokens after the
  position embedding are kept: class token plus N - 1 patches);

builds it for the backend, and times every N with the shared latency harness (interleaved in blocks
of runs, in a shuffled order, so that drift of the machine shows as noise instead of fake steps).
:func:`find_steps` and :func:`find_plateaus` read the steps and flat stretches off the medians.

Exporting needs torch (imported inside :func:`measure_curve`); reading and analysing a curve does not.
"""

from __future__ import annotations

import json
import random
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from ..errors import SpecError
from ..profiles.latency import NOISY_COV, measure_interleaved

CURVE_SCHEMA = 1
MODES = ("block", "whole")
#: Statistic a curve is read with: the median, or a low percentile / the minimum, which on a shared
#: machine track what the hardware does better than the median (other processes only add time).
STATS = {"median": "median_ms", "p10": "p10_ms", "min": "min_ms"}


@dataclass(frozen=True)
class CurveOptions:
    """Timing settings per token count (see :func:`vitfold.profiles.latency.measure_interleaved`);
    ``chunk``: sessions alive at once (whole mode holds a full model per N)."""

    warmup: int = 5
    min_runs: int = 30
    min_seconds: float = 0.5
    runs_per_turn: int = 5
    chunk: int = 64
    seed: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def parse_tokens(text: Optional[str], full: int, minimum: int = 2) -> list[int]:
    """Token counts from ``START:STOP:STEP`` (STOP inclusive) or ``N1,N2,...``; None gives every 4
    from 16 to ``full`` (every count from ``minimum`` for models of at most 32 tokens). ``full`` (all
    tokens) is always included.

    Raises:
        SpecError: a count outside ``[minimum, full]`` or an unreadable spec.
    """
    if text is None:
        counts = list(range(16, full, 4)) if full > 32 else list(range(minimum, full))
    else:
        try:
            if ":" in text:
                start, stop, *step = (int(v) for v in text.split(":"))
                counts = list(range(start, stop + 1, step[0] if step else 4))
            else:
                counts = [int(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise SpecError(f"--tokens {text!r}: write START:STOP:STEP (16:197:4) or a list (49,98,197)") from None
    bad = [n for n in counts if not minimum <= n <= full]
    if bad:
        raise SpecError(f"token counts {bad} are outside [{minimum}, {full}] for this model; choose counts in that range")
    return sorted(set(counts) | {full})


# ------------------------------------------------------------------------------------ measurement


def _modules(model, mode: str, tokens: int, block_index: int, batch: int):
    """``(module, input shape)`` to export for one token count (torch side)."""
    import torch

    if mode == "block":
        return model.blocks[block_index], (batch, tokens, model.embed_dim)

    class UniformTokens(torch.nn.Module):
        """The model with every block at ``tokens`` tokens: the first ones after the embedding."""

        def __init__(self, vit, count: int):
            super().__init__()
            self.vit, self.count = vit, count

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            vit = self.vit
            x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
            x = vit.norm(vit.blocks(x[:, : self.count]))
            return vit.forward_head(x)

    size = model.patch_embed.img_size
    return UniformTokens(model, tokens).eval(), (batch, 3, size[0], size[1])


def measure_curve(
    spec,
    cfg,
    *,
    mode: str = "block",
    tokens: Union[str, Sequence[int], None] = None,
    block_index: int = 0,
    stat: str = "median",
    options: Optional[CurveOptions] = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Measure latency against token count for ``spec`` (a :class:`vitfold.spec.ModelSpec`) on the
    backend ``cfg`` (a :class:`vitfold.runtimes.BuildConfig`), at its precision: an int8 curve times
    int8 graphs (quantized on their own timing input, :func:`vitfold.quantize.calibration.timing_calibration`).

    Args:
        mode: ``block`` (one ``Block``, input ``[B, N, C]``) or ``whole`` (all blocks at N tokens).
        tokens: counts N (prefix tokens included), or a spec for :func:`parse_tokens` (``16:197:4``);
            None: every 4 from 16 to the model's full count.
        block_index: which block to export in block mode (all have the same shape).
        stat: ``median``, ``p10`` or ``min``: the statistic steps, plateaus and schedules are read from.

    Returns:
        The curve (see :func:`analyse`), with ``points`` (``tokens``, ``median_ms``, ``p10_ms``,
        ``p90_ms``, ``cov``, ``samples_ms``), ``steps``, ``plateaus``, ``noisy`` and the settings.

    Raises:
        SpecError: unknown mode, a block index or token count the model does not have.
        BackendUnavailable: the backend is not installed here.
        ExportError: a graph breaks the static export contract.
    """
    from .. import runtimes
    from ..compile import compile_module
    from ..export.models import create_model
    from ..quantize.calibration import timing_calibration
    from ..reduce import TokenLayout
    from ..profiles.report import environment

    options = options or CurveOptions()
    if mode not in MODES:
        raise SpecError(f"curve mode {mode!r} unknown; choose one of {', '.join(MODES)}")
    if stat not in STATS:
        raise SpecError(f"curve statistic {stat!r} unknown; choose one of {', '.join(STATS)}")
    runtimes.backend_module(cfg.backend)  # a missing backend fails before any export
    model, _ = create_model(spec)
    layout = TokenLayout.of(model)
    if not 0 <= block_index < layout.depth:
        raise SpecError(f"block {block_index} does not exist: {spec.name} has blocks 0..{layout.depth - 1}")
    floor = layout.num_prefix_tokens + 1 if mode == "whole" else 1
    if tokens is None or isinstance(tokens, str):
        counts = parse_tokens(tokens, layout.num_tokens, floor)
    else:
        counts = sorted(set(int(n) for n in tokens))
        bad = [n for n in counts if not floor <= n <= layout.num_tokens]
        if bad:
            raise SpecError(f"token counts {bad} are outside [{floor}, {layout.num_tokens}] for {spec.name}")
    chunk = options.chunk if mode == "block" else min(options.chunk, 8)
    order = list(counts)
    random.Random(options.seed).shuffle(order)
    results, settings = {}, {}
    with tempfile.TemporaryDirectory(prefix="vitfold-curve-") as tmp:
        for start in range(0, len(order), chunk):
            sessions, inputs = {}, {}
            for n in order[start : start + chunk]:
                torch_module, shape = _modules(model, mode, n, block_index, spec.batch_size)
                log(f"[N={n}] export {tuple(shape)} and build {cfg.backend} (the build's pass pipeline)")
                inputs[n] = np.random.default_rng(n).standard_normal(shape).astype(np.float32)
                sessions[n] = compile_module(torch_module, shape, Path(tmp) / f"n{n}", cfg, sample=inputs[n],
                                             calibration=timing_calibration(inputs[n])).open(cfg)
            log(f"time {len(sessions)} token counts interleaved")
            stats = measure_interleaved(
                {str(n): (lambda s=sessions[n], x=inputs[n]: s(x)) for n in sessions},
                spec.batch_size, warmup=options.warmup, min_runs=options.min_runs, min_seconds=options.min_seconds,
                runs_per_turn=options.runs_per_turn,
            )
            for n, session in sessions.items():
                results[n] = stats[str(n)]
                settings = session.settings
                session.close()
    points = []
    for n in sorted(results):
        samples = np.asarray(results[n].samples_ms)
        points.append({"tokens": n, "median_ms": results[n].median_ms, "p10_ms": float(np.percentile(samples, 10)),
                       "p90_ms": float(np.percentile(samples, 90)), "min_ms": results[n].min_ms, "cov": results[n].cov,
                       "runs": results[n].runs,
                       "samples_ms": results[n].samples_ms})
    curve = {
        "schema": CURVE_SCHEMA,
        "model": spec.name,
        "mode": mode,
        "block_index": block_index if mode == "block" else None,
        "batch_size": spec.batch_size,
        "embed_dim": model.embed_dim,
        "attn_dim": model.blocks[0].attn.attn_dim,
        "mlp_hidden": model.blocks[0].mlp.fc1.out_features,
        "full_tokens": layout.num_tokens,
        "num_prefix_tokens": layout.num_prefix_tokens,
        "depth": layout.depth,
        "backend": cfg.to_json(),
        "options": options.to_json(),
        "stat": STATS[stat],
        "points": points,
        "environment": environment(settings),
    }
    return analyse(curve)


# --------------------------------------------------------------------------------------- analysis


def _noise(point: dict) -> float:
    """Standard error of a point's median, ms (1.2533 * std / sqrt(runs))."""
    samples = np.asarray(point["samples_ms"]) if point.get("samples_ms") else None
    if samples is None or len(samples) < 2:
        return 0.0
    return float(1.2533 * samples.std() / np.sqrt(len(samples)))


def find_steps(tokens: Sequence[int], median_ms: Sequence[float], noise_ms: Optional[Sequence[float]] = None,
               *, factor: float = 3.0, min_rel: float = 0.02) -> list[dict]:
    """Jumps in a latency curve: intervals where latency rises much more than the curve's typical
    slope would predict.

    With increments ``d_i = t[i+1] - t[i]`` and the median slope ``m`` (ms per token), the excess
    ``e_i = d_i - m * (N[i+1] - N[i])`` is a step when it exceeds ``factor`` robust deviations of
    all excesses (1.4826 * MAD), ``factor`` times the two points' combined noise, and ``min_rel`` of
    the latency there.

    Returns:
        ``[{"from": N, "to": N', "jump_ms", "jump_pct", "excess_ms"}]`` in token order.
    """
    n, t = np.asarray(tokens, float), np.asarray(median_ms, float)
    if len(n) < 3:
        return []
    d, dn = np.diff(t), np.diff(n)
    slope = float(np.median(d / dn))
    excess = d - slope * dn
    spread = 1.4826 * float(np.median(np.abs(excess - np.median(excess))))
    noise = np.zeros(len(t)) if noise_ms is None else np.asarray(noise_ms, float)
    steps = []
    for i, e in enumerate(excess):
        pair_noise = float(np.hypot(noise[i], noise[i + 1]))
        if e > factor * spread and e > factor * pair_noise and e > min_rel * t[i]:
            steps.append({"from": int(n[i]), "to": int(n[i + 1]), "jump_ms": float(d[i]),
                          "jump_pct": float(d[i] / t[i]), "excess_ms": float(e)})
    return steps


def find_plateaus(tokens: Sequence[int], median_ms: Sequence[float], *, min_points: int = 3,
                  flat: float = 0.25) -> list[dict]:
    """Flat stretches: at least ``min_points`` consecutive counts over which latency moves (up or
    down) by less than ``flat`` times what the curve's overall slope (least squares) predicts over
    that span.

    Returns:
        ``[{"from": N, "to": N', "ms_from", "ms_to"}]``: keeping ``to`` tokens costs what ``from`` costs.
    """
    n, t = np.asarray(tokens, float), np.asarray(median_ms, float)
    if len(n) < min_points:
        return []
    slope = float(np.polyfit(n, t, 1)[0])
    plateaus, i = [], 0
    while i < len(n) - 1:
        j = i
        while j + 1 < len(n) and abs(t[j + 1] - t[i]) < flat * slope * (n[j + 1] - n[i]):
            j += 1
        if j - i + 1 >= min_points:
            plateaus.append({"from": int(n[i]), "to": int(n[j]), "ms_from": float(t[i]), "ms_to": float(t[j])})
            i = j
        else:
            i += 1
    return plateaus


def levels(curve: dict) -> list[float]:
    """The curve's latency at each point, in the statistic it is read with (``curve["stat"]``,
    default the median)."""
    return [p[curve.get("stat", "median_ms")] for p in curve["points"]]


def fixed_cost(tokens: Sequence[int], ms: Sequence[float]) -> Optional[dict]:
    """The part of a curve's latency that no token reduction removes.

    Fits ``t(N) = fixed + linear * N + quadratic * N**2`` by least squares (the token-wise layers are
    linear in N, attention's two matmuls quadratic) and extrapolates to ``N = 0``. On a CPU the
    fixed part is mostly the fully connected layers: OpenVINO's per-layer counters give each a
    per-call cost of 34-45 us (DeiT-S) on top of its per-token cost, whatever the row count. It is
    why a schedule's speedup at batch 1 falls short of its FLOP ratio even when the reduction
    itself is free.

    Args:
        tokens: token counts N, at least 3 distinct.
        ms: latency at each count, ms.

    Returns:
        ``{"fixed_ms", "linear_ms_per_token", "quadratic_ms_per_token2", "fixed_share"}`` with
        ``fixed_share`` the fixed part over the fitted latency at the largest N; ``None`` for fewer
        than 3 distinct counts.
    """
    n = np.asarray(tokens, dtype=float)
    if len(np.unique(n)) < 3:
        return None
    quadratic, linear, fixed = np.polyfit(n, np.asarray(ms, dtype=float), 2)
    top = n.max()
    return {"fixed_ms": float(fixed), "linear_ms_per_token": float(linear), "quadratic_ms_per_token2": float(quadratic),
            "fixed_share": float(fixed / (fixed + linear * top + quadratic * top**2))}


def analyse(curve: dict) -> dict:
    """Add ``steps``, ``plateaus``, ``noisy`` (counts whose CoV is above 5%), ``slope_ms_per_token``
    and ``fixed`` (:func:`fixed_cost`) to a curve dict with ``points``, read with its ``stat``;
    returns it."""
    points = curve["points"]
    tokens = [p["tokens"] for p in points]
    medians = levels(curve)
    curve["steps"] = find_steps(tokens, medians, [_noise(p) for p in points])
    curve["plateaus"] = find_plateaus(tokens, medians)
    curve["noisy"] = [p["tokens"] for p in points if p["cov"] > NOISY_COV]
    curve["slope_ms_per_token"] = float(np.polyfit(tokens, medians, 1)[0]) if len(points) > 1 else 0.0
    curve["fixed"] = fixed_cost(tokens, medians)
    return curve


def write_curve(curve: dict, out_dir: Path) -> dict[str, Path]:
    """Write ``curve.json`` and ``curve.png`` into ``out_dir``; returns their paths."""
    from ..profiles.plots import plot_curve

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "curve.json", "png": out_dir / "curve.png"}
    paths["json"].write_text(json.dumps(curve, indent=1) + "\n")
    points = curve["points"]
    what = f"block {curve['block_index']}" if curve["mode"] == "block" else "whole model, uniform N"
    plot_curve([p["tokens"] for p in points], levels(curve), paths["png"], label=curve.get("stat", "median_ms")[:-3],
               p10_ms=[p["p10_ms"] for p in points], p90_ms=[p["p90_ms"] for p in points], steps=curve["steps"],
               title=f"{curve['model']} {what}: {curve['backend']['backend']} {curve['backend']['precision']}, "
                     f"batch {curve['batch_size']}")
    return paths


def read_curve(path: Path) -> dict:
    """Load a ``curve.json`` (or the directory holding one).

    Raises:
        SpecError: missing file or another curve schema.
    """
    path = Path(path)
    path = path / "curve.json" if path.is_dir() else path
    if not path.is_file():
        raise SpecError(f"no latency curve at {path}; measure one with `deploy.py curve`")
    curve = json.loads(path.read_text())
    if curve.get("schema") != CURVE_SCHEMA:
        raise SpecError(f"{path} has curve schema {curve.get('schema')!r}, this vitfold reads {CURVE_SCHEMA}; re-measure it")
    return curve


def interpolate(curve: dict, tokens: float) -> float:
    """Latency (ms, the curve's statistic) at ``tokens``, linear between measured counts (clamped at the ends)."""
    return float(np.interp(tokens, [p["tokens"] for p in curve["points"]], levels(curve)))


__all__ = ["CurveOptions", "analyse", "find_plateaus", "find_steps", "fixed_cost", "interpolate", "measure_curve", "parse_tokens",
           "read_curve", "write_curve"]
