#!/usr/bin/env python
"""Finetune a SimMIM encoder for image classification with the official recipe on the Hugging Face stack.

    python run_image_classification.py [RECIPE.yaml|RECIPE.json] [--flag value ...]
    accelerate launch --config_file configs/accelerate/ddp.yaml run_image_classification.py \
        configs/finetune/swin_base_224_w7_100ep.yaml --model_name_or_path outputs/swin_base_pretrain \
        --train_dir /data/imagenet/train --validation_dir /data/imagenet/val --output_dir outputs/swin_base_ft

Same conventions as run_mim.py: the optional first argument is a recipe (flag names -> values), flags override it.
`--model_name_or_path` takes a SimMIM pretraining checkpoint, one of our classification checkpoints or a native
transformers Swin/SwinV2/BEiT/ViT folder (e.g. converted official weights), moved to `--image_size`/`--window_size`
with the official resizing; or `--model_type`/`--model_preset` + `--backbone_config_overrides` train from scratch.
With no data argument, the bundled labeled demo data is used. The output folder is a native transformers classifier
(`pipeline("image-classification", model=output_dir)` runs it without this package); `all_results.json` holds
`eval_accuracy` (top-1) and, with more than 5 classes, `eval_top5_accuracy`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import transformers
from transformers import HfArgumentParser

from modeling_simmim import SimMIMConfig
from modeling_simmim.augmentation import (
    MixupCollator,
    build_classification_transform,
    check_flip_probability,
    collate_classification,
    mixup_active,
)
from modeling_simmim.cli import (
    FAMILY_DEFAULTS,
    check_output_dir,
    check_override_keys,
    parse_backbone_overrides,
    parse_recipe_and_flags,
    releases_process_group,
    setup_logging,
)
from modeling_simmim.configuration_simmim import (
    BEIT_SIMMIM_FINETUNE,
    PRESETS,
    SUPPORTED_BACKBONES,
    build_backbone_config,
)
from modeling_simmim.data import (
    BAD_IMAGE_POLICIES,
    DEMO_DATASETS,
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    RobustImageDataset,
    SkipNoneCollator,
    load_image_datasets,
)
from modeling_simmim.evaluation import prepare_linear_probe
from modeling_simmim.export import build_image_processor
from modeling_simmim.modeling_simmim import SimMIMForImageClassification
from modeling_simmim.randomness import seed_everything
from modeling_simmim.trainer import (
    ImageClassificationTrainer,
    SimMIMTrainingArguments,
    build_compute_metrics,
    check_training_data_size,
    top_k_indices,
    train_and_evaluate,
)

logger = logging.getLogger("run_image_classification")


@dataclass
class ModelArguments:
    """The encoder to finetune (a checkpoint moved to the finetuning geometry), or a new one (from-scratch baseline)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "SimMIM pretraining checkpoint, SimMIM classification checkpoint, or native transformers "
            "Swin/SwinV2/BEiT/ViT folder or Hub id (e.g. converted official weights)."
        },
    )
    model_type: str | None = field(
        default=None,
        metadata={
            "help": "Backbone family of a new model (or a check on the checkpoint's).",
            "choices": sorted(SUPPORTED_BACKBONES),
        },
    )
    model_preset: str | None = field(
        default=None, metadata={"help": "Start a new model from a named preset.", "choices": sorted(PRESETS)}
    )
    backbone_config_overrides: str | None = field(
        default=None, metadata={"help": "JSON object of backbone config values applied before loading."}
    )
    image_size: int | None = field(default=None, metadata={"help": "Finetuning resolution (e.g. 224)."})
    window_size: int | None = field(default=None, metadata={"help": "Swin/SwinV2 window at that resolution (7)."})
    drop_path_rate: float | None = field(default=None, metadata={"help": "Stochastic depth (official 0.1 / 0.2)."})
    classifier_pooling: str | None = field(
        default=None,
        metadata={"help": "Plain ViT only: 'cls' (default, exportable) or 'mean'.", "choices": ["cls", "mean"]},
    )
    from_scratch: bool = field(
        default=False,
        metadata={
            "help": "The architecture of --model_name_or_path at the asked geometry, with fresh weights (none "
            "loaded): the no-pretraining baseline of the same recipe."
        },
    )
    linear_probe: bool = field(
        default=False,
        metadata={
            "help": "Train only a linear head on frozen, normalized pooled features (BatchNorm without affine + "
            "linear, as MAE's linear probe); the head is folded into one linear layer for the export."
        },
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Cache folder for Hub models and datasets."})
    model_revision: str = field(default="main", metadata={"help": "Hub revision of --model_name_or_path."})
    token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})

    def overrides(self) -> dict[str, Any]:
        """Backbone overrides: --backbone_config_overrides plus the geometry / drop-path flags."""
        return parse_backbone_overrides(
            self.backbone_config_overrides,
            image_size=self.image_size,
            window_size=self.window_size,
            drop_path_rate=self.drop_path_rate,
        )


