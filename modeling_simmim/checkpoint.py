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
    if n > 1 and q > 1.5 - 1e-5:
        # the official bracket [1.01, 1.5] covers growths like 6 -> 7 and 12 -> 14; beyond it the source grid cannot
        # reach the target offsets and the outer rows are extrapolated (the official code does the same, silently)
        logger.warning("relative position bias resize %d -> %d offsets is outside the official geometric range "
                       "(q=%.4f at the bracket end): outer offsets are extrapolated", source_length, target_length, q)
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
            pooled_norm = backbone_prefix == "beit" and key.startswith("beit.layernorm.")
            report.unused[key] = ("final norm: the classifier pools with mean + fc_norm instead (official)"
                                  if pooled_norm else "not in this model")
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


# --------------------------------------------------------------------------------------------------------------------
# Loading a classifier from any supported checkpoint
# --------------------------------------------------------------------------------------------------------------------
# from_pretrained keyword arguments that concern the download or transformers' Auto machinery, not the model
_HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "subfolder")
_IGNORED_KWARGS = ("trust_remote_code", "code_revision", "use_safetensors", "low_cpu_mem_usage", "weights_only")
# what the official finetuning changes in a BEiT-style encoder (configs/vit_base__800ep/simmim_finetune_*.yaml)
BEIT_SIMMIM_FINETUNE = {
    "use_relative_position_bias": True,
    "use_shared_relative_position_bias": False,
    "use_mean_pooling": True,
    "use_mask_token": False,
}
_CLASSIFICATION_CONFIG_FIELDS = ("id2label", "label2id", "num_labels", "problem_type", "architectures")


def check_weight_files(folder: str) -> list[str]:
    """The weight files of a model folder, each opened once (safetensors: header and size) so that a corrupt or
    truncated file fails here with a message naming it, not deep inside a loader."""
    import json

    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if name.endswith(".index.json"):
            try:
                with open(path) as handle:
                    files = [os.path.join(folder, f) for f in sorted(set(json.load(handle)["weight_map"].values()))]
            except (OSError, ValueError, KeyError) as error:
                raise OSError(f"cannot read the shard index {path}: {error}") from error
        else:
            files = [path]
        for file in files:
            if file.endswith(".safetensors"):
                from safetensors import safe_open

                try:
                    with safe_open(file, "pt") as handle:
                        handle.keys()
                except Exception as error:  # SafetensorError, OSError: both mean an unusable file
                    raise OSError(
                        f"cannot read the weights file {file} ({type(error).__name__}: {error}). The file is "
                        "corrupt or truncated: download or save the checkpoint again."
                    ) from error
            else:
                load_state_dict_file(file)
        return files
    raise FileNotFoundError(f"no weights in {folder}: expected one of {', '.join(WEIGHT_FILES)}")


def load_source_state_dict(folder: str, source_config, source_kind: str) -> dict[str, torch.Tensor]:
    """State dict of a saved model under the current transformers parameter names.

    transformers 5 saves Swin/ViT/BEiT weights under their legacy (4.x) names and translates them when its own
    `from_pretrained` loads them; so the checkpoint is loaded by the class that saved it (ours or transformers'),
    at its own geometry, and its state dict is read back. Keys carry the backbone prefix ("swin.", "beit.", ...).
    """
    import transformers
    from transformers import PreTrainedModel

    from .backbones import get_adapter

    check_weight_files(folder)
    architectures = list(getattr(source_config, "architectures", None) or [])
    if source_kind == "simmim":
        from .modeling_simmim import SimMIMForImageClassification, SimMIMForMaskedImageModeling

        is_classifier = any("ImageClassification" in name for name in architectures)
        source_class = SimMIMForImageClassification if is_classifier else SimMIMForMaskedImageModeling
        load = PreTrainedModel.from_pretrained.__func__  # the plain loader, not our transfer override
        model = load(source_class, folder, config=source_config)
        prefix = ""
    else:
        name = next((a for a in architectures if isinstance(getattr(transformers, a, None), type)), None)
        source_class = getattr(transformers, name) if name else get_adapter(source_config).model_class
        model = source_class.from_pretrained(folder)
        base = source_class.base_model_prefix
        prefix = "" if hasattr(model, base) and isinstance(getattr(model, base), torch.nn.Module) else base + "."
    return {prefix + key: value for key, value in model.state_dict().items()}


