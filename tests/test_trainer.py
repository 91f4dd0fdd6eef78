"""SimMIMTrainer / SimMIMTrainingArguments: official lr scaling and schedules, logging of lr / grad norm / images per
second, layer decay, deterministic evaluation, model card."""

import pytest
import torch

from modeling_simmim import (
    SimMIMConfig,
    SimMIMDataCollator,
    SimMIMForMaskedImageModeling,
    SimMIMMaskGenerator,
    simmim_lr_at,
)
from modeling_simmim.data import SKIPPED_KEY, IndexSeededMasks, PretrainCollator, UnreadableImage
from modeling_simmim.trainer import (
    SimMIMSchedule,
    SimMIMSchedulerType,
    SimMIMTrainer,
    SimMIMTrainingArguments,
    ThroughputCallback,
)

IMAGES, BATCH = 16, 4  # 4 optimizer steps per epoch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models run faster on one thread, and the test machine is shared.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=8,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    values.update(overrides)
    return SimMIMTrainingArguments(**values)


def _trainer(tmp_path, eval_images=0, **overrides):
    torch.manual_seed(0)
    config = SimMIMConfig.from_preset("swin_test", mask_patch_size=16)
    generator = SimMIMMaskGenerator(64, 16, config.model_patch_size, 0.6)
    train = [{"pixel_values": torch.randn(3, 64, 64)} for _ in range(IMAGES)]
    masks = IndexSeededMasks(generator, seed=0)
    evaluation = [{"pixel_values": torch.randn(3, 64, 64), **masks(i, {})} for i in range(eval_images)] or None
    return SimMIMTrainer(
        model=SimMIMForMaskedImageModeling(config),
        args=_args(tmp_path, **overrides),
        train_dataset=train,
        eval_dataset=evaluation,
        data_collator=PretrainCollator(SimMIMDataCollator(generator)),
    )


def _train_logs(trainer):
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


# ---- arguments -------------------------------------------------------------------------------------------------------
def test_arguments_default_to_the_official_values(tmp_path):
    args = _args(tmp_path)
    assert args.max_grad_norm == 5.0 and args.weight_decay == 0.05
    assert args.adam_beta1 == 0.9 and args.adam_beta2 == 0.999 and args.adam_epsilon == 1e-8
    assert args.lr_scheduler_type == SimMIMSchedulerType.COSINE
    assert (args.base_learning_rate, args.warmup_learning_rate, args.min_learning_rate) == (2e-4, 1e-6, 1e-5)
    assert args.warmup_epochs == 10 and args.layer_decay == 1.0 and args.dataloader_drop_last
    assert args.do_train and not args.remove_unused_columns


def test_arguments_reject_what_cannot_work(tmp_path):
    with pytest.raises(ValueError, match="not a SimMIM schedule"):
        _args(tmp_path, lr_scheduler_type="linear")
    with pytest.raises(ValueError, match="needs --lr_milestones"):
        _args(tmp_path, lr_scheduler_type="multistep")
    with pytest.raises(ValueError, match="max_grad_norm"):
        _args(tmp_path, max_grad_norm=-1.0)
    with pytest.raises(ValueError, match="layer_decay"):
        _args(tmp_path, layer_decay=1.5)
    args = _args(tmp_path, lr_scheduler_type="multistep", lr_milestones=[1], warmup_epochs=2)
    with pytest.raises(ValueError, match="ends after the first lr milestone"):
        args.resolve_schedule(total_batch_size=8, num_update_steps_per_epoch=10)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("base_learning_rate", 0.0, "--base_learning_rate must be > 0"),
        ("base_learning_rate", -1e-4, "--base_learning_rate must be > 0"),
        ("per_device_train_batch_size", 0, "--per_device_train_batch_size must be > 0"),
        ("per_device_eval_batch_size", 0, "--per_device_eval_batch_size must be > 0"),
        ("gradient_accumulation_steps", 0, "--gradient_accumulation_steps must be > 0"),
        ("num_train_epochs", -1.0, "--num_train_epochs must be >= 0"),
        ("num_train_epochs", 0.0, "trains 0 steps"),
        ("max_steps", -5, "--max_steps must be > 0"),
        ("warmup_epochs", -1.0, "--warmup_epochs must be >= 0"),
        ("min_learning_rate", -1e-6, "--min_learning_rate must be >= 0"),
        ("lr_gamma", 0.0, "--lr_gamma must be > 0"),
        ("dataloader_num_workers", -1, "--dataloader_num_workers must be >= 0"),
        ("no_weight_decay_keywords", ["norm", " "], "--no_weight_decay_keywords takes parts of parameter names"),
    ],
)
def test_arguments_that_cannot_train_fail_at_parse_time(tmp_path, flag, value, message):
    with pytest.raises(ValueError, match=message):
        _args(tmp_path, **{flag: value})


