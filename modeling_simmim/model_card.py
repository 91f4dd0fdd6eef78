"""The Hub model cards (README.md: YAML metadata + Markdown) of the two artifacts the scripts produce: a SimMIM
pretraining folder and an exported classifier. Pure functions of what the trainer knows, testable offline; the
trainers' `create_model_card` writes them (also on `push_to_hub`)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

_BACKBONE_FIELDS = (
    "image_size",
    "patch_size",
    "window_size",
    "embed_dim",
    "depths",
    "num_heads",
    "hidden_size",
    "num_hidden_layers",
    "drop_path_rate",
)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, (list, dict, tuple)) else str(value)


def _front_matter(
    tags: Sequence[str], base_model: str | None, dataset_id: str | None, pipeline_tag: str | None = None
) -> list[str]:
    lines = ["---", "library_name: transformers"]
    if pipeline_tag:
        lines.append(f"pipeline_tag: {pipeline_tag}")
    lines += ["tags:", *(f"- {tag}" for tag in tags)]
    if dataset_id:
        lines += ["datasets:", f"- {dataset_id}"]
    # The Hub validates base_model as a repository id: a local folder is named in the Training section instead.
    if base_model and not os.path.isdir(str(base_model)):
        lines.append(f"base_model: {base_model}")
    return [*lines, "---", ""]


def _schedule_rows(schedule: Any) -> list[str]:
    """Table rows of a `SimMIMSchedule` (the resolved, batch-scaled learning rates)."""
    if schedule is None:
        return []
    milestones = f", milestones {list(schedule.milestones)} x{schedule.gamma}" if schedule.milestones else ""
    return [
        f"| total batch size | {schedule.total_batch_size} |",
        f"| peak / warmup / min lr | {schedule.learning_rate:.4g} / {schedule.warmup_learning_rate:.4g} / "
        f"{schedule.min_learning_rate:.4g} |",
        f"| schedule | {schedule.scheduler_type}, warmup {schedule.num_warmup_steps} of "
        f"{schedule.num_training_steps} steps{milestones} |",
    ]


def _recipe_block(recipe: dict[str, Any] | None) -> list[str]:
    if not recipe:
        return []
    lines = ["### Recipe (arguments that differ from the defaults)", "", "```yaml"]
    lines += [f"{key}: {_format_value(value)}" for key, value in sorted(recipe.items())]
    return [*lines, "```", ""]


def pretraining_card(
    model_name: str,
    config: Any = None,
    recipe: dict[str, Any] | None = None,
    data: str = "",
    global_step: int = 0,
    epoch: float | None = None,
    final_loss: float | None = None,
    eval_loss: float | None = None,
    schedule: Any = None,
    reconstruction: str | None = None,
    base_model: str | None = None,
    dataset_id: str | None = None,
    nonfinite_steps: int = 0,
) -> str:
    """Card of a SimMIM pretraining folder. `config` is the model's `SimMIMConfig`, `schedule` its `SimMIMSchedule`,
    `reconstruction` the latest grid's path relative to the folder."""
    lines = _front_matter(["simmim", "masked-image-modeling", "vision"], base_model, dataset_id)
    lines += [f"# {model_name}", ""]
    backbone = getattr(config, "backbone_config", None)
    description = "A SimMIM encoder (masked image modeling, Xie et al., CVPR 2022)"
    if backbone is not None:
        height, width = config.image_size
        description += (
            f" with a {backbone.model_type} backbone at {height}x{width} px, "
            f"mask patch {config.mask_patch_size}, mask ratio {config.mask_ratio}"
        )
    lines += [description + ", pretrained with simmim-hf's `run_mim.py`.", ""]
    # Native folders load with transformers alone; only the classes transformers lacks ship as remote code.
    remote = config is not None and config.native_architecture("SimMIMForMaskedImageModeling") is None
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import AutoImageProcessor, AutoModelForMaskedImageModeling",
        "",
        *(
            [
                "# transformers has no class for this variant: the repository carries its code (auto_map).",
                f'model = AutoModelForMaskedImageModeling.from_pretrained("{model_name}", trust_remote_code=True)',
            ]
            if remote
            else [f'model = AutoModelForMaskedImageModeling.from_pretrained("{model_name}")']
        ),
        f'processor = AutoImageProcessor.from_pretrained("{model_name}")',
        "```",
        "",
        "Finetune it for classification with simmim-hf's `run_image_classification.py --model_name_or_path`.",
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| initialized from | {base_model or 'scratch'} |",
        f"| data | {data or 'unknown'} |",
        f"| optimizer steps | {global_step} |",
    ]
    if epoch is not None:
        lines.append(f"| epochs | {epoch:.2f} |")
    if final_loss is not None:
        lines.append(f"| final training loss | {final_loss:.4f} |")
    if nonfinite_steps:
        lines.append(f"| skipped updates (non-finite loss or gradient norm) | {nonfinite_steps} |")
    if eval_loss is not None:
        lines.append(f"| final evaluation loss | {eval_loss:.4f} |")
    lines += [*_schedule_rows(schedule), "", *_recipe_block(recipe)]
    if reconstruction:
        lines += [
            "## Reconstructions",
            "",
            "Columns: input | masked input | reconstruction | reconstruction pasted into the visible pixels.",
            "",
            f"![reconstructions]({reconstruction})",
            "",
        ]
    return "\n".join(lines)


