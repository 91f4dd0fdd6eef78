"""Checkpoint validation, resume selection and atomic writing (modeling_simmim/training_checkpoints.py and
SimMIMTrainer._save_checkpoint): incomplete folders are named with the reason, the newest complete one wins, a
checkpoint is never visible half-written, rotation and best-model tracking keep working. Real kills:
tests/test_preemption.py."""

import json
import logging
import os

import pytest
import torch
from safetensors.torch import save_file

import run_mim
from modeling_simmim import SimMIMConfig, SimMIMDataCollator, SimMIMForMaskedImageModeling, SimMIMMaskGenerator
from modeling_simmim.data import IndexSeededMasks, PretrainCollator
from modeling_simmim.trainer import SimMIMTrainer, SimMIMTrainingArguments
from modeling_simmim.training_checkpoints import (
    STAGING_DIR,
    checkpoint_problems,
    find_resumable_checkpoint,
    holds_only_run_artifacts,
    publish_checkpoint,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _complete_checkpoint(folder, step=3):
    """The files of a Trainer checkpoint (small but real formats)."""
    os.makedirs(folder, exist_ok=True)
    save_file({"w": torch.arange(6.0)}, os.path.join(folder, "model.safetensors"))
    torch.save({"state": {}}, os.path.join(folder, "optimizer.pt"))
    torch.save({"last_epoch": step}, os.path.join(folder, "scheduler.pt"))
    torch.save({"cpu": torch.get_rng_state()}, os.path.join(folder, "rng_state.pth"))
    with open(os.path.join(folder, "trainer_state.json"), "w") as handle:
        json.dump({"global_step": step}, handle)
    with open(os.path.join(folder, "config.json"), "w") as handle:
        json.dump({"model_type": "simmim"}, handle)
    return str(folder)


def _truncate(path, keep):
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[:keep])


def test_checkpoint_problems_name_what_is_missing_or_damaged(tmp_path):
    assert checkpoint_problems(_complete_checkpoint(tmp_path / "ok")) == []
    assert checkpoint_problems(str(tmp_path / "absent")) == ["not a folder"]
    (tmp_path / "empty").mkdir()
    assert checkpoint_problems(str(tmp_path / "empty")) == ["empty folder"]

    def problems_after(name, damage):
        folder = _complete_checkpoint(tmp_path / name)
        damage(folder)
        return checkpoint_problems(folder)

    assert problems_after("no_state", lambda f: os.remove(os.path.join(f, "trainer_state.json"))) == [
        "no trainer_state.json"
    ]
    assert problems_after("empty_optimizer", lambda f: _truncate(os.path.join(f, "optimizer.pt"), 0)) == [
        "optimizer.pt is empty (0 bytes)"
    ]
    assert problems_after("cut_optimizer", lambda f: _truncate(os.path.join(f, "optimizer.pt"), 100)) == [
        "optimizer.pt is truncated (not a complete torch.save archive)"
    ]
    size = os.path.getsize(_complete_checkpoint(tmp_path / "probe") + "/model.safetensors")
    assert problems_after("cut_weights", lambda f: _truncate(os.path.join(f, "model.safetensors"), size - 4)) == [
        "model.safetensors is truncated"
    ]
    assert problems_after("no_weights", lambda f: os.remove(os.path.join(f, "model.safetensors"))) == [
        "no model weights (model.safetensors)"
    ]
    assert problems_after("cut_state", lambda f: _truncate(os.path.join(f, "trainer_state.json"), 5)) == [
        "trainer_state.json is not valid JSON (JSONDecodeError)"
    ]

    def shard_lost(folder):
        os.rename(os.path.join(folder, "model.safetensors"), os.path.join(folder, "model-00001-of-00002.safetensors"))
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as handle:
            json.dump(
                {"weight_map": {"w": "model-00001-of-00002.safetensors", "v": "model-00002-of-00002.safetensors"}},
                handle,
            )

    assert problems_after("sharded", shard_lost) == [
        "no model-00002-of-00002.safetensors (listed in model.safetensors.index.json)"
    ]
    no_scheduler = problems_after("no_scheduler", lambda f: os.remove(os.path.join(f, "scheduler.pt")))
    assert no_scheduler == ["no scheduler state (scheduler.pt)"]
    # --save_only_model checkpoints have no optimizer or scheduler by design
    only_model = _complete_checkpoint(tmp_path / "only_model")
    os.remove(os.path.join(only_model, "optimizer.pt"))
    os.remove(os.path.join(only_model, "scheduler.pt"))
    assert checkpoint_problems(only_model, require_optimizer=False) == []
    assert len(checkpoint_problems(only_model)) == 2


def test_the_newest_complete_checkpoint_is_chosen_and_newer_incomplete_ones_reported(tmp_path):
    _complete_checkpoint(tmp_path / "checkpoint-5", 5)
    _complete_checkpoint(tmp_path / "checkpoint-15", 15)
    (tmp_path / "checkpoint-20").mkdir()  # killed right after mkdir (in-place writers)
    partial = _complete_checkpoint(tmp_path / "checkpoint-18", 18)  # killed while writing the optimizer
    _truncate(os.path.join(partial, "optimizer.pt"), 0)
    os.remove(os.path.join(partial, "trainer_state.json"))
    (tmp_path / "checkpoint-notes").mkdir()  # not a checkpoint name: ignored
    found, skipped = find_resumable_checkpoint(str(tmp_path))
    assert found == str(tmp_path / "checkpoint-15")
    assert [(os.path.basename(s.path), s.reason) for s in skipped] == [
        ("checkpoint-20", "empty folder"),
        ("checkpoint-18", "optimizer.pt is empty (0 bytes); no trainer_state.json"),
    ]
    assert find_resumable_checkpoint(str(tmp_path / "nothing")) == (None, [])


