"""Layer-wise lr decay (optimization.param_groups_layer_decay) on the classifier: official layer ids under
transformers 5 names, scales, and the effective lr of every group through schedulers.

The ids were also cross-checked once against the official SimMIM `get_swin_layer` / `get_vit_layer` on the official
Swin-B and ViT-B parameter names mapped to ours (425 and 223 parameters, no mismatch; see the README, "Finetuning")."""

import math

import pytest
from transformers import get_cosine_schedule_with_warmup

from modeling_simmim import (
    SimMIMConfig,
    create_optimizer,
    get_simmim_scheduler,
    param_groups_layer_decay,
    simmim_lr_at,
)
from modeling_simmim.modeling_simmim import SimMIMForImageClassification


def _swin_base_shaped(num_labels=3):
    """Swin-B depths (2, 2, 18, 2) with tiny widths: names and ids of Swin-B, seconds to build."""
    config = SimMIMConfig.from_preset("swin_base", embed_dim=8, num_heads=[1, 1, 1, 1])
    config.num_labels = num_labels
    return SimMIMForImageClassification(config)


def _ids(groups):
    return {name: group["layer_id"] for group in groups for name in group["param_names"]}


def test_swin_base_has_26_scales_with_official_ids():
    model = _swin_base_shaped()
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.9, base_lr=1e-3)
    scales = {group["layer_id"]: group["lr_scale"] for group in groups}
    assert sorted(scales) == list(range(26))  # ids 0 .. L+1 with L = 24 blocks
    for layer_id, scale in scales.items():
        assert scale == pytest.approx(0.9 ** (25 - layer_id), rel=1e-12)
    assert len(set(scales.values())) == 26
    for group in groups:
        assert group["lr"] == pytest.approx(1e-3 * group["lr_scale"], rel=1e-12)
    ids = _ids(groups)
    expected = {
        "swin.embeddings.patch_embeddings.projection.weight": 0,
        "swin.embeddings.norm.weight": 0,
        "swin.encoder.layers.0.blocks.0.attention.q_proj.weight": 1,
        "swin.encoder.layers.0.blocks.1.mlp.fc2.bias": 2,
        "swin.encoder.layers.0.downsample.reduction.weight": 2,  # patch merging ends stage 0: its last block's id
        "swin.encoder.layers.1.blocks.0.layernorm_before.weight": 3,
        "swin.encoder.layers.2.blocks.0.attention.relative_position_bias.relative_position_bias_table": 5,
        "swin.encoder.layers.2.blocks.17.attention.o_proj.weight": 22,
        "swin.encoder.layers.2.downsample.norm.weight": 22,
        "swin.encoder.layers.3.blocks.1.mlp.fc1.weight": 24,
        "swin.layernorm.weight": 25,
        "classifier.weight": 25,
    }
    for name, layer_id in expected.items():
        assert ids[name] == layer_id, name
    assert len(ids) == sum(1 for _ in model.parameters())  # every parameter is in exactly one group


def test_weight_decay_exclusions():
    model = _swin_base_shaped()
    decay = {
        name: group["weight_decay"]
        for group in param_groups_layer_decay(model, 0.05, 0.9)
        for name in group["param_names"]
    }
    assert decay["swin.encoder.layers.0.blocks.0.attention.q_proj.weight"] == 0.05
    assert decay["classifier.weight"] == 0.05
    for name in (
        "swin.encoder.layers.0.blocks.0.attention.q_proj.bias",
        "swin.layernorm.weight",
        "swin.encoder.layers.0.blocks.0.attention.relative_position_bias.relative_position_bias_table",
    ):
        assert decay[name] == 0.0, name