@dataclass
class DataArguments:
    """Labeled images: a datasets id, image folders (one sub-folder per class), or (default) the bundled demo data."""

    dataset_name: str | None = field(default=None, metadata={"help": "datasets id or packaged builder."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Config name of --dataset_name."})
    train_dir: str | None = field(default=None, metadata={"help": "Training images, one sub-folder per class."})
    validation_dir: str | None = field(default=None, metadata={"help": "Evaluation images, same class folders."})
    image_column_name: str | None = field(default=None, metadata={"help": "Image column (default: detected)."})
    label_column_name: str | None = field(default=None, metadata={"help": "Label column (default: detected)."})
    train_val_split: float | None = field(
        default=0.1, metadata={"help": "Fraction of train split off for evaluation when there is no validation split."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep a random subset of this size."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep a random subset of this size."})
    demo_dataset: str = field(
        default="digits",
        metadata={"help": "Bundled data used when no data argument is given.", "choices": DEMO_DATASETS},
    )
    verify_images: bool = field(default=True, metadata={"help": "Check every file of the image folders at start."})
    on_bad_image: str = field(
        default="skip",
        metadata={
            "help": "Unreadable image files: 'skip' (named in a warning, counted once) or 'error' (stop, naming "
            "the file).",
            "choices": list(BAD_IMAGE_POLICIES),
        },
    )
    drop_empty_classes: bool = field(
        default=False,
        metadata={
            "help": "Train without the classes that have no readable training image (left out of the head, "
            "their evaluation images too) instead of stopping with an error naming them."
        },
    )


@dataclass
class AugmentationArguments:
    """The official finetuning augmentation (timm); defaults are the official values."""

    rand_augment: str = field(
        default="rand-m9-mstd0.5-inc1", metadata={"help": "timm auto-augment policy ('none' to disable)."}
    )
    color_jitter: float = field(
        default=0.4, metadata={"help": "Colour jitter (timm ignores it when an auto-augment policy is set)."}
    )
    crop_scale: list[float] = field(
        default_factory=lambda: [0.08, 1.0], metadata={"help": "RandomResizedCrop area range (official 0.08 1.0)."}
    )
    hflip_prob: float = field(
        default=0.5,
        metadata={
            "help": "Probability of the horizontal flip (official 0.5; 0 for images whose mirror "
            "is another class, e.g. digits or text)."
        },
    )
    interpolation: str = field(
        default="bicubic", metadata={"help": "Resize interpolation.", "choices": ["bicubic", "bilinear"]}
    )
    random_erasing: float = field(default=0.25, metadata={"help": "Random erasing probability."})
    random_erasing_mode: str = field(default="pixel", metadata={"help": "Random erasing fill mode."})
    random_erasing_count: int = field(default=1, metadata={"help": "Random erasing count."})
    mixup: float = field(default=0.8, metadata={"help": "Mixup alpha (0 = off)."})
    cutmix: float = field(default=1.0, metadata={"help": "CutMix alpha (0 = off)."})
    cutmix_minmax: list[float] | None = field(default=None, metadata={"help": "CutMix min/max box ratio."})
    mixup_prob: float = field(default=1.0, metadata={"help": "Probability of mixing a batch."})
    mixup_switch_prob: float = field(default=0.5, metadata={"help": "Probability of CutMix instead of Mixup."})
    mixup_mode: str = field(
        default="batch", metadata={"help": "Mix per batch, pair or elem.", "choices": ["batch", "pair", "elem"]}
    )
    label_smoothing: float = field(
        default=0.1, metadata={"help": "Label smoothing (folded into the Mixup targets when mixing)."}
    )


@dataclass
class FinetuneTrainingArguments(SimMIMTrainingArguments):
    """SimMIM training arguments with the official finetuning defaults (lrs per 512 images, linearly scaled)."""

    base_learning_rate: float = field(default=1.25e-3, metadata={"help": "Peak lr per 512 images (official 1.25e-3)."})
    warmup_learning_rate: float = field(default=2.5e-7, metadata={"help": "Warmup start lr per 512 images."})
    min_learning_rate: float = field(default=2.5e-7, metadata={"help": "Final cosine lr per 512 images."})
    warmup_epochs: float = field(default=20.0, metadata={"help": "Warmup epochs (official 20)."})
    eval_strategy: str = field(default="epoch", metadata={"help": "Evaluate every epoch (official)."})
    save_strategy: str = field(default="epoch", metadata={"help": "Save a checkpoint every epoch."})
    save_total_limit: int | None = field(default=2, metadata={"help": "Keep the best and the last checkpoint."})
    load_best_model_at_end: bool = field(
        default=True, metadata={"help": "Export the checkpoint with the best top-1 accuracy, not the last one."}
    )
    metric_for_best_model: str | None = field(default="accuracy", metadata={"help": "Best checkpoint by top-1."})
    greater_is_better: bool | None = field(default=True, metadata={"help": "Higher accuracy is better."})


# --------------------------------------------------------------------------------------------------------------------
def build_parser() -> HfArgumentParser:
    return HfArgumentParser((ModelArguments, DataArguments, AugmentationArguments, FinetuneTrainingArguments))


def parse_args(argv: Sequence[str] | None = None):
    """`[RECIPE] [--flags]` as in run_mim.py. Returns (model, data, augmentation, training args, explicit values)."""
    (model_args, data_args, aug_args, training_args), explicit = parse_recipe_and_flags(build_parser(), argv)
    if "do_eval" in explicit and "do_train" not in explicit:
        training_args.do_train = False  # `--do_eval` alone evaluates the given model (transformers' convention)
    return model_args, data_args, aug_args, training_args, explicit


def check_arguments(model_args, aug_args, training_args) -> None:
    """Everything that can fail before data or weights are loaded."""
    if model_args.model_name_or_path is None and model_args.model_type is None and model_args.model_preset is None:
        raise ValueError(
            "Give --model_name_or_path (a pretrained checkpoint), or --model_type/--model_preset for a "
            "from-scratch baseline (or a recipe from configs/finetune/ that sets one)."
        )
    if model_args.from_scratch and model_args.model_name_or_path is None:
        raise ValueError(
            "--from_scratch true takes its architecture from --model_name_or_path: give one (or drop "
            "--from_scratch and use --model_type/--model_preset)."
        )
    check_flip_probability(aug_args.hflip_prob)
    if training_args.do_train and mixup_active(aug_args.mixup, aug_args.cutmix, aug_args.cutmix_minmax):
        if training_args.per_device_train_batch_size % 2:
            raise ValueError(
                f"Mixup/CutMix pairs each image with another one of its batch: "
                f"--per_device_train_batch_size must be even, got "
                f"{training_args.per_device_train_batch_size}."
            )
        if not training_args.dataloader_drop_last:
            raise ValueError("Mixup/CutMix needs full (even) batches: keep --dataloader_drop_last true.")


def label_names(loaded) -> list[str]:
    """Class names of the training split (ClassLabel names, or the sorted distinct label values)."""
    import datasets

    split = loaded.datasets["train"] if "train" in loaded.datasets else loaded.datasets["validation"]
    feature = split.features[loaded.label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    return [str(value) for value in sorted(set(split[loaded.label_column]))]


def training_classes(loaded, drop_empty_classes: bool = False, max_train_samples: int | None = None) -> list[str]:
    """The classes to train a head for: those of the training split. A class without any (readable) training image
    is an error naming it (and `--max_train_samples` when that subset may be the cause), or, with
    `drop_empty_classes`, is left out, its evaluation images too (`loaded` is filtered in place). Fewer than 2
    classes is an error: a classifier would learn nothing."""
    import datasets

    split = loaded.datasets["train"]
    feature = split.features[loaded.label_column]
    names = label_names(loaded)
    empty: list[str] = []
    if isinstance(feature, datasets.ClassLabel):
        counts = np.bincount(np.asarray(split[loaded.label_column], dtype=np.int64), minlength=feature.num_classes)
        empty = [name for name, count in zip(names, counts) if count == 0]
    if empty and not drop_empty_classes:
        subset = ""
        if max_train_samples is not None and len(split) == max_train_samples:
            subset = (
                f"; --max_train_samples {max_train_samples} keeps a random subset of the training images: raise it"
            )
        raise ValueError(
            f"Class(es) {empty} have no readable training image (unreadable files are dropped, see the "
            f"warnings naming them{subset}): add images, or pass --drop_empty_classes to train without them."
        )
    if empty:
        logger.warning("Dropping %d class(es) without training images from the classifier: %s", len(empty), empty)
        names = [name for name in names if name not in empty]
        if "validation" in loaded.datasets:
            validation = loaded.datasets["validation"]
            val_feature = validation.features[loaded.label_column]
            dropped = {
                val_feature.str2int(name) if isinstance(val_feature, datasets.ClassLabel) else name for name in empty
            }
            kept = validation.filter(
                lambda labels: [label not in dropped for label in labels],
                batched=True,
                input_columns=[loaded.label_column],
            )
            logger.warning("Left out %d evaluation image(s) of the dropped classes.", len(validation) - len(kept))
            loaded.datasets["validation"] = kept
    if len(names) < 2:
        raise ValueError(
            f"Finetuning needs at least 2 classes with training images; the training data has "
            f"{len(names)} ({names}). Check the data: an image folder needs one sub-folder per class "
            "(or pass --label_column_name for a dataset)."
        )
    return names


class LabelIds:
    """`extra_fn` of `RobustImageDataset`: maps raw label values (ClassLabel ids, strings) to the model's class ids."""

    def __init__(self, value_to_id: dict[str, int]) -> None:
        self.value_to_id = value_to_id

    def __call__(self, index: int, example: dict[str, Any]) -> dict[str, Any]:
        value = str(example["labels"])
        if value not in self.value_to_id:
            raise ValueError(f"Label {value!r} of example {index} is not a class of the model.")
        return {"labels": self.value_to_id[value]}


def label_mapping(loaded, names: list[str], model_label2id: dict[str, int]) -> LabelIds | None:
    """How dataset labels become model class ids (None when they already are: ClassLabel ids in the same order)."""
    import datasets

    split = loaded.datasets["train"] if "train" in loaded.datasets else loaded.datasets["validation"]
    is_class_label = isinstance(split.features[loaded.label_column], datasets.ClassLabel)
    missing = sorted(set(names) - set(model_label2id))
    if missing:
        raise ValueError(
            f"Dataset classes {missing[:10]} are not classes of the model "
            f"(model classes: {sorted(model_label2id)[:10]}...)."
        )
    if is_class_label:
        feature = split.features[loaded.label_column]
        dataset_ids = {name: feature.str2int(name) for name in names}
        if len(names) == feature.num_classes and all(model_label2id[name] == dataset_ids[name] for name in names):
            return None
        return LabelIds({str(dataset_ids[name]): model_label2id[name] for name in names})
    return LabelIds({name: model_label2id[name] for name in names})


def hub_kwargs(model_args) -> dict[str, Any]:
    """Where --model_name_or_path is downloaded from (transformers' from_pretrained arguments)."""
    return {"cache_dir": model_args.cache_dir, "revision": model_args.model_revision, "token": model_args.token}


def resolve_image_size(model_args) -> int:
    """The finetuning resolution, known before loading anything heavy (sizes the bundled demo images)."""
    if model_args.image_size is not None:
        return model_args.image_size
    overrides = model_args.overrides()
    if "image_size" in overrides:
        return int(overrides["image_size"])
    if model_args.model_name_or_path is not None:
        return SimMIMConfig.from_pretrained(model_args.model_name_or_path, **hub_kwargs(model_args)).image_size[0]
    if model_args.model_preset is not None:
        return int(PRESETS[model_args.model_preset][1]["image_size"])
    return 224


def build_model(model_args, aug_args, id2label: dict[int, str] | None) -> SimMIMForImageClassification:
    """The classifier of the run: a checkpoint moved to the asked geometry, or a new model."""
    label_smoothing = (
        0.0 if mixup_active(aug_args.mixup, aug_args.cutmix, aug_args.cutmix_minmax) else aug_args.label_smoothing
    )  # with Mixup, smoothing lives in the soft targets (official)
    extra = {"label_smoothing": label_smoothing}
    if model_args.classifier_pooling is not None:
        extra["classifier_pooling"] = model_args.classifier_pooling
    overrides = model_args.overrides()
    if model_args.model_name_or_path is not None:
        source_config = SimMIMConfig.from_pretrained(model_args.model_name_or_path, **hub_kwargs(model_args))
        if model_args.model_type is not None and model_args.model_type != source_config.backbone_type:
            raise ValueError(
                f"--model_name_or_path {model_args.model_name_or_path} holds a {source_config.backbone_type} "
                f"backbone, not --model_type {model_args.model_type}: drop --model_type or pick a matching checkpoint."
            )
        drop_path_rate = overrides.pop("drop_path_rate", None)
        model = SimMIMForImageClassification.from_pretrained(
            model_args.model_name_or_path,
            **hub_kwargs(model_args),
            id2label=id2label,
            image_size=overrides.pop("image_size", None),
            window_size=overrides.pop("window_size", None),
            drop_path_rate=drop_path_rate,
            backbone_overrides=overrides,
            **extra,
        )
        if model_args.from_scratch:  # same config (geometry, head, BEiT finetuning layout), fresh weights
            logger.info("--from_scratch: %s's architecture, weights not loaded", model_args.model_name_or_path)
            model = SimMIMForImageClassification(model.config)
        return model
    if model_args.model_preset is not None:
        family = PRESETS[model_args.model_preset][0]
        check_override_keys(family, overrides)
        if family == "beit":
            overrides = {**BEIT_SIMMIM_FINETUNE, **overrides}
        config = SimMIMConfig.from_preset(model_args.model_preset, **overrides)
    else:
        family = model_args.model_type
        check_override_keys(family, overrides)
        defaults = {**FAMILY_DEFAULTS[family], **(BEIT_SIMMIM_FINETUNE if family == "beit" else {})}
        config = SimMIMConfig(backbone_config=build_backbone_config(family, **{**defaults, **overrides}))
    config.id2label = dict(id2label)
    config.label2id = {name: index for index, name in id2label.items()}
    for key, value in extra.items():
        setattr(config, key, value)
    return SimMIMForImageClassification(config)


# --------------------------------------------------------------------------------------------------------------------
def load_data(model_args, data_args, aug_args, training_args):
    """The labeled splits (`LoadedData`) and the class names (training: the data's; evaluation only: as found)."""
    loaded = load_image_datasets(
        dataset_name=data_args.dataset_name,
        dataset_config_name=data_args.dataset_config_name,
        train_dir=data_args.train_dir,
        validation_dir=data_args.validation_dir,
        image_column_name=data_args.image_column_name,
        label_column_name=data_args.label_column_name,
        train_val_split=data_args.train_val_split,
        max_train_samples=data_args.max_train_samples,
        max_eval_samples=data_args.max_eval_samples,
        demo_dataset=data_args.demo_dataset,
        demo_image_size=resolve_image_size(model_args),
        verify_images=data_args.verify_images,
        on_bad_image=data_args.on_bad_image,
        seed=training_args.seed,
        cache_dir=model_args.cache_dir,
        require_labels=True,
    )
    if training_args.do_train and "train" not in loaded.datasets:
        raise ValueError(f"No training split in {loaded.source}; splits: {list(loaded.datasets)}.")
    if training_args.do_eval and "validation" not in loaded.datasets:
        raise ValueError(f"No evaluation split in {loaded.source}: give --validation_dir or --train_val_split.")
    if training_args.do_train:
        mixup = mixup_active(aug_args.mixup, aug_args.cutmix, aug_args.cutmix_minmax)
        check_training_data_size(len(loaded.datasets["train"]), training_args, "Mixup/CutMix" if mixup else "")
        names = training_classes(loaded, data_args.drop_empty_classes, data_args.max_train_samples)
    else:
        names = label_names(loaded)
    logger.info(
        "Data: %s; columns image=%r label=%r; %d classes; %s",
        loaded.source,
        loaded.image_column,
        loaded.label_column,
        len(names),
        {split: len(ds) for split, ds in loaded.datasets.items()},
    )
    return loaded, names


def build_datasets(loaded, label_map, image_size: int, data_args, aug_args, training_args):
    """Training data (timm's augmentation, keyed by (seed, epoch, example)) and evaluation data (resize + crop)."""
    mean, std = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    train_dataset = eval_dataset = None
    if training_args.do_train:
        train_transform = build_classification_transform(
            image_size,
            train=True,
            auto_augment=aug_args.rand_augment,
            interpolation=aug_args.interpolation,
            random_erasing=aug_args.random_erasing,
            random_erasing_mode=aug_args.random_erasing_mode,
            random_erasing_count=aug_args.random_erasing_count,
            color_jitter=aug_args.color_jitter,
            crop_scale=aug_args.crop_scale,
            mean=mean,
            std=std,
            hflip_prob=aug_args.hflip_prob,
        )
        train_dataset = RobustImageDataset(
            loaded.datasets["train"],
            loaded.image_column,
            train_transform,
            label_column=loaded.label_column,
            extra_fn=label_map,
            on_bad_image=data_args.on_bad_image,
        )
    if training_args.do_eval:
        eval_transform = build_classification_transform(
            image_size, train=False, interpolation=aug_args.interpolation, mean=mean, std=std
        )
        eval_dataset = RobustImageDataset(
            loaded.datasets["validation"],
            loaded.image_column,
            eval_transform,
            label_column=loaded.label_column,
            extra_fn=label_map,
            on_bad_image=data_args.on_bad_image,
        )
    return train_dataset, eval_dataset


def build_collators(aug_args, num_labels: int):
    """(training, evaluation) collators: Mixup/CutMix on training batches when asked (official: per batch)."""
    eval_collator = SkipNoneCollator(collate_classification)
    if not mixup_active(aug_args.mixup, aug_args.cutmix, aug_args.cutmix_minmax):
        return eval_collator, eval_collator
    train_collator = SkipNoneCollator(
        MixupCollator(
            num_labels=num_labels,
            mixup_alpha=aug_args.mixup,
            cutmix_alpha=aug_args.cutmix,
            cutmix_minmax=aug_args.cutmix_minmax,
            prob=aug_args.mixup_prob,
            switch_prob=aug_args.mixup_switch_prob,
            mode=aug_args.mixup_mode,
            label_smoothing=aug_args.label_smoothing,
        )
    )
    return train_collator, eval_collator


def finish(trainer: ImageClassificationTrainer, results: dict[str, Any], training_args) -> None:
    """After training: the model card of the exported classifier (uploaded with it on --push_to_hub), and the
    printed summary."""
    if training_args.do_train:
        if trainer.state.best_model_checkpoint:
            logger.info(
                "Exported the best checkpoint (%s, top-1 %.4f)",
                trainer.state.best_model_checkpoint,
                trainer.state.best_metric,
            )
        if training_args.push_to_hub:  # every process: it saves (exports) again first
            trainer.push_to_hub(commit_message="SimMIM finetuned classifier")
        else:
            trainer.create_model_card()
    if not trainer.is_world_process_zero():
        return
    if "eval_accuracy" in results:
        top5 = (
            f"top-5 accuracy: {100 * results['eval_top5_accuracy']:.2f}%  " if "eval_top5_accuracy" in results else ""
        )
        print(f"\ntop-1 accuracy: {100 * results['eval_accuracy']:.2f}%  {top5}({results['eval_samples']} images)")
    if training_args.do_train:
        print(
            f"Classifier saved to {os.path.abspath(training_args.output_dir)} "
            f"(transformers.pipeline('image-classification', model=...))"
        )


@releases_process_group
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    model_args, data_args, aug_args, training_args, explicit = parse_args(argv)
    setup_logging(training_args, "run_image_classification")

    # Fail early: arguments, output folder, data columns and labels, then the weights.
    check_arguments(model_args, aug_args, training_args)
    checkpoint = check_output_dir(training_args) if training_args.do_train else None
    if not training_args.do_train and model_args.model_name_or_path is None:
        raise ValueError("Evaluation only (--do_eval without --do_train) needs --model_name_or_path.")
    loaded, names = load_data(model_args, data_args, aug_args, training_args)

    # Seeded before the model is built (the Trainer seeds only after): the new head and, from scratch, every weight
    # are a function of --seed.
    seed_everything(training_args.seed, training_args.full_determinism)
    # training: the data's classes (a new head unless the checkpoint has the same ones); evaluation only: the
    # model's head, dataset labels matched to it by name
    model = build_model(model_args, aug_args, dict(enumerate(names)) if training_args.do_train else None)
    if model_args.linear_probe:  # frozen encoder (eval mode), BatchNorm without affine + linear head (MAE)
        prepare_linear_probe(model)
    label_map = label_mapping(loaded, names, {str(k): int(v) for k, v in model.config.label2id.items()})
    config = model.config
    image_size = config.image_size[0]
    report = getattr(model, "loading_report", None)
    logger.info(
        "Model: %s, %d px, %.2fM parameters, %d classes",
        config.backbone_type,
        image_size,
        sum(p.numel() for p in model.parameters()) / 1e6,
        config.num_labels,
    )

    train_dataset, eval_dataset = build_datasets(loaded, label_map, image_size, data_args, aug_args, training_args)
    if eval_dataset is None and training_args.eval_strategy != "no":
        # nothing to evaluate during training: no best-checkpoint selection either
        training_args.eval_strategy = transformers.IntervalStrategy.NO
        training_args.load_best_model_at_end = False
    train_collator, eval_collator = build_collators(aug_args, config.num_labels)
    image_processor = build_image_processor(
        image_size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, interpolation=aug_args.interpolation
    )
    trainer = ImageClassificationTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=train_collator,
        eval_data_collator=eval_collator,
        processing_class=image_processor,  # saved with the export (and checkpoints)
        compute_metrics=build_compute_metrics(config.num_labels),
        preprocess_logits_for_metrics=top_k_indices,
        model_card_info={
            "recipe": explicit,
            "data": f"{loaded.source}, {len(train_dataset) if train_dataset is not None else 0} training images",
            "base_model": None if model_args.from_scratch else model_args.model_name_or_path,
            "dataset_id": data_args.dataset_name,
            "loading_report": str(report) if report is not None else None,
        },
    )

    # save_model: the native classifier export (the best checkpoint's weights with load_best_model_at_end)
    results = train_and_evaluate(
        trainer, train_dataset, eval_dataset, training_args.do_train, checkpoint, loaded.num_skipped, save_model=True
    )
    finish(trainer, results, training_args)
    return results


if __name__ == "__main__":
    main()
