"""Moving pretrained weights into a model of another geometry or task: pure functions, no I/O.

SimMIM pretrains Swin at 192 px / window 6 and finetunes at 224 px / window 7 (Swin-L: window 12 -> 14), and its
BEiT-style ViT pretrains with ONE relative position bias table shared by all blocks but finetunes with one table per
block. transformers handles neither: `ignore_mismatched_sizes=True` re-initializes the tables and throws away what
pretraining learned. This module does the official transfer, written against transformers' current parameter names:

- `resize_relative_position_bias_table`: the official geometric-progression + bicubic-spline resize (the official code
  used `scipy.interpolate.interp2d`, removed in SciPy 1.14; `RectBivariateSpline(kx=3, ky=3, s=0)` is the same spline).
- `interpolate_position_embeddings`: bicubic resize of absolute position embeddings (plain ViT).
- `finetuning_config`: the config of the classifier a checkpoint is moved into (overrides, labels, official rules).
- `adapt_state_dict`: a source state dict -> one that loads into the target shapes (drops the MIM decoder and mask
  token, expands BEiT's shared table, resizes tables and position embeddings, drops a head of another size), with a
  `LoadingReport`: the one table of what was loaded, resized, interpolated, copied, newly initialized and unused.
"""

from __future__ import annotations

import copy
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.interpolate import RectBivariateSpline
from transformers.utils import logging

from .configuration_simmim import BEIT_SIMMIM_FINETUNE, SimMIMConfig, patch_grid, stage_resolutions

logger = logging.get_logger(__name__)

# Buffers that older checkpoints (official code, transformers 4.x) saved but that current models recompute.
_RECOMPUTED_BUFFER_SUFFIXES = ("relative_position_index", "relative_coords_table", "attn_mask")
# Number of extra rows at the end of a BEiT relative position bias table: cls->token, token->cls, cls->cls.
BEIT_NUM_EXTRA_TOKENS = 3
BACKBONE_PREFIXES = ("swinv2", "swin", "beit", "vit")  # swinv2 before swin: prefixes are matched on "<name>."
COPIED_FROM_SHARED = "copied from the shared table"


# --------------------------------------------------------------------------------------------------------------------
# Relative position bias tables
# --------------------------------------------------------------------------------------------------------------------
def geometric_ratio(num_source_steps: int, target_extent: int, low: float = 1.01, high: float = 1.5) -> float:
    """Ratio q of the official geometric source grid, found by bisection (to 1e-6) in [low, high].

    q is chosen so that 1 + q + ... + q^(n-1) reaches the target extent m: the n source offsets then spread over
    the m target offsets with steps that grow geometrically (fine near the centre, coarse far away). Like the
    official code, the returned q is the last midpoint the bisection evaluated.
    """
    q = (low + high) / 2.0
    while high - low > 1e-6:
        q = (low + high) / 2.0
        series = (1.0 - q**num_source_steps) / (1.0 - q)
        if series > target_extent:
            high = q
        else:
            low = q
    return q


def geometric_source_coordinates(source_length: int, target_length: int) -> np.ndarray:
    """Coordinates of the 2n+1 source offsets (source_length = 2n+1) for a resize to target_length = 2m+1.

    Returns (-d_n, ..., -d_1, 0, d_1, ..., d_n) with d_1 = 1 and d_(k+1) = d_k + q^k.
    """
    n, m = source_length // 2, target_length // 2
    q = geometric_ratio(n, m)
    if n > 1 and q > 1.5 - 1e-5:
        # the official bracket [1.01, 1.5] covers growths like 6 -> 7 and 12 -> 14; beyond it the source grid cannot
        # reach the target offsets and the outer rows are extrapolated (the official code does the same, silently)
        logger.warning(
            "relative position bias resize %d -> %d offsets is outside the official geometric range "
            "(q=%.4f at the bracket end): outer offsets are extrapolated",
            source_length,
            target_length,
            q,
        )
    distances = [1.0]
    for k in range(1, n):
        distances.append(distances[-1] + q**k)
    offsets = np.asarray(distances[:n], dtype=np.float64)
    return np.concatenate([-offsets[::-1], [0.0], offsets])


