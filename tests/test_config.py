import json

import pytest
from transformers import AutoConfig, BeitConfig, ResNetConfig, SwinConfig, ViTConfig

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
        (
            dict(backbone_config=SwinConfig(image_size=200, window_size=5)),
            r"200x200 is not divisible by mask_patch_size \(32\)",
        ),
        (
            dict(backbone_config=ViTConfig(image_size=224, patch_size=16), mask_patch_size=40),
            r"mask_patch_size \(40\).*model patch size \(16\)",
        ),
        (dict(mask_ratio=0.0), r"mask_ratio must lie in \(0, 1\), got 0.0"),
        (dict(mask_ratio=1.0), r"got 1.0"),
        (dict(mask_ratio=-0.2), r"got -0.2"),
        (
            dict(backbone_config=SwinConfig(image_size=48, window_size=3), mask_patch_size=16),
            r"48x48 is not divisible by the encoder stride \(32\)",
        ),
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


def test_saved_config_is_the_native_backbone_config_with_the_simmim_fields(tmp_path):
    config = SimMIMConfig.from_preset("beit_test", mask_patch_size=16, mask_ratio=0.5)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "beit" and "backbone_config" not in saved and "auto_map" not in saved
    assert (saved["mask_patch_size"], saved["mask_ratio"], saved["encoder_stride"]) == (16, 0.5, 8)
    assert saved["norm_target_window"] is None and "fast_window_attention" not in saved  # a kernel choice: not saved
    assert "id2label" not in saved  # no stray 2-label map: the labels are the head's, and there is none
    native = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(native, BeitConfig) and native.mask_patch_size == 16
    loaded = SimMIMConfig.from_pretrained(tmp_path)
    assert loaded.backbone_config.to_dict() == config.backbone_config.to_dict()
    assert (loaded.mask_patch_size, loaded.mask_ratio, loaded.encoder_stride) == (16, 0.5, 8)


def test_folders_of_the_earlier_nested_format_still_load(tmp_path):
    backbone = SimMIMConfig.from_preset("swin_test").backbone_config.to_dict()
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "simmim",
                "backbone_config": backbone,
                "mask_patch_size": 16,
                "mask_ratio": 0.5,
                "fast_window_attention": True,
                "auto_map": {"AutoConfig": "configuration_simmim.SimMIMConfig"},
            }
        )
    )
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SimMIMConfig) and loaded.backbone_type == "swin" and loaded.mask_patch_size == 16
    assert loaded.fast_window_attention is False  # the saved kernel choice of the earlier default is not followed


def test_native_configs_convert_with_simmim_fields_or_fitting_defaults():
    swin = SwinConfig(image_size=48, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=6)
    config = SimMIMConfig.from_native(swin)
    # no SimMIM fields: the mask patch is the first of 32, the encoder stride and the patch that fits 48 px
    assert (config.mask_patch_size, config.encoder_stride, config.backbone_config.window_size) == (8, 8, 6)
    swin.mask_patch_size, swin.norm_target_window, swin.encoder_stride = 16, 5, 8  # as SimMIM saves them
    config = SimMIMConfig.from_native(swin)
    assert (config.mask_patch_size, config.norm_target_window) == (16, 5)
    assert not hasattr(config.backbone_config, "norm_target_window")  # SimMIM fields live on the SimMIM config


def test_backbone_fields_read_and_write_through_and_update_works():
    config = SimMIMConfig.from_preset("swin_test", mask_patch_size=16)
    assert (config.patch_size, config.window_size, config.embed_dim, config.hidden_size) == (4, 4, 16, 32)
    assert config.num_attention_heads == [1, 2]  # the backbone's attribute map
    config.update({"window_size": 2, "embed_dim": 8, "image_size": 96, "mask_ratio": 0.5})
    backbone = config.backbone_config
    assert (backbone.window_size, backbone.embed_dim, backbone.image_size, config.mask_ratio) == (2, 8, 96, 0.5)
    assert config.hidden_size == backbone.hidden_size == 16  # derived fields follow
    config.image_size = (64, 96)
    assert config.image_size == (64, 96) and backbone is not config.backbone_config
    config.encoder_stride = 16
    assert config.backbone_config.encoder_stride == 16  # transformers' own field kept in step
    with pytest.raises(ValueError, match=r"\['hidden_size'\] cannot be set on a swin config: derived"):
        config.hidden_size = 64
    with pytest.raises(AttributeError):
        config.not_a_field  # noqa: B018


def test_backbone_config_from_dict():
    config = SimMIMConfig(
        backbone_config={
            "model_type": "swin",
            "image_size": 96,
            "embed_dim": 32,
            "depths": [1, 1],
            "num_heads": [1, 2],
            "window_size": 3,
        }
    )
    assert isinstance(config.backbone_config, SwinConfig)
    assert config.image_size == (96, 96) and config.encoder_stride == 8 and config.hidden_size == 64


def test_from_preset_routes_simmim_and_head_fields_to_the_simmim_config():
    config = SimMIMConfig.from_preset(
        "swin_test",
        window_size=2,
        num_labels=5,
        fast_window_attention=False,
        label_smoothing=0.1,
        id2label={0: "a", 1: "b", 2: "c", 3: "d", 4: "e"},
    )
    assert config.num_labels == 5 and config.id2label[4] == "e" and config.label_smoothing == 0.1
    assert config.fast_window_attention is False
    assert config.backbone_config.window_size == 2  # backbone fields still go to the backbone
    assert not hasattr(config.backbone_config, "fast_window_attention")
    assert not hasattr(config.backbone_config, "label_smoothing")
