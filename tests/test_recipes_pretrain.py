"""Every pretraining recipe resolves to the official model and to the official (scaled) learning-rate schedule.

The official numbers below are copied from the official config files (microsoft/SimMIM configs/*/simmim_pretrain_*.yaml,
microsoft/Swin-Transformer configs/simmim/simmim_pretrain__swinv2_base__img192_window12__800ep.yaml, config.py
defaults), not from our recipes; the schedule formulas are re-derived here from timm 0.4.12 (the official scheduler).
"""

import bisect
import glob
import math
import os

import pytest
import torch

import run_mim
from modeling_simmim import SimMIMConfig, SimMIMForMaskedImageModeling, simmim_lr_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, "configs", "pretrain")
IMAGENET_TRAIN = 1281167

SWIN_COMMON = dict(patch_size=4, mlp_ratio=4.0, qkv_bias=True, use_absolute_embeddings=False, hidden_dropout_prob=0.0)
OFFICIAL = {
    "swin_base_192_w6_100ep": dict(
        family="swin",
        image=192,
        preset="swin_base",
        model=dict(
            embed_dim=128,
            depths=[2, 2, 18, 2],
            num_heads=[4, 8, 16, 32],
            window_size=6,
            drop_path_rate=0.0,
            **SWIN_COMMON,
        ),
        train=dict(epochs=100, warmup_epochs=10, base_lr=2e-4, warmup_lr=1e-6, min_lr=1e-5, schedule="cosine"),
    ),
    "swin_base_192_w6_800ep": dict(
        family="swin",
        image=192,
        preset="swin_base",
        model=dict(
            embed_dim=128,
            depths=[2, 2, 18, 2],
            num_heads=[4, 8, 16, 32],
            window_size=6,
            drop_path_rate=0.0,
            **SWIN_COMMON,
        ),
        train=dict(
            epochs=800,
            warmup_epochs=10,
            base_lr=1e-4,
            warmup_lr=5e-7,
            min_lr=5e-6,
            schedule="multistep",
            milestones=[700],
            gamma=0.1,
        ),
    ),
    "swin_large_192_w12_800ep": dict(
        family="swin",
        image=192,
        preset="swin_large",
        model=dict(
            embed_dim=192,
            depths=[2, 2, 18, 2],
            num_heads=[6, 12, 24, 48],
            window_size=12,
            drop_path_rate=0.0,
            **SWIN_COMMON,
        ),
        train=dict(
            epochs=800,
            warmup_epochs=10,
            base_lr=1e-4,
            warmup_lr=5e-7,
            min_lr=5e-6,
            schedule="multistep",
            milestones=[700],
            gamma=0.1,
        ),
    ),
    "swinv2_base_192_w12_800ep": dict(
        family="swinv2",
        image=192,
        preset="swinv2_base",
        model=dict(
            embed_dim=128,
            depths=[2, 2, 18, 2],
            num_heads=[4, 8, 16, 32],
            window_size=12,
            drop_path_rate=0.1,
            pretrained_window_sizes=[0, 0, 0, 0],
            **SWIN_COMMON,
        ),
        norm_target_window=47,  # MODEL.SIMMIM.NORM_TARGET
        train=dict(
            epochs=800,
            warmup_epochs=10,
            base_lr=1e-4,
            warmup_lr=5e-7,
            min_lr=5e-6,
            schedule="multistep",
            milestones=[700],
            gamma=0.1,
        ),
    ),
    # No official SwinV2-H file: SwinV2 paper dims, the official SwinV2 SimMIM 800-epoch optimization.
    "swinv2_huge_192_w12_800ep": dict(
        family="swinv2",
        image=192,
        preset="swinv2_huge",
        model=dict(
            embed_dim=352,
            depths=[2, 2, 18, 2],
            num_heads=[11, 22, 44, 88],
            window_size=12,
            drop_path_rate=0.1,
            **SWIN_COMMON,
        ),
        norm_target_window=47,
        train=dict(
            epochs=800,
            warmup_epochs=10,
            base_lr=1e-4,
            warmup_lr=5e-7,
            min_lr=5e-6,
            schedule="multistep",
            milestones=[700],
            gamma=0.1,
        ),
    ),
    "vit_base_224_800ep": dict(
        family="beit",
        image=224,
        preset="vit_base",
        model=dict(
            patch_size=16,
            hidden_size=768,
            num_hidden_layers=12,
            num_attention_heads=12,
            intermediate_size=3072,
            layer_scale_init_value=0.1,
            use_absolute_position_embeddings=False,
            use_relative_position_bias=False,
            use_shared_relative_position_bias=True,
            use_mean_pooling=False,
            use_mask_token=True,
            layer_norm_eps=1e-6,
            drop_path_rate=0.1,
        ),
        train=dict(
            epochs=800,
            warmup_epochs=10,
            base_lr=1e-4,
            warmup_lr=5e-7,
            min_lr=5e-6,
            schedule="multistep",
            milestones=[700],
            gamma=0.1,
        ),
    ),
}
OFFICIAL_COMMON_TRAIN = dict(
    weight_decay=0.05,
    max_grad_norm=5.0,
    adam_beta1=0.9,
    adam_beta2=0.999,
    adam_epsilon=1e-8,
    per_device_train_batch_size=128,
    mask_patch_size=32,
    mask_ratio=0.6,
)


