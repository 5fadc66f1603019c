"""End to end through deploy.py: the default DeiT-S build, re-profiling, loading without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import deploy

FAST = ["--min-runs", "10", "--min-seconds", "0.3"]



@pytest.fixture(scope="module")
def default_build(tmp_path_factory):
    """`python deploy.py build` with the defaults (DeiT-S, ToMe r=13, OpenVINO f32, batch 1), run
    from a directory that is not the repository."""
    work = tmp_path_factory.mktemp("work")
    result = deploy("build", *FAST, cwd=work)
    assert result.returncode == 0, result.stderr + result.stdout
    directory = work / "builds" / "deit_small_patch16_224-tome-r13-openvino-f32-b1"
    return directory, result.stdout


def test_default_build_writes_every_file(default_build):
    directory, stdout = default_build
    for name in ("manifest.json", "model.onnx", "model.opt.onnx", "model.xml", "model.bin", "report.json", "report.md",
                 "dense/manifest.json", "dense/model.onnx", "dense/model.opt.onnx", "dense/model.xml"):
        assert (directory / name).is_file(), name
    assert "speedup" in stdout and "FLOP ratio" in stdout
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".")]  # no staging left


def test_default_build_report(default_build):
    directory, _ = default_build
    report = json.loads((directory / "report.json").read_text())
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["schedule"]["tokens"] == [197 - 13 * i for i in range(13)]
    assert manifest["build"]["precision"] == "f32"
    for variant in ("dense", "reduced"):
        assert report["parity_vs_torch"][variant]["max_abs"] <= 1e-3  # OpenVINO f32 tolerance
        assert report["parity_vs_torch"][variant]["top1_agreement"] == 1.0
        assert report["latency"][variant]["runs"] >= 10
        assert len(report["latency"][variant]["samples_ms"]) == report["latency"][variant]["runs"]
    assert manifest["checks"]["onnxruntime_vs_torch"]["max_abs"] <= 1e-4
    # analytic FLOPs from the schedule agree with the MatMul/Conv shapes in the exported graphs
    for variant in ("dense", "reduced"):
        assert report["graph_gmacs"][variant] == pytest.approx(report["gmacs"][variant], rel=0.01)
    assert report["flop_ratio"] == pytest.approx(report["gmacs"]["dense"] / report["gmacs"]["reduced"])
    assert report["environment"]["runtime"]["inference_precision_hint"] == "f32"
    assert "random" in report["weights"]


def test_profile_remeasures_without_rebuilding(default_build):
    directory, _ = default_build
    onnx_mtime = (directory / "model.onnx").stat().st_mtime_ns
    result = deploy("profile", str(directory), *FAST)
    assert result.returncode == 0, result.stderr
    assert "speedup" in result.stdout
    assert (directory / "model.onnx").stat().st_mtime_ns == onnx_mtime


def test_load_in_a_device_app_without_torch(default_build):
    """The runtime side imports no torch: block it and run the build on the shipped photos."""
    directory, _ = default_build
    script = f"""
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import json, numpy as np
from vitfold.runtimes import load
from vitfold.images import list_images, load_images
from vitfold.spec import Preprocess
manifest = json.load(open({str(directory / 'manifest.json')!r}))
images = load_images(list_images()[:1], Preprocess.from_json(manifest["preprocess"]))
session = load({str(directory)!r})
out = session(images)["logits"]
ref = np.load({str(directory / 'reference.npy')!r})[:1]
print(float(np.abs(out - ref).max()))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip()) <= 1e-3


def test_wrong_image_shape_is_named(default_build):
    from vitfold.errors import SpecError
    from vitfold.runtimes import load

    session = load(default_build[0])
    with pytest.raises(SpecError, match=r"shape \(2, 3, 224, 224\); this build takes \(1, 3, 224, 224\)"):
        session(np.zeros((2, 3, 224, 224), np.float32))
