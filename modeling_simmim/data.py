"""Image data for SimMIM: dataset loading (Hub, image folders, a bundled demo set), the official pretraining
transform, and robust decoding that skips unreadable images instead of crashing a run.

Loading returns a `datasets.DatasetDict` whose image column holds *undecoded* images (`Image(decode=False)` for
Hub data, file paths for folders): decoding happens in `RobustImageDataset.__getitem__`, inside a `try`, so that
one corrupt file is skipped with a warning naming it and counted, rather than raising deep inside `datasets`.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T
from transformers.utils import logging

from .configuration_simmim import size_pair
from .demo_data import DEMO_DATASETS, load_demo_dataset
from .images import UnreadableImageError, decode_image, to_rgb
from .masking import SimMIMMaskGenerator
from .randomness import EXAMPLE_KEY_FIELD, ExampleKey, keyed_rngs, mix_seed
from .streaming import StreamFiller

logger = logging.get_logger(__name__)

# torchvision's ImageFolder list plus a few formats PIL reads.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")

# Column names tried, in order, when `image_column_name` is not given and no column has the `Image` feature type.
_IMAGE_COLUMN_GUESSES = ("image", "img", "pixel_values", "jpg", "png", "webp")
_LABEL_COLUMN_GUESSES = ("label", "labels", "fine_label", "class", "cls")


# ----------------------------------------------------------------------------------------------------------------
# Transforms
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
    size = size_pair(image_size)
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
        return image.resize(new_size, Image.Resampling.BILINEAR)

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
    return UnreadableImageError(
        f"Unreadable image {name}: {type(error).__name__}: {error} (remove or fix the file, "
        "or pass --on_bad_image skip to train without it)."
    )


class UnreadableImage(NamedTuple):
    """What `RobustImageDataset` returns in place of an image it cannot decode: the collator drops it and reports its
    index, so that the trainer counts each unreadable file once however often it is drawn."""

    index: int  # type: ignore[assignment]  # shadows tuple.index on purpose, like ExampleKey.index
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
        index = item.index if isinstance(item, ExampleKey) else int(item)
        return self.example_from_row(self.dataset[index], index, key)

    def example_from_row(
        self, row: dict[str, Any], index: int, key: ExampleKey | None = None
    ) -> dict[str, Any] | UnreadableImage:
        """The example of one row (decoded, transformed, keyed by `key` when given), or an `UnreadableImage`."""
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


def stream_example_id(row: dict[str, Any], image_column: str) -> str:
    """A name of a streamed example that does not depend on where it is read (process, worker, position): the shard
    file name and sample key of WebDataset-style tar shards (`__url__`, `__key__`), else the image's path, else a
    hash of its bytes."""
    if row.get("__key__") is not None:
        url = row.get("__url__")
        return f"{os.path.basename(str(url))}/{row['__key__']}" if url else str(row["__key__"])
    value = row.get(image_column)
    path = describe_image(value)
    if path != "<in-memory image>":
        return path
    data = value.get("bytes") if isinstance(value, dict) else value if isinstance(value, bytes) else None
    if data is None:
        raise ValueError(f"Cannot name a streamed example without a path or bytes in column {image_column!r}.")
    return "blake2b:" + hashlib.blake2b(data, digest_size=16).hexdigest()


class StreamingImageDataset(torch.utils.data.IterableDataset):
    """An image stream (a `datasets.IterableDataset`, e.g. `load_dataset(..., streaming=True)` or WebDataset tar
    shards) decoded and transformed like `RobustImageDataset` (same `on_bad_image` policy, keyed augmentations and
    masks).

    The trainer calls `for_process(seed, rank, world_size)`: the stream is shuffled with the data seed (shard order +
    a buffer of `shuffle_buffer_size` examples, 0 = no shuffle; the same on every process, so shards are not read
    twice) and split with `datasets.distributed.split_dataset_by_node` (whole shards per process when their number is
    a multiple of the processes, else every `world_size`-th example); DataLoader workers then read disjoint shards.

    Per-example randomness is keyed by (seed, epoch, `stream_example_id`): an example gets the same crop, flip and
    mask in an epoch whatever process or worker reads it. Which examples share a batch depends on the number of
    processes and workers (the shard split), so a streamed run is reproducible for a fixed launch, not world-size
    invariant. `set_epoch` (called by the trainer's DataLoader) reshuffles (seed + epoch) and re-keys; `start_at`
    fast-forwards each worker to a saved position (`streaming.StreamDataLoader`, for exact resume).
    """

    accepts_example_keys = True

    def __init__(
        self,
        stream: Any,
        image_column: str,
        transform: Callable[[Image.Image], torch.Tensor],
        label_column: str | None = None,
        on_bad_image: BadImagePolicy = "skip",
        keyed_fn: Callable[[ExampleKey, dict[str, Any]], dict[str, Any]] | None = None,
        shuffle_buffer_size: int = 0,
    ) -> None:
        if shuffle_buffer_size < 0:
            raise ValueError(f"--shuffle_buffer_size must be >= 0, got {shuffle_buffer_size}.")
        self.stream = stream
        self.image_column = image_column
        self.shuffle_buffer_size = int(shuffle_buffer_size)
        self.decoder = RobustImageDataset(
            [], image_column, transform, label_column, on_bad_image=on_bad_image, keyed_fn=keyed_fn
        )
        self.seed = 0
        self.epoch = 0
        self._rows_to_skip: dict[int, int] = {}
        self._filler_workers: tuple[int, ...] = ()
        self._filler_size = 0

    def for_process(self, seed: int, rank: int, world_size: int) -> StreamingImageDataset:
        """This process's part of the stream, shuffled with `seed` (see the class docstring)."""
        from datasets.distributed import split_dataset_by_node

        stream = self.stream
        if self.shuffle_buffer_size:
            stream = stream.shuffle(seed=seed, buffer_size=self.shuffle_buffer_size)
        if world_size > 1:
            stream = split_dataset_by_node(stream, rank=rank, world_size=world_size)
        part = copy.copy(self)
        part.stream, part.seed, part.epoch = stream, int(seed), 0
        return part

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.stream, "set_epoch"):
            self.stream.set_epoch(self.epoch)

    def start_at(self, rows_to_skip: dict[int, int], filler_workers: Sequence[int] = (), filler_size: int = 0) -> None:
        """Make the next pass start, in DataLoader worker w (0 without workers), after its first `rows_to_skip[w]`
        rows (read, not decoded), and in the `filler_workers` with `filler_size` `StreamFiller`s (one batch, which the
        loader drops). `start_at({})` starts every worker at the beginning."""
        self._rows_to_skip = {int(worker): int(rows) for worker, rows in rows_to_skip.items()}
        self._filler_workers, self._filler_size = tuple(int(w) for w in filler_workers), int(filler_size)

    def example_id(self, row: dict[str, Any]) -> str:
        return stream_example_id(row, self.image_column)

    def __iter__(self) -> Iterator[dict[str, Any] | UnreadableImage | StreamFiller]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        if worker in self._filler_workers:
            yield from (StreamFiller(worker) for _ in range(self._filler_size))
        rows = iter(self.stream)
        for _ in range(self._rows_to_skip.get(worker, 0)):
            if next(rows, None) is None:
                return
        for row in rows:
            name = self.example_id(row)
            key = ExampleKey(self.seed, self.epoch, mix_seed("example", name))
            value = row.get(self.image_column)
            if isinstance(value, dict):  # warnings and errors name "shard.tar/key", not the member name alone
                row = {**row, self.image_column: {**value, "path": name}}
            # the key's index names the example (63 bits): unreadable ones are counted once by it
            yield self.decoder.example_from_row(row, key.index, key)


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
        skipped = [
            example.index if isinstance(example, UnreadableImage) else -1
            for example in examples
            if example is None or isinstance(example, UnreadableImage)
        ]
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
            batch = {
                key: torch.stack([torch.as_tensor(example[key]) for example in examples])
                for key in ("pixel_values", "bool_masked_pos")
            }
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
    train_dir: str | None,
    validation_dir: str | None = None,
    verify: bool = True,
    on_bad_image: BadImagePolicy = "skip",
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
        assert reference is not None  # with_labels: every split has labels
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

    columns = list(dataset.column_names or [])
    if requested is not None:
        if requested not in columns:
            raise ValueError(f"--image_column_name {requested!r} is not a column of the dataset; columns: {columns}.")
        return requested
    for name, feature in (dataset.features or {}).items():
        if isinstance(feature, datasets.Image):
            return name
    for name in _IMAGE_COLUMN_GUESSES:
        if name in columns:
            return name
    raise ValueError(f"Cannot find an image column among {columns}: pass --image_column_name.")


