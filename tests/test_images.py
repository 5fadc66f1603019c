"""Image loading: 8-bit photos exactly as before, high-bit-depth and palette images scaled (not
clipped), and unreadable files named in one line."""

from __future__ import annotations

import io
import math
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitfold.errors import SpecError
from vitfold.images import default_photo_dir, load_images, preprocess_image
from vitfold.spec import Preprocess

IMAGENET = Preprocess(img_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
#: 64 / 0.875 rounds down to 73, so a 64x64 picture is resized (64 -> 73) and then cropped.
RESIZED = Preprocess(img_size=64, mean=(0.5,) * 3, std=(0.5,) * 3)
#: floor(56 / 0.875) == 64: a 64x64 picture is only cropped, never resampled.
CROPPED = Preprocess(img_size=56, mean=(0.5,) * 3, std=(0.5,) * 3)
#: Both paths compute float32(v / 255) for each 8-bit value v (the 16-bit path as
#: float32(v * 257 / 65535), which can differ by one float32 ulp after double rounding), then
#: normalise with std 0.5: a few ulps of values <= 1 / 0.5, far below 1e-6.
ULPS = 1e-6
#: Pillow resizes an 8-bit image in two passes and rounds to whole 8-bit steps after each (<= 0.5
#: step); the float path does not round. The vertical pass carries the first error times the L1 norm
#: of its bicubic weights (<= 1.25: -1/16, 9/16, 9/16, -1/16 at worst), so the 8-bit result is off by
#: <= 0.5 * 1.25 + 0.5 steps of 1/255, divided by std 0.5, plus float rounding.
RESAMPLED = (0.5 * 1.25 + 0.5) / 255 / 0.5 + 1e-5


def old_preprocess(image: Image.Image, pre: Preprocess) -> np.ndarray:
    """``preprocess_image`` as it was before high-bit-depth images were handled (the 8-bit path)."""
    image = image.convert("RGB")
    scale = math.floor(pre.img_size / pre.crop_pct)
    w, h = image.size
    if w <= h:
        size = (scale, max(1, round(h * scale / w)))
    else:
        size = (max(1, round(w * scale / h)), scale)
    image = image.resize(size, Image.Resampling.BICUBIC)
    left = int(round((size[0] - pre.img_size) / 2.0))
    top = int(round((size[1] - pre.img_size) / 2.0))
    image = image.crop((left, top, left + pre.img_size, top + pre.img_size))
    array = np.asarray(image, dtype=np.float32) / 255.0
    array = (array - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(array.transpose(2, 0, 1))


def gray_picture() -> np.ndarray:
    """A 64x64 8-bit picture using every value 0..255: a ramp with hard edges and noise."""
    ramp = np.arange(64 * 64).reshape(64, 64) % 256
    noise = np.random.default_rng(0).integers(0, 256, (64, 64))
    picture = np.where((np.arange(64)[:, None] // 8) % 2 == 0, ramp, noise)
    return picture.astype(np.uint8)


def load_one(path: Path, pre: Preprocess) -> np.ndarray:
    return load_images([path], pre)[0]


# ----------------------------------------------------------------------------- 8-bit: as before


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "CMYK"])
def test_8bit_photo_preprocesses_exactly_as_before(mode, tmp_path):
    """Builds' parity checks rely on 8-bit images giving the very same arrays as before."""
    photo = default_photo_dir() / "chelsea_cat.jpg"
    with Image.open(photo) as image:
        assert image.mode == "RGB"
        if mode == "RGB":
            path = photo
        else:
            path = tmp_path / ("photo.jpg" if mode == "CMYK" else "photo.png")
            image.convert(mode).save(path)
    with Image.open(path) as image:
        assert image.mode == mode
        expected = old_preprocess(image, IMAGENET)
    got = load_one(path, IMAGENET)
    assert got.dtype == np.float32 and got.shape == (3, 224, 224)
    np.testing.assert_array_equal(got, expected)


# ------------------------------------------------------------------- more than 8 bits: scaled


@pytest.mark.parametrize("pre, atol", [(CROPPED, ULPS), (RESIZED, RESAMPLED)], ids=["cropped", "resized"])
@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_gray_equals_the_same_picture_in_8_bits(suffix, pre, atol, tmp_path):
    """16-bit value v * 257 is 8-bit value v: the two files give the same array (the old code
    clipped the 16-bit one to 255, saturating every pixel above 255 / 65535)."""
    picture = gray_picture()
    Image.fromarray(picture).save(tmp_path / f"eight{suffix}")
    Image.fromarray(picture.astype(np.uint16) * 257).save(tmp_path / f"sixteen{suffix}")
    with Image.open(tmp_path / f"sixteen{suffix}") as image:
        assert image.mode.startswith("I;16")
    eight, sixteen = load_one(tmp_path / f"eight{suffix}", pre), load_one(tmp_path / f"sixteen{suffix}", pre)
    np.testing.assert_allclose(sixteen, eight, rtol=0, atol=atol)


def test_16bit_gray_keeps_the_values_between_8bit_steps(tmp_path):
    """16-bit values between two 8-bit steps stay there, also through the resize."""
    values = np.full((64, 64), 128 * 257 + 100, np.uint16)  # 8-bit 128 plus 100 / 65535
    Image.fromarray(values).save(tmp_path / "flat.png")
    for pre in (CROPPED, RESIZED):
        got = load_one(tmp_path / "flat.png", pre)
        np.testing.assert_allclose(got, (values[0, 0] / 65535 - 0.5) / 0.5, rtol=0, atol=ULPS)


def test_32bit_integer_tiff_is_scaled_by_its_bit_depth(tmp_path):
    """A signed 32-bit TIFF (BitsPerSample 32, SampleFormat 2) is divided by 2**31 - 1; negative
    values become 0."""
    picture = gray_picture().astype(np.int64) * 2**23
    picture[0, :8] = -5
    Image.fromarray(picture.astype(np.int32)).save(tmp_path / "deep.tif")
    with Image.open(tmp_path / "deep.tif") as image:
        assert image.mode == "I"
    expected = (np.clip(picture[4:60, 4:60], 0, None) / (2**31 - 1) - 0.5) / 0.5
    np.testing.assert_allclose(load_one(tmp_path / "deep.tif", CROPPED), np.broadcast_to(expected, (3, 56, 56)),
                               rtol=0, atol=ULPS)


def test_32bit_integer_image_without_a_bit_depth_is_refused():
    image = Image.fromarray(gray_picture().astype(np.int32) * 257)
    with pytest.raises(ValueError, match="bit depth"):
        preprocess_image(image, CROPPED)


def test_float_tiff_is_taken_as_0_to_1_and_clipped(tmp_path):
    picture = gray_picture()
    floats = picture.astype(np.float32) / 255
    floats[0, :4] = [-1.0, 2.0, np.nan, 0.5]
    Image.fromarray(floats).save(tmp_path / "float.tif")
    Image.fromarray(picture).save(tmp_path / "eight.png")
    with Image.open(tmp_path / "float.tif") as image:
        assert image.mode == "F"
    got, eight = load_one(tmp_path / "float.tif", RESIZED), load_one(tmp_path / "eight.png", RESIZED)
    assert got.min() >= -1.0 and got.max() <= 1.0
    inside = (slice(None), slice(8, None), slice(None))  # away from the out-of-range first row
    np.testing.assert_allclose(got[inside], eight[inside], rtol=0, atol=RESAMPLED)


# ------------------------------------------------------------------------------------ palettes


@pytest.mark.parametrize("transparency", [None, "bytes"])
def test_palette_png_equals_its_rgb_conversion(transparency, tmp_path):
    """Through RGBA as Pillow advises: no 'Palette images with Transparency' warning, same pixels."""
    with Image.open(default_photo_dir() / "coffee.jpg") as photo:
        palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    if transparency:
        palette.info["transparency"] = bytes([0, 128] + [255] * 62)
    palette.save(tmp_path / "palette.png")
    with Image.open(tmp_path / "palette.png") as image:
        assert image.mode == "P"
        image.convert("RGBA").convert("RGB").save(tmp_path / "rgb.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = load_one(tmp_path / "palette.png", IMAGENET)
    np.testing.assert_array_equal(got, load_one(tmp_path / "rgb.png", IMAGENET))


# ------------------------------------------------------------------------------ unreadable files


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(gray_picture()).save(buffer, "PNG")
    return buffer.getvalue()


def _wrong_idat_length(data: bytes) -> bytes:
    """A PNG whose first data chunk claims fewer bytes than it has (Pillow: SyntaxError on load)."""
    at = data.index(b"IDAT") - 4
    length = struct.unpack(">I", data[at : at + 4])[0]
    return data[:at] + struct.pack(">I", length // 2) + data[at + 4 :]


@pytest.mark.parametrize("kind", ["garbage", "truncated", "broken chunk", "decompression bomb"])
def test_unreadable_image_is_one_line_naming_the_file(kind, tmp_path, monkeypatch):
    data = _png_bytes()
    contents = {
        "garbage": b"this is not an image\n" * 20,
        "truncated": data[: len(data) // 2],
        "broken chunk": _wrong_idat_length(data),
        "decompression bomb": data,
    }[kind]
    if kind == "decompression bomb":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 4)  # 64x64 is over twice the limit
    path = tmp_path / "odd.png"
    path.write_bytes(contents)
    with pytest.raises(SpecError) as caught:
        load_images([path], CROPPED)
    message = str(caught.value)
    assert str(path) in message and "convert it to an 8-bit or 16-bit PNG or JPEG" in message
    assert "\n" not in message