def resolve_model_folder(name_or_path: str, **hub_kwargs) -> str:
    """A local folder as is; a Hub id downloaded (config, weights, processor only) into the cache."""
    subfolder = hub_kwargs.pop("subfolder", None) or ""
    if os.path.isdir(name_or_path):
        return os.path.join(name_or_path, subfolder)
    if os.path.isfile(name_or_path):
        raise ValueError(
            f"{name_or_path} is a file; pass the folder that holds config.json and the weights (official .pth "
            "checkpoints: convert them with `python -m modeling_simmim.convert_official` first)."
        )
    from huggingface_hub import snapshot_download

    folder = snapshot_download(
        name_or_path,
        allow_patterns=["*.json", "*.safetensors", "*.bin"],
        cache_dir=hub_kwargs.get("cache_dir"),
        revision=hub_kwargs.get("revision"),
        token=hub_kwargs.get("token"),
        local_files_only=bool(hub_kwargs.get("local_files_only", False)),
        force_download=bool(hub_kwargs.get("force_download", False)),
    )
    return os.path.join(folder, subfolder)


def simmim_config_from_folder(folder: str):
    """(SimMIMConfig, source description) for a SimMIM folder or a native transformers Swin/SwinV2/ViT/BEiT one."""
    import copy
    import json

    from transformers import AutoConfig

    from .configuration_simmim import SUPPORTED_BACKBONES, SimMIMConfig

    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"no config.json in {folder}: is it a saved model folder?")
    try:
        with open(config_path) as handle:
            model_type = json.load(handle).get("model_type")
    except ValueError as error:
        raise OSError(f"{config_path} is not valid JSON ({error}): the checkpoint is corrupt") from error
    if model_type == "simmim":
        return SimMIMConfig.from_pretrained(folder), "simmim"
    if model_type not in SUPPORTED_BACKBONES:
        raise ValueError(
            f"{folder} holds a {model_type!r} model; SimMIM finetuning loads simmim checkpoints or transformers "
            f"{', '.join(sorted(SUPPORTED_BACKBONES))} checkpoints."
        )
    native = AutoConfig.from_pretrained(folder)
    backbone_config = copy.deepcopy(native)
    # SimMIMConfig validates the masking geometry; a classifier never masks, so pick a mask patch that fits
    # (the paper's 32 px when the image allows it)
    patch = backbone_config.patch_size if isinstance(backbone_config.patch_size, int) else backbone_config.patch_size[0]
    size = backbone_config.image_size if isinstance(backbone_config.image_size, int) else backbone_config.image_size[0]
    stride = patch * 2 ** (len(backbone_config.depths) - 1) if hasattr(backbone_config, "depths") else patch
    mask_patch_size = next((m for m in (32, stride, patch) if m % patch == 0 and size % m == 0), 32)
    config = SimMIMConfig(backbone_config=backbone_config, mask_patch_size=mask_patch_size,
                          id2label=dict(native.id2label))
    config.architectures = native.architectures
    config.label2id = dict(native.label2id) if native.label2id else {v: k for k, v in config.id2label.items()}
    return config, "transformers"