def resolve_label_column(dataset: Any, requested: str | None = None, required: bool = False) -> str | None:
    """The label column: `requested` if given (must exist), else a ClassLabel column, else a conventional name."""
    import datasets

    columns = list(dataset.column_names or [])
    if requested is not None:
        if requested not in columns:
            raise ValueError(f"--label_column_name {requested!r} is not a column of the dataset; columns: {columns}.")
        return requested
    for name, feature in (dataset.features or {}).items():
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
    data_files: str | Sequence[str] | None = None,
    streaming: bool = False,
) -> LoadedImageData:
    """Load the data a run trains on, from exactly one source:

    - `dataset_name` (+ `dataset_config_name`): `datasets.load_dataset` (Hub id, local script or packaged builder);
    - `train_dir` / `validation_dir`: image folders of any nesting (see `load_image_folders`);
    - neither: the bundled demo dataset `demo_dataset` (no network, see `load_demo_dataset`).

    `data_files` (with `dataset_name`, e.g. "webdataset", "imagefolder", "parquet"): the training files (globs
    allowed). `streaming=True` (with `dataset_name`): the splits are `datasets.IterableDataset`s read as they are
    consumed (see `StreamingImageDataset`); `max_*_samples` then keep the first examples of the stream, and
    `train_val_split` is refused.

    The image column is cast to undecoded images so that `RobustImageDataset` decodes them (and skips bad ones).
    A split named "validation" (or "val"/"test"/"valid") becomes the evaluation split; otherwise `train_val_split`
    (a fraction) is split off the training split. `max_*_samples` keep a seeded random subset.
    """
    import datasets

    _check_data_source(dataset_name, train_dir, validation_dir, train_val_split, data_files, streaming)
    skipped: list[str] = []
    if dataset_name is not None:
        source = f"{dataset_name}" + (f" ({dataset_config_name})" if dataset_config_name else "")
        files = None
        if data_files:
            files = {"train": [data_files] if isinstance(data_files, str) else list(data_files)}
            source += f" files {files['train']}"
            _check_local_data_files(files["train"])
        loaded = datasets.load_dataset(
            dataset_name, dataset_config_name, data_files=files, cache_dir=cache_dir, streaming=streaming
        )
        if not isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
            loaded = (datasets.IterableDatasetDict if streaming else datasets.DatasetDict)({"train": loaded})
        loaded = _rename_eval_split(loaded)
    elif train_dir is not None or validation_dir is not None:
        source = f"image folders train={train_dir} validation={validation_dir}"
        loaded, skipped = load_image_folders(
            train_dir, validation_dir, verify=verify_images, on_bad_image=on_bad_image
        )
    else:
        if demo_dataset not in DEMO_DATASETS:
            raise ValueError(f"Unknown demo dataset {demo_dataset!r}; choose one of {DEMO_DATASETS}.")
        source = f"bundled demo dataset '{demo_dataset}'"
        loaded = load_demo_dataset(demo_dataset, image_size=demo_image_size)

    reference_split = "train" if "train" in loaded else next(iter(loaded))
    image_column = resolve_image_column(loaded[reference_split], image_column_name)
    label_column = resolve_label_column(loaded[reference_split], label_column_name, required=require_labels)
    for split in loaded:
        if image_column not in (loaded[split].column_names or []):
            raise ValueError(f"Split {split!r} has no column {image_column!r}; columns: {loaded[split].column_names}.")
        feature = loaded[split].features[image_column]
        if isinstance(feature, datasets.Image) and feature.decode:
            loaded[split] = loaded[split].cast_column(image_column, datasets.Image(decode=False))

    _split_and_subsample(loaded, train_val_split, max_train_samples, max_eval_samples, seed, streaming)
    return LoadedImageData(loaded, image_column, label_column, source, skipped)


