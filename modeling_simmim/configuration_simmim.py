"""Configuration of SimMIM models: a transformers backbone config plus the masking geometry."""

from __future__ import annotations

import copy
import math
from typing import Any

from transformers import AutoConfig, BeitConfig, PretrainedConfig, SwinConfig, Swinv2Config, ViTConfig

SUPPORTED_BACKBONES: dict[str, type[PretrainedConfig]] = {
    "swin": SwinConfig,
    "swinv2": Swinv2Config,
    "vit": ViTConfig,
    "beit": BeitConfig,
}

# The official SimMIM ViT is BEiT-style; these BeitConfig values express it (REFERENCE.md "Backbones").
BEIT_SIMMIM_PRETRAIN: dict[str, Any] = {
    "use_mask_token": True,
    "use_absolute_position_embeddings": False,
    "use_relative_position_bias": False,
    "use_shared_relative_position_bias": True,
    "layer_scale_init_value": 0.1,
    "layer_norm_eps": 1e-6,
    "use_mean_pooling": False,
    "hidden_act": "gelu",
}

# Official backbones (REFERENCE.md table) and tiny ones for tests and CPU demos.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "swin_tiny": ("swin", dict(image_size=192, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                               window_size=6, drop_path_rate=0.0)),
    "swin_base": ("swin", dict(image_size=192, embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32],
                               window_size=6, drop_path_rate=0.0)),
    "swin_large": ("swin", dict(image_size=192, embed_dim=192, depths=[2, 2, 18, 2], num_heads=[6, 12, 24, 48],
                                window_size=12, drop_path_rate=0.0)),
    "swinv2_base": ("swinv2", dict(image_size=192, embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32],
                                   window_size=12, drop_path_rate=0.1)),  # official SwinV2 SimMIM: 0.1
    "swinv2_huge": ("swinv2", dict(image_size=192, embed_dim=352, depths=[2, 2, 18, 2], num_heads=[11, 22, 44, 88],
                                   window_size=12, drop_path_rate=0.1)),  # official SwinV2 SimMIM: 0.1
    "vit_base": ("beit", dict(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12,
                              num_attention_heads=12, intermediate_size=3072, drop_path_rate=0.1,
                              **BEIT_SIMMIM_PRETRAIN)),
    # Tiny presets: 2 stages / 2 blocks, seconds on a CPU. Used by tests and demo recipes.
    "swin_test": ("swin", dict(image_size=64, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4,
                               drop_path_rate=0.0)),
    "swinv2_test": ("swinv2", dict(image_size=64, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4,
                                   drop_path_rate=0.0)),
    "vit_test": ("vit", dict(image_size=64, patch_size=8, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=64)),
    "beit_test": ("beit", dict(image_size=64, patch_size=8, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=64, drop_path_rate=0.0,
                               **BEIT_SIMMIM_PRETRAIN)),
}


def _pair(value: int | list[int] | tuple[int, ...]) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def build_backbone_config(backbone_type: str, **kwargs: Any) -> PretrainedConfig:
    """Instantiate the transformers config of `backbone_type` ("swin", "swinv2", "vit" or "beit")."""
    if backbone_type not in SUPPORTED_BACKBONES:
        raise ValueError(
            f"Unsupported backbone type {backbone_type!r}: SimMIM supports {sorted(SUPPORTED_BACKBONES)}."
        )
    return SUPPORTED_BACKBONES[backbone_type](**kwargs)


# Fields of SimMIMConfig itself (not of its backbone) that `from_preset` accepts among its keyword arguments.
_OWN_FIELDS = frozenset({
    "encoder_stride", "fast_window_attention", "num_labels", "id2label", "label2id", "label_smoothing",
    "classifier_pooling",
})