@pytest.mark.parametrize("preset,depth_ids", [("beit_test", True), ("vit_test", True), ("swinv2_test", False)])
def test_vit_beit_swinv2_ids(preset, depth_ids):
    overrides = (
        {"use_mean_pooling": True, "use_relative_position_bias": True, "use_shared_relative_position_bias": False}
        if preset == "beit_test"
        else {}
    )
    config = SimMIMConfig.from_preset(preset, **overrides)
    config.num_labels = 3
    model = SimMIMForImageClassification(config)
    ids = _ids(param_groups_layer_decay(model, 0.05, 0.65))
    prefix = {"beit_test": "beit", "vit_test": "vit", "swinv2_test": "swinv2"}[preset]
    top = 3  # 2 blocks: ids 0..3
    assert ids["classifier.weight"] == top
    if preset == "beit_test":
        assert ids["beit.embeddings.cls_token"] == 0
        assert ids["beit.layers.0.lambda_1"] == 1 and ids["beit.layers.1.attention.q_proj.weight"] == 2
        assert ids["beit.layers.1.relative_position_bias.relative_position_bias_table"] == 2
        assert ids["beit.pooler.layernorm.weight"] == top  # fc_norm
    if preset == "vit_test":
        assert ids["vit.embeddings.position_embeddings"] == 0 and ids["vit.embeddings.cls_token"] == 0
        assert ids["vit.layers.0.mlp.fc1.weight"] == 1 and ids["vit.layernorm.weight"] == top
    if preset == "swinv2_test":
        assert ids["swinv2.embeddings.patch_embeddings.projection.weight"] == 0
        assert ids["swinv2.encoder.layers.0.blocks.0.attention.self.logit_scale"] == 1
        assert ids["swinv2.encoder.layers.0.downsample.reduction.weight"] == 1
        assert ids["swinv2.encoder.layers.1.blocks.0.attention.self.continuous_position_bias_mlp.0.weight"] == 2
        assert ids["swinv2.layernorm.weight"] == top
    assert set(ids.values()) == set(range(top + 1))
    assert all(name.startswith(prefix) or name.startswith("classifier") for name in ids)


def test_beit_shared_table_of_pretraining_is_top_layer():
    from modeling_simmim import SimMIMForMaskedImageModeling

    model = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("beit_test"))
    ids = _ids(param_groups_layer_decay(model, 0.05, 0.65))
    assert ids["beit.shared_position_bias.relative_position_bias_table"] == 3  # official: rel_pos_bias -> L + 1
    assert ids["beit.embeddings.mask_token"] == 0


def test_effective_lr_after_n_steps_keeps_the_decay():
    """Every group's lr = base * scale * schedule(N) with our scheduler and with transformers' (which multiplies each
    group's initial lr) - unlike lr_scale-only groups, which transformers' schedulers ignore."""
    model = _swin_base_shaped()
    base_lr, steps, warmup = 1e-3, 50, 10
    optimizer = create_optimizer(model, learning_rate=base_lr, weight_decay=0.05, layer_decay=0.9)
    scheduler = get_simmim_scheduler(
        optimizer, base_lr=base_lr, num_training_steps=steps, num_warmup_steps=warmup, warmup_lr=1e-6, min_lr=1e-5
    )
    for _ in range(23):
        optimizer.step()
        scheduler.step()
    expected_top = simmim_lr_at(23, base_lr, steps, warmup, 1e-6, 1e-5)
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(group["lr_scale"] * expected_top, rel=1e-9)
    assert max(scheduler.get_last_lr()) == pytest.approx(expected_top, rel=1e-9)  # the head's lr is the logged one

    optimizer = create_optimizer(model, learning_rate=base_lr, weight_decay=0.05, layer_decay=0.9)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    for _ in range(23):
        optimizer.step()
        scheduler.step()
    factor = 0.5 * (1 + math.cos(math.pi * (23 - warmup) / (steps - warmup)))
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(base_lr * group["lr_scale"] * factor, rel=1e-9)
    assert len({round(group["lr"], 15) for group in optimizer.param_groups}) == 26


def test_layer_decay_one_gives_two_groups():
    model = _swin_base_shaped()
    groups = param_groups_layer_decay(model, 0.05, 1.0, base_lr=1e-3)
    assert len(groups) == 2 and {g["weight_decay"] for g in groups} == {0.0, 0.05}
    assert all(g["lr"] == 1e-3 for g in groups)
