"""Same command, same seed -> bitwise identical weights (CPU, 1 process), and a run killed with SIGKILL then started
again with the same command ends with the weights of an uninterrupted run: pretraining and finetuning (Mixup/CutMix,
RandAugment, random erasing and stochastic depth on).

Default suite: the runs are in-process `main(argv)` calls and the killed run is a forked child of the test process (a
real SIGKILL, no re-import). `-m slow`: fresh interpreters (`python run_mim.py ...`), as a user runs them, with the
resumed run on 2 persistent DataLoader workers.
"""

import json
import multiprocessing
import os
import signal
import subprocess
import sys

import kill_at_step
import pytest
import torch
from safetensors.torch import load_file

import run_image_classification
import run_mim
from modeling_simmim import SimMIMConfig, SimMIMForMaskedImageModeling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.dirname(os.path.abspath(__file__))
COMMON = [
    "--use_cpu",
    "--disable_tqdm",
    "true",
    "--report_to",
    "none",
    "--logging_steps",
    "1",
    "--seed",
    "3",
    "--save_strategy",
    "steps",
    "--save_steps",
    "2",
    "--dataloader_num_workers",
    "0",
]
# 12 images in batches of 4: 3 optimizer steps per epoch; 7 steps cross two epoch boundaries. Killed at the end of
# step 5, a run restarts from checkpoint-4: in epoch 1, one batch into it (the mid-epoch skip path).
PRETRAIN = [
    *COMMON,
    "--model_preset",
    "swin_test",
    "--mask_patch_size",
    "16",
    "--per_device_train_batch_size",
    "4",
    "--max_train_samples",
    "12",
    "--max_eval_samples",
    "8",
    "--max_steps",
    "7",
    "--warmup_steps",
    "2",
    "--base_learning_rate",
    "0.05",
    "--backbone_config_overrides",
    '{"drop_path_rate": 0.1}',
]
FINETUNE = [
    *COMMON,
    "--image_size",
    "32",
    "--per_device_train_batch_size",
    "4",
    "--per_device_eval_batch_size",
    "8",
    "--max_train_samples",
    "12",
    "--max_eval_samples",
    "8",
    "--max_steps",
    "7",
    "--warmup_steps",
    "2",
    "--base_learning_rate",
    "1e-3",
    "--scale_learning_rate",
    "false",
    "--drop_path_rate",
    "0.1",
    "--random_erasing",
    "0.5",
    "--eval_strategy",
    "steps",
    "--eval_steps",
    "2",
    "--drop_empty_classes",
    "true",
]  # 12 images do not cover the 10 digits
KILL_STEP, RESUMED_FROM = 5, "checkpoint-4"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mim")
    SimMIMForMaskedImageModeling(
        SimMIMConfig.from_preset("swin_test", image_size=32, mask_patch_size=16)
    ).save_pretrained(folder)
    return str(folder)


def _weights(output_dir, name="model.safetensors"):
    return load_file(os.path.join(output_dir, name))


def _assert_bitwise_equal(first, second):
    assert first.keys() == second.keys()
    different = [name for name in first if not torch.equal(first[name], second[name])]
    assert not different, f"{len(different)} of {len(first)} tensors differ, e.g. {different[:3]}"


def _train_logs(output_dir):
    with open(os.path.join(output_dir, "trainer_state.json")) as handle:
        return [entry for entry in json.load(handle)["log_history"] if "loss" in entry]


def _losses(output_dir):
    return [(entry["step"], entry["loss"]) for entry in _train_logs(output_dir)]


def _killed_in_a_forked_child(main, argv):
    def child():
        kill_at_step.install(KILL_STEP)
        main(argv)

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(timeout=300)
    if process.is_alive():  # never leave it behind, whatever happened
        process.kill()
        process.join()
    return process.exitcode


def _check_killed_run(output_dir, exitcode):
    assert exitcode == -signal.SIGKILL
    checkpoints = sorted(name for name in os.listdir(output_dir) if name.startswith("checkpoint-"))
    assert checkpoints[-1] == RESUMED_FROM and not os.path.exists(os.path.join(output_dir, "model.safetensors"))


