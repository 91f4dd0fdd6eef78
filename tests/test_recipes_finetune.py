"""configs/finetune/*.yaml equal the official SimMIM finetuning configs (microsoft/SimMIM configs/*/simmim_finetune_*
+ config.py defaults), parsed through the real CLI parser; plus the tiny CPU demo recipe."""

import glob
import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

import run_image_classification as ric
from modeling_simmim import SimMIMConfig, SimMIMForMaskedImageModeling
from modeling_simmim.configuration_simmim import build_backbone_config

RECIPES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "finetune")

# name -> (family, image, window, embed/hidden, heads, drop path, layer decay)
OFFICIAL = {
    "swin_base_192_w6_100ep.yaml": ("swin", 192, 6, 128, [4, 8, 16, 32], 0.1, 0.9),
    "swin_base_224_w7_100ep.yaml": ("swin", 224, 7, 128, [4, 8, 16, 32], 0.1, 0.9),
    "swin_base_224_w7_800ep.yaml": ("swin", 224, 7, 128, [4, 8, 16, 32], 0.1, 0.8),
    "swin_large_224_w14_800ep.yaml": ("swin", 224, 14, 192, [6, 12, 24, 48], 0.2, 0.7),
    "vit_base_224_800ep.yaml": ("beit", 224, None, 768, 12, 0.1, 0.65),
    # microsoft/Swin-Transformer configs/simmim/simmim_finetune__swinv2_base__img224_window14__800ep.yaml; SwinV2-H
    # has no released config: its architecture (SwinV2 paper) with the SwinV2-B values
    "swinv2_base_224_w14_800ep.yaml": ("swinv2", 224, 14, 128, [4, 8, 16, 32], 0.1, 0.75),
    "swinv2_huge_224_w14_800ep.yaml": ("swinv2", 224, 14, 352, [11, 22, 44, 88], 0.1, 0.75),
    "swinv2_huge_512_w32_800ep.yaml": ("swinv2", 512, 32, 352, [11, 22, 44, 88], 0.1, 0.75),
}


def _parse(name, *flags):
    # bf16 is the recipe value for GPUs; this CPU test machine rejects it at parse time
    return ric.parse_args([os.path.join(RECIPES, name), "--output_dir", "/tmp/unused", "--bf16", "false", *flags])


def test_every_recipe_is_covered():
    names = {os.path.basename(path) for path in glob.glob(os.path.join(RECIPES, "*.yaml"))}
    assert names == set(OFFICIAL) | {"demo_swin_tiny_cpu.yaml"}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_recipe_values(name):
    family, image, window, width, heads, drop_path, layer_decay = OFFICIAL[name]
    model_args, data_args, aug, args, explicit = _parse(name)
    overrides = model_args.overrides()
    assert model_args.model_type == family and model_args.image_size == image
    assert model_args.drop_path_rate == drop_path and overrides["drop_path_rate"] == drop_path
    if family in ("swin", "swinv2"):
        assert model_args.window_size == window
        assert overrides["embed_dim"] == width and overrides["num_heads"] == heads
        assert overrides["depths"] == [2, 2, 18, 2] and overrides["patch_size"] == 4
        assert overrides["use_absolute_embeddings"] is False and overrides["qkv_bias"] is True
        if family == "swinv2":  # pretrained at 192 px / window 12: the last stage (6x6) had a 6 window
            assert overrides["pretrained_window_sizes"] == [12, 12, 12, 6]
    else:
        assert overrides["hidden_size"] == 768 and overrides["num_hidden_layers"] == 12
        assert overrides["num_attention_heads"] == heads and overrides["patch_size"] == 16
        assert overrides["use_relative_position_bias"] is True
        assert overrides["use_shared_relative_position_bias"] is False
        assert overrides["use_mean_pooling"] is True and overrides["layer_scale_init_value"] == 0.1
        assert overrides["use_absolute_position_embeddings"] is False and overrides["layer_norm_eps"] == 1e-6
    # TRAIN
    assert args.num_train_epochs == 100 and args.warmup_epochs == 20
    assert args.base_learning_rate == 1.25e-3 and args.warmup_learning_rate == 2.5e-7
    assert args.min_learning_rate == 2.5e-7 and args.layer_decay == layer_decay
    assert args.weight_decay == 0.05 and args.max_grad_norm == 5.0 and args.scale_learning_rate
    assert (args.adam_beta1, args.adam_beta2, args.adam_epsilon) == (0.9, 0.999, 1e-8)
    assert args.lr_scheduler_type.value == "cosine" and args.per_device_train_batch_size == 128
    assert args.dataloader_drop_last
    # AUG
    assert aug.rand_augment == "rand-m9-mstd0.5-inc1" and aug.color_jitter == 0.4 and aug.interpolation == "bicubic"
    assert (aug.random_erasing, aug.random_erasing_mode, aug.random_erasing_count) == (0.25, "pixel", 1)
    assert (aug.mixup, aug.cutmix, aug.mixup_prob, aug.mixup_switch_prob, aug.mixup_mode) == (
        0.8,
        1.0,
        1.0,
        0.5,
        "batch",
    )
    assert aug.label_smoothing == 0.1 and aug.crop_scale == [0.08, 1.0]
    # best checkpoint by top-1
    assert args.metric_for_best_model == "accuracy" and args.load_best_model_at_end
    # the paper's setting: 16 GPUs x 128 images -> lr 5e-3, warmup 20 epochs of 625 steps (1,281,167 images)
    steps_per_epoch = 1281167 // 2048
    schedule = args.resolve_schedule(2048, steps_per_epoch)
    assert schedule.learning_rate == pytest.approx(5e-3) and schedule.warmup_learning_rate == pytest.approx(1e-6)
    assert schedule.min_learning_rate == pytest.approx(1e-6)
    assert schedule.num_warmup_steps == 20 * steps_per_epoch and schedule.num_training_steps == 100 * steps_per_epoch


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_recipe_builds_the_official_architecture(name):
    family, image, window, width, heads, drop_path, _ = OFFICIAL[name]
    model_args, *_ = _parse(name)
    overrides = model_args.overrides()
    if family == "beit":
        overrides = {**ric.FAMILY_DEFAULTS["beit"], **ric.BEIT_SIMMIM_FINETUNE, **overrides}
    config = SimMIMConfig(backbone_config=build_backbone_config(family, **overrides))
    config.num_labels = 1000
    backbone = config.backbone_config
    assert backbone.image_size == image and backbone.drop_path_rate == drop_path
    with torch.device("meta"):
        model = ric.SimMIMForImageClassification(config)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    expected = {"swin_base": 87.8, "swin_large": 196.5, "vit_base": 86.5, "swinv2_base": 87.9, "swinv2_huge": 658.0}[
        name.rsplit("_", 3)[0] if "vit" not in name else "vit_base"
    ]
    assert millions == pytest.approx(expected, rel=0.01)
    if family == "swinv2":  # stages smaller than the window get a window of their size, the official rule
        last_stage = image // 32
        windows = [layer.blocks[0].window_size for layer in model.swinv2.encoder.layers]
        assert windows[:3] == [window] * 3 and windows[3] == min(window, last_stage)
        assert backbone.pretrained_window_sizes == [12, 12, 12, 6]


