"""Image decoding: every PIL mode becomes the right 8-bit RGB image, checked against conversions computed here with
numpy arithmetic (not with PIL's converter); EXIF orientation; first frame of animations; the bad-image policy."""

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_simmim.augmentation import build_classification_transform
from modeling_simmim.data import (
    RobustImageDataset,
    SkipNoneCollator,
    UnreadableImage,
    UnreadableImageError,
    build_pretrain_transform,
    verify_image_files,
)
from modeling_simmim.images import decode_image, to_rgb

RNG = np.random.default_rng(0)
WHITE = 255.0


def _reencoded(image: Image.Image, file_format: str = "PNG", **save_args) -> Image.Image:
    """The image as a reader would meet it: saved to a file in `file_format`, then decoded."""
    buffer = io.BytesIO()
    image.save(buffer, file_format, **save_args)
    return decode_image(buffer.getvalue())


def _rgb_array(image: Image.Image) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. PIL's "Palette images with Transparency ... should be converted"
        rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    return np.asarray(rgb).astype(np.int64)


def _over_white(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    alpha = alpha.astype(np.float64)[..., None] / 255.0
    return np.rint(color.astype(np.float64) * alpha + WHITE * (1.0 - alpha))


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16_bit_grayscale_is_scaled_to_8_bits_not_clipped(mode):
    values = RNG.integers(0, 65536, (20, 30)).astype(np.uint16)
    dtype = ">u2" if mode == "I;16B" else "<u2"
    image = Image.frombytes(mode, (30, 20), values.astype(dtype).tobytes())
    expected = _gray_to_rgb(np.rint(values / 257.0))
    assert np.array_equal(_rgb_array(image), expected)
    # a real 16-bit PNG (PIL opens it as I;16): mid-gray stays mid-gray (PIL's own convert gives white)
    png = _reencoded(Image.frombytes("I;16", (30, 20), np.full((20, 30), 32896, np.uint16).tobytes()))
    assert png.mode in ("I;16", "I") and np.all(_rgb_array(png) == 128)


def test_32_bit_integer_and_float_grayscale():
    values = RNG.integers(0, 65536, (10, 12)).astype(np.int32)
    assert np.array_equal(_rgb_array(Image.fromarray(values, mode="I")), _gray_to_rgb(np.rint(values / 257.0)))
    unit = RNG.random((10, 12)).astype(np.float32)
    assert np.array_equal(_rgb_array(Image.fromarray(unit, mode="F")), _gray_to_rgb(np.rint(unit * 255.0)))
    byte_range = (unit * 300.0).astype(np.float32)  # beyond [0, 1]: read as 0..255, clipped
    expected = _gray_to_rgb(np.clip(np.rint(byte_range), 0, 255))
    assert np.array_equal(_rgb_array(Image.fromarray(byte_range, mode="F")), expected)


def test_cmyk_uses_the_subtractive_formula_also_from_jpeg():
    cmyk = RNG.integers(0, 256, (16, 16, 4)).astype(np.uint8)
    image = Image.fromarray(cmyk, mode="CMYK")
    scale = (255.0 - cmyk[..., 3:4].astype(np.float64)) / 255.0
    expected = np.rint((255.0 - cmyk[..., :3].astype(np.float64)) * scale)
    assert np.abs(_rgb_array(image) - expected).max() <= 1  # PIL's integer arithmetic rounds differently
    tiff = _reencoded(image, "TIFF")
    assert tiff.mode == "CMYK" and np.abs(_rgb_array(tiff) - expected).max() <= 1
    # JPEG stores CMYK inverted (Adobe); decoding must undo that: a flat colour comes back close to the formula
    flat = Image.new("CMYK", (16, 16), (10, 200, 30, 40))
    jpeg = _reencoded(flat, "JPEG", quality=100)
    flat_expected = np.rint((255.0 - np.array([10, 200, 30])) * (215 / 255.0))
    assert np.abs(_rgb_array(jpeg)[8, 8] - flat_expected).max() <= 3


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_onto_white(mode):
    color = RNG.integers(0, 256, (12, 14, 3)).astype(np.uint8)
    alpha = RNG.integers(0, 256, (12, 14)).astype(np.uint8)
    alpha[0, 0], alpha[0, 1] = 0, 255
    if mode == "RGBA":
        image = Image.fromarray(np.dstack([color, alpha]), mode="RGBA")
        expected = _over_white(color, alpha)
    else:
        gray = color[..., 0]
        image = Image.fromarray(np.dstack([gray, alpha]), mode="LA")
        expected = _over_white(_gray_to_rgb(gray), alpha)
    for decoded in (image, _reencoded(image)):
        rgb = _rgb_array(decoded)
        assert np.abs(rgb - expected).max() <= 1
        assert tuple(rgb[0, 0]) == (255, 255, 255)  # fully transparent -> background
        assert np.array_equal(rgb[0, 1], expected[0, 1])  # opaque -> its colour


def test_palette_with_transparency_composited_without_pil_warning():
    palette = np.array([[200, 10, 10], [10, 200, 10], [10, 10, 200]], dtype=np.uint8)
    indices = RNG.integers(0, 3, (10, 10)).astype(np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette.flatten().tolist())
    # one fully transparent index (GIF style) ...
    single = image.copy()
    single.info["transparency"] = 2
    expected = palette[indices].astype(np.int64)
    expected[indices == 2] = 255
    for decoded in (single, _reencoded(single), _reencoded(single, "GIF")):
        assert np.array_equal(_rgb_array(decoded), expected)
    # ... and per-index alpha bytes (PNG tRNS), which PIL warns about in a plain convert("RGB")
    graded = image.copy()
    alphas = np.array([255, 128, 0])
    graded.info["transparency"] = bytes(alphas.tolist())
    expected = _over_white(palette[indices], alphas[indices])
    assert np.abs(_rgb_array(_reencoded(graded)) - expected).max() <= 1


def test_plain_modes_match_their_definitions():
    gray = RNG.integers(0, 256, (9, 11)).astype(np.uint8)
    assert np.array_equal(_rgb_array(Image.fromarray(gray, mode="L")), _gray_to_rgb(gray))
    bits = gray > 127
    assert np.array_equal(
        _rgb_array(Image.fromarray(gray).convert("1", dither=Image.Dither.NONE)), _gray_to_rgb(np.where(bits, 255, 0))
    )
    color = RNG.integers(0, 256, (9, 11, 3)).astype(np.uint8)
    assert np.array_equal(_rgb_array(Image.fromarray(color)), color)


def test_exif_orientation_is_applied():
    array = RNG.integers(0, 256, (6, 10, 3)).astype(np.uint8)  # wide, so a rotation shows in the size
    image = Image.fromarray(array)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    decoded = _reencoded(image, "PNG", exif=exif)
    assert decoded.size == (6, 10)
    assert np.array_equal(np.asarray(to_rgb(decoded)), np.rot90(array, k=-1))
    exif[0x0112] = 3  # 180 degrees
    assert np.array_equal(np.asarray(to_rgb(_reencoded(image, "PNG", exif=exif))), np.rot90(array, k=2))


@pytest.mark.parametrize("file_format", ["GIF", "WEBP", "PNG"])
def test_animations_give_their_first_frame(file_format):
    first, second = Image.new("RGB", (8, 8), (250, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 250))
    buffer = io.BytesIO()
    save_args = {"lossless": True} if file_format == "WEBP" else {}
    first.save(buffer, file_format, save_all=True, append_images=[second], duration=100, loop=0, **save_args)
    opened = Image.open(io.BytesIO(buffer.getvalue()))
    assert getattr(opened, "n_frames", 1) == 2
    opened.seek(1)  # a reader left on another frame: decoding still gives the first one
    rgb = np.asarray(to_rgb(decode_image(opened))).astype(int)
    assert np.abs(rgb - np.array([250, 0, 0])).max() <= 2


def test_both_training_pipelines_use_this_conversion():
    values = np.full((40, 40), 32896, dtype=np.uint16)  # mid-gray in 16 bits
    image = Image.frombytes("I;16", (40, 40), values.tobytes())
    identity = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    for transform in (
        build_pretrain_transform(32, train=False, **identity),
        build_classification_transform(32, train=False, **identity),
    ):
        assert transform(image).mean().item() == pytest.approx(128 / 255, abs=1e-3)


# ---- the bad-image policy ------------------------------------------------------------------------------------------
def test_bad_image_policy_skip_reports_indices_error_names_the_file(tmp_path, caplog):
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    Image.new("RGB", (20, 20)).save(good)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    rows = [{"image": str(good)}, {"image": str(bad)}]
    transform = build_pretrain_transform(16, train=False)
    skipping = RobustImageDataset(rows, "image", transform)
    with caplog.at_level("WARNING"):
        for _ in range(3):  # drawn in three epochs: one warning
            assert skipping[1] == UnreadableImage(1, str(bad))
    assert caplog.text.count("bad.png") == 1
    batch = SkipNoneCollator(lambda examples: {"pixel_values": torch.stack([e["pixel_values"] for e in examples])})(
        [skipping[0], skipping[1], None]
    )
    assert batch["pixel_values"].shape[0] == 1 and batch["skipped_image_indices"].tolist() == [1, -1]

    strict = RobustImageDataset(rows, "image", transform, on_bad_image="error")
    assert strict[0]["pixel_values"].shape == (3, 16, 16)
    with pytest.raises(UnreadableImageError, match=r"bad\.png.*--on_bad_image skip"):
        strict[1]
    with pytest.raises(UnreadableImageError, match=r"bad\.png"):
        verify_image_files([str(good), str(bad)], on_bad_image="error")
    assert verify_image_files([str(good), str(bad)]) == [True, False]
    with pytest.raises(ValueError, match="--on_bad_image"):
        RobustImageDataset(rows, "image", transform, on_bad_image="ignore")
