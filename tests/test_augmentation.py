"""Finetuning augmentation (modeling_simmim/augmentation.py): official timm recipe values, eval crop, Mixup."""

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_simmim.augmentation import (
    MixupCollator,
    build_classification_transform,
    collate_classification,
    eval_resize_size,
)


def _names(transform):
    return [type(step).__name__ for step in transform.transforms[1].transforms]


def test_train_transform_is_the_official_timm_recipe():
    transform = build_classification_transform(64, train=True)
    steps = transform.transforms[1].transforms
    names = _names(transform)
    assert names[0] == "RandomResizedCropAndInterpolation" and "bicubic" in repr(steps[0])
    assert tuple(steps[0].scale) == (0.08, 1.0)
    narrow = build_classification_transform(64, train=True, crop_scale=(0.5, 1.0))
    assert tuple(narrow.transforms[1].transforms[0].scale) == (0.5, 1.0)
    assert "RandomHorizontalFlip" in names and "RandAugment" in names
    assert "ColorJitter" not in names  # timm drops colour jitter when an auto-augment policy is set
    rand_augment = steps[names.index("RandAugment")]
    assert rand_augment.num_layers == 2 and {op.magnitude for op in rand_augment.ops} == {9}
    assert {op.magnitude_std for op in rand_augment.ops} == {0.5}
    assert any(op.name == "PosterizeIncreasing" for op in rand_augment.ops)  # "inc1": increasing variants
    erasing = steps[names.index("RandomErasing")]
    assert erasing.probability == 0.25 and erasing.mode == "pixel"
    image = Image.fromarray(np.uint8(np.random.default_rng(0).random((50, 70)) * 255), mode="L")  # grayscale input
    assert transform(image).shape == (3, 64, 64)
    no_aa = build_classification_transform(64, train=True, auto_augment="none")
    assert "ColorJitter" in _names(no_aa) and "RandAugment" not in _names(no_aa)


def test_posterize_at_full_magnitude_does_not_fail():
    """timm asks for 0 bits at magnitude 10; Pillow >= 12 raises there. The image must become black, not be lost."""
    transform = build_classification_transform(32, train=True)
    rand_augment = next(s for s in transform.transforms[1].transforms if type(s).__name__ == "RandAugment")
    op = next(op for op in rand_augment.ops if op.name == "PosterizeIncreasing")
    image = Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8))
    out = op.aug_fn(image, 0)
    assert np.asarray(out).max() == 0
    assert np.asarray(op.aug_fn(image, 4)).max() == 192


def test_eval_transform_resizes_256_224_and_center_crops():
    assert eval_resize_size(224) == 256 and eval_resize_size(192) == 219
    transform = build_classification_transform(224, train=False)
    steps = transform.transforms[1].transforms
    assert steps[0].size == 256 and "BICUBIC" in str(steps[0].interpolation)
    assert type(steps[1]).__name__ == "CenterCrop" and tuple(steps[1].size) == (224, 224)
    # a centred square: what survives the crop is the centre of the resized image
    image = Image.new("RGB", (300, 300), (0, 0, 0))
    image.paste((255, 255, 255), (75, 75, 225, 225))
    out = build_classification_transform(224, train=False, mean=(0, 0, 0), std=(1, 1, 1))(image)
    assert out.shape == (3, 224, 224)
    assert out[:, 112, 112].min() > 0.99 and out[:, 2, 2].max() < 0.01


def test_mixup_collator_batches():
    torch.manual_seed(0)
    np.random.seed(0)
    examples = [{"pixel_values": torch.full((3, 8, 8), float(i)), "labels": i} for i in range(4)]
    plain = collate_classification(examples)
    assert plain["labels"].tolist() == [0, 1, 2, 3] and plain["pixel_values"].shape == (4, 3, 8, 8)
    collator = MixupCollator(num_labels=4, mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1)
    batch = collator(examples)
    assert batch["labels"].shape == (4, 4)
    torch.testing.assert_close(batch["labels"].sum(-1), torch.ones(4))
    # mixup per batch: image 0 = lam * image 0 + (1 - lam) * image 3 (timm pairs with the flipped batch)
    lam = 1 - batch["pixel_values"][0].mean().item() / 3
    torch.testing.assert_close(batch["pixel_values"][0], torch.full((3, 8, 8), 3 * (1 - lam)), atol=1e-5, rtol=0)
    on, off = 1 - 0.1 + 0.1 / 4, 0.1 / 4  # label smoothing 0.1 folded into the one-hot targets
    expected = torch.tensor([lam * on + (1 - lam) * off, off, off, lam * off + (1 - lam) * on])
    torch.testing.assert_close(batch["labels"][0], expected, atol=1e-5, rtol=0)
    odd = collator([{"pixel_values": torch.zeros(3, 8, 8), "labels": 0} for _ in range(3)])
    assert odd["pixel_values"].shape[0] == 2  # an odd batch (skipped image) loses one example instead of failing
    with pytest.raises(ValueError, match="at least 2 images"):
        collator([{"pixel_values": torch.zeros(3, 8, 8), "labels": 0}])


def test_horizontal_flip_probability_is_a_setting():
    """`hflip_prob` (the scripts' --hflip_prob): 0.5 official, 0 removes the flip (digits: a mirrored digit is another
    shape), 1 always mirrors; outside [0, 1] is an error naming the flag."""
    flips = [
        step
        for step in build_classification_transform(32, train=True).transforms[1].transforms
        if type(step).__name__ == "RandomHorizontalFlip"
    ]
    assert len(flips) == 1 and flips[0].p == 0.5
    assert "RandomHorizontalFlip" not in _names(build_classification_transform(32, train=True, hflip_prob=0.0))
    # a left/right ramp: with the flip always on (and nothing else random), the output is the mirrored ramp
    ramp = Image.fromarray(np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1)), mode="L")
    common = dict(train=True, auto_augment="none", color_jitter=0.0, random_erasing=0.0, crop_scale=(1.0, 1.0))
    kept = build_classification_transform(32, hflip_prob=0.0, **common)(ramp)
    mirrored = build_classification_transform(32, hflip_prob=1.0, **common)(ramp)
    assert kept[0, 0, 0] < kept[0, 0, -1]
    torch.testing.assert_close(mirrored, kept.flip(-1))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="--hflip_prob"):
            build_classification_transform(32, train=True, hflip_prob=bad)
