"""Hardware-aware token schedules: per-block token counts picked from a measured latency curve.

FLOP counts say removing tokens always helps, and by the same amount everywhere; on a device,
latency moves in steps (SIMD widths, GEMM tiles, caches), and a merge costs time of its own
(Eliopoulos et al., WACV 2025). Here the schedule is chosen against the backend's measured
block curve (:mod:`vitfold.plan.curve`):

* :class:`CostModel` predicts a schedule's latency: ``base`` (embedding, head, per-call overhead)
  plus, per block ``l``, attention at ``tokens[l]`` and MLP at ``tokens[l + 1]`` (the block curve
  split by the attention / MLP MAC shares at each count) plus, at a reducing block (a *site*), the
  reduction's own cost: a fixed ``site_ms`` (its kernels' launch and bookkeeping, paid however few
  tokens go) and ``merge_us_per_token`` per token entering it. A count between measured ones costs
  what the next measured count above it costs, so a schedule never lands on the slow side of a step
  it has not measured. With a fixed site cost the picker weighs where as well as how much: one
  merge of ``2r`` every other block, or a front-loaded schedule, can beat ``r`` in every block.
* :func:`pick_schedule` keeps the most tokens (sum of ``tokens[1:]``, the fewest removed) whose
  predicted latency fits a budget, over measured counts only: on a plateau it keeps its largest
  count, at a step it stays on the fast (lower) side. An exact dynamic program over (block, count,
  tokens kept so far) finds it; no relaxation, since step-shaped latency makes the problem non-convex.
* :func:`fit_cost_model` (torch) measures the whole dense model and two reduced ones on the backend
  (the reference schedule, and the same removals at half its sites: :func:`thinned`), each reduced
  one beside its truncated twin (:mod:`vitfold.plan.truncate`), to fit ``base`` and the per-site and
  per-token reduction cost (:func:`fit_reduction_cost`), so predictions are in measured milliseconds.

Methods plug in by describing themselves (``plan`` -> :class:`~vitfold.reduce.SchedulePlan`): the
most a block may remove from ``n`` tokens (ToMe: half the unprotected tokens, every block; EViT /
Top-K: only at their locations, keeping at least one patch token), the reference setting the
calibration times, and how a token schedule becomes the method's parameters (ToMe's ``r``, EViT's /
Top-K's keep rate per location). A new method that implements ``plan`` is planned; nothing here changes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from ..errors import ScheduleError, SpecError
from ..reduce._registry import MaxRemoved
from ..reduce.tome import reference_r, tome_max_removed
from ..profiles.schedule_report import describe  # noqa: F401 (also the planner's public API)


def attention_share(tokens: int, embed_dim: int, attn_dim: int, mlp_hidden: int) -> float:
    """Attention MACs / (attention + MLP MACs) of a block at ``tokens`` tokens (``vitfold.profiles.flops``)."""
    n, c, a = tokens, embed_dim, attn_dim
    attention = n * c * 3 * a + 2 * n * n * a + n * a * c
    return attention / (attention + 2 * n * c * mlp_hidden)


@dataclass(frozen=True)
class CostModel:
    """Predicted latency of a token schedule on one backend, in ms.

    Attributes:
        counts: measured token counts (ascending; the block curve's grid).
        attn_ms / mlp_ms: the block curve at each count (its statistic: median, p10 or min), split
            by MAC share.
        base_ms: everything outside the blocks (embedding, head, per-call overhead).
        merge_us_per_token: reduction overhead of a reducing block, per token entering it (us).
        site_ms: fixed reduction overhead of each reducing block (ms).
    """

    counts: tuple[int, ...]
    attn_ms: tuple[float, ...]
    mlp_ms: tuple[float, ...]
    base_ms: float = 0.0
    merge_us_per_token: float = 0.0
    site_ms: float = 0.0

    @classmethod
    def from_curve(cls, curve: dict, base_ms: float = 0.0, merge_us_per_token: float = 0.0,
                   site_ms: float = 0.0) -> "CostModel":
        """From a block-mode curve (``curve.json``) that records the block's widths.

        Raises:
            SpecError: a whole-model curve, or one without the widths (re-measure it).
        """
        if curve.get("mode") != "block":
            raise SpecError("hardware-aware schedules need a block curve (`deploy.py curve --block`), not a whole-model one")
        if "attn_dim" not in curve or "mlp_hidden" not in curve:
            raise SpecError("this curve does not record the block's widths (attn_dim, mlp_hidden); re-measure it with `deploy.py curve`")
        counts, attn, mlp = [], [], []
        stat = curve.get("stat", "median_ms")
        for point in sorted(curve["points"], key=lambda p: p["tokens"]):
            share = attention_share(point["tokens"], curve["embed_dim"], curve["attn_dim"], curve["mlp_hidden"])
            counts.append(int(point["tokens"]))
            attn.append(point[stat] * share)
            mlp.append(point[stat] * (1 - share))
        return cls(tuple(counts), tuple(attn), tuple(mlp), base_ms, merge_us_per_token, site_ms)

    def _index(self, tokens: int) -> int:
        """Index of the smallest measured count >= ``tokens`` (the cost a count between two measured
        ones is charged)."""
        i = int(np.searchsorted(self.counts, tokens))
        if i == len(self.counts):
            raise ScheduleError(f"{tokens} tokens is above the curve's largest measured count {self.counts[-1]}")
        return i

    def reduction_ms(self, tokens_in: int) -> float:
        """The reduction's own cost at a site that ``tokens_in`` tokens enter (ms)."""
        return self.site_ms + self.merge_us_per_token * tokens_in / 1e3

    def block_ms(self, tokens_in: int, tokens_out: int) -> float:
        """One block: attention at ``tokens_in``, MLP at ``tokens_out``, plus the reduction overhead."""
        merge = self.reduction_ms(tokens_in) if tokens_out < tokens_in else 0.0
        return self.attn_ms[self._index(tokens_in)] + self.mlp_ms[self._index(tokens_out)] + merge

    def predict(self, tokens: Sequence[int]) -> float:
        """Predicted latency (ms) of a schedule's ``tokens`` (``depth + 1`` counts)."""
        return self.base_ms + sum(self.block_ms(a, b) for a, b in zip(tokens, tokens[1:]))

    def sites(self, tokens: Sequence[int]) -> tuple[int, float]:
        """``(reducing blocks, their predicted reduction cost in ms)`` of a schedule's ``tokens``."""
        entering = site_inputs(tokens)
        return len(entering), sum(self.reduction_ms(n) for n in entering)

    def to_json(self) -> dict:
        return asdict(self)


def site_inputs(tokens: Sequence[int]) -> list[int]:
    """The token count entering each reduction site (a block whose count falls) of ``tokens``."""
    return [a for a, b in zip(tokens, tokens[1:]) if b < a]


def _frontier(model: CostModel, depth: int, full: int, grid: list[int], max_removed: MaxRemoved):
    """Exact dynamic program over (block, count entering it, tokens kept so far): the least predicted
    block latency for every reachable total of ``tokens[1:]``, with back-pointers.

    Returns:
        ``(cost [K, S+1] after the last block, back [depth, K, S+1] previous count index, grid)``;
        totals are exact integers, so no relaxation gap (latency is a step function of N, so the
        token/latency frontier is not convex and a Lagrangian would miss schedules).
    """
    k, total = len(grid), depth * full
    attn = np.array([model.attn_ms[model._index(n)] for n in grid])
    mlp = np.array([model.mlp_ms[model._index(n)] for n in grid])
    merge = np.array(grid) * model.merge_us_per_token / 1e3 + model.site_ms
    cost = np.full((k, total + 1), np.inf)
    cost[grid.index(full), 0] = 0.0
    back = np.zeros((depth, k, total + 1), dtype=np.int32)
    for block in range(depth):
        new = np.full((k, total + 1), np.inf)
        for i in range(k):
            if not np.isfinite(cost[i]).any():
                continue
            lowest = grid[i] - max_removed(block, grid[i])
            for j in range(i + 1):
                if grid[j] < lowest:
                    continue
                step = attn[i] + mlp[j] + (merge[i] if j < i else 0.0)
                shift = grid[j]
                candidate = cost[i, : total + 1 - shift] + step
                target = new[j, shift:]
                better = candidate < target
                target[better] = candidate[better]
                back[block, j, shift:][better] = i
        cost = new
    return cost, back


def _path(back: np.ndarray, grid: list[int], j: int, kept: int, full: int) -> list[int]:
    tokens = []
    for block in reversed(range(back.shape[0])):
        tokens.append(grid[j])
        i = int(back[block, j, kept])
        kept -= grid[j]
        j = i
    return [full, *reversed(tokens)]


def pick_schedule(model: CostModel, depth: int, full: int, num_prefix_tokens: int, budget_ms: float,
                  max_removed: Optional[MaxRemoved] = None, extra_counts: Sequence[int] = ()) -> list[int]:
    """The schedule (``depth + 1`` token counts) that keeps the most tokens (sum of ``tokens[1:]``)
    within ``budget_ms`` of predicted latency; among those, the fastest.

    Args:
        model: the cost model (block curve + calibration).
        depth / full / num_prefix_tokens: the model's blocks, tokens entering block 0, prefix tokens.
        budget_ms: predicted latency to stay within.
        max_removed: ``(block, tokens in) -> most tokens that block may remove``; default ToMe's.
        extra_counts: counts the picker may use besides the measured ones (charged like any count
            between measured ones). Give a reference schedule's counts when the budget is that
            schedule's prediction, so the reference itself is a candidate (its counts need not lie
            on the curve's grid, e.g. EViT keep 0.5 on DINOv2: 257 -> 130 -> 67 -> 35).

    Raises:
        ScheduleError: the budget is below what the fastest allowed schedule is predicted to take
            (names that latency, so the user can ask for what is reachable), or ``full`` was not measured.
    """
    if full not in model.counts:
        raise ScheduleError(f"the curve has no point at the full token count {full}; re-measure it including {full}")
    max_removed = max_removed or tome_max_removed(num_prefix_tokens)
    grid = sorted({n for n in (*model.counts, *extra_counts) if num_prefix_tokens < n <= full})
    cost, back = _frontier(model, depth, full, grid, max_removed)
    best = cost.min(axis=0) + model.base_ms  # least latency for each total of kept tokens
    feasible = np.flatnonzero(best <= budget_ms * (1 + 1e-9))  # sums in another order than predict()'s
    if not len(feasible):
        fastest = float(np.min(best))
        raise ScheduleError(
            f"latency budget {budget_ms:.2f} ms is out of reach: the fastest schedule this method allows is "
            f"predicted at {fastest:.2f} ms on this backend; ask for at least that much (or a smaller --target-speedup)"
        )
    kept = int(feasible.max())
    return _path(back, grid, int(np.argmin(cost[:, kept])), kept, full)


def budget_for(model: CostModel, depth: int, full: int, *, target_speedup: Optional[float] = None,
               latency_budget_ms: Optional[float] = None) -> float:
    """The latency budget (ms) for a target speedup over the predicted dense model, or as given.

    Raises:
        SpecError: neither or both given, or a speedup below 1 / a budget <= 0.
    """
    if (target_speedup is None) == (latency_budget_ms is None):
        raise SpecError("give exactly one of --target-speedup and --latency-budget for --schedule auto")
    if target_speedup is not None:
        if target_speedup < 1.0:
            raise SpecError(f"--target-speedup {target_speedup} is below 1 (slower than dense); ask for >= 1")
        return model.predict([full] * (depth + 1)) / target_speedup
    if latency_budget_ms <= 0:
        raise SpecError(f"--latency-budget must be positive, got {latency_budget_ms}")
    return float(latency_budget_ms)


# ----------------------------------------------------------------------------------- calibration


def thinned(tokens: Sequence[int], max_removed: MaxRemoved) -> list[int]:
    """``tokens`` with the same removals at every other site: the removals of sites ``2k`` and ``2k + 1``
    both at site ``2k``, as far as that block may remove (``max_removed``; the rest moves on to the next
    block that may take it, or is left out at the end). The second calibration schedule of :func:`fit_cost_model`:
    about the same tokens, half the sites, so a fixed per-site cost and a per-token one separate.
    """
    removed = [a - b for a, b in zip(tokens, tokens[1:])]
    sites = [block for block, r in enumerate(removed) if r > 0]
    assign = [0] * len(removed)
    for first, second in zip(sites[::2], sites[1::2] + [None]):
        assign[first] = removed[first] + (removed[second] if second is not None else 0)
    out, carry = [tokens[0]], 0
    for block, want in enumerate(assign):
        n = out[-1]
        take = min(want + carry, max_removed(block, n)) if want + carry else 0
        carry = want + carry - take
        out.append(n - take)
    return out


def fit_reduction_cost(samples: Sequence[tuple[int, int, float]]) -> tuple[float, float]:
    """Fit the reduction's cost from measured reduced models: ``cost = site_ms * sites +
    us_per_token * tokens / 1000``, least squares with both coefficients >= 0.

    Args:
        samples: ``(sites, tokens entering them in total, cost ms)`` per model; the cost is its measured
            latency minus its truncated twin's (:func:`fit_cost_model`); negative: noise, read as 0.

    Returns:
        ``(site_ms, merge_us_per_token)``; where the samples cannot tell the two apart (one sample, or
        schedules in proportion), or the joint fit goes negative, the better single-term fit.
    """
    A = np.array([[sites, tokens / 1e3] for sites, tokens, _ in samples], dtype=np.float64)
    y = np.maximum(np.array([r for *_, r in samples], dtype=np.float64), 0.0)
    candidates = []
    if len(samples) >= 2 and np.linalg.matrix_rank(A) == 2:
        both = np.linalg.lstsq(A, y, rcond=None)[0]
        if (both >= 0).all():
            candidates.append(both)
    for column in (1, 0):  # per token first: with nothing to tell them apart, the older model wins ties
        x = A[:, column]
        coef = np.zeros(2)
        coef[column] = float(x @ y / (x @ x)) if x @ x > 0 else 0.0
        candidates.append(coef)
    best = min(candidates, key=lambda c: float(((A @ c - y) ** 2).sum()))
    return float(best[0]), float(best[1])


def fit_cost_model(spec, cfg, curve: dict, *, method: str = "tome", params: Optional[dict] = None,
                   sparse_params: Optional[dict] = None, options=None,
                   log: Callable[[str], None] = print) -> tuple[CostModel, dict]:
    """Fit ``base_ms`` and the reduction's cost on the backend (torch, for the exports).

    Built and timed in one interleaved loop: the whole dense model; the whole model reduced with
    ``params`` (default ToMe at :func:`reference_r`) and, when given, with ``sparse_params`` (the same
    removals at fewer sites: :func:`thinned`); and each reduced model's truncated twin
    (:mod:`vitfold.plan.truncate`: its token counts, every reduction a Slice). ``base`` is the dense
    time the block curve does not explain. A reduced model's reduction cost is its time minus its
    twin's: the blocks' time cancels exactly, where the curve's prediction of a whole model is off by
    more than the reduction costs (measured: DINOv2 on OpenVINO, the curve over-predicts a reduced
    model by more than all its reductions take). Models without a twin (``Eva``) fall back to their
    time minus base and the curve. :func:`fit_reduction_cost` splits the costs into a per-site and a
    per-token part (all per token with one reduced model).

    Returns:
        ``(CostModel, {"dense_ms", "reference_ms", "reference_tokens", "reference_params",
        "reference_reduction_ms", ...})``, the same ``sparse_*`` keys with a sparse model.

    Raises:
        SpecError / BackendUnavailable / ExportError: as building the models.
    """
    import tempfile
    from pathlib import Path

    from .. import runtimes
    from ..compile import compile_module
    from ..export.models import create_model
    from ..reduce import TokenLayout, create_method
    from .curve import CurveOptions
    from .truncate import can_truncate, truncated_model
    from ..profiles.latency import measure_interleaved
    from ..quantize.calibration import timing_calibration

    options = options or CurveOptions()
    model, _ = create_model(spec)
    layout = TokenLayout.of(model)
    params = params or {"r": reference_r(layout.num_tokens, layout.num_prefix_tokens, layout.depth)}
    variants = {"reference": params, **({"sparse": sparse_params} if sparse_params is not None else {})}
    size = model.patch_embed.img_size
    shape = (spec.batch_size, 3, size[0], size[1])
    runtimes.backend_module(cfg.backend)  # a missing backend fails before any export
    sessions, schedules = {}, {}
    sample = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="vitfold-calibrate-") as tmp:
        torch_models = {"dense": model}
        for label, settings in variants.items():
            reducer = create_method(method, **settings)
            schedules[label] = reducer.schedule(layout)
            torch_models[label] = reducer.apply(model, schedules[label])
            if can_truncate(model):
                torch_models[f"{label}-truncated"] = truncated_model(model, schedules[label].tokens)
        for label, torch_model in torch_models.items():
            log(f"calibrate: export and build the whole {label} model ({cfg.backend} {cfg.label}, the build's pass pipeline)")
            schedule = schedules.get(label)  # a reduced model's, for --fused-ops (the twins have no site)
            sessions[label] = compile_module(torch_model, shape, Path(tmp) / label, cfg, sample=sample,
                                             calibration=timing_calibration(sample),
                                             metadata={"schedule": schedule.to_json()} if schedule else None).open(cfg)
        stats = measure_interleaved({k: (lambda s=s: s(sample)) for k, s in sessions.items()}, spec.batch_size,
                                    warmup=options.warmup, min_runs=options.min_runs, min_seconds=max(1.0, options.min_seconds),
                                    runs_per_turn=options.runs_per_turn)
        for session in sessions.values():
            session.close()
    plain = CostModel.from_curve(curve)
    dense_ms = stats["dense"].median_ms
    base = dense_ms - plain.predict([layout.num_tokens] * (layout.depth + 1))
    samples = []
    info = {"dense_ms": dense_ms, "dense_cov": stats["dense"].cov}
    for label, settings in variants.items():
        tokens = list(schedules[label].tokens)
        entering = site_inputs(tokens)
        twin = stats.get(f"{label}-truncated")
        cost = stats[label].median_ms - (twin.median_ms if twin is not None else base + plain.predict(tokens))
        samples.append((len(entering), sum(entering), cost))
        info.update({f"{label}_ms": stats[label].median_ms, f"{label}_tokens": tokens, f"{label}_params": settings,
                     f"{label}_cov": stats[label].cov, f"{label}_reduction_ms": cost,
                     f"{label}_truncated_ms": None if twin is None else twin.median_ms})
    if sparse_params is None:  # one model: all of its overhead per token, as before
        _, entering, cost = samples[0]
        site_ms, merge = 0.0, (max(0.0, cost) / entering * 1e3 if entering else 0.0)
    else:
        site_ms, merge = fit_reduction_cost(samples)
    return CostModel.from_curve(curve, base_ms=base, merge_us_per_token=merge, site_ms=site_ms), info


