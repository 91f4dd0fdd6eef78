"""Real signals against real runs: SIGKILL at any moment (mid-step, during a checkpoint save), SIGTERM/SIGUSR1 (save
at the next step boundary, exit 143), and the same command again resuming from the newest complete checkpoint.
The killed runs are subprocesses of tests/scripted_run_mim.py (run_mim.main with test-only slow-downs); the
relaunches run in-process."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import run_mim
from modeling_simmim.step_guard import PREEMPTED_EXIT_CODE
from modeling_simmim.training_checkpoints import STAGING_DIR, checkpoint_problems

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tests", "scripted_run_mim.py")
# 32 images / batch 8 = 4 steps per epoch; 8 steps; a checkpoint every 2 steps
RUN = [
    "--model_preset",
    "swin_test",
    "--mask_patch_size",
    "16",
    "--per_device_train_batch_size",
    "8",
    "--max_train_samples",
    "32",
    "--max_steps",
    "8",
    "--warmup_steps",
    "1",
    "--save_strategy",
    "steps",
    "--save_steps",
    "2",
    "--do_eval",
    "false",
    "--logging_steps",
    "1",
    "--use_cpu",
    "--disable_tqdm",
    "true",
    "--report_to",
    "none",
    "--dataloader_num_workers",
    "0",
    "--torch_num_threads",
    "1",
]
WAIT_SECONDS = 600  # a fresh interpreter imports torch + transformers: slow on a busy machine


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _start(output_dir, events, **env):
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "SIMMIM_TEST_EVENTS": str(events),
        **{key: str(value) for key, value in env.items()},
    }
    log = open(os.path.join(events.parent, f"{events.name}.log"), "w")
    process = subprocess.Popen(
        [sys.executable, SCRIPT, *RUN, "--output_dir", str(output_dir)],
        cwd=ROOT,
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return process, log


def _wait_for(path, process, log):
    deadline = time.monotonic() + WAIT_SECONDS
    while not os.path.exists(path):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            log.close()
            with open(log.name) as handle:
                pytest.fail(f"{path} never appeared (rc {process.returncode}):\n{handle.read()[-3000:]}")
        time.sleep(0.2)


def _final_step(output_dir):
    with open(os.path.join(output_dir, "trainer_state.json")) as handle:
        return json.load(handle)["global_step"]


def test_sigkill_mid_step_and_during_a_save_then_resume_from_the_newest_complete_checkpoint(tmp_path, caplog):
    output_dir = tmp_path / "run"
    # 1. killed at an arbitrary moment: during step 3, after checkpoint-2 was published
    process, log = _start(output_dir, tmp_path / "first", SIMMIM_TEST_STEP_SECONDS=1)
    _wait_for(tmp_path / "first" / "step-0-3", process, log)
    process.send_signal(signal.SIGKILL)
    process.wait()
    log.close()
    assert checkpoint_problems(str(output_dir / "checkpoint-2")) == []

    # 2. the same command resumes from checkpoint-2, and is killed while it writes checkpoint-4
    process, log = _start(output_dir, tmp_path / "second", SIMMIM_TEST_SLOW_SAVE_STEP=4)
    _wait_for(tmp_path / "second" / "saving-4", process, log)
    process.send_signal(signal.SIGKILL)
    process.wait()
    log.close()
    with open(log.name) as handle:
        assert "Resuming from " + str(output_dir / "checkpoint-2") in handle.read()
    assert not (output_dir / "checkpoint-4").exists()  # never visible half-written ...
    assert (output_dir / STAGING_DIR / "checkpoint-4" / "model.safetensors").exists()  # ... it was being written

    # checkpoints damaged by other means (written in place by another tool, a full disk): newer but incomplete
    (output_dir / "checkpoint-6").mkdir()
    (output_dir / "checkpoint-5").mkdir()
    (output_dir / "checkpoint-5" / "optimizer.pt").write_bytes(b"")

    # 3. the same command again: skips 6 and 5 (saying why), resumes from 2, finishes; no staging left
    with caplog.at_level("INFO"):
        run_mim.main([*RUN, "--output_dir", str(output_dir)])
    messages = [record.getMessage() for record in caplog.records]
    assert any("checkpoint-6: empty folder" in message for message in messages), messages
    assert any(
        "checkpoint-5: optimizer.pt is empty (0 bytes); no trainer_state.json" in message for message in messages
    ), messages
    assert any(message.startswith("Resuming from " + str(output_dir / "checkpoint-2")) for message in messages)
    assert _final_step(output_dir) == 8
    for step in (2, 4, 6, 8):  # checkpoint-6 was replaced by the complete one
        assert checkpoint_problems(str(output_dir / f"checkpoint-{step}")) == [], step
    assert not (output_dir / STAGING_DIR).exists()


@pytest.mark.slow  # the same path runs in-process in tests/test_step_guard.py (a real SIGTERM to the test process)
def test_sigterm_saves_a_checkpoint_at_the_next_step_and_exits_143(tmp_path, caplog):
    output_dir = tmp_path / "run"
    process, log = _start(output_dir, tmp_path / "events", SIMMIM_TEST_STEP_SECONDS=1)
    _wait_for(tmp_path / "events" / "step-0-2", process, log)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=WAIT_SECONDS) == PREEMPTED_EXIT_CODE
    log.close()
    with open(log.name) as handle:
        text = handle.read()
    stopped = [line for line in text.splitlines() if "Stopped by SIGTERM at step" in line]
    assert stopped, text[-3000:]
    step = int(stopped[0].split("at step ")[1].split()[0])
    assert 2 <= step < 8  # not at once, not the end: the next step boundary
    assert checkpoint_problems(str(output_dir / f"checkpoint-{step}")) == []
    assert not (output_dir / "model.safetensors").exists()  # a stopped run writes no final model

    with caplog.at_level("INFO"):
        run_mim.main([*RUN, "--output_dir", str(output_dir)])
    assert any(r.getMessage().startswith(f"Resuming from {output_dir / f'checkpoint-{step}'}") for r in caplog.records)
    assert _final_step(output_dir) == 8 and (output_dir / "model.safetensors").exists()


@pytest.mark.slow
def test_two_processes_stop_at_the_same_step_when_one_gets_sigusr1(tmp_path):
    """torchrun with 2 CPU processes (gloo): SIGUSR1 reaches rank 1 only; both ranks save the same checkpoint (each its
    RNG state) and stop."""
    output_dir, events = tmp_path / "ddp", tmp_path / "events"
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "SIMMIM_TEST_EVENTS": str(events),
        "SIMMIM_TEST_STEP_SECONDS": "1",
    }
    log = open(tmp_path / "ddp.log", "w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            SCRIPT,
            *RUN,
            "--per_device_train_batch_size",
            "4",
            "--output_dir",
            str(output_dir),
        ],
        cwd=ROOT,
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    _wait_for(events / "step-1-2", process, log)
    os.kill(int((events / "pid-1").read_text()), signal.SIGUSR1)
    process.wait(timeout=WAIT_SECONDS)
    log.close()
    assert process.returncode != 0  # torchrun reports its workers' exit 143 as a failure
    steps = {
        rank: max(int(name.split("-")[2]) for name in os.listdir(events) if name.startswith(f"step-{rank}-"))
        for rank in (0, 1)
    }
    assert steps[0] == steps[1] < 8, steps
    checkpoint = output_dir / f"checkpoint-{steps[0]}"
    assert checkpoint_problems(str(checkpoint)) == []
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(os.listdir(checkpoint))
    with open(log.name) as handle:
        text = handle.read()
    assert "Stopped by a stop signal (another process)" in text and "Stopped by SIGUSR1" in text, text[-3000:]


@pytest.mark.slow
def test_accelerate_launch_forwards_sigusr1_as_the_readme_slurm_script_sets_it_up(tmp_path):
    """The README's SLURM setup: `accelerate launch` told (PET_SIGNALS_TO_HANDLE) to pass SIGUSR1 on to its workers
    and to give them time (PET_SHUTDOWN_TIMEOUT); the signal reaches the launcher only, both workers save and stop."""
    output_dir, events = tmp_path / "acc", tmp_path / "events"
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "SIMMIM_TEST_EVENTS": str(events),
        "SIMMIM_TEST_STEP_SECONDS": "1",
        "PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
        "PET_SHUTDOWN_TIMEOUT": "120",
    }
    log = open(tmp_path / "acc.log", "w")
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    process = subprocess.Popen(
        [
            launcher,
            "launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--main_process_port",
            "29531",
            SCRIPT,
            *RUN,
            "--per_device_train_batch_size",
            "4",
            "--output_dir",
            str(output_dir),
        ],
        cwd=ROOT,
        env=environment,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    _wait_for(events / "step-1-2", process, log)
    process.send_signal(signal.SIGUSR1)
    process.wait(timeout=WAIT_SECONDS)
    log.close()
    with open(log.name) as handle:
        text = handle.read()
    assert text.count("Stopped by SIGUSR1 at step") == 2, text[-3000:]
    step = int(text.split("Stopped by SIGUSR1 at step ")[1].split()[0])
    assert step < 8 and checkpoint_problems(str(output_dir / f"checkpoint-{step}")) == []
    assert not (output_dir / "train_results.json").exists()  # what the README's script tests before requeueing
