import json

import pytest
from transformers import AutoConfig, ResNetConfig, SwinConfig, ViTConfig

import modeling_simmim  # noqa: F401  (registers the Auto classes)
from modeling_simmim import SimMIMConfig


def test_encoder_stride_is_derived_per_family():
    assert SimMIMConfig.from_preset("swin_base").encoder_stride == 32  # patch 4 * 2**3
    assert SimMIMConfig.from_preset("swin_test", mask_patch_size=16).encoder_stride == 8  # 2 stages
    assert SimMIMConfig.from_preset("swinv2_huge").encoder_stride == 32
    assert SimMIMConfig.from_preset("vit_base").encoder_stride == 16
    assert SimMIMConfig(backbone_config=ViTConfig(image_size=64, patch_size=8)).encoder_stride == 8
    # An explicit stride wins, and transformers' own field is kept consistent with it.
    config = SimMIMConfig(backbone_config=SwinConfig(image_size=192, window_size=6), encoder_stride=32)
    assert config.backbone_config.encoder_stride == 32


def test_defaults_are_the_paper_setting():
    config = SimMIMConfig()
    assert config.backbone_type == "swin"
    assert (config.mask_patch_size, config.mask_ratio, config.image_size) == (32, 0.6, (192, 192))
    assert config.backbone_config.embed_dim == 128 and list(config.backbone_config.depths) == [2, 2, 18, 2]
    assert config.backbone_config.window_size == 6


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(backbone_config=SwinConfig(image_size=200, window_size=5)), r"200x200 is not divisible by mask_patch_size \(32\)"),
        (dict(backbone_config=ViTConfig(image_size=224, patch_size=16), mask_patch_size=40), r"mask_patch_size \(40\).*model patch size \(16\)"),
        (dict(mask_ratio=0.0), r"mask_ratio must lie in \(0, 1\), got 0.0"),
        (dict(mask_ratio=1.0), r"got 1.0"),
        (dict(mask_ratio=-0.2), r"got -0.2"),
        (dict(backbone_config=SwinConfig(image_size=48, window_size=3), mask_patch_size=16), r"48x48 is not divisible by the encoder stride \(32\)"),
    ],
)
def test_impossible_geometry_names_the_numbers(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SimMIMConfig(**kwargs)


def test_validate_geometry_for_another_image_size():
    config = SimMIMConfig.from_preset("swin_test", mask_patch_size=16)
    config.validate_geometry((64, 96))
    with pytest.raises(ValueError, match=r"64x72 is not divisible by mask_patch_size \(16\)"):
        config.validate_geometry((64, 72))
    assert config.mask_grid_size((64, 96)) == (16, 24)


def test_unsupported_backbone_is_refused():
    with pytest.raises(ValueError, match="Unsupported backbone type 'resnet'"):
        SimMIMConfig(backbone_config=ResNetConfig())
    with pytest.raises(ValueError, match="Unsupported backbone type 'resnet'"):
        SimMIMConfig(backbone_config={"model_type": "resnet"})
    with pytest.raises(ValueError, match="needs a `model_type` key"):
        SimMIMConfig(backbone_config={"image_size": 192})
    with pytest.raises(ValueError, match="Unknown preset 'swin_giant'"):
        SimMIMConfig.from_preset("swin_giant")


def test_save_load_and_auto_config_round_trip(tmp_path):
    config = SimMIMConfig.from_preset("beit_test", mask_patch_size=16, mask_ratio=0.5)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "simmim" and saved["backbone_config"]["model_type"] == "beit"
    assert saved["auto_map"]["AutoConfig"] == "configuration_simmim.SimMIMConfig"
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SimMIMConfig)
    assert loaded.backbone_config.to_dict() == config.backbone_config.to_dict()
    assert (loaded.mask_patch_size, loaded.mask_ratio, loaded.encoder_stride) == (16, 0.5, 8)


def test_backbone_config_from_dict():
    config = SimMIMConfig(backbone_config={"model_type": "swin", "image_size": 96, "embed_dim": 32, "depths": [1, 1],
                                           "num_heads": [1, 2], "window_size": 3})
    assert isinstance(config.backbone_config, SwinConfig)
    assert config.image_size == (96, 96) and config.encoder_stride == 8 and config.hidden_size == 64


def test_from_preset_routes_simmim_and_head_fields_to_the_simmim_config():
    config = SimMIMConfig.from_preset("swin_test", window_size=2, num_labels=5, fast_window_attention=False,
                                      label_smoothing=0.1, id2label={0: "a", 1: "b", 2: "c", 3: "d", 4: "e"})
    assert config.num_labels == 5 and config.id2label[4] == "e" and config.label_smoothing == 0.1
    assert config.fast_window_attention is False
    assert config.backbone_config.window_size == 2  # backbone fields still go to the backbone
    assert not hasattr(config.backbone_config, "fast_window_attention")
    assert not hasattr(config.backbone_config, "label_smoothing")
