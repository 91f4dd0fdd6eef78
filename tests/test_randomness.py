"""Keyed randomness (modeling_simmim.randomness): seeds mixed from (seed, epoch, index), global RNGs seeded and
restored around transforms, the training order, and what they buy: the global batch of optimizer step k holds the same
examples with the same crops, flips and masks for 1 or 2 processes (accelerate's own BatchSamplerShard), any number of
DataLoader workers, and a resume that skips batches without decoding them."""

import random

import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard, prepare_data_loader, skip_first_batches
from PIL import Image
from transformers import TrainerControl, TrainerState

from modeling_simmim import (
    SimMIMConfig,
    SimMIMDataCollator,
    SimMIMForMaskedImageModeling,
    SimMIMMaskGenerator,
    randomness,
)
from modeling_simmim.augmentation import MixupCollator, build_classification_transform
from modeling_simmim.data import (
    IndexSeededMasks,
    KeyedMasks,
    PretrainCollator,
    RobustImageDataset,
    build_pretrain_transform,
)
from modeling_simmim.randomness import (
    EXAMPLE_KEY_FIELD,
    ExampleKey,
    KeyedEpochSampler,
    batch_seed,
    mix_seed,
    seed_everything,
    seeded_global_rngs,
)
from modeling_simmim.trainer import SimMIMTrainer, SimMIMTrainingArguments

IMAGE_SIZE = 64


def _images(count=40, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {"image": Image.fromarray(rng.integers(0, 256, (48 + i % 5 * 7, 56, 3), dtype=np.uint8))} for i in range(count)
    ]


def _pretrain_dataset(rows=None):
    generator = SimMIMMaskGenerator(IMAGE_SIZE, mask_patch_size=16, model_patch_size=4)
    dataset = RobustImageDataset(
        rows or _images(), "image", build_pretrain_transform(IMAGE_SIZE), keyed_fn=KeyedMasks(generator)
    )
    return dataset, PretrainCollator(SimMIMDataCollator(generator))


def _global_draws():
    return torch.rand(3), random.random(), np.random.rand()


# ---- building blocks ---------------------------------------------------------------------------------------------
def test_mix_seed_is_stable_typed_and_order_sensitive():
    # Pinned: changing the mixing would silently change every run's data (and a resumed run after an upgrade).
    assert mix_seed(42, 3, 17, "mask") == 3572429972208192442
    values = {
        mix_seed(1, 23),
        mix_seed(12, 3),
        mix_seed(1, 2, 3),
        mix_seed(3, 2, 1),
        mix_seed("1"),
        mix_seed(1),
        mix_seed(np.int64(2)),
        mix_seed(-2),
    }
    assert len(values) == 8
    assert all(0 <= value < 2**63 for value in values)
    assert mix_seed(np.int64(5), "x") == mix_seed(5, "x")
    with pytest.raises(TypeError):
        mix_seed(True)
    key = ExampleKey(seed=42, epoch=3, index=17)
    assert key.seed_for("mask") == mix_seed(42, 3, 17, "mask") != key.seed_for("transform")
    assert batch_seed([key], "mixup") != batch_seed([key, key._replace(index=18)], "mixup")
    assert batch_seed([key, key._replace(index=18)], "mixup") != batch_seed([key._replace(index=18), key], "mixup")


@pytest.mark.parametrize("numpy_swap", [True, False], ids=["numpy>=1.25", "older numpy"])
def test_seeded_global_rngs_draw_from_the_seed_and_restore_the_callers_streams(numpy_swap, monkeypatch):
    if not numpy_swap:  # the legacy save / seed / restore path
        monkeypatch.setattr(randomness, "_NUMPY_KEYED", None)
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    expected_after = _global_draws()
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    with seeded_global_rngs(7):
        first = _global_draws()
    after = _global_draws()
    torch.manual_seed(123), random.seed(5), np.random.seed(9)
    with seeded_global_rngs(7):
        second = _global_draws()
    assert torch.equal(first[0], second[0]) and first[1:] == second[1:]  # a function of the seed only
    assert torch.equal(after[0], expected_after[0]) and after[1:] == expected_after[1:]  # caller's streams untouched
    with seeded_global_rngs(8):
        other = _global_draws()
    assert not torch.equal(other[0], first[0]) and other[1] != first[1] and other[2] != first[2]
    with seeded_global_rngs(1):  # nested blocks: the outer block's streams continue after the inner one
        outer_first = _global_draws()
        with seeded_global_rngs(2):
            _global_draws()
        outer_second = _global_draws()
    with seeded_global_rngs(1):
        assert all(np.array_equal(a, b) for a, b in zip(_global_draws(), outer_first))
        assert all(np.array_equal(a, b) for a, b in zip(_global_draws(), outer_second))
    state = torch.get_rng_state()
    with pytest.raises(RuntimeError), seeded_global_rngs(7):
        torch.rand(5)
        raise RuntimeError("boom")
    assert torch.equal(torch.get_rng_state(), state)  # restored on errors too


