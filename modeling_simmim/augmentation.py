"""Finetuning augmentation: the official SimMIM/Swin recipe, built from timm.

- `build_classification_transform(image_size, train=True, ...)`: timm's `create_transform` for training
  (bicubic RandomResizedCrop, horizontal flip with probability `hflip_prob` (official 0.5), RandAugment `rand-m9-mstd0.5-inc1`, random erasing 0.25 in pixel mode; timm
  ignores colour jitter when an auto-augment policy is set, as in the official runs); for evaluation a resize of
  the shorter side to `image_size * 256 / 224` (bicubic) and a centre crop, as the official code does.
- `MixupCollator`: timm's `Mixup` (mixup 0.8, cutmix 1.0, switch prob 0.5, per batch, label smoothing folded into
  the soft targets) applied to collated batches, producing float targets (B, num_labels) for soft-target
  cross-entropy. Batches must have an even size (timm flips the batch to pair examples). When the examples carry
  their keys (training, see `modeling_simmim.randomness`), a batch's lambda, mode and box are seeded from its keys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T
from transformers.utils import logging

from .images import to_rgb
from .randomness import EXAMPLE_KEY_FIELD, batch_seed, seeded_global_rngs

logger = logging.get_logger(__name__)


def eval_resize_size(image_size: int) -> int:
    """Shorter side before the centre crop at evaluation: int(image_size * 256 / 224), as the official code."""
    return int((256 / 224) * image_size)


def check_flip_probability(hflip_prob: float) -> None:
    """A clear error for a flip probability outside [0, 1] (the --hflip_prob flag of both scripts)."""
    if not 0.0 <= hflip_prob <= 1.0:
        raise ValueError(
            f"--hflip_prob is a probability in [0, 1] (official 0.5, 0 turns the flip off), got {hflip_prob}."
        )


def _posterize(image: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """timm's posterize with the Pillow semantics the official runs had: keeping 0 bits gives a black image.

    RandAugment `rand-m9-mstd0.5` draws magnitudes up to 10, where timm asks for 0 bits; Pillow >= 12 rejects that
    with `ValueError` (older Pillow returned black), which would make the dataset skip the image as unreadable."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits_to_keep)


def _patch_posterize(transform) -> None:
    for step in getattr(transform, "transforms", []):
        for op in getattr(step, "ops", []):  # timm RandAugment / AutoAugment ops
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = _posterize


def build_classification_transform(
    image_size: int,
    train: bool = True,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    interpolation: str = "bicubic",
    random_erasing: float = 0.25,
    random_erasing_mode: str = "pixel",
    random_erasing_count: int = 1,
    color_jitter: float | None = 0.4,
    crop_scale: Sequence[float] = (0.08, 1.0),
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    hflip_prob: float = 0.5,
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL image -> normalized (3, image_size, image_size) tensor, training (timm) or evaluation (resize + crop).

    `hflip_prob`: probability of the training flip (official 0.5; 0 where a mirrored image is another class, as
    for digits and letters)."""
    check_flip_probability(hflip_prob)
    if train:
        from timm.data import create_transform

        scale_low, scale_high = crop_scale  # area fractions of the random crop
        transform = create_transform(
            input_size=image_size,
            is_training=True,
            color_jitter=color_jitter if color_jitter else None,  # type: ignore[arg-type]  # timm reads None as off
            auto_augment=auto_augment if auto_augment and auto_augment != "none" else None,
            interpolation=interpolation,
            hflip=hflip_prob,
            re_prob=random_erasing,
            re_mode=random_erasing_mode,
            re_count=random_erasing_count,
            scale=(scale_low, scale_high),
            mean=tuple(mean),
            std=tuple(std),
        )
        _patch_posterize(transform)
    else:
        resample = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}[interpolation]
        transform = T.Compose(
            [
                T.Resize(eval_resize_size(image_size), interpolation=resample),
                T.CenterCrop(image_size),
                T.ToTensor(),
                T.Normalize(mean, std),
            ]
        )
    # the official pipeline converts every image to RGB first (grayscale / RGBA / palette files exist in ImageNet)
    return T.Compose([T.Lambda(to_rgb), transform])


def collate_classification(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack {"pixel_values": CHW, "labels": int} examples into a batch (no mixing; evaluation)."""
    batch = {"pixel_values": torch.stack([example["pixel_values"] for example in examples])}
    if "labels" in examples[0]:
        batch["labels"] = torch.as_tensor([example["labels"] for example in examples], dtype=torch.long)
    return batch


class MixupCollator:
    """Collate, then mix the batch with timm's `Mixup`: labels become soft targets (B, num_labels) (float).

    timm pairs each example with its mirror in the flipped batch, so a batch must be even: train with
    `dataloader_drop_last=True` and an even per-device batch size. A batch that turns odd because an unreadable
    image was skipped loses its last example (logged) instead of crashing the run.

    timm draws from numpy's global RNG; when every example carries its `ExampleKey` (under "example_key"), the draw
    runs seeded from the ordered keys of the batch (`batch_seed`), so the mixing of a micro-batch is a function of
    its examples, not of the process's RNG history.
    """

    def __init__(
        self,
        num_labels: int,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        cutmix_minmax: Sequence[float] | None = None,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        mode: str = "batch",
        label_smoothing: float = 0.1,
    ) -> None:
        from timm.data import Mixup

        self.num_labels = num_labels
        self.mixup = Mixup(
            mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
            cutmix_minmax=list(cutmix_minmax) if cutmix_minmax else None,
            prob=prob,
            switch_prob=switch_prob,
            mode=mode,
            label_smoothing=label_smoothing,
            num_classes=num_labels,
        )

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if len(examples) % 2:
            if len(examples) == 1:
                raise ValueError(
                    "Mixup/CutMix needs at least 2 images per batch: raise --per_device_train_batch_size."
                )
            logger.warning("Mixup needs an even batch: dropping 1 of %d examples", len(examples))
            examples = examples[:-1]
        batch = collate_classification(examples)
        keys = [key for example in examples if (key := example.get(EXAMPLE_KEY_FIELD)) is not None]
        if len(keys) == len(examples):
            with seeded_global_rngs(batch_seed(keys, "mixup")):
                batch["pixel_values"], batch["labels"] = self.mixup(batch["pixel_values"], batch["labels"])
        else:
            batch["pixel_values"], batch["labels"] = self.mixup(batch["pixel_values"], batch["labels"])
        return batch


def mixup_active(mixup: float, cutmix: float, cutmix_minmax: Sequence[float] | None = None) -> bool:
    """Whether the recipe mixes images at all (official rule)."""
    return mixup > 0 or cutmix > 0 or cutmix_minmax is not None


__all__ = [
    "build_classification_transform",
    "check_flip_probability",
    "collate_classification",
    "eval_resize_size",
    "MixupCollator",
    "mixup_active",
]
