"""run_mim.py through its CLI entry point (`main(argv)`, in-process to keep the suite fast): recipe + flags, early
failures, end-to-end runs (swin, beit), outputs, unreadable images, overfitting, resuming."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import run_mim
from modeling_simmim import SimMIMForMaskedImageModeling, simmim_lr_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--model_preset",
    "swin_test",
    "--mask_patch_size",
    "16",
    "--per_device_train_batch_size",
    "8",
    "--per_device_eval_batch_size",
    "8",
    "--logging_steps",
    "1",
    "--save_strategy",
    "no",
    "--use_cpu",
    "--disable_tqdm",
    "true",
    "--report_to",
    "none",
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models run faster on one thread, and the test machine is shared.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _run(tmp_path, *extra, name="out"):
    output_dir = str(tmp_path / name)
    results = run_mim.main([*TINY, "--output_dir", output_dir, *extra])
    return output_dir, results


def _json(path):
    with open(path) as handle:
        return json.load(handle)


def _train_logs(output_dir):
    return [entry for entry in _json(os.path.join(output_dir, "trainer_state.json"))["log_history"] if "loss" in entry]


# ---- arguments ---------------------------------------------------------------------------------------------------
def test_help_lists_the_simmim_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_mim.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--model_type",
        "--backbone_config_overrides",
        "--mask_patch_size",
        "--train_dir",
        "--demo_dataset",
        "--base_learning_rate",
        "--warmup_epochs",
        "--lr_milestones",
        "--layer_decay",
        "--visualize_steps",
        "--max_grad_norm",
        "--resume_from_checkpoint",
    ):
        assert flag in text, flag


def test_recipe_values_are_defaults_and_flags_override_them(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model_type: swin\nimage_size: 96\nbackbone_config_overrides:\n  depths: [1, 1]\n"
        "  num_heads: [1, 2]\n  embed_dim: 16\nbase_learning_rate: 1e-4\n"
        "per_device_train_batch_size: 128\nlr_scheduler_type: multistep\nlr_milestones: [700]\n"
        "bf16: false\n"
    )
    model_args, data_args, args, explicit = run_mim.parse_args(
        [str(recipe), "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "o")]
    )
    assert args.per_device_train_batch_size == 4  # the flag wins
    assert args.base_learning_rate == 1e-4 and isinstance(args.base_learning_rate, float)  # YAML reads "1e-4" as str
    assert args.lr_milestones == [700] and args.lr_scheduler_type.value == "multistep"
    assert model_args.overrides() == {"depths": [1, 1], "num_heads": [1, 2], "embed_dim": 16, "image_size": 96}
    assert explicit["per_device_train_batch_size"] == 4 and "output_dir" not in explicit
    config = run_mim.build_config(model_args)
    assert config.backbone_config.depths == [1, 1] and config.image_size == (96, 96)

    as_json = tmp_path / "recipe.json"
    as_json.write_text(json.dumps({"model_preset": "beit_test", "warmup_epochs": 2}))
    model_args, _, args, _ = run_mim.parse_args([str(as_json), "--output_dir", str(tmp_path / "o")])
    assert model_args.model_preset == "beit_test" and args.warmup_epochs == 2.0


def test_bad_arguments_fail_early_with_what_to_change(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model_type: swin\nbase_lr: 1e-4\n")
    with pytest.raises(ValueError, match=r"Unknown recipe keys \['base_lr'\]"):
        run_mim.parse_args([str(recipe)])
    with pytest.raises(ValueError, match="--base_learning_rate"):
        run_mim.parse_args(["--learning_rate", "1e-3", "--output_dir", str(tmp_path)])

    def config_error(*argv):
        model_args = run_mim.parse_args([*argv, "--output_dir", str(tmp_path)])[0]
        with pytest.raises(ValueError) as error:
            run_mim.build_config(model_args)
        return str(error.value)

    assert "embed_dims" in config_error("--model_type", "swin", "--backbone_config_overrides", '{"embed_dims": 8}')
    assert "swin/swinv2 only" in config_error("--model_type", "beit", "--window_size", "7")
    message = config_error("--model_preset", "swin_test", "--image_size", "72", "--mask_patch_size", "32")
    assert "72" in message and "32" in message
    assert "--model_type" in config_error()
    assert "not valid JSON" in config_error("--model_type", "swin", "--backbone_config_overrides", "{depths: 2}")


def test_hflip_prob_reaches_the_training_transform(tmp_path, monkeypatch):
    """--hflip_prob sets the flip of the training transform only (0 for digits: a mirror is another shape); outside
    [0, 1] it is refused before anything loads."""
    seen = []

    def recording_transform(*args, **kwargs):
        seen.append((kwargs.get("train"), kwargs.get("hflip_prob")))
        return real_transform(*args, **kwargs)

    class Built(Exception):
        pass

    def no_model(*args, **kwargs):
        raise Built

    real_transform = run_mim.build_pretrain_transform
    monkeypatch.setattr(run_mim, "build_pretrain_transform", recording_transform)
    monkeypatch.setattr(run_mim, "SimMIMForMaskedImageModeling", no_model)
    with pytest.raises(Built):
        _run(tmp_path, "--hflip_prob", "0", "--max_train_samples", "16")
    assert (True, 0.0) in seen and all(hflip in (None, 0.0) for _, hflip in seen)
    with pytest.raises(ValueError, match=r"--hflip_prob is a probability in \[0, 1\]"):
        _run(tmp_path, "--hflip_prob", "2", name="bad")


def test_decoder_kernel_size_flag(tmp_path):
    """--decoder_kernel_size sets a new model's decoder; a saved model keeps its own (changing it is refused)."""

    def config(*argv):
        return run_mim.build_config(run_mim.parse_args([*argv, "--output_dir", str(tmp_path)])[0])

    assert config("--model_preset", "swin_test", "--mask_patch_size", "16").decoder_kernel_size == 1
    assert (
        config(
            "--model_preset", "swin_test", "--mask_patch_size", "16", "--decoder_kernel_size", "3"
        ).decoder_kernel_size
        == 3
    )
    built = config("--model_type", "swin", "--image_size", "64", "--decoder_kernel_size", "3")
    assert built.decoder_kernel_size == 3
    SimMIMForMaskedImageModeling(built).save_pretrained(tmp_path / "k3")
    assert config("--model_name_or_path", str(tmp_path / "k3")).decoder_kernel_size == 3
    with pytest.raises(ValueError, match="cannot change the decoder of a saved model .* has 3"):
        config("--model_name_or_path", str(tmp_path / "k3"), "--decoder_kernel_size", "1")
    with pytest.raises(ValueError, match="decoder_kernel_size must be an odd size"):
        config("--model_preset", "swin_test", "--mask_patch_size", "16", "--decoder_kernel_size", "4")


