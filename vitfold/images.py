"""Real photographs for parity and fidelity checks, preprocessed with Pillow + numpy (no torch).

The package ships a few public-domain / CC0 photos (``vitfold/data/photos``, sources and licences in
``SOURCES.md`` there) so that every build is checked on real images out of the box; ``--images DIR``
uses the user's own.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from PIL import Image

from .errors import SpecError
from .spec import Preprocess

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
_RESAMPLE = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


def default_photo_dir() -> Path:
    """The photos shipped with the package."""
    return Path(str(resources.files("vitfold") / "data" / "photos"))


def list_images(folder: Optional[Path] = None) -> list[Path]:
    """Image files in ``folder`` (recursively, sorted); the shipped photos when ``folder`` is None.

    Raises:
        SpecError: the folder does not exist or holds no images.
    """
    folder = Path(folder) if folder is not None else default_photo_dir()
    if not folder.is_dir():
        raise SpecError(f"image folder {folder} does not exist")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise SpecError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    return paths


def preprocess_image(image: Image.Image, pre: Preprocess) -> np.ndarray:
    """One PIL image -> ``[3, H, W]`` float32, as timm's eval transform with ``pre``'s settings."""
    image = image.convert("RGB")
    scale = math.floor(pre.img_size / pre.crop_pct)
    w, h = image.size
    if w <= h:
        size = (scale, max(1, round(h * scale / w)))
    else:
        size = (max(1, round(w * scale / h)), scale)
    image = image.resize(size, _RESAMPLE.get(pre.interpolation, Image.Resampling.BICUBIC))
    left = int(round((size[0] - pre.img_size) / 2.0))
    top = int(round((size[1] - pre.img_size) / 2.0))
    image = image.crop((left, top, left + pre.img_size, top + pre.img_size))
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def load_images(paths: Iterable[Path], pre: Preprocess) -> np.ndarray:
    """Load and preprocess ``paths`` into ``[N, 3, H, W]`` float32.

    Raises:
        SpecError: a file is not a readable image.
    """
    arrays = []
    for path in paths:
        try:
            with Image.open(path) as image:
                arrays.append(preprocess_image(image, pre))
        except (OSError, ValueError) as exc:
            raise SpecError(f"cannot read image {path}: {exc}") from exc
    return np.stack(arrays)


def batches(images: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Split ``[N, 3, H, W]`` into ``[batch_size, 3, H, W]`` batches for a static-batch graph; the
    last batch is filled up by cycling through the images again so every image is used."""
    count = max(1, math.ceil(len(images) / batch_size))
    index = np.arange(count * batch_size) % len(images)
    return [images[index[i * batch_size : (i + 1) * batch_size]] for i in range(count)]
