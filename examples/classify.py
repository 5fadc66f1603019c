#!/usr/bin/env python3
"""Classify photos with a vitfold build, as a device app would: no torch, no timm, no onnx.

Needs numpy, Pillow, the build's backend (openvino or onnxruntime) and the ``vitfold`` package
(``pip install --no-deps .``). Images are prepared the way the build's manifest says (resize the
short side, centre crop, mean / std from timm's ``pretrained_cfg``)::

    python examples/classify.py builds/deit_small_patch16_224-tome-r13-openvino-f32-b1 cat.jpg photos/
    python examples/classify.py builds/<name> --dense          # the dense twin of the same build

With no image given it classifies the photos shipped with vitfold. A build from a transformers
classifier (``--model hf:DIR``) prints its own class names (``id2label``, kept in the manifest's
``labels``). Otherwise a 1000-class model prints ImageNet class names (``vitfold/data/imagenet_classes.txt``: synset id and WordNet lemmas per
class index, written out from timm's ``ImageNetInfo``); other models print class indices. A build
with random weights gets a warning on stderr (its class names mean nothing); a build that outputs
features / embeddings (a headless model, ``--task features``) is refused with exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from vitfold.artifact import read_manifest
from vitfold.errors import VitfoldError
from vitfold.evaluate import IMAGENET_CLASSES
from vitfold.metrics import softmax
from vitfold.images import IMAGE_SUFFIXES, batches, list_images, load_images
from vitfold.runtimes import load
from vitfold.spec import Preprocess

NAMES = IMAGENET_CLASSES


def class_names(num_classes: int, path: Path = NAMES) -> Optional[list[str]]:
    """ImageNet-1k names (``synset<TAB>names`` per line, class index = line number) for a
    1000-class head; None for any other head size or when the file is absent."""
    if num_classes != 1000 or not path.is_file():
        return None
    names = [line.split("\t", 1)[-1].strip() for line in path.read_text().splitlines() if line.strip()]
    return names if len(names) == 1000 else None


def image_paths(items: list[str]) -> list[Path]:
    """Files as given and the images inside folders; the shipped photos when ``items`` is empty."""
    if not items:
        return list_images()
    paths: list[Path] = []
    for item in map(Path, items):
        if item.is_dir():
            paths += list_images(item)
        elif item.is_file() and item.suffix.lower() in IMAGE_SUFFIXES:
            paths.append(item)
        else:
            raise VitfoldError(f"{item} is not an image file ({', '.join(sorted(IMAGE_SUFFIXES))}) or a folder")
    return paths


def output_shape(build: Path, manifest: dict) -> Optional[list[int]]:
    """The shape of the build's output for one input batch, read off its saved reference outputs."""
    name = manifest.get("files", {}).get("reference")
    if name is None:
        return None
    reference = np.load(build / name, mmap_mode="r")  # [images, ...] over all check batches
    return [manifest["input"]["shape"][0], *reference.shape[1:]]


def not_class_scores(build: Path, manifest: dict) -> Optional[str]:
    """Why the build's output is not class scores (one line), or None when it is a head's logits.

    A headless model (``dims.num_classes`` 0, output ``features``) gives an embedding per image;
    ``--task features`` gives the patch grid. Neither has classes to rank.
    """
    name = manifest["outputs"][0]
    if name == "logits" and manifest.get("dims", {}).get("num_classes") != 0:
        return None
    shape = output_shape(build, manifest)
    what = f"'{name}', shape {shape}" if shape else f"'{name}'"
    if manifest.get("task") == "features":
        fix = "it was built with --task features (the patch grid, for dense prediction); build with --task classify for class scores"
    else:
        fix = "its model has no classifier head (num_classes 0); use the embeddings as they are, or build a model that has a head"
    return f"{build} outputs image features / embeddings ({what}), not class scores: {fix}"


def random_weights_warning(manifest: dict) -> Optional[str]:
    """A warning line for a build made with random weights, whose class names mean nothing."""
    if not str(manifest.get("weights", "")).startswith("random"):
        return None
    return "warning: this build has random weights (built without --pretrained or --checkpoint): its class names mean nothing"


def classify(build: Path, paths: list[Path], top: int = 5) -> tuple[list[tuple[Path, list[tuple[int, float]]]], int]:
    """Top-``top`` ``(class index, probability)`` per image with the build in ``build``, and the
    number of classes of its head.

    Raises:
        ArtifactError: not a (complete, compatible) build directory.
        BackendUnavailable: the build's backend is not installed here.
        VitfoldError: the build outputs features / embeddings, not class logits.
    """
    manifest = read_manifest(build)
    problem = not_class_scores(build, manifest)
    if problem:
        raise VitfoldError(problem)
    pre = Preprocess.from_json(manifest["preprocess"])
    images = load_images(paths, pre)  # [N, 3, H, W] float32
    with load(build) as session:
        batch_size = session.input_shape[0]
        logits = np.concatenate([session(b)[session.output_names[0]] for b in batches(images, batch_size)])[: len(paths)]
    probs = softmax(logits)
    order = np.argsort(-probs, axis=1)[:, :top]
    return [(path, [(int(k), float(probs[i, k])) for k in order[i]]) for i, path in enumerate(paths)], probs.shape[1]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Top-5 classes of photos with a vitfold build (no torch).")
    parser.add_argument("build", type=Path, help="build directory (holds manifest.json)")
    parser.add_argument("images", nargs="*", help="image files or folders (default: the photos shipped with vitfold)")
    parser.add_argument("--top", type=int, default=5, help="classes to print per image (default: 5)")
    parser.add_argument("--dense", action="store_true", help="use the build's dense twin instead of the reduced model")
    args = parser.parse_intermixed_args(argv)
    try:
        build = args.build
        if args.dense:
            build = build / read_manifest(build).get("dense", "dense")
        results, num_classes = classify(build, image_paths(args.images), args.top)
    except VitfoldError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    warning = random_weights_warning(read_manifest(build))
    if warning:
        print(warning, file=sys.stderr)
    names = read_manifest(build).get("labels") or class_names(num_classes)
    for path, top in results:
        print(path.name)
        for index, prob in top:
            label = names[index] if names else f"class {index}"
            print(f"  {prob:6.1%}  {index:4d}  {label}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
