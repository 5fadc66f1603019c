"""The device-app example without torch, and bad build directories / backends named clearly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, deploy
from test_per_layer import tiny_build

EXAMPLE = REPO / "examples" / "classify.py"
#: What a device does not have: any import of these raises ImportError in the subprocess.
BLOCKED = ("torch", "torchvision", "timm", "onnx", "onnx_graphsurgeon", "onnxscript")


def run_without_torch(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python examples/classify.py ARGS`` in a fresh interpreter where torch & co cannot be imported."""
    code = (
        "import runpy, sys\n"
        f"for name in {BLOCKED!r}:\n"
        "    sys.modules[name] = None\n"
        f"sys.argv = [{str(EXAMPLE)!r}, *{list(args)!r}]\n"
        f"runpy.run_path({str(EXAMPLE)!r}, run_name='__main__')\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def imagenet_build(tmp_path_factory) -> Path:
    """A tiny ViT with a 1000-class head (ImageNet names apply), ToMe, OpenVINO."""
    return tiny_build(tmp_path_factory.mktemp("example") / "tiny1k", "openvino", num_classes=1000)


def _top5_from(logits: np.ndarray) -> list[list[int]]:
    return [list(np.argsort(-row)[:5]) for row in logits]


def test_example_prints_the_builds_top5_without_torch(imagenet_build):
    from vitfold.images import list_images

    result = run_without_torch(str(imagenet_build))
    assert result.returncode == 0, result.stderr
    names = [line.split("\t")[1] for line in (REPO / "vitfold" / "data" / "imagenet_classes.txt").read_text().splitlines()]
    # the torch model's outputs on the same photos, saved at build time, give the expected classes
    expected = _top5_from(np.load(imagenet_build / "reference.npy"))
    lines = result.stdout.splitlines()
    photos = [p.name for p in list_images()]
    for i, photo in enumerate(photos):
        at = lines.index(photo)
        printed = [int(line.split()[1]) for line in lines[at + 1 : at + 6]]
        assert printed == expected[i], photo
        assert lines[at + 1].split(None, 2)[2] == names[expected[i][0]]


def test_example_on_one_file_and_the_dense_twin(imagenet_build):
    photo = REPO / "vitfold" / "data" / "photos" / "coffee.jpg"
    result = run_without_torch(str(imagenet_build), "--dense", str(photo), "--top", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "coffee.jpg" and len(lines) == 4
    from vitfold.images import list_images

    index = [p.name for p in list_images()].index("coffee.jpg")
    expected = _top5_from(np.load(imagenet_build / "dense" / "reference.npy"))[index][:3]
    assert [int(line.split()[1]) for line in lines[1:]] == expected


def test_class_names_only_for_imagenet_heads():
    import runpy

    example = runpy.run_path(str(EXAMPLE))
    assert example["class_names"](10) is None
    names = example["class_names"](1000)
    assert len(names) == 1000 and names[281] == "tabby, tabby cat"


# ------------------------------------------------------------------------------------ bad input


def test_directory_without_manifest(tmp_path):
    result = deploy("profile", str(tmp_path))
    assert result.returncode == 2
    assert f"{tmp_path} is not a vitfold build: no manifest.json" in result.stderr and "deploy.py build" in result.stderr
    result = run_without_torch(str(tmp_path))
    assert result.returncode == 2 and "no manifest.json" in result.stderr and "Traceback" not in result.stderr


def test_build_from_another_vitfold_version(imagenet_build, tmp_path):
    other = tmp_path / "old"
    shutil.copytree(imagenet_build, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest.update(schema=99, vitfold_version="9.9.0")
    (other / "manifest.json").write_text(json.dumps(manifest))
    for result in (deploy("profile", str(other)), run_without_torch(str(other))):
        assert result.returncode == 2, result.stderr
        assert "manifest schema 99 (vitfold 9.9.0)" in result.stderr and "Rebuild it" in result.stderr


def test_backend_missing_on_this_machine(imagenet_build, tmp_path):
    """openvino shadowed by a package that fails to import, as on a machine without it."""
    fake = tmp_path / "site" / "openvino"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named openvino (test shadow)')\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path / "site")}
    result = run_without_torch(str(imagenet_build), env=env)
    assert result.returncode == 2 and "backend package 'openvino' is not installed here" in result.stderr
    assert "pip install" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([sys.executable, str(REPO / "deploy.py"), "curve", "--model", "test_vit", "--backend", "openvino"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2 and "'openvino' is not installed here" in result.stderr and "pip install" in result.stderr


# ------------------------------------------------------------------- what the build's output means


def _edited_copy(build: Path, to: Path, **changes) -> Path:
    """A copy of ``build`` whose manifest has ``changes`` (``dims`` entries merged)."""
    shutil.copytree(build, to)
    manifest = json.loads((to / "manifest.json").read_text())
    manifest["dims"].update(changes.pop("dims", {}))
    manifest.update(changes)
    (to / "manifest.json").write_text(json.dumps(manifest))
    return to


def test_random_weights_are_named_in_one_warning(imagenet_build, tmp_path):
    photo = str(REPO / "vitfold" / "data" / "photos" / "coffee.jpg")
    result = run_without_torch(str(imagenet_build), photo)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "random weights" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning:") and "mean nothing" in warnings[0], result.stderr
    assert result.stdout.splitlines()[0] == "coffee.jpg"
    trained = _edited_copy(imagenet_build, tmp_path / "trained", weights="timm pretrained")
    result = run_without_torch(str(trained), photo)
    assert result.returncode == 0 and "random weights" not in result.stderr, result.stderr


@pytest.fixture(scope="module")
def headless_build(tmp_path_factory) -> Path:
    """The tiny ViT without a head (``num_classes=0``) built with the default task, classify: its
    output is a 64-wide embedding per image."""
    return tiny_build(tmp_path_factory.mktemp("example") / "headless", "openvino", num_classes=0)


def test_headless_build_is_refused_naming_its_embedding(headless_build, tmp_path):
    manifest = json.loads((headless_build / "manifest.json").read_text())
    assert manifest["task"] == "classify" and manifest["dims"]["num_classes"] == 0
    result = run_without_torch(str(headless_build))
    assert result.returncode == 2 and result.stdout == "", result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "features / embeddings ('features', shape [1, 64]), not class scores" in lines[0]
    assert "no classifier head" in lines[0] and "--task classify" not in lines[0]  # it was built so already
    # a --task features build (the patch grid) is told to build with --task classify
    features = _edited_copy(headless_build, tmp_path / "features", task="features")
    result = run_without_torch(str(features))
    assert result.returncode == 2 and "built with --task features" in result.stderr and "--task classify" in result.stderr


def test_logits_of_a_zero_class_head_are_not_ranked(imagenet_build, tmp_path):
    """A manifest saying ``num_classes`` 0 is believed even when the output is called logits."""
    zero = _edited_copy(imagenet_build, tmp_path / "zero", dims={"num_classes": 0})
    result = run_without_torch(str(zero))
    assert result.returncode == 2 and result.stdout == "", result.stdout
    assert "not class scores" in result.stderr and "shape [1, 1000]" in result.stderr