def test_persistent_workers_without_workers_are_dropped_not_refused_by_torch(tmp_path):
    # a recipe with persistent workers, run with --dataloader_num_workers 0 (torch's DataLoader refuses that pair)
    args = _args(tmp_path, dataloader_num_workers=0, dataloader_persistent_workers=True)
    assert args.dataloader_persistent_workers is False
    assert _args(tmp_path, dataloader_num_workers=1, dataloader_persistent_workers=True).dataloader_persistent_workers


def test_save_steps_zero_fails_at_parse_time_not_at_the_first_save(tmp_path):
    with pytest.raises(ValueError, match="--save_steps must be > 0"):
        _args(tmp_path, save_strategy="steps", save_steps=0)
    assert _args(tmp_path, num_train_epochs=0.0, do_train=False).num_train_epochs == 0  # evaluation only is fine


def test_too_few_images_for_one_optimizer_step_fail_with_what_to_change(tmp_path):
    from modeling_simmim.trainer import check_training_data_size

    args = _args(tmp_path, per_device_train_batch_size=16)
    with pytest.raises(
        ValueError,
        match=r"Only 12 training images: fewer than one global batch \(16 per process = 16\).*"
        r"Lower --per_device_train_batch_size to at most 12.*--dataloader_drop_last false",
    ):
        check_training_data_size(12, args)
    with pytest.raises(ValueError, match=r"\(Mixup/CutMix needs full batches\)"):
        check_training_data_size(12, args, "Mixup/CutMix")
    with pytest.raises(ValueError, match="no images"):
        check_training_data_size(0, args)
    check_training_data_size(16, args)  # one full batch: one step
    check_training_data_size(12, _args(tmp_path, per_device_train_batch_size=16, dataloader_drop_last=False))
    # Gradient accumulation: the sampler keeps whole global batches (8 x 4 = 32 images per optimizer step).
    accumulating = _args(tmp_path, per_device_train_batch_size=8, gradient_accumulation_steps=4)
    with pytest.raises(
        ValueError,
        match=r"Only 20 training images: fewer than one global batch \(8 per process x 4 "
        r"accumulation steps = 32\).*at most 5 or accumulate fewer steps",
    ):
        check_training_data_size(20, accumulating)
    check_training_data_size(32, accumulating)


def test_scheduler_without_an_optimizer_says_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="call create_optimizer first"):
        _trainer(tmp_path).create_scheduler(10)


