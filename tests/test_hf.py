"""Hugging Face transformers checkpoints (``--model hf:DIR``): tiny models of every covered family,
built from configs with random weights and saved with ``save_pretrained`` (offline), converted to
timm and checked against transformers; the real DINOv2 directory against the timm file beside it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import deploy

transformers = pytest.importorskip("transformers", reason="the [hf] extra (transformers) is not installed")

import torch  # noqa: E402

from vitfold.errors import SpecError  # noqa: E402
from vitfold.export.hf import PARITY_MAX_ABS  # noqa: E402
from vitfold.export.models import create_model  # noqa: E402
from vitfold.spec import ModelSpec  # noqa: E402

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
LABELS = {0: "tabby cat", 1: "golden retriever", 2: "tree frog"}


def _config(family: str):
    t = transformers
    if family in ("vit", "vit-classifier"):
        return t.ViTConfig(**SMALL, intermediate_size=64, num_labels=3, id2label=LABELS,
                           label2id={v: k for k, v in LABELS.items()})
    if family.startswith("deit"):
        return t.DeiTConfig(**SMALL, intermediate_size=64, num_labels=3)
    if family == "dinov2":
        return t.Dinov2Config(**{**SMALL, "patch_size": 4}, mlp_ratio=2, layerscale_value=0.5)
    if family == "clip":
        return t.CLIPVisionConfig(**SMALL, intermediate_size=64)
    if family == "siglip":
        return t.SiglipVisionConfig(**SMALL, intermediate_size=64)
    raise KeyError(family)


MODELS = {
    "vit-classifier": ("ViTForImageClassification", "ViTImageProcessor"),
    "vit": ("ViTModel", "ViTImageProcessor"),
    "deit-teacher": ("DeiTForImageClassificationWithTeacher", "DeiTImageProcessor"),
    "deit-classifier": ("DeiTForImageClassification", "DeiTImageProcessor"),
    "dinov2": ("Dinov2Model", "BitImageProcessor"),
    "clip": ("CLIPVisionModel", "CLIPImageProcessor"),
    "siglip": ("SiglipVisionModel", "SiglipImageProcessor"),
}


def save_tiny(family: str, directory, seed: int = 0):
    """A random-weight transformers model of ``family`` saved as a save_pretrained directory; returns it."""
    architecture, processor = MODELS[family]
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(_config(family)).eval()
    with torch.no_grad():  # random LayerNorm / layer-scale parameters, so that a swapped key shows
        for name, p in model.named_parameters():
            if "norm" in name or "lambda" in name or "cls_token" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(directory)
    size = {"shortest_edge": 36} if processor in ("BitImageProcessor", "CLIPImageProcessor", "DeiTImageProcessor") \
        else {"height": 32, "width": 32}
    extra = {"crop_size": {"height": 32, "width": 32}} if "shortest_edge" in size else {}
    getattr(transformers, processor)(size=size, **extra).save_pretrained(directory)
    return model


@pytest.mark.parametrize("family", list(MODELS))
def test_conversion_matches_transformers(family, tmp_path):
    hf = save_tiny(family, tmp_path / family)
    model, pre = create_model(ModelSpec(f"hf:{tmp_path / family}"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        if MODELS[family][0].endswith(("Classification", "WithTeacher")):
            assert torch.allclose(model(x), hf(pixel_values=x).logits, atol=PARITY_MAX_ABS, rtol=0)
        want = getattr(hf, hf.base_model_prefix, hf)(pixel_values=x).last_hidden_state
        if family == "clip":
            want = hf.post_layernorm(want)
    assert (tokens - want).abs().max() <= PARITY_MAX_ABS
    assert pre.img_size == 32
    if family == "siglip":
        assert model.num_prefix_tokens == 0 and pre.resize == "squash"
    if family.startswith("deit"):
        assert model.num_prefix_tokens == 2
    if family == "dinov2":
        assert pre.resize == "shortest" and pre.crop_pct == pytest.approx(32 / 36)
    names = model.pretrained_cfg["label_names"]
    assert names == (list(LABELS.values()) if family == "vit-classifier" else None)


def test_a_bad_conversion_is_an_error_not_a_warning(tmp_path, monkeypatch):
    """Swap two blocks' norms in the mapping: the check on the photos must refuse the model."""
    from vitfold.export import hf as hf_module

    save_tiny("vit-classifier", tmp_path / "m")
    mapped = hf_module._map_state

    def swapped(state):
        out = mapped(state)
        out["blocks.0.norm1.weight"], out["blocks.1.norm1.weight"] = out["blocks.1.norm1.weight"], out["blocks.0.norm1.weight"]
        return out

    monkeypatch.setattr(hf_module, "_map_state", swapped)
    with pytest.raises(SpecError, match="differs from transformers on the photos"):
        create_model(ModelSpec(f"hf:{tmp_path / 'm'}"))


