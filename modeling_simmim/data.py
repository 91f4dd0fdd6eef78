"""Image data for SimMIM: dataset loading (Hub, image folders, a bundled demo set), the official pretraining
transform, and robust decoding that skips unreadable images instead of crashing a run.

Loading returns a `datasets.DatasetDict` whose image column holds *undecoded* images (`Image(decode=False)` for
Hub data, file paths for folders): decoding happens in `RobustImageDataset.__getitem__`, inside a `try`, so that
one corrupt file is skipped with a warning naming it and counted, rather than raising deep inside `datasets`.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from .images import UnreadableImageError, decode_image, to_rgb
from .masking import SimMIMMaskGenerator
from .randomness import EXAMPLE_KEY_FIELD, ExampleKey, keyed_rngs

logger = logging.getLogger(__name__)

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)

# torchvision's ImageFolder list plus a few formats PIL reads.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")

# Column names tried, in order, when `image_column_name` is not given and no column has the `Image` feature type.
_IMAGE_COLUMN_GUESSES = ("image", "img", "pixel_values", "jpg", "png", "webp")
_LABEL_COLUMN_GUESSES = ("label", "labels", "fine_label", "class", "cls")

DEMO_DATASETS = ("digits", "photos")


# ----------------------------------------------------------------------------------------------------------------
# Transforms
def _size_pair(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, (list, tuple)):
        return int(image_size[0]), int(image_size[1])
    return int(image_size), int(image_size)


def build_pretrain_transform(
    image_size: int | Sequence[int],
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    train: bool = True,
    hflip_prob: float = 0.5,
) -> T.Compose:
    """The official SimMIM pretraining transform (`train=True`): RGB, `RandomResizedCrop(image_size, scale=(0.67, 1),
    ratio=(3/4, 4/3))` (bilinear, torchvision's default, as official), horizontal flip with probability `hflip_prob`
    (official 0.5; 0 where mirrored images are other shapes, e.g. digits), `ToTensor`, `Normalize`.

    `train=False` gives the deterministic evaluation transform: resize the shorter side to the crop size, center crop.
    `image_size` is an int or (height, width).
    """
    size = _size_pair(image_size)
    normalize = T.Normalize(mean=list(mean), std=list(std))
    if train:
        steps = [
            T.Lambda(to_rgb),
            T.RandomResizedCrop(size, scale=(0.67, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)),
            *([T.RandomHorizontalFlip(hflip_prob)] if hflip_prob > 0 else []),
        ]
    else:
        # Resize so that the crop of `size` fits; for square crops this is "shorter side = size".
        steps = [T.Lambda(to_rgb), _ResizeToCover(size), T.CenterCrop(size)]
    return T.Compose([*steps, T.ToTensor(), normalize])


class _ResizeToCover:
    """Resize (bilinear, keeping the aspect ratio) to the smallest size that covers `size` (h, w)."""

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        scale = max(self.size[0] / height, self.size[1] / width)
        new_size = (max(self.size[1], round(width * scale)), max(self.size[0], round(height * scale)))
        return image.resize(new_size, Image.BILINEAR)

    def __repr__(self) -> str:
        return f"ResizeToCover(size={self.size})"


# ----------------------------------------------------------------------------------------------------------------
# Robust decoding
def describe_image(value: Any, index: int | None = None) -> str:
    """A human-readable name for an undecoded image: its path when known, else its row index."""
    path = None
    if isinstance(value, str):
        path = value
    elif isinstance(value, dict):
        path = value.get("path")
    elif isinstance(value, Image.Image):
        path = getattr(value, "filename", None)
    if path:
        return str(path)
    return f"row {index}" if index is not None else "<in-memory image>"


BadImagePolicy = Literal["skip", "error"]
BAD_IMAGE_POLICIES: tuple[str, ...] = ("skip", "error")


def _check_bad_image_policy(on_bad_image: str) -> None:
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"--on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {on_bad_image!r}.")


def _unreadable_error(name: str, error: Exception) -> UnreadableImageError:
    return UnreadableImageError(f"Unreadable image {name}: {type(error).__name__}: {error} (remove or fix the file, "
                                "or pass --on_bad_image skip to train without it).")


class UnreadableImage(NamedTuple):
    """What `RobustImageDataset` returns in place of an image it cannot decode: the collator drops it and reports its
    index, so that the trainer counts each unreadable file once however often it is drawn."""

    index: int
    name: str


class RobustImageDataset(torch.utils.data.Dataset):
    """Map-style view of a `datasets.Dataset` (or any indexable of rows) that decodes and transforms one image.

    `__getitem__` returns `{"pixel_values": tensor[, "labels": int]}`. When the image cannot be read, the
    `on_bad_image` policy applies: "skip" (default) names the file in a warning (once per process) and returns an
    `UnreadableImage`, which the batch collator drops and reports (see `SkipNoneCollator`); "error" raises
    `UnreadableImageError` naming the file. `extra_fn(index, example)` may add per-example entries (e.g.
    deterministic evaluation masks).

    Keyed randomness: indexed with an `ExampleKey` (what `KeyedEpochSampler` yields in training), the transform runs
    with the global RNGs seeded from the key (`modeling_simmim.randomness`), `keyed_fn(key, example)` may add keyed
    entries (e.g. the training mask, see `KeyedMasks`), and the example carries its key under "example_key" for the
    collator. Indexed with an int, nothing is keyed (evaluation transforms are deterministic anyway).
    """

    # Tells the training dataloader that this dataset takes `ExampleKey`s as indices.
    accepts_example_keys = True

    def __init__(
        self,
        dataset: Any,
        image_column: str,
        transform: Callable[[Image.Image], torch.Tensor],
        label_column: str | None = None,
        extra_fn: Callable[[int, dict[str, Any]], dict[str, Any]] | None = None,
        on_bad_image: BadImagePolicy = "skip",
        keyed_fn: Callable[[ExampleKey, dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        _check_bad_image_policy(on_bad_image)
        self.dataset = dataset
        self.image_column = image_column
        self.label_column = label_column
        self.transform = transform
        self.extra_fn = extra_fn
        self.on_bad_image = on_bad_image
        self._warned: set[int] = set()
        self.keyed_fn = keyed_fn

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int | ExampleKey) -> dict[str, Any] | UnreadableImage:
        key = item if isinstance(item, ExampleKey) else None
        index = key.index if key is not None else int(item)
        row = self.dataset[index]
        value = row[self.image_column]
        try:
            with keyed_rngs(key, "transform"):
                pixel_values = self.transform(decode_image(value))
        except Exception as error:  # noqa: BLE001 - any decoder failure means "unreadable image"
            name = describe_image(value, index)
            if self.on_bad_image == "error":
                raise _unreadable_error(name, error) from error
            if index not in self._warned:
                self._warned.add(index)
                logger.warning("Skipping unreadable image %s: %s: %s", name, type(error).__name__, error)
            return UnreadableImage(index, name)
        example: dict[str, Any] = {"pixel_values": pixel_values}
        if self.label_column is not None:
            example["labels"] = row[self.label_column]
        if self.extra_fn is not None:
            example.update(self.extra_fn(index, example))
        if key is not None:
            if self.keyed_fn is not None:
                example.update(self.keyed_fn(key, example))
            example[EXAMPLE_KEY_FIELD] = key
        return example


SKIPPED_KEY = "skipped_image_indices"


class SkipNoneCollator:
    """Wrap a collator: drop the examples of unreadable images (`UnreadableImage`, or `None` from other datasets) and
    report them under `batch["skipped_image_indices"]`: a 1-D int64 tensor of their dataset indices (-1 where
    unknown), so that it crosses DataLoader worker processes; the trainer pops it before the forward pass and counts
    distinct images."""

    def __init__(self, collator: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        self.collator = collator

    def __call__(self, examples: list[dict[str, Any] | UnreadableImage | None]) -> dict[str, Any]:
        kept = [example for example in examples if example is not None and not isinstance(example, UnreadableImage)]
        if not kept:
            raise RuntimeError(
                f"Every image of a batch of {len(examples)} failed to load (see the warnings above naming the files). "
                "Check the dataset, or remove the unreadable files."
            )
        skipped = [example.index if isinstance(example, UnreadableImage) else -1
                   for example in examples if example is None or isinstance(example, UnreadableImage)]
        batch = self.collator(kept)
        batch[SKIPPED_KEY] = torch.tensor(skipped, dtype=torch.long)
        return batch


class PretrainCollator(SkipNoneCollator):
    """The pretraining collator: drops unreadable images (counted, see `SkipNoneCollator`); examples that carry their
    own "bool_masked_pos" (evaluation, see `IndexSeededMasks`; training, see `KeyedMasks`) keep it, other batches get
    fresh masks from `mask_collator` (a `SimMIMDataCollator`)."""

    def __init__(self, mask_collator: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        super().__init__(self._collate)
        self.mask_collator = mask_collator

    def _collate(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if all("bool_masked_pos" in example for example in examples):
            batch = {key: torch.stack([torch.as_tensor(example[key]) for example in examples])
                     for key in ("pixel_values", "bool_masked_pos")}
            if "labels" in examples[0]:
                batch["labels"] = torch.as_tensor([example["labels"] for example in examples])
            return batch
        return self.mask_collator(examples)


class IndexSeededMasks:
    """`extra_fn` for `RobustImageDataset` giving each example a mask drawn from a generator seeded with
    `seed + index`: evaluation masks then depend only on the example, not on batch size, workers, processes or how
    many evaluations ran before, so evaluation losses are comparable across a run and across runs."""

    def __init__(self, mask_generator: Callable[..., torch.Tensor], seed: int = 0) -> None:
        self.mask_generator = mask_generator
        self.seed = seed

    def __call__(self, index: int, example: dict[str, Any]) -> dict[str, Any]:
        generator = torch.Generator().manual_seed(self.seed + index)
        return {"bool_masked_pos": self.mask_generator(1, generator=generator)[0]}


class KeyedMasks:
    """`keyed_fn` for `RobustImageDataset` giving each training example the mask of its key (seed, epoch, index):
    drawn from a `torch.Generator` seeded from the key, so the mask of an example in an epoch is the same whatever the
    batch size, workers, processes or resumes, and differs between epochs."""

    def __init__(self, mask_generator: SimMIMMaskGenerator) -> None:
        self.mask_generator = mask_generator

    def __call__(self, key: ExampleKey, example: dict[str, Any]) -> dict[str, Any]:
        return {"bool_masked_pos": self.mask_generator.seeded_mask(key.seed_for("mask"))}


def verify_image_files(paths: Sequence[str], on_bad_image: BadImagePolicy = "skip") -> list[bool]:
    """Cheap check of image files (header + structure via PIL `verify`): True where readable. An unreadable file is
    named in a warning (`on_bad_image="skip"`) or raises `UnreadableImageError` naming it ("error")."""
    _check_bad_image_policy(on_bad_image)
    flags = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
            flags.append(True)
        except Exception as error:  # noqa: BLE001
            if on_bad_image == "error":
                raise _unreadable_error(path, error) from error
            logger.warning("Skipping unreadable image %s: %s: %s", path, type(error).__name__, error)
            flags.append(False)
    return flags


# ----------------------------------------------------------------------------------------------------------------
# Loading
@dataclass
class LoadedImageData:
    """What `load_image_datasets` found: the splits, the resolved column names, and images skipped at load time."""

    datasets: Any  # datasets.DatasetDict
    image_column: str
    label_column: str | None
    source: str
    skipped_files: list[str] = field(default_factory=list)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_files)


def scan_image_folder(root: str, extensions: Iterable[str] = IMAGE_EXTENSIONS) -> tuple[list[str], list[str] | None]:
    """All image files below `root`, at any depth, sorted. Labels are the first-level folder names when every file
    lives in a subfolder (ImageNet's `train/<class>/<file>` layout and deeper), else `None`."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"Image folder {root!r} does not exist (check --train_dir / --validation_dir).")
    extensions = tuple(ext.lower() for ext in extensions)
    paths: list[str] = []
    for directory, subdirs, files in os.walk(root, followlinks=True):
        subdirs.sort()
        paths.extend(os.path.join(directory, name) for name in sorted(files) if name.lower().endswith(extensions))
    if not paths:
        raise ValueError(f"No image files ({', '.join(extensions)}) found under {root!r}.")
    relative = [os.path.relpath(path, root) for path in paths]
    if all(os.sep in rel for rel in relative):
        return paths, [rel.split(os.sep, 1)[0] for rel in relative]
    return paths, None


def _folder_split(paths: list[str], labels: list[str] | None, class_names: list[str] | None):
    import datasets

    columns: dict[str, list[Any]] = {"image": paths}
    features = {"image": datasets.Image(decode=False)}
    if labels is not None and class_names is not None:
        index = {name: i for i, name in enumerate(class_names)}
        unknown = sorted(set(labels) - set(index))
        if unknown:
            raise ValueError(f"Validation folders {unknown[:5]} are not classes of the training folder.")
        columns["label"] = [index[name] for name in labels]
        features["label"] = datasets.ClassLabel(names=class_names)
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def load_image_folders(
    train_dir: str | None, validation_dir: str | None = None, verify: bool = True, on_bad_image: BadImagePolicy = "skip"
) -> tuple[Any, list[str]]:
    """A DatasetDict ("train" and/or "validation") from image folders of any nesting, with columns "image" (file
    paths, undecoded) and, when every file is in a class folder, "label" (ClassLabel from the first-level folder
    names of the training folder). `verify=True` drops files PIL cannot read (returned as the second value; with
    `on_bad_image="error"` the first one raises `UnreadableImageError` instead)."""
    import datasets

    scanned = {}
    if train_dir is not None:
        scanned["train"] = scan_image_folder(train_dir)
    if validation_dir is not None:
        scanned["validation"] = scan_image_folder(validation_dir)
    with_labels = all(labels is not None for _, labels in scanned.values())
    class_names = None
    if with_labels:
        reference = scanned["train" if "train" in scanned else "validation"][1]
        class_names = sorted(set(reference))
    skipped: list[str] = []
    splits = {}
    for split, (paths, labels) in scanned.items():
        if verify:
            flags = verify_image_files(paths, on_bad_image)
            skipped.extend(path for path, ok in zip(paths, flags) if not ok)
            keep = [i for i, ok in enumerate(flags) if ok]
            paths = [paths[i] for i in keep]
            labels = [labels[i] for i in keep] if labels is not None else None
            if not paths:
                raise ValueError(f"None of the images of the {split} folder could be read.")
        splits[split] = _folder_split(paths, labels if with_labels else None, class_names)
    return datasets.DatasetDict(splits), skipped


def resolve_image_column(dataset: Any, requested: str | None = None) -> str:
    """The image column: `requested` if given (must exist), else the first column with datasets' `Image` feature,
    else a conventional name. Raises `ValueError` listing the columns when none fits."""
    import datasets

    columns = list(dataset.column_names)
    if requested is not None:
        if requested not in columns:
            raise ValueError(f"--image_column_name {requested!r} is not a column of the dataset; columns: {columns}.")
        return requested
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.Image):
            return name
    for name in _IMAGE_COLUMN_GUESSES:
        if name in columns:
            return name
    raise ValueError(f"Cannot find an image column among {columns}: pass --image_column_name.")


def resolve_label_column(dataset: Any, requested: str | None = None, required: bool = False) -> str | None:
    """The label column: `requested` if given (must exist), else a ClassLabel column, else a conventional name."""
    import datasets

    columns = list(dataset.column_names)
    if requested is not None:
        if requested not in columns:
            raise ValueError(f"--label_column_name {requested!r} is not a column of the dataset; columns: {columns}.")
        return requested
    for name, feature in dataset.features.items():
        if isinstance(feature, datasets.ClassLabel):
            return name
    for name in _LABEL_COLUMN_GUESSES:
        if name in columns:
            return name
    if required:
        raise ValueError(f"Cannot find a label column among {columns}: pass --label_column_name.")
    return None


def load_image_datasets(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    image_column_name: str | None = None,
    label_column_name: str | None = None,
    train_val_split: float | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    demo_dataset: str = "digits",
    demo_image_size: int | None = None,
    verify_images: bool = True,
    on_bad_image: BadImagePolicy = "skip",
    seed: int = 42,
    cache_dir: str | None = None,
    require_labels: bool = False,
) -> LoadedImageData:
    """Load the data a run trains on, from exactly one source:

    - `dataset_name` (+ `dataset_config_name`): `datasets.load_dataset` (Hub id, local script or packaged builder);
    - `train_dir` / `validation_dir`: image folders of any nesting (see `load_image_folders`);
    - neither: the bundled demo dataset `demo_dataset` (no network, see `load_demo_dataset`).

    The image column is cast to undecoded images so that `RobustImageDataset` decodes them (and skips bad ones).
    A split named "validation" (or "val"/"test"/"valid") becomes the evaluation split; otherwise `train_val_split`
    (a fraction) is split off the training split. `max_*_samples` keep a seeded random subset.
    """
    import datasets

    if dataset_name is not None and (train_dir is not None or validation_dir is not None):
        raise ValueError("Give either --dataset_name or --train_dir/--validation_dir, not both.")
    if train_val_split is not None and not 0.0 <= train_val_split < 1.0:
        raise ValueError(f"--train_val_split must be a fraction in [0, 1), got {train_val_split}.")

    skipped: list[str] = []
    if dataset_name is not None:
        source = f"{dataset_name}" + (f" ({dataset_config_name})" if dataset_config_name else "")
        loaded = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
        if not isinstance(loaded, datasets.DatasetDict):
            loaded = datasets.DatasetDict({"train": loaded})
        loaded = _rename_eval_split(loaded)
    elif train_dir is not None or validation_dir is not None:
        source = f"image folders train={train_dir} validation={validation_dir}"
        loaded, skipped = load_image_folders(train_dir, validation_dir, verify=verify_images, on_bad_image=on_bad_image)
    else:
        if demo_dataset not in DEMO_DATASETS:
            raise ValueError(f"Unknown demo dataset {demo_dataset!r}; choose one of {DEMO_DATASETS}.")
        source = f"bundled demo dataset '{demo_dataset}'"
        loaded = load_demo_dataset(demo_dataset, image_size=demo_image_size)

    reference_split = "train" if "train" in loaded else next(iter(loaded))
    image_column = resolve_image_column(loaded[reference_split], image_column_name)
    label_column = resolve_label_column(loaded[reference_split], label_column_name, required=require_labels)
    for split in loaded:
        if image_column not in loaded[split].column_names:
            raise ValueError(f"Split {split!r} has no column {image_column!r}; columns: {loaded[split].column_names}.")
        feature = loaded[split].features[image_column]
        if isinstance(feature, datasets.Image) and feature.decode:
            loaded[split] = loaded[split].cast_column(image_column, datasets.Image(decode=False))

    if "validation" not in loaded and train_val_split and "train" in loaded:
        parts = loaded["train"].train_test_split(test_size=train_val_split, seed=seed)
        loaded["train"], loaded["validation"] = parts["train"], parts["test"]
    for split, limit in (("train", max_train_samples), ("validation", max_eval_samples)):
        if limit is not None and split in loaded and limit < len(loaded[split]):
            loaded[split] = loaded[split].shuffle(seed=seed).select(range(limit))
    return LoadedImageData(loaded, image_column, label_column, source, skipped)


def _rename_eval_split(loaded: Any) -> Any:
    if "validation" in loaded:
        return loaded
    for name in ("val", "valid", "test"):
        if name in loaded:
            loaded["validation"] = loaded.pop(name)
            break
    return loaded


# ----------------------------------------------------------------------------------------------------------------
# Bundled demo data (real images shipped by installed packages; no network)
DIGIT_CLASS_NAMES = tuple(str(i) for i in range(10))


def _digits_images(image_size: int) -> tuple[list[Image.Image], list[int]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = []
    for array in digits.images:  # 8x8, values 0..16
        gray = Image.fromarray(np.uint8(np.round(array * (255.0 / 16.0))), mode="L")
        images.append(gray.resize((image_size, image_size), Image.BICUBIC).convert("RGB"))
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
            crop = photo.crop((left, top, left + side, top + side)).resize((image_size, image_size), Image.BICUBIC)
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


def num_batches(num_examples: int, batch_size: int, drop_last: bool) -> int:
    """Batches per epoch of a DataLoader (helper for schedule arithmetic in tests and docs)."""
    return num_examples // batch_size if drop_last else math.ceil(num_examples / batch_size)


__all__ = [
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "IMAGE_EXTENSIONS",
    "DEMO_DATASETS",
    "build_pretrain_transform",
    "to_rgb",
    "decode_image",
    "describe_image",
    "BAD_IMAGE_POLICIES",
    "UnreadableImage",
    "UnreadableImageError",
    "RobustImageDataset",
    "SkipNoneCollator",
    "PretrainCollator",
    "IndexSeededMasks",
    "KeyedMasks",
    "SKIPPED_KEY",
    "verify_image_files",
    "LoadedImageData",
    "scan_image_folder",
    "load_image_folders",
    "resolve_image_column",
    "resolve_label_column",
    "load_image_datasets",
    "load_demo_dataset",
    "num_batches",
]