def test_schedule_resolution_scales_lrs_by_total_batch_and_counts_epochs_in_steps(tmp_path):
    # Official Swin-B 100 ep at 128 images x 16 GPUs, ImageNet-1K (1,281,167 images, drop_last): 625 steps/epoch.
    args = _args(
        tmp_path,
        base_learning_rate=2e-4,
        warmup_learning_rate=1e-6,
        min_learning_rate=1e-5,
        warmup_epochs=10,
        num_train_epochs=100,
        per_device_train_batch_size=128,
    )
    schedule = args.resolve_schedule(total_batch_size=128 * 16, num_update_steps_per_epoch=1281167 // 2048)
    assert schedule.learning_rate == pytest.approx(8e-4)
    assert schedule.warmup_learning_rate == pytest.approx(4e-6)
    assert schedule.min_learning_rate == pytest.approx(4e-5)
    assert (schedule.num_warmup_steps, schedule.num_training_steps) == (6250, 62500)
    # gradient accumulation counts like more processes: 64 x 2 processes x 4 accumulation = 512 -> the base values
    same = args.resolve_schedule(total_batch_size=64 * 2 * 4, num_update_steps_per_epoch=100)
    assert same.learning_rate == pytest.approx(2e-4) and same.warmup_learning_rate == pytest.approx(1e-6)
    # --warmup_steps (int or ratio) overrides --warmup_epochs; --max_steps overrides the epochs
    assert _args(tmp_path, warmup_steps=7).resolve_schedule(512, 100).num_warmup_steps == 7
    assert _args(tmp_path, warmup_steps=0.1, max_steps=50).resolve_schedule(512, 100).num_warmup_steps == 5
    # no scaling when asked
    unscaled = _args(tmp_path, scale_learning_rate=False, base_learning_rate=3e-3).resolve_schedule(64, 10)
    assert unscaled.learning_rate == 3e-3


def test_a_run_shorter_than_its_warmup_is_named(tmp_path, caplog):
    # a short --max_steps trial of an epoch-based recipe: 2 warmup epochs of 22 steps, 10 steps in all
    with caplog.at_level("WARNING"):
        schedule = _args(tmp_path, warmup_epochs=2.0, max_steps=10).resolve_schedule(64, 22)
    assert schedule.num_warmup_steps == 44 and "Warmup (44 steps) is as long as the run (10 steps)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        _args(tmp_path, warmup_epochs=2.0, max_steps=100).resolve_schedule(64, 22)
    assert "Warmup" not in caplog.text


# ---- training loop -------------------------------------------------------------------------------------------------
def _expected_lr(schedule: SimMIMSchedule, step: int) -> float:
    return simmim_lr_at(
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


def test_cosine_lr_logged_every_step_equals_the_official_formula(tmp_path):
    trainer = _trainer(
        tmp_path,
        num_train_epochs=3,
        warmup_epochs=1,
        base_learning_rate=0.05,
        warmup_learning_rate=1e-3,
        min_learning_rate=5e-3,
    )
    logs = _train_logs(trainer)
    schedule = trainer.schedule
    scale = IMAGES // (IMAGES // BATCH) / 512
    assert schedule.learning_rate == pytest.approx(0.05 * scale)
    assert (schedule.num_warmup_steps, schedule.num_training_steps) == (4, 12)
    assert [entry["step"] for entry in logs] == list(range(1, 13))
    for entry in logs:
        # the lr logged at step s is the one the optimizer used for its s-th update (iteration s - 1)
        assert entry["learning_rate"] == pytest.approx(_expected_lr(schedule, entry["step"] - 1), rel=1e-9)
        assert entry["grad_norm"] > 0 and entry["images_per_second"] > 0
    assert logs[0]["learning_rate"] == pytest.approx(1e-3 * scale)  # warmup starts at warmup_lr, not at 0
    assert trainer.args.learning_rate == pytest.approx(schedule.learning_rate)  # saved args show the real lr


def test_multistep_lr_decays_at_the_milestone_epochs(tmp_path):
    trainer = _trainer(
        tmp_path,
        num_train_epochs=3,
        warmup_epochs=1,
        lr_scheduler_type="multistep",
        lr_milestones=[2],
        lr_gamma=0.1,
        base_learning_rate=0.05,
        warmup_learning_rate=1e-3,
    )
    logs = _train_logs(trainer)
    assert trainer.schedule.milestones == (8,)
    peak = trainer.schedule.learning_rate
    by_step = {entry["step"]: entry["learning_rate"] for entry in logs}
    assert by_step[5] == pytest.approx(peak) and by_step[8] == pytest.approx(peak)  # iterations 4..7
    assert by_step[9] == pytest.approx(peak * 0.1) and by_step[12] == pytest.approx(peak * 0.1)
    for step, lr in by_step.items():
        assert lr == pytest.approx(_expected_lr(trainer.schedule, step - 1))


def test_grad_norm_is_logged_before_clipping_and_without_clipping(tmp_path):
    clipped = _train_logs(_trainer(tmp_path / "a", max_steps=3, max_grad_norm=1e-6, warmup_steps=1))
    assert all(entry["grad_norm"] > 1e-3 for entry in clipped)  # the pre-clip norm, not the clip value
    unclipped = _train_logs(_trainer(tmp_path / "b", max_steps=3, max_grad_norm=0.0, warmup_steps=1))
    assert all(entry["grad_norm"] > 1e-3 for entry in unclipped)
    assert unclipped[0]["grad_norm"] == pytest.approx(clipped[0]["grad_norm"], rel=1e-4)  # same first step


def test_layer_decay_groups_and_logged_lrs(tmp_path):
    trainer = _trainer(tmp_path, max_steps=2, warmup_steps=1, layer_decay=0.5, base_learning_rate=0.05)
    logs = _train_logs(trainer)
    lrs = [group["lr"] for group in trainer.optimizer.param_groups]
    num_layers = 2  # swin_test: depths [1, 1]
    assert max(lrs) / min(lrs) == pytest.approx(0.5 ** -(num_layers + 1))
    # the logged lr is the head's (largest), the smallest is logged too
    assert logs[-1]["learning_rate"] == pytest.approx(_expected_lr(trainer.schedule, 1))
    assert logs[-1]["learning_rate_min"] == pytest.approx(logs[-1]["learning_rate"] * 0.5 ** (num_layers + 1))
    # official no-weight-decay rule: the mask token is in a wd-0 group
    mask_token = trainer.model.swin.embeddings.mask_token
    group = next(g for g in trainer.optimizer.param_groups if any(p is mask_token for p in g["params"]))
    assert group["weight_decay"] == 0.0


def test_extra_weight_decay_exclusions_reach_the_optimizer(tmp_path):
    def table_decay(trainer):
        trainer.create_optimizer()
        tables = [p for n, p in trainer.model.named_parameters() if "relative_position_bias_table" in n]
        return {
            g["weight_decay"]
            for g in trainer.optimizer.param_groups
            for p in g["params"]
            if any(p is table for table in tables)
        }

    assert table_decay(_trainer(tmp_path, max_steps=1)) == {0.05}  # official pretraining decays the tables
    excluded = _trainer(tmp_path, max_steps=1, no_weight_decay_keywords=["relative_position_bias_table"])
    assert table_decay(excluded) == {0.0}


def test_evaluation_loss_is_reported_and_deterministic(tmp_path):
    trainer = _trainer(tmp_path, eval_images=6, max_steps=1, warmup_steps=1)
    first, second = trainer.evaluate(), trainer.evaluate()
    assert "eval_loss" in first and first["eval_loss"] == second["eval_loss"]


def test_skipped_images_are_counted_once_however_often_they_are_drawn(tmp_path):
    trainer = _trainer(tmp_path, max_steps=8, warmup_steps=1)  # two epochs
    collator = trainer.data_collator

    def dropping_collator(examples):  # the same two unreadable images in every batch, and one without an index
        return collator([UnreadableImage(3, "a.png"), UnreadableImage(7, "b.png"), *examples[2:]])

    trainer.data_collator = dropping_collator
    logs = _train_logs(trainer)
    assert trainer.num_skipped_images == 2 and trainer.total_skipped_images() == 2
    assert logs[-1]["num_skipped_images"] == 2
    # evaluation batches count too; an image without a known index counts each time it is met
    batch = collator([{"pixel_values": torch.randn(3, 64, 64)} for _ in range(2)])
    batch[SKIPPED_KEY] = torch.tensor([-1])
    trainer.prediction_step(trainer.model, batch, prediction_loss_only=True)
    assert SKIPPED_KEY not in batch and trainer.num_skipped_images == 3


def test_throughput_excludes_evaluation_and_saving_time(monkeypatch):
    clock = [100.0]  # a controlled clock: the test must not depend on how busy the machine is
    monkeypatch.setattr("modeling_simmim.trainer.time.perf_counter", lambda: clock[0])
    meter = ThroughputCallback(num_processes=2)
    meter.on_train_begin(None, None, None)
    meter.add_images(50)
    clock[0] += 0.05  # the step
    meter.on_step_end(None, None, None)
    clock[0] += 0.3  # "evaluation"
    meter.on_evaluate(None, None, None)
    assert meter.images_per_second() == pytest.approx(50 * 2 / 0.05)  # 100 images (2 processes) in 0.05 s
    assert meter.images_per_second() is None  # restarted