def test_bad_input_is_one_clear_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = deploy("build", "--model", f"hf:{empty}", "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert result.returncode == 2 and "no config.json" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()

    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(SpecError, match="BertModel is not covered; vitfold converts ViTForImageClassification"):
        create_model(ModelSpec(f"hf:{other}"))

    wrong = tmp_path / "wrong"
    save_tiny("vit", wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "hidden_size": 48}))
    with pytest.raises(SpecError, match="weights"):
        create_model(ModelSpec(f"hf:{wrong}"))

    with pytest.raises(SpecError, match="--checkpoint is for timm names"):
        create_model(ModelSpec(f"hf:{wrong}", checkpoint="x.safetensors"))


def test_a_hub_id_without_the_hub_says_to_save_a_directory(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(SpecError, match="save_pretrained and pass hf:DIR"):
        create_model(ModelSpec("hf:facebook/dinov2-small", pretrained=True))


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_classifier_end_to_end_names_its_classes(backend, tmp_path):
    """A ViTForImageClassification directory through build, ToMe r=2, with its id2label in the manifest
    and in examples/classify.py."""
    import subprocess
    import sys

    from conftest import REPO

    save_tiny("vit-classifier", tmp_path / "my-vit")
    out = tmp_path / "build"
    result = deploy("build", "--model", f"hf:{tmp_path / 'my-vit'}", "--r", "2", "--backend", backend, "--out", str(out),
                    "--min-runs", "3", "--min-seconds", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["labels"] == list(LABELS.values()) and manifest["weights"].startswith("transformers ")
    assert manifest["checks"]["backend_vs_torch"]["max_abs"] <= manifest["checks"]["tolerance"]["max_abs"]
    assert json.loads((out / "dense" / "manifest.json").read_text())["schedule"]["tokens"][0] == 17
    shown = subprocess.run([sys.executable, str(REPO / "examples" / "classify.py"), str(out), "--top", "1"],
                           capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    assert any(name in shown.stdout for name in LABELS.values())


@pytest.mark.parametrize("family", ["siglip", "clip"])
def test_feature_models_end_to_end(family, tmp_path):
    save_tiny(family, tmp_path / family)
    out = tmp_path / "build"
    result = deploy("build", "--model", f"hf:{tmp_path / family}", "--task", "features", "--r", "2", "--backend",
                    "onnxruntime", "--out", str(out), "--min-runs", "3", "--min-seconds", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    reference = np.load(out / "reference.npy")
    assert reference.shape[1:] == (16, 32)  # the full 4x4 patch grid, prefix tokens dropped


def _dinov2_hf(dinov2_path):
    directory = dinov2_path.parent / "dinov2_vits14_224_hf"
    if not (directory / "config.json").is_file():
        pytest.skip(f"the transformers DINOv2 directory is not at {directory}")
    return directory


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_dinov2_transformers_route_equals_the_timm_route(backend, dinov2_path, tmp_path):
    """Same weights, two routes: the save_pretrained directory through hf: and the timm file through
    --checkpoint give the same features, dense and with ToMe r=8, on both CPU backends (max abs <= 1e-4)."""
    directory = _dinov2_hf(dinov2_path)
    outs = {}
    for route, args in (("hf", ["--model", f"hf:{directory}"]),
                        ("timm", ["--model", "vit_small_patch14_dinov2", "--img-size", "224", "--checkpoint", str(dinov2_path)])):
        outs[route] = tmp_path / route
        result = deploy("build", *args, "--task", "features", "--r", "8", "--backend", backend, "--out", str(outs[route]),
                        "--min-runs", "3", "--min-seconds", "0", cwd=tmp_path)
        assert result.returncode == 0, result.stderr + result.stdout
    from vitfold.images import list_images, load_images
    from vitfold.runtimes import load
    from vitfold.spec import Preprocess

    for variant in ("dense", "."):
        manifests = {r: json.loads((outs[r] / variant / "manifest.json").read_text()) for r in outs}
        # The routes prepare photos differently (the directory's processor crops 256 -> 224, timm's
        # DINOv2 config does not crop), so both get the same tensors here.
        images = load_images(list_images(None), Preprocess.from_json(manifests["hf"]["preprocess"]))
        got = {}
        for route in outs:
            with load(outs[route] / variant) as session:
                got[route] = np.concatenate([next(iter(session(images[i:i + 1]).values())) for i in range(len(images))])
        assert got["hf"].shape == got["timm"].shape == (len(images), 256, 384)
        assert np.abs(got["hf"] - got["timm"]).max() <= 1e-4


@pytest.mark.parametrize("family", ["dinov2", "vit"])
def test_another_image_size_uses_the_position_table_transformers_interpolates(family, tmp_path):
    """The hub's DINOv2 is stored at 518 px; at another --img-size the converted model takes the
    table transformers itself interpolates, and the check (against transformers at that size) passes."""
    hf = save_tiny(family, tmp_path / family)
    model, pre = create_model(ModelSpec(f"hf:{tmp_path / family}", img_size=48))
    assert pre.img_size == 48 and model.patch_embed.num_patches == (48 // hf.config.patch_size) ** 2
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        kwargs = {} if family == "dinov2" else {"interpolate_pos_encoding": True}
        want = hf(pixel_values=x, **kwargs).last_hidden_state
        assert (model.forward_features(x) - want).abs().max() <= PARITY_MAX_ABS
