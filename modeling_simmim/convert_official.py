"""Convert official SimMIM checkpoints (github.com/microsoft/SimMIM ``.pth`` files) into this project's format.

    python -m modeling_simmim.convert_official --checkpoint simmim_pretrain__swin_base__img192_window6__100ep.pth \\
        --output_dir simmim-swin-base-192 [--config official.yaml] [--push_to_hub user/repo]

Pretraining checkpoints (``encoder.*`` + ``decoder.0.*``) become a ``SimMIMForMaskedImageModeling`` folder;
finetuned ones (``head.*``) become an image-classification folder whose state dict is transformers-native
(``<prefix>.*`` + ``classifier.*``). Swin and the BEiT-style ViT of the paper are supported.

The official code fuses q/k/v into one ``qkv`` linear (the ViT adds separate ``q_bias``/``v_bias`` and no k bias),
names layer scale ``gamma_1/2``, shares one relative position bias table across ViT blocks during pretraining,
and saves buffers that transformers recomputes (``relative_position_index``, ``attn_mask``). The rules below map
every official tensor to exactly one transformers name (or drop a recomputed buffer); anything left over, and
any tensor the target model expects but did not receive, is an error that lists the names.

The checkpoint is read with :func:`modeling_simmim.safe_load.safe_load_checkpoint`: pickled code is never run.
"""

from __future__ import annotations

import argparse
import copy
import logging as std_logging
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import yaml
from transformers.utils import logging

from .backbones import get_adapter
from .safe_load import UnsafeCheckpointError, safe_load_checkpoint, to_plain_data

if TYPE_CHECKING:
    from .modeling_simmim import SimMIMPreTrainedModel

logger = logging.get_logger(__name__)

PRETRAINING = "pretraining"
CLASSIFICATION = "classification"

# The official config defaults (SimMIM config.py) for every field the conversion reads. Official checkpoints
# store the fully merged config, so these only fill fields an official YAML recipe leaves out.
OFFICIAL_DEFAULTS: dict[str, Any] = {
    "DATA": {"IMG_SIZE": 224, "MASK_PATCH_SIZE": 32, "MASK_RATIO": 0.6},
    "MODEL": {
        "TYPE": "swin",
        "NUM_CLASSES": 1000,
        "DROP_RATE": 0.0,
        "DROP_PATH_RATE": 0.1,
        "SWIN": {
            "PATCH_SIZE": 4,
            "IN_CHANS": 3,
            "EMBED_DIM": 96,
            "DEPTHS": [2, 2, 6, 2],
            "NUM_HEADS": [3, 6, 12, 24],
            "WINDOW_SIZE": 7,
            "MLP_RATIO": 4.0,
            "QKV_BIAS": True,
            "QK_SCALE": None,
            "APE": False,
            "PATCH_NORM": True,
        },
        "VIT": {
            "PATCH_SIZE": 16,
            "IN_CHANS": 3,
            "EMBED_DIM": 768,
            "DEPTH": 12,
            "NUM_HEADS": 12,
            "MLP_RATIO": 4,
            "QKV_BIAS": True,
            "INIT_VALUES": 0.1,
            "USE_APE": False,
            "USE_RPB": False,
            "USE_SHARED_RPB": True,
            "USE_MEAN_POOLING": False,
        },
    },
}


