import logging
import math

import pytest
import torch

from modeling_simmim import SimMIMConfig, SimMIMDataCollator, SimMIMMaskGenerator


def _blocks(mask: torch.Tensor, scale: int) -> torch.Tensor:
    """(B, H/p, W/p) model-patch mask -> (B, H/mp, W/mp) mask-patch mask, checking each block is constant."""
    batch, height, width = mask.shape
    blocks = mask.view(batch, height // scale, scale, width // scale, scale)
    first = blocks[:, :, :1, :, :1]
    assert torch.equal(blocks, first.expand_as(blocks)), "a 32-px mask patch is not uniformly masked"
    return first[:, :, 0, :, 0]


def test_official_counts_and_block_structure():
    generator = SimMIMMaskGenerator(input_size=192, mask_patch_size=32, model_patch_size=4, mask_ratio=0.6)
    mask = generator(16)
    assert mask.dtype == torch.bool and mask.shape == (16, 48, 48)
    blocks = _blocks(mask, 8)
    assert blocks.shape == (16, 6, 6)
    expected = math.ceil(0.6 * 36)  # 22 of 36 blocks
    assert blocks.flatten(1).sum(1).tolist() == [expected] * 16
    assert mask.flatten(1).sum(1).tolist() == [expected * 64] * 16


def test_vit_geometry_and_non_square():
    mask = SimMIMMaskGenerator(input_size=224, mask_patch_size=32, model_patch_size=16, mask_ratio=0.6)(4)
    assert mask.shape == (4, 14, 14)
    assert _blocks(mask, 2).flatten(1).sum(1).tolist() == [math.ceil(0.6 * 49)] * 4
    mask = SimMIMMaskGenerator(input_size=(64, 96), mask_patch_size=32, model_patch_size=4, mask_ratio=0.6)(3)
    assert mask.shape == (3, 16, 24)
    assert _blocks(mask, 8).flatten(1).sum(1).tolist() == [math.ceil(0.6 * 6)] * 3


def test_samples_differ_and_seed_reproduces():
    generator = SimMIMMaskGenerator(192, 32, 4, 0.6)
    mask = generator(8)
    assert len({tuple(row.flatten().tolist()) for row in mask}) > 1
    first = generator(8, generator=torch.Generator().manual_seed(123))
    again = generator(8, generator=torch.Generator().manual_seed(123))
    other = generator(8, generator=torch.Generator().manual_seed(124))
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_every_block_equally_likely():
    blocks = _blocks(SimMIMMaskGenerator(128, 32, 4, 0.5)(4000, generator=torch.Generator().manual_seed(0)), 8)
    frequency = blocks.float().mean(0)  # 16 blocks, 8 masked each time -> 0.5
    assert torch.allclose(frequency, torch.full_like(frequency, 0.5), atol=0.04)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(input_size=100, mask_patch_size=32, model_patch_size=4),
            r"100x100 is not divisible by mask_patch_size \(32\)",
        ),
        (
            dict(input_size=192, mask_patch_size=32, model_patch_size=12),
            r"mask_patch_size \(32\).*model patch size \(12\)",
        ),
        (dict(input_size=192, mask_ratio=1.5), r"mask_ratio must lie in \(0, 1\), got 1.5"),
    ],
)
def test_generator_geometry_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SimMIMMaskGenerator(**kwargs)


def test_collator_stacks_and_masks_in_one_call():
    generator = SimMIMMaskGenerator(64, 16, 4, 0.6)
    calls = []
    original = generator.__call__

    class Counting(SimMIMMaskGenerator):
        def __call__(self, *args, **kwargs):
            calls.append(args)
            return original(*args, **kwargs)

    counting = Counting(64, 16, 4, 0.6)
    collator = SimMIMDataCollator(counting)
    batch = collator([{"pixel_values": torch.randn(3, 64, 64), "label": i} for i in range(5)])
    assert batch["pixel_values"].shape == (5, 3, 64, 64)
    assert batch["bool_masked_pos"].shape == (5, 16, 16) and batch["bool_masked_pos"].dtype == torch.bool
    assert batch["labels"].tolist() == [0, 1, 2, 3, 4]
    assert len(calls) == 1 and calls[0][0] == 5  # one vectorized draw for the whole batch


