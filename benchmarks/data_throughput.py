#!/usr/bin/env python
"""Images per second of one data-loading worker: our pretraining input pipeline vs transformers' run_mim example.

Both pipelines read the same JPEGs (ImageNet-like, 500x375 by default, made at run time from the photos that
scikit-image / scikit-learn ship), decode them with PIL, apply the official SimMIM augmentation (RGB,
RandomResizedCrop(scale 0.67-1, ratio 3/4-4/3), flip, ToTensor, Normalize) and build a batch with masks:

- ours: `RobustImageDataset` (guarded decode) + `PretrainCollator(SimMIMDataCollator)`, which draws the masks of a
  whole batch in one vectorized torch call;
- ours, keyed (what training runs): the same dataset indexed with `ExampleKey`s, so the augmentation runs with the
  global RNGs seeded from the key and restored, and each mask comes from its own seeded generator (`KeyedMasks`);
- transformers: the example's transform and its `MaskGenerator` re-implemented below (numpy permutation and
  `repeat`, one call per image, converted with `torch.tensor`), stacked by its `collate_fn`.

Run in one process (= one DataLoader worker) so the numbers are per worker; `--num_workers N` also measures a
DataLoader with N worker processes (total images/s). `--timer cpu` counts this process's CPU time instead of wall
time (steadier on a shared machine). Prints a table, or JSON with `--json`.

    python benchmarks/data_throughput.py --num_images 256 --batch_size 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from modeling_simmim import SimMIMDataCollator, SimMIMMaskGenerator  # noqa: E402
from modeling_simmim.data import (  # noqa: E402
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    KeyedMasks,
    PretrainCollator,
    RobustImageDataset,
    build_pretrain_transform,
    load_image_folders,
)
from modeling_simmim.demo_data import _bundled_photos  # noqa: E402
from modeling_simmim.randomness import ExampleKey  # noqa: E402

CLOCK = time.perf_counter  # set by `run(timer=...)`


# ---- the transformers example's pipeline (baseline), re-implemented ---------------------------------------------------
class ExampleMaskGenerator:
    """transformers/examples/pytorch/image-pretraining/run_mim.py `MaskGenerator`: one numpy draw per image."""

    def __init__(self, input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6):
        self.rand_size = input_size // mask_patch_size
        self.scale = mask_patch_size // model_patch_size
        self.token_count = self.rand_size**2
        self.mask_count = int(np.ceil(self.token_count * mask_ratio))

    def __call__(self):
        mask_idx = np.random.permutation(self.token_count)[: self.mask_count]
        mask = np.zeros(self.token_count, dtype=int)
        mask[mask_idx] = 1
        mask = mask.reshape((self.rand_size, self.rand_size)).repeat(self.scale, axis=0).repeat(self.scale, axis=1)
        return torch.tensor(mask.flatten())


class ExampleDataset(torch.utils.data.Dataset):
    """The example's `set_transform(preprocess_images)` on an image folder: decode, transform, one mask per image."""

    def __init__(self, paths, image_size, mask_generator):
        from torchvision.transforms import (
            Compose,
            Lambda,
            Normalize,
            RandomHorizontalFlip,
            RandomResizedCrop,
            ToTensor,
        )

        self.paths = paths
        self.mask_generator = mask_generator
        self.transform = Compose(
            [
                Lambda(lambda img: img.convert("RGB") if img.mode != "RGB" else img),
                RandomResizedCrop(image_size, scale=(0.67, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)),
                RandomHorizontalFlip(),
                ToTensor(),
                Normalize(mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD),
            ]
        )

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        image = Image.open(self.paths[index])
        return {"pixel_values": self.transform(image), "mask": self.mask_generator()}


def example_collate(examples):
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
        "bool_masked_pos": torch.stack([e["mask"] for e in examples]),
    }


# ---- data ----------------------------------------------------------------------------------------------------------
def make_jpegs(folder: str, count: int, width: int, height: int, quality: int = 90) -> list[str]:
    """`count` JPEGs of width x height cut from the bundled photos (real image statistics, so decode cost is real)."""
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(np.ascontiguousarray(array)) for _, array in _bundled_photos()]
    paths = []
    for i in range(count):
        photo = photos[i % len(photos)]
        scale = max(width / photo.width, height / photo.height) * rng.uniform(1.0, 1.5)
        resized = photo.resize((int(photo.width * scale) + 1, int(photo.height * scale) + 1), Image.BICUBIC)
        left = int(rng.integers(0, resized.width - width + 1))
        top = int(rng.integers(0, resized.height - height + 1))
        path = os.path.join(folder, f"class{i % 4}", f"{i:05d}.jpg")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        resized.crop((left, top, left + width, top + height)).convert("RGB").save(path, quality=quality)
        paths.append(path)
    return paths


# ---- measurement -----------------------------------------------------------------------------------------------------
def _time_batches(dataset, collate, batch_size: int, repeats: int, index=lambda i: i) -> float:
    """Images/s of fetching every example of `dataset` (at `index(i)`) and collating batches, in this process (best
    of `repeats`)."""
    best = 0.0
    n = len(dataset)
    for _ in range(repeats):
        start = CLOCK()
        for begin in range(0, n, batch_size):
            collate([dataset[index(i)] for i in range(begin, min(begin + batch_size, n))])
        best = max(best, n / (CLOCK() - start))
    return best


def _time_loader(dataset, collate, batch_size: int, num_workers: int) -> float:
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=collate, persistent_workers=False
    )
    for _ in loader:  # warm-up: start workers, fill caches
        break
    start = time.perf_counter()
    count = sum(batch["pixel_values"].shape[0] for batch in loader)
    return count / (time.perf_counter() - start)