@dataclass
class OfficialArchitecture:
    """The official model's hyper-parameters, in the official vocabulary (``MODEL.SWIN.*`` / ``MODEL.VIT.*``)."""

    family: str  # "swin" or "vit" (the official MODEL.TYPE)
    image_size: int
    patch_size: int
    in_chans: int
    embed_dim: int
    depths: list[int]  # Swin: blocks per stage; ViT: [depth]
    num_heads: list[int]  # Swin: per stage; ViT: [heads]
    mlp_ratio: float
    qkv_bias: bool = True
    ape: bool = False  # absolute position embedding
    window_size: int = 7  # Swin only
    patch_norm: bool = True  # Swin only
    qk_scale: float | None = None  # Swin only
    init_values: float | None = 0.1  # ViT layer scale
    use_rpb: bool = False  # ViT: one relative position bias table per block
    use_shared_rpb: bool = True  # ViT: one table shared by all blocks
    use_mean_pooling: bool = False  # ViT: fc_norm(mean of patch tokens) instead of the CLS token
    num_classes: int = 1000
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    mask_patch_size: int = 32
    mask_ratio: float = 0.6
    source: str = field(default="", compare=False)

    def describe(self) -> str:
        if self.family == "swin":
            body = (
                f"Swin: image {self.image_size}, patch {self.patch_size}, embed_dim {self.embed_dim}, "
                f"depths {self.depths}, heads {self.num_heads}, window {self.window_size}, mlp_ratio {self.mlp_ratio}"
            )
        else:
            pos = (
                "shared rel. pos. bias" if self.use_shared_rpb else "per-block rel. pos. bias" if self.use_rpb else ""
            )
            body = (
                f"ViT (BEiT-style): image {self.image_size}, patch {self.patch_size}, embed_dim {self.embed_dim}, "
                f"depth {self.depths[0]}, heads {self.num_heads[0]}, layer scale {self.init_values}, {pos}"
                f"{', mean pooling' if self.use_mean_pooling else ''}"
            )
        return body + f"{', absolute pos. embedding' if self.ape else ''}"


# ----------------------------------------------------------------------------------------------------------------
# Architecture: from a stored config, an official YAML, or the tensor shapes
# ----------------------------------------------------------------------------------------------------------------


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_official_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """An official recipe YAML (optionally with ``BASE: [other.yaml]``) merged over :data:`OFFICIAL_DEFAULTS`."""
    with open(path) as handle:
        cfg = yaml.safe_load(handle) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} is not an official SimMIM YAML config (expected a mapping at the top level).")
    merged = OFFICIAL_DEFAULTS
    for base in cfg.pop("BASE", None) or []:
        if base:  # the official loader resolves BASE files relative to the including file
            merged = _merge(merged, read_official_yaml(os.path.join(os.path.dirname(path), base)))
    return _merge(merged, cfg)


def architecture_from_config(cfg: Mapping[str, Any], source: str) -> OfficialArchitecture:
    """Read ``MODEL.*`` / ``DATA.*`` of an official config (a stored CfgNode as plain dicts, or a YAML)."""
    cfg = _merge(OFFICIAL_DEFAULTS, cfg)
    model, data = cfg["MODEL"], cfg["DATA"]
    family = str(model["TYPE"]).lower()
    common: dict[str, Any] = {
        "image_size": int(data["IMG_SIZE"]),
        "num_classes": int(model["NUM_CLASSES"]),
        "drop_rate": float(model["DROP_RATE"]),
        "drop_path_rate": float(model["DROP_PATH_RATE"]),
        "mask_patch_size": int(data["MASK_PATCH_SIZE"]),
        "mask_ratio": float(data["MASK_RATIO"]),
        "source": source,
    }
    if family == "swin":
        swin = model["SWIN"]
        return OfficialArchitecture(
            family="swin",
            patch_size=int(swin["PATCH_SIZE"]),
            in_chans=int(swin["IN_CHANS"]),
            embed_dim=int(swin["EMBED_DIM"]),
            depths=[int(d) for d in swin["DEPTHS"]],
            num_heads=[int(h) for h in swin["NUM_HEADS"]],
            window_size=int(swin["WINDOW_SIZE"]),
            mlp_ratio=float(swin["MLP_RATIO"]),
            qkv_bias=bool(swin["QKV_BIAS"]),
            qk_scale=swin["QK_SCALE"],
            ape=bool(swin["APE"]),
            patch_norm=bool(swin["PATCH_NORM"]),
            **common,
        )
    if family == "vit":
        vit = model["VIT"]
        return OfficialArchitecture(
            family="vit",
            patch_size=int(vit["PATCH_SIZE"]),
            in_chans=int(vit["IN_CHANS"]),
            embed_dim=int(vit["EMBED_DIM"]),
            depths=[int(vit["DEPTH"])],
            num_heads=[int(vit["NUM_HEADS"])],
            mlp_ratio=float(vit["MLP_RATIO"]),
            qkv_bias=bool(vit["QKV_BIAS"]),
            init_values=vit["INIT_VALUES"],
            ape=bool(vit["USE_APE"]),
            use_rpb=bool(vit["USE_RPB"]),
            use_shared_rpb=bool(vit["USE_SHARED_RPB"]),
            use_mean_pooling=bool(vit["USE_MEAN_POOLING"]),
            **common,
        )
    raise ValueError(
        f"Unsupported MODEL.TYPE {model['TYPE']!r} in {source}: the official SimMIM code (and this converter) "
        f"knows 'swin' and 'vit'."
    )


