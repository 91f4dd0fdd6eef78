"""What both training scripts share: recipe + flag parsing, backbone overrides, output-folder checks, logging.

A recipe is a flat YAML/JSON mapping of flag names (without `--`) to values; flags given after it override it:

    python run_mim.py configs/pretrain/swin_base_192_w6_100ep.yaml --train_dir /data/train --output_dir out
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch.distributed as dist
import transformers
import yaml
from transformers import HfArgumentParser, TrainingArguments

from .configuration_simmim import BEIT_SIMMIM_PRETRAIN, SUPPORTED_BACKBONES
from .trainer import SimMIMTrainingArguments
from .training_checkpoints import checkpoint_problems, find_resumable_checkpoint, holds_only_run_artifacts

logger = transformers.utils.logging.get_logger(__name__)

RECIPE_SUFFIXES = (".yaml", ".yml", ".json")
_Result = TypeVar("_Result")

# Family defaults for --model_type: the transformers config class defaults, except BEiT, which means the official
# BEiT-style ViT of SimMIM (shared relative position bias, layer scale 0.1, no absolute position embedding).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {"swin": {}, "swinv2": {}, "vit": {}, "beit": dict(BEIT_SIMMIM_PRETRAIN)}


def setup_logging(training_args: TrainingArguments, script_logger: str) -> None:
    """Timestamped logs on stdout: INFO on the main process (or `--log_level`), the replicas' level elsewhere, for
    the script's logger, this package's and transformers'."""
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    package_level = min(log_level, logging.INFO) if training_args.should_log else log_level
    for name in (script_logger, "modeling_simmim"):
        logging.getLogger(name).setLevel(package_level)
    transformers.utils.logging.set_verbosity(log_level)


def parse_backbone_overrides(raw: str | dict | None, **flags: Any) -> dict[str, Any]:
    """`--backbone_config_overrides` (a JSON object, or a mapping given by a recipe) plus the flags that are set."""
    if raw is None or raw == "":
        values: dict[str, Any] = {}
    elif isinstance(raw, dict):  # a recipe may give a mapping directly
        values = dict(raw)
    else:
        try:
            values = json.loads(raw)
        except json.JSONDecodeError as error:
            raise ValueError(f"--backbone_config_overrides is not valid JSON ({error}): {raw!r}") from None
        if not isinstance(values, dict):
            raise ValueError(f"--backbone_config_overrides must be a JSON object, got {raw!r}.")
    values.update({name: value for name, value in flags.items() if value is not None})
    return values


