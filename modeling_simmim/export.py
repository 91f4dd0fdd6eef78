"""Exports: a finetuned classifier as a native transformers folder, an encoder as a timm state dict.

    python -m modeling_simmim.export --to timm --model_name_or_path outputs/swin_base --output_dir swin_base_timm
    python -m modeling_simmim.export --to transformers --model_name_or_path outputs/swin_base_ft224 --output_dir native

`--to timm` (Swin and BEiT-style ViT) writes `model.safetensors` with the encoder under timm's names and
`timm_config.json`, and prints the `timm.create_model(...)` call that loads it strictly. `--to transformers` writes a
`SimMIMForImageClassification` checkpoint as transformers' own `XForImageClassification` plus its image processor
(the finetuning script does this for its output folder).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .configuration_simmim import SimMIMConfig, stage_resolutions

# --------------------------------------------------------------------------------------------------------------------
# Native export: a folder that plain transformers loads (pipeline("image-classification", model=folder))
# --------------------------------------------------------------------------------------------------------------------
NATIVE_CLASSIFIERS = {
    "swin": "SwinForImageClassification",
    "swinv2": "Swinv2ForImageClassification",
    "beit": "BeitForImageClassification",
    "vit": "ViTForImageClassification",
}


def build_image_processor(
    image_size: int | Sequence[int],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str = "bicubic",
    resize_size: int | None = None,
):
    """An evaluation preprocessing as a transformers image processor (`BitImageProcessor`, which plain transformers
    loads by name): shorter side resized to `resize_size`, centre crop to `image_size` (an int or (height, width)),
    ImageNet mean/std by default. `resize_size` defaults to the finetuning's evaluation, int(size * 256 / 224); the
    pretraining's evaluation resizes to the crop size itself (`resize_size=max(image_size)`)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from transformers import BitImageProcessor
    from transformers.image_utils import PILImageResampling

    from .augmentation import eval_resize_size

    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    resample = {"bicubic": PILImageResampling.BICUBIC, "bilinear": PILImageResampling.BILINEAR}[interpolation]
    return BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": resize_size or eval_resize_size(max(height, width))},
        resample=resample,
        do_center_crop=True,
        crop_size={"height": height, "width": width},
        do_rescale=True,
        do_normalize=True,
        image_mean=list(mean or IMAGENET_DEFAULT_MEAN),
        image_std=list(std or IMAGENET_DEFAULT_STD),
        do_convert_rgb=True,
    )


def to_native_model(model):
    """The transformers `XForImageClassification` equivalent of a `SimMIMForImageClassification` (same weights)."""
    import transformers

    config = model.config
    family = config.backbone_type
    if family == "vit" and getattr(config, "classifier_pooling", "cls") != "cls":
        raise ValueError(
            "transformers' ViTForImageClassification pools the CLS token; a mean-pooled ViT has no native class. "
            "Train with classifier_pooling='cls', or use the BEiT-style ViT (beit family) for mean pooling."
        )
    if family == "swin":
        small = [res for res in stage_resolutions(config.backbone_config) if res < config.backbone_config.window_size]
        if small:
            raise ValueError(
                f"transformers' Swin cannot run window {config.backbone_config.window_size} on a {small[0]}x{small[0]} "
                "stage (its bias table keeps the full window while the attention shrinks to the stage): this model "
                "has no native export. Use a window that fits every stage (e.g. 7 at 224 px)."
            )
    native_config = copy.deepcopy(config.backbone_config)
    native_config.id2label = dict(config.id2label)
    native_config.label2id = dict(config.label2id)
    native_config.problem_type = None  # single-label: pipeline applies softmax
    native_class = getattr(transformers, NATIVE_CLASSIFIERS[family])
    native_config.architectures = [native_class.__name__]
    if family == "beit":
        native_config.use_mask_token = False
    native_config._attn_implementation = None  # transformers' default, not a kernel chosen for training
    native = native_class(native_config)
    missing, unexpected = native.load_state_dict(model.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(
            f"weights do not map onto {native_class.__name__}: missing {missing}, unexpected {unexpected}"
        )
    return native.eval()


def export_to_transformers(model, output_dir: str, image_processor=None) -> str:
    """Save `model` (a `SimMIMForImageClassification`) as a native transformers classifier plus its image
    processor, so that `pipeline("image-classification", model=output_dir)` works without this package.
    `image_processor` defaults to the evaluation preprocessing at the model's image size."""
    native = to_native_model(model)
    os.makedirs(output_dir, exist_ok=True)
    native.save_pretrained(output_dir)
    if image_processor is None:
        image_processor = build_image_processor(model.config.image_size[0])
    image_processor.save_pretrained(output_dir)
    return output_dir


# --------------------------------------------------------------------------------------------------------------------
# timm export: the encoder under timm's names (pure functions of a state dict and a backbone config)
# --------------------------------------------------------------------------------------------------------------------
_TIMM_SWIN_NAMES = {
    (96, (2, 2, 6, 2), (3, 6, 12, 24)): "swin_tiny_patch4_window7_224",
    (96, (2, 2, 18, 2), (3, 6, 12, 24)): "swin_small_patch4_window7_224",
    (128, (2, 2, 18, 2), (4, 8, 16, 32)): "swin_base_patch4_window7_224",
    (192, (2, 2, 18, 2), (6, 12, 24, 48)): "swin_large_patch4_window12_384",
}
_TIMM_BEIT_NAMES = {(768, 12, 12): "beit_base_patch16_224", (1024, 24, 16): "beit_large_patch16_224"}


def _size(value) -> int | list[int]:
    if isinstance(value, (list, tuple)):
        return list(value) if value[0] != value[1] else int(value[0])
    return int(value)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"no timm equivalent: {message}")


