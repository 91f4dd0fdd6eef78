"""Several processes: `accelerate launch` and `torchrun` with 2 CPU processes (gloo) on tiny models and data, against
one process. Checked: the global batch and the lr scaled by it, only rank 0 writing outputs and reconstructions,
evaluation gathered across ranks (eval loss equal to one process's on the same set), no DDP gradient-layout or
unused-parameter warnings, FSDP2 training whose checkpoints load into the plain model. In-process: the gradient layout
DDP needs, gradient accumulation and the per-image evaluation loss.

Launched runs take 30-120 s each on a 2-core machine: one accelerate run is in the default suite, the others are
`slow`. accelerate runs FSDP on GPUs only, so FSDP2 on gloo is exercised with accelerate's own wrapping function
(tests/fsdp_probe.py). World-size invariance: 2 processes x B end with the weights and losses of 1 process x 2B
(default suite: inside the accelerate test; `slow`: DataLoader workers, gradient accumulation, torchrun, finetuning)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import run_image_classification
import run_mim
from modeling_simmim import SimMIMConfig, SimMIMForImageClassification, SimMIMForMaskedImageModeling, simmim_lr_at
from modeling_simmim.cli import releases_process_group
from modeling_simmim.data import IndexSeededMasks
from modeling_simmim.masking import SimMIMMaskGenerator
from modeling_simmim.trainer import per_example_reconstruction_loss
from modeling_simmim.training_checkpoints import STAGING_DIR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = os.path.join(ROOT, "tests", "launch_probe.py")
LAUNCH_TIMEOUT = 900  # seconds; a launched tiny run takes 30-90 s on a busy 2-core machine
DDP_STRIDE_WARNING = "Grad strides do not match bucket view strides"
UNUSED_PARAMETERS_WARNING = "find_unused_parameters=True was specified"

# Tiny Swin, 64 px, 16 px mask blocks; the bundled digits.
TINY_MIM_ANY_DEVICE = [
    "--model_preset",
    "swin_test",
    "--mask_patch_size",
    "16",
    "--logging_steps",
    "1",
    "--disable_tqdm",
    "true",
    "--report_to",
    "none",
    "--dataloader_num_workers",
    "0",
    "--seed",
    "0",
]
TINY_MIM = [*TINY_MIM_ANY_DEVICE, "--use_cpu", "true"]


def free_port() -> int:
    """A TCP port that nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(
    launcher: str, num_processes: int, script: str, config_file: str | None = None, launcher_args: tuple[str, ...] = ()
) -> list[str]:
    """The command a user types, for `launcher` in ("accelerate", "torchrun"), running `script` through the probe."""
    port = str(free_port())
    if launcher == "accelerate":
        # `--multi_gpu` + the Trainer's `--use_cpu true` gives real gloo processes (MULTI_CPU); `--cpu` alone would
        # silently run one process.
        head = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--num_processes",
            str(num_processes),
            "--num_machines",
            "1",
            "--main_process_port",
            port,
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ]
        if config_file:
            head += ["--config_file", config_file]
        elif num_processes > 1:  # accelerate refuses --multi_gpu for one process
            head.append("--multi_gpu")
    elif launcher == "torchrun":
        head = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(num_processes),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            port,
        ]
    else:
        raise ValueError(f"unknown launcher {launcher!r}")
    return [*head, *launcher_args, PROBE, os.path.join(ROOT, script)]