# ------------------------------------------------------------------------------------ build flow


def planned_methods() -> list[str]:
    """The registered methods that describe themselves to the planner (see :class:`~vitfold.reduce.SchedulePlan`)."""
    from ..reduce import METHODS

    return sorted(name for name, cls in METHODS.items() if callable(getattr(cls, "plan", None)))


def _planned(method: str) -> type:
    from ..reduce import METHODS

    if method not in planned_methods():
        raise SpecError(f"--schedule auto plans {', '.join(planned_methods())} schedules; {method!r} has its own schedule "
                        "parameters: give them instead")
    return METHODS[method]


def default_max_fraction(method: str) -> float:
    """The per-block cap ``auto_schedule`` uses when none is given: the method's ``plan_max_fraction``
    (ToMe: merge at most 0.2 of a block; EViT / Top-K: prune at most 0.5 at a location)."""
    return _planned(method).plan_max_fraction


def planner(method: str, params: dict, full: int, prefix: int, depth: int,
            max_fraction: float) -> tuple[MaxRemoved, dict, Callable[[Sequence[int]], dict]]:
    """How to plan for ``method``, as the method describes itself (``plan``): ``(max_removed,
    reference params, tokens -> method params)``, with the user's other ``params`` (locations, fuse,
    prop_attn, ...) kept in both.

    Raises:
        SpecError: a method that does not describe itself to the planner, or a bad ``max_fraction``.
    """
    from ..reduce import TokenLayout, create_method

    cls = _planned(method)
    others = {k: v for k, v in params.items() if k != cls.schedule_param}
    plan = create_method(method, **others).plan(TokenLayout(depth, full, prefix), max_fraction)
    return plan.max_removed, {**others, **plan.reference}, lambda tokens: {**params, **plan.params_for(tokens)}


