"""The per-step policy of SimMIMTrainer (modeling_simmim/step_guard.py): non-finite steps skipped with weights and
optimizer state untouched, counted, logged honestly, a streak stops the run; non-finite weights never saved;
SIGTERM/SIGUSR1 save at the next step boundary and stop."""

import copy
import math
import os
import re
import signal

import pytest
import torch
from transformers import TrainerCallback

from modeling_simmim import SimMIMConfig, SimMIMDataCollator, SimMIMForMaskedImageModeling, SimMIMMaskGenerator
from modeling_simmim.data import IndexSeededMasks, PretrainCollator
from modeling_simmim.step_guard import (
    PREEMPTED_EXIT_CODE,
    NonFiniteTrainingError,
    NonFiniteWeightsError,
    StepGuardCallback,
)
from modeling_simmim.trainer import SimMIMTrainer, SimMIMTrainingArguments, train_and_evaluate
from modeling_simmim.training_checkpoints import checkpoint_problems

IMAGES, BATCH = 16, 4  # 4 optimizer steps per epoch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _trainer(tmp_path, images=None, callbacks=(), eval_images=0, **overrides):
    torch.manual_seed(0)
    config = SimMIMConfig.from_preset("swin_test", mask_patch_size=16)
    generator = SimMIMMaskGenerator(64, 16, config.model_patch_size, 0.6)
    if images is None:
        images = [torch.randn(3, 64, 64) for _ in range(IMAGES)]
    masks = IndexSeededMasks(generator, seed=0)
    evaluation = [{"pixel_values": torch.randn(3, 64, 64), **masks(i, {})} for i in range(eval_images)] or None
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=BATCH,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        warmup_steps=1,
        base_learning_rate=0.05,
        do_eval=False,
    )
    values.update(overrides)
    return SimMIMTrainer(
        model=SimMIMForMaskedImageModeling(config),
        args=SimMIMTrainingArguments(**values),
        train_dataset=[{"pixel_values": image} for image in images],
        eval_dataset=evaluation,
        data_collator=PretrainCollator(SimMIMDataCollator(generator)),
        callbacks=list(callbacks),
    )


def _train_logs(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


class _Snapshots(TrainerCallback):
    """Weights and AdamW state before and after every optimizer step."""

    def __init__(self):
        self.before, self.after = {}, {}

    @staticmethod
    def _state(model, optimizer):
        weights = {name: p.detach().clone() for name, p in model.named_parameters()}
        moments = copy.deepcopy({id(p): dict(state) for p, state in optimizer.state.items()})
        return weights, [moments[key] for key in sorted(moments)]

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.before[state.global_step + 1] = self._state(model, optimizer)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.after[state.global_step] = self._state(model, optimizer)


def _same(first, second):
    (weights_a, moments_a), (weights_b, moments_b) = first, second
    if any(not torch.equal(weights_a[name], weights_b[name]) for name in weights_a) or len(moments_a) != len(
        moments_b
    ):
        return False
    return all(
        torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key]))
        for a, b in zip(moments_a, moments_b)
        for key in a
    )


def test_a_nan_pixel_skips_that_update_only_and_is_counted_and_logged_honestly(tmp_path, caplog):
    images = [torch.randn(3, 64, 64) for _ in range(IMAGES)]
    images[5][1, 10, 20] = float("nan")  # one pixel of one image: its batch's loss is NaN
    snapshots = _Snapshots()
    trainer = _trainer(tmp_path, images, callbacks=[snapshots], max_steps=4)
    with caplog.at_level("WARNING"):
        result = trainer.train()
    logs = _train_logs(trainer)
    skipped = [entry["step"] for entry in logs if math.isnan(entry["loss"])]
    assert len(skipped) == 1 and trainer.step_guard.nonfinite_steps == 1
    step = skipped[0]
    assert _same(snapshots.before[step], snapshots.after[step])  # weights AND AdamW moments/step untouched
    for other in set(range(1, 5)) - {step}:
        assert not _same(snapshots.before[other], snapshots.after[other])
    assert [entry["nonfinite_steps"] for entry in logs] == [0 if entry["step"] < step else 1 for entry in logs]
    assert all(entry["loss"] > 0 for entry in logs if entry["step"] != step)  # no 0.0 in place of NaN
    finite = [entry["loss"] for entry in logs if entry["step"] != step]
    assert result.metrics["train_loss"] == pytest.approx(sum(finite) / 3, rel=1e-5)  # the applied steps' mean
    assert result.metrics["nonfinite_steps"] == 1
    assert f"at step {step}, lr" in caplog.text and "update skipped" in caplog.text
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