def launch(
    launcher: str,
    num_processes: int,
    script: str,
    args: list[str],
    probe_dir,
    config_file=None,
    launcher_args: tuple[str, ...] = (),
):
    """Run `script args` under `launcher` with `num_processes` CPU processes; returns (CompletedProcess, records by
    rank). Fails with the end of the output when the run does not end with rc 0."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "SIMMIM_PROBE_DIR": str(probe_dir),
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    }
    command = [*launch_command(launcher, num_processes, script, config_file, launcher_args), *args]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=LAUNCH_TIMEOUT)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)}\nrc={result.returncode}\n{output[-6000:]}"
    records = {}
    for rank in range(num_processes):
        with open(os.path.join(probe_dir, f"rank{rank}.json"), encoding="utf-8") as handle:
            records[rank] = json.load(handle)
    return result, records


def _json(path):
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _train_logs(output_dir):
    return [entry for entry in _json(os.path.join(output_dir, "trainer_state.json"))["log_history"] if "loss" in entry]


def _under(paths, folder):
    """The paths under `folder`, relative to it; a checkpoint's files written in the staging folder (then renamed
    into place) under their published name."""
    folder = os.path.abspath(folder)
    relative = (os.path.relpath(path, folder) for path in paths if path.startswith(folder + os.sep))
    staged = STAGING_DIR + os.sep
    return sorted({name[len(staged) :] if name.startswith(staged) else name for name in relative} - {STAGING_DIR})


def _single_process_eval_loss(model_dir, eval_args, output_dir) -> float:
    """eval_loss of a saved model, one process, in-process (batch size from `eval_args`)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = run_mim.main(
            [
                *TINY_MIM[2:],
                "--model_name_or_path",
                model_dir,
                "--do_train",
                "false",
                "--output_dir",
                output_dir,
                *eval_args,
            ]
        )
    finally:
        torch.set_num_threads(previous)
    return results["eval_loss"]


def _single_process_run(args: list[str]) -> None:
    """run_mim.py in this process, one thread (the launched runs' thread count changes sums at the 1e-7 level)."""
    previous = torch.get_num_threads()
    try:
        run_mim.main([*args, "--torch_num_threads", "1"])
    finally:
        torch.set_num_threads(previous)


def _max_weight_difference(dir_a: str, dir_b: str) -> float:
    weights_a = load_file(os.path.join(dir_a, "model.safetensors"))
    weights_b = load_file(os.path.join(dir_b, "model.safetensors"))
    assert set(weights_a) == set(weights_b)
    return max(float((weights_a[name] - weights_b[name]).abs().max()) for name in weights_a)


# ---- in-process ------------------------------------------------------------------------------------------------------
def test_free_port_and_launch_commands():
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))  # nothing holds it
    accelerate = launch_command("accelerate", 2, "run_mim.py")
    assert "--multi_gpu" in accelerate and accelerate[accelerate.index("--num_processes") + 1] == "2"
    assert "--multi_gpu" not in launch_command("accelerate", 2, "run_mim.py", config_file="fsdp.yaml")
    assert launch_command("torchrun", 2, "run_mim.py")[-2:] == [PROBE, os.path.join(ROOT, "run_mim.py")]
    with pytest.raises(ValueError, match="unknown launcher"):
        launch_command("mpirun", 2, "run_mim.py")


