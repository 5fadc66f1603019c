"""Calibration images for post-training quantization: a folder through the build's own preprocessing.

One folder (``--calibrate DIR``) serves both calibrations a build may need: the capacity of a
data-dependent gate (:mod:`vitfold.capacity`) and the activation ranges of an int8 build. Without a
folder the check photos shipped with vitfold are used, with a warning: ranges taken on seven photos
fit those photos, not the images a deployment sees. No torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import SpecError
from ..images import batches, list_images, load_images
from ..spec import Preprocess

#: Fewer images than this and the activation ranges are a guess; the build is refused.
MIN_IMAGES = 5
#: Default number of images drawn (NNCF's own default subset is 300; DeiT-S calibrates in ~1 s per 10).
DEFAULT_SUBSET = 128
SEED = 0


@dataclass(frozen=True)
class Calibration:
    """Calibration data for one build.

    Attributes:
        batches: ``[B, 3, H, W]`` float32 batches at the build's batch size (the last one filled up
            by cycling through the images, so every batch has the static shape of the export).
        source: the folder, or ``"check photos"``.
        images: how many distinct images were drawn.
        subset / seed: the requested subset size and the seed of the draw.
    """

    batches: list
    source: str
    images: int
    subset: int
    seed: int

    def to_json(self) -> dict:
        return {"source": self.source, "images": self.images, "subset": self.subset, "seed": self.seed}


def load_calibration(folder: Optional[Path], pre: Preprocess, batch_size: int, *, subset: int = DEFAULT_SUBSET,
                     seed: int = SEED, warn=print) -> Calibration:
    """Draw up to ``subset`` images from ``folder`` (recursively; a seeded draw without replacement
    when there are more) and preprocess them as the build's check photos are.

    Raises:
        SpecError: the folder does not exist, holds no images, or fewer than :data:`MIN_IMAGES`;
            ``subset`` below :data:`MIN_IMAGES`.
    """
    if subset < MIN_IMAGES:
        raise SpecError(f"--calibration-size {subset} is below {MIN_IMAGES}; calibrate on at least {MIN_IMAGES} images")
    if folder is None:
        warn("note: int8 calibration on the 7 shipped check photos; calibrate on your own images with "
             "--calibrate DIR (a few hundred like those the model will see) for ranges that fit your data")
        paths, source = list_images(None), "check photos"
    else:
        try:
            paths = list_images(folder)
        except SpecError as exc:
            raise SpecError(f"--calibrate: {exc}; give a folder of photos like those the model will see") from exc
        source = str(folder)
    if len(paths) < MIN_IMAGES:
        raise SpecError(f"--calibrate {folder}: {len(paths)} images, at least {MIN_IMAGES} are needed to calibrate "
                        f"int8 ranges; add images like those the model will see")
    if len(paths) > subset:
        rng = np.random.default_rng(seed)
        paths = [paths[i] for i in sorted(rng.choice(len(paths), size=subset, replace=False))]
    return Calibration(batches(load_images(paths, pre), batch_size), source, len(paths), subset, seed)


def timing_calibration(sample: np.ndarray) -> Calibration:
    """A one-batch calibration on ``sample`` for graphs that are only timed (latency curves, the
    planner's cost model): int8 kernels run at the same speed whatever the ranges, so an int8 curve
    needs a quantized graph, not well-fitted ranges. Never for a build that is checked or shipped."""
    return Calibration([sample], "synthetic (timing only)", 1, 1, SEED)