def test_output_dir_is_checked_before_anything_runs(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists, is not empty and has no checkpoint"):
        run_mim.main([*TINY, "--output_dir", str(tmp_path / "busy"), "--max_steps", "1"])
    args = run_mim.parse_args(["--output_dir", str(tmp_path / "x"), "--resume_from_checkpoint", str(tmp_path / "no")])[
        2
    ]
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        run_mim.check_output_dir(args)
    (tmp_path / "busy" / "checkpoint-7").mkdir()  # empty: not resumable (tests/test_training_checkpoints.py)
    args = run_mim.parse_args(
        ["--output_dir", str(tmp_path / "x"), "--resume_from_checkpoint", str(tmp_path / "busy" / "checkpoint-7")]
    )[2]
    with pytest.raises(ValueError, match="checkpoint-7' is incomplete: empty folder"):
        run_mim.check_output_dir(args)


def test_runs_that_cannot_learn_fail_before_the_model_is_built(tmp_path, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the check")

    monkeypatch.setattr(run_mim, "SimMIMForMaskedImageModeling", no_model)
    with pytest.raises(ValueError, match=r"Only 12 training images: fewer than one global batch \(16 per process"):
        _run(tmp_path, "--max_train_samples", "12", "--per_device_train_batch_size", "16")
    with pytest.raises(ValueError, match="--base_learning_rate must be > 0"):
        _run(tmp_path, "--base_learning_rate=-1e-4")
    with pytest.raises(ValueError, match="--per_device_train_batch_size must be > 0"):
        _run(tmp_path, "--per_device_train_batch_size", "0")


# ---- end to end -------------------------------------------------------------------------------------------------
def test_swin_end_to_end_writes_every_output(tmp_path):
    output_dir, results = _run(
        tmp_path,
        "--max_steps",
        "4",
        "--visualize_steps",
        "2",
        "--warmup_steps",
        "1",
        "--max_train_samples",
        "32",
        "--max_eval_samples",
        "8",
        "--save_strategy",
        "steps",
        "--save_steps",
        "4",
        "--report_to",
        "tensorboard",
    )
    files = set(os.listdir(output_dir))
    assert {
        "model.safetensors",
        "config.json",
        "preprocessor_config.json",
        "trainer_state.json",
        "all_results.json",
        "README.md",
        "reconstructions",
        "checkpoint-4",
    } <= files
    assert not any(name.endswith(".bin") and name != "training_args.bin" for name in files)  # safetensors only
    config = _json(os.path.join(output_dir, "config.json"))
    assert config["model_type"] == "swin" and config["architectures"] == ["SwinForMaskedImageModeling"]  # native
    assert config["mask_patch_size"] == 16 and "auto_map" not in config
    assert sorted(os.listdir(os.path.join(output_dir, "reconstructions"))) == ["step_00002.png", "step_00004.png"]

    logs = _train_logs(output_dir)
    assert [entry["step"] for entry in logs] == [1, 2, 3, 4]
    for entry in logs:
        assert {"loss", "grad_norm", "learning_rate", "images_per_second"} <= set(entry)
    all_results = _json(os.path.join(output_dir, "all_results.json"))
    assert {"train_loss", "eval_loss", "num_skipped_images", "train_samples"} <= set(all_results)
    assert all_results["num_skipped_images"] == 0 and results["eval_samples"] == 8
    assert "reconstructions/step_00004.png" in open(os.path.join(output_dir, "README.md")).read()
    # TensorBoard is a reporter: the grids went there too (the tag is in the event file)
    events = [
        os.path.join(root, name)
        for root, _, names in os.walk(os.path.join(output_dir, "runs"))
        for name in names
        if name.startswith("events.out.tfevents")
    ]
    assert events and any(b"reconstructions" in open(path, "rb").read() for path in events)

    from transformers import AutoImageProcessor, AutoModelForMaskedImageModeling

    processor = AutoImageProcessor.from_pretrained(output_dir)
    assert list(processor.image_mean) == pytest.approx([0.485, 0.456, 0.406])
    inputs = processor(Image.new("RGB", (100, 80), "white"), return_tensors="pt")
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 64, 64)
    model = AutoModelForMaskedImageModeling.from_pretrained(output_dir)
    assert type(model).__name__ == "SwinForMaskedImageModeling"
    assert tuple(model(**inputs).reconstruction.shape) == (1, 3, 64, 64)


def test_beit_end_to_end_and_pushed_with_transformers_push_to_hub(tmp_path, fake_hub):
    output_dir, results = _run(
        tmp_path,
        "--model_preset",
        "beit_test",
        "--max_steps",
        "2",
        "--warmup_steps",
        "1",
        "--max_train_samples",
        "16",
        "--max_eval_samples",
        "8",
        "--push_to_hub",
        "true",
        "--hub_model_id",
        "me/simmim-beit",
    )
    config = _json(os.path.join(output_dir, "config.json"))
    assert config["model_type"] == "beit" and config["auto_map"]["AutoModelForMaskedImageModeling"].endswith(
        "SimMIMBeitForMaskedImageModeling"
    )  # transformers has no pixel-regression BEiT MIM class
    assert np.isfinite(results["train_loss"]) and np.isfinite(results["eval_loss"])
    assert os.listdir(os.path.join(output_dir, "reconstructions")) == ["step_00002.png"]
    # Trainer.push_to_hub: the repository is created at start, the output folder (our card) uploaded at the end
    assert fake_hub.created == ["me/simmim-beit"] and len(fake_hub.uploads) == 1
    upload = fake_hub.uploads[0]
    assert upload["repo_id"] == "me/simmim-beit"
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "modeling_simmim.py"} <= set(
        upload["files"]
    )
    assert "reconstructions/step_00002.png" in upload["files"]
    assert 'from_pretrained("simmim-beit", trust_remote_code=True)' in upload["readme"]  # BEiT MIM: remote code