def test_collator_seeded_masks_are_reproducible_and_reset():
    collator = SimMIMDataCollator(SimMIMMaskGenerator(64, 16, 4, 0.6), seed=7)
    examples = [{"pixel_values": torch.zeros(3, 64, 64)} for _ in range(4)]
    first, second = collator(examples)["bool_masked_pos"], collator(examples)["bool_masked_pos"]
    assert not torch.equal(first, second)  # the sequence moves on
    collator.reset()
    assert torch.equal(collator(examples)["bool_masked_pos"], first)
    fresh = SimMIMDataCollator(SimMIMMaskGenerator(64, 16, 4, 0.6), seed=7)
    assert torch.equal(fresh(examples)["bool_masked_pos"], first)


def test_collator_drops_unreadable_images_and_counts_them(caplog):
    collator = SimMIMDataCollator(SimMIMMaskGenerator(64, 16, 4, 0.6))
    examples = [
        {"pixel_values": torch.zeros(3, 64, 64)},
        {"pixel_values": None},
        {"pixel_values": torch.zeros(3, 64, 64)},
    ]
    with caplog.at_level(logging.WARNING, logger="modeling_simmim.masking"):
        batch = collator(examples)
    assert batch["pixel_values"].shape[0] == 2 and collator.num_skipped == 1
    assert "dropped 1 example(s) without pixel_values (unreadable images)" in caplog.text
    with pytest.raises(ValueError, match="no image could be read"):
        collator([{"pixel_values": None}])


def test_collator_rejects_wrong_image_size_and_builds_from_config():
    config = SimMIMConfig.from_preset("swin_test", mask_patch_size=16)
    collator = SimMIMDataCollator.from_config(config)
    assert collator.mask_generator.model_grid == (16, 16)
    with pytest.raises(ValueError, match=r"Images are \(32, 32\) but the mask generator expects \(64, 64\)"):
        collator([{"pixel_values": torch.zeros(3, 32, 32)}])
    with pytest.raises(ValueError, match="not divisible by mask_patch_size"):
        SimMIMDataCollator.from_config(config, image_size=72)


def test_soft_labels_are_stacked():
    collator = SimMIMDataCollator(SimMIMMaskGenerator(64, 16, 4, 0.6))
    batch = collator([{"pixel_values": torch.zeros(3, 64, 64), "labels": torch.tensor([0.9, 0.1])}] * 2)
    assert batch["labels"].shape == (2, 2)


def test_seeded_masks_are_official_masks_and_a_function_of_the_seed():
    generator = SimMIMMaskGenerator(input_size=(64, 96), mask_patch_size=16, model_patch_size=4, mask_ratio=0.6)
    masks = [generator.seeded_mask(seed) for seed in range(200)]
    assert all(mask.shape == (16, 24) and mask.dtype == torch.bool for mask in masks)
    blocks = torch.stack(masks)[:, ::4, ::4]
    assert (blocks.flatten(1).sum(1) == 15).all()  # ceil(0.6 * 24) of the 4 x 6 blocks
    assert torch.equal(
        torch.stack(masks), torch.stack(masks)[:, ::4, ::4].repeat_interleave(4, 1).repeat_interleave(4, 2)
    )
    assert torch.equal(generator.seeded_mask(7), masks[7]) and not torch.equal(masks[7], masks[8])
    frequency = blocks.float().mean(0)  # every block about equally likely (0.625)
    assert (frequency - 0.625).abs().max() < 0.15


def test_collator_keeps_the_masks_the_examples_carry():
    generator = SimMIMMaskGenerator(input_size=64, mask_patch_size=16, model_patch_size=4)
    collator = SimMIMDataCollator(generator)
    examples = [
        {"pixel_values": torch.randn(3, 64, 64), "bool_masked_pos": generator.seeded_mask(i)} for i in range(3)
    ]
    batch = collator(examples)
    assert torch.equal(batch["bool_masked_pos"], torch.stack([example["bool_masked_pos"] for example in examples]))
    examples[1]["bool_masked_pos"] = torch.zeros(8, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="model-patch grid is"):
        collator(examples)