def test_sampler_order_is_a_function_of_seed_and_epoch_and_drops_the_tail_to_whole_global_batches():
    sampler = KeyedEpochSampler(50, seed=3, global_batch_size=12, drop_last=True)
    assert len(sampler) == 48
    sampler.set_epoch(2)
    keys = list(sampler)
    assert len(keys) == 48 and len({key.index for key in keys}) == 48
    assert all(key == ExampleKey(3, 2, key.index) for key in keys)
    again = KeyedEpochSampler(50, seed=3, global_batch_size=4, drop_last=False)
    again.set_epoch(2)
    assert [key.index for key in again][:48] == [key.index for key in keys]  # the batch size only cuts the tail
    assert sampler.permutation(1) != sampler.permutation(2)
    assert KeyedEpochSampler(50, seed=4).permutation(2) != KeyedEpochSampler(50, seed=3).permutation(2)
    assert list(KeyedEpochSampler(5, seed=0, yield_keys=False)) == KeyedEpochSampler(5, seed=0).permutation(0)
    assert len(KeyedEpochSampler(10, seed=0, global_batch_size=16, drop_last=True)) == 0
    iterator = iter(sampler)
    first = next(iterator)
    sampler.set_epoch(5)  # a pass keeps the epoch it started with
    assert all(key.epoch == 2 for key in [first, *iterator])


def test_model_init_is_a_function_of_the_seed():
    config = SimMIMConfig.from_preset("swin_test", mask_patch_size=16)
    models = []
    for noise in (1, 2):
        torch.manual_seed(noise)  # whatever ran before (data loading, another process's history)
        random.seed(noise)
        seed_everything(11)
        models.append(SimMIMForMaskedImageModeling(config).state_dict())
    assert all(torch.equal(models[0][name], models[1][name]) for name in models[0])


# ---- per-example randomness --------------------------------------------------------------------------------------
def test_pretraining_crops_flips_and_masks_are_keyed_by_seed_epoch_and_index():
    dataset, _ = _pretrain_dataset()
    key = ExampleKey(seed=0, epoch=1, index=3)
    torch.manual_seed(5)
    first = dataset[key]
    before = _global_draws()
    torch.manual_seed(5)
    dataset[key]
    torch.manual_seed(99)  # another RNG history: the same example, crop, flip and mask
    second = dataset[key]
    torch.manual_seed(5)
    assert torch.equal(_global_draws()[0], before[0])  # the dataset did not advance torch's global RNG
    assert torch.equal(first["pixel_values"], second["pixel_values"])
    assert torch.equal(first["bool_masked_pos"], second["bool_masked_pos"])
    assert first[EXAMPLE_KEY_FIELD] == key
    assert first["bool_masked_pos"].shape == (16, 16) and int(first["bool_masked_pos"].sum()) == 16 * 10
    next_epoch = dataset[key._replace(epoch=2)]
    assert not torch.equal(next_epoch["pixel_values"], first["pixel_values"])
    assert not torch.equal(next_epoch["bool_masked_pos"], first["bool_masked_pos"])
    assert not torch.equal(dataset[key._replace(seed=1)]["bool_masked_pos"], first["bool_masked_pos"])
    assert EXAMPLE_KEY_FIELD not in dataset[3] and "bool_masked_pos" not in dataset[3]  # plain indices: unkeyed


def test_finetuning_randaugment_crop_flip_and_erasing_are_keyed():
    transform = build_classification_transform(IMAGE_SIZE, train=True, random_erasing=1.0)
    dataset = RobustImageDataset(_images(8), "image", transform)
    key = ExampleKey(seed=0, epoch=0, index=2)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    first = dataset[key]["pixel_values"]
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    assert torch.equal(dataset[key]["pixel_values"], first)
    assert not torch.equal(dataset[key._replace(epoch=1)]["pixel_values"], first)
    assert not torch.equal(dataset[2]["pixel_values"], dataset[2]["pixel_values"])  # unkeyed access stays random