def _swin_to_timm(state: Mapping[str, torch.Tensor], config) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    _require(not config.use_absolute_embeddings, "timm's Swin has no absolute position embedding")
    _require(abs(config.layer_norm_eps - 1e-5) < 1e-12, f"layer_norm_eps {config.layer_norm_eps} (timm's Swin: 1e-5)")
    _require(config.hidden_act == "gelu", f"hidden_act {config.hidden_act!r} (timm's Swin: gelu)")
    kwargs = dict(
        img_size=_size(config.image_size),
        patch_size=_size(config.patch_size),
        in_chans=config.num_channels,
        embed_dim=config.embed_dim,
        depths=tuple(config.depths),
        num_heads=tuple(config.num_heads),
        window_size=config.window_size,
        mlp_ratio=float(config.mlp_ratio),
        qkv_bias=config.qkv_bias,
        num_classes=0,
    )
    name = _TIMM_SWIN_NAMES.get(
        (config.embed_dim, tuple(config.depths), tuple(config.num_heads)), "swin_tiny_patch4_window7_224"
    )
    renames = [
        (r"embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
        (r"embeddings\.norm\.", "patch_embed.norm."),
        (r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.layernorm_before\.", r"layers.\1.blocks.\2.norm1."),
        (r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.layernorm_after\.", r"layers.\1.blocks.\2.norm2."),
        (
            r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.relative_position_bias\.relative_position_bias_table",
            r"layers.\1.blocks.\2.attn.relative_position_bias_table",
        ),
        (r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.o_proj\.", r"layers.\1.blocks.\2.attn.proj."),
        (r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.mlp\.", r"layers.\1.blocks.\2.mlp."),
        # transformers merges patches at the end of a stage, timm at the start of the next one
        (r"encoder\.layers\.(\d+)\.downsample\.", lambda m: f"layers.{int(m.group(1)) + 1}.downsample."),
        (r"layernorm\.", "norm."),
    ]
    out: dict[str, torch.Tensor] = {}
    fused = re.compile(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)")
    for key, value in state.items():
        if (match := fused.fullmatch(key)) is not None:
            if match.group(3) == "q":
                stem = f"encoder.layers.{match.group(1)}.blocks.{match.group(2)}.attention"
                qkv = [state[f"{stem}.{part}_proj.{match.group(4)}"] for part in "qkv"]
                out[f"layers.{match.group(1)}.blocks.{match.group(2)}.attn.qkv.{match.group(4)}"] = torch.cat(qkv)
            continue
        out[_rename(key, renames)] = value
    return name, kwargs, out


def _beit_to_timm(state: Mapping[str, torch.Tensor], config) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    _require(abs(config.layer_norm_eps - 1e-6) < 1e-12, f"layer_norm_eps {config.layer_norm_eps} (timm's BEiT: 1e-6)")
    _require(config.hidden_act == "gelu", f"hidden_act {config.hidden_act!r} (timm's BEiT: gelu)")
    layer_scale = config.layer_scale_init_value
    kwargs = dict(
        img_size=_size(config.image_size),
        patch_size=_size(config.patch_size),
        in_chans=config.num_channels,
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_ratio=config.intermediate_size / config.hidden_size,
        qkv_bias=True,
        init_values=layer_scale if layer_scale and layer_scale > 0 else None,
        use_abs_pos_emb=config.use_absolute_position_embeddings,
        use_rel_pos_bias=config.use_relative_position_bias,
        use_shared_rel_pos_bias=config.use_shared_relative_position_bias,
        global_pool="avg" if config.use_mean_pooling else "token",
        num_classes=0,
    )
    name = _TIMM_BEIT_NAMES.get(
        (config.hidden_size, config.num_hidden_layers, config.num_attention_heads), "beit_base_patch16_224"
    )
    renames = [
        (r"embeddings\.cls_token", "cls_token"),
        (r"embeddings\.position_embeddings", "pos_embed"),
        (r"embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
        (r"shared_position_bias\.relative_position_bias_table", "rel_pos_bias.relative_position_bias_table"),
        (r"layers\.(\d+)\.lambda_(\d)", r"blocks.\1.gamma_\2"),
        (r"layers\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
        (r"layers\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
        (
            r"layers\.(\d+)\.relative_position_bias\.relative_position_bias_table",
            r"blocks.\1.attn.relative_position_bias_table",
        ),
        (r"layers\.(\d+)\.attention\.q_proj\.bias", r"blocks.\1.attn.q_bias"),
        (r"layers\.(\d+)\.attention\.v_proj\.bias", r"blocks.\1.attn.v_bias"),
        (r"layers\.(\d+)\.attention\.o_proj\.", r"blocks.\1.attn.proj."),
        (r"layers\.(\d+)\.mlp\.", r"blocks.\1.mlp."),
        (r"layernorm\.", "norm."),
        (r"pooler\.layernorm\.", "fc_norm."),
    ]
    out: dict[str, torch.Tensor] = {}
    fused = re.compile(r"layers\.(\d+)\.attention\.([qkv])_proj\.weight")
    for key, value in state.items():
        if (match := fused.fullmatch(key)) is not None:
            if match.group(2) == "q":
                stem = f"layers.{match.group(1)}.attention"
                qkv = [state[f"{stem}.{part}_proj.weight"] for part in "qkv"]
                out[f"blocks.{match.group(1)}.attn.qkv.weight"] = torch.cat(qkv)
            continue
        out[_rename(key, renames)] = value
    return name, kwargs, out


def _rename(key: str, renames) -> str:
    for pattern, replacement in renames:
        renamed, count = re.subn(f"^{pattern}", replacement, key)
        if count:
            return renamed
    raise ValueError(f"no timm equivalent for the encoder weight {key!r}")


def timm_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: SimMIMConfig
) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """(timm model name, `timm.create_model` keyword arguments, state dict) of the encoder in `state_dict` (keys of
    our models or transformers' own: "swin.*", "beit.*"; the MIM decoder, mask token and head are left out).
    `timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...), **kwargs)` loads it strictly."""
    family = config.backbone_type
    if family not in ("swin", "beit"):
        raise ValueError(f"timm export covers Swin and BEiT-style ViT, not {family}.")
    prefix = f"{family}."
    encoder = {
        key[len(prefix) :]: value.detach().contiguous()
        for key, value in state_dict.items()
        if key.startswith(prefix) and not key.endswith(("mask_token", "relative_position_index"))
    }
    convert = _swin_to_timm if family == "swin" else _beit_to_timm
    return convert(encoder, config.backbone_config)


def export_to_timm(name_or_path: str, output_dir: str, **load_kwargs: Any) -> tuple[str, dict[str, Any], str]:
    """Write the encoder of a saved model (ours or transformers', MIM or classifier) as timm's `model.safetensors` and
    `timm_config.json` in `output_dir`. Returns (timm model name, create_model kwargs, weights path)."""
    from safetensors.torch import save_file

    from .loading import source_state_dict

    config = SimMIMConfig.from_pretrained(name_or_path, **load_kwargs)
    name, kwargs, state = timm_state_dict(source_state_dict(name_or_path, config, **load_kwargs), config)
    os.makedirs(output_dir, exist_ok=True)
    weights = os.path.join(output_dir, "model.safetensors")
    save_file(state, weights)
    with open(os.path.join(output_dir, "timm_config.json"), "w") as handle:
        json.dump({"model_name": name, "kwargs": kwargs}, handle, indent=2)
    return name, kwargs, weights


def create_model_call(name: str, kwargs: Mapping[str, Any], weights: str) -> str:
    """The Python line that builds the exported encoder with timm."""
    arguments = ", ".join(f"{key}={value!r}" for key, value in kwargs.items())
    return f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict(file={weights!r}), {arguments})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modeling_simmim.export", description=__doc__.split("\n")[0])
    parser.add_argument("--to", required=True, choices=["timm", "transformers"])
    parser.add_argument("--model_name_or_path", required=True, help="saved model folder or Hub id")
    parser.add_argument("--output_dir", required=True)
    args = parser.parse_args(argv)
    if args.to == "timm":
        name, kwargs, weights = export_to_timm(args.model_name_or_path, args.output_dir)
        print(
            f"Encoder written to {weights}; load it with\n  import timm\n  {create_model_call(name, kwargs, weights)}"
        )
    else:
        from . import SimMIMForImageClassification

        model = SimMIMForImageClassification.from_pretrained(args.model_name_or_path)
        export_to_transformers(model, args.output_dir)
        print(f"Native transformers classifier written to {args.output_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