def classifier_card(
    model_name: str,
    config: Any,
    log_history: Sequence[dict[str, Any]],
    recipe: dict[str, Any] | None = None,
    data: str = "",
    base_model: str | None = None,
    dataset_id: str | None = None,
    schedule: Any = None,
    best_model_checkpoint: str | None = None,
    loading_report: str | None = None,
) -> str:
    """Card of an exported classifier. Its accuracy is the last evaluation in `log_history`: the final evaluation
    of the exported weights (the best checkpoint's when `best_model_checkpoint` is set, else the last step's)."""
    evals = [entry for entry in log_history if "eval_accuracy" in entry]
    final = evals[-1] if evals else None
    backbone = config.backbone_config
    lines = _front_matter(
        ["simmim", "image-classification", config.backbone_type], base_model, dataset_id, "image-classification"
    )
    lines += [
        f"# {model_name}",
        "",
        f"A {config.backbone_type} image classifier ({len(config.id2label)} classes, "
        f"{config.image_size[0]} px) finetuned with simmim-hf's `run_image_classification.py` (the SimMIM "
        "finetuning recipe; the values that differ from its defaults are listed under Training).",
        "",
        "This folder is a native transformers model: no extra package is needed.",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        f'classifier = pipeline("image-classification", model="{model_name}")',
        'print(classifier("image.jpg"))',
        "```",
        "",
        "## Results",
        "",
    ]
    if final is not None:
        chosen = (
            f"best by validation top-1 ({os.path.basename(best_model_checkpoint)}; selected on the images it is "
            "scored on, so optimistic)"
            if best_model_checkpoint
            else "the last step's"
        )
        lines += ["| metric | value |", "|---|---|", f"| top-1 accuracy | {100 * final['eval_accuracy']:.2f}% |"]
        if "eval_top5_accuracy" in final:
            lines.append(f"| top-5 accuracy | {100 * final['eval_top5_accuracy']:.2f}% |")
        lines.append(f"| weights | {chosen} |")
    else:
        lines.append("Not evaluated.")
    geometry = {key: getattr(backbone, key) for key in _BACKBONE_FIELDS if hasattr(backbone, key)}
    lines += [
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| initialized from | {base_model or 'scratch (no pretraining)'} |",
        f"| data | {data or 'unknown'} |",
        f"| backbone | `{json.dumps(geometry)}` |",
        *_schedule_rows(schedule),
        "",
        *_recipe_block(recipe),
    ]
    if loading_report:
        lines += ["Weights transfer:", "", "```", loading_report, "```", ""]
    return "\n".join(lines)


__all__ = ["classifier_card", "pretraining_card"]
