"""Latency vs token count: step and plateau detection on curves with known answers, measurement via the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import deploy
from vitfold.errors import SpecError
from vitfold.plan.curve import analyse, find_plateaus, find_steps, fixed_cost, interpolate, parse_tokens


def staircase(tokens, steps=((64, 0.5), (128, 0.3)), slope=0.01, noise=0.0, seed=0):
    """A linear curve plus jumps of ``ms`` right after each ``N`` in ``steps``."""
    rng = np.random.default_rng(seed)
    t = np.array([0.2 + slope * n + sum(ms for at, ms in steps if n > at) for n in tokens])
    return t + rng.normal(0, noise, len(t))


def test_steps_found_where_they_are():
    tokens = list(range(16, 197, 4))
    steps = find_steps(tokens, staircase(tokens, noise=0.002))
    assert [(s["from"], s["to"]) for s in steps] == [(64, 68), (128, 132)]
    assert steps[0]["jump_ms"] == pytest.approx(0.5 + 0.04, abs=0.02)


def test_no_steps_on_smooth_curves():
    tokens = np.arange(16, 197, 4)
    assert find_steps(tokens, 0.2 + 0.01 * tokens) == []
    assert find_steps(tokens, 0.2 + 0.01 * tokens + 2e-5 * tokens**2) == []  # attention's quadratic term
    # noise alone is no step when the points say how noisy they are
    noisy = staircase(tokens, steps=(), noise=0.01, seed=3)
    assert find_steps(tokens, noisy, noise_ms=[0.01] * len(tokens)) == []


def test_plateaus_on_a_staircase():
    tokens = list(range(8, 65, 4))
    t = [1.0 * (n // 16) for n in tokens]  # flat within each 16-token tile
    plateaus = find_plateaus(tokens, t)
    assert [(p["from"], p["to"]) for p in plateaus] == [(16, 28), (32, 44), (48, 60)]
    assert all(p["ms_from"] == p["ms_to"] for p in plateaus)


def test_parse_tokens():
    assert parse_tokens("16:32:8", 197) == [16, 24, 32, 197]
    assert parse_tokens("49,98", 197) == [49, 98, 197]
    assert parse_tokens(None, 197)[:3] == [16, 20, 24] and parse_tokens(None, 197)[-2:] == [196, 197]
    assert parse_tokens(None, 17, minimum=2) == list(range(2, 18))
    with pytest.raises(SpecError, match=r"token counts \[300\] are outside \[2, 197\]"):
        parse_tokens("16,300", 197, minimum=2)
    with pytest.raises(SpecError, match="START:STOP:STEP"):
        parse_tokens("a:b", 197)


def test_analyse_and_interpolate():
    tokens = list(range(16, 197, 4))
    medians = staircase(tokens)
    curve = analyse({"points": [{"tokens": n, "median_ms": float(t), "cov": 0.01, "samples_ms": []}
                                for n, t in zip(tokens, medians)]})
    assert [s["from"] for s in curve["steps"]] == [64, 128] and curve["noisy"] == []
    assert interpolate(curve, 18) == pytest.approx((medians[0] + medians[1]) / 2)
    assert interpolate(curve, 500) == pytest.approx(medians[-1])


def test_fixed_cost_is_the_fit_at_zero_tokens():
    # A block that costs 0.13 ms whatever N, 8 us per token and 5 ns per token pair, with +-1 us noise.
    tokens = list(range(41, 198, 13))
    noise = np.random.default_rng(0).uniform(-1e-3, 1e-3, len(tokens))
    ms = [0.13 + 8e-3 * n + 5e-6 * n * n + e for n, e in zip(tokens, noise)]
    fit = fixed_cost(tokens, ms)
    assert fit["fixed_ms"] == pytest.approx(0.13, abs=0.01)
    assert fit["linear_ms_per_token"] == pytest.approx(8e-3, rel=0.05)
    top = 0.13 + 8e-3 * 197 + 5e-6 * 197**2
    assert fit["fixed_share"] == pytest.approx(0.13 / top, abs=0.01)
    # A purely proportional curve has no fixed part.
    assert fixed_cost(tokens, [8e-3 * n for n in tokens])["fixed_ms"] == pytest.approx(0.0, abs=1e-9)
    assert fixed_cost([16, 16, 20], [1.0, 1.0, 1.1]) is None
    curve = analyse({"points": [{"tokens": n, "median_ms": t, "cov": 0.01, "samples_ms": []} for n, t in zip(tokens, ms)]})
    assert curve["fixed"] == fit


def test_cli_block_curve(tmp_path):
    """One block of a small timm ViT on ONNX Runtime at four token counts: JSON + PNG."""
    out = tmp_path / "curve"
    result = deploy("curve", "--model", "test_vit", "--img-size", "32", "--backend", "onnxruntime", "--tokens", "2:5:1",
                    "--min-runs", "5", "--min-seconds", "0", "--out", str(out))
    assert result.returncode == 0, result.stderr + result.stdout
    curve = json.loads((out / "curve.json").read_text())
    assert curve["mode"] == "block" and curve["full_tokens"] == 5 and curve["embed_dim"] == 64
    assert [p["tokens"] for p in curve["points"]] == [2, 3, 4, 5]
    assert all(p["median_ms"] > 0 and len(p["samples_ms"]) == p["runs"] >= 5 for p in curve["points"])
    assert (out / "curve.png").stat().st_size > 1000
    assert "steps" in curve and "N=2" in result.stdout


def test_cli_curve_bad_tokens_and_block():
    result = deploy("curve", "--model", "test_vit", "--img-size", "32", "--tokens", "1,9")
    assert result.returncode == 2 and "token counts [9] are outside" in result.stderr
    result = deploy("curve", "--model", "test_vit", "--block-index", "6")
    assert result.returncode == 2 and "block 6 does not exist" in result.stderr


def test_whole_model_curve(tmp_path):
    """Whole model at a uniform token count: more tokens never run faster by a wide margin."""
    from vitfold.plan.curve import CurveOptions, measure_curve
    from vitfold.runtimes import BuildConfig
    from vitfold.spec import ModelSpec

    curve = measure_curve(ModelSpec("test_vit", img_size=64), BuildConfig("openvino"), mode="whole", tokens=[2, 17],
                          options=CurveOptions(min_runs=5, min_seconds=0), log=lambda m: None)
    assert [p["tokens"] for p in curve["points"]] == [2, 17] and curve["full_tokens"] == 17
    assert curve["block_index"] is None
    assert all(p["median_ms"] > 0 for p in curve["points"])


# ------------------------------------------------------------------------- hardware-aware schedules


def step_curve(counts, step_after=32, low=1.0, high=2.0):
    """A block curve that is flat at ``low`` ms up to ``step_after`` tokens and ``high`` above."""
    return {"mode": "block", "embed_dim": 64, "attn_dim": 64, "mlp_hidden": 256,
            "points": [{"tokens": n, "median_ms": low if n <= step_after else high, "cov": 0.0, "samples_ms": []}
                       for n in counts]}


def test_picker_lands_on_the_fast_side_of_a_step():
    from vitfold.plan.auto_schedule import CostModel, pick_schedule

    model = CostModel.from_curve(step_curve(range(8, 65, 4)))
    anything = lambda block, tokens: tokens - 2  # a pruning method without ToMe's half cap
    # 4 blocks from 64 tokens: dense 8 ms; at 6 ms two blocks' MLP and attention can drop below the step
    tokens = pick_schedule(model, depth=4, full=64, num_prefix_tokens=1, budget_ms=6.0, max_removed=anything)
    assert model.predict(tokens) <= 6.0
    # never 36..60 (as slow as 64) and never below 32 (as fast as 32, fewer tokens): the fast side's top
    assert set(tokens) == {64, 32} and tokens == sorted(tokens, reverse=True)
    # ToMe may merge only half the tokens of a block: 64 -> 32 is out of reach in one block, so it
    # keeps 60 first (costs what 64 costs) and then lands exactly on 32
    tome = pick_schedule(model, depth=4, full=64, num_prefix_tokens=1, budget_ms=6.0)
    assert tome == [64, 60, 32, 32, 32]


def test_picker_budget_limits_and_messages():
    from vitfold.errors import ScheduleError
    from vitfold.plan.auto_schedule import CostModel, budget_for, pick_schedule
    from vitfold.reduce.tome import tome_params

    counts = list(range(8, 65, 4))
    curve = {"mode": "block", "embed_dim": 64, "attn_dim": 64, "mlp_hidden": 256,
             "points": [{"tokens": n, "median_ms": 0.1 + 0.02 * n, "cov": 0.0, "samples_ms": []} for n in counts]}
    model = CostModel.from_curve(curve, base_ms=0.5, merge_us_per_token=1.0)
    dense = model.predict([64] * 5)
    assert pick_schedule(model, 4, 64, 1, budget_ms=dense) == [64] * 5
    kept = []
    for speedup in (1.2, 1.5, 1.8):
        budget = budget_for(model, 4, 64, target_speedup=speedup)
        tokens = pick_schedule(model, 4, 64, 1, budget)
        assert model.predict(tokens) <= budget + 1e-9
        r = tome_params(tokens)
        assert all(0 <= ri <= (n - 1) // 2 for ri, n in zip(r, tokens))  # ToMe's bipartite cap
        kept.append(sum(tokens[1:]))
    assert kept[0] > kept[1] > kept[2]  # a harder target removes more tokens
    with pytest.raises(ScheduleError, match=r"latency budget .* is out of reach: .* predicted at"):
        pick_schedule(model, 4, 64, 1, budget_for(model, 4, 64, target_speedup=50.0))
    with pytest.raises(SpecError, match="below 1"):
        budget_for(model, 4, 64, target_speedup=0.5)
    with pytest.raises(SpecError, match="exactly one"):
        budget_for(model, 4, 64)


def test_picker_matches_brute_force_on_a_small_case():
    import itertools

    from vitfold.plan.auto_schedule import CostModel, pick_schedule

    counts = [5, 9, 13, 17]
    rng = np.random.default_rng(1)
    curve = {"mode": "block", "embed_dim": 32, "attn_dim": 32, "mlp_hidden": 128,
             "points": [{"tokens": n, "median_ms": float(t), "cov": 0.0, "samples_ms": []}
                        for n, t in zip(counts, np.sort(rng.uniform(0.5, 2.0, 4)))]}
    checked = set()
    for model, budget in itertools.product((CostModel.from_curve(curve, merge_us_per_token=5.0),
                                            CostModel.from_curve(curve, merge_us_per_token=5.0, site_ms=0.3)), (4.5, 5.5, 6.5)):
        best = None
        for rest in itertools.product(counts, repeat=3):
            tokens = [17, *rest]
            ok = all(b <= a and a - b <= (a - 1) // 2 for a, b in zip(tokens, tokens[1:]))
            if ok and model.predict(tokens) <= budget and (best is None or sum(tokens[1:]) > sum(best[1:])):
                best = tokens
        if best is None:
            continue
        picked = pick_schedule(model, 3, 17, 1, budget)
        assert model.predict(picked) <= budget and sum(picked[1:]) == sum(best[1:])
        checked.add(model.site_ms)
    assert checked == {0.0, 0.3}  # both cost models met a budget with a feasible schedule


@pytest.fixture(scope="module")
def tiny_curve(tmp_path_factory):
    """A measured block curve of test_vit at 64x64 (17 tokens) on ONNX Runtime, six counts."""
    out = tmp_path_factory.mktemp("curve") / "test_vit"
    result = deploy("curve", "--model", "test_vit", "--img-size", "64", "--backend", "onnxruntime", "--tokens", "2:17:3",
                    "--min-runs", "10", "--min-seconds", "0.1", "--out", str(out))
    assert result.returncode == 0, result.stderr + result.stdout
    return out / "curve.json"


def test_auto_schedule_impossible_target_is_named(tiny_curve):
    result = deploy("build", "--model", "test_vit", "--img-size", "64", "--backend", "onnxruntime", "--schedule", "auto",
                    "--target-speedup", "40", "--curve", str(tiny_curve))
    assert result.returncode == 2, result.stderr + result.stdout
    assert "is out of reach: the fastest schedule this method allows is predicted at" in result.stderr
    assert "--target-speedup" in result.stderr


def test_auto_schedule_needs_a_matching_curve_and_one_target(tiny_curve):
    result = deploy("build", "--model", "test_vit", "--img-size", "64", "--backend", "openvino", "--schedule", "auto",
                    "--target-speedup", "1.2", "--curve", str(tiny_curve))
    assert result.returncode == 2 and "the latency curve is for" in result.stderr and "deploy.py curve" in result.stderr
    result = deploy("build", "--model", "test_vit", "--target-speedup", "1.2")
    assert result.returncode == 2 and "need --schedule auto" in result.stderr


def test_auto_schedule_build_records_predicted_and_measured(tiny_curve, tmp_path):
    out = tmp_path / "auto"
    result = deploy("build", "--model", "test_vit", "--img-size", "64", "--backend", "onnxruntime", "--schedule", "auto",
                    "--latency-budget", "1000", "--curve", str(tiny_curve), "--out", str(out),
                    "--min-runs", "5", "--min-seconds", "0")
    assert result.returncode == 0, result.stderr + result.stdout
    report = json.loads((out / "report.json").read_text())
    auto = report["auto_schedule"]
    manifest = json.loads((out / "manifest.json").read_text())
    # a budget everything meets keeps every token (r = 0), and the build runs exactly that schedule
    assert auto["r"] == [0] * 6 and manifest["schedule"]["tokens"] == auto["tokens"] == [17] * 7
    assert auto["measured_ms"] == report["latency"]["reduced"]["median_ms"] and auto["met_target"]
    assert "Hardware-aware schedule" in (out / "report.md").read_text()
    assert json.loads((out / "auto_schedule.json").read_text())["predicted_ms"] == auto["predicted_ms"]
    # the reduction's cost was priced against truncated twins at all sites and at half of them
    calibration = auto["calibration"]
    assert calibration["reference_truncated_ms"] > 0 and calibration["sparse_truncated_ms"] > 0
    assert len([1 for a, b in zip(calibration["sparse_tokens"], calibration["sparse_tokens"][1:]) if b < a]) < \
        len([1 for a, b in zip(calibration["reference_tokens"], calibration["reference_tokens"][1:]) if b < a])
    assert auto["sites"] == 0 and auto["reduction_ms"] == 0.0 and "- 0 reduction sites" in (out / "report.md").read_text()


def test_prune_planner_removes_only_at_locations_and_round_trips_to_keep_rates():
    from vitfold.plan.auto_schedule import CostModel, pick_schedule
    from vitfold.reduce.evit import prune_max_removed, prune_params
    from vitfold.reduce import TokenLayout, create_method

    counts = list(range(2, 66))
    curve = {"mode": "block", "embed_dim": 32, "attn_dim": 32, "mlp_hidden": 128,
             "points": [{"tokens": n, "median_ms": 0.1 + 0.01 * n, "cov": 0.0, "samples_ms": []} for n in counts]}
    model = CostModel.from_curve(curve, merge_us_per_token=1.0)
    dense = model.predict([65] * 7)
    for fuse in (True, False):
        limit = prune_max_removed((1, 3), 1, fuse, max_fraction=0.5)
        assert limit(0, 65) == 0 and limit(1, 65) == 32 - int(fuse)  # keep >= ceil(0.5 * 64) patch tokens
        for speedup in (1.2, 1.5):
            tokens = pick_schedule(model, 6, 65, 1, dense / speedup, limit)
            changes = [b for b, (x, y) in enumerate(zip(tokens, tokens[1:])) if y != x]
            assert changes and set(changes) <= {1, 3} and model.predict(tokens) <= dense / speedup
            rates = prune_params(tokens, (1, 3), 1, fuse)
            assert all(0.49 < r <= 1.0 for r in rates)
            # the method, given these rates, runs exactly the picked schedule
            method = create_method("evit" if fuse else "topk", keep_rate=rates, locations=(1, 3))
            layout = TokenLayout(num_tokens=65, num_prefix_tokens=1, depth=6)
            assert list(method.schedule(layout).tokens) == tokens
    with pytest.raises(Exception, match="not a reduction location"):
        prune_params([65, 60, 60], (1,), 1, False)


def test_auto_schedule_plans_evit_keep_rates(tiny_curve, tmp_path):
    out = tmp_path / "auto-evit"
    result = deploy("build", "--model", "test_vit", "--img-size", "64", "--backend", "onnxruntime", "--method", "evit",
                    "--locations", "1,3", "--schedule", "auto", "--latency-budget", "1000", "--curve", str(tiny_curve),
                    "--out", str(out), "--min-runs", "5", "--min-seconds", "0")
    assert result.returncode == 0, result.stderr + result.stdout
    auto = json.loads((out / "report.json").read_text())["auto_schedule"]
    manifest = json.loads((out / "manifest.json").read_text())
    # a budget everything meets prunes nothing: keep rate 1.0 at both locations, the schedule the build ran
    assert auto["method"] == "evit" and auto["keep_rate"] == [1.0, 1.0] and auto["locations"] == [1, 3]
    assert manifest["schedule"]["tokens"] == auto["tokens"] == [17] * 7
    assert "keep_rate = [1.0, 1.0] at blocks [1, 3]" in (out / "report.md").read_text()
    refused = deploy("build", "--model", "test_vit", "--method", "evit", "--keep-rate", "0.7", "--schedule", "auto",
                     "--latency-budget", "5")
    assert refused.returncode == 2 and "drop --keep-rate" in refused.stderr
    other = deploy("build", "--model", "test_vit", "--img-size", "64", "--backend", "onnxruntime", "--method", "kmedoids",
                   "--schedule", "auto", "--latency-budget", "5", "--curve", str(tiny_curve))
    assert other.returncode == 2 and "plans evit, tome, topk schedules" in other.stderr


def test_a_reference_schedule_off_the_grid_is_a_candidate():
    """The benchmark's matched-latency budget is predict(constant schedule); EViT keep 0.5 on DINOv2 has
    counts (130, 67, 35) between the curve's (every 4 tokens), and the reduction overhead is charged on
    the exact counts, so without them the picker's nearest schedule costs a little more and is refused."""
    from vitfold.errors import ScheduleError
    from vitfold.plan.auto_schedule import CostModel, pick_schedule
    from vitfold.reduce.evit import prune_max_removed

    counts = list(range(16, 257, 4)) + [257]
    curve = {"mode": "block", "embed_dim": 384, "attn_dim": 384, "mlp_hidden": 1536,
             "points": [{"tokens": n, "median_ms": 0.3 + 0.0123456789 * n, "cov": 0.0, "samples_ms": []} for n in counts]}
    model = CostModel.from_curve(curve, base_ms=4.59, merge_us_per_token=0.58)
    constant = [257] * 4 + [130] * 3 + [67] * 3 + [35] * 3  # keep 0.5 at blocks 3, 6, 9, fused token included
    limit = prune_max_removed((3, 6, 9), 1, True, max_fraction=0.5)
    budget = model.predict(constant)
    with pytest.raises(ScheduleError, match="out of reach"):
        pick_schedule(model, 12, 257, 1, budget, limit)
    picked = pick_schedule(model, 12, 257, 1, budget, limit, extra_counts=constant)
    assert model.predict(picked) <= budget * (1 + 1e-9) and sum(picked[1:]) >= sum(constant[1:])