def test_output_folder_with_only_incomplete_checkpoints_starts_fresh_with_a_warning(tmp_path, caplog):
    def resume_point(folder):
        return run_mim.check_output_dir(run_mim.parse_args(["--output_dir", str(folder)])[2])

    (tmp_path / "a" / "checkpoint-20").mkdir(parents=True)
    (tmp_path / "a" / "reconstructions").mkdir()
    with caplog.at_level(logging.WARNING):
        assert resume_point(tmp_path / "a") is None
    assert "Skipping incomplete checkpoint" in caplog.text and "checkpoint-20: empty folder" in caplog.text
    assert "No complete checkpoint" in caplog.text and "starts from scratch" in caplog.text
    # an interrupted run killed before its first checkpoint: its grids and a staged save only
    (tmp_path / "b" / STAGING_DIR / "checkpoint-5").mkdir(parents=True)
    (tmp_path / "b" / "reconstructions").mkdir()
    assert holds_only_run_artifacts(str(tmp_path / "b"))
    assert resume_point(tmp_path / "b") is None
    # someone else's files: refused, as before
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty and has no checkpoint"):
        resume_point(tmp_path / "b")
    # a complete checkpoint below an incomplete one: resumed from
    _complete_checkpoint(tmp_path / "a" / "checkpoint-10", 10)
    assert resume_point(tmp_path / "a") == str(tmp_path / "a" / "checkpoint-10")


def test_publish_replaces_an_existing_folder_atomically(tmp_path):
    staged = _complete_checkpoint(tmp_path / STAGING_DIR / "checkpoint-4", 4)
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "optimizer.pt").write_bytes(b"")  # an incomplete older writer's folder
    publish_checkpoint(staged, str(tmp_path / "checkpoint-4"))
    assert checkpoint_problems(str(tmp_path / "checkpoint-4")) == []
    assert os.listdir(tmp_path / STAGING_DIR) == []


# ---- through the trainer ------------------------------------------------------------------------------------------
def _trainer(tmp_path, **overrides):
    torch.manual_seed(0)
    config = SimMIMConfig.from_preset("swin_test", mask_patch_size=16)
    generator = SimMIMMaskGenerator(64, 16, config.model_patch_size, 0.6)
    masks = IndexSeededMasks(generator, seed=0)
    values = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=4,
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        warmup_steps=1,
        base_learning_rate=0.5,
    )
    values.update(overrides)
    return SimMIMTrainer(
        model=SimMIMForMaskedImageModeling(config),
        args=SimMIMTrainingArguments(**values),
        train_dataset=[{"pixel_values": torch.randn(3, 64, 64)} for _ in range(16)],
        eval_dataset=[{"pixel_values": torch.randn(3, 64, 64), **masks(i, {})} for i in range(4)],
        data_collator=PretrainCollator(SimMIMDataCollator(generator)),
    )


def test_rotation_and_best_model_tracking_work_with_staged_checkpoints(tmp_path):
    # "best" = the highest evaluation loss: an early checkpoint, which rotation must keep and the end must load
    trainer = _trainer(
        tmp_path,
        max_steps=6,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    evals = {entry["step"]: entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry}
    best_step = max(evals, key=evals.get)
    assert best_step < 5 and best == str(tmp_path / f"checkpoint-{best_step}")
    kept = sorted(name for name in os.listdir(tmp_path) if name.startswith("checkpoint-"))
    assert kept == sorted([f"checkpoint-{best_step}", "checkpoint-6"])  # limit 2: the best and the last
    for name in kept:
        assert checkpoint_problems(str(tmp_path / name)) == []
        with open(tmp_path / name / "trainer_state.json") as handle:
            recorded = json.load(handle)["best_model_checkpoint"]
        assert STAGING_DIR not in recorded and os.path.isdir(recorded)  # points at a published folder
    assert not (tmp_path / STAGING_DIR).exists()
    # load_best_model_at_end loaded the best weights
    from safetensors.torch import load_file

    best_weights = load_file(str(tmp_path / f"checkpoint-{best_step}" / "model.safetensors"))
    current = trainer.model.state_dict()
    assert all(torch.equal(current[name], tensor) for name, tensor in best_weights.items())


def test_a_save_that_fails_midway_leaves_no_visible_checkpoint(tmp_path):
    trainer = _trainer(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, do_eval=False)
    save_optimizer = trainer._save_optimizer_and_scheduler

    def failing_second_save(output_dir):
        if output_dir.endswith("checkpoint-4"):
            raise OSError("No space left on device")
        save_optimizer(output_dir)

    trainer._save_optimizer_and_scheduler = failing_second_save
    with pytest.raises(OSError, match="No space left"):
        trainer.train()
    assert checkpoint_problems(str(tmp_path / "checkpoint-2")) == []
    assert not (tmp_path / "checkpoint-4").exists()
    assert find_resumable_checkpoint(str(tmp_path))[0] == str(tmp_path / "checkpoint-2")