def _parse(name, *flags):
    return run_mim.parse_args(
        [os.path.join(RECIPES, name + ".yaml"), "--output_dir", "/tmp/unused", "--use_cpu", *flags]
    )


def _official_lr(t, lr, warmup_lr, min_lr, warmup_t, t_initial, schedule, milestones=(), gamma=0.1):
    """timm 0.4.12 CosineLRScheduler (warmup_prefix=False, cycle_limit=1) / the official MultiStepLRScheduler."""
    if t < warmup_t:
        return warmup_lr + t * (lr - warmup_lr) / warmup_t
    if schedule == "cosine":
        if t >= t_initial:
            return min_lr
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / t_initial))
    return lr * gamma ** bisect.bisect_right(list(milestones), t)


def test_every_recipe_file_is_covered():
    names = {os.path.basename(path)[:-5] for path in glob.glob(os.path.join(RECIPES, "*.yaml"))}
    assert set(OFFICIAL) <= names
    assert {name for name in names if name.startswith("demo_")} == names - set(OFFICIAL)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_recipe_builds_the_official_model(name):
    official = OFFICIAL[name]
    model_args, _, args, _ = _parse(name)
    config = run_mim.build_config(model_args)
    assert config.backbone_type == official["family"]
    assert config.image_size == (official["image"], official["image"])
    assert (config.mask_patch_size, config.mask_ratio) == (32, 0.6)
    assert config.norm_target_window == official.get("norm_target_window")
    backbone = config.backbone_config.to_dict()
    for key, value in official["model"].items():
        assert backbone[key] == pytest.approx(value), key
    for key, value in OFFICIAL_COMMON_TRAIN.items():
        if hasattr(args, key):
            assert getattr(args, key) == pytest.approx(value), key
    assert args.bf16 and args.dataloader_drop_last
    # the lead's preset of the same backbone agrees on the architecture
    preset = SimMIMConfig.from_preset(official["preset"]).backbone_config.to_dict()
    for key in (
        "embed_dim",
        "depths",
        "num_heads",
        "window_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "patch_size",
    ):
        if key in official["model"]:
            assert preset[key] == backbone[key], key


def test_swin_base_recipe_has_the_published_parameter_count():
    # mmpretrain lists 89.87 M parameters for SimMIM Swin-B w6 192 px (encoder + mask token + decoder).
    config = run_mim.build_config(_parse("swin_base_192_w6_100ep")[0])
    with torch.device("meta"):
        model = SimMIMForMaskedImageModeling(config)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(89.87, abs=0.01)


