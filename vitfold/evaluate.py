"""Accuracy on a labeled folder: a build and its dense twin through the backend, no torch.

``deploy.py eval BUILD --data DIR`` (or ``python -m vitfold.device eval`` on a device) runs every
image of an ImageFolder layout (one sub-folder per class) through the reduced build and its dense
twin and reports, for both, top-1 / top-5 accuracy, the accuracy drop with a 95% paired bootstrap
interval, top-1 agreement, and the images where the two disagree (``eval_disagreements.csv`` and a
contact sheet of the worst, ``eval_worst.png``).

Class indices come from ``--labels FILE`` (line ``i``: the folder name of class ``i`` first, e.g.
``n01440764 tench``), else from the folder names: a transformers classifier's ``id2label`` (the
manifest's ``labels``), ImageNet synsets or names for a 1000-class head
(:data:`IMAGENET_CLASSES`), or plain class indices. ``--task features`` builds have no head: they
get a nearest-centroid accuracy on their mean-pooled patch features (leave-one-out, cosine), which
says how well the features separate the folder's classes, not what a trained head would score.

Parses as Python 3.8 (the runtime side); imports numpy, Pillow and the backend only.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .artifact import read_manifest
from .errors import SpecError
from .images import IMAGE_SUFFIXES, load_images
from .metrics import softmax
from .spec import Preprocess

IMAGENET_CLASSES = Path(__file__).resolve().parent / "data" / "imagenet_classes.txt"
EVAL_JSON, DISAGREEMENTS_CSV, WORST_PNG = "eval.json", "eval_disagreements.csv", "eval_worst.png"
BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED = 2000, 0


@dataclass(frozen=True)
class LabeledImages:
    """An ImageFolder: ``paths[i]`` belongs to class index ``targets[i]``; ``folders`` maps each
    sub-folder name to its class index."""

    paths: List[Path]
    targets: np.ndarray
    folders: Dict[str, int]


def read_folder(data: Path, class_of: Callable[[str], int]) -> LabeledImages:
    """Scan ``data`` (one sub-folder per class, images inside, sorted) and map folders to classes.

    Raises:
        SpecError: ``data`` is missing or has no class folders, a class folder holds no image, or
            ``class_of`` refuses a folder name.
    """
    data = Path(data)
    if not data.is_dir():
        raise SpecError(f"--data {data} is not a directory; give a folder with one sub-folder of images per class")
    folders = sorted(p for p in data.iterdir() if p.is_dir())
    if not folders:
        raise SpecError(f"--data {data} has no class folders; the layout is DIR/<class>/<image>.jpg (ImageFolder)")
    paths, targets, mapping = [], [], {}
    for folder in folders:
        images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise SpecError(f"class folder {folder} holds no image ({', '.join(sorted(IMAGE_SUFFIXES))}); remove it or add images")
        mapping[folder.name] = class_of(folder.name)
        paths += images
        targets += [mapping[folder.name]] * len(images)
    return LabeledImages(paths, np.asarray(targets, dtype=np.int64), mapping)


def _key(name: str) -> str:
    return re.sub(r"[\s_]+", " ", name.strip().lower())


def class_mapper(num_classes: int, labels: Optional[Sequence[str]] = None,
                 labels_file: Optional[Path] = None) -> Callable[[str], int]:
    """``folder name -> class index`` for a head of ``num_classes``.

    Args:
        labels: the build's class names (a transformers classifier's ``id2label``), if any.
        labels_file: ``--labels``: line ``i`` starts with the folder name of class ``i``.

    Raises (from the returned function):
        SpecError: a folder name that matches no class, naming the rules that were tried.
    """
    table: Dict[str, int] = {}
    how = ""
    if labels_file is not None:
        if not Path(labels_file).is_file():
            raise SpecError(f"--labels {labels_file} does not exist")
        lines = [line.split() for line in Path(labels_file).read_text().splitlines() if line.strip()]
        table = {words[0]: i for i, words in enumerate(lines)}
        how = f"the first word of each line of {labels_file}"
        if len(lines) > num_classes:
            raise SpecError(f"--labels {labels_file} names {len(lines)} classes; this model has {num_classes}")
    elif labels:
        table = {_key(name): i for i, name in enumerate(labels)}
        how = "the build's class names (id2label)"
    elif num_classes == 1000 and IMAGENET_CLASSES.is_file():
        for i, line in enumerate(IMAGENET_CLASSES.read_text().splitlines()):
            synset, _, names = line.partition("\t")
            table[synset] = i
            for name in names.split(","):
                table.setdefault(_key(name), i)
        how = "ImageNet synsets (n01440764) or class names (tench)"

    def class_of(folder: str) -> int:
        for key in (folder, _key(folder)):
            if key in table:
                return table[key]
        if folder.isdigit() and int(folder) < num_classes:
            return int(folder)
        rule = (how + " or " if how else "") + f"class indices 0..{num_classes - 1}"
        raise SpecError(f"class folder {folder!r} matches no class of this model (tried {rule}); "
                        "give --labels FILE with the folder name of class i on line i")

    return class_of


def bootstrap_interval(a: np.ndarray, b: np.ndarray, level: float = 0.95) -> tuple:
    """Percentile bootstrap interval of ``mean(a) - mean(b)`` for paired 0/1 outcomes (the same images
    resampled for both), :data:`BOOTSTRAP_RESAMPLES` resamples, seed :data:`BOOTSTRAP_SEED`."""
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    n = len(a)
    index = rng.integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))
    diffs = a[index].mean(axis=1) - b[index].mean(axis=1)
    tail = (1.0 - level) / 2.0
    return float(np.quantile(diffs, tail)), float(np.quantile(diffs, 1.0 - tail))


def _run(directory: Path, images: List[Path], pre: Preprocess, batch: int,
         progress: Callable[[int], None]) -> np.ndarray:
    from . import runtimes

    outputs = []
    with runtimes.load(directory) as session:
        for start in range(0, len(images), batch):
            chunk = load_images(images[start:start + batch], pre)
            count = len(chunk)
            if count < batch:  # a static batch: pad with copies, drop their outputs
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - count, axis=0)])
            outputs.append(next(iter(session(chunk).values()))[:count])
            progress(count)
    return np.concatenate(outputs)


def nearest_centroid(features: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Leave-one-out nearest class centroid (cosine) on ``[N, C]`` pooled features: each image's
    predicted class, its own feature left out of its class's centroid. Classes with one image are
    predicted from the other centroids only."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True).clip(min=1e-12)
    classes = np.unique(targets)
    sums = np.stack([unit[targets == c].sum(axis=0) for c in classes])  # [K, C]
    counts = np.array([(targets == c).sum() for c in classes], dtype=np.float64)
    predictions = np.empty(len(unit), dtype=np.int64)
    for i, (u, t) in enumerate(zip(unit, targets)):
        own = classes == t
        centroids = sums - own[:, None] * u[None]
        left = counts - own
        scores = np.where(left > 0, (centroids @ u) / np.linalg.norm(centroids, axis=1).clip(min=1e-12), -np.inf)
        predictions[i] = classes[int(np.argmax(scores))]
    return predictions


def evaluate(build_dir: Path, data: Path, labels_file: Optional[Path] = None, worst: int = 12,
             progress: Callable[[int], None] = lambda n: None, cache: Optional[dict] = None) -> dict:
    """Accuracy of a build and its dense twin on ``data``; writes :data:`EVAL_JSON`,
    :data:`DISAGREEMENTS_CSV` and :data:`WORST_PNG` into the build directory.

    Returns:
        ``{"images", "classes", "metric", "dense": {top1, top5}, "reduced": {top1, top5},
        "drop": {top1, interval}, "agreement", "disagreements"}``; accuracies are fractions; ``drop``
        is dense minus reduced top-1 with its 95% paired percentile-bootstrap interval.

    Raises:
        SpecError: bad ``data`` / ``labels_file`` (see :func:`read_folder`, :func:`class_mapper`) or
            a build without its dense twin.

    ``cache``: a dict kept across calls (a sweep) so that a dense twin shared by many builds runs once.
    """
    build_dir = Path(build_dir)
    manifest = read_manifest(build_dir)
    if "dense" not in manifest:
        raise SpecError(f"{build_dir} has no dense twin (manifest key 'dense'); eval compares a reduced build with "
                        "its dense twin: pass the reduced build's directory")
    dense_dir = build_dir / manifest["dense"]
    num_classes = int(manifest.get("dims", {}).get("num_classes", 0))
    headless = manifest.get("task") == "features" or num_classes == 0
    if headless:  # no head: the folders are the classes, in sorted order
        order: Dict[str, int] = {}
        folder = read_folder(data, lambda name: order.setdefault(name, len(order)))
    else:
        folder = read_folder(data, class_mapper(num_classes, manifest.get("labels"), labels_file))
    pre = Preprocess.from_json(manifest["preprocess"])
    batch = int(manifest["spec"].get("batch_size", 1))
    outputs = {}
    for label, where in (("dense", dense_dir), ("reduced", build_dir)):
        key = (str(where.resolve()), str(Path(data).resolve()))
        if cache is not None and key in cache:
            outputs[label] = cache[key]
            continue
        outputs[label] = _run(where, folder.paths, pre, batch, progress)
        if cache is not None and label == "dense":
            cache[key] = outputs[label]
    targets = folder.targets
    result: dict = {"images": len(targets), "classes": len(folder.folders), "data": str(data)}
    if headless:
        pooled = {k: (v.mean(axis=1) if v.ndim == 3 else v) for k, v in outputs.items()}
        predictions = {k: nearest_centroid(v, targets) for k, v in pooled.items()}
        confidence = {k: np.zeros(len(targets)) for k in outputs}
        result["metric"] = "nearest class centroid (leave-one-out, cosine) on mean-pooled features"
        for label in outputs:
            result[label] = {"top1": float((predictions[label] == targets).mean()), "top5": None}
        true_prob = confidence
    else:
        probs = {k: softmax(v) for k, v in outputs.items()}
        predictions = {k: v.argmax(axis=1) for k, v in probs.items()}
        top5 = {k: np.argsort(-v, axis=1)[:, :5] for k, v in probs.items()}
        result["metric"] = "top-1 / top-5 accuracy of the build's logits"
        for label in outputs:
            result[label] = {"top1": float((predictions[label] == targets).mean()),
                             "top5": float((top5[label] == targets[:, None]).any(axis=1).mean())}
        true_prob = {k: v[np.arange(len(targets)), targets] for k, v in probs.items()}
    correct = {k: (predictions[k] == targets).astype(np.float64) for k in outputs}
    low, high = bootstrap_interval(correct["dense"], correct["reduced"])
    result["drop"] = {"top1": result["dense"]["top1"] - result["reduced"]["top1"], "interval": [low, high],
                      "interval_kind": f"95% paired percentile bootstrap, {BOOTSTRAP_RESAMPLES} resamples, seed {BOOTSTRAP_SEED}"}
    result["agreement"] = float((predictions["dense"] == predictions["reduced"]).mean())
    differ = np.flatnonzero(predictions["dense"] != predictions["reduced"])
    order = differ[np.argsort(-(true_prob["dense"][differ] - true_prob["reduced"][differ]), kind="stable")]
    names = _class_names(manifest, folder)
    rows = [{"image": str(folder.paths[i]), "label": names(int(targets[i])), "dense": names(int(predictions["dense"][i])),
             "reduced": names(int(predictions["reduced"][i])), "dense_p_label": float(true_prob["dense"][i]),
             "reduced_p_label": float(true_prob["reduced"][i])} for i in order]
    result["disagreements"] = len(rows)
    with open(build_dir / DISAGREEMENTS_CSV, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "label", "dense", "reduced", "dense_p_label", "reduced_p_label"])
        writer.writeheader()
        writer.writerows(rows)
    result["files"] = {"disagreements": DISAGREEMENTS_CSV}
    if rows:
        contact_sheet(rows[:worst], build_dir / WORST_PNG, pre)
        result["files"]["worst"] = WORST_PNG
    (build_dir / EVAL_JSON).write_text(json.dumps(result, indent=1) + "\n")
    return result


def _class_names(manifest: dict, folder: LabeledImages) -> Callable[[int], str]:
    """Class index -> a readable name: the build's labels, ImageNet's first lemma, or the folder name."""
    labels = manifest.get("labels")
    if not labels and int(manifest.get("dims", {}).get("num_classes", 0)) == 1000 and manifest.get("task") != "features" \
            and IMAGENET_CLASSES.is_file():
        labels = [line.partition("\t")[2].split(",")[0] for line in IMAGENET_CLASSES.read_text().splitlines()]
    if labels:
        return lambda i: labels[i] if 0 <= i < len(labels) else str(i)
    by_index = {i: name for name, i in folder.folders.items()}
    return lambda i: by_index.get(i, str(i))


def contact_sheet(rows: List[dict], path: Path, pre: Preprocess, thumb: int = 160) -> Path:
    """A PNG grid of the images in ``rows`` (at most 4 per row), each captioned with the label and
    the dense and reduced predictions (Pillow's default font)."""
    from PIL import Image, ImageDraw

    columns = min(4, len(rows))
    lines = 3
    cell_h = thumb + 12 * lines + 6
    sheet = Image.new("RGB", (columns * thumb, math.ceil(len(rows) / columns) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for n, row in enumerate(rows):
        x, y = (n % columns) * thumb, (n // columns) * cell_h
        with Image.open(row["image"]) as image:
            image = image.convert("RGB")
            image.thumbnail((thumb, thumb))
            sheet.paste(image, (x + (thumb - image.width) // 2, y))
        for k, text in enumerate((f"label: {row['label']}", f"dense: {row['dense']}", f"reduced: {row['reduced']}")):
            draw.text((x + 3, y + thumb + 2 + 12 * k), text[:26], fill="black")
    sheet.save(path)
    return path