def auto_schedule(spec, cfg, *, method: str = "tome", params: Optional[dict] = None,
                  target_speedup: Optional[float] = None, latency_budget_ms: Optional[float] = None,
                  curve=None, max_merge_fraction: Optional[float] = None, options=None,
                  log: Callable[[str], None] = print) -> tuple[dict, dict]:
    """Pick a hardware-aware schedule for ``spec`` on backend ``cfg`` (``build --schedule auto``).

    Args:
        method: ``tome`` (the picked per-block ``r``), ``evit`` or ``topk`` (the picked keep rate at
            each of the method's locations; the locations are the user's or the method's default).
        params: the method's other parameters (e.g. ``prop_attn``, ``locations``); ``r`` / ``keep_rate``
            are replaced.
        target_speedup / latency_budget_ms: exactly one: over the measured dense model, or in ms.
        curve: a block curve (``curve.json`` path or dict) measured on this backend; None measures one.
        max_merge_fraction: most of a block's tokens one block may remove; None: the method's default
            (:func:`default_max_fraction`: 0.2 for ToMe's merges, 0.5 for EViT / Top-K pruning).

    Returns:
        ``(params with the picked schedule, info)``; ``info`` has the budget, tokens, the method's
        schedule parameters (``r`` or ``keep_rate``), predicted ms and speedup, the calibration and
        the curve used (written to ``auto_schedule.json`` by :func:`attach_to_build`).

    Raises:
        SpecError: another method, a curve from another model / backend / precision / batch, bad targets.
        ScheduleError: a target this backend cannot reach with the method (names what it can reach).
    """
    from .curve import measure_curve, read_curve

    _planned(method)  # before a curve is measured
    params = dict(params or {})
    max_fraction = default_max_fraction(method) if max_merge_fraction is None else max_merge_fraction
    if curve is None:
        log("auto schedule: measure the block latency curve on this backend")
        curve, source = measure_curve(spec, cfg, mode="block", options=options, log=log), "measured for this build"
    elif isinstance(curve, dict):
        source = "given"
    else:
        curve, source = read_curve(curve), str(curve)
    want = {"model": spec.name, "batch_size": spec.batch_size, "backend": cfg.backend, "precision": cfg.label}
    measured = curve.get("backend", {})
    have = {"model": curve.get("model"), "batch_size": curve.get("batch_size"), "backend": measured.get("backend"),
            "precision": f"{measured.get('precision')}" + (f"-w{measured['weights'][3:]}" if measured.get("weights") else "")}
    if want != have:
        raise SpecError(f"the latency curve is for {have}, this build is {want}; measure one with "
                        f"`deploy.py curve --model {spec.name} --backend {cfg.backend} --precision {cfg.precision} --batch {spec.batch_size}`")
    depth, full, prefix = curve["depth"], curve["full_tokens"], curve["num_prefix_tokens"]
    max_removed, reference, to_params = planner(method, params, full, prefix, depth, max_fraction)
    sparse = sparse_reference(method, reference, to_params, full, prefix, depth, max_removed)
    model, calibration = fit_cost_model(spec, cfg, curve, method=method, params=reference, sparse_params=sparse,
                                        options=options, log=log)
    budget = budget_for(model, depth, full, target_speedup=target_speedup, latency_budget_ms=latency_budget_ms)
    if target_speedup is not None:  # over the measured dense model, not the predicted one
        budget = calibration["dense_ms"] / target_speedup
    tokens = pick_schedule(model, depth, full, prefix, budget, max_removed)
    picked = to_params(tokens)
    schedule_params = {k: picked[k] for k in ("r", "keep_rate", "locations") if k in picked}
    predicted = model.predict(tokens)
    sites, reduction_ms = model.sites(tokens)
    info = {
        "method": method, "target_speedup": target_speedup, "latency_budget_ms": budget, "tokens": tokens,
        **schedule_params, "max_merge_fraction": max_fraction,
        "predicted_ms": predicted, "predicted_speedup": calibration["dense_ms"] / predicted,
        "sites": sites, "reduction_ms": reduction_ms,
        "cost_model": {"base_ms": model.base_ms, "merge_us_per_token": model.merge_us_per_token, "site_ms": model.site_ms},
        "calibration": calibration, "curve": source, "curve_steps": curve.get("steps", []),
    }
    log(f"auto schedule: {describe(info)} (tokens {tokens[0]} -> {tokens[-1]}), predicted {predicted:.2f} ms "
        f"= {info['predicted_speedup']:.2f}x over the measured dense {calibration['dense_ms']:.2f} ms; "
        f"{sites} reduction sites, predicted to cost {reduction_ms:.2f} ms ({model.site_ms:.3f} ms per site "
        f"+ {model.merge_us_per_token:.2f} us per token entering one)")
    return picked, info


def sparse_reference(method: str, reference: dict, to_params: Callable[[Sequence[int]], dict], full: int, prefix: int,
                     depth: int, max_removed: MaxRemoved) -> Optional[dict]:
    """The second calibration model's parameters: ``reference``'s removals at half its sites
    (:func:`thinned`), or None where that changes nothing (a single site)."""
    from ..reduce import TokenLayout, create_method

    tokens = list(create_method(method, **reference).schedule(TokenLayout(depth, full, prefix)).tokens)
    sparse = thinned(tokens, max_removed)
    return None if sparse == tokens else to_params(sparse)