def detect_family(encoder_state_dict: Mapping[str, torch.Tensor]) -> str:
    """``"swin"`` or ``"vit"`` from the key layout of an official encoder / finetuned model."""
    keys = encoder_state_dict.keys()
    if any(re.match(r"layers\.\d+\.blocks\.\d+\.", k) for k in keys):
        return "swin"
    if any(re.match(r"blocks\.\d+\.attn\.", k) for k in keys):
        return "vit"
    sample = ", ".join(sorted(keys)[:6])
    raise ValueError(
        f"Cannot tell the backbone family from the checkpoint keys (expected official Swin keys "
        f"'layers.N.blocks.M.*' or ViT keys 'blocks.N.attn.*'; found e.g. {sample})."
    )


def _count_indexed(keys, pattern: str) -> int:
    ids = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(ids) + 1 if ids else 0


def _window_from_table(rows: int) -> int:
    side = math.isqrt(rows)
    if side * side != rows or side % 2 == 0:
        raise ValueError(f"A relative position bias table with {rows} rows is not (2w-1)^2 for any window w.")
    return (side + 1) // 2


def infer_architecture(
    encoder_state_dict: Mapping[str, torch.Tensor], head: Mapping[str, torch.Tensor] | None = None
) -> OfficialArchitecture:
    """Recover the architecture from tensor shapes (used when neither a stored config nor ``--config`` is there).

    Training-only values (drop path, mask settings) cannot be read from weights; the official defaults are used.
    """
    sd = encoder_state_dict
    family = detect_family(sd)
    proj = sd["patch_embed.proj.weight"]
    embed_dim, in_chans, patch_size = proj.shape[0], proj.shape[1], proj.shape[2]
    num_classes = head["head.weight"].shape[0] if head else 0
    source = "inferred from the tensor shapes"
    if family == "swin":
        num_stages = _count_indexed(sd, r"layers\.(\d+)\.")
        depths = [_count_indexed(sd, rf"layers\.{i}\.blocks\.(\d+)\.") for i in range(num_stages)]
        tables = [sd[f"layers.{i}.blocks.0.attn.relative_position_bias_table"] for i in range(num_stages)]
        num_heads = [t.shape[1] for t in tables]
        # Stages whose resolution is <= the window use a window clamped to their resolution (and a smaller table),
        # so the configured window is the largest one in use.
        windows = [_window_from_table(t.shape[0]) for t in tables]
        window = max(windows)
        resolution = None  # of stage 0, in patches
        for i in range(num_stages):
            for j in range(depths[i]):
                mask = sd.get(f"layers.{i}.blocks.{j}.attn_mask")
                if mask is not None:  # (num_windows, w*w, w*w) in shifted blocks
                    resolution = windows[i] * math.isqrt(mask.shape[0]) * 2**i
                    break
            if resolution is not None:
                break
        if resolution is None and "absolute_pos_embed" in sd:
            resolution = math.isqrt(sd["absolute_pos_embed"].shape[1])
        if resolution is None and windows[-1] < window:  # the last stage was clamped to its resolution
            resolution = windows[-1] * 2 ** (num_stages - 1)
        if resolution is None:
            raise ValueError(
                "Cannot infer the image size of this Swin checkpoint from its tensors (no attn_mask buffers, no "
                "absolute position embedding). Pass the official YAML it was trained with: --config <recipe.yaml>."
            )
        return OfficialArchitecture(
            family="swin",
            image_size=resolution * patch_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depths=depths,
            num_heads=num_heads,
            window_size=window,
            mlp_ratio=sd["layers.0.blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
            qkv_bias="layers.0.blocks.0.attn.qkv.bias" in sd,
            ape="absolute_pos_embed" in sd,
            patch_norm="patch_embed.norm.weight" in sd,
            num_classes=num_classes,
            source=source,
        )

    depth = _count_indexed(sd, r"blocks\.(\d+)\.")
    use_shared_rpb = "rel_pos_bias.relative_position_bias_table" in sd
    use_rpb = "blocks.0.attn.relative_position_bias_table" in sd
    table = sd.get("rel_pos_bias.relative_position_bias_table", sd.get("blocks.0.attn.relative_position_bias_table"))
    if table is None:
        raise ValueError(
            "Cannot infer the number of attention heads of this ViT checkpoint (it has no relative position bias "
            "table). Pass the official YAML it was trained with: --config <recipe.yaml>."
        )
    grid = _window_from_table(table.shape[0] - 3)  # (2G-1)^2 token pairs + 3 CLS entries
    return OfficialArchitecture(
        family="vit",
        image_size=grid * patch_size,
        patch_size=patch_size,
        in_chans=in_chans,
        embed_dim=embed_dim,
        depths=[depth],
        num_heads=[table.shape[1]],
        mlp_ratio=sd["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
        qkv_bias="blocks.0.attn.q_bias" in sd,
        init_values=0.1 if "blocks.0.gamma_1" in sd else None,
        ape="pos_embed" in sd,
        use_rpb=use_rpb,
        use_shared_rpb=use_shared_rpb,
        use_mean_pooling="fc_norm.weight" in sd,
        num_classes=num_classes,
        source=source,
    )


def backbone_config_from_architecture(arch: OfficialArchitecture, encoder_stride: int | None = None):
    """The transformers ``SwinConfig`` / ``BeitConfig`` that computes what the official model computes."""
    from transformers import BeitConfig, SwinConfig

    if arch.family == "swin":
        if not arch.patch_norm:
            raise ValueError("MODEL.SWIN.PATCH_NORM=False is not supported: transformers' Swin always has it.")
        if arch.qk_scale is not None:
            raise ValueError(
                f"MODEL.SWIN.QK_SCALE={arch.qk_scale} is not supported: transformers' Swin scales by head_dim**-0.5."
            )
        return SwinConfig(
            image_size=arch.image_size,
            patch_size=arch.patch_size,
            num_channels=arch.in_chans,
            embed_dim=arch.embed_dim,
            depths=list(arch.depths),
            num_heads=list(arch.num_heads),
            window_size=arch.window_size,
            mlp_ratio=arch.mlp_ratio,
            qkv_bias=arch.qkv_bias,
            hidden_dropout_prob=arch.drop_rate,
            attention_probs_dropout_prob=0.0,
            drop_path_rate=arch.drop_path_rate,
            hidden_act="gelu",
            use_absolute_embeddings=arch.ape,
            layer_norm_eps=1e-5,
            encoder_stride=encoder_stride or arch.patch_size * 2 ** (len(arch.depths) - 1),
        )
    mlp_hidden = int(arch.embed_dim * arch.mlp_ratio)
    return BeitConfig(
        image_size=arch.image_size,
        patch_size=arch.patch_size,
        num_channels=arch.in_chans,
        hidden_size=arch.embed_dim,
        num_hidden_layers=arch.depths[0],
        num_attention_heads=arch.num_heads[0],
        intermediate_size=mlp_hidden,
        hidden_act="gelu",
        hidden_dropout_prob=arch.drop_rate,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=arch.drop_path_rate,
        layer_norm_eps=1e-6,
        # lambda_1/2 exist iff the init value is > 0; their values come from the checkpoint.
        layer_scale_init_value=float(arch.init_values) if arch.init_values else 0.0,
        use_absolute_position_embeddings=arch.ape,
        use_relative_position_bias=arch.use_rpb,
        use_shared_relative_position_bias=arch.use_shared_rpb,
        use_mean_pooling=arch.use_mean_pooling,
        use_mask_token=False,
    )


# ----------------------------------------------------------------------------------------------------------------
# State-dict mapping: official names -> transformers names
# ----------------------------------------------------------------------------------------------------------------

QKV = "{qkv}"  # in a target name: the fused tensor is split into three, one per q/k/v projection

# (official name pattern relative to the encoder, transformers name relative to the backbone)
SWIN_RULES: list[tuple[str, str]] = [
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embeddings.projection.\1"),
    (r"patch_embed\.norm\.(weight|bias)", r"embeddings.norm.\1"),
    (r"mask_token", "embeddings.mask_token"),
    (r"absolute_pos_embed", "embeddings.position_embeddings"),
    (r"layers\.(\d+)\.blocks\.(\d+)\.norm1\.(weight|bias)", r"encoder.layers.\1.blocks.\2.layernorm_before.\3"),
    (r"layers\.(\d+)\.blocks\.(\d+)\.norm2\.(weight|bias)", r"encoder.layers.\1.blocks.\2.layernorm_after.\3"),
    (r"layers\.(\d+)\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"encoder.layers.\1.blocks.\2.attention.{qkv}.\3"),
    (r"layers\.(\d+)\.blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layers.\1.blocks.\2.attention.o_proj.\3"),
    (
        r"layers\.(\d+)\.blocks\.(\d+)\.attn\.relative_position_bias_table",
        r"encoder.layers.\1.blocks.\2.attention.relative_position_bias.relative_position_bias_table",
    ),
    (r"layers\.(\d+)\.blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"encoder.layers.\1.blocks.\2.mlp.\3.\4"),
    (r"layers\.(\d+)\.downsample\.(reduction|norm)\.(weight|bias)", r"encoder.layers.\1.downsample.\2.\3"),
    (r"norm\.(weight|bias)", r"layernorm.\1"),
]

VIT_RULES: list[tuple[str, str]] = [
    (r"cls_token", "embeddings.cls_token"),
    (r"mask_token", "embeddings.mask_token"),
    (r"pos_embed", "embeddings.position_embeddings"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embeddings.projection.\1"),
    (r"rel_pos_bias\.relative_position_bias_table", "shared_position_bias.relative_position_bias_table"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"layers.\1.layernorm_before.\2"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"layers.\1.layernorm_after.\2"),
    (r"blocks\.(\d+)\.gamma_1", r"layers.\1.lambda_1"),
    (r"blocks\.(\d+)\.gamma_2", r"layers.\1.lambda_2"),
    (r"blocks\.(\d+)\.attn\.qkv\.weight", r"layers.\1.attention.{qkv}.weight"),
    (r"blocks\.(\d+)\.attn\.q_bias", r"layers.\1.attention.q_proj.bias"),  # the official k bias is fixed at zero
    (r"blocks\.(\d+)\.attn\.v_bias", r"layers.\1.attention.v_proj.bias"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"layers.\1.attention.o_proj.\2"),
    (
        r"blocks\.(\d+)\.attn\.relative_position_bias_table",
        r"layers.\1.relative_position_bias.relative_position_bias_table",
    ),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"layers.\1.mlp.\2.\3"),
    (r"norm\.(weight|bias)", r"layernorm.\1"),
    (r"fc_norm\.(weight|bias)", r"pooler.layernorm.\1"),
]

RULES = {"swin": SWIN_RULES, "vit": VIT_RULES}

# Buffers the official models save but transformers recomputes from the geometry.
RECOMPUTED_BUFFERS = re.compile(r"(^|\.)(relative_position_index|attn_mask|relative_coords_table)$")


def convert_backbone_state_dict(
    encoder_state_dict: Mapping[str, torch.Tensor], family: str
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Official encoder tensors -> transformers backbone tensors (names relative to the backbone).

    Returns ``(converted, dropped)`` where ``dropped`` lists the recomputed buffers that were left out.
    Raises ``ValueError`` listing every official key no rule maps.
    """
    rules = [(re.compile(pattern + "$"), target) for pattern, target in RULES[family]]
    converted: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    unmapped: list[str] = []
    for key, tensor in encoder_state_dict.items():
        if RECOMPUTED_BUFFERS.search(key):
            dropped.append(key)
            continue
        for pattern, target in rules:
            if match := pattern.match(key):
                new_key = match.expand(target)
                if QKV in new_key:  # rows are [q; k; v], each (heads * head_dim) long, heads-major
                    for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0), strict=True):
                        converted[new_key.replace(QKV, name)] = part.clone()
                else:
                    converted[new_key] = tensor
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise ValueError(
            f"{len(unmapped)} tensor(s) of this official {family} checkpoint have no counterpart in transformers' "
            f"{'Swin' if family == 'swin' else 'BEiT'} model: {', '.join(sorted(unmapped))}. Is it an official "
            f"SimMIM checkpoint of that family?"
        )
    return converted, dropped


def split_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, dict, dict, dict]:
    """``(task, encoder, decoder, head)`` of an official state dict (``module.`` prefixes of DDP removed)."""
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if any(k.startswith("encoder.") for k in sd):
        encoder = {k.removeprefix("encoder."): v for k, v in sd.items() if k.startswith("encoder.")}
        decoder = {k.removeprefix("decoder."): v for k, v in sd.items() if k.startswith("decoder.")}
        other = sorted(k for k in sd if not k.startswith(("encoder.", "decoder.")))
        if other or set(decoder) != {"0.weight", "0.bias"}:
            raise ValueError(
                "Not an official SimMIM pretraining state dict: expected only 'encoder.*' and 'decoder.0.weight/bias'"
                f" keys; unexpected: {', '.join(other + sorted(f'decoder.{k}' for k in decoder)) or 'none'}"
                f"{'' if 'decoder.0.weight' in sd else '; missing decoder.0.weight'}."
            )
        return PRETRAINING, encoder, decoder, {}
    if "head.weight" in sd:
        head = {k: sd[k] for k in ("head.weight", "head.bias") if k in sd}
        encoder = {k: v for k, v in sd.items() if not k.startswith("head.")}
        return CLASSIFICATION, encoder, {}, head
    raise ValueError(
        "Neither an official SimMIM pretraining checkpoint (keys 'encoder.*', 'decoder.0.*') nor a finetuned "
        "classifier (keys 'head.weight', 'head.bias' next to the backbone)."
    )


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class OfficialCheckpoint:
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any] | None  # the stored yacs config as plain nested dicts
    extras: dict[str, Any]  # epoch, max_accuracy, ... (optimizer / scheduler states are dropped)


def load_official_checkpoint(path: str | os.PathLike) -> OfficialCheckpoint:
    """Read an official ``.pth`` without executing pickled code (see :mod:`modeling_simmim.safe_load`)."""
    obj = safe_load_checkpoint(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        state_dict = dict(obj["model"])
        config = to_plain_data(obj["config"]) if isinstance(obj.get("config"), Mapping) else None
        extras = {k: v for k, v in obj.items() if k in ("epoch", "max_accuracy")}
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state_dict, config, extras = dict(obj), None, {}  # a bare state dict
    else:
        raise ValueError(
            f"{os.fspath(path)} is a torch checkpoint but not an official SimMIM one: expected a dict with a "
            f"'model' state dict (or a bare state dict), got {type(obj).__name__}"
            f"{' with keys ' + ', '.join(map(str, list(obj)[:8])) if isinstance(obj, Mapping) else ''}."
        )
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{os.fspath(path)}: state dict entries that are not tensors: {', '.join(bad[:8])}.")
    return OfficialCheckpoint(state_dict, config, extras)


# ----------------------------------------------------------------------------------------------------------------
# Building the converted model
# ----------------------------------------------------------------------------------------------------------------


def _resolve_architecture(
    checkpoint: OfficialCheckpoint, encoder: Mapping[str, torch.Tensor], head: Mapping, config_path: str | None
) -> OfficialArchitecture:
    if config_path is not None:
        source = f"--config {config_path}"
        if checkpoint.config is not None:
            source += " (overrides the config stored in the checkpoint)"
        arch = architecture_from_config(read_official_yaml(config_path), source)
    elif checkpoint.config is not None:
        arch = architecture_from_config(checkpoint.config, "the config stored in the checkpoint")
    else:
        arch = infer_architecture(encoder, head)
    family = detect_family(encoder)
    if arch.family != family:
        raise ValueError(
            f"The architecture from {arch.source} says MODEL.TYPE={arch.family!r}, but the checkpoint's tensors "
            f"are an official {family!r} model. Pass the matching official YAML with --config."
        )
    if head:
        arch.num_classes = head["head.weight"].shape[0]
    return arch


def _check_against_model(converted: Mapping[str, torch.Tensor], model: torch.nn.Module, source: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    wrong = [
        f"{k}: checkpoint {tuple(converted[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(converted) & set(expected))
        if converted[k].shape != expected[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing in the checkpoint: {', '.join(missing)}")
        if unexpected:
            parts.append(f"not in the model: {', '.join(unexpected)}")
        if wrong:
            parts.append(f"shape mismatches: {'; '.join(wrong)}")
        raise ValueError(
            f"The converted tensors do not fit the model built from {source}: " + " | ".join(parts) + ". If the "
            "architecture came from a config, check it is the one this checkpoint was trained with (--config)."
        )


def _decoder_stride(decoder: Mapping[str, torch.Tensor], in_chans: int) -> int:
    out_channels = decoder["0.weight"].shape[0]
    stride = math.isqrt(out_channels // in_chans)
    if stride * stride * in_chans != out_channels:
        raise ValueError(f"decoder.0.weight has {out_channels} output channels, not stride**2 * {in_chans}.")
    return stride


def build_converted_model(
    checkpoint: OfficialCheckpoint, config_path: str | None = None
) -> tuple[SimMIMPreTrainedModel, str, OfficialArchitecture, dict[str, Any]]:
    """``(model, task, architecture, stats)``: the converted model with all official tensors loaded (eval mode)."""
    task, encoder, decoder, head = split_official_state_dict(checkpoint.state_dict)
    arch = _resolve_architecture(checkpoint, encoder, head, config_path)
    backbone_tensors, dropped = convert_backbone_state_dict(encoder, arch.family)
    if arch.family == "vit" and not arch.qkv_bias:
        # Official QKV_BIAS=False has no q/v bias; transformers' BEiT always has them: zeros are exactly equivalent.
        for i in range(arch.depths[0]):
            for name in ("q_proj", "v_proj"):
                backbone_tensors[f"layers.{i}.attention.{name}.bias"] = torch.zeros(arch.embed_dim)
    if task == PRETRAINING:
        model = _build_mim_model(arch, _decoder_stride(decoder, arch.in_chans))
        extra = {f"decoder.{k}": v for k, v in decoder.items()}
    else:
        model = _build_classification_model(arch)
        extra = {"classifier.weight": head["head.weight"]}
        if "head.bias" in head:
            extra["classifier.bias"] = head["head.bias"]
    # The backbone's attribute name ("swin", "beit") is the same in our models and in transformers' own classes.
    prefix = get_adapter(model.config).base_model_prefix
    converted = {f"{prefix}.{k}": v for k, v in backbone_tensors.items()} | extra
    _check_against_model(converted, model, arch.source)
    model.load_state_dict(converted, strict=True)
    model.eval()
    stats = {"official_tensors": len(checkpoint.state_dict), "converted_tensors": len(converted), "dropped": dropped}
    return model, task, arch, stats


def _build_mim_model(arch: OfficialArchitecture, encoder_stride: int) -> SimMIMPreTrainedModel:
    from .configuration_simmim import SimMIMConfig
    from .modeling_simmim import SimMIMForMaskedImageModeling

    config = SimMIMConfig(
        backbone_config=backbone_config_from_architecture(arch, encoder_stride),
        mask_patch_size=arch.mask_patch_size,
        mask_ratio=arch.mask_ratio,
        encoder_stride=encoder_stride,
    )
    return SimMIMForMaskedImageModeling(config)


def _imagenet_labels(num_classes: int) -> dict[int, str] | None:
    if num_classes != 1000:
        return None
    try:  # timm ships the ImageNet-1k class names; the official finetuned heads use that order
        from timm.data import ImageNetInfo
    except ImportError:
        return None
    info = ImageNetInfo()
    return {i: info.index_to_description(i) for i in range(num_classes)}


def _build_classification_model(arch: OfficialArchitecture) -> SimMIMPreTrainedModel:
    """``SimMIMForImageClassification``: its state dict and saved folder are those of transformers' Swin/BEiT
    classifier."""
    from .configuration_simmim import SimMIMConfig
    from .modeling_simmim import SimMIMForImageClassification

    labels: dict[str, Any] = {"num_labels": arch.num_classes}
    if names := _imagenet_labels(arch.num_classes):
        labels.update(id2label=names, label2id={name: i for i, name in names.items()})
    config = SimMIMConfig(
        backbone_config=backbone_config_from_architecture(arch),
        mask_patch_size=arch.mask_patch_size,
        mask_ratio=arch.mask_ratio,
        **labels,
    )
    return SimMIMForImageClassification(config)


# ----------------------------------------------------------------------------------------------------------------
# End to end + CLI
# ----------------------------------------------------------------------------------------------------------------


def _image_processor(arch: OfficialArchitecture, task: str):
    """The official evaluation preprocessing: RGB, resize the short side (bicubic), centre crop, ImageNet mean/std.

    Finetuned models resize to ``img * 256 / 224`` first, like the official finetuning's evaluation transform;
    pretrained ones resize straight to ``img`` (their training crops were random).
    """
    from .export import build_image_processor

    resize_size = None if task == CLASSIFICATION else arch.image_size
    return build_image_processor(arch.image_size, interpolation="bicubic", resize_size=resize_size)


def convert_official_checkpoint(
    checkpoint_path: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    config_path: str | None = None,
    push_to_hub: str | None = None,
    log: Callable[[str], None] = logger.info,
) -> SimMIMPreTrainedModel:
    """Load, convert, and (when ``output_dir`` / ``push_to_hub`` are given) save the model and its processor."""
    checkpoint = load_official_checkpoint(checkpoint_path)
    log(
        f"Loaded {os.fspath(checkpoint_path)} safely: {len(checkpoint.state_dict)} tensors"
        + "".join(f", {k} {v}" for k, v in checkpoint.extras.items())
    )
    model, task, arch, stats = build_converted_model(checkpoint, config_path)
    log(f"Architecture: {arch.source}")
    log(f"  {arch.describe()}")
    if task == PRETRAINING:
        log(f"  SimMIM pretraining: mask patch {arch.mask_patch_size}, mask ratio {arch.mask_ratio}")
    else:
        log(f"  finetuned classifier, {arch.num_classes} classes")
    # Every dropped key matched RECOMPUTED_BUFFERS (that is why it was dropped).
    dropped = sorted({match.group(2) for k in stats["dropped"] if (match := RECOMPUTED_BUFFERS.search(k))})
    log(
        f"Converted {stats['official_tensors']} official tensors into {stats['converted_tensors']} "
        "(fused qkv split into q/k/v projections; "
        f"{len(stats['dropped'])} recomputed buffers dropped: {', '.join(dropped) or 'none'})"
    )
    log(f"Model: {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")
    processor = _image_processor(arch, task)
    if output_dir is not None:
        model.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
        native = model.config.native_architecture(type(model).__name__)
        log(
            f"Saved to {os.fspath(output_dir)} ("
            + (
                f"a native transformers {native} folder"
                if native
                else f"{type(model).__name__}: transformers has no class for it, the folder ships the model code"
            )
            + ")"
        )
    if push_to_hub:
        # transformers declares it with functools.wraps(PushToHubMixin.push_to_hub): typeshed then expects `self`.
        model.push_to_hub(push_to_hub)  # type: ignore[arg-type]
        processor.push_to_hub(push_to_hub)
        log(f"Pushed to https://huggingface.co/{push_to_hub}")
    return model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_simmim.convert_official",
        description="Convert an official SimMIM checkpoint (pretraining or finetuned, Swin or ViT) into a "
        "Hugging Face folder. The .pth is read without executing pickled code.",
    )
    parser.add_argument("--checkpoint", required=True, help="official .pth file (e.g. from the SimMIM README)")
    parser.add_argument("--output_dir", help="folder to write the converted model and image processor to")
    parser.add_argument(
        "--config",
        help="official YAML recipe the checkpoint was trained with (default: the config stored in the checkpoint, "
        "else inferred from the tensor shapes)",
    )
    parser.add_argument("--push_to_hub", metavar="REPO", help="also upload to this Hub repository (user/name)")
    args = parser.parse_args(argv)
    if args.output_dir is None and args.push_to_hub is None:
        parser.error("give --output_dir and/or --push_to_hub")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    std_logging.basicConfig(level=std_logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        convert_official_checkpoint(args.checkpoint, args.output_dir, args.config, args.push_to_hub, log=print)
    except (ValueError, OSError, UnsafeCheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = [
    "OFFICIAL_DEFAULTS",
    "OfficialArchitecture",
    "OfficialCheckpoint",
    "architecture_from_config",
    "backbone_config_from_architecture",
    "build_converted_model",
    "convert_backbone_state_dict",
    "convert_official_checkpoint",
    "detect_family",
    "infer_architecture",
    "load_official_checkpoint",
    "read_official_yaml",
    "split_official_state_dict",
]