def test_mixup_and_cutmix_are_keyed_by_the_keys_of_the_batch():
    collator = MixupCollator(num_labels=4, switch_prob=0.5)
    rng = torch.Generator().manual_seed(0)
    pixels = [torch.randn(3, 16, 16, generator=rng) for _ in range(6)]

    def examples(epoch, keyed=True):
        return [
            {
                "pixel_values": pixels[i].clone(),
                "labels": i % 4,
                **({EXAMPLE_KEY_FIELD: ExampleKey(0, epoch, i)} if keyed else {}),
            }
            for i in range(6)
        ]

    np.random.seed(1)
    first = collator(examples(0))
    np.random.seed(2)
    second = collator(examples(0))
    assert torch.equal(first["pixel_values"], second["pixel_values"]) and torch.equal(
        first["labels"], second["labels"]
    )
    outcomes = {tuple(collator(examples(epoch))["labels"][0].tolist()) for epoch in range(6)}
    assert len(outcomes) > 1  # other keys, other lambdas
    state = np.random.get_state()
    collator(examples(0))
    assert np.random.get_state()[1].tolist() == state[1].tolist()  # numpy's global stream left where it was
    assert EXAMPLE_KEY_FIELD not in first


# ---- world size, workers, resume -----------------------------------------------------------------------------------
def _per_rank_batches(dataset, collator, per_device, processes, accumulation, epoch):
    """Micro-batches of each rank, as accelerate shards them (BatchSamplerShard, split_batches=False)."""
    sampler = KeyedEpochSampler(
        len(dataset), seed=0, global_batch_size=per_device * processes * accumulation, drop_last=True
    )
    sampler.set_epoch(epoch)
    ranks = []
    for rank in range(processes):
        batch_sampler = torch.utils.data.BatchSampler(sampler, per_device, drop_last=True)
        if processes > 1:
            batch_sampler = BatchSamplerShard(batch_sampler, num_processes=processes, process_index=rank)
        keys = list(batch_sampler)
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collator)
        ranks.append(list(zip(keys, loader)))
    return ranks


def _optimizer_steps(ranks, accumulation):
    """Per optimizer step: the examples (key -> pixel values, mask) of all micro-batches of all ranks."""
    steps = []
    for step in range(len(ranks[0]) // accumulation):
        examples = {}
        for micro_batches in ranks:
            for keys, batch in micro_batches[step * accumulation : (step + 1) * accumulation]:
                for i, key in enumerate(keys):
                    examples[key] = (batch["pixel_values"][i], batch["bool_masked_pos"][i])
        steps.append(examples)
    return steps


@pytest.mark.parametrize("accumulation", [1, 2])
def test_global_batch_of_every_step_is_the_same_for_one_and_two_processes(accumulation):
    dataset, collator = _pretrain_dataset(_images(30))
    for epoch in (0, 1):
        two = _per_rank_batches(dataset, collator, per_device=3, processes=2, accumulation=accumulation, epoch=epoch)
        one = _per_rank_batches(dataset, collator, per_device=6, processes=1, accumulation=accumulation, epoch=epoch)
        assert len(two[0]) == len(two[1]) == len(one[0])  # every rank gets whole batches, none padded
        # with accumulation 1, rank 0's micro-batch k then rank 1's is exactly the single process's batch k
        if accumulation == 1:
            for (keys0, batch0), (keys1, batch1), (keys, batch) in zip(*two, one[0]):
                assert keys0 + keys1 == keys
                assert torch.equal(torch.cat([batch0["pixel_values"], batch1["pixel_values"]]), batch["pixel_values"])
        steps_two, steps_one = _optimizer_steps(two, accumulation), _optimizer_steps(one, accumulation)
        assert len(steps_two) == len(steps_one) == 30 // (6 * accumulation)
        for examples_two, examples_one in zip(steps_two, steps_one):
            assert examples_two.keys() == examples_one.keys()
            for key, (pixels, mask) in examples_one.items():
                assert torch.equal(examples_two[key][0], pixels) and torch.equal(examples_two[key][1], mask)
    # epochs differ in order and in augmentation
    assert (
        _per_rank_batches(dataset, collator, 6, 1, 1, 0)[0][0][0]
        != _per_rank_batches(dataset, collator, 6, 1, 1, 1)[0][0][0]
    )


def _trainer(tmp_path, dataset, collator, **overrides):
    args = SimMIMTrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, report_to="none", use_cpu=True, seed=0, **overrides
    )
    model = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("swin_test", mask_patch_size=16))
    return SimMIMTrainer(model=model, args=args, train_dataset=dataset, data_collator=collator)


def _epoch_batches(loader, epoch):
    loader.set_epoch(epoch)
    return [(batch["pixel_values"], batch["bool_masked_pos"]) for batch in loader]