def _truncated_jpeg(path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (80, 80, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[:600])


def test_unreadable_images_are_skipped_named_and_counted(tmp_path, caplog):
    rng = np.random.default_rng(0)
    modes = ["RGB", "L", "RGBA", "P", "RGB", "LA", "RGB"]
    for i, mode in enumerate(modes):  # 7 readable images of several modes and sizes, nested class folders
        folder = tmp_path / "train" / f"class{i % 2}" / ("deep" if i % 3 == 0 else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (70 + i, 90, 3), dtype=np.uint8)).convert(mode).save(folder / f"{i}.png")
    (tmp_path / "train" / "class0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    _truncated_jpeg(tmp_path / "train" / "class1" / "truncated.jpg")
    common = [
        "--train_dir",
        str(tmp_path / "train"),
        "--per_device_train_batch_size",
        "3",
        "--max_steps",
        "3",
        "--warmup_steps",
        "1",
        "--dataloader_num_workers",
        "0",
    ]
    # checked at load time (default): both dropped before training
    with caplog.at_level("WARNING"):
        _, results = _run(tmp_path, *common, name="verified")
    assert results["num_skipped_images"] == 2
    assert "broken.png" in caplog.text and "truncated.jpg" in caplog.text
    # not checked at load time: skipped when decoded; two epochs of 3 steps x 3 draw every file twice, each unreadable
    # one is counted (and named) once
    caplog.clear()
    with caplog.at_level("WARNING"):
        output_dir, results = _run(
            tmp_path, *common, "--verify_images", "false", "--max_steps", "6", name="unverified"
        )
    assert results["num_skipped_images"] == 2
    for name in ("broken.png", "truncated.jpg"):  # warned once by the reconstruction preview, once by training
        assert sum(name in record.getMessage() for record in caplog.records) == 2
    assert _train_logs(output_dir)[-1]["num_skipped_images"] == 2
    # --on_bad_image error: the first unreadable file stops the run, named, at load time or when decoded
    with pytest.raises(ValueError, match=r"Unreadable image .*(broken\.png|truncated\.jpg)"):
        _run(tmp_path, *common, "--on_bad_image", "error", name="strict")
    with pytest.raises(ValueError, match=r"Unreadable image .*(broken\.png|truncated\.jpg)"):
        _run(tmp_path, *common, "--on_bad_image", "error", "--verify_images", "false", name="strict_decode")


def test_loss_decreases_when_overfitting_a_handful_of_images(tmp_path):
    # 8 digits, 8 px mask blocks on 64 px images (an 8 x 8 grid of blocks), a small 2-stage Swin, 40 steps.
    output_dir, _ = _run(
        tmp_path,
        "--model_type",
        "swin",
        "--image_size",
        "64",
        "--mask_patch_size",
        "8",
        "--backbone_config_overrides",
        '{"embed_dim": 32, "depths": [2, 2], "num_heads": [2, 4], "window_size": 4, "drop_path_rate": 0.0}',
        "--max_train_samples",
        "8",
        "--max_steps",
        "40",
        "--scale_learning_rate",
        "false",
        "--base_learning_rate",
        "3e-3",
        "--warmup_learning_rate",
        "1e-4",
        "--min_learning_rate",
        "1e-4",
        "--warmup_steps",
        "3",
        "--do_eval",
        "false",
    )
    losses = [entry["loss"] for entry in _train_logs(output_dir)]
    assert len(losses) == 40
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses


def test_resume_continues_at_the_right_step_with_the_right_lr(tmp_path):
    common = [
        "--max_train_samples",
        "16",
        "--max_steps",
        "6",
        "--warmup_steps",
        "2",
        "--base_learning_rate",
        "0.05",
        "--do_eval",
        "false",
        "--save_strategy",
        "steps",
        "--save_steps",
        "3",
    ]
    full_dir, _ = _run(tmp_path, *common, name="full")
    resumed_dir, _ = _run(
        tmp_path, *common, "--resume_from_checkpoint", os.path.join(full_dir, "checkpoint-3"), name="resumed"
    )
    full = {entry["step"]: entry for entry in _train_logs(full_dir)}
    resumed = {entry["step"]: entry for entry in _train_logs(resumed_dir)}
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # steps 1-3 come from the checkpoint's history
    assert _json(os.path.join(resumed_dir, "trainer_state.json"))["global_step"] == 6
    peak = 0.05 * 8 / 512
    for step in (4, 5, 6):
        expected = simmim_lr_at(step - 1, peak, 6, 2, 1e-6 * 8 / 512, 1e-5 * 8 / 512)
        assert resumed[step]["learning_rate"] == pytest.approx(expected, rel=1e-9)
        assert full[step]["learning_rate"] == pytest.approx(expected, rel=1e-9)
    # the resumed run trained steps 4-6 only (its train metrics cover this call)
    assert _json(os.path.join(resumed_dir, "train_results.json"))["train_steps_per_second"] > 0


@pytest.mark.slow
def test_help_in_a_fresh_process():
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "run_mim.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0 and "--base_learning_rate" in result.stdout


@pytest.mark.slow
def test_two_processes_scale_the_lr_by_the_world_size(tmp_path):
    """torchrun with 2 CPU processes (gloo): total batch = 2 x per-device batch, lr scaled accordingly."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    output_dir = tmp_path / "ddp"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        os.path.join(ROOT, "run_mim.py"),
        *TINY,
        "--per_device_train_batch_size",
        "4",
        "--output_dir",
        str(output_dir),
        "--max_steps",
        "3",
        "--warmup_steps",
        "1",
        "--max_train_samples",
        "32",
        "--max_eval_samples",
        "8",
        "--base_learning_rate",
        "0.5",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    logs = _train_logs(str(output_dir))
    assert logs[-1]["epoch"] == pytest.approx(0.75)  # 32 images / (4 x 2) = 4 steps per epoch
    assert logs[1]["learning_rate"] == pytest.approx(
        simmim_lr_at(1, 0.5 * 8 / 512, 3, 1, 1e-6 * 8 / 512, 1e-5 * 8 / 512)
    )


@pytest.mark.slow
def test_demo_recipe_end_to_end(tmp_path):
    """The README's command 1 (make demo): the tiny Swin demo recipe on the bundled digits."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "run_mim.py"),
            os.path.join(ROOT, "configs/pretrain/demo_swin_tiny_cpu.yaml"),
            "--output_dir",
            str(tmp_path / "demo"),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Reconstructions in" in result.stdout
    logs = _train_logs(str(tmp_path / "demo"))
    assert np.mean([e["loss"] for e in logs[-3:]]) < 0.7 * logs[0]["loss"]