def _check_data_source(dataset_name, train_dir, validation_dir, train_val_split, data_files, streaming) -> None:
    """Refuse source combinations that cannot work, naming the flags."""
    if dataset_name is not None and (train_dir is not None or validation_dir is not None):
        raise ValueError("Give either --dataset_name or --train_dir/--validation_dir, not both.")
    if train_val_split is not None and not 0.0 <= train_val_split < 1.0:
        raise ValueError(f"--train_val_split must be a fraction in [0, 1), got {train_val_split}.")
    if dataset_name is None and (streaming or data_files):
        raise ValueError(
            "--streaming and --data_files read a datasets source: give --dataset_name too (e.g. "
            "'webdataset' with --data_files 'shards/train-*.tar')."
        )
    if streaming and train_val_split:
        raise ValueError(
            "--train_val_split needs the whole training split: not with --streaming (give a dataset "
            "with a validation split)."
        )


def _split_and_subsample(
    loaded, train_val_split, max_train_samples, max_eval_samples, seed: int, streaming: bool
) -> None:
    """Split a validation part off the training split when there is none; keep `max_*_samples` (a seeded random
    subset, or the first examples of a stream)."""
    if "validation" not in loaded and train_val_split and "train" in loaded:
        parts = loaded["train"].train_test_split(test_size=train_val_split, seed=seed)
        loaded["train"], loaded["validation"] = parts["train"], parts["test"]
    for split, limit in (("train", max_train_samples), ("validation", max_eval_samples)):
        if limit is not None and split in loaded and streaming:
            loaded[split] = loaded[split].take(limit)
        elif limit is not None and split in loaded and limit < len(loaded[split]):
            loaded[split] = loaded[split].shuffle(seed=seed).select(range(limit))


def _check_local_data_files(patterns: Sequence[str]) -> None:
    # datasets' webdataset builder fails with an IndexError on an empty shard list: name the pattern instead.
    # Remote patterns (hf://, https://, s3://) are left to datasets.
    for pattern in patterns:
        if "://" not in pattern and not glob.glob(os.path.expanduser(pattern), recursive=True):
            raise FileNotFoundError(f"--data_files {pattern!r} matches no file.")


def _rename_eval_split(loaded: Any) -> Any:
    if "validation" in loaded:
        return loaded
    for name in ("val", "valid", "test"):
        if name in loaded:
            loaded["validation"] = loaded.pop(name)
            break
    return loaded


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
    "StreamingImageDataset",
    "stream_example_id",
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