def test_demo_recipe_is_tiny_and_official_in_shape():
    model_args, data_args, aug, args, _ = _parse("demo_swin_tiny_cpu.yaml")
    assert data_args.demo_dataset == "digits" and args.report_to in ([], ["none"], "none")
    assert model_args.image_size == 32 and model_args.window_size == 4  # the pretraining demo's geometry
    assert args.layer_decay == 0.9 and aug.label_smoothing == 0.1 and args.max_grad_norm == 5.0
    assert args.lr_scheduler_type.value == "cosine"
    # lightened augmentation for 8x8 digits (documented in the recipe): no mixing, no RandAugment, milder crops, and
    # no flip (a mirrored digit is another shape)
    assert (aug.mixup, aug.cutmix, aug.random_erasing, aug.rand_augment) == (0.0, 0.0, 0.0, "none")
    assert aug.crop_scale == [0.5, 1.0] and aug.hflip_prob == 0.0 and args.num_train_epochs <= 30
    # the demo reports the last epoch: nothing is selected on the validation images it prints the accuracy of
    assert args.load_best_model_at_end is False and args.save_strategy.value == "no"
    assert model_args.from_scratch is False and model_args.model_name_or_path is None


@pytest.mark.parametrize(
    "name",
    [
        "swinv2_base_224_w14_800ep.yaml",
        "swinv2_huge_224_w14_800ep.yaml",
        pytest.param("swinv2_huge_512_w32_800ep.yaml", marks=pytest.mark.slow),  # 512 px: over a minute on 2 cores
    ],
)
def test_swinv2_recipe_finetunes_a_192_w12_checkpoint_at_tiny_scale(tmp_path, name):
    """The recipe as given (geometry, windows, pretrained windows, optimization, augmentation), with a tiny encoder
    (embed 8, one block and one head per stage), from a SimMIM checkpoint at 192 px / window 12: one training step,
    then the exported model keeps the pretrained continuous-position-bias MLPs (transferred, not re-initialized) and
    the official windows."""
    family, image, window, *_ = OFFICIAL[name]
    tiny = dict(embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1])
    torch.manual_seed(0)
    pretrained = str(tmp_path / "pretrained")
    SimMIMForMaskedImageModeling(
        SimMIMConfig.from_preset("swinv2_test", image_size=192, window_size=12, **tiny, mask_patch_size=32)
    ).save_pretrained(pretrained)
    with open(os.path.join(RECIPES, name), encoding="utf-8") as handle:
        recipe = yaml.safe_load(handle)
    recipe["backbone_config_overrides"].update(tiny)
    recipe_path = tmp_path / name
    recipe_path.write_text(yaml.safe_dump(recipe))
    output_dir = str(tmp_path / "finetuned")
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ric.main(
            [
                str(recipe_path),
                "--model_name_or_path",
                pretrained,
                "--output_dir",
                output_dir,
                "--bf16",
                "false",
                "--max_steps",
                "1",
                "--per_device_train_batch_size",
                "2",
                "--per_device_eval_batch_size",
                "2",
                "--max_train_samples",
                "4",
                "--max_eval_samples",
                "2",
                "--dataloader_num_workers",
                "0",
                "--eval_strategy",
                "no",
                "--save_strategy",
                "no",
                "--load_best_model_at_end",
                "false",
                "--drop_empty_classes",
                "true",
                "--report_to",
                "none",
            ]
        )
    finally:
        torch.set_num_threads(previous)
    config = json.loads(open(os.path.join(output_dir, "config.json")).read())
    assert config["model_type"] == "swinv2" and config["image_size"] == image and config["window_size"] == window
    assert config["pretrained_window_sizes"] == [12, 12, 12, 6]
    before, after = (
        load_file(os.path.join(pretrained, "model.safetensors")),
        load_file(os.path.join(output_dir, "model.safetensors")),
    )
    mlps = [key for key in before if "continuous_position_bias_mlp" in key]
    assert len(mlps) == 4 * 3  # one block per stage: two linear weights and a bias each
    for key in mlps:  # one step at the warmup lr (~1e-9): the pretrained values
        torch.testing.assert_close(after[key], before[key], atol=1e-6, rtol=0)