def test_methods_describe_themselves_to_the_planner(monkeypatch):
    """The planner dispatches on no method name: a method is planned when it implements ``plan``."""
    from vitfold.plan.auto_schedule import default_max_fraction, planned_methods, planner
    from vitfold.reduce import METHODS, SchedulePlan

    assert planned_methods() == ["evit", "tome", "topk"]  # evit-mass (a per-image gate) plans its own capacity
    assert (default_max_fraction("tome"), default_max_fraction("topk")) == (0.2, 0.5)
    max_removed, reference, to_params = planner("tome", {"prop_attn": False}, 197, 1, 12, 0.2)
    assert reference == {"prop_attn": False, "r": 8} and max_removed(0, 197) == 39
    assert to_params([197, 190, 190]) == {"prop_attn": False, "r": [7, 0]}

    class Halving:
        schedule_param, plan_max_fraction = "k", 0.5

        def __init__(self, k=None):
            pass

        def plan(self, layout, max_fraction):
            return SchedulePlan(lambda block, n: n // 2, {"k": 1}, lambda tokens: {"k": list(tokens)})

    monkeypatch.setitem(METHODS, "halving", Halving)
    assert "halving" in planned_methods() and default_max_fraction("halving") == 0.5
    max_removed, reference, to_params = planner("halving", {"k": 3}, 10, 1, 2, 0.5)
    assert (max_removed(0, 10), reference, to_params([10, 5])) == (5, {"k": 1}, {"k": [10, 5]})
    with pytest.raises(SpecError, match="--schedule auto plans evit, halving, tome, topk schedules; 'dpc-knn'"):
        planner("dpc-knn", {}, 197, 1, 12, 0.5)


def test_thinned_moves_every_other_sites_removals_forward_within_the_cap():
    from vitfold.plan.auto_schedule import thinned

    assert thinned([20, 18, 16, 14, 12], lambda block, n: 100) == [20, 16, 16, 12, 12]
    # a cap of 3 per block: what does not fit moves on to the next block
    assert thinned([20, 18, 16, 14, 12], lambda block, n: 3) == [20, 17, 16, 13, 12]
    # an odd number of sites: the last one keeps its own removal; only locations 1 and 3 may prune
    at = lambda block, n: n if block in (1, 3) else 0  # noqa: E731
    assert thinned([20, 20, 15, 15, 10], at) == [20, 20, 10, 10, 10]
    assert thinned([20, 20, 15, 12, 12], lambda block, n: n) == [20, 20, 12, 12, 12]
    assert thinned([20, 18, 16, 14], lambda block, n: n) == [20, 16, 16, 14]  # three sites: the third stays
    assert thinned([20] * 5, lambda block, n: n) == [20] * 5


def test_fit_reduction_cost_separates_site_and_token_costs():
    from vitfold.plan.auto_schedule import fit_reduction_cost

    site_ms, us = 0.2, 1.5
    samples = [(sites, tokens, site_ms * sites + us * tokens / 1e3) for sites, tokens in ((12, 1400), (6, 1250))]
    fitted = fit_reduction_cost(samples)
    assert fitted == pytest.approx((site_ms, us))
    # a joint fit that would need a negative token cost falls back to the better single term
    site_only = fit_reduction_cost([(12, 1400, 2.4), (6, 1500, 1.2)])
    assert site_only[1] == 0.0 and site_only[0] == pytest.approx(0.2)
    # one sample cannot tell them apart: all per token, as the planner did before sites were charged
    assert fit_reduction_cost([(12, 1400, 2.1)]) == pytest.approx((0.0, 1.5))
    assert fit_reduction_cost([(12, 1400, -0.3), (6, 1250, -0.1)]) == (0.0, 0.0)  # noise below the curve


def test_a_per_site_cost_makes_the_picker_use_fewer_sites():
    from vitfold.plan.auto_schedule import CostModel, pick_schedule

    counts = list(range(2, 66))
    curve = {"mode": "block", "embed_dim": 32, "attn_dim": 32, "mlp_hidden": 128,
             "points": [{"tokens": n, "median_ms": 0.1 + 0.01 * n, "cov": 0.0, "samples_ms": []} for n in counts]}
    free = CostModel.from_curve(curve)
    costly = CostModel.from_curve(curve, site_ms=0.15)
    budget_cut = free.predict([65] * 7) - free.predict([65, 57, 49, 41, 33, 25, 17])  # what r=8 per block saves
    picked = {}
    for name, model in (("free", free), ("costly", costly)):
        budget = model.predict([65] * 7) - budget_cut
        tokens = pick_schedule(model, 6, 65, 1, budget)
        assert model.predict(tokens) <= budget + 1e-9
        picked[name] = tokens
    assert costly.sites(picked["costly"])[0] < free.sites(picked["free"])[0]
    sites, ms = costly.sites(picked["costly"])
    assert ms == pytest.approx(sites * 0.15)


def test_truncated_twin_runs_the_schedule_with_slices():
    """The twin that prices a reduction: the schedule's token counts, each reduction the first N_l
    tokens; with nothing removed, the dense model bit for bit."""
    import torch

    from conftest import tiny_vit
    from vitfold.plan.truncate import can_truncate, truncated_model

    model = tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(truncated_model(model, [17] * 5)(x), model(x))
        twin = truncated_model(model, [17, 13, 13, 9, 9])
        tokens = twin.forward_features(x)
        assert tokens.shape == (2, 9, 64)
        # block 0 keeps its first 13 tokens: the same as running it dense and slicing before the MLP
        b = model.blocks[0]
        h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        h = h + b.ls1(b.attn(b.norm1(h)))
        h = h[:, :13]
        torch.testing.assert_close(twin.blocks[0](model.norm_pre(model._pos_embed(model.patch_embed(x)))),
                                   h + b.ls2(b.mlp(b.norm2(h))))
    assert can_truncate(model) and not can_truncate(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="need depth \\+ 1"):
        truncated_model(model, [17] * 4)
