"""Optimizer parameter groups (official weight-decay exclusions, layer-wise LR decay), LR scaling and schedules.

Written by hand because the libraries get it wrong for this recipe: timm's `param_groups_layer_decay` only sets
`lr_scale`, which transformers' and torch's schedulers ignore (the decay silently does nothing under the Trainer);
here every group's own `lr` is `base_lr * lr_scale`, so any scheduler that multiplies each group's initial lr keeps
the decay. The schedule follows the official per-iteration timm (0.4.12) formulas.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import PreTrainedModel

from .backbones import get_adapter

LR_REFERENCE_BATCH_SIZE = 512


def _no_weight_decay(name: str, param: torch.Tensor, keywords: Sequence[str]) -> bool:
    # Official rule: 1-D tensors (norms, layer scale), biases, and the family's named exclusions are not decayed.
    return param.ndim <= 1 or name.endswith(".bias") or any(keyword in name for keyword in keywords)


def param_groups_layer_decay(
    model: PreTrainedModel,
    weight_decay: float = 0.05,
    layer_decay: float = 0.9,
    base_lr: float | None = None,
    stage: str | None = None,
    extra_no_weight_decay_keywords: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Parameter groups of a SimMIM model (or a transformers Swin/SwinV2/ViT/BEiT model) for AdamW.

    Each group has `params`, `weight_decay`, `lr_scale = layer_decay ** (L + 1 - layer_id)` with the official layer
    ids (embeddings 0, block i -> its depth, head and final norm L + 1), `layer_id`, and `lr = base_lr * lr_scale`
    when `base_lr` is given. With `layer_decay=1.0` there are just two groups (decayed and not decayed).

    Weight decay follows the official code of each family and `stage` ("pretraining" for a model with a SimMIM
    decoder, else "finetuning", unless given): 1-D tensors and biases are never decayed; position embeddings and the
    CLS token never; Swin's mask token is not decayed, ViT's is; relative position bias tables (and SwinV2's
    position-bias MLP and logit scale) are decayed in pretraining for every family and in ViT/BEiT finetuning, and
    excluded only in Swin/SwinV2 finetuning. `extra_no_weight_decay_keywords` excludes more parameters (substrings of
    their names), e.g. `("relative_position_bias_table",)` to exclude the tables everywhere.
    """
    adapter = get_adapter(model.config)
    if stage is None:
        stage = "pretraining" if hasattr(model, "decoder") else "finetuning"
    keywords = (*adapter.no_weight_decay_keywords(stage), *extra_no_weight_decay_keywords)
    backbone_config = getattr(model.config, "backbone_config", None) or model.config
    num_layers = adapter.num_layers(backbone_config)
    prefix = adapter.base_model_prefix + "."
    use_layer_decay = layer_decay != 1.0

    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        no_decay = _no_weight_decay(name, param, keywords)
        if name.startswith(prefix):
            layer_id = adapter.layer_id(name[len(prefix) :], backbone_config)
        else:
            layer_id = num_layers + 1  # decoder, classifier: the top
        if not use_layer_decay:
            layer_id = num_layers + 1
        key = (layer_id, no_decay)
        if key not in groups:
            scale = layer_decay ** (num_layers + 1 - layer_id)
            groups[key] = {
                "params": [],
                "param_names": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": scale,
                "layer_id": layer_id,
            }
            if base_lr is not None:
                groups[key]["lr"] = base_lr * scale
        groups[key]["params"].append(param)
        groups[key]["param_names"].append(name)
    return [groups[key] for key in sorted(groups)]


def create_optimizer(
    model: PreTrainedModel,
    learning_rate: float,
    weight_decay: float = 0.05,
    layer_decay: float = 1.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool | None = None,
    stage: str | None = None,
    extra_no_weight_decay_keywords: Sequence[str] = (),
) -> torch.optim.AdamW:
    """AdamW over `param_groups_layer_decay` (official betas, eps and weight decay). `fused=None` picks the fused
    kernel when every parameter is a floating tensor on CPU or CUDA (faster: one kernel instead of many)."""
    groups = param_groups_layer_decay(
        model,
        weight_decay=weight_decay,
        layer_decay=layer_decay,
        base_lr=learning_rate,
        stage=stage,
        extra_no_weight_decay_keywords=extra_no_weight_decay_keywords,
    )
    params = [param for group in groups for param in group["params"]]
    if fused is None:
        fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=eps, fused=fused)


def scale_learning_rate(lr_per_512: float, total_batch_size: int) -> float:
    """Official linear scaling: rates are given per 512 images; total batch = per-device x processes x accumulation."""
    return lr_per_512 * total_batch_size / LR_REFERENCE_BATCH_SIZE


def simmim_lr_at(
    step: int,
    base_lr: float,
    num_training_steps: int,
    num_warmup_steps: int,
    warmup_lr: float,
    min_lr: float,
    scheduler_type: str = "cosine",
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
) -> float:
    """Learning rate at iteration `step` of the official recipe.

    Warmup: linear from `warmup_lr` to `base_lr` over `num_warmup_steps`. Then `cosine`: the cosine runs over the
    whole training including warmup (timm's `warmup_prefix=False`), `min_lr + (base_lr - min_lr) * (1 + cos(pi * step
    / num_training_steps)) / 2`, and `min_lr` from `num_training_steps` on; `multistep`: `base_lr * gamma ** k` with k
    the number of `milestones` (in steps) that are <= step; `constant`: `base_lr`.
    """
    if step < num_warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / num_warmup_steps
    if scheduler_type == "cosine":
        if step >= num_training_steps:
            return min_lr
        return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * step / num_training_steps))
    if scheduler_type == "multistep":
        return base_lr * gamma ** bisect.bisect_right(sorted(milestones), step)
    if scheduler_type == "constant":
        return base_lr
    raise ValueError(f"Unknown scheduler_type {scheduler_type!r}: use 'cosine', 'multistep' or 'constant'.")


def get_simmim_scheduler(
    optimizer: torch.optim.Optimizer,
    base_lr: float,
    num_training_steps: int,
    num_warmup_steps: int,
    warmup_lr: float,
    min_lr: float,
    scheduler_type: str = "cosine",
    milestones: Sequence[int] = (),
    gamma: float = 0.1,
    last_epoch: int = -1,
) -> LambdaLR:
    """A per-iteration `LambdaLR` whose factor is `simmim_lr_at(step) / base_lr`: each group's lr is its own initial
    lr (base_lr x its layer-decay scale) times the schedule, so layer decay survives scheduling. For the top group this
    is exactly the official schedule; deeper groups scale warmup and minimum lrs by their decay too."""
    if base_lr <= 0:
        raise ValueError(f"base_lr must be positive, got {base_lr}.")
    simmim_lr_at(
        0, base_lr, num_training_steps, num_warmup_steps, warmup_lr, min_lr, scheduler_type, milestones, gamma
    )

    def factor(step: int) -> float:
        return (
            simmim_lr_at(
                step,
                base_lr,
                num_training_steps,
                num_warmup_steps,
                warmup_lr,
                min_lr,
                scheduler_type,
                milestones,
                gamma,
            )
            / base_lr
        )

    return LambdaLR(optimizer, factor, last_epoch=last_epoch)


__all__ = [
    "create_optimizer",
    "get_simmim_scheduler",
    "param_groups_layer_decay",
    "scale_learning_rate",
    "simmim_lr_at",
]
