import math

import pytest
import torch

from modeling_simmim import (
    SimMIMConfig,
    SimMIMForMaskedImageModeling,
    create_optimizer,
    get_simmim_scheduler,
    param_groups_layer_decay,
    scale_learning_rate,
    simmim_lr_at,
)


def _names(groups, weight_decay):
    return {n for g in groups if g["weight_decay"] == weight_decay for n in g["param_names"]}


@pytest.mark.parametrize("preset", ["swin_test", "swinv2_test", "vit_test", "beit_test"])
def test_every_parameter_in_exactly_one_group_with_official_no_decay(preset):
    model = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset(preset, mask_patch_size=16))
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=1.0)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters()) and len(grouped) == len(set(grouped))
    no_decay, decay = _names(groups, 0.0), _names(groups, 0.05)
    prefix = model.backbone_adapter.base_model_prefix
    assert f"{prefix}.embeddings.mask_token" in no_decay
    for name, param in model.named_parameters():
        expected_no_decay = (param.ndim <= 1 or name.endswith(".bias") or "cls_token" in name or "mask_token" in name
                             or "relative_position_bias_table" in name or "position_embeddings" in name
                             or "logit_scale" in name or "continuous_position_bias_mlp" in name)
        assert (name in no_decay) == expected_no_decay, name
    assert "decoder.0.weight" in decay
    assert all(g["lr_scale"] == 1.0 for g in groups) and len(groups) == 2


def test_layer_decay_scales_and_group_lr():
    model = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("swin_test", mask_patch_size=16))
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5, base_lr=1e-3)
    by_name = {n: g for g in groups for n in g["param_names"]}
    # swin_test: depths [1, 1] -> L = 2, ids 0..3.
    assert by_name["swin.embeddings.mask_token"]["layer_id"] == 0
    assert by_name["swin.encoder.layers.0.blocks.0.attention.q_proj.weight"]["layer_id"] == 1
    assert by_name["swin.encoder.layers.0.downsample.reduction.weight"]["layer_id"] == 1
    assert by_name["swin.encoder.layers.1.blocks.0.mlp.fc1.weight"]["layer_id"] == 2
    assert by_name["swin.layernorm.weight"]["layer_id"] == 3 and by_name["decoder.0.weight"]["layer_id"] == 3
    for group in groups:
        assert group["lr_scale"] == 0.5 ** (3 - group["layer_id"])
        assert group["lr"] == pytest.approx(1e-3 * group["lr_scale"])


def test_create_optimizer_is_official_adamw():
    model = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("beit_test", mask_patch_size=16))
    optimizer = create_optimizer(model, learning_rate=2e-4, weight_decay=0.05)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["eps"] == 1e-8
    assert optimizer.defaults["fused"] is True  # CPU fused kernel by default
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.05}
    assert all(g["lr"] == 2e-4 for g in optimizer.param_groups)


def test_linear_lr_scaling():
    # Swin-B 100 ep: base 2e-4 per 512; 128 per GPU x 16 GPUs = 2048 -> 8e-4 (the paper's value).
    assert scale_learning_rate(2e-4, 128 * 16) == pytest.approx(8e-4)
    assert scale_learning_rate(1.25e-3, 2048) == pytest.approx(5e-3)


def test_official_cosine_schedule_formula():
    base, warm, low, total, warmup = 8e-4, 4e-6, 4e-5, 1000, 100
    lr = lambda step: simmim_lr_at(step, base, total, warmup, warm, low, "cosine")  # noqa: E731
    assert lr(0) == pytest.approx(warm)
    assert lr(50) == pytest.approx(warm + (base - warm) * 0.5)
    # After warmup the cosine is over the whole run (no warmup prefix), as timm 0.4.12 in the official code.
    assert lr(100) == pytest.approx(low + 0.5 * (base - low) * (1 + math.cos(math.pi * 100 / 1000)))
    assert lr(500) == pytest.approx(low + 0.5 * (base - low))
    assert lr(1000) == pytest.approx(low) and lr(5000) == pytest.approx(low)


def test_official_multistep_schedule_formula():
    lr = lambda step: simmim_lr_at(step, 1e-3, 800, 10, 5e-7, 5e-6, "multistep", milestones=[700], gamma=0.1)  # noqa
    assert lr(0) == pytest.approx(5e-7)
    assert lr(10) == pytest.approx(1e-3) and lr(699) == pytest.approx(1e-3)
    assert lr(700) == pytest.approx(1e-4) and lr(799) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="Unknown scheduler_type 'linear'"):
        simmim_lr_at(5, 1e-3, 10, 2, 0, 0, "linear")


def test_scheduler_keeps_layer_decay_in_every_group():
    model = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("swin_test", mask_patch_size=16))
    optimizer = create_optimizer(model, learning_rate=1e-3, layer_decay=0.8)
    scheduler = get_simmim_scheduler(optimizer, 1e-3, num_training_steps=20, num_warmup_steps=5,
                                     warmup_lr=1e-6, min_lr=1e-5)
    for step in range(12):
        for group in optimizer.param_groups:
            expected = group["lr_scale"] * simmim_lr_at(step, 1e-3, 20, 5, 1e-6, 1e-5)
            assert group["lr"] == pytest.approx(expected, rel=1e-9), (step, group["layer_id"])
        optimizer.step()
        scheduler.step()