def test_training_batches_do_not_depend_on_workers_or_persistent_workers(tmp_path):
    dataset, collator = _pretrain_dataset(_images(18))
    reference = _trainer(tmp_path, dataset, collator).get_train_dataloader()
    workers = _trainer(
        tmp_path, dataset, collator, dataloader_num_workers=2, dataloader_persistent_workers=True
    ).get_train_dataloader()
    for epoch in (0, 1, 2):  # persistent workers keep their dataset copy across epochs: the epoch is in the keys
        expected, got = _epoch_batches(reference, epoch), _epoch_batches(workers, epoch)
        assert len(expected) == len(got) == 4  # 18 images, batches of 4: the tail is dropped
        for (pixels, masks), (pixels_w, masks_w) in zip(expected, got):
            assert torch.equal(pixels, pixels_w) and torch.equal(masks, masks_w)
    assert not torch.equal(_epoch_batches(reference, 0)[0][1], _epoch_batches(reference, 1)[0][1])


def test_loading_training_and_evaluation_data_leaves_torchs_global_rng_alone(tmp_path):
    # torch's global RNG is the model's (dropout, stochastic depth): data loading must not draw from it, or the
    # model's stream would depend on workers, cached (persistent) evaluation loaders and resumes.
    dataset, collator = _pretrain_dataset(_images(12))
    generator = SimMIMMaskGenerator(IMAGE_SIZE, mask_patch_size=16, model_patch_size=4)
    eval_dataset = RobustImageDataset(
        _images(6), "image", build_pretrain_transform(IMAGE_SIZE, train=False), extra_fn=IndexSeededMasks(generator)
    )
    trainer = _trainer(tmp_path, dataset, collator, per_device_eval_batch_size=4)
    state = torch.get_rng_state()
    for batch in trainer.get_train_dataloader():
        assert batch["bool_masked_pos"].shape == (4, 16, 16)
    assert torch.equal(torch.get_rng_state(), state)
    for batch in trainer.get_eval_dataloader(eval_dataset):
        assert batch["bool_masked_pos"].shape[1:] == (16, 16)
    assert torch.equal(torch.get_rng_state(), state)


class _CountingDataset(torch.utils.data.Dataset):
    accepts_example_keys = True

    def __init__(self, size):
        self.size, self.fetched = size, []

    def __len__(self):
        return self.size

    def __getitem__(self, key):
        self.fetched.append(key)
        return {
            "pixel_values": torch.full((3, IMAGE_SIZE, IMAGE_SIZE), float(key.index)),
            "bool_masked_pos": torch.zeros(16, 16, dtype=torch.bool),
            EXAMPLE_KEY_FIELD: key,
        }


def test_resume_skips_batches_without_loading_them_and_keeps_the_order(tmp_path):
    dataset = _CountingDataset(20)
    collator = SimMIMDataCollator(SimMIMMaskGenerator(IMAGE_SIZE, 16, 4))
    trainer = _trainer(tmp_path, dataset, collator)
    loader = trainer.get_train_dataloader()
    loader.set_epoch(1)
    full = [batch["pixel_values"][:, 0, 0, 0].tolist() for batch in loader]
    dataset.fetched.clear()
    skipped = skip_first_batches(loader, 3)  # what the Trainer does on a mid-epoch resume
    skipped.set_epoch(1)
    rest = [batch["pixel_values"][:, 0, 0, 0].tolist() for batch in skipped]
    assert rest == full[3:]
    assert len(dataset.fetched) == 2 * 4  # only the two remaining batches were loaded
    assert {key.epoch for key in dataset.fetched} == {1}


def test_epoch_reaches_the_sampler_when_a_multi_process_resume_skips_batches(tmp_path):
    # accelerate's DataLoaderShard.set_epoch does not reach a sampler under BatchSamplerShard once skip_first_batches
    # wrapped it (SkipBatchSampler): the trainer's SamplerEpochCallback sets it from the step count.
    dataset = _CountingDataset(24)
    trainer = _trainer(tmp_path, dataset, SimMIMDataCollator(SimMIMMaskGenerator(IMAGE_SIZE, 16, 4)))
    sampler = KeyedEpochSampler(24, seed=0, global_batch_size=8, drop_last=True)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=4,
        sampler=sampler,
        drop_last=True,
        collate_fn=lambda examples: [e[EXAMPLE_KEY_FIELD] for e in examples],
    )
    rank0 = prepare_data_loader(loader, num_processes=2, process_index=0, put_on_device=False)
    resumed = skip_first_batches(rank0, 1)
    callback = trainer.sampler_epoch
    callback.sampler, callback.num_update_steps_per_epoch = sampler, 3
    state = TrainerState(global_step=7)  # resumed from checkpoint-7: epoch 2, one step into it
    callback.on_epoch_begin(trainer.args, state, TrainerControl())
    resumed.set_epoch(2)  # what the Trainer calls; it stops short of the sampler
    batches = list(resumed)
    assert len(batches) == 2 and all(key.epoch == 2 for batch in batches for key in batch)
    sampler.set_epoch(2)
    assert [key.index for batch in batches for key in batch] == [
        key.index for key in list(sampler)[8:12] + list(sampler)[16:20]
    ]
