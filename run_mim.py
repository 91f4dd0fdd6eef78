#!/usr/bin/env python
"""SimMIM pretraining with the official recipe on the Hugging Face stack.

    python run_mim.py [RECIPE.yaml|RECIPE.json] [--flag value ...]
    accelerate launch --config_file configs/accelerate/ddp.yaml run_mim.py configs/pretrain/swin_base_192_w6_100ep.yaml \
        --train_dir /data/imagenet/train --per_device_train_batch_size 128 --output_dir outputs/swin_base

The optional first argument is a recipe (YAML or JSON mapping of flag names to values); flags given after it
override the recipe. With no data argument, a bundled demo dataset (no network) is used. `--help` lists every flag.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
import yaml
from transformers import HfArgumentParser

from modeling_simmim import SimMIMConfig, SimMIMDataCollator, SimMIMForMaskedImageModeling, SimMIMMaskGenerator
from modeling_simmim.augmentation import check_flip_probability
from modeling_simmim.configuration_simmim import BEIT_SIMMIM_PRETRAIN, PRESETS, SUPPORTED_BACKBONES
from modeling_simmim.data import (
    BAD_IMAGE_POLICIES,
    DEMO_DATASETS,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IndexSeededMasks,
    KeyedMasks,
    PretrainCollator,
    RobustImageDataset,
    build_pretrain_transform,
    load_image_datasets,
)
from modeling_simmim.evaluation import KNNMonitorCallback, knn_datasets_from_folder
from modeling_simmim.randomness import seed_everything
from modeling_simmim.trainer import (
    RECONSTRUCTIONS_DIR,
    ReconstructionCallback,
    SimMIMTrainer,
    SimMIMTrainingArguments,
    check_training_data_size,
    train_and_evaluate,
)
from modeling_simmim.training_checkpoints import (
    checkpoint_problems,
    find_resumable_checkpoint,
    holds_only_run_artifacts,
)

logger = logging.getLogger("run_mim")

RECIPE_SUFFIXES = (".yaml", ".yml", ".json")

# Family defaults for --model_type: the transformers config class defaults, except BEiT, which means the official
# BEiT-style ViT of SimMIM (shared relative position bias, layer scale 0.1, no absolute position embedding).
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {"swin": {}, "swinv2": {}, "vit": {}, "beit": dict(BEIT_SIMMIM_PRETRAIN)}


@dataclass
class ModelArguments:
    """The encoder to pretrain: a saved SimMIM model to continue from, or a new one (family + overrides)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A saved SimMIM model, or any transformers Swin/SwinV2/ViT/BEiT folder or Hub id, to continue "
                          "pretraining (SimMIM fields from --mask_patch_size/--mask_ratio, else the folder's)."},
    )
    model_type: str | None = field(
        default=None,
        metadata={"help": "Backbone family of a new model.", "choices": sorted(SUPPORTED_BACKBONES)},
    )
    model_preset: str | None = field(
        default=None,
        metadata={"help": "Start a new model from a named preset (overrides still apply).", "choices": sorted(PRESETS)},
    )
    backbone_config_overrides: str | None = field(
        default=None,
        metadata={"help": "JSON object of backbone config values, lists allowed, e.g. "
                  '\'{"embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32]}\'.'},
    )
    image_size: int | None = field(default=None, metadata={"help": "Input resolution (pixels, square)."})
    patch_size: int | None = field(default=None, metadata={"help": "Model patch size (Swin 4, ViT 16)."})
    window_size: int | None = field(default=None, metadata={"help": "Swin/SwinV2 attention window."})
    mask_patch_size: int | None = field(default=None, metadata={"help": "Side of a masked block in pixels (32)."})
    mask_ratio: float | None = field(default=None, metadata={"help": "Fraction of blocks masked (0.6)."})
    norm_target_window: int | None = field(
        default=None,
        metadata={"help": "Regress pixels normalized by their local mean/std over this odd window (official SwinV2 "
                          "recipe: 47). Default: raw normalized pixels, as in the paper."},
    )
    decoder_kernel_size: int | None = field(
        default=None,
        metadata={"help": "Kernel of the one-layer decoder's convolution: 1 = official 1x1 (default), 3 = a 3x3 conv "
                          "with spatial context (fewer block-edge artifacts; a folder that needs our model code)."},
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Cache folder for Hub models and datasets."})
    model_revision: str = field(default="main", metadata={"help": "Hub revision of --model_name_or_path."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow Hub code of --model_name_or_path."})

    def overrides(self) -> dict[str, Any]:
        """Backbone overrides: --backbone_config_overrides plus the geometry flags."""
        return parse_backbone_overrides(self.backbone_config_overrides, image_size=self.image_size,
                                        patch_size=self.patch_size, window_size=self.window_size)


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


@dataclass
class DataArguments:
    """The images to pretrain on: one of a datasets id, image folders, or (default) the bundled demo data."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "datasets id or packaged builder (e.g. 'cifar10', 'imagefolder')."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Config name of --dataset_name."})
    train_dir: str | None = field(default=None, metadata={"help": "Folder of training images (any nesting)."})
    validation_dir: str | None = field(default=None, metadata={"help": "Folder of evaluation images (any nesting)."})
    image_column_name: str | None = field(
        default=None, metadata={"help": "Image column (default: the first Image-typed column, or 'image'/'img')."}
    )
    train_val_split: float | None = field(
        default=None, metadata={"help": "Fraction of train split off for evaluation when there is no validation split."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep a random subset of this size."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep a random subset of this size."})
    demo_dataset: str = field(
        default="digits", metadata={"help": "Bundled data used when no data argument is given.", "choices": DEMO_DATASETS}
    )
    verify_images: bool = field(
        default=True, metadata={"help": "Check every file of --train_dir/--validation_dir at start; drop unreadable."}
    )
    on_bad_image: str = field(
        default="skip",
        metadata={"help": "Unreadable image files: 'skip' (named in a warning, counted once) or 'error' (stop, naming "
                  "the file).", "choices": list(BAD_IMAGE_POLICIES)},
    )
    hflip_prob: float = field(
        default=0.5, metadata={"help": "Probability of the training augmentation's horizontal flip (official 0.5; 0 "
                               "for images whose mirror is another shape, e.g. digits or text)."}
    )
    eval_mask_seed: int = field(
        default=0, metadata={"help": "Seed of the fixed evaluation (and visualization) masks."}
    )
    knn_eval_dir: str | None = field(
        default=None,
        metadata={"help": "Labelled images (one sub-folder per class, or train/ and val/ with class sub-folders) for a "
                  "kNN monitor (k=20, cosine, weighted votes) of the pooled encoder features: logs knn_top1."},
    )
    knn_eval_steps: int = field(
        default=0, metadata={"help": "Log knn_top1 every N optimizer steps (and always at the last step)."}
    )


# --------------------------------------------------------------------------------------------------------------------
# Arguments: recipe + flags
def build_parser() -> HfArgumentParser:
    return HfArgumentParser((ModelArguments, DataArguments, SimMIMTrainingArguments))


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


def parse_recipe_and_flags(parser: HfArgumentParser, argv: Sequence[str] | None = None) -> tuple[tuple, dict[str, Any]]:
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


def parse_args(argv: Sequence[str] | None = None):
    """`[RECIPE] [--flags]` -> (model_args, data_args, training_args, explicit); see `parse_recipe_and_flags`."""
    (model_args, data_args, training_args), explicit = parse_recipe_and_flags(build_parser(), argv)
    return model_args, data_args, training_args, explicit


def _recipe_value(value: Any) -> Any:
    # argparse converts string defaults with the flag's type but leaves other defaults alone: hand numbers over as
    # strings too (YAML reads "1e-4" as a string but "0.1" as a float), and mappings as JSON.
    if isinstance(value, dict):
        return json.dumps(value)
    if isinstance(value, bool) or value is None or isinstance(value, list):
        return value
    return str(value)


# --------------------------------------------------------------------------------------------------------------------
# Building blocks
def build_config(model_args: ModelArguments) -> SimMIMConfig:
    """The SimMIMConfig of the run; raises ValueError with the offending numbers/keys on bad input."""
    overrides = model_args.overrides()
    masking = {k: v for k, v in (("mask_patch_size", model_args.mask_patch_size), ("mask_ratio", model_args.mask_ratio),
                                 ("norm_target_window", model_args.norm_target_window))
               if v is not None}
    if model_args.model_name_or_path is not None:
        if overrides:
            raise ValueError(
                f"{sorted(overrides)} cannot change a saved model's architecture ({model_args.model_name_or_path}); "
                "drop these flags (finetuning at another size resizes tables: see run_image_classification.py)."
            )
        config = SimMIMConfig.from_pretrained(
            model_args.model_name_or_path, cache_dir=model_args.cache_dir, revision=model_args.model_revision,
            token=model_args.token, trust_remote_code=model_args.trust_remote_code,
        )
        kernel = model_args.decoder_kernel_size
        if kernel is not None and kernel != config.decoder_kernel_size:
            raise ValueError(f"--decoder_kernel_size {kernel} cannot change the decoder of a saved model "
                             f"({model_args.model_name_or_path} has {config.decoder_kernel_size}): drop the flag.")
        for key, value in masking.items():
            setattr(config, key, value)
        config.validate_geometry()
        return config
    if model_args.decoder_kernel_size is not None:
        masking["decoder_kernel_size"] = model_args.decoder_kernel_size
    if model_args.model_preset is not None:
        family = PRESETS[model_args.model_preset][0]
        _check_override_keys(family, overrides)
        return SimMIMConfig.from_preset(model_args.model_preset, **masking, **overrides)
    if model_args.model_type is None:
        raise ValueError("Give --model_type (swin, swinv2, vit, beit), --model_preset, or --model_name_or_path "
                         "(or a recipe from configs/pretrain/ that sets one).")
    family = model_args.model_type
    _check_override_keys(family, overrides)
    from modeling_simmim.configuration_simmim import build_backbone_config

    backbone = build_backbone_config(family, **{**FAMILY_DEFAULTS[family], **overrides})
    return SimMIMConfig(backbone_config=backbone, **masking)


def _check_override_keys(family: str, overrides: dict[str, Any]) -> None:
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


def build_image_processor(config: SimMIMConfig, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """An image processor that reproduces the evaluation transform (shorter side to the crop size, center crop,
    normalize), saved as preprocessor_config.json so that `AutoImageProcessor.from_pretrained` works."""
    from PIL import Image
    from transformers import BitImageProcessor

    height, width = config.image_size
    return BitImageProcessor(
        do_resize=True, size={"shortest_edge": max(height, width)}, resample=Image.BILINEAR,
        do_center_crop=True, crop_size={"height": height, "width": width},
        do_normalize=True, image_mean=list(mean), image_std=list(std), do_convert_rgb=True,
    )


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
            raise ValueError(f"--resume_from_checkpoint {resume!r} is incomplete: {'; '.join(problems)}. Give a "
                             "complete checkpoint, or leave the flag out to resume from the newest complete checkpoint "
                             "of --output_dir.")
        return resume
    output_dir = training_args.output_dir
    if not os.path.isdir(output_dir) or training_args.overwrite_output_dir:
        return None
    checkpoint, skipped = find_resumable_checkpoint(output_dir, require_optimizer)
    for incomplete in skipped:
        logger.warning("Skipping incomplete checkpoint %s: %s.", incomplete.path, incomplete.reason)
    if checkpoint is not None:
        logger.info("Resuming from %s, the newest complete checkpoint (use --overwrite_output_dir to start over).",
                    checkpoint)
        return checkpoint
    if skipped:
        logger.warning("No complete checkpoint in %s: training starts from scratch.", output_dir)
        return None
    if not os.listdir(output_dir):
        return None
    if not holds_only_run_artifacts(output_dir):
        raise ValueError(f"Output directory {output_dir!r} exists, is not empty and has no checkpoint: use another "
                         "--output_dir, or --overwrite_output_dir.")
    logger.warning("%s holds an interrupted run's files but no checkpoint: training starts from scratch.", output_dir)
    return None


def visualization_batch(dataset: RobustImageDataset, count: int) -> dict[str, torch.Tensor] | None:
    """The first `count` readable examples (fixed transform and masks) as a batch."""
    examples = []
    for index in range(len(dataset)):
        example = dataset[index]
        if isinstance(example, dict):  # not an UnreadableImage
            examples.append(example)
        if len(examples) == count:
            break
    if not examples:
        return None
    return {key: torch.stack([example[key] for example in examples]) for key in ("pixel_values", "bool_masked_pos")}


# --------------------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    model_args, data_args, training_args, explicit = parse_args(argv)

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    log_level = training_args.get_process_log_level()
    if training_args.should_log:
        log_level = min(log_level, logging.INFO)
    for name in ("run_mim", "modeling_simmim"):
        logging.getLogger(name).setLevel(log_level)
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())

    # Fail early: everything that can be checked without training.
    check_flip_probability(data_args.hflip_prob)
    checkpoint = check_output_dir(training_args)
    config = build_config(model_args)
    image_size = config.image_size
    loaded = load_image_datasets(
        dataset_name=data_args.dataset_name, dataset_config_name=data_args.dataset_config_name,
        train_dir=data_args.train_dir, validation_dir=data_args.validation_dir,
        image_column_name=data_args.image_column_name, train_val_split=data_args.train_val_split,
        max_train_samples=data_args.max_train_samples, max_eval_samples=data_args.max_eval_samples,
        demo_dataset=data_args.demo_dataset, verify_images=data_args.verify_images,
        on_bad_image=data_args.on_bad_image, seed=training_args.seed, cache_dir=model_args.cache_dir,
    )
    if training_args.do_train and "train" not in loaded.datasets:
        raise ValueError(f"No training split in {loaded.source}; splits: {list(loaded.datasets)}.")
    if training_args.do_train:
        check_training_data_size(len(loaded.datasets["train"]), training_args)
    logger.info("Data: %s; image column %r; %s", loaded.source, loaded.image_column,
                {split: len(ds) for split, ds in loaded.datasets.items()})
    if loaded.num_skipped:
        logger.warning("%d unreadable image file(s) skipped at load time.", loaded.num_skipped)

    mask_generator = SimMIMMaskGenerator(image_size, config.mask_patch_size, config.model_patch_size, config.mask_ratio)
    eval_masks = IndexSeededMasks(mask_generator, seed=data_args.eval_mask_seed)
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    eval_transform = build_pretrain_transform(image_size, mean, std, train=False)
    train_dataset = eval_dataset = None
    if "train" in loaded.datasets:
        # masks keyed by (seed, epoch, index), like the crops and flips (see modeling_simmim.randomness)
        train_dataset = RobustImageDataset(loaded.datasets["train"], loaded.image_column,
                                           build_pretrain_transform(image_size, mean, std, train=True,
                                                                    hflip_prob=data_args.hflip_prob),
                                           on_bad_image=data_args.on_bad_image, keyed_fn=KeyedMasks(mask_generator))
    if training_args.do_eval and "validation" in loaded.datasets:
        eval_dataset = RobustImageDataset(loaded.datasets["validation"], loaded.image_column, eval_transform,
                                          extra_fn=eval_masks, on_bad_image=data_args.on_bad_image)
    # Reconstruction grids: evaluation images when there are some, else training images (fixed transform either way).
    preview_split = "validation" if "validation" in loaded.datasets else "train"
    preview = visualization_batch(
        RobustImageDataset(loaded.datasets[preview_split], loaded.image_column, eval_transform, extra_fn=eval_masks,
                           on_bad_image=data_args.on_bad_image),
        training_args.num_visualize_images,
    )
    knn_monitor = None
    if data_args.knn_eval_dir is not None:  # labelled images for the kNN monitor of the encoder's features
        knn_monitor = KNNMonitorCallback(
            *knn_datasets_from_folder(data_args.knn_eval_dir, eval_transform, verify=data_args.verify_images),
            every_n_steps=data_args.knn_eval_steps)

    # Seeded here, not only by the Trainer (which seeds after the model exists): the initial weights are a function
    # of --seed, the same in every process and every run.
    seed_everything(training_args.seed, training_args.full_determinism)
    if model_args.model_name_or_path is not None:
        model = SimMIMForMaskedImageModeling.from_pretrained(
            model_args.model_name_or_path, config=config, cache_dir=model_args.cache_dir,
            revision=model_args.model_revision, token=model_args.token, trust_remote_code=model_args.trust_remote_code,
        )
    else:
        model = SimMIMForMaskedImageModeling(config)
    logger.info("Model: %s backbone, %s px, %.2fM parameters, encoder stride %d, mask %d px x %.2f",
                config.backbone_type, image_size, sum(p.numel() for p in model.parameters()) / 1e6,
                config.encoder_stride, config.mask_patch_size, config.mask_ratio)

    callbacks = []
    if preview is not None:
        callbacks.append(ReconstructionCallback(preview["pixel_values"], preview["bool_masked_pos"],
                                                training_args.output_dir, training_args.visualize_steps, mean, std))
    if knn_monitor is not None:
        callbacks.append(knn_monitor)
    trainer = SimMIMTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset,
        data_collator=PretrainCollator(SimMIMDataCollator(mask_generator)),
        processing_class=build_image_processor(config, mean, std),
        callbacks=callbacks,
        model_card_info={
            "recipe": explicit,
            "data": f"{loaded.source}, {len(train_dataset) if train_dataset is not None else 0} training images",
            "base_model": model_args.model_name_or_path,
            "dataset_id": data_args.dataset_name,
        },
    )
    if knn_monitor is not None:
        knn_monitor.attach(trainer)

    # save_model: the model (safetensors + config with auto_map + code) and preprocessor_config.json
    results = train_and_evaluate(trainer, train_dataset, eval_dataset, training_args.do_train, checkpoint,
                                 loaded.num_skipped, save_model=True)

    if training_args.push_to_hub:
        trainer.push_to_hub(tags=["simmim", "masked-image-modeling"])  # writes the model card first
    elif trainer.is_world_process_zero():
        trainer.create_model_card()
    if trainer.is_world_process_zero():
        reconstruction = trainer.latest_reconstruction()
        print(f"\nModel saved to {os.path.abspath(training_args.output_dir)}")
        if reconstruction:
            print(f"Reconstructions in {os.path.abspath(os.path.join(training_args.output_dir, RECONSTRUCTIONS_DIR))}"
                  f" (latest: {os.path.basename(reconstruction)})")
    return results


if __name__ == "__main__":
    main()
