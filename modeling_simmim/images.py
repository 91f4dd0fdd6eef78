"""Decoding image files into the 8-bit RGB images the transforms expect, for every mode PIL reads.

PIL's own `convert("RGB")` gets several modes wrong for training data: 16-bit grayscale (`I;16`, `I;16B`, `I`) is
clipped at 255, so a 16-bit PNG becomes almost all white; transparency is dropped, leaving whatever colour the
transparent pixels happen to store (PIL warns for palette images); EXIF orientation is ignored. `to_rgb` fixes these:

- 16-bit and 32-bit integer grayscale: scaled to 8 bits, `round(value / 257)` (0 -> 0, 65535 -> 255; `I` values
  outside 0..65535 are clipped to it).
- 32-bit float grayscale (`F`): values in [0, 1] scaled by 255, otherwise read as 0..255 (PIL's rule), clipped.
- Transparency (`RGBA`, `LA`, `PA`, `P` or `L`/`RGB` with a transparent colour): composited onto **white**, as
  transformers' image processors do (`convert_to_rgb`), so training sees what the exported model sees in
  `pipeline("image-classification")`.
- `CMYK`, `YCbCr`, `1`, `L`, `P`: PIL's conversion (CMYK: `255 * (1 - C) * (1 - K)` per channel).

`decode_image` also applies the EXIF orientation (`ImageOps.exif_transpose`) and keeps the first frame of animated
GIF/WebP/APNG files.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps

# Background that transparent pixels are composited onto (transformers' convert_to_rgb uses white).
TRANSPARENCY_BACKGROUND = (255, 255, 255)
# 65535 / 255: maps the 16-bit range exactly onto the 8-bit one.
_SIXTEEN_TO_EIGHT_BITS = 257.0


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded (raised with `--on_bad_image error`; the message names the file)."""


def _has_transparency(image: Image.Image) -> bool:
    return "A" in image.getbands() or image.info.get("transparency") is not None


def _integer_gray_to_8_bits(image: Image.Image) -> Image.Image:
    values = np.asarray(image).astype(np.float64)
    scaled = np.clip(np.rint(values / _SIXTEEN_TO_EIGHT_BITS), 0, 255)
    return Image.fromarray(scaled.astype(np.uint8), mode="L")


def _float_gray_to_8_bits(image: Image.Image) -> Image.Image:
    values = np.asarray(image).astype(np.float64)
    finite = values[np.isfinite(values)]
    if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
        values = values * 255.0
    scaled = np.clip(np.rint(np.nan_to_num(values)), 0, 255)
    return Image.fromarray(scaled.astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB: high bit depths scaled (not clipped), transparency composited onto white (see the
    module docstring for every mode)."""
    if image.mode == "RGB" and image.info.get("transparency") is None:
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        return _integer_gray_to_8_bits(image).convert("RGB")
    if image.mode == "F":
        return _float_gray_to_8_bits(image).convert("RGB")
    if _has_transparency(image):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*TRANSPARENCY_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(value: Any) -> Image.Image:
    """Decode a path, `{"bytes", "path"}` dict (datasets' undecoded `Image`), bytes, numpy array or PIL image into a
    fully loaded PIL image, upright (EXIF orientation applied), first frame of an animation. Raises on unreadable
    data (the caller decides to skip)."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, str):
        image = Image.open(value)
    elif isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    elif isinstance(value, dict):
        if value.get("bytes") is not None:
            image = Image.open(io.BytesIO(value["bytes"]))
        elif value.get("path"):
            image = Image.open(value["path"])
        else:
            raise ValueError("image entry has neither bytes nor path")
    elif isinstance(value, np.ndarray):
        image = Image.fromarray(value)
    else:
        raise TypeError(f"cannot decode an image from {type(value).__name__}")
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    image.load()  # PIL decodes lazily: force it here so truncated files fail inside the caller's try
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)
    return image


__all__ = ["TRANSPARENCY_BACKGROUND", "UnreadableImageError", "decode_image", "to_rgb"]
