"""deploy.py sweep: the points syntax, one shared dense baseline, caching by spec hash, table and plot."""

from __future__ import annotations

import json

import pytest

from conftest import deploy
from vitfold.build import BuildRequest
from vitfold.profiles.report import LatencyOptions
from vitfold.errors import SpecError
from vitfold.runtimes import BuildConfig
from vitfold.spec import ModelSpec
from vitfold.sweep import Point, parse_points


def test_points_are_every_combination_with_aliases():
    points = parse_points("tome:r=4,8 evit:keep=0.5,0.7:fuse=false topk:keep=0.7")
    assert points == [
        Point("tome", {"r": 4}), Point("tome", {"r": 8}),
        Point("evit", {"keep_rate": 0.5, "fuse": False}), Point("evit", {"keep_rate": 0.7, "fuse": False}),
        Point("topk", {"keep_rate": 0.7}),
    ]
    assert points[2].label == "keep=0.5,fuse=False"


@pytest.mark.parametrize("text", ["", "tome:r", "tome:=4", ":r=4"])
def test_malformed_points_are_refused(text):
    with pytest.raises(SpecError):
        parse_points(text)


def test_request_key_is_the_artifact_identity():
    base = BuildRequest(spec=ModelSpec("deit_small_patch16_224"), method="tome", params={"r": 8})
    assert base.key() == BuildRequest(spec=ModelSpec("deit_small_patch16_224"), method="tome", params={"r": 8}).key()
    from dataclasses import replace

    others = [replace(base, params={"r": 9}), replace(base, method="evit"), replace(base, task="features"),
              replace(base, build=BuildConfig(backend="onnxruntime")), replace(base, spec=ModelSpec("deit_small_patch16_224", batch_size=2))]
    assert len({o.key() for o in others} | {base.key()}) == len(others) + 1
    # where it goes and how it is timed do not change what is built
    assert replace(base, out="/elsewhere").key() == base.key()
    assert replace(base, latency=LatencyOptions(min_runs=3)).key() == base.key()
    assert replace(base, force=True).key() == base.key()


def test_sweep_builds_once_and_caches(tmp_path):
    args = ["sweep", "--model", "vit_tiny_patch16_224", "--img-size", "96", "--backend", "onnxruntime",
            "--out", str(tmp_path / "sw"), "--min-runs", "3", "--min-seconds", "0"]
    first = deploy(*args, "--methods", "tome:r=2 topk:keep=0.5:locations=[3]")
    assert first.returncode == 0, first.stderr + first.stdout
    summary = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [(p["method"], p["label"]) for p in summary["points"]] == [("tome", "r=2"), ("topk", "keep=0.5,at=[3]")]
    dense = tmp_path / "sw" / summary["dense"]
    dense_stamp = (dense / "manifest.json").stat().st_mtime_ns
    for point in summary["points"]:
        manifest = json.loads((tmp_path / "sw" / point["directory"] / "manifest.json").read_text())
        assert (tmp_path / "sw" / point["directory"] / manifest["dense"]).resolve() == dense.resolve()
        assert not (tmp_path / "sw" / point["directory"] / "dense").exists()  # one shared baseline
        assert point["flop_ratio"] > 1.0 and 0.0 < point["fidelity"] <= 1.0 + 1e-9
    assert (tmp_path / "sw" / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| topk | keep=0.5,at=[3] |" in (tmp_path / "sw" / "sweep.md").read_text()

    second = deploy(*args, "--methods", "tome:r=2,1")
    assert second.returncode == 0, second.stderr + second.stdout
    assert "tome r=2: cached" in second.stdout and "tome r=1: build" in second.stdout
    assert (dense / "manifest.json").stat().st_mtime_ns == dense_stamp


def test_sweep_stops_on_a_bad_point_with_the_reason(tmp_path):
    result = deploy("sweep", "--model", "vit_tiny_patch16_224", "--img-size", "96", "--backend", "onnxruntime",
                    "--out", str(tmp_path / "sw"), "--methods", "evit:r=4", "--min-runs", "3", "--min-seconds", "0")
    assert result.returncode == 2 and "takes no parameter r" in result.stderr
    assert not (tmp_path / "sw").exists()  # refused before the dense baseline was built


def test_sweep_over_precisions_shares_one_dense_f32(tmp_path):
    """--precisions f32,int8: one sweep per precision; the int8 points report the whole gain against
    one shared dense f32 build, and no point carries a dense-f32 copy of its own."""
    pytest.importorskip("onnxruntime")
    result = deploy("sweep", "--model", "vit_tiny_patch16_224", "--img-size", "64", "--backend", "onnxruntime",
                    "--precisions", "f32,int8", "--methods", "tome:r=1", "--out", str(tmp_path / "sw"),
                    "--min-runs", "3", "--min-seconds", "0")
    assert result.returncode == 0, result.stderr + result.stdout
    f32 = json.loads((tmp_path / "sw" / "f32" / "sweep.json").read_text())
    int8 = json.loads((tmp_path / "sw" / "int8" / "sweep.json").read_text())
    assert f32["points"][0]["speedup_vs_dense_f32"] is None
    point = int8["points"][0]
    assert point["speedup_vs_dense_f32"] > 0
    directory = tmp_path / "sw" / "int8" / point["directory"]
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["dense_f32"].startswith("../dense-f32-") and not (directory / "dense-f32").exists()
    assert json.loads((directory / manifest["dense_f32"] / "manifest.json").read_text())["build"]["precision"] == "f32"
    assert manifest["quantization"]["precision"] == "int8"


def test_sweep_with_eval_adds_an_accuracy_column(tmp_path):
    """--eval runs `eval` on every point: accuracies against the folder's labels, one dense accuracy
    (the shared twin, run once), the drop = dense - point, in sweep.json / sweep.md and the table."""
    from PIL import Image, ImageOps

    from vitfold.images import list_images

    data = tmp_path / "val"
    for n, path in enumerate(list_images(None)):
        target = data / str(n % 3)  # class indices as folder names
        target.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as photo:
            photo.convert("RGB").save(target / f"{n}.png")
            ImageOps.mirror(photo.convert("RGB")).save(target / f"{n}-m.png")
    result = deploy("sweep", "--model", "vit_tiny_patch16_224", "--img-size", "96", "--backend", "onnxruntime",
                    "--out", str(tmp_path / "sw"), "--min-runs", "3", "--min-seconds", "0",
                    "--methods", "tome:r=1,2", "--eval", str(data))
    assert result.returncode == 0, result.stderr + result.stdout
    summary = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    dense = {p["dense_accuracy"] for p in summary["points"]}
    assert len(dense) == 1
    for point in summary["points"]:
        assert 0.0 <= point["accuracy"] <= 1.0
        assert point["accuracy_drop"] == pytest.approx(point["dense_accuracy"] - point["accuracy"])
    assert "accuracy (drop)" in (tmp_path / "sw" / "sweep.md").read_text() and "tome r=1: top-1" in result.stdout
