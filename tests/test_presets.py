"""The official backbones are buildable by name; parameter counts match the published ones (on the meta device)."""

import pytest
import torch

from modeling_simmim import SimMIMConfig, SimMIMForMaskedImageModeling


@pytest.mark.parametrize(
    "preset, family, published_millions",
    [
        ("swin_base", "swin", 88),  # Swin-B: 88M with a 1000-class head
        ("swin_large", "swin", 197),  # Swin-L: 197M
        ("swinv2_huge", "swinv2", 658),  # SwinV2-H: 658M
        ("vit_base", "beit", 86),  # ViT-B/16: 86M
    ],
)
def test_official_backbone_parameter_counts(preset, family, published_millions):
    config = SimMIMConfig.from_preset(preset)
    assert config.backbone_type == family
    with torch.device("meta"):
        model = SimMIMForMaskedImageModeling(config)
    encoder = sum(p.numel() for p in model.backbone.parameters())
    with_head = encoder + config.hidden_size * 1000 + 1000  # as the papers count: encoder + ImageNet head
    assert abs(with_head / 1e6 - published_millions) / published_millions < 0.01, with_head


def test_vit_base_is_beit_style():
    backbone = SimMIMConfig.from_preset("vit_base").backbone_config
    assert backbone.use_shared_relative_position_bias and not backbone.use_relative_position_bias
    assert not backbone.use_absolute_position_embeddings
    assert backbone.layer_scale_init_value == 0.1 and backbone.layer_norm_eps == 1e-6
    with torch.device("meta"):
        model = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("vit_base"))
    names = dict(model.named_parameters())
    assert "beit.layers.0.attention.q_proj.bias" in names and "beit.layers.0.attention.v_proj.bias" in names
    assert "beit.layers.0.attention.k_proj.bias" not in names  # q/v bias only
    assert "beit.shared_position_bias.relative_position_bias_table" in names


def test_preset_overrides():
    config = SimMIMConfig.from_preset("swin_base", image_size=224, window_size=7)
    assert config.image_size == (224, 224) and config.backbone_config.window_size == 7