def _stage_resolutions(backbone_config) -> list[int]:
    size = backbone_config.image_size if isinstance(backbone_config.image_size, int) else min(backbone_config.image_size)
    first = size // (backbone_config.patch_size if isinstance(backbone_config.patch_size, int)
                     else backbone_config.patch_size[0])
    return [first // 2**i for i in range(len(backbone_config.depths))]


def load_pretrained_classifier(model_class, name_or_path: str, **kwargs):
    """Implementation of `SimMIMForImageClassification.from_pretrained` (see its docstring)."""
    import copy

    from .backbones import get_adapter

    config = kwargs.pop("config", None)
    num_labels = kwargs.pop("num_labels", None)
    id2label = kwargs.pop("id2label", None)
    label2id = kwargs.pop("label2id", None)
    overrides = dict(kwargs.pop("backbone_overrides", None) or {})
    for name in ("image_size", "window_size", "drop_path_rate"):
        if kwargs.get(name) is not None:
            overrides[name] = kwargs.pop(name)
        kwargs.pop(name, None)
    output_loading_info = kwargs.pop("output_loading_info", False)
    dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
    hub_kwargs = {name: kwargs.pop(name) for name in _HUB_KWARGS if name in kwargs}
    for name in _IGNORED_KWARGS:
        kwargs.pop(name, None)
    for name in [key for key in kwargs if key.startswith("_")]:  # transformers' Auto/pipeline internals
        kwargs.pop(name)
    if kwargs.pop("device_map", None) is not None:
        raise ValueError("device_map is not supported here: load on CPU, then call model.to(device)")

    folder = resolve_model_folder(name_or_path, **hub_kwargs)
    source_config, source_kind = simmim_config_from_folder(folder)
    source_architectures = list(getattr(source_config, "architectures", None) or [])
    from_mim = any("MaskedImageModeling" in name for name in source_architectures) or not any(
        "ImageClassification" in name for name in source_architectures
    )
    if config is None:
        config = copy.deepcopy(source_config)
    else:
        config = copy.deepcopy(config)
        if config.backbone_type != source_config.backbone_type:
            raise ValueError(
                f"{name_or_path} holds a {source_config.backbone_type} backbone but the given config is "
                f"{config.backbone_type}: use a {source_config.backbone_type} config (or drop `config`)."
            )
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
            overrides.setdefault("pretrained_window_sizes", [
                min(backbone_config.window_size, res) for res in _stage_resolutions(backbone_config)])
    if family == "vit" and overrides.get("drop_path_rate"):
        logger.warning("transformers' ViT has no stochastic depth: drop_path_rate=%s is ignored (BEiT-style ViT and "
                       "Swin support it)", overrides["drop_path_rate"])
    unknown = sorted(key for key in overrides if not hasattr(backbone_config, key) and key != "drop_path_rate")
    if unknown:
        raise ValueError(f"{type(backbone_config).__name__} has no fields {unknown} to override")
    if overrides:
        # rebuild rather than setattr: configs derive fields (Swin hidden_size, stage names) from others
        values = {**backbone_config.to_dict(), **overrides}
        values.pop("model_type", None)
        config.backbone_config = backbone_config = type(backbone_config)(**values)

    if id2label is not None:
        config.id2label = {int(k): str(v) for k, v in dict(id2label).items()}
        config.label2id = {v: k for k, v in config.id2label.items()}
    elif num_labels is not None:
        config.num_labels = int(num_labels)
    if label2id is not None:
        config.label2id = {str(k): int(v) for k, v in dict(label2id).items()}
    if not getattr(config, "label2id", None):
        config.label2id = {name: index for index, name in config.id2label.items()}
    if getattr(config, "problem_type", None) == "multi_label_classification":
        config.problem_type = None  # soft targets are trained with cross-entropy, never BCE
    for key, value in kwargs.items():
        setattr(config, key, value)
    config.architectures = [model_class.__name__]

    model = model_class(config)
    adapter = get_adapter(config)
    state_dict = load_source_state_dict(folder, source_config, source_kind)
    weights, report = adapt_state_dict(
        state_dict,
        model,
        adapter.base_model_prefix,
        source_backbone_config=source_config.backbone_config,
        target_backbone_config=config.backbone_config,
        source=str(name_or_path),
    )
    result = model.load_state_dict(weights, strict=False)
    if result.unexpected_keys:  # adapt_state_dict only keeps keys of the model: this would be a bug
        raise RuntimeError(f"unexpected keys after adaptation: {result.unexpected_keys}")
    if from_mim and source_kind == "simmim":
        report.source += " (SimMIM pretraining checkpoint)"
    logger.info("%s", report)
    model.loading_report = report
    if dtype is not None:
        model = model.to(dtype)
    model.eval()
    if output_loading_info:
        return model, {"missing_keys": report.newly_initialized, "unexpected_keys": list(report.unused),
                       "mismatched_keys": list(report.resized), "error_msgs": [], "report": report}
    return model


# --------------------------------------------------------------------------------------------------------------------
# Native export: a folder that plain transformers loads (pipeline("image-classification", model=folder))
# --------------------------------------------------------------------------------------------------------------------
NATIVE_CLASSIFIERS = {
    "swin": "SwinForImageClassification",
    "swinv2": "Swinv2ForImageClassification",
    "beit": "BeitForImageClassification",
    "vit": "ViTForImageClassification",
}


def build_image_processor(image_size: int, mean=None, std=None, interpolation: str = "bicubic"):
    """The evaluation preprocessing as a transformers image processor: shorter side resized to
    int(image_size * 256 / 224) (bicubic), centre crop to image_size, ImageNet mean/std (`BitImageProcessor`, which
    plain transformers loads by name)."""
    from transformers import BitImageProcessor
    from transformers.image_utils import PILImageResampling

    from .augmentation import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, eval_resize_size

    resample = {"bicubic": PILImageResampling.BICUBIC, "bilinear": PILImageResampling.BILINEAR}[interpolation]
    return BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": eval_resize_size(image_size)},
        resample=resample,
        do_center_crop=True,
        crop_size={"height": image_size, "width": image_size},
        do_rescale=True,
        do_normalize=True,
        image_mean=list(mean or IMAGENET_DEFAULT_MEAN),
        image_std=list(std or IMAGENET_DEFAULT_STD),
        do_convert_rgb=True,
    )


def to_native_model(model):
    """The transformers `XForImageClassification` equivalent of a `SimMIMForImageClassification` (same weights)."""
    import copy

    import transformers

    config = model.config
    family = config.backbone_type
    if family == "vit" and getattr(config, "classifier_pooling", "cls") != "cls":
        raise ValueError(
            "transformers' ViTForImageClassification pools the CLS token; a mean-pooled ViT has no native class. "
            "Train with classifier_pooling='cls', or use the BEiT-style ViT (beit family) for mean pooling."
        )
    if family == "swin":
        small = [res for res in _stage_resolutions(config.backbone_config) if res < config.backbone_config.window_size]
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
    native = native_class(native_config)
    missing, unexpected = native.load_state_dict(model.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weights do not map onto {native_class.__name__}: missing {missing}, unexpected {unexpected}")
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
