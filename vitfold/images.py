"""Real photographs for parity and fidelity checks, preprocessed with Pillow + numpy (no torch).

The package ships a few public-domain / CC0 photos (``vitfold/data/photos``, sources and licences in
``SOURCES.md`` there) so that every build is checked on real images out of the box; ``--images DIR``
uses the user's own.
"""

from __future__ import annotations

import math
import struct
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
    return Path(__file__).resolve().parent / "data" / "photos"  # installed as files (importlib.resources.files is 3.9+)


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
    """One PIL image -> ``[3, H, W]`` float32, as timm's eval transform with ``pre``'s settings.

    8-bit images (RGB, L, RGBA, CMYK, ...) go through ``convert("RGB")``, a resize of the 8-bit image
    and ``/ 255``, exactly as timm does. Grayscale images of more than 8 bits are scaled, never
    clipped, to [0, 1] (:func:`_gray_plane`) and resized as 32-bit floats (:func:`_resize_clipped`);
    the one plane is used for R, G and B, as ``L -> RGB`` does. Palette images go through RGBA to
    RGB (Pillow's advice for palettes with transparency); transparent pixels keep their colour, as
    for RGBA.

    16-bit colour PNGs and TIFFs cannot be read losslessly: Pillow 13 opens them as 8-bit RGB / RGBA
    keeping the high byte of each sample, which is within 1/257 of the 16-bit value (no saturation).

    Raises:
        ValueError: a 32-bit integer image whose bit depth the file does not state.
    """
    plane = _gray_plane(image)
    if plane is None:
        if image.mode in ("P", "PA"):
            image = image.convert("RGBA")
        size, box = _resize_geometry(image.size, pre)
        rgb = image.convert("RGB").resize(size, _resample(pre)).crop(box)
        array = np.asarray(rgb, dtype=np.float32) / 255.0
    else:
        size, box = _resize_geometry(plane.size, pre)
        gray = np.asarray(_resize_clipped(plane, size, _resample(pre)).crop(box), dtype=np.float32)
        array = np.repeat(gray[:, :, None], 3, axis=2)
    array = (array - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def _resample(pre: Preprocess) -> Image.Resampling:
    return _RESAMPLE.get(pre.interpolation, Image.Resampling.BICUBIC)


def _resize_geometry(image_size: tuple[int, int], pre: Preprocess) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """The size that makes the short side ``img_size / crop_pct``, and the centred ``img_size`` crop box
    (``resize="squash"``: ``img_size`` x ``img_size`` whatever the aspect ratio, and no crop)."""
    if pre.resize == "squash":
        return (pre.img_size, pre.img_size), (0, 0, pre.img_size, pre.img_size)
    scale = math.floor(pre.img_size / pre.crop_pct)
    w, h = image_size
    if w <= h:
        size = (scale, max(1, round(h * scale / w)))
    else:
        size = (max(1, round(w * scale / h)), scale)
    left = int(round((size[0] - pre.img_size) / 2.0))
    top = int(round((size[1] - pre.img_size) / 2.0))
    return size, (left, top, left + pre.img_size, top + pre.img_size)


def _resize_clipped(plane: Image.Image, size: tuple[int, int], resample: Image.Resampling) -> Image.Image:
    """Resize an ``F`` image in [0, 1] as Pillow resizes an 8-bit one: the horizontal pass, overshoot
    clipped to [0, 1], then the vertical pass, clipped again (without the rounding to 8 bits)."""
    wide = np.clip(np.asarray(plane.resize((size[0], plane.height), resample)), 0.0, 1.0)
    return Image.fromarray(np.clip(np.asarray(Image.fromarray(wide).resize(size, resample)), 0.0, 1.0))


def _gray_plane(image: Image.Image) -> Optional[Image.Image]:
    """A grayscale image of more than 8 bits as an ``F`` image in [0, 1]; None for any other image.

    - ``I;16*`` (16-bit PNG / TIFF): divided by ``2**bits - 1``, 65535 unless a TIFF's
      BitsPerSample says fewer bits (12-bit TIFFs open as ``I;16`` with values up to 4095).
    - ``I`` (32-bit integers): divided by ``2**bits - 1`` where the file states the bit depth (TIFF
      BitsPerSample, ``2**(bits-1) - 1`` for signed samples, negative values clipped to 0; 16 for a
      PNG, which older Pillow opens as ``I``); a ``ValueError`` where it does not.
    - ``F`` (32-bit floats, e.g. a float TIFF): taken to be in [0, 1] already; values outside are
      clipped to [0, 1] and NaN becomes 0.

    Bicubic / Lanczos overshoot is clipped to [0, 1] after each resize pass
    (:func:`_resize_clipped`), as Pillow clips it to 0..255 for 8-bit images.
    """
    if image.mode == "F":
        array = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0)
    elif image.mode == "I" or image.mode.startswith("I;16"):
        array = np.asarray(image, dtype=np.float64) / _full_scale(image)
    else:
        return None
    return Image.fromarray(np.clip(array, 0.0, 1.0).astype(np.float32))


def _full_scale(image: Image.Image) -> int:
    """The largest sample value of an ``I`` / ``I;16*`` image, from the bit depth its file states.

    Raises:
        ValueError: an ``I`` image from a file that does not say how many bits its samples have.
    """
    tags = getattr(image, "tag_v2", None)  # TIFF: BitsPerSample (258), SampleFormat (339, 2 = signed)
    bits = tags.get(258) if tags is not None else None
    if isinstance(bits, tuple):
        bits = bits[0] if bits else None
    if bits is None and (image.mode.startswith("I;16") or image.format == "PNG"):
        bits = 16
    if bits is None:
        where = f"this {image.format} file" if image.format else "an image in memory"
        raise ValueError(f"32-bit integer samples (mode {image.mode}) from {where} without a stated bit depth")
    signed = tags is not None and tags.get(339) in (2, (2,))
    return 2 ** (int(bits) - 1) - 1 if signed else 2 ** int(bits) - 1


#: What Pillow raises on files it cannot decode: OSError (UnidentifiedImageError, truncated data),
#: ValueError, SyntaxError (e.g. a broken PNG chunk), EOFError / struct.error from some plugins, and
#: DecompressionBombError (an Exception only) for images over ``Image.MAX_IMAGE_PIXELS`` * 2 pixels.
_UNREADABLE = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


def load_images(paths: Iterable[Path], pre: Preprocess) -> np.ndarray:
    """Load and preprocess ``paths`` into ``[N, 3, H, W]`` float32.

    Raises:
        SpecError: a file is not a readable image (one line naming the file and what to do).
    """
    arrays = []
    for path in paths:
        try:
            with Image.open(path) as image:
                arrays.append(preprocess_image(image, pre))
        except _UNREADABLE as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise SpecError(
                f"cannot read image {path}: {reason} ({type(exc).__name__}); convert it to an 8-bit or 16-bit PNG or JPEG"
            ) from exc
    return np.stack(arrays)


def batches(images: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Split ``[N, 3, H, W]`` into ``[batch_size, 3, H, W]`` batches for a static-batch graph; the
    last batch is filled up by cycling through the images again so every image is used."""
    count = max(1, math.ceil(len(images) / batch_size))
    index = np.arange(count * batch_size) % len(images)
    return [images[index[i * batch_size : (i + 1) * batch_size]] for i in range(count)]
