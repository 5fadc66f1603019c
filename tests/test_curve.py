"""Latency vs token count: step and plateau detection on curves with known answers, measurement via the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import deploy
from vitfold.errors import SpecError
from vitfold.profiles.curve import analyse, find_plateaus, find_steps, interpolate, parse_tokens


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
    from vitfold.profiles.curve import CurveOptions, measure_curve
    from vitfold.runtimes import BuildConfig
    from vitfold.spec import ModelSpec

    curve = measure_curve(ModelSpec("test_vit", img_size=64), BuildConfig("openvino"), mode="whole", tokens=[2, 17],
                          options=CurveOptions(min_runs=5, min_seconds=0), log=lambda m: None)
    assert [p["tokens"] for p in curve["points"]] == [2, 17] and curve["full_tokens"] == 17
    assert curve["block_index"] is None
    assert all(p["median_ms"] > 0 for p in curve["points"])