def load_recipe(path: str) -> dict[str, Any]:
    """A recipe file: a flat YAML/JSON mapping from flag names (without --) to values."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Recipe {path!r} not found.")
    with open(path, encoding="utf-8") as handle:
        recipe = json.load(handle) if path.endswith(".json") else yaml.safe_load(handle)
    if recipe is None:
        return {}
    if not isinstance(recipe, dict):
        raise ValueError(f"Recipe {path!r} must be a mapping of flag names to values.")
    return recipe


def _explicit_flags(parser: HfArgumentParser, argv: Sequence[str]) -> set[str]:
    """Destinations of the flags that appear in `argv` (to tell user-set values from defaults)."""
    dests = set()
    for token in argv:
        if not token.startswith("--"):
            continue
        action = parser._option_string_actions.get(token.split("=", 1)[0])
        if action is not None:
            dests.add(action.dest)
    return dests


def parse_recipe_and_flags(
    parser: HfArgumentParser, argv: Sequence[str] | None = None
) -> tuple[tuple, dict[str, Any]]:
    """Parse `[RECIPE] [--flags]`: recipe values become the parser's defaults, so flags override them and every value
    goes through the same type conversion and validation as a flag. Shared by both scripts.

    Returns (the parser's dataclasses, explicit) where `explicit` maps each value set by the recipe or a flag to its
    final value (for the model card; secrets and paths left out). `--learning_rate` is refused."""
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe: dict[str, Any] = {}
    if argv and not argv[0].startswith("-") and argv[0].lower().endswith(RECIPE_SUFFIXES):
        recipe = load_recipe(argv.pop(0))
    known = {action.dest for action in parser._actions}
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise ValueError(f"Unknown recipe keys {unknown}: recipe keys are flag names without '--' (see --help).")
    recipe = {key: _recipe_value(value) for key, value in recipe.items()}
    parser.set_defaults(**recipe)
    parsed = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    given = set(recipe) | _explicit_flags(parser, argv)
    if "learning_rate" in given:
        raise ValueError(
            "--learning_rate is not used: give --base_learning_rate (per 512 images, linearly scaled by the total "
            "batch size, as the official recipe), or add --scale_learning_rate false to use it as is."
        )
    values: dict[str, Any] = {}
    for args in parsed:
        values.update(args.to_dict() if hasattr(args, "to_dict") else vars(args))
    private = {"output_dir", "logging_dir", "hub_token", "token", "resume_from_checkpoint", "cache_dir"}
    explicit = {key: values.get(key) for key in sorted(given) if key in values and key not in private}
    return tuple(parsed), explicit


def _recipe_value(value: Any) -> Any:
    # argparse converts string defaults with the flag's type but leaves other defaults alone: hand numbers over as
    # strings too (YAML reads "1e-4" as a string but "0.1" as a float), and mappings as JSON.
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, bool) or value is None or isinstance(value, list):
        return value
    return str(value)


def check_override_keys(family: str, overrides: dict[str, Any]) -> None:
    # transformers configs accept unknown keys silently: a typo would be ignored for a whole run.
    if family in ("vit", "beit") and "window_size" in overrides:
        raise ValueError("--window_size applies to swin/swinv2 only.")
    config_class = SUPPORTED_BACKBONES[family]
    valid = set(config_class().to_dict())
    unknown = sorted(set(overrides) - valid)
    if unknown:
        hints = {key: difflib.get_close_matches(key, valid, n=2) for key in unknown}
        hints_text = "; ".join(f"{key}: did you mean {close}?" for key, close in hints.items() if close)
        raise ValueError(f"Unknown {config_class.__name__} keys {unknown} in the backbone overrides. {hints_text}")


def check_output_dir(training_args: SimMIMTrainingArguments) -> str | None:
    """The checkpoint to resume from: `--resume_from_checkpoint` (which must be complete), else the newest complete
    checkpoint of the output folder; newer incomplete ones are skipped with the reason logged, and a folder with only
    incomplete checkpoints (or an interrupted run's other files) starts from scratch with a warning. Raises if the
    output folder holds anything else and `--overwrite_output_dir` is not set."""
    require_optimizer = not training_args.save_only_model
    resume = training_args.resume_from_checkpoint
    if resume is not None:
        if not os.path.isdir(resume):
            raise FileNotFoundError(f"--resume_from_checkpoint {resume!r} is not a checkpoint folder.")
        problems = checkpoint_problems(resume, require_optimizer)
        if problems:
            raise ValueError(
                f"--resume_from_checkpoint {resume!r} is incomplete: {'; '.join(problems)}. Give a "
                "complete checkpoint, or leave the flag out to resume from the newest complete checkpoint "
                "of --output_dir."
            )
        return resume
    output_dir = training_args.output_dir
    if output_dir is None or not os.path.isdir(output_dir) or training_args.overwrite_output_dir:
        return None
    checkpoint, skipped = find_resumable_checkpoint(output_dir, require_optimizer)
    for incomplete in skipped:
        logger.warning("Skipping incomplete checkpoint %s: %s.", incomplete.path, incomplete.reason)
    if checkpoint is not None:
        logger.info(
            "Resuming from %s, the newest complete checkpoint (use --overwrite_output_dir to start over).", checkpoint
        )
        return checkpoint
    if skipped:
        logger.warning("No complete checkpoint in %s: training starts from scratch.", output_dir)
        return None
    if not os.listdir(output_dir):
        return None
    if not holds_only_run_artifacts(output_dir):
        raise ValueError(
            f"Output directory {output_dir!r} exists, is not empty and has no checkpoint: use another "
            "--output_dir, or --overwrite_output_dir."
        )
    logger.warning("%s holds an interrupted run's files but no checkpoint: training starts from scratch.", output_dir)
    return None


def releases_process_group(main: Callable[..., _Result]) -> Callable[..., _Result]:
    """Destroys the default process group when a script's `main` returns or raises, in every launched process.

    Left to interpreter shutdown, gloo's worker threads can outlive the objects they hold: a rank that finished
    cleanly then aborts with "terminate called without an active exception" (pytorch/pytorch#190489) and the
    launcher reports the whole job as failed. After a clean return the ranks meet at a barrier first; after an
    error they do not wait (the other ranks may never arrive). Nothing to do in a single process (no group).
    """

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> _Result:
        def distributed() -> bool:
            return dist.is_available() and dist.is_initialized()

        try:
            result = main(*args, **kwargs)
        except BaseException:
            if distributed():  # no barrier: the other ranks may never arrive
                dist.destroy_process_group()
            raise
        if distributed():
            dist.barrier()  # every rank has finished its collectives before any rank tears the group down
            dist.destroy_process_group()
        return result

    return wrapper
