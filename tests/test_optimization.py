import math

import pytest
import torch

from modeling_simmim import (
    SimMIMConfig,
    SimMIMForImageClassification,
    SimMIMForMaskedImageModeling,
    create_optimizer,
    get_simmim_scheduler,
    param_groups_layer_decay,
    scale_learning_rate,
    simmim_lr_at,
)


def _names(groups, weight_decay):
    return {n for g in groups if g["weight_decay"] == weight_decay for n in g["param_names"]}


# The official exclusions beyond 1-D tensors and biases, per family and stage, written out from the official code
# (SimMIM's optimizer.py + models): pretraining skips `encoder.<name>` exactly and `encoder.<keyword>` as a substring,
# so the encoders' keyword exclusions (relative position bias tables, SwinV2's cpb_mlp/logit_scale) never match;
# finetuning uses the encoder's own lists. Swin's SimMIM encoder adds `mask_token`, ViT's does not.
OFFICIAL_NAMED_EXCLUSIONS = {
    ("swin_test", "pretraining"): {"mask_token"},
    ("swin_test", "finetuning"): {"relative_position_bias_table"},
    ("swinv2_test", "pretraining"): {"mask_token"},
    ("swinv2_test", "finetuning"): {"continuous_position_bias_mlp", "logit_scale"},
    ("vit_test", "pretraining"): {"cls_token", "position_embeddings"},
    ("vit_test", "finetuning"): {"cls_token", "position_embeddings"},
    ("beit_test", "pretraining"): {"cls_token"},
    ("beit_test", "finetuning"): {"cls_token"},
}
NAMED_CANDIDATES = (
    "mask_token",
    "cls_token",
    "position_embeddings",
    "relative_position_bias_table",
    "continuous_position_bias_mlp",
    "logit_scale",
)


def _model(preset: str, stage: str):
    if stage == "pretraining":
        return SimMIMForMaskedImageModeling(SimMIMConfig.from_preset(preset, mask_patch_size=16))
    config = SimMIMConfig.from_preset(preset)
    config.num_labels = 3
    return SimMIMForImageClassification(config)


@pytest.mark.parametrize("preset,stage", sorted(OFFICIAL_NAMED_EXCLUSIONS))
def test_weight_decay_groups_are_the_official_ones_per_family_and_stage(preset, stage):
    model = _model(preset, stage)
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=1.0)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters()) and len(grouped) == len(set(grouped))
    no_decay, decay = _names(groups, 0.0), _names(groups, 0.05)
    excluded = OFFICIAL_NAMED_EXCLUSIONS[(preset, stage)]
    seen = set()
    for name, param in model.named_parameters():
        named = {keyword for keyword in NAMED_CANDIDATES if keyword in name}
        seen |= named
        expected_no_decay = param.ndim <= 1 or name.endswith(".bias") or bool(named & excluded)
        assert (name in no_decay) == expected_no_decay, name
    # The table covers what the model really has (no vacuous expectations), decayed ones included.
    assert excluded <= seen, excluded - seen
    head = "decoder.0.weight" if stage == "pretraining" else "classifier.weight"
    assert head in decay
    assert all(g["lr_scale"] == 1.0 for g in groups) and len(groups) == 2


def test_relative_position_bias_tables_decayed_in_pretraining_excluded_in_swin_finetuning():
    table = "relative_position_bias_table"
    pretraining = _names(param_groups_layer_decay(_model("swin_test", "pretraining"), 0.05, 1.0), 0.05)
    finetuning = _names(param_groups_layer_decay(_model("swin_test", "finetuning"), 0.05, 1.0), 0.0)
    assert any(table in name for name in pretraining) and any(table in name for name in finetuning)
    beit = _names(param_groups_layer_decay(_model("beit_test", "finetuning"), 0.05, 1.0), 0.05)
    assert any(table in name for name in beit)


def test_stage_override_and_extra_exclusions():
    model = _model("swin_test", "pretraining")
    as_finetuning = _names(param_groups_layer_decay(model, 0.05, 1.0, stage="finetuning"), 0.0)
    assert any("relative_position_bias_table" in name for name in as_finetuning)
    extra = param_groups_layer_decay(model, 0.05, 1.0, extra_no_weight_decay_keywords=("relative_position_bias",))
    assert not any("relative_position_bias" in name for name in _names(extra, 0.05))
    with pytest.raises(ValueError, match="stage must be"):
        param_groups_layer_decay(model, 0.05, 1.0, stage="pretrain")


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
    scheduler = get_simmim_scheduler(
        optimizer, 1e-3, num_training_steps=20, num_warmup_steps=5, warmup_lr=1e-6, min_lr=1e-5
    )
    for step in range(12):
        for group in optimizer.param_groups:
            expected = group["lr_scale"] * simmim_lr_at(step, 1e-3, 20, 5, 1e-6, 1e-5)
            assert group["lr"] == pytest.approx(expected, rel=1e-9), (step, group["layer_id"])
        optimizer.step()
        scheduler.step()