def resize_relative_position_bias_table(
    table: torch.Tensor,
    source_window: tuple[int, int],
    target_window: tuple[int, int],
    num_extra_tokens: int = 0,
) -> torch.Tensor:
    """Resize a relative position bias table ((2h-1)*(2w-1) + extra, heads) from one window to another.

    Per head, the table is a (2h-1) x (2w-1) grid of relative offsets. The source offsets get the official geometric
    coordinates, a bicubic interpolating spline is fitted through them and evaluated at the integer target offsets
    -m..m. The `num_extra_tokens` last rows (BEiT's 3 CLS entries) are carried over unchanged.
    """
    source_h, source_w = (2 * source_window[0] - 1), (2 * source_window[1] - 1)
    target_h, target_w = (2 * target_window[0] - 1), (2 * target_window[1] - 1)
    expected_rows = source_h * source_w + num_extra_tokens
    if table.dim() != 2 or table.shape[0] != expected_rows:
        raise ValueError(
            f"relative position bias table of shape {tuple(table.shape)} does not fit window {source_window} "
            f"with {num_extra_tokens} extra tokens (expected {expected_rows} rows)."
        )
    if (source_h, source_w) == (target_h, target_w):
        return table.clone()
    extra = table[table.shape[0] - num_extra_tokens :] if num_extra_tokens else table[:0]
    grid = table[: source_h * source_w].detach().float().cpu().numpy().astype(np.float64)

    # rows of the flattened table follow the first (height) offset, as in the relative position index
    y = geometric_source_coordinates(source_h, target_h)
    x = geometric_source_coordinates(source_w, target_w)
    target_y = np.arange(-(target_h // 2), target_h // 2 + 1, dtype=np.float64)
    target_x = np.arange(-(target_w // 2), target_w // 2 + 1, dtype=np.float64)
    # a cubic spline needs 4 points per axis; a 1-wide window (3 offsets) falls back to the highest possible degree
    ky, kx = min(3, source_h - 1), min(3, source_w - 1)
    heads = []
    for head in range(grid.shape[1]):
        spline = RectBivariateSpline(y, x, grid[:, head].reshape(source_h, source_w), kx=kx, ky=ky, s=0)
        heads.append(spline(target_y, target_x).reshape(-1))
    resized = torch.from_numpy(np.stack(heads, axis=1)).to(dtype=table.dtype, device=table.device)
    return torch.cat([resized, extra.to(resized)], dim=0)


def window_from_table_rows(num_rows: int, num_extra_tokens: int = 0) -> tuple[int, int]:
    """Square window w with (2w-1)^2 + extra rows; raises if the table is not square."""
    side = math.isqrt(num_rows - num_extra_tokens)
    if side * side != num_rows - num_extra_tokens or side % 2 == 0:
        raise ValueError(f"a relative position bias table with {num_rows} rows is not a square (2w-1)^2 grid")
    return ((side + 1) // 2, (side + 1) // 2)


# --------------------------------------------------------------------------------------------------------------------
# Absolute position embeddings
# --------------------------------------------------------------------------------------------------------------------
def interpolate_position_embeddings(
    position_embeddings: torch.Tensor,
    source_grid: tuple[int, int],
    target_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Bicubic resize of (1, prefix + h*w, C) position embeddings to another patch grid; prefix tokens kept."""
    if tuple(source_grid) == tuple(target_grid):
        return position_embeddings.clone()
    prefix = position_embeddings[:, :num_prefix_tokens]
    patch = position_embeddings[:, num_prefix_tokens:]
    if patch.shape[1] != source_grid[0] * source_grid[1]:
        raise ValueError(f"position embeddings with {patch.shape[1]} patch positions do not fit a {source_grid} grid")
    channels = patch.shape[-1]
    patch = patch.reshape(1, source_grid[0], source_grid[1], channels).permute(0, 3, 1, 2).float()
    patch = torch.nn.functional.interpolate(patch, size=tuple(target_grid), mode="bicubic", align_corners=False)
    patch = patch.permute(0, 2, 3, 1).reshape(1, target_grid[0] * target_grid[1], channels)
    return torch.cat([prefix, patch.to(prefix.dtype)], dim=1)


# --------------------------------------------------------------------------------------------------------------------
# The target config
# --------------------------------------------------------------------------------------------------------------------
def finetuning_config(
    source_config: SimMIMConfig,
    from_mim: bool,
    config: SimMIMConfig | None = None,
    overrides: Mapping[str, Any] | None = None,
    num_labels: int | None = None,
    id2label: Mapping[int, str] | None = None,
    label2id: Mapping[str, int] | None = None,
    fields: Mapping[str, Any] | None = None,
    architecture: str = "SimMIMForImageClassification",
) -> SimMIMConfig:
    """The config of the classifier that a checkpoint with `source_config` is moved into.

    `config` (default: the checkpoint's) must be of the checkpoint's backbone family. `overrides` are backbone
    fields applied before loading (image_size, window_size, drop_path_rate, ...). From a pretraining checkpoint a
    BEiT-style encoder gets the official finetuning layout (one bias table per block, mean pooling + LayerNorm); SwinV2
    at another window gets `pretrained_window_sizes`. `fields` set SimMIM config fields (label_smoothing, ...).
    """
    if config is not None and config.backbone_type != source_config.backbone_type:
        raise ValueError(
            f"the checkpoint holds a {source_config.backbone_type} backbone but the given config is "
            f"{config.backbone_type}: use a {source_config.backbone_type} config (or drop `config`)."
        )
    config = copy.deepcopy(config if config is not None else source_config)
    overrides = _finetuning_overrides(config, from_mim, dict(overrides or {}))
    if overrides:
        config.set_backbone_fields(**overrides)
    _set_labels(config, num_labels, id2label, label2id)
    for key, value in (fields or {}).items():
        setattr(config, key, value)
    config.architectures = [architecture]
    return config


def _finetuning_overrides(config: SimMIMConfig, from_mim: bool, overrides: dict[str, Any]) -> dict[str, Any]:
    """The backbone fields to set: the asked ones, checked, plus the official finetuning layout of the family."""
    backbone_config = config.backbone_config
    family = config.backbone_type
    if family == "beit" and from_mim:
        for key, value in BEIT_SIMMIM_FINETUNE.items():
            overrides.setdefault(key, value)
    if "window_size" in overrides and family not in ("swin", "swinv2"):
        raise ValueError(f"window_size applies to Swin/SwinV2 only; this checkpoint is {family}.")
    if family == "swinv2" and overrides.get("window_size", backbone_config.window_size) != backbone_config.window_size:
        # SwinV2's continuous position bias is rescaled by the pretraining window (official SwinV2 finetuning)
        if not any(getattr(backbone_config, "pretrained_window_sizes", None) or [0]):
            overrides.setdefault(
                "pretrained_window_sizes",
                [min(backbone_config.window_size, res) for res in stage_resolutions(backbone_config)],
            )
    if family == "vit" and overrides.get("drop_path_rate"):
        logger.warning(
            "transformers' ViT has no stochastic depth: drop_path_rate=%s is ignored (BEiT-style ViT and "
            "Swin support it)",
            overrides["drop_path_rate"],
        )
    unknown = sorted(key for key in overrides if not hasattr(backbone_config, key) and key != "drop_path_rate")
    if unknown:
        raise ValueError(f"{type(backbone_config).__name__} has no fields {unknown} to override")
    return overrides


def _set_labels(
    config: SimMIMConfig,
    num_labels: int | None,
    id2label: Mapping[int, str] | None,
    label2id: Mapping[str, int] | None,
) -> None:
    if id2label is not None:
        config.id2label = {int(k): str(v) for k, v in dict(id2label).items()}
        config.label2id = {v: k for k, v in config.id2label.items()}
    elif num_labels is not None:
        config.num_labels = int(num_labels)
    if label2id is not None:
        config.label2id = {str(k): int(v) for k, v in dict(label2id).items()}
    if not getattr(config, "label2id", None):
        # transformers' config always holds an int-keyed id2label (its default: LABEL_0 ...)
        config.label2id = {str(name): int(index) for index, name in (config.id2label or {}).items()}
    if getattr(config, "problem_type", None) == "multi_label_classification":
        config.problem_type = None  # soft targets are trained with cross-entropy, never BCE


# --------------------------------------------------------------------------------------------------------------------
# State dict transfer and its report
# --------------------------------------------------------------------------------------------------------------------
def detect_backbone_prefix(keys) -> str | None:
    """The backbone family whose attribute name prefixes most keys ("swin", "swinv2", "beit", "vit"), or None."""
    counts = Counter(key.split(".", 1)[0] for key in keys)
    found = [(counts[name], name) for name in BACKBONE_PREFIXES if counts[name]]
    return max(found)[1] if found else None


def _compress_names(names) -> list[str]:
    """Group names that differ only in their numbers: 'swin.encoder.layers.*.blocks.*.mlp.fc1.weight (x24)'."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(re.sub(r"\.\d+(?=\.|$)", ".*", name), []).append(name)
    return sorted(
        members[0] if len(members) == 1 else f"{pattern} (x{len(members)})" for pattern, members in groups.items()
    )


def _table(rows: list[tuple[str, str, str]]) -> list[str]:
    headers = ("Key", "Status", "Details")
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(3)]
    line = " | ".join(f"{{:<{width}}}" for width in widths)
    return [
        line.format(*headers).rstrip(),
        "-+-".join("-" * width for width in widths),
        *(line.format(*row).rstrip() for row in rows),
    ]


@dataclass
class LoadingReport:
    """What happened to every weight when a checkpoint was loaded into a model of another geometry or task."""

    source: str = ""
    model: str = ""
    loaded: list[str] = field(default_factory=list)
    resized: dict[str, str] = field(default_factory=dict)  # name -> how (included in `loaded`)
    newly_initialized: list[str] = field(default_factory=list)
    unused: dict[str, str] = field(default_factory=dict)  # checkpoint name -> why it was not used

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "model": self.model,
            "loaded": list(self.loaded),
            "resized": dict(self.resized),
            "newly_initialized": list(self.newly_initialized),
            "unused": dict(self.unused),
        }

    @property
    def changes_anything(self) -> bool:
        """True when a weight was resized, newly initialized or left unused (worth a WARNING)."""
        return bool(self.resized or self.newly_initialized or self.unused)

    @staticmethod
    def _status(how: str) -> str:
        if how.startswith(COPIED_FROM_SHARED):
            return "COPIED" if "->" not in how else "COPIED+RESIZED"
        return "RESIZED" if "geometric" in how else "INTERPOLATED"

    def __str__(self) -> str:
        title = f"{self.model or 'Model'} LOAD REPORT from: {self.source or 'the checkpoint'}"
        summary = f"{len(self.loaded)} weights loaded"
        if self.resized:
            summary += f", {len(self.resized)} of them resized, interpolated or copied"
        rows: list[tuple[str, str, str]] = []
        for how in sorted(set(self.resized.values())):
            names = [name for name, h in self.resized.items() if h == how]
            rows += [(name, self._status(how), how) for name in _compress_names(names)]
        rows += [(name, "NEW", "newly initialized: train these") for name in _compress_names(self.newly_initialized)]
        for reason in sorted(set(self.unused.values())):
            names = [name for name, r in self.unused.items() if r == reason]
            rows += [(name, "UNUSED", reason) for name in _compress_names(names)]
        return "\n".join([title, summary, *(_table(rows) if rows else [])])


def _grid(config) -> tuple[int, int] | None:
    """Patch grid of a ViT/BEiT config (image_size // patch_size), None when the config has no such fields."""
    if config is None or not hasattr(config, "patch_size") or not hasattr(config, "image_size"):
        return None
    return patch_grid(config)


def _square_grid(num_positions: int, what: str) -> tuple[int, int]:
    side = math.isqrt(num_positions)
    if side * side != num_positions:
        raise ValueError(
            f"cannot infer the patch grid of {what} ({num_positions} positions is not a square); "
            "pass the source config"
        )
    return (side, side)


def _resize_table(key, value, target_shape, backbone_prefix, source_backbone_config, target_backbone_config):
    extra = BEIT_NUM_EXTRA_TOKENS if backbone_prefix == "beit" else 0
    source_shape = tuple(value.shape)
    if extra and _grid(source_backbone_config) is not None:
        source_window = _grid(source_backbone_config)
    else:
        source_window = window_from_table_rows(source_shape[0], extra)
    if extra and _grid(target_backbone_config) is not None:
        target_window = _grid(target_backbone_config)
    else:
        target_window = window_from_table_rows(target_shape[0], extra)
    if source_shape[1] != target_shape[1]:
        raise ValueError(f"{key}: checkpoint has {source_shape[1]} heads, the model {target_shape[1]}")
    resized = resize_relative_position_bias_table(value, source_window, target_window, extra)
    how = f"{source_window[0]}x{source_window[1]} -> {target_window[0]}x{target_window[1]} (geometric bicubic)"
    return resized, how


def adapt_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    target_shapes: Mapping[str, tuple[int, ...]],
    backbone_prefix: str,
    source_backbone_config=None,
    target_backbone_config=None,
    source: str = "",
) -> tuple[dict[str, torch.Tensor], LoadingReport]:
    """Turn `state_dict` (MIM, classification or native transformers checkpoint) into one that loads into a model
    whose state dict has `target_shapes` (name -> shape).

    `backbone_prefix` is the attribute name of the backbone in both models ("swin", "swinv2", "beit", "vit"). A
    checkpoint of another backbone family raises `ValueError` naming both. Shape mismatches that no rule explains raise
    too, except for the classification head, which is left out (newly initialized) when the number of labels differs.
    """
    _check_backbone_family(state_dict, backbone_prefix, source)
    target = {key: tuple(shape) for key, shape in target_shapes.items()}
    report = LoadingReport(source=source)
    weights = _drop_pretraining_only(state_dict, target, report)
    _unshare_position_bias(weights, target, backbone_prefix, report)
    for key in list(weights):
        if key in target and tuple(weights[key].shape) != target[key]:
            _reshape_mismatch(
                key,
                weights,
                target[key],
                backbone_prefix,
                source_backbone_config,
                target_backbone_config,
                report,
                source,
            )
    for key in list(weights):
        if key not in target:
            pooled_norm = backbone_prefix == "beit" and key.startswith("beit.layernorm.")
            report.unused[key] = (
                "final norm: the classifier pools with mean + fc_norm instead (official)"
                if pooled_norm
                else "not in this model"
            )
            del weights[key]
    report.loaded = sorted(weights)
    report.newly_initialized = sorted(k for k in target if k not in weights)
    return weights, report


def _check_backbone_family(state_dict: Mapping[str, torch.Tensor], backbone_prefix: str, source: str) -> None:
    source_prefix = detect_backbone_prefix(state_dict.keys())
    if source_prefix is None:
        raise ValueError(
            f"{source or 'the checkpoint'} holds no backbone weights (no key starts with one of "
            f"{', '.join(p + '.' for p in BACKBONE_PREFIXES)}); is it a SimMIM / transformers vision checkpoint?"
        )
    if source_prefix != backbone_prefix:
        raise ValueError(
            f"{source or 'the checkpoint'} holds a {source_prefix} backbone but the model is {backbone_prefix}: "
            f"load it with a {source_prefix} config (or pick a {backbone_prefix} checkpoint)."
        )


def _drop_pretraining_only(
    state_dict: Mapping[str, torch.Tensor], target: Mapping[str, tuple[int, ...]], report: LoadingReport
) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith("decoder."):
            report.unused[key] = "SimMIM decoder (pretraining only)"
        elif key.endswith("mask_token") and key not in target:
            report.unused[key] = "mask token (pretraining only)"
        elif key.endswith(_RECOMPUTED_BUFFER_SUFFIXES) and key not in target:
            report.unused[key] = "buffer recomputed from the config"
        else:
            weights[key] = value
    return weights


def _unshare_position_bias(
    weights: dict[str, torch.Tensor],
    target: Mapping[str, tuple[int, ...]],
    backbone_prefix: str,
    report: LoadingReport,
) -> None:
    # BEiT-style ViT: pretraining shares one table, finetuning gives every block its own copy (official recipe)
    shared_key = f"{backbone_prefix}.shared_position_bias.relative_position_bias_table"
    if shared_key not in weights or shared_key in target:
        return
    shared = weights.pop(shared_key)
    block_keys = [
        k
        for k in target
        if re.fullmatch(
            rf"{re.escape(backbone_prefix)}\.layers\.\d+\.relative_position_bias\.relative_position_bias_table", k
        )
    ]
    if not block_keys:
        report.unused[shared_key] = "the model has no relative position bias"
    for key in block_keys:
        if key not in weights:
            weights[key] = shared.clone()
            report.resized[key] = COPIED_FROM_SHARED


def _reshape_mismatch(
    key: str,
    weights: dict[str, torch.Tensor],
    target_shape: tuple[int, ...],
    backbone_prefix: str,
    source_backbone_config,
    target_backbone_config,
    report: LoadingReport,
    source: str,
) -> None:
    """Resize a tensor whose shape differs from the model's by the rule of its kind, or raise."""
    source_shape = tuple(weights[key].shape)
    if key.endswith("relative_position_bias_table"):
        weights[key], how = _resize_table(
            key, weights[key], target_shape, backbone_prefix, source_backbone_config, target_backbone_config
        )
        previous = report.resized.get(key)
        report.resized[key] = f"{previous}, {how}" if previous else how
    elif key.endswith("embeddings.position_embeddings"):
        prefix_tokens = 1
        source_grid = _grid(source_backbone_config) or _square_grid(source_shape[1] - prefix_tokens, key)
        target_grid = _grid(target_backbone_config) or _square_grid(target_shape[1] - prefix_tokens, key)
        weights[key] = interpolate_position_embeddings(weights[key], source_grid, target_grid, prefix_tokens)
        report.resized[key] = f"{source_grid[0]}x{source_grid[1]} -> {target_grid[0]}x{target_grid[1]} (bicubic)"
    elif key.startswith("classifier."):
        report.unused[key] = f"classification head of another size {source_shape} (model: {target_shape})"
        del weights[key]
    else:
        raise ValueError(
            f"{key}: shape {source_shape} in {source or 'the checkpoint'} but {target_shape} in the model. "
            "Only image size, window size, drop path rate and the number of labels may differ from the "
            "checkpoint's architecture."
        )


__all__ = [
    "LoadingReport",
    "adapt_state_dict",
    "detect_backbone_prefix",
    "finetuning_config",
    "geometric_ratio",
    "geometric_source_coordinates",
    "interpolate_position_embeddings",
    "resize_relative_position_bias_table",
    "window_from_table_rows",
]