@pytest.mark.parametrize("preset", ["swin_test", "swinv2_test", "vit_test", "beit_test"])
@pytest.mark.parametrize("task", ["mim", "classification"])
def test_every_gradient_has_its_parameters_layout_and_every_parameter_is_used(preset, task):
    """DDP copies each gradient into a bucket view laid out like the parameter; a gradient with other strides makes it
    warn ("Grad strides do not match bucket view strides") and copy every step. The SimMIM decoder is a 1x1 conv on a
    feature map made from tokens: with several threads the conv returned a channels-last weight gradient. Every
    parameter also gets a gradient (so `ddp_find_unused_parameters=False` is safe)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(2)  # one thread takes a conv path that hides the problem
    try:
        config = SimMIMConfig.from_preset(preset, mask_patch_size=16)
        pixel_values = torch.randn(3, 3, 64, 64)
        if task == "mim":
            model = SimMIMForMaskedImageModeling(config)
            generator = SimMIMMaskGenerator(64, 16, config.model_patch_size, 0.6)
            loss = model(pixel_values, generator(3, generator=torch.Generator().manual_seed(0))).loss
        else:
            config.num_labels = 3
            model = SimMIMForImageClassification(config)
            loss = model(pixel_values, labels=torch.tensor([0, 1, 2])).loss
        loss.backward()
    finally:
        torch.set_num_threads(previous)
    unused = [name for name, parameter in model.named_parameters() if parameter.grad is None]
    assert not unused
    mismatched = {
        name: (parameter.stride(), parameter.grad.stride())
        for name, parameter in model.named_parameters()
        if parameter.grad.stride() != parameter.stride()
    }
    assert not mismatched


def test_gradient_accumulation_gives_the_gradient_of_the_whole_batch(tmp_path):
    """Finetuning with 2 x 8 accumulated images makes the same update as 16 images at once. The Trainer treats a
    model whose forward takes **kwargs as normalizing its loss by `num_items_in_batch`, skips its division by the
    accumulation steps (and multiplies by the number of processes); our losses are batch means."""
    torch.manual_seed(0)
    config = SimMIMConfig.from_preset("swin_test", image_size=32, mask_patch_size=16, num_labels=4)
    model = SimMIMForImageClassification(config)
    initial = {name: value.clone() for name, value in model.state_dict().items()}
    data = [{"pixel_values": torch.randn(3, 32, 32), "labels": i % 4} for i in range(16)]
    results = {}
    for accumulation, batch in ((1, 16), (2, 8)):
        model.load_state_dict(initial)
        args = run_image_classification.FinetuneTrainingArguments(
            output_dir=str(tmp_path / f"ga{accumulation}"),
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            warmup_steps=0,
            base_learning_rate=1e-2,
            scale_learning_rate=False,
            report_to="none",
            logging_steps=1,
            save_strategy="no",
            eval_strategy="no",
            disable_tqdm=True,
            use_cpu=True,
            dataloader_num_workers=0,
            load_best_model_at_end=False,
            metric_for_best_model=None,
            max_grad_norm=0.0,
            seed=0,
        )
        trainer = run_image_classification.ImageClassificationTrainer(model=model, args=args, train_dataset=data)
        assert trainer.model_accepts_loss_kwargs is False
        trainer.train()
        log = next(entry for entry in trainer.state.log_history if "loss" in entry)
        results[accumulation] = (
            log["loss"],
            log["grad_norm"],
            {name: value.clone() for name, value in model.state_dict().items()},
        )
    (loss_1, norm_1, weights_1), (loss_2, norm_2, weights_2) = results[1], results[2]
    assert loss_2 == pytest.approx(loss_1, rel=1e-5) and norm_2 == pytest.approx(norm_1, rel=1e-4)
    for name in weights_1:
        torch.testing.assert_close(weights_2[name], weights_1[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("norm_target_window", [None, 7])
def test_per_example_reconstruction_loss_is_the_models_loss_of_each_image(norm_target_window):
    config = SimMIMConfig.from_preset("swin_test", mask_patch_size=16, norm_target_window=norm_target_window)
    model = SimMIMForMaskedImageModeling(config).eval()
    masks = IndexSeededMasks(SimMIMMaskGenerator(64, 16, config.model_patch_size, 0.6))
    pixel_values = torch.randn(5, 3, 64, 64)
    bool_masked_pos = torch.stack([masks(i, {})["bool_masked_pos"] for i in range(5)])
    with torch.no_grad():
        batch = model(pixel_values, bool_masked_pos)
        losses = per_example_reconstruction_loss(config, pixel_values, batch.reconstruction, bool_masked_pos)
        one_by_one = torch.stack([model(pixel_values[i : i + 1], bool_masked_pos[i : i + 1]).loss for i in range(5)])
    torch.testing.assert_close(losses, one_by_one, atol=1e-6, rtol=1e-5)
    assert float(losses.mean()) == pytest.approx(float(batch.loss), rel=1e-5)  # equal masked counts per image
    assert float(losses.std()) > 0  # images differ: a batch mean repeated would not pass the check above


def test_eval_loss_does_not_depend_on_the_evaluation_batch_size(tmp_path):
    torch.manual_seed(0)
    model_dir = str(tmp_path / "model")
    SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("swin_test", mask_patch_size=16)).save_pretrained(model_dir)
    losses = [
        _single_process_eval_loss(
            model_dir,
            ["--per_device_eval_batch_size", str(batch), "--max_eval_samples", "10"],
            str(tmp_path / f"eval{batch}"),
        )
        for batch in (10, 4, 3)
    ]
    assert losses[1] == pytest.approx(losses[0], abs=1e-6) and losses[2] == pytest.approx(losses[0], abs=1e-6)


@pytest.mark.parametrize("fails", [False, True])
def test_scripts_destroy_the_process_group_when_main_returns_or_raises(tmp_path, fails):
    """A launched rank that leaves its gloo group to interpreter shutdown can abort after a clean run ("terminate
    called without an active exception", exit -6): both scripts' `main` tear the group down themselves."""
    assert run_mim.main.__wrapped__ is not None and run_image_classification.main.__wrapped__ is not None

    @releases_process_group
    def main() -> str:
        assert torch.distributed.is_initialized()
        if fails:
            raise RuntimeError("training failed")
        return "done"

    store = f"file://{tmp_path / 'store'}"
    torch.distributed.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        if fails:
            with pytest.raises(RuntimeError, match="training failed"):
                main()
        else:
            assert main() == "done"
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    assert releases_process_group(lambda: "single process")() == "single process"


def test_launch_mistakes_fail_early_or_are_named(monkeypatch, caplog):
    from types import SimpleNamespace

    from modeling_simmim.trainer import check_launch

    alone = SimpleNamespace(num_processes=1, distributed_type="NO", device=torch.device("cpu"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="--use_cpu true"):
        check_launch(alone)
    together = SimpleNamespace(num_processes=2, distributed_type="MULTI_CPU", device=torch.device("cpu"))
    check_launch(together)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with caplog.at_level("WARNING", logger="modeling_simmim.trainer"):
        check_launch(together)
    assert "applies it on GPUs only" in caplog.text and "MULTI_CPU" in caplog.text
    caplog.clear()
    check_launch(SimpleNamespace(num_processes=2, distributed_type="FSDP", device=torch.device("cuda")))
    assert not caplog.text


def test_multinode_launch_config_is_valid_for_every_machine():
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = os.path.join(ROOT, "configs", "accelerate", "multinode_2x8.yaml")
    for rank in ("0", "1"):
        args = launch_command_parser().parse_args(
            ["--config_file", path, "--machine_rank", rank, "--main_process_ip", "10.0.0.1", "run_mim.py"]
        )
        args = _validate_launch_command(args)[0]
        assert args.multi_gpu and (args.num_machines, args.num_processes) == (2, 16)
        assert args.machine_rank == int(rank) and args.main_process_ip == "10.0.0.1"


def test_slurm_script_launches_one_accelerate_per_node_with_its_rank(tmp_path):
    """configs/accelerate/slurm_2x8.sh with stand-ins for srun (runs the task once per node, SLURM_PROCID 0 and 1),
    scontrol (the job's hosts) and accelerate (records its arguments)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "calls.jsonl"
    stubs = {
        # a long host list: a reader that stops after the first line would make scontrol die of SIGPIPE
        "scontrol": '#!/bin/bash\nprintf "gpu-node-07\\n"; for i in $(seq 8 20000); do echo "gpu-node-$i"; done\n',
        # drop srun's own options, run the command as each node's task would
        "srun": '#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\n'
        'for rank in 0 1; do SLURM_PROCID=$rank SLURM_NNODES=2 "$@" || exit 1; done\n',
        "accelerate": f'#!/usr/bin/env python3\nimport json, sys\nopen("{record}", "a").write(json.dumps(sys.argv[1:]) + "\\n")\n',
    }
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_NODELIST": "gpu-node-[07-08]",
        "SLURM_SUBMIT_DIR": ROOT,
    }
    script = os.path.join(ROOT, "configs", "accelerate", "slurm_2x8.sh")
    result = subprocess.run(
        ["bash", script, "configs/pretrain/swin_base_192_w6_100ep.yaml", "--output_dir", "/shared/out dir"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(calls) == 2
    for rank, call in enumerate(calls):
        options = dict(zip(call[1::2], call[2::2]))
        assert call[0] == "launch"
        assert options["--config_file"] == os.path.join(ROOT, "configs", "accelerate", "multinode_2x8.yaml")
        assert (options["--num_machines"], options["--num_processes"], options["--machine_rank"]) == (
            "2",
            "16",
            str(rank),
        )
        assert options["--main_process_ip"] == "gpu-node-07" and options["--main_process_port"] == "29500"
        assert call[-4:] == [
            "run_mim.py",
            "configs/pretrain/swin_base_192_w6_100ep.yaml",
            "--output_dir",
            "/shared/out dir",
        ]


# ---- launched ----------------------------------------------------------------------------------------------------------
def test_accelerate_two_processes(tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 run_mim.py ... --use_cpu true`: two gloo processes; total
    batch 2 x 4 and the lr scaled by it; only rank 0 writes the model, logs and reconstructions (rank 1 only its own
    RNG state in checkpoints); eval loss over 10 images (batches of 4: the last one padded by accelerate) equals one
    process's on the saved model; no DDP gradient-layout or unused-parameter warnings (2 threads per process, where
    the decoder's gradient layout used to differ)."""
    output_dir = str(tmp_path / "out")
    eval_args = ["--per_device_eval_batch_size", "4", "--max_eval_samples", "10"]
    args = [
        *TINY_MIM,
        "--per_device_train_batch_size",
        "4",
        "--max_train_samples",
        "32",
        "--max_steps",
        "3",
        "--warmup_steps",
        "1",
        "--base_learning_rate",
        "0.5",
        "--save_strategy",
        "steps",
        "--save_steps",
        "3",
        "--visualize_steps",
        "2",
        "--torch_num_threads",
        "2",
        "--output_dir",
        output_dir,
        *eval_args,
    ]
    result, records = launch("accelerate", 2, "run_mim.py", args, tmp_path / "probe")
    output = result.stdout + result.stderr

    assert {records[rank]["world_size"] for rank in (0, 1)} == {2}
    assert records[0]["distributed_type"] == "MULTI_CPU" and records[0]["wrapper"] == "DistributedDataParallel"
    assert records[0]["total_train_batch_size"] == 8
    logs = _train_logs(output_dir)
    assert logs[-1]["epoch"] == pytest.approx(0.75)  # 32 images / (4 x 2) = 4 steps per epoch
    scale = 8 / 512
    assert logs[1]["learning_rate"] == pytest.approx(simmim_lr_at(1, 0.5 * scale, 3, 1, 1e-6 * scale, 1e-5 * scale))

    assert not os.path.exists(os.path.join(output_dir, "_checkpoint-staging"))  # published by a rename
    rank0 = _under(records[0]["written"], output_dir)
    rank1 = _under(records[1]["written"], output_dir)
    for name in (
        "model.safetensors",
        "config.json",
        "trainer_state.json",
        "checkpoint-3/optimizer.pt",
        "all_results.json",
        "README.md",
        "reconstructions/step_00002.png",
        "reconstructions/step_00003.png",
        "checkpoint-3/trainer_state.json",
        "checkpoint-3/rng_state_0.pth",
    ):
        assert name in rank0, name
    assert [name for name in rank1 if name != "checkpoint-3"] == ["checkpoint-3/rng_state_1.pth"], rank1
    assert sorted(os.listdir(os.path.join(output_dir, "reconstructions"))) == ["step_00002.png", "step_00003.png"]

    eval_loss = _json(os.path.join(output_dir, "eval_results.json"))["eval_loss"]
    assert eval_loss == pytest.approx(
        _single_process_eval_loss(output_dir, eval_args, str(tmp_path / "one")), abs=1e-6
    )
    assert DDP_STRIDE_WARNING not in output and UNUSED_PARAMETERS_WARNING not in output

    # World-size invariance: one process x 8 images trains the same model (initial weights, order, crops, flips,
    # masks and the loss mean all independent of the number of processes).
    one = str(tmp_path / "one_process")
    _single_process_run(
        [
            *TINY_MIM,
            "--per_device_train_batch_size",
            "8",
            "--max_train_samples",
            "32",
            "--max_steps",
            "3",
            "--warmup_steps",
            "1",
            "--base_learning_rate",
            "0.5",
            "--save_strategy",
            "no",
            "--do_eval",
            "false",
            "--output_dir",
            one,
        ]
    )
    assert _max_weight_difference(output_dir, one) <= 1e-5
    np.testing.assert_allclose(
        [entry["loss"] for entry in logs], [entry["loss"] for entry in _train_logs(one)], rtol=1e-5
    )


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    output_dir = str(tmp_path / "out")
    args = [
        *TINY_MIM,
        "--per_device_train_batch_size",
        "4",
        "--max_train_samples",
        "32",
        "--max_steps",
        "2",
        "--warmup_steps",
        "1",
        "--per_device_eval_batch_size",
        "4",
        "--max_eval_samples",
        "6",
        "--save_strategy",
        "no",
        "--output_dir",
        output_dir,
    ]
    result, records = launch("torchrun", 2, "run_mim.py", args, tmp_path / "probe")
    assert records[0]["num_processes"] == 2 and records[0]["total_train_batch_size"] == 8
    assert not _under(records[1]["written"], output_dir)
    assert os.path.isfile(os.path.join(output_dir, "model.safetensors"))
    assert DDP_STRIDE_WARNING not in result.stderr + result.stdout


@pytest.mark.slow
def test_finetuning_two_processes_keeps_the_loss_a_mean(tmp_path):
    """Under DDP the Trainer multiplied a **kwargs model's loss by the number of processes (average_tokens_across_
    devices): cross-entropy of a fresh 10-class head must stay near ln(10), not 2 x ln(10)."""
    pretrained = str(tmp_path / "pretrained")
    torch.manual_seed(0)
    SimMIMForMaskedImageModeling(
        SimMIMConfig.from_preset("swin_test", image_size=32, mask_patch_size=16)
    ).save_pretrained(pretrained)
    output_dir = str(tmp_path / "ft")
    args = [
        "--model_name_or_path",
        pretrained,
        "--image_size",
        "32",
        "--drop_empty_classes",
        "true",
        "--per_device_train_batch_size",
        "8",
        "--per_device_eval_batch_size",
        "8",
        "--max_train_samples",
        "32",
        "--max_eval_samples",
        "12",
        "--max_steps",
        "2",
        "--warmup_steps",
        "1",
        "--base_learning_rate",
        "1e-4",
        "--mixup",
        "0",
        "--cutmix",
        "0",
        "--rand_augment",
        "none",
        "--random_erasing",
        "0",
        "--label_smoothing",
        "0",
        "--logging_steps",
        "1",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--load_best_model_at_end",
        "false",
        "--use_cpu",
        "true",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--output_dir",
        output_dir,
    ]
    result, records = launch("accelerate", 2, "run_image_classification.py", args, tmp_path / "probe")
    assert records[0]["num_processes"] == 2
    losses = [entry["loss"] for entry in _train_logs(output_dir)]
    assert all(1.5 < loss < 3.2 for loss in losses), losses
    all_results = _json(os.path.join(output_dir, "all_results.json"))
    assert all_results["eval_samples"] == 12 and 0.0 <= all_results["eval_accuracy"] <= 1.0
    assert DDP_STRIDE_WARNING not in result.stderr + result.stdout


@pytest.mark.slow
def test_fsdp_launch_config_on_cpu_processes_trains_with_ddp_and_says_so(tmp_path):
    """accelerate applies FSDP to GPU processes only: configs/accelerate/fsdp.yaml with --use_cpu true runs DDP
    (MULTI_CPU). The run still ends well, and the log says that the model was not sharded."""
    output_dir = str(tmp_path / "out")
    args = [
        *TINY_MIM,
        "--per_device_train_batch_size",
        "4",
        "--max_train_samples",
        "16",
        "--max_steps",
        "1",
        "--warmup_steps",
        "1",
        "--do_eval",
        "false",
        "--save_strategy",
        "no",
        "--output_dir",
        output_dir,
    ]
    result, records = launch(
        "accelerate",
        2,
        "run_mim.py",
        args,
        tmp_path / "probe",
        config_file=os.path.join(ROOT, "configs", "accelerate", "fsdp.yaml"),
    )
    assert records[0]["distributed_type"] == "MULTI_CPU" and records[0]["num_processes"] == 2
    assert not records[0]["fsdp2"]
    assert "asks for FSDP, but accelerate applies it on GPUs only" in result.stdout + result.stderr


@pytest.mark.slow
def test_processes_that_do_not_form_one_run_fail_at_start(tmp_path):
    """Without --use_cpu on a machine without GPUs, launched processes would each train alone into one folder."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        os.path.join(ROOT, "run_mim.py"),
        *TINY_MIM_ANY_DEVICE,
        "--max_steps",
        "1",
        "--output_dir",
        str(tmp_path / "out"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=LAUNCH_TIMEOUT)
    assert result.returncode != 0
    assert "but this one trains alone" in result.stdout + result.stderr and "--use_cpu true" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset,layers", [("swin_test", None), ("swinv2_test", None), ("beit_test", None), ("vit_test", "ViTLayer")]
)
def test_fsdp2_on_cpu_processes_trains_like_one_process_and_saves_plain_checkpoints(tmp_path, preset, layers):
    """configs/accelerate/fsdp.yaml's FSDP2 wrapping, by accelerate's own `fsdp2_prepare_model`, on 2 gloo processes
    (tests/fsdp_probe.py hands the plugin to accelerate, which does not on CPUs): every parameter sharded, units =
    the model's `_no_split_modules` blocks + the patch embedding; 2 AdamW steps on 2 x 2 images end within 1e-4 of
    one process on the 4 images; the gathered full state dict, saved with `save_pretrained`, loads into the plain
    model. Plain ViT needs `--fsdp_transformer_layer_cls_to_wrap ViTLayer` (README)."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "SIMMIM_PROBE_DIR": str(tmp_path),
        "SIMMIM_FSDP_PRESET": preset,
        **({"SIMMIM_FSDP_LAYERS": layers} if layers else {}),
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        os.path.join(ROOT, "tests", "fsdp_probe.py"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=LAUNCH_TIMEOUT)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    record = _json(tmp_path / "record.json")
    # accelerate's own choice for CPU processes; when it starts choosing FSDP, test the Trainer under fsdp.yaml
    assert record["distributed_type"] == "MULTI_CPU"
    assert record["fsdp2"] and record["sharded"] and record["world_size"] == 2
    family = SimMIMConfig.from_preset(preset).backbone_type
    assert {f"{family}.embeddings.patch_embeddings", "<root>"} <= set(record["units"])
    assert sum(".0" in unit or ".1" in unit for unit in record["units"]) == 2, record["units"]  # 2 blocks/stages
    # 2 AdamW steps at lr 1e-2: a rank training on its own 2 images alone ends 4e-2 away from one process on all 4;
    # another summation order ends about 1e-5 away (1.005e-5 seen on an AVX512 CPU). 1e-4 separates the two.
    assert record["max_difference_to_one_process"] <= 1e-4
    state = load_file(os.path.join(tmp_path, "model", "model.safetensors"))
    plain = SimMIMForMaskedImageModeling.from_pretrained(os.path.join(tmp_path, "model"))
    assert set(state) == set(plain.state_dict()) == set(record["state_dict_keys"])
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(value, state[name])


@pytest.mark.slow
@pytest.mark.parametrize(
    "launcher,two_process_flags,one_process_flags",
    [
        ("accelerate", ["--dataloader_num_workers", "2"], ["--per_device_train_batch_size", "8"]),
        (
            "accelerate",
            [],
            [
                "--per_device_train_batch_size",
                "4",
                "--gradient_accumulation_steps",
                "2",
                "--dataloader_num_workers",
                "2",
            ],
        ),
        ("torchrun", ["--dataloader_num_workers", "2"], ["--per_device_train_batch_size", "8"]),
    ],
    ids=["workers", "accumulation", "torchrun"],
)
def test_two_processes_train_the_same_model_as_one_process(tmp_path, launcher, two_process_flags, one_process_flags):
    """World-size invariance: 2 processes x 4 images (2 DataLoader workers each) and 1 process x 8 images (no
    workers), or 2 x 4 (no workers) and 1 process x 4 x 2 accumulation steps (2 workers): same --seed, fp32, 4 steps
    over 24 images (a second epoch starts at step 4), from a fresh model: the same final weights (1e-5) and logged
    losses. Launched with `accelerate launch`, and with `torchrun` (both runs)."""
    common = [
        *TINY_MIM,
        "--max_train_samples",
        "24",
        "--max_steps",
        "4",
        "--warmup_steps",
        "1",
        "--base_learning_rate",
        "0.05",
        "--do_eval",
        "false",
        "--save_strategy",
        "no",
    ]
    two = str(tmp_path / "two")
    _, records = launch(
        launcher,
        2,
        "run_mim.py",
        [*common, "--per_device_train_batch_size", "4", *two_process_flags, "--output_dir", two],
        tmp_path / "probe2",
    )
    assert records[0]["num_processes"] == 2 and records[0]["total_train_batch_size"] == 8
    one = str(tmp_path / "one")
    launch(launcher, 1, "run_mim.py", [*common, *one_process_flags, "--output_dir", one], tmp_path / "probe1")
    assert _max_weight_difference(two, one) <= 1e-5
    logs_two, logs_one = _train_logs(two), _train_logs(one)
    assert [entry["epoch"] for entry in logs_two] == [entry["epoch"] for entry in logs_one]
    np.testing.assert_allclose([entry["loss"] for entry in logs_two], [entry["loss"] for entry in logs_one], rtol=1e-5)


FINETUNE_TINY = [
    "--image_size",
    "32",
    "--max_train_samples",
    "32",
    "--drop_empty_classes",
    "true",
    "--max_steps",
    "3",
    "--warmup_steps",
    "1",
    "--base_learning_rate",
    "1e-3",
    "--rand_augment",
    "rand-m9-mstd0.5-inc1",
    "--random_erasing",
    "0.25",
    "--label_smoothing",
    "0.1",
    "--drop_path_rate",
    "0",
    "--logging_steps",
    "1",
    "--do_train",
    "true",
    "--do_eval",
    "false",
    "--save_strategy",
    "no",
    "--load_best_model_at_end",
    "false",
    "--use_cpu",
    "true",
    "--report_to",
    "none",
    "--disable_tqdm",
    "true",
    "--seed",
    "0",
    "--dataloader_num_workers",
    "0",
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "mix,one_process_flags",
    [
        (["--mixup", "0", "--cutmix", "0"], ["--per_device_train_batch_size", "8"]),
        ([], ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"]),
    ],
    ids=["no_mixing", "mixup_cutmix"],
)
def test_finetuning_two_processes_trains_the_same_model_as_one_process(tmp_path, mix, one_process_flags):
    """Finetuning (RandAugment, random erasing, label smoothing): 2 processes x 4 images equal 1 process x 8 images;
    with Mixup/CutMix, which pair the images of one micro-batch (as official), they equal 1 process x 4 images x 2
    accumulation steps (the same micro-batches). Stochastic depth is off: it draws from each process's own RNG."""
    pretrained = str(tmp_path / "pretrained")
    torch.manual_seed(0)
    SimMIMForMaskedImageModeling(
        SimMIMConfig.from_preset("swin_test", image_size=32, mask_patch_size=16)
    ).save_pretrained(pretrained)
    common = ["--model_name_or_path", pretrained, *FINETUNE_TINY, *mix]
    two = str(tmp_path / "two")
    launch(
        "accelerate",
        2,
        "run_image_classification.py",
        [*common, "--per_device_train_batch_size", "4", "--output_dir", two],
        tmp_path / "probe2",
    )
    one = str(tmp_path / "one")
    launch(
        "accelerate",
        1,
        "run_image_classification.py",
        [*common, *one_process_flags, "--output_dir", one],
        tmp_path / "probe1",
    )
    assert _max_weight_difference(two, one) <= 1e-5
    np.testing.assert_allclose(
        [entry["loss"] for entry in _train_logs(two)], [entry["loss"] for entry in _train_logs(one)], rtol=1e-5
    )
