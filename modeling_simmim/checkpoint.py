"""Moving pretrained weights into a model of another geometry.

SimMIM pretrains Swin at 192 px / window 6 and finetunes at 224 px / window 7 (Swin-L: window 12 -> 14), and its
BEiT-style ViT pretrains with ONE relative position bias table shared by all blocks but finetunes with one table per
block. transformers handles neither: `ignore_mismatched_sizes=True` re-initializes the tables and throws away what
pretraining learned. This module does the official transfer, written against transformers' current parameter names:

- `resize_relative_position_bias_table`: the official geometric-progression + bicubic-spline resize (the official code
  used `scipy.interpolate.interp2d`, removed in SciPy 1.14; `RectBivariateSpline(kx=3, ky=3, s=0)` is the same spline).
- `interpolate_position_embeddings`: bicubic resize of absolute position embeddings (plain ViT).
- `adapt_state_dict`: a source state dict -> one that loads into a target model (drops the MIM decoder and mask
  token, expands BEiT's shared table, resizes tables and position embeddings, re-initializes a mismatched head),
  with a `LoadingReport` that says what was loaded, resized, newly initialized and left unused.
- `load_state_dict_file` / `load_checkpoint_state_dict`: safetensors (or weights-only torch) reading with errors that
  say which file is broken.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.interpolate import RectBivariateSpline

logger = logging.getLogger(__name__)

# Buffers that older checkpoints (official code, transformers 4.x) saved but that current models recompute.
_RECOMPUTED_BUFFER_SUFFIXES = ("relative_position_index", "relative_coords_table", "attn_mask")
# Number of extra rows at the end of a BEiT relative position bias table: cls->token, token->cls, cls->cls.
BEIT_NUM_EXTRA_TOKENS = 3


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
    distances = [1.0]
    for k in range(1, n):
        distances.append(distances[-1] + q**k)
    distances = np.asarray(distances[:n], dtype=np.float64)
    return np.concatenate([-distances[::-1], [0.0], distances])


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
        raise ValueError(
            f"position embeddings with {patch.shape[1]} patch positions do not fit a {source_grid} grid"
        )
    channels = patch.shape[-1]
    patch = patch.reshape(1, source_grid[0], source_grid[1], channels).permute(0, 3, 1, 2).float()
    patch = torch.nn.functional.interpolate(patch, size=tuple(target_grid), mode="bicubic", align_corners=False)
    patch = patch.permute(0, 2, 3, 1).reshape(1, target_grid[0] * target_grid[1], channels)
    return torch.cat([prefix, patch.to(prefix.dtype)], dim=1)


# --------------------------------------------------------------------------------------------------------------------
# State dict transfer
# --------------------------------------------------------------------------------------------------------------------
BACKBONE_PREFIXES = ("swinv2", "swin", "beit", "vit")  # swinv2 before swin: prefixes are matched on "<name>."


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
    return sorted(members[0] if len(members) == 1 else f"{pattern} (x{len(members)})"
                  for pattern, members in groups.items())


@dataclass
class LoadingReport:
    """What happened to every weight when a checkpoint was loaded into a model of another geometry or task."""

    source: str = ""
    loaded: list[str] = field(default_factory=list)
    resized: dict[str, str] = field(default_factory=dict)  # name -> how (included in `loaded`)
    newly_initialized: list[str] = field(default_factory=list)
    unused: dict[str, str] = field(default_factory=dict)  # checkpoint name -> why it was not used

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "loaded": list(self.loaded),
            "resized": dict(self.resized),
            "newly_initialized": list(self.newly_initialized),
            "unused": dict(self.unused),
        }

    def __str__(self) -> str:
        lines = [f"Loaded {len(self.loaded)} weights from {self.source or 'the checkpoint'}"]
        if self.resized:
            lines.append(f"  resized ({len(self.resized)}):")
            by_how = Counter(self.resized.values())
            for how, _ in sorted(by_how.items()):
                names = [name for name, h in self.resized.items() if h == how]
                lines += [f"    {name}: {how}" for name in _compress_names(names)]
        if self.newly_initialized:
            lines.append(f"  newly initialized ({len(self.newly_initialized)}): train these")
            lines += [f"    {name}" for name in _compress_names(self.newly_initialized)]
        if self.unused:
            lines.append(f"  not used ({len(self.unused)}):")
            by_reason = Counter(self.unused.values())
            for reason, _ in sorted(by_reason.items()):
                names = [name for name, r in self.unused.items() if r == reason]
                lines += [f"    {name}: {reason}" for name in _compress_names(names)]
        return "\n".join(lines)


def _grid(config) -> tuple[int, int] | None:
    """Patch grid of a ViT/BEiT config (image_size // patch_size), None when the config has no such fields."""
    if config is None or not hasattr(config, "patch_size") or not hasattr(config, "image_size"):
        return None
    size = config.image_size if isinstance(config.image_size, (tuple, list)) else (config.image_size,) * 2
    patch = config.patch_size if isinstance(config.patch_size, (tuple, list)) else (config.patch_size,) * 2
    return (size[0] // patch[0], size[1] // patch[1])


def _square_grid(num_positions: int, what: str) -> tuple[int, int]:
    side = math.isqrt(num_positions)
    if side * side != num_positions:
        raise ValueError(f"cannot infer the patch grid of {what} ({num_positions} positions is not a square); "
                         "pass the source config")
    return (side, side)


def adapt_state_dict(
    state_dict: dict[str, torch.Tensor],
    target_model: torch.nn.Module,
    backbone_prefix: str,
    source_backbone_config=None,
    target_backbone_config=None,
    source: str = "",
) -> tuple[dict[str, torch.Tensor], LoadingReport]:
    """Turn `state_dict` (MIM, classification or native transformers checkpoint) into one that loads into `target_model`.

    `backbone_prefix` is the attribute name of the backbone in both models ("swin", "swinv2", "beit", "vit"). A
    checkpoint of another backbone family raises `ValueError`. Shape mismatches that no rule explains raise too,
    except for the classification head, which is re-initialized when the number of labels differs.
    """
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
    target = target_model.state_dict()
    report = LoadingReport(source=source)
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

    # BEiT-style ViT: pretraining shares one table, finetuning gives every block its own copy (official recipe)
    shared_key = f"{backbone_prefix}.shared_position_bias.relative_position_bias_table"
    if shared_key in weights and shared_key not in target:
        shared = weights.pop(shared_key)
        block_keys = [k for k in target if re.fullmatch(
            rf"{re.escape(backbone_prefix)}\.layers\.\d+\.relative_position_bias\.relative_position_bias_table", k)]
        if block_keys:
            for key in block_keys:
                if key not in weights:
                    weights[key] = shared.clone()
                    report.resized[key] = "copied from the shared table"
        else:
            report.unused[shared_key] = "the model has no relative position bias"

    for key in list(weights):
        if key not in target:
            continue
        source_shape, target_shape = tuple(weights[key].shape), tuple(target[key].shape)
        if source_shape == target_shape:
            continue
        if key.endswith("relative_position_bias_table"):
            extra = BEIT_NUM_EXTRA_TOKENS if backbone_prefix == "beit" else 0
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
            weights[key] = resize_relative_position_bias_table(weights[key], source_window, target_window, extra)
            how = f"{source_window[0]}x{source_window[1]} -> {target_window[0]}x{target_window[1]} (geometric bicubic)"
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

    for key in list(weights):
        if key not in target:
            report.unused[key] = "not in this model"
            del weights[key]
    report.loaded = sorted(weights)
    report.newly_initialized = sorted(k for k in target if k not in weights)
    return weights, report


# --------------------------------------------------------------------------------------------------------------------
# Reading checkpoints
# --------------------------------------------------------------------------------------------------------------------
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """Read one weights file: safetensors, or a torch pickle with `weights_only=True` (never arbitrary classes)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors/pickle errors have many types; all mean the same to the user
        raise OSError(
            f"cannot read the weights file {path} ({type(error).__name__}: {error}). The file is corrupt or "
            "truncated: download or save the checkpoint again."
        ) from error
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        raise ValueError(
            f"{path} looks like an official SimMIM .pth checkpoint; convert it first with "
            "`python -m modeling_simmim.convert_official --checkpoint ... --output_dir ...`."
        )
    if not isinstance(state, dict):
        raise OSError(f"{path} does not hold a state dict (found {type(state).__name__})")
    return state


def load_checkpoint_state_dict(folder: str) -> dict[str, torch.Tensor]:
    """All weights of a saved model folder (single file or sharded with an index)."""
    import json

    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if not name.endswith(".index.json"):
            return load_state_dict_file(path)
        try:
            with open(path) as handle:
                shards = sorted(set(json.load(handle)["weight_map"].values()))
        except (OSError, ValueError, KeyError) as error:
            raise OSError(f"cannot read the shard index {path}: {error}") from error
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_state_dict_file(os.path.join(folder, shard)))
        return state
    raise FileNotFoundError(f"no weights in {folder}: expected one of {', '.join(WEIGHT_FILES)}")
