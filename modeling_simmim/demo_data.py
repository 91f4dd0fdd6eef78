"""Bundled demo datasets: small labelled image sets built from real images that installed packages ship (scikit-learn's
digits, scikit-image's and scikit-learn's photos), so that the demo and the tests need no network."""

from __future__ import annotations

import functools
import io
import os
from typing import Any

import numpy as np
from PIL import Image
from transformers.utils import logging

logger = logging.get_logger(__name__)

DEMO_DATASETS = ("digits", "photos")
DIGIT_CLASS_NAMES = tuple(str(i) for i in range(10))


def _digits_images(image_size: int) -> tuple[list[Image.Image], list[int]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = []
    for array in digits.images:  # 8x8, values 0..16
        gray = Image.fromarray(np.uint8(np.round(array * (255.0 / 16.0))), mode="L")
        images.append(gray.resize((image_size, image_size), Image.Resampling.BICUBIC).convert("RGB"))
    return images, [int(t) for t in digits.target]


def _bundled_photos() -> list[tuple[str, np.ndarray]]:
    """Colour photos that scikit-image and scikit-learn ship inside their wheels."""
    from skimage import data as skdata
    from sklearn.datasets import load_sample_images

    photos = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "motorcycle_left"):
        try:
            array = getattr(skdata, name)()
        except Exception as error:  # noqa: BLE001 - a fetcher may need the network: skip that photo
            logger.info("demo data: scikit-image photo %s unavailable (%s)", name, error)
            continue
        if array.ndim == 3:
            photos.append((name, array[..., :3]))
    samples = load_sample_images()
    for filename, array in zip(samples.filenames, samples.images):
        photos.append((os.path.splitext(os.path.basename(filename))[0], array))
    return photos


def _photo_crops(image_size: int, crops_per_photo: int, seed: int) -> tuple[list[Image.Image], list[int], list[str]]:
    rng = np.random.default_rng(seed)
    images, labels, names = [], [], []
    for label, (name, array) in enumerate(_bundled_photos()):
        photo = Image.fromarray(np.ascontiguousarray(array))
        width, height = photo.size
        for _ in range(crops_per_photo):
            side = int(rng.uniform(0.25, 0.6) * min(width, height))
            left = int(rng.integers(0, width - side + 1))
            top = int(rng.integers(0, height - side + 1))
            crop = photo.crop((left, top, left + side, top + side)).resize(
                (image_size, image_size), Image.Resampling.BICUBIC
            )
            images.append(crop.convert("RGB"))
            labels.append(label)
        names.append(name)
    return images, labels, names


DEMO_IMAGE_SIZES = {"digits": 32, "photos": 96}


def load_demo_dataset(
    name: str = "digits",
    image_size: int | None = None,
    validation_fraction: float = 0.2,
    seed: int = 0,
    crops_per_photo: int = 64,
) -> Any:
    """A small labeled image dataset built from real images that installed packages ship (no network):

    - "digits": scikit-learn's 1,797 handwritten digits (8x8 scans), upsampled (bicubic) to `image_size` (default
      32), RGB; 10 classes "0".."9". Learnable in a minute on a CPU: good for a quick finetuning demo.
    - "photos": `crops_per_photo` random square crops (25-60% of the shorter side) of each colour photo of
      scikit-image and scikit-learn (astronaut, coffee, cat, rocket, ...), resized to `image_size` (default 96); the
      label is the photo it came from. Natural textures, for reconstruction demos.

    Training transforms resize to the model's size anyway (RandomResizedCrop), so the stored size only needs to be
    near it; small stored images keep building the set fast (about a second).

    Returns a `datasets.DatasetDict` with "train" and "validation" splits (stratified, seeded), columns "image"
    (PIL, `datasets.Image`) and "label" (`datasets.ClassLabel`).
    """
    import datasets

    # A fresh DatasetDict around the cached splits: callers may replace splits, the splits themselves are immutable.
    if name not in DEMO_DATASETS:
        raise ValueError(f"Unknown demo dataset {name!r}; choose one of {DEMO_DATASETS}.")
    size = int(image_size) if image_size is not None else DEMO_IMAGE_SIZES[name]
    return datasets.DatasetDict(dict(_build_demo_dataset(name, size, validation_fraction, seed, crops_per_photo)))


@functools.lru_cache(maxsize=8)  # building takes seconds (decode, resize, PNG-encode); reuse it within a process
def _build_demo_dataset(name: str, image_size: int, validation_fraction: float, seed: int, crops_per_photo: int):
    import datasets
    from sklearn.model_selection import train_test_split

    if name == "digits":
        images, labels = _digits_images(image_size)
        class_names = list(DIGIT_CLASS_NAMES)
    elif name == "photos":
        images, labels, class_names = _photo_crops(image_size, crops_per_photo, seed)
    else:
        raise ValueError(f"Unknown demo dataset {name!r}; choose one of {DEMO_DATASETS}.")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=class_names)})
    indices = np.arange(len(images))
    # At least one validation example per class (stratification needs it for tiny crop counts).
    num_val = max(len(class_names), int(round(validation_fraction * len(images))))
    train_idx, val_idx = train_test_split(indices, test_size=num_val, stratify=labels, random_state=seed)
    encoded = [{"bytes": _fast_png(image), "path": None} for image in images]
    splits = {}
    for split, idx in (("train", np.sort(train_idx)), ("validation", np.sort(val_idx))):
        splits[split] = datasets.Dataset.from_dict(
            {"image": [encoded[i] for i in idx], "label": [labels[i] for i in idx]}, features=features
        )
    return datasets.DatasetDict(splits)


def _fast_png(image: Image.Image) -> bytes:
    # datasets would PNG-encode at the default level; level 1 is lossless too and about twice as fast.
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


__all__ = ["DEMO_DATASETS", "DEMO_IMAGE_SIZES", "DIGIT_CLASS_NAMES", "load_demo_dataset"]
