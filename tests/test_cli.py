"""Bad input: exit code 2, one line naming the problem and the fix; nothing half-written."""

from __future__ import annotations

import json
import sys

import numpy as np

import pytest
import torch

from conftest import deploy
from vitfold.errors import BackendUnavailable, SpecError




def test_unknown_model_has_close_matches():
    result = deploy("build", "--model", "deit_smal_patch16_224")
    assert result.returncode == 2
    assert "unknown timm model 'deit_smal_patch16_224'" in result.stderr and "deit_small_patch16_224" in result.stderr


def test_non_vit_is_refused_by_name():
    result = deploy("build", "--model", "resnet50")
    assert result.returncode == 2 and "resnet50 is a ResNet, not a timm VisionTransformer" in result.stderr


def test_r_too_large_names_the_block():
    result = deploy("build", "--r", "0,0,197")
    assert result.returncode == 2 and "block 2: r=197 asks to merge more tokens than the block has" in result.stderr


def test_corrupt_and_mismatched_checkpoints(tmp_path):
    from vitfold.export.models import create_model
    from vitfold.spec import ModelSpec

    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    with pytest.raises(SpecError, match="corrupt"):
        create_model(ModelSpec("vit_tiny_patch16_224", checkpoint=str(corrupt)))
    state = torch.nn.Linear(2, 2).state_dict()
    torch.save({"model": state}, tmp_path / "other.pth")
    with pytest.raises(SpecError, match=r"missing keys: blocks\..*unexpected keys: bias, weight"):
        create_model(ModelSpec("vit_tiny_patch16_224", checkpoint=str(tmp_path / "other.pth")))


def test_bad_image_size():
    from vitfold.export.models import create_model
    from vitfold.spec import ModelSpec

    with pytest.raises(SpecError, match="image size 100 is not a multiple of .* patch size 16"):
        create_model(ModelSpec("vit_tiny_patch16_224", img_size=100))


def test_missing_backend_package(monkeypatch):
    from vitfold.runtimes import require

    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(BackendUnavailable, match="pip install"):
        require("openvino", 'pip install "vitfold[openvino]"')


def test_onnxruntime_build_with_checkpoint_and_batch(tmp_path):
    """--backend onnxruntime, --batch 2, --checkpoint .pth, --out: a small ViT end to end."""
    import timm

    torch.manual_seed(1)
    model = timm.create_model("vit_tiny_patch16_224", img_size=96, num_classes=7)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    out = tmp_path / "custom"
    result = deploy("build", "--model", "vit_tiny_patch16_224", "--img-size", "96", "--r", "2", "--backend", "onnxruntime",
                    "--batch", "2", "--checkpoint", str(tmp_path / "w.pth"), "--out", str(out),
                    "--min-runs", "5", "--min-seconds", "0.1")
    assert result.returncode == 0, result.stderr + result.stdout
    assert (out / "model.ort.onnx").is_file() and (out / "dense" / "model.ort.onnx").is_file()
    from vitfold.runtimes import load

    session = load(out)
    assert session.input_shape == (2, 3, 96, 96) and session.output_names == ["logits"]
    import json

    report = json.loads((out / "report.json").read_text())
    assert report["parity_vs_torch"]["reduced"]["max_abs"] <= 1e-4
    assert report["weights"].startswith("checkpoint")


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    from vitfold import build as build_module
    from vitfold.build import BuildRequest
    from vitfold.profiles.report import LatencyOptions
    from vitfold.runtimes import BuildConfig
    from vitfold.spec import ModelSpec

    calls = []

    def interrupt(*args, **kwargs):
        calls.append(args)
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module.runtimes, "build", interrupt)
    out = tmp_path / "builds" / "x"
    request = BuildRequest(ModelSpec("vit_tiny_patch16_224", img_size=64), "tome", {"r": 1},
                           BuildConfig("onnxruntime"), out=out, latency=LatencyOptions(min_runs=3, min_seconds=0))
    with pytest.raises(KeyboardInterrupt):
        build_module.build(request, log=lambda m: None)
    assert calls and not out.exists()
    assert list((tmp_path / "builds").iterdir()) == []


def test_method_parameters_are_checked_per_method():
    result = deploy("build", "--method", "evit", "--r", "8")
    assert result.returncode == 2 and "takes no parameter r" in result.stderr and "keep_rate" in result.stderr
    result = deploy("build", "--method", "evt")
    assert result.returncode == 2 and "Did you mean: evit" in result.stderr


def test_pruned_features_build(tmp_path):
    """EViT with --task features: the full patch grid comes back, checked against torch and profiled."""
    out = tmp_path / "feat"
    result = deploy("build", "--model", "vit_tiny_patch16_224", "--img-size", "96", "--method", "evit", "--keep", "0.5",
                    "--locations", "3,6", "--task", "features", "--backend", "onnxruntime", "--out", str(out),
                    "--min-runs", "3", "--min-seconds", "0")
    assert result.returncode == 0, result.stderr + result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["outputs"] == ["features"] and manifest["task"] == "features"
    assert manifest["schedule"]["tokens"][-1] < manifest["schedule"]["tokens"][0]
    assert np.load(out / "reference.npy").shape[1:] == (36, 192)  # 6x6 patches of ViT-Ti
    report = json.loads((out / "report.json").read_text())
    fidelity = report["fidelity_vs_dense"]
    assert fidelity["top1_agreement"] is None and -1.0 <= fidelity["token_cosine_min"] <= fidelity["token_cosine_mean"] <= 1.0
    assert "per-token cosine" in (out / "report.md").read_text()
