"""Configuration of SimMIM models: a transformers backbone config plus the masking geometry.

In memory a `SimMIMConfig` holds the backbone's own config (`backbone_config`) next to the SimMIM fields. On disk it
is the backbone's native config (`model_type` "swin", "swinv2", "vit" or "beit") carrying the SimMIM fields as extra
keys, so plain transformers loads a saved folder with its own classes, and any native folder loads back into ours.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import os
from collections.abc import Sequence
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
# What the official finetuning changes in a BEiT-style encoder (configs/vit_base__800ep/simmim_finetune_*.yaml): one
# relative position bias table per block and mean pooling + LayerNorm.
BEIT_SIMMIM_FINETUNE: dict[str, Any] = {
    "use_relative_position_bias": True,
    "use_shared_relative_position_bias": False,
    "use_mean_pooling": True,
    "use_mask_token": False,
}

# Official backbones (REFERENCE.md table) and tiny ones for tests and CPU demos.
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "swin_tiny": (
        "swin",
        dict(
            image_size=192,
            embed_dim=96,
            depths=[2, 2, 6, 2],
            num_heads=[3, 6, 12, 24],
            window_size=6,
            drop_path_rate=0.0,
        ),
    ),
    "swin_base": (
        "swin",
        dict(
            image_size=192,
            embed_dim=128,
            depths=[2, 2, 18, 2],
            num_heads=[4, 8, 16, 32],
            window_size=6,
            drop_path_rate=0.0,
        ),
    ),
    "swin_large": (
        "swin",
        dict(
            image_size=192,
            embed_dim=192,
            depths=[2, 2, 18, 2],
            num_heads=[6, 12, 24, 48],
            window_size=12,
            drop_path_rate=0.0,
        ),
    ),
    "swinv2_base": (
        "swinv2",
        dict(
            image_size=192,
            embed_dim=128,
            depths=[2, 2, 18, 2],
            num_heads=[4, 8, 16, 32],
            window_size=12,
            drop_path_rate=0.1,
        ),
    ),  # official SwinV2 SimMIM: 0.1
    "swinv2_huge": (
        "swinv2",
        dict(
            image_size=192,
            embed_dim=352,
            depths=[2, 2, 18, 2],
            num_heads=[11, 22, 44, 88],
            window_size=12,
            drop_path_rate=0.1,
        ),
    ),  # official SwinV2 SimMIM: 0.1
    "vit_base": (
        "beit",
        dict(
            image_size=224,
            patch_size=16,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            drop_path_rate=0.1,
            **BEIT_SIMMIM_PRETRAIN,
        ),
    ),
    # Tiny presets: 2 stages / 2 blocks, seconds on a CPU. Used by tests and demo recipes.
    "swin_test": (
        "swin",
        dict(image_size=64, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4, drop_path_rate=0.0),
    ),
    "swinv2_test": (
        "swinv2",
        dict(image_size=64, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4, drop_path_rate=0.0),
    ),
    "vit_test": (
        "vit",
        dict(
            image_size=64,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
        ),
    ),
    "beit_test": (
        "beit",
        dict(
            image_size=64,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            drop_path_rate=0.0,
            **BEIT_SIMMIM_PRETRAIN,
        ),
    ),
}

# SimMIM fields written into the saved (native) config.
SIMMIM_FIELDS = ("mask_patch_size", "mask_ratio", "encoder_stride", "norm_target_window", "decoder_kernel_size")
# Classification-head fields of SimMIMForImageClassification (saved when set).
HEAD_FIELDS = ("label_smoothing", "classifier_pooling")
# A kernel choice, like transformers' `attn_implementation`: in memory only, never saved.
RUNTIME_FIELDS = ("fast_window_attention",)
# Fields of every transformers config: they describe the whole model, so they live on the SimMIM config.
_COMMON_FIELDS = frozenset(PretrainedConfig().to_dict()) | {
    "num_labels",
    "name_or_path",
    "auto_map",
    "attn_implementation",
    "experts_implementation",
    "torch_dtype",
    "output_attentions",
    "finetuning_task",
    "base_config_key",
    "tie_word_embeddings",
}
_OWN_FIELDS = frozenset(SIMMIM_FIELDS + HEAD_FIELDS + RUNTIME_FIELDS)

# The transformers class that holds the same weights as ours, per (our class, family). BEiT has no pixel-regression
# MIM class in transformers (its BeitForMaskedImageModeling predicts visual tokens), so a BEiT pretraining folder
# needs our code.
NATIVE_ARCHITECTURES: dict[tuple[str, str], str] = {
    ("SimMIMForMaskedImageModeling", "swin"): "SwinForMaskedImageModeling",
    ("SimMIMForMaskedImageModeling", "swinv2"): "Swinv2ForMaskedImageModeling",
    ("SimMIMForMaskedImageModeling", "vit"): "ViTForMaskedImageModeling",
    ("SimMIMForImageClassification", "swin"): "SwinForImageClassification",
    ("SimMIMForImageClassification", "swinv2"): "Swinv2ForImageClassification",
    ("SimMIMForImageClassification", "vit"): "ViTForImageClassification",
    ("SimMIMForImageClassification", "beit"): "BeitForImageClassification",
}


def size_pair(value: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) of a size given as one int (square) or as a (height, width) pair, as transformers' configs
    store `image_size` and `patch_size`."""
    if isinstance(value, Sequence):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def patch_grid(backbone_config: PretrainedConfig) -> tuple[int, int]:
    """(rows, columns) of the patch grid of `backbone_config` at its `image_size`."""
    height, width = size_pair(backbone_config.image_size)
    patch_height, patch_width = size_pair(backbone_config.patch_size)
    return height // patch_height, width // patch_width