class SimMIMConfig(PretrainedConfig):
    r"""
    Configuration of a SimMIM model: a Swin, SwinV2, ViT or BEiT-style ViT encoder (any transformers config of those
    types), the masking geometry, and the stride of the one-layer pixel decoder.

    Args:
        backbone_config (`PretrainedConfig` or `dict`, *optional*):
            Config of the encoder (`SwinConfig`, `Swinv2Config`, `ViTConfig` or `BeitConfig`), or its dict with a
            `model_type` key. Defaults to Swin-B at 192 px, window 6 (the paper's main setting).
        mask_patch_size (`int`, *optional*, defaults to 32):
            Side in pixels of the square blocks that are masked together.
        mask_ratio (`float`, *optional*, defaults to 0.6):
            Fraction of mask patches that are masked (`ceil(mask_ratio * n)` of `n`).
        encoder_stride (`int`, *optional*):
            Pixels per output feature of the encoder (the decoder's `PixelShuffle` factor). Derived from the backbone
            when not given: Swin/SwinV2 `patch_size * 2 ** (num_stages - 1)`, ViT/BEiT `patch_size`.
        norm_target_window (`int`, *optional*):
            When set (odd, e.g. 47 in the official SwinV2 recipe), the regression target is each pixel normalized by
            the mean and unbiased standard deviation of its `norm_target_window`-square neighbourhood (the official
            `NORM_TARGET` option). `None` (default): the paper's raw normalized pixels.
        fast_window_attention (`bool`, *optional*, defaults to `True`):
            Use this package's faster window attention inside transformers' Swin modules (same parameters, same
            numerics within float tolerance). Ignored for other families.

    Raises `ValueError` naming the numbers when the geometry cannot work (see `validate_geometry`).
    """

    model_type = "simmim"
    sub_configs = {"backbone_config": AutoConfig}

    def __init__(
        self,
        backbone_config: PretrainedConfig | dict[str, Any] | None = None,
        mask_patch_size: int = 32,
        mask_ratio: float = 0.6,
        encoder_stride: int | None = None,
        fast_window_attention: bool = True,
        norm_target_window: int | None = None,
        **kwargs: Any,
    ) -> None:
        if backbone_config is None:
            backbone_type, preset_kwargs = PRESETS["swin_base"]
            backbone_config = build_backbone_config(backbone_type, **preset_kwargs)
        elif isinstance(backbone_config, dict):
            backbone_config = dict(backbone_config)
            backbone_type = backbone_config.pop("model_type", None)
            if backbone_type is None:
                raise ValueError("`backbone_config` given as a dict needs a `model_type` key (swin, swinv2, vit, beit).")
            backbone_config = build_backbone_config(backbone_type, **backbone_config)
        elif not isinstance(backbone_config, PretrainedConfig):
            raise TypeError(f"`backbone_config` must be a transformers config or a dict, got {type(backbone_config)}.")
        if backbone_config.model_type not in SUPPORTED_BACKBONES:
            raise ValueError(
                f"Unsupported backbone type {backbone_config.model_type!r}: SimMIM supports {sorted(SUPPORTED_BACKBONES)}."
            )
        self.backbone_config = backbone_config
        self.mask_patch_size = int(mask_patch_size)
        self.mask_ratio = float(mask_ratio)
        self.encoder_stride = int(encoder_stride) if encoder_stride is not None else self._derived_encoder_stride()
        self.fast_window_attention = bool(fast_window_attention)
        self.norm_target_window = int(norm_target_window) if norm_target_window is not None else None
        if hasattr(backbone_config, "encoder_stride"):
            # Keep transformers' own field consistent, so the backbone config also drives its native MIM classes.
            backbone_config.encoder_stride = self.encoder_stride
        super().__init__(**kwargs)
        self.validate_geometry()

    # ----------------------------------------------------------------------------------------------------------------
    # Geometry, asked by every other room (one source of truth).
    @property
    def backbone_type(self) -> str:
        return self.backbone_config.model_type

    @property
    def model_patch_size(self) -> int:
        patch = _pair(self.backbone_config.patch_size)
        if patch[0] != patch[1]:
            raise ValueError(f"Only square model patches are supported, got patch_size={patch}.")
        return patch[0]

    @property
    def image_size(self) -> tuple[int, int]:
        return _pair(self.backbone_config.image_size)

    @property
    def num_channels(self) -> int:
        return int(self.backbone_config.num_channels)

    @property
    def hidden_size(self) -> int:
        """Channels of the encoder's last feature map (the decoder's input)."""
        return int(self.backbone_config.hidden_size)

    def _derived_encoder_stride(self) -> int:
        if self.backbone_type in ("swin", "swinv2"):
            return self.model_patch_size * 2 ** (len(self.backbone_config.depths) - 1)
        return self.model_patch_size

    def validate_geometry(self, image_size: int | tuple[int, int] | None = None) -> None:
        """Raise `ValueError` naming the numbers if `image_size` (default: the backbone's) cannot be masked and
        reconstructed with this config."""
        height, width = _pair(image_size) if image_size is not None else self.image_size
        patch, mask_patch, stride = self.model_patch_size, self.mask_patch_size, self.encoder_stride
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in (0, 1), got {self.mask_ratio}.")
        window = getattr(self, "norm_target_window", None)
        if window is not None and (window < 3 or window % 2 == 0):
            raise ValueError(f"norm_target_window must be an odd size >= 3 (official: 47), got {window}.")
        if mask_patch <= 0 or mask_patch % patch != 0:
            raise ValueError(
                f"mask_patch_size ({mask_patch}) must be a positive multiple of the model patch size ({patch})."
            )
        if height % mask_patch != 0 or width % mask_patch != 0:
            raise ValueError(
                f"Image size {height}x{width} is not divisible by mask_patch_size ({mask_patch}): use an image size "
                f"that is a multiple of {mask_patch} (e.g. {math.ceil(height / mask_patch) * mask_patch})."
            )
        if height % stride != 0 or width % stride != 0:
            raise ValueError(
                f"Image size {height}x{width} is not divisible by the encoder stride ({stride}), so the decoder "
                f"cannot rebuild it: use a multiple of {stride}."
            )

    def mask_grid_size(self, image_size: int | tuple[int, int] | None = None) -> tuple[int, int]:
        """Shape (H/p, W/p) of the model-patch grid that `bool_masked_pos` describes."""
        height, width = _pair(image_size) if image_size is not None else self.image_size
        return height // self.model_patch_size, width // self.model_patch_size

    # ----------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, mask_patch_size: int = 32, mask_ratio: float = 0.6,
                    norm_target_window: int | None = None, **backbone_overrides: Any):
        """Build the config of a named backbone: the official ones ("swin_base", "swin_large", "swinv2_base",
        "swinv2_huge", "vit_base" = BEiT-style ViT-B/16, plus "swin_tiny") and tiny test ones ("swin_test",
        "swinv2_test", "vit_test", "beit_test"). `backbone_overrides` replace preset values (e.g. window_size=7);
        the SimMIM and classification-head fields among them (`encoder_stride`, `fast_window_attention`,
        `num_labels`, `id2label`, `label2id`, `label_smoothing`, `classifier_pooling`) set this config instead."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; available: {sorted(PRESETS)}.")
        backbone_type, preset_kwargs = PRESETS[name]
        own = {key: backbone_overrides.pop(key) for key in list(backbone_overrides) if key in _OWN_FIELDS}
        kwargs = {**copy.deepcopy(preset_kwargs), **backbone_overrides}
        return cls(
            backbone_config=build_backbone_config(backbone_type, **kwargs),
            mask_patch_size=mask_patch_size,
            mask_ratio=mask_ratio,
            norm_target_window=norm_target_window,
            **own,
        )

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        if isinstance(self.backbone_config, PretrainedConfig):
            output["backbone_config"] = self.backbone_config.to_dict()
        return output


__all__ = ["SimMIMConfig", "PRESETS", "SUPPORTED_BACKBONES", "build_backbone_config"]