def _time_stage(fn, count: int, repeats: int) -> float:
    best = 0.0
    for _ in range(repeats):
        start = CLOCK()
        for i in range(count):
            fn(i)
        best = max(best, count / (CLOCK() - start))
    return best


def run(
    num_images: int,
    batch_size: int,
    image_size: int,
    width: int,
    height: int,
    repeats: int,
    num_workers: int,
    timer: str = "wall",
) -> dict[str, Any]:
    global CLOCK
    CLOCK = time.process_time if timer == "cpu" else time.perf_counter
    torch.set_num_threads(1)  # a DataLoader worker runs single-threaded
    with tempfile.TemporaryDirectory() as folder:
        paths = make_jpegs(folder, num_images, width, height)
        loaded, _ = load_image_folders(folder, verify=False)
        generator = SimMIMMaskGenerator(image_size, 32, 4, 0.6)
        ours = RobustImageDataset(loaded["train"], "image", build_pretrain_transform(image_size))
        ours_collate = PretrainCollator(SimMIMDataCollator(generator))
        keyed = RobustImageDataset(
            loaded["train"], "image", build_pretrain_transform(image_size), keyed_fn=KeyedMasks(generator)
        )

        def key(index: int) -> ExampleKey:
            return ExampleKey(seed=0, epoch=0, index=index)

        example_masks = ExampleMaskGenerator(image_size, 32, 4, 0.6)
        baseline = ExampleDataset(paths, image_size, example_masks)

        # one warm-up pass (page cache, lazy imports)
        _time_batches(ours, ours_collate, batch_size, 1)
        _time_batches(keyed, ours_collate, batch_size, 1, key)
        _time_batches(baseline, example_collate, batch_size, 1)
        timings: dict[str, list[float]] = {"ours": [], "ours_keyed": [], "transformers_run_mim": []}
        for _ in range(repeats):  # interleaved, so that a busy moment does not favour one pipeline
            timings["ours"].append(_time_batches(ours, ours_collate, batch_size, 1))
            timings["ours_keyed"].append(_time_batches(keyed, ours_collate, batch_size, 1, key))
            timings["transformers_run_mim"].append(_time_batches(baseline, example_collate, batch_size, 1))
        results: dict[str, Any] = {"pipeline_images_per_second": {name: max(v) for name, v in timings.items()}}
        decoded = [Image.open(path).convert("RGB") for path in paths]
        transform = build_pretrain_transform(image_size)
        results["stage_images_per_second"] = {
            "decode_jpeg": _time_stage(lambda i: Image.open(paths[i]).convert("RGB"), num_images, repeats),
            "augment": _time_stage(lambda i: transform(decoded[i]), num_images, repeats),
            "mask_ours_batched": _time_stage(
                lambda i: generator(batch_size) if i % batch_size == 0 else None, num_images, repeats
            ),
            "mask_ours_keyed_per_image": _time_stage(lambda i: generator.seeded_mask(i), num_images, repeats),
            "mask_transformers_per_image": _time_stage(lambda i: example_masks(), num_images, repeats),
        }
        if num_workers > 0:
            results["dataloader_images_per_second"] = {
                "workers": num_workers,
                "ours": _time_loader(ours, ours_collate, batch_size, num_workers),
                "transformers_run_mim": _time_loader(baseline, example_collate, batch_size, num_workers),
            }
    results["setup"] = {
        "num_images": num_images,
        "jpeg_size": f"{width}x{height}",
        "image_size": image_size,
        "batch_size": batch_size,
        "repeats": repeats,
        "timer": timer,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
    }
    return results


def format_table(results: dict[str, Any]) -> str:
    setup = results["setup"]
    lines = [
        f"Input pipeline, one worker: {setup['num_images']} JPEGs {setup['jpeg_size']} -> "
        f"{setup['image_size']} px, batches of {setup['batch_size']} (best of {setup['repeats']}, "
        f"{setup['timer']} time)",
        "",
        "| pipeline | images/s per worker |",
        "|---|---:|",
    ]
    pipelines = results["pipeline_images_per_second"]
    lines.append(f"| ours (robust decode + official augmentation + batched masks) | {pipelines['ours']:.0f} |")
    lines.append(
        f"| ours, keyed (as in training: seeded augmentation, per-image seeded masks) | "
        f"{pipelines['ours_keyed']:.0f} |"
    )
    lines.append(
        f"| transformers run_mim (same augmentation + per-image numpy masks) | "
        f"{pipelines['transformers_run_mim']:.0f} |"
    )
    lines += ["", "| stage | images/s |", "|---|---:|"]
    for name, value in results["stage_images_per_second"].items():
        lines.append(f"| {name} | {value:.0f} |")
    if "dataloader_images_per_second" in results:
        loader = results["dataloader_images_per_second"]
        lines += [
            "",
            f"DataLoader with {loader['workers']} workers (total images/s): ours {loader['ours']:.0f}, "
            f"transformers run_mim {loader['transformers_run_mim']:.0f}",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_images", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=192)
    parser.add_argument("--jpeg_width", type=int, default=500)
    parser.add_argument("--jpeg_height", type=int, default=375)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num_workers", type=int, default=0, help="Also time a DataLoader with this many workers.")
    parser.add_argument(
        "--timer",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: elapsed time; cpu: this process's CPU time (steadier on a shared machine).",
    )
    parser.add_argument("--json", action="store_true", help="Print the results as JSON.")
    args = parser.parse_args(argv)
    results = run(
        args.num_images,
        args.batch_size,
        args.image_size,
        args.jpeg_width,
        args.jpeg_height,
        args.repeats,
        args.num_workers,
        args.timer,
    )
    print(json.dumps(results, indent=2) if args.json else format_table(results))
    return results


if __name__ == "__main__":
    main()