def build_backbone_config(backbone_type: str, **kwargs: Any) -> PretrainedConfig:
    """Instantiate the transformers config of `backbone_type` ("swin", "swinv2", "vit" or "beit")."""
    if backbone_type not in SUPPORTED_BACKBONES:
        raise ValueError(
            f"Unsupported backbone type {backbone_type!r}: SimMIM supports {sorted(SUPPORTED_BACKBONES)}."
        )
    return SUPPORTED_BACKBONES[backbone_type](**kwargs)


_BACKBONE_FIELDS: dict[type, frozenset[str]] = {}


def backbone_fields(config_class: type[PretrainedConfig]) -> frozenset[str]:
    """Names a backbone config class defines itself (not the fields every transformers config has)."""
    if config_class not in _BACKBONE_FIELDS:
        names = set(config_class().to_dict()) | set(getattr(config_class, "attribute_map", {}))
        _BACKBONE_FIELDS[config_class] = frozenset(names - _COMMON_FIELDS - {"model_type", "encoder_stride"})
    return _BACKBONE_FIELDS[config_class]


_DERIVED_FIELDS: dict[type, frozenset[str]] = {}


def _derived_fields(config_class: type[PretrainedConfig]) -> frozenset[str]:
    """Fields a backbone config computes from others (Swin: hidden_size, num_layers, stage_names): left out when it is
    rebuilt from its dict, so that they follow the fields they derive from."""
    if config_class not in _DERIVED_FIELDS:
        if dataclasses.is_dataclass(config_class):
            parameters = {field.name for field in dataclasses.fields(config_class)}
        else:
            parameters = set(inspect.signature(config_class.__init__).parameters)
        keep = parameters | {"out_features", "out_indices"} | _COMMON_FIELDS
        _DERIVED_FIELDS[config_class] = frozenset(set(config_class().to_dict()) - keep)
    return _DERIVED_FIELDS[config_class]