def _check_resumed(output_dir):
    """The run trained steps 5-7 only: the Trainer's train_loss averages the steps of its own call. (A run that started
    over would end with the same weights too, being reproducible: this tells the two apart.)"""
    with open(os.path.join(output_dir, "train_results.json")) as handle:
        train_loss = json.load(handle)["train_loss"]
    losses = [loss for _, loss in _losses(output_dir)]
    assert train_loss == pytest.approx(sum(losses[KILL_STEP - 1 :]) / (len(losses) - KILL_STEP + 1), rel=1e-6)
    assert train_loss != pytest.approx(sum(losses) / len(losses), rel=1e-6)


def _check_same_model(reference, other):
    _assert_bitwise_equal(_weights(reference), _weights(other))
    assert _losses(reference) == _losses(other) and len(_losses(reference)) == 7
    # not vacuous: every step moved the weights (AdamW with a positive lr and a non-zero gradient)
    assert all(entry["learning_rate"] > 0 and entry["grad_norm"] > 0 for entry in _train_logs(reference))


# ---- default suite: in-process runs, a forked child killed ---------------------------------------------------------
def test_pretraining_is_reproducible_and_resumes_exactly_after_sigkill(tmp_path):
    def run(name):
        return run_mim.main([*PRETRAIN, "--output_dir", str(tmp_path / name)])

    first, second = run("first"), run("second")
    _check_same_model(tmp_path / "first", tmp_path / "second")
    assert first["eval_loss"] == second["eval_loss"]

    killed = str(tmp_path / "killed")
    _check_killed_run(killed, _killed_in_a_forked_child(run_mim.main, [*PRETRAIN, "--output_dir", killed]))
    resumed = run("killed")  # the same command again: resumes from checkpoint-4
    _check_resumed(killed)
    _check_same_model(tmp_path / "first", killed)
    assert resumed["eval_loss"] == first["eval_loss"]


def test_finetuning_with_mixup_randaugment_and_erasing_is_reproducible_and_resumes_exactly(tmp_path, pretrained):
    argv = [*FINETUNE, "--model_name_or_path", pretrained]

    def run(name):
        return run_image_classification.main([*argv, "--output_dir", str(tmp_path / name)])

    first, second = run("first"), run("second")
    _check_same_model(tmp_path / "first", tmp_path / "second")
    assert first["eval_accuracy"] == second["eval_accuracy"]

    killed = str(tmp_path / "killed")
    _check_killed_run(
        killed, _killed_in_a_forked_child(run_image_classification.main, [*argv, "--output_dir", killed])
    )
    resumed = run("killed")
    _check_resumed(killed)
    _check_same_model(tmp_path / "first", killed)
    assert resumed["eval_accuracy"] == first["eval_accuracy"]


# ---- slow: fresh interpreters, as a user runs them -----------------------------------------------------------------
def _script(script, argv, kill=False):
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
    }
    prefix = [os.path.join(HERE, "kill_at_step.py"), str(KILL_STEP)] if kill else []
    return subprocess.run(
        [sys.executable, *prefix, os.path.join(ROOT, script), *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=1200,
    )


@pytest.mark.slow
@pytest.mark.parametrize("script", ["run_mim.py", "run_image_classification.py"])
def test_fresh_processes_same_command_same_weights_and_exact_resume(tmp_path, script, pretrained):
    argv = PRETRAIN if script == "run_mim.py" else [*FINETUNE, "--model_name_or_path", pretrained]
    for name in ("first", "second"):
        result = _script(script, [*argv, "--output_dir", str(tmp_path / name)])
        assert result.returncode == 0, result.stderr[-3000:]
    _check_same_model(tmp_path / "first", tmp_path / "second")

    killed = str(tmp_path / "killed")
    result = _script(script, [*argv, "--output_dir", killed], kill=True)
    _check_killed_run(killed, result.returncode)
    # resumed with 2 persistent DataLoader workers: neither workers nor the resume change the data
    result = _script(
        script,
        [*argv, "--output_dir", killed, "--dataloader_num_workers", "2", "--dataloader_persistent_workers", "true"],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    _check_resumed(killed)
    _check_same_model(tmp_path / "first", killed)
