#!/usr/bin/env python
"""SimMIM pretraining with the official recipe on the Hugging Face stack.

    python run_mim.py [RECIPE.yaml|RECIPE.json] [--flag value ...]
    accelerate launch --config_file configs/accelerate/ddp.yaml run_mim.py configs/pretrain/swin_base_192_w6_100ep.yaml \
        --train_dir /data/imagenet/train --per_device_train_batch_size 128 --output_dir outputs/swin_base

The optional first argument is a recipe (YAML or JSON mapping of flag names to values); flags given after it
override the recipe. With no data argument, a bundled demo dataset (no network) is used. `--help` lists every flag.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import HfArgumentParser

from modeling_simmim import SimMIMConfig, SimMIMDataCollator, SimMIMForMaskedImageModeling, SimMIMMaskGenerator
from modeling_simmim.augmentation import check_flip_probability
from modeling_simmim.cli import (
    FAMILY_DEFAULTS,
    check_output_dir,
    check_override_keys,
    parse_backbone_overrides,
    parse_recipe_and_flags,
    releases_process_group,
    setup_logging,
)
from modeling_simmim.configuration_simmim import PRESETS, SUPPORTED_BACKBONES
from modeling_simmim.data import (
    BAD_IMAGE_POLICIES,
    DEMO_DATASETS,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IndexSeededMasks,
    KeyedMasks,
    PretrainCollator,
    RobustImageDataset,
    StreamingImageDataset,
    build_pretrain_transform,
    load_image_datasets,
)
from modeling_simmim.evaluation import KNNMonitorCallback, knn_datasets_from_folder
from modeling_simmim.export import build_image_processor
from modeling_simmim.randomness import seed_everything
from modeling_simmim.trainer import (
    RECONSTRUCTIONS_DIR,
    ReconstructionCallback,
    SimMIMTrainer,
    SimMIMTrainingArguments,
    check_training_data_size,
    train_and_evaluate,
)

logger = logging.getLogger("run_mim")


@dataclass
class ModelArguments:
    """The encoder to pretrain: a saved SimMIM model to continue from, or a new one (family + overrides)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A saved SimMIM model, or any transformers Swin/SwinV2/ViT/BEiT folder or Hub id, to continue "
            "pretraining (SimMIM fields from --mask_patch_size/--mask_ratio, else the folder's)."
        },
    )
    model_type: str | None = field(
        default=None,
        metadata={"help": "Backbone family of a new model.", "choices": sorted(SUPPORTED_BACKBONES)},
    )
    model_preset: str | None = field(
        default=None,
        metadata={
            "help": "Start a new model from a named preset (overrides still apply).",
            "choices": sorted(PRESETS),
        },
    )
    backbone_config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "JSON object of backbone config values, lists allowed, e.g. "
            '\'{"embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32]}\'.'
        },
    )
    image_size: int | None = field(default=None, metadata={"help": "Input resolution (pixels, square)."})
    patch_size: int | None = field(default=None, metadata={"help": "Model patch size (Swin 4, ViT 16)."})
    window_size: int | None = field(default=None, metadata={"help": "Swin/SwinV2 attention window."})
    mask_patch_size: int | None = field(default=None, metadata={"help": "Side of a masked block in pixels (32)."})
    mask_ratio: float | None = field(default=None, metadata={"help": "Fraction of blocks masked (0.6)."})
    norm_target_window: int | None = field(
        default=None,
        metadata={
            "help": "Regress pixels normalized by their local mean/std over this odd window (official SwinV2 "
            "recipe: 47). Default: raw normalized pixels, as in the paper."
        },
    )
    decoder_kernel_size: int | None = field(
        default=None,
        metadata={
            "help": "Kernel of the one-layer decoder's convolution: 1 = official 1x1 (default), 3 = a 3x3 conv "
            "with spatial context (fewer block-edge artifacts; a folder that needs our model code)."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Cache folder for Hub models and datasets."})
    model_revision: str = field(default="main", metadata={"help": "Hub revision of --model_name_or_path."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow Hub code of --model_name_or_path."})

    def overrides(self) -> dict[str, Any]:
        """Backbone overrides: --backbone_config_overrides plus the geometry flags."""
        return parse_backbone_overrides(
            self.backbone_config_overrides,
            image_size=self.image_size,
            patch_size=self.patch_size,
            window_size=self.window_size,
        )


@dataclass
class DataArguments:
    """The images to pretrain on: one of a datasets id, image folders, or (default) the bundled demo data."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "datasets id or packaged builder (e.g. 'cifar10', 'imagefolder')."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Config name of --dataset_name."})
    data_files: list[str] | None = field(
        default=None,
        metadata={
            "help": "Training files of --dataset_name (globs allowed), e.g. --dataset_name webdataset "
            "--data_files 'shards/train-*.tar' for WebDataset-style tar shards."
        },
    )
    streaming: bool = field(
        default=False,
        metadata={
            "help": "Read --dataset_name as a stream (data larger than the disk): split across processes and "
            "DataLoader workers by shard; needs --max_steps and --warmup_steps (a stream has no epoch length)."
        },
    )
    shuffle_buffer_size: int = field(
        default=10000,
        metadata={
            "help": "With --streaming: shuffle the shard order and a buffer of this many examples (0 = the "
            "stream's order)."
        },
    )
    train_dir: str | None = field(default=None, metadata={"help": "Folder of training images (any nesting)."})
    validation_dir: str | None = field(default=None, metadata={"help": "Folder of evaluation images (any nesting)."})
    image_column_name: str | None = field(
        default=None, metadata={"help": "Image column (default: the first Image-typed column, or 'image'/'img')."}
    )
    train_val_split: float | None = field(
        default=None,
        metadata={"help": "Fraction of train split off for evaluation when there is no validation split."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep a random subset of this size."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep a random subset of this size."})
    demo_dataset: str = field(
        default="digits",
        metadata={"help": "Bundled data used when no data argument is given.", "choices": DEMO_DATASETS},
    )
    verify_images: bool = field(
        default=True, metadata={"help": "Check every file of --train_dir/--validation_dir at start; drop unreadable."}
    )
    on_bad_image: str = field(
        default="skip",
        metadata={
            "help": "Unreadable image files: 'skip' (named in a warning, counted once) or 'error' (stop, naming "
            "the file).",
            "choices": list(BAD_IMAGE_POLICIES),
        },
    )
    hflip_prob: float = field(
        default=0.5,
        metadata={
            "help": "Probability of the training augmentation's horizontal flip (official 0.5; 0 "
            "for images whose mirror is another shape, e.g. digits or text)."
        },
    )
    eval_mask_seed: int = field(
        default=0, metadata={"help": "Seed of the fixed evaluation (and visualization) masks."}
    )
    knn_eval_dir: str | None = field(
        default=None,
        metadata={
            "help": "Labelled images (one sub-folder per class, or train/ and val/ with class sub-folders) for a "
            "kNN monitor (k=20, cosine, weighted votes) of the pooled encoder features: logs knn_top1."
        },
    )
    knn_eval_steps: int = field(
        default=0, metadata={"help": "Log knn_top1 every N optimizer steps (and always at the last step)."}
    )


# --------------------------------------------------------------------------------------------------------------------
# Arguments: recipe + flags
def build_parser() -> HfArgumentParser:
    return HfArgumentParser((ModelArguments, DataArguments, SimMIMTrainingArguments))


def parse_args(argv: Sequence[str] | None = None):
    """`[RECIPE] [--flags]` -> (model_args, data_args, training_args, explicit); see `parse_recipe_and_flags`."""
    (model_args, data_args, training_args), explicit = parse_recipe_and_flags(build_parser(), argv)
    return model_args, data_args, training_args, explicit


def check_streaming_arguments(data_args: DataArguments, training_args: SimMIMTrainingArguments) -> None:
    """What a stream (no length, no index) cannot do, refused before anything is loaded."""
    if not data_args.streaming:
        return
    if data_args.dataset_name is None:
        raise ValueError(
            "--streaming reads --dataset_name (a Hub id, or e.g. 'webdataset' with --data_files): give "
            "one, or drop --streaming for --train_dir."
        )
    if not training_args.do_train:
        return
    if training_args.max_steps <= 0:
        raise ValueError(
            "--streaming needs --max_steps: a stream has no length, so --num_train_epochs cannot be "
            "turned into optimizer steps."
        )
    if training_args.warmup_steps <= 0 and training_args.warmup_epochs > 0:
        raise ValueError(
            "--streaming needs the warmup in steps: give --warmup_steps (steps, or a fraction of "
            "--max_steps below 1) or --warmup_epochs 0."
        )
    if training_args.lr_milestones:
        raise ValueError(
            "--lr_milestones are epochs, which a stream does not have: use the cosine schedule with --streaming."
        )
    for flag, strategy in (
        ("--save_strategy", training_args.save_strategy),
        ("--eval_strategy", training_args.eval_strategy),
    ):
        if str(getattr(strategy, "value", strategy)) == "epoch":
            raise ValueError(
                f"{flag} epoch: processes reach the end of their part of a stream at different steps; "
                "use steps with --streaming."
            )


# --------------------------------------------------------------------------------------------------------------------
# Building blocks
def build_config(model_args: ModelArguments) -> SimMIMConfig:
    """The SimMIMConfig of the run; raises ValueError with the offending numbers/keys on bad input."""
    overrides = model_args.overrides()
    masking = {
        k: v
        for k, v in (
            ("mask_patch_size", model_args.mask_patch_size),
            ("mask_ratio", model_args.mask_ratio),
            ("norm_target_window", model_args.norm_target_window),
        )
        if v is not None
    }
    if model_args.model_name_or_path is not None:
        if overrides:
            raise ValueError(
                f"{sorted(overrides)} cannot change a saved model's architecture ({model_args.model_name_or_path}); "
                "drop these flags (finetuning at another size resizes tables: see run_image_classification.py)."
            )
        config = SimMIMConfig.from_pretrained(
            model_args.model_name_or_path,
            cache_dir=model_args.cache_dir,
            revision=model_args.model_revision,
            token=model_args.token,
            trust_remote_code=model_args.trust_remote_code,
        )
        kernel = model_args.decoder_kernel_size
        if kernel is not None and kernel != config.decoder_kernel_size:
            raise ValueError(
                f"--decoder_kernel_size {kernel} cannot change the decoder of a saved model "
                f"({model_args.model_name_or_path} has {config.decoder_kernel_size}): drop the flag."
            )
        for key, value in masking.items():
            setattr(config, key, value)
        config.validate_geometry()
        return config
    if model_args.decoder_kernel_size is not None:
        masking["decoder_kernel_size"] = model_args.decoder_kernel_size
    if model_args.model_preset is not None:
        family = PRESETS[model_args.model_preset][0]
        check_override_keys(family, overrides)
        return SimMIMConfig.from_preset(model_args.model_preset, **masking, **overrides)
    if model_args.model_type is None:
        raise ValueError(
            "Give --model_type (swin, swinv2, vit, beit), --model_preset, or --model_name_or_path "
            "(or a recipe from configs/pretrain/ that sets one)."
        )
    family = model_args.model_type
    check_override_keys(family, overrides)
    from modeling_simmim.configuration_simmim import build_backbone_config

    backbone = build_backbone_config(family, **{**FAMILY_DEFAULTS[family], **overrides})
    return SimMIMConfig(backbone_config=backbone, **masking)


def materialize_streamed_splits(loaded: Any, data_args: DataArguments, training_args: SimMIMTrainingArguments) -> None:
    """With --streaming, evaluation reads a fixed list: the first --max_eval_samples examples of the stream's
    validation split (kept in memory, undecoded), so that its loss is comparable across evaluations and processes."""
    import datasets

    validation = loaded.datasets.pop("validation", None)
    for split in list(loaded.datasets):  # other streamed splits are not used
        loaded.datasets.pop(split)
    if validation is None or not training_args.do_eval:
        return
    if data_args.max_eval_samples is None:
        raise ValueError(
            "--streaming with a validation split: give --max_eval_samples (the number of its first "
            "examples to evaluate on), or --do_eval false."
        )
    rows = list(validation.take(data_args.max_eval_samples))
    loaded.datasets["validation"] = datasets.Dataset.from_list(rows, features=validation.features)


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
def load_data(model_args: ModelArguments, data_args: DataArguments, training_args: SimMIMTrainingArguments):
    """The raw splits (`LoadedData`) and, with --streaming, the training stream (else None); sizes checked."""
    loaded = load_image_datasets(
        dataset_name=data_args.dataset_name,
        dataset_config_name=data_args.dataset_config_name,
        train_dir=data_args.train_dir,
        validation_dir=data_args.validation_dir,
        image_column_name=data_args.image_column_name,
        train_val_split=data_args.train_val_split,
        max_train_samples=data_args.max_train_samples,
        max_eval_samples=data_args.max_eval_samples,
        demo_dataset=data_args.demo_dataset,
        verify_images=data_args.verify_images,
        on_bad_image=data_args.on_bad_image,
        seed=training_args.seed,
        cache_dir=model_args.cache_dir,
        data_files=data_args.data_files,
        streaming=data_args.streaming,
    )
    if training_args.do_train and "train" not in loaded.datasets:
        raise ValueError(f"No training split in {loaded.source}; splits: {list(loaded.datasets)}.")
    stream = None
    if data_args.streaming:
        stream = loaded.datasets.pop("train", None)
        materialize_streamed_splits(loaded, data_args, training_args)
    elif training_args.do_train:
        check_training_data_size(len(loaded.datasets["train"]), training_args)
    logger.info(
        "Data: %s; image column %r; %s",
        loaded.source,
        loaded.image_column,
        {
            **({"train": "stream"} if stream is not None else {}),
            **{split: len(ds) for split, ds in loaded.datasets.items()},
        },
    )
    if loaded.num_skipped:
        logger.warning("%d unreadable image file(s) skipped at load time.", loaded.num_skipped)
    return loaded, stream


def build_datasets(
    loaded,
    stream,
    config: SimMIMConfig,
    mask_generator: SimMIMMaskGenerator,
    data_args: DataArguments,
    training_args: SimMIMTrainingArguments,
):
    """Training data (random crop, flip and mask keyed by (seed, epoch, example); see modeling_simmim.randomness)
    and evaluation data (fixed transform and masks)."""
    image_size = config.image_size
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    train_transform = build_pretrain_transform(image_size, mean, std, train=True, hflip_prob=data_args.hflip_prob)
    eval_transform = build_pretrain_transform(image_size, mean, std, train=False)
    train_dataset = eval_dataset = None
    if stream is not None:
        train_dataset = StreamingImageDataset(
            stream,
            loaded.image_column,
            train_transform,
            on_bad_image=data_args.on_bad_image,
            keyed_fn=KeyedMasks(mask_generator),
            shuffle_buffer_size=data_args.shuffle_buffer_size,
        )
    elif "train" in loaded.datasets:
        train_dataset = RobustImageDataset(
            loaded.datasets["train"],
            loaded.image_column,
            train_transform,
            on_bad_image=data_args.on_bad_image,
            keyed_fn=KeyedMasks(mask_generator),
        )
    if training_args.do_eval and "validation" in loaded.datasets:
        eval_dataset = RobustImageDataset(
            loaded.datasets["validation"],
            loaded.image_column,
            eval_transform,
            extra_fn=IndexSeededMasks(mask_generator, seed=data_args.eval_mask_seed),
            on_bad_image=data_args.on_bad_image,
        )
    return train_dataset, eval_dataset


def build_callbacks(
    loaded,
    stream,
    config: SimMIMConfig,
    mask_generator: SimMIMMaskGenerator,
    data_args: DataArguments,
    training_args: SimMIMTrainingArguments,
) -> list:
    """Reconstruction grids (of evaluation images when there are some, else training images; fixed transform and
    masks) and the kNN monitor of the encoder's features (--knn_eval_dir)."""
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    eval_transform = build_pretrain_transform(config.image_size, mean, std, train=False)
    callbacks: list = []
    preview_rows = loaded.datasets.get("validation" if "validation" in loaded.datasets else "train")
    if preview_rows is None and stream is not None:  # the first images of the stream
        preview_rows = list(stream.take(training_args.num_visualize_images))
    if preview_rows is not None:
        preview = visualization_batch(
            RobustImageDataset(
                preview_rows,
                loaded.image_column,
                eval_transform,
                extra_fn=IndexSeededMasks(mask_generator, seed=data_args.eval_mask_seed),
                on_bad_image=data_args.on_bad_image,
            ),
            training_args.num_visualize_images,
        )
        if preview is not None:
            callbacks.append(
                ReconstructionCallback(
                    preview["pixel_values"],
                    preview["bool_masked_pos"],
                    training_args.output_dir,
                    training_args.visualize_steps,
                    mean,
                    std,
                )
            )
    if data_args.knn_eval_dir is not None:  # labelled images for the kNN monitor
        callbacks.append(
            KNNMonitorCallback(
                *knn_datasets_from_folder(data_args.knn_eval_dir, eval_transform, verify=data_args.verify_images),
                every_n_steps=data_args.knn_eval_steps,
            )
        )
    return callbacks


def build_model(
    model_args: ModelArguments, config: SimMIMConfig, seed: int, full_determinism: bool
) -> SimMIMForMaskedImageModeling:
    """The model to pretrain: a saved one to continue, or a new one."""
    # Seeded here, not only by the Trainer (which seeds after the model exists): the initial weights are a function
    # of --seed, the same in every process and every run.
    seed_everything(seed, full_determinism)
    if model_args.model_name_or_path is not None:
        model = SimMIMForMaskedImageModeling.from_pretrained(
            model_args.model_name_or_path,
            config=config,
            cache_dir=model_args.cache_dir,
            revision=model_args.model_revision,
            token=model_args.token,
            trust_remote_code=model_args.trust_remote_code,
        )
    else:
        model = SimMIMForMaskedImageModeling(config)
    logger.info(
        "Model: %s backbone, %s px, %.2fM parameters, encoder stride %d, mask %d px x %.2f",
        config.backbone_type,
        config.image_size,
        sum(p.numel() for p in model.parameters()) / 1e6,
        config.encoder_stride,
        config.mask_patch_size,
        config.mask_ratio,
    )
    return model


@releases_process_group
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    model_args, data_args, training_args, explicit = parse_args(argv)
    setup_logging(training_args, "run_mim")

    # Fail early: everything that can be checked without training.
    check_streaming_arguments(data_args, training_args)
    check_flip_probability(data_args.hflip_prob)
    checkpoint = check_output_dir(training_args)
    config = build_config(model_args)
    loaded, stream = load_data(model_args, data_args, training_args)

    mask_generator = SimMIMMaskGenerator(
        config.image_size, config.mask_patch_size, config.model_patch_size, config.mask_ratio
    )
    train_dataset, eval_dataset = build_datasets(loaded, stream, config, mask_generator, data_args, training_args)
    callbacks = build_callbacks(loaded, stream, config, mask_generator, data_args, training_args)
    model = build_model(model_args, config, training_args.seed, training_args.full_determinism)

    data_summary = (
        "streamed"
        if stream is not None
        else f"{len(train_dataset) if train_dataset is not None else 0} training images"
    )
    trainer = SimMIMTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset,
        data_collator=PretrainCollator(SimMIMDataCollator(mask_generator)),
        # the evaluation transform of pretraining: shorter side to the crop size, centre crop
        processing_class=build_image_processor(
            config.image_size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "bilinear", max(config.image_size)
        ),
        callbacks=callbacks,
        model_card_info={
            "recipe": explicit,
            "data": f"{loaded.source}, {data_summary}",
            "base_model": model_args.model_name_or_path,
            "dataset_id": data_args.dataset_name,
        },
    )
    for callback in callbacks:
        if isinstance(callback, KNNMonitorCallback):
            callback.attach(trainer)

    # save_model: the model (safetensors + config) and preprocessor_config.json
    results = train_and_evaluate(
        trainer, train_dataset, eval_dataset, training_args.do_train, checkpoint, loaded.num_skipped, save_model=True
    )
    if training_args.push_to_hub:
        trainer.push_to_hub(tags=["simmim", "masked-image-modeling"])  # writes the model card first
    elif trainer.is_world_process_zero():
        trainer.create_model_card()
    if trainer.is_world_process_zero():
        reconstruction = trainer.latest_reconstruction()
        print(f"\nModel saved to {os.path.abspath(training_args.output_dir)}")
        if reconstruction:
            print(
                f"Reconstructions in {os.path.abspath(os.path.join(training_args.output_dir, RECONSTRUCTIONS_DIR))}"
                f" (latest: {os.path.basename(reconstruction)})"
            )
    return results


if __name__ == "__main__":
    main()