def stage_resolutions(backbone_config: PretrainedConfig) -> list[int]:
    """Side of the (square part of the) feature map of each Swin stage at `backbone_config.image_size`."""
    first = min(size_pair(backbone_config.image_size)) // size_pair(backbone_config.patch_size)[0]
    return [first // 2**i for i in range(len(backbone_config.depths))]


class SimMIMConfig(PretrainedConfig):
    r"""
    Configuration of a SimMIM model: a Swin, SwinV2, ViT or BEiT-style ViT encoder (any transformers config of those
    types), the masking geometry, and the stride and kernel of the one-layer pixel decoder.

    Args:
        backbone_config (`PretrainedConfig` or `dict`, *optional*):
            Config of the encoder (`SwinConfig`, `Swinv2Config`, `ViTConfig` or `BeitConfig`), or its dict with a
            `model_type` key. Defaults to Swin-B at 192 px, window 6 (the paper's main setting).
        mask_patch_size (`int`, *optional*, defaults to 32):
            Side in pixels of the square blocks that are masked together. (A transformers config that carries none
            gets the first of 32, the encoder stride and the patch size that divides its image size.)
        mask_ratio (`float`, *optional*, defaults to 0.6):
            Fraction of mask patches that are masked (`ceil(mask_ratio * n)` of `n`).
        encoder_stride (`int`, *optional*):
            Pixels per output feature of the encoder (the decoder's `PixelShuffle` factor). Derived from the backbone
            when not given: Swin/SwinV2 `patch_size * 2 ** (num_stages - 1)`, ViT/BEiT `patch_size`.
        norm_target_window (`int`, *optional*):
            When set (odd, e.g. 47 in the official SwinV2 recipe), the regression target is each pixel normalized by
            the mean and unbiased standard deviation of its `norm_target_window`-square neighbourhood (the official
            `NORM_TARGET` option). `None` (default): the paper's raw normalized pixels.
        decoder_kernel_size (`int`, *optional*, defaults to 1):
            Kernel of the decoder's one convolution before the `PixelShuffle`: 1 is the official 1x1 (each
            reconstructed `encoder_stride` block sees only its own feature); an odd k > 1 (e.g. 3) is one k x k
            convolution with padding k // 2, giving each block its neighbours' features. transformers' MIM classes
            have a 1x1 decoder, so a pretraining folder with k > 1 ships our model code (remote code).
        fast_window_attention (`bool`, *optional*, defaults to `False`):
            Swin only: run the window attention through this package's attention function (registered with
            transformers' `AttentionInterface` as "simmim_window" when `modeling_simmim` is imported). A kernel
            choice like `attn_implementation`: not saved with the model.

    Backbone fields read and write through: `config.window_size`, `config.patch_size`, `config.update({...})` set the
    backbone's values (derived ones such as Swin's `hidden_size` are recomputed). `image_size` reads as a pair.
    Raises `ValueError` naming the numbers when the geometry cannot work (see `validate_geometry`).
    """

    model_type = "simmim"
    sub_configs = {"backbone_config": AutoConfig}

    def __init__(
        self,
        backbone_config: PretrainedConfig | dict[str, Any] | None = None,
        mask_patch_size: int | None = None,
        mask_ratio: float = 0.6,
        encoder_stride: int | None = None,
        fast_window_attention: bool = False,
        norm_target_window: int | None = None,
        decoder_kernel_size: int = 1,
        **kwargs: Any,
    ) -> None:
        native_type = kwargs.pop("model_type", None)
        from_native = native_type not in (None, self.model_type)
        if from_native:
            # A flat native config (what `save_pretrained` writes, or any transformers Swin/SwinV2/ViT/BEiT config).
            if backbone_config is not None:
                raise ValueError("Give either `backbone_config` or a flat transformers config, not both.")
            if native_type not in SUPPORTED_BACKBONES:
                raise ValueError(
                    f"Unsupported backbone type {native_type!r}: SimMIM supports {sorted(SUPPORTED_BACKBONES)}."
                )
            fields = backbone_fields(SUPPORTED_BACKBONES[native_type])
            backbone_kwargs = {key: kwargs.pop(key) for key in list(kwargs) if key in fields}
            backbone_config = build_backbone_config(native_type, **backbone_kwargs)
            foreign_mim = any("MaskedImageModeling" in name for name in kwargs.get("architectures") or [])
            if mask_patch_size is None and not foreign_mim:
                # A transformers config that SimMIM never saved: its `encoder_stride` default means nothing here
                # (only its MIM classes size their decoder with it), so the stride is derived.
                encoder_stride = None
        elif backbone_config is None:
            backbone_type, preset_kwargs = PRESETS["swin_base"]
            backbone_config = build_backbone_config(backbone_type, **preset_kwargs)
        elif isinstance(backbone_config, dict):
            backbone_config = dict(backbone_config)
            backbone_type = backbone_config.pop("model_type", None)
            if backbone_type is None:
                raise ValueError(
                    "`backbone_config` given as a dict needs a `model_type` key (swin, swinv2, vit, beit)."
                )
            # Labels belong to the SimMIM config (the head); a backbone dict's own (default) labels are dropped.
            for key in ("id2label", "label2id", "num_labels", "transformers_version"):
                backbone_config.pop(key, None)
            backbone_config = build_backbone_config(backbone_type, **backbone_config)
        elif not isinstance(backbone_config, PretrainedConfig):
            raise TypeError(f"`backbone_config` must be a transformers config or a dict, got {type(backbone_config)}.")
        if backbone_config.model_type not in SUPPORTED_BACKBONES:
            raise ValueError(
                f"Unsupported backbone type {backbone_config.model_type!r}: SimMIM supports {sorted(SUPPORTED_BACKBONES)}."
            )
        self.__dict__["backbone_config"] = backbone_config
        self.mask_ratio = float(mask_ratio)
        self.encoder_stride = int(encoder_stride) if encoder_stride is not None else self._derived_encoder_stride()
        if mask_patch_size is None:
            mask_patch_size = self._fitting_mask_patch_size() if from_native else 32
        self.mask_patch_size = int(mask_patch_size)
        self.fast_window_attention = bool(fast_window_attention)
        self.norm_target_window = int(norm_target_window) if norm_target_window is not None else None
        self.decoder_kernel_size = int(decoder_kernel_size) if decoder_kernel_size is not None else 1
        super().__init__(**kwargs)
        self.validate_geometry()

    # ----------------------------------------------------------------------------------------------------------------
    # Backbone fields read and write through (the saved config is flat, so users and transformers' scripts expect
    # `config.window_size`, `config.update({"image_size": ...})`, ...).
    def __getattr__(self, name: str) -> Any:
        backbone = self.__dict__.get("backbone_config")
        if backbone is None or name.startswith("__") or name not in backbone_fields(type(backbone)):
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return getattr(backbone, name)

    def __setattr__(self, name: str, value: Any) -> None:
        backbone = self.__dict__.get("backbone_config")
        if name == "backbone_config":
            super().__setattr__(name, value)
        elif backbone is not None and name not in _OWN_FIELDS and name in backbone_fields(type(backbone)):
            self.set_backbone_fields(**{name: value})
        else:
            super().__setattr__(name, value)
            if name == "encoder_stride" and backbone is not None and hasattr(backbone, "encoder_stride"):
                # Keep transformers' own field consistent: it sizes the decoder of its native MIM classes.
                backbone.encoder_stride = value

    def set_backbone_fields(self, **values: Any) -> None:
        """Set backbone config fields; the backbone config is rebuilt, so derived fields (Swin's `hidden_size`,
        `num_layers`, stage names) follow. A value that the rebuilt config does not keep raises `ValueError`."""
        backbone = self.backbone_config
        derived = sorted(set(values) & _derived_fields(type(backbone)))
        if derived:
            raise ValueError(
                f"{derived} cannot be set on a {backbone.model_type} config: derived from other fields (Swin: "
                "hidden_size from embed_dim and depths)."
            )
        merged = {**backbone.to_dict(), **values}
        for key in ("model_type", "transformers_version", *_derived_fields(type(backbone))):
            merged.pop(key, None)
        rebuilt = type(backbone)(**merged)
        rebuilt._attn_implementation_internal = getattr(backbone, "_attn_implementation_internal", None)
        if hasattr(rebuilt, "encoder_stride") and "encoder_stride" in self.__dict__:
            rebuilt.encoder_stride = self.encoder_stride
        self.__dict__["backbone_config"] = rebuilt

    # ----------------------------------------------------------------------------------------------------------------
    # Geometry, asked by every other room (one source of truth).
    @property
    def backbone_type(self) -> str:
        return self.backbone_config.model_type

    @property
    def model_patch_size(self) -> int:
        patch = size_pair(self.backbone_config.patch_size)
        if patch[0] != patch[1]:
            raise ValueError(f"Only square model patches are supported, got patch_size={patch}.")
        return patch[0]

    @model_patch_size.setter
    def model_patch_size(self, value: int) -> None:
        self.set_backbone_fields(patch_size=int(value))

    @property
    def image_size(self) -> tuple[int, int]:
        """(height, width) of the backbone's configured input."""
        return size_pair(self.backbone_config.image_size)

    @image_size.setter
    def image_size(self, value: int | list[int] | tuple[int, int]) -> None:
        height, width = size_pair(value)
        self.set_backbone_fields(image_size=height if height == width else [height, width])

    def _derived_encoder_stride(self) -> int:
        if self.backbone_type in ("swin", "swinv2"):
            return self.model_patch_size * 2 ** (len(self.backbone_config.depths) - 1)
        return self.model_patch_size

    def _fitting_mask_patch_size(self) -> int:
        height, width = self.image_size
        patch = self.model_patch_size
        fitting = [
            m for m in (32, self.encoder_stride, patch) if m % patch == 0 and height % m == 0 and width % m == 0
        ]
        return fitting[0] if fitting else 32

    def validate_geometry(self, image_size: int | tuple[int, int] | None = None) -> None:
        """Raise `ValueError` naming the numbers if `image_size` (default: the backbone's) cannot be masked and
        reconstructed with this config."""
        height, width = size_pair(image_size) if image_size is not None else self.image_size
        patch, mask_patch, stride = self.model_patch_size, self.mask_patch_size, self.encoder_stride
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in (0, 1), got {self.mask_ratio}.")
        window = self.norm_target_window
        if window is not None and (window < 3 or window % 2 == 0):
            raise ValueError(f"norm_target_window must be an odd size >= 3 (official: 47), got {window}.")
        kernel = self.decoder_kernel_size
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(
                f"decoder_kernel_size must be an odd size >= 1 (official: 1; 3 gives the decoder "
                f"spatial context), got {kernel}."
            )
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
        height, width = size_pair(image_size) if image_size is not None else self.image_size
        return height // self.model_patch_size, width // self.model_patch_size

    def native_architecture(self, class_name: str) -> str | None:
        """The transformers class that holds the weights of our `class_name` with this config, or None when only our
        code can (BEiT pretraining; a decoder wider than 1x1; a Swin stage smaller than the window, where
        transformers' Swin keeps the full window's bias table; a mean-pooled plain ViT classifier)."""
        native = NATIVE_ARCHITECTURES.get((class_name, self.backbone_type))
        if native is None:
            return None
        if native.endswith("ForMaskedImageModeling") and getattr(self, "decoder_kernel_size", 1) != 1:
            return None
        if self.backbone_type == "swin" and any(
            res < self.backbone_config.window_size for res in stage_resolutions(self.backbone_config)
        ):
            return None
        if native == "ViTForImageClassification" and getattr(self, "classifier_pooling", "cls") != "cls":
            return None
        return native

    # ----------------------------------------------------------------------------------------------------------------
    # Serialization: the backbone's native config with the SimMIM fields as extra keys.
    def to_native_config(self) -> PretrainedConfig:
        """The flat transformers config this config saves as: the backbone's config class, carrying the SimMIM and
        head fields, the labels and `architectures` under transformers' class names where they exist."""
        native = copy.deepcopy(self.backbone_config)
        for key, value in self.__dict__.items():
            if key in ("backbone_config", "kwargs") or key in RUNTIME_FIELDS or key.startswith("_"):
                continue
            value = copy.deepcopy(value)
            if key == "architectures" and value:
                value = [self.native_architecture(name) or name for name in value]
            setattr(native, key, value)
        return native

    def to_dict(self) -> dict[str, Any]:
        output = self.to_native_config().to_dict()
        output["_name_or_path"] = self.__dict__.get("_name_or_path", output.get("_name_or_path", ""))
        return output

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_native_config().to_diff_dict()

    @classmethod
    def from_native(cls, config: PretrainedConfig, **kwargs: Any) -> SimMIMConfig:
        """The SimMIM config of a transformers Swin/SwinV2/ViT/BEiT config (SimMIM fields read from its extra keys,
        or defaults); `kwargs` override them."""
        if isinstance(config, SimMIMConfig):
            return copy.deepcopy(config)
        values = config.to_dict()
        values.update(kwargs)
        simmim = cls(**values)
        simmim._attn_implementation_internal = getattr(config, "_attn_implementation_internal", None)
        return simmim

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any):
        # The kernel choice is the caller's (a keyword argument), never the file's: older folders saved it.
        config_dict = {key: value for key, value in config_dict.items() if key not in RUNTIME_FIELDS}
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        cache_dir: str | os.PathLike | None = None,
        force_download: bool = False,
        local_files_only: bool = False,
        token: str | bool | None = None,
        revision: str = "main",
        **kwargs: Any,
    ) -> SimMIMConfig:
        """`PretrainedConfig.from_pretrained` for a SimMIM folder (flat, or the older nested format) or any native
        transformers Swin/SwinV2/ViT/BEiT folder, without transformers' model-type mismatch warning."""
        kwargs.update(
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
            revision=revision,
        )
        if os.path.isfile(pretrained_model_name_or_path) and not str(pretrained_model_name_or_path).endswith(".json"):
            raise ValueError(
                f"{pretrained_model_name_or_path} is a file; pass the folder that holds config.json and the weights "
                "(official .pth checkpoints: convert them with `python -m modeling_simmim.convert_official` first)."
            )
        config_dict, kwargs = cls.get_config_dict(pretrained_model_name_or_path, **kwargs)
        return cls.from_dict(config_dict, **kwargs)

    # ----------------------------------------------------------------------------------------------------------------
    @classmethod
    def from_preset(
        cls,
        name: str,
        mask_patch_size: int = 32,
        mask_ratio: float = 0.6,
        norm_target_window: int | None = None,
        decoder_kernel_size: int = 1,
        **backbone_overrides: Any,
    ):
        """Build the config of a named backbone: the official ones ("swin_base", "swin_large", "swinv2_base",
        "swinv2_huge", "vit_base" = BEiT-style ViT-B/16, plus "swin_tiny") and tiny test ones ("swin_test",
        "swinv2_test", "vit_test", "beit_test"). `backbone_overrides` replace preset values (e.g. window_size=7);
        the SimMIM and classification-head fields among them (`encoder_stride`, `fast_window_attention`,
        `num_labels`, `id2label`, `label2id`, `label_smoothing`, `classifier_pooling`) set this config instead."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; available: {sorted(PRESETS)}.")
        backbone_type, preset_kwargs = PRESETS[name]
        own_names = _OWN_FIELDS | {"num_labels", "id2label", "label2id"}
        own = {key: backbone_overrides.pop(key) for key in list(backbone_overrides) if key in own_names}
        kwargs = {**copy.deepcopy(preset_kwargs), **backbone_overrides}
        return cls(
            backbone_config=build_backbone_config(backbone_type, **kwargs),
            mask_patch_size=mask_patch_size,
            mask_ratio=mask_ratio,
            norm_target_window=norm_target_window,
            decoder_kernel_size=decoder_kernel_size,
            **own,
        )


__all__ = [
    "BEIT_SIMMIM_FINETUNE",
    "BEIT_SIMMIM_PRETRAIN",
    "PRESETS",
    "SUPPORTED_BACKBONES",
    "SimMIMConfig",
    "build_backbone_config",
]
