"""modeling_simmim.memory: the CPU measurement (profiler allocation events) is exact on known allocations; the
estimate (parameters, gradients, AdamW state, activations measured at batches 1 and 2 and scaled) is within 25% of
the measured peak of a real training step for two model sizes; FSDP units, sharding and the largest batch; the CLI
on recipes."""

import glob
import json
import os

import pytest
import torch

from modeling_simmim import SimMIMConfig, SimMIMForMaskedImageModeling, memory
from modeling_simmim.memory import (
    ActivationProfile,
    RecipeModel,
    estimate_memory,
    fsdp_units,
    input_maker,
    measure_activations,
    measure_training_step,
    peak_allocated_bytes,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


@pytest.fixture(autouse=True, scope="module")
def _two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def test_cpu_peak_counts_every_allocation_and_free_in_order():
    def pattern():
        a = torch.ones(1000, 1000)  # 4 MB
        b = a @ a  # 4 MB more: 8 MB live
        del a
        c = torch.ones(2000, 1000)  # 8 MB: 12 MB live, the peak
        del b, c
        d = torch.ones(500, 1000)  # 2 MB
        return d

    assert peak_allocated_bytes(pattern, CPU) == 12_000_000
    assert peak_allocated_bytes(lambda: None, CPU) == 0
    with pytest.raises(ValueError, match="'cpu' or 'cuda'"):
        peak_allocated_bytes(lambda: None, torch.device("meta"))


def _swin(image_size, **overrides):
    torch.manual_seed(0)
    config = SimMIMConfig.from_preset("swin_test", image_size=image_size, mask_patch_size=16, **overrides)
    model = SimMIMForMaskedImageModeling(config)
    recipe_model = RecipeModel(model, "pretrain", config.image_size, per_device_batch=8, bf16=False)
    return model, input_maker(recipe_model, CPU)


TWO_STAGES_OF_TWO = dict(embed_dim=32, depths=[2, 2], num_heads=[2, 4])  # 0.09M parameters


@pytest.mark.parametrize("overrides,batch", [({}, 16), (TWO_STAGES_OF_TWO, 8)])  # 0.03M and 0.09M parameters
def test_estimate_is_within_25_percent_of_a_measured_training_step(overrides, batch):
    # Larger models (Swin-T, Swin-B at 192 px): benchmarks/memory_check.py, numbers in the README.
    model, make_inputs = _swin(64, **overrides)
    profile = measure_activations(model, make_inputs, (1, 2))
    assert profile.per_image_bytes > 0 and all(p.grad is None for p in model.parameters())
    estimate = estimate_memory(model, profile, batch, num_processes=1)
    measured = measure_training_step(model, make_inputs, batch)
    assert estimate.total == pytest.approx(measured, rel=0.25), (estimate.to_dict(), measured)
    # the parts: fp32 weights and gradients, two AdamW moments
    count = sum(p.numel() for p in model.parameters())
    assert (estimate.parameters, estimate.gradients, estimate.optimizer_state) == (4 * count, 4 * count, 8 * count)
    assert estimate.communication_buffers == 0  # one process: no DDP buckets


def test_gradient_checkpointing_lowers_the_measured_activations():
    model, make_inputs = _swin(64, **TWO_STAGES_OF_TWO)
    plain = measure_activations(model, make_inputs, (1, 2))
    memory.enable_activation_checkpointing(model)
    checkpointed = measure_activations(model, make_inputs, (1, 2))
    assert checkpointed.per_image_bytes < 0.8 * plain.per_image_bytes


def test_fsdp_units_follow_the_launch_config_wrapping():
    model, _ = _swin(64, **TWO_STAGES_OF_TWO)
    total = sum(p.numel() for p in model.parameters())
    units = fsdp_units(model)  # _no_split_modules = SwinStage: 2 stages, the patch embedding, the root's rest
    assert len(units) == 4 and sum(units) == total
    stages = [sum(p.numel() for p in stage.parameters()) for stage in model.swin.encoder.layers]
    assert units[:2] == stages[::-1]  # innermost and last first, as accelerate wraps
    assert units[2] == sum(p.numel() for p in model.swin.embeddings.patch_embeddings.parameters())
    blocks = fsdp_units(model, ["SwinLayer"])  # --fsdp_transformer_layer_cls_to_wrap SwinLayer
    assert len(blocks) == 6 and sum(blocks) == total and max(blocks[:4]) < max(stages)


def test_sharding_buckets_and_the_largest_batch():
    model, _ = _swin(64)
    count = sum(p.numel() for p in model.parameters())
    profile = ActivationProfile(
        intercept_bytes=1e6, per_image_bytes=2e6, batches=(1, 2), peaks_bytes=(3, 5), device="cpu"
    )
    ddp = estimate_memory(model, profile, 10, num_processes=8)
    assert ddp.communication_buffers == 4 * count and ddp.activations == 21e6
    fsdp = estimate_memory(model, profile, 10, fsdp=4)
    assert fsdp.parameters == ddp.parameters / 4 and fsdp.optimizer_state == ddp.optimizer_state / 4
    assert fsdp.communication_buffers == 3 * 4 * max(fsdp_units(model))
    capacity = 1e9
    largest = ddp.max_batch(capacity, reserve=0.1)
    fits = estimate_memory(model, profile, largest, num_processes=8)
    too_big = estimate_memory(model, profile, largest + 1, num_processes=8)
    assert fits.total <= 0.9 * capacity < too_big.total
    assert ddp.max_batch(ddp.static, reserve=0.0) == 0  # nothing left for images
    with pytest.raises(ValueError, match="--fsdp"):
        estimate_memory(model, profile, 10, fsdp=0)
    with pytest.raises(ValueError, match="--per_device_batch"):
        estimate_memory(model, profile, 0)


def test_every_recipe_is_recognised_and_built():
    recipes = sorted(
        glob.glob(os.path.join(ROOT, "configs", "pretrain", "*.yaml"))
        + glob.glob(os.path.join(ROOT, "configs", "finetune", "*.yaml"))
    )
    assert len(recipes) >= 10
    for path in recipes:
        with torch.device("meta"):
            recipe_model = memory.model_from_recipe(path)
        expected = "pretrain" if os.sep + "pretrain" + os.sep in path else "finetune"
        assert recipe_model.task == expected, path
        assert recipe_model.per_device_batch >= 1
        assert recipe_model.bf16 == ("demo" not in path), path  # GPU recipes train in bf16, the demos in fp32


def test_unknown_recipe_keys_are_named(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model_type: swin\nlearning_rat: 1\n")
    with pytest.raises(ValueError, match="learning_rat"):
        memory.model_from_recipe(str(recipe))


def test_cli_on_the_demo_recipe(capsys):
    path = os.path.join(ROOT, "configs", "pretrain", "demo_swin_tiny_cpu.yaml")
    result = memory.main(
        [path, "--per_device_batch", "4", "--num_processes", "2", "--device", "cpu", "--gpu_memory_gb", "1", "--json"]
    )
    printed = json.loads(capsys.readouterr().out)
    assert (
        printed["per_device_batch"] == 4
        and printed["max_per_device_batch"]["1"] == result["max_per_device_batch"]["1"]
    )
    assert printed["total"] == pytest.approx(printed["static"] + printed["activations"])
    assert printed["max_per_device_batch"]["1"] > 4 and printed["communication_buffers"] > 0  # DDP buckets
    with pytest.raises(SystemExit, match="--reserve"):
        memory.main([path, "--reserve", "1.5"])


def test_the_printed_plan_names_every_part():
    model, _ = _swin(64)
    profile = ActivationProfile(
        intercept_bytes=1e6, per_image_bytes=2e6, batches=(1, 2), peaks_bytes=(3, 5), device="cpu"
    )
    text = memory.render(estimate_memory(model, profile, 16, fsdp=2, bf16=True), "recipe.yaml", [80, 0.01], 0.1)
    for words in (
        "FSDP over 2 processes, bf16 autocast",
        "parameters",
        "gradients",
        "optimizer state",
        "FSDP gather/scatter buffers",
        "2.0 MB per image",
        "80 GB GPU (10% kept free): fits",
        "0.01 GB GPU (10% kept free): does NOT fit",
    ):
        assert words in text, words


def test_finetuning_recipes_are_measured_as_classifiers():
    estimate, recipe_model = memory.plan(
        os.path.join(ROOT, "configs", "finetune", "demo_swin_tiny_cpu.yaml"),
        per_device_batch=4,
        num_processes=1,
        device="cpu",
    )
    assert recipe_model.task == "finetune" and recipe_model.num_labels == 1000
    assert type(recipe_model.model).__name__ == "SimMIMForImageClassification"
    assert estimate.activation_profile.per_image_bytes > 0 and estimate.per_device_batch == 4
