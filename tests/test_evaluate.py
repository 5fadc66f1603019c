"""``deploy.py eval``: accuracy of a build and its dense twin on a labeled folder, torch-free.

The labeled folder is generated: augmented copies of the shipped photos, each filed under the class
the dense twin predicts for it, so the dense accuracy is known (100%) and the reduced accuracy must
equal its top-1 agreement with the dense twin."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import deploy
from vitfold.errors import SpecError
from vitfold.evaluate import IMAGENET_CLASSES, bootstrap_interval, class_mapper, nearest_centroid


@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "build"
    result = deploy("build", "--model", "vit_tiny_patch16_224", "--img-size", "96", "--r", "2", "--backend", "onnxruntime",
                    "--out", str(out), "--min-runs", "3", "--min-seconds", "0", cwd=out.parent)
    assert result.returncode == 0, result.stderr + result.stdout
    return out


def augmented(photo: Image.Image):
    """Eight variants of one photo: flips, crops and small rotations."""
    w, h = photo.size
    yield photo
    yield ImageOps.mirror(photo)
    for f in (0.9, 0.75):
        yield photo.crop((int(w * (1 - f) / 2), int(h * (1 - f) / 2), int(w * (1 + f) / 2), int(h * (1 + f) / 2)))
    for angle in (-8, 8):
        yield photo.rotate(angle, resample=Image.Resampling.BICUBIC)
    yield ImageOps.mirror(photo).crop((0, 0, int(w * 0.8), int(h * 0.8)))
    yield photo.crop((int(w * 0.2), int(h * 0.2), w, h))


def labeled_by_dense(build, folder):
    """Write augmented photos under <synset of the dense twin's prediction>/; returns the synsets."""
    from vitfold.artifact import read_manifest
    from vitfold.images import list_images, load_images
    from vitfold.runtimes import load
    from vitfold.spec import Preprocess

    pre = Preprocess.from_json(read_manifest(build)["preprocess"])
    synsets = [line.split("\t")[0] for line in IMAGENET_CLASSES.read_text().splitlines()]
    staging = folder.parent / "staging"
    staging.mkdir()
    n = 0
    for path in list_images(None):
        with Image.open(path) as photo:
            for variant in augmented(photo.convert("RGB")):
                variant.save(staging / f"{n:03d}.png")
                n += 1
    used = []
    with load(build / "dense") as session:
        for image in sorted(staging.iterdir()):
            logits = next(iter(session(load_images([image], pre)).values()))
            target = folder / synsets[int(np.argmax(logits[0]))]
            target.mkdir(parents=True, exist_ok=True)
            image.rename(target / image.name)
            used.append(target.name)
    return used


def test_eval_on_a_folder_labeled_by_the_dense_twin(tiny_build, tmp_path):
    data = tmp_path / "val"
    used = labeled_by_dense(tiny_build, data)
    result = deploy("eval", str(tiny_build), "--data", str(data), cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    report = json.loads((tiny_build / "eval.json").read_text())
    assert report["images"] == len(used) and report["classes"] == len(set(used))
    assert report["dense"]["top1"] == 1.0 and report["dense"]["top5"] == 1.0
    assert report["reduced"]["top1"] == pytest.approx(report["agreement"])
    assert report["drop"]["top1"] == pytest.approx(1.0 - report["agreement"])
    low, high = report["drop"]["interval"]
    assert low <= report["drop"]["top1"] <= high
    with open(tiny_build / "eval_disagreements.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == report["disagreements"] == round((1 - report["agreement"]) * len(used))
    if rows:
        assert all(row["label"] == row["dense"] != row["reduced"] for row in rows)
        assert Image.open(tiny_build / "eval_worst.png").size[0] > 0
    assert "top-1 drop" in result.stdout


def test_folder_names_map_to_imagenet_classes_labels_files_and_id2label(tmp_path):
    imagenet = class_mapper(1000)
    assert imagenet("n01440764") == 0 and imagenet("tench") == 0 and imagenet("Great_White_Shark") == 2
    assert imagenet("417") == 417
    with pytest.raises(SpecError, match="'not-a-class' matches no class of this model .*--labels FILE"):
        imagenet("not-a-class")
    mapping = tmp_path / "synsets.txt"
    mapping.write_text("cats a cat\ndogs\nfrogs tree frog\n")
    custom = class_mapper(3, labels_file=mapping)
    assert [custom(n) for n in ("cats", "dogs", "frogs")] == [0, 1, 2]
    named = class_mapper(3, labels=["tabby cat", "golden retriever", "tree frog"])
    assert named("golden_retriever") == 1 and named("Tree Frog") == 2
    with pytest.raises(SpecError, match="names 3 classes; this model has 2"):
        class_mapper(2, labels_file=mapping)


def test_bad_input_is_one_clear_line(tiny_build, tmp_path):
    data = tmp_path / "val"
    (data / "n01440764").mkdir(parents=True)
    result = deploy("eval", str(tiny_build), "--data", str(data), cwd=tmp_path)
    assert result.returncode == 2 and "holds no image" in result.stderr and len(result.stderr.strip().splitlines()) == 1

    Image.new("RGB", (32, 32)).save(data / "n01440764" / "a.png")
    (data / "unicorns").mkdir()
    Image.new("RGB", (32, 32)).save(data / "unicorns" / "b.png")
    result = deploy("eval", str(tiny_build), "--data", str(data), cwd=tmp_path)
    assert result.returncode == 2 and "'unicorns' matches no class" in result.stderr

    result = deploy("eval", str(tiny_build / "dense"), "--data", str(data), cwd=tmp_path)
    assert result.returncode == 2 and "no dense twin" in result.stderr


def test_nearest_centroid_and_bootstrap():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 16))
    targets = np.repeat(np.arange(3), 5)
    features = centres[targets] + 0.05 * rng.standard_normal((15, 16))
    assert (nearest_centroid(features, targets) == targets).all()
    swapped = features.copy()
    swapped[0] = centres[2]  # one image that looks like class 2
    assert nearest_centroid(swapped, targets)[0] == 2
    a, b = np.ones(50), np.r_[np.ones(40), np.zeros(10)]
    low, high = bootstrap_interval(a, b)
    assert 0 < low < 0.2 < high < 0.4
    assert bootstrap_interval(a, a) == (0.0, 0.0)


def test_eval_of_a_features_build_is_nearest_centroid(tmp_path):
    out = tmp_path / "features"
    result = deploy("build", "--model", "vit_tiny_patch16_224", "--img-size", "64", "--r", "1", "--task", "features",
                    "--backend", "onnxruntime", "--out", str(out), "--min-runs", "3", "--min-seconds", "0", cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    data = tmp_path / "val"
    from vitfold.images import list_images

    for n, path in enumerate(list_images(None)):  # two "classes" of three copies each, any folder names
        for k in range(3):
            target = data / ("left" if n % 2 else "right")
            target.mkdir(parents=True, exist_ok=True)
            with Image.open(path) as photo:
                (ImageOps.mirror(photo) if k else photo).convert("RGB").save(target / f"{n}-{k}.png")
    result = deploy("eval", str(out), "--data", str(data), cwd=tmp_path)
    assert result.returncode == 0, result.stderr + result.stdout
    report = json.loads((out / "eval.json").read_text())
    assert report["metric"].startswith("nearest class centroid") and report["classes"] == 2
    assert report["dense"]["top5"] is None and 0 <= report["reduced"]["top1"] <= 1