@pytest.mark.parametrize("name", sorted(OFFICIAL))
@pytest.mark.parametrize("processes, accumulation", [(16, 1), (8, 2)])
def test_recipe_resolves_to_the_official_scaled_schedule(name, processes, accumulation):
    train = OFFICIAL[name]["train"]
    _, _, args = _parse(name, "--gradient_accumulation_steps", str(accumulation))[:3]
    total = args.per_device_train_batch_size * processes * accumulation  # 2048, as the paper
    steps_per_epoch = IMAGENET_TRAIN // total  # drop_last
    schedule = args.resolve_schedule(total, steps_per_epoch)
    scale = total / 512
    assert schedule.learning_rate == pytest.approx(train["base_lr"] * scale)
    assert schedule.warmup_learning_rate == pytest.approx(train["warmup_lr"] * scale)
    assert schedule.min_learning_rate == pytest.approx(train["min_lr"] * scale)
    assert schedule.num_warmup_steps == int(train["warmup_epochs"] * steps_per_epoch)
    assert schedule.num_training_steps == int(train["epochs"] * steps_per_epoch)
    assert schedule.scheduler_type == train["schedule"]
    milestones = [m * steps_per_epoch for m in train.get("milestones", [])]
    assert list(schedule.milestones) == milestones
    official = dict(
        lr=train["base_lr"] * scale,
        warmup_lr=train["warmup_lr"] * scale,
        min_lr=train["min_lr"] * scale,
        warmup_t=schedule.num_warmup_steps,
        t_initial=schedule.num_training_steps,
        schedule=train["schedule"],
        milestones=milestones,
        gamma=train.get("gamma", 0.1),
    )
    probes = [
        0,
        1,
        schedule.num_warmup_steps // 2,
        schedule.num_warmup_steps,
        schedule.num_training_steps // 2,
        schedule.num_training_steps - 1,
        *[m + d for m in milestones for d in (-1, 0, 1)],
    ]
    for step in probes:
        ours = simmim_lr_at(
            step,
            schedule.learning_rate,
            schedule.num_training_steps,
            schedule.num_warmup_steps,
            schedule.warmup_learning_rate,
            schedule.min_learning_rate,
            schedule.scheduler_type,
            schedule.milestones,
            schedule.gamma,
        )
        assert ours == pytest.approx(_official_lr(step, **official), rel=1e-12), step


@pytest.mark.parametrize("name", ["demo_swin_tiny_cpu", "demo_beit_tiny_cpu"])
def test_demo_recipes_build_small_valid_models(name):
    model_args, data_args, args, _ = run_mim.parse_args(
        [os.path.join(RECIPES, name + ".yaml"), "--output_dir", "/tmp/unused"]
    )
    config = run_mim.build_config(model_args)
    config.validate_geometry()
    with torch.device("meta"):
        model = SimMIMForMaskedImageModeling(config)
    assert sum(p.numel() for p in model.parameters()) < 2e6
    assert data_args.dataset_name is None and data_args.train_dir is None  # the bundled demo data
    assert not args.bf16 and not args.fp16  # runs on any CPU
    if name == "demo_swin_tiny_cpu":  # digits: a mirrored digit is another shape; mask blocks = the encoder stride
        assert data_args.hflip_prob == 0.0 and data_args.demo_dataset == "digits"
        assert args.no_weight_decay_keywords == ["relative_position_bias_table"]  # measured: see the recipe
        assert config.mask_patch_size == config.encoder_stride == 8 and tuple(config.image_size) == (32, 32)


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed"])
def test_accelerate_configs_are_valid_launch_configs(name):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = os.path.join(ROOT, "configs", "accelerate", name + ".yaml")
    args = launch_command_parser().parse_args(["--config_file", path, "run_mim.py"])
    args, _, mixed_precision_from_file = _validate_launch_command(args)
    assert (args.multi_gpu, args.use_fsdp, args.use_deepspeed) == (name == "ddp", name == "fsdp", name == "deepspeed")
    if name == "fsdp":
        assert args.fsdp_version == 2 and args.fsdp_auto_wrap_policy == "TRANSFORMER_BASED_WRAP"
    if name == "deepspeed":
        assert os.path.isfile(os.path.join(ROOT, args.deepspeed_config_file))
        # with a DeepSpeed JSON, every process raises "the following accelerate config variables will be ignored"
        # when the launch config sets mixed_precision
        assert not mixed_precision_from_file