@pytest.mark.parametrize("max_grad_norm", [5.0, 0.0])
def test_an_infinite_gradient_with_a_finite_loss_is_caught_with_or_without_clipping(tmp_path, max_grad_norm):
    trainer = _trainer(tmp_path, max_steps=3, max_grad_norm=max_grad_norm, max_nonfinite_steps=2)
    parameter = (
        trainer.model.decoder[0].weight if hasattr(trainer.model, "decoder") else next(trainer.model.parameters())
    )
    parameter.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(NonFiniteTrainingError) as error:
        trainer.train()
    message = str(error.value)
    assert "2 optimizer steps in a row" in message and "step 2, lr " in message and "grad norm inf" in message
    assert "--max_nonfinite_steps 2" in message and "--base_learning_rate" in message
    assert re.search(r"loss [0-9.]+, grad norm inf", message)  # the loss itself was finite


def test_a_diverging_run_stops_naming_step_lr_and_grad_norm_and_saves_nothing(tmp_path):
    nan_images = [torch.full((3, 64, 64), float("nan")) for _ in range(IMAGES)]
    trainer = _trainer(tmp_path, nan_images, max_steps=8, max_nonfinite_steps=3)
    start = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    with pytest.raises(
        NonFiniteTrainingError,
        match=r"3 optimizer steps in a row .* step 3, lr [0-9.e+-]+, "
        r"loss nan, grad norm nan\. The weights are those of step 0",
    ):
        train_and_evaluate(trainer, trainer.train_dataset, None, do_train=True, save_model=True)
    assert all(torch.equal(start[name], p) for name, p in trainer.model.named_parameters())
    assert not os.path.exists(tmp_path / "model.safetensors")
    logs = _train_logs(trainer)
    assert [entry["nonfinite_steps"] for entry in logs] == [1, 2] and all(math.isnan(e["loss"]) for e in logs)


def test_a_model_with_non_finite_weights_is_never_saved(tmp_path):
    trainer = _trainer(tmp_path, max_steps=1)
    with torch.no_grad():
        trainer.model.decoder[0].bias[3] = float("inf")
    with pytest.raises(NonFiniteWeightsError, match=r"decoder\.0\.bias"):
        trainer.save_model()
    assert not os.listdir(tmp_path) or "model.safetensors" not in os.listdir(tmp_path)


def test_max_nonfinite_steps_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="--max_nonfinite_steps must be > 0"):
        SimMIMTrainingArguments(output_dir=str(tmp_path), max_nonfinite_steps=0)
    with pytest.raises(ValueError, match="--max_nonfinite_steps must be >= 1"):
        StepGuardCallback(max_nonfinite_steps=0)


class _SignalAt(TrainerCallback):
    def __init__(self, step, signum):
        self.step, self.signum = step, signum
        self.saves = 0

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), self.signum)

    def on_save(self, args, state, control, **kwargs):
        self.saves += 1


@pytest.mark.parametrize(("signum", "strategy"), [(signal.SIGUSR1, "steps"), (signal.SIGTERM, "epoch")])
def test_a_stop_signal_saves_at_the_next_step_boundary_and_exits_143(tmp_path, signum, strategy):
    received = []
    # Should the trainer not handle it, this test's own handler records the signal instead of ending pytest.
    previous = signal.signal(signum, lambda *_: received.append(signum))
    signaller = _SignalAt(3, signum)
    try:
        # 4 steps per epoch: the stop at step 4 is also an epoch end, where the epoch strategy would save and evaluate
        schedule = (
            {"save_strategy": "no", "eval_strategy": "steps", "eval_steps": 4}
            if strategy == "steps"
            else {"save_strategy": "epoch", "eval_strategy": "epoch"}
        )
        trainer = _trainer(tmp_path, callbacks=[signaller], max_steps=8, eval_images=4, **schedule)
        with pytest.raises(SystemExit) as exit_info:
            train_and_evaluate(trainer, trainer.train_dataset, None, do_train=True, save_model=True)
        assert signal.getsignal(signum) is not trainer.step_guard.signals._handle  # handler removed after training
    finally:
        signal.signal(signum, previous)
    assert received == [] and exit_info.value.code == PREEMPTED_EXIT_CODE
    assert trainer.stop_signal == signum.name and trainer.state.global_step == 4  # the step after the signal
    assert trainer.last_checkpoint == str(tmp_path / "checkpoint-4")
    assert checkpoint_problems(trainer.last_checkpoint) == []  # saved (also with --save_strategy no) ...
    assert signaller.saves == 1  # ... once
    assert not any("eval_loss" in entry for entry in trainer.state.log_history)  # step 4's evaluation skipped
    assert not os.path.exists(tmp_path / "model.safetensors")  # no final model for a stopped run
