"""The demo (`make demo`, `make demo-compare`): its verdict (modeling_simmim/demo.py) and the Makefile wiring."""

import json
import os
import subprocess
import sys

import pytest

from modeling_simmim import demo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = "configs/pretrain/demo_swin_tiny_cpu.yaml"
FINETUNE = "configs/finetune/demo_swin_tiny_cpu.yaml"


def _finetune_folder(path, top1, num_images=359, image_size=32, best_checkpoint=None):
    """What run_image_classification.py leaves for the report: eval_results.json, config.json, trainer_state.json."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "eval_results.json"), "w") as handle:
        json.dump({"eval_accuracy": top1, "eval_samples": num_images}, handle)
    with open(os.path.join(path, "config.json"), "w") as handle:
        json.dump({"model_type": "swin", "image_size": image_size}, handle)
    with open(os.path.join(path, "trainer_state.json"), "w") as handle:
        json.dump({"best_model_checkpoint": best_checkpoint, "log_history": []}, handle)
    return str(path)


def test_raw_pixel_baseline_is_measured_on_the_demo_split():
    """scikit-learn's logistic regression on the flattened evaluation-transformed pixels of the 359 validation
    digits (16 px here, for speed): far above chance (10%)."""
    top1, num_images = demo.raw_pixel_baseline(16)
    assert num_images == 359 and 0.85 < top1 < 1.0


def test_report_prints_each_run_beside_the_baseline(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "raw_pixel_baseline", lambda image_size, demo_dataset="digits": (0.958, 359))
    finetuned = _finetune_folder(tmp_path / "finetune", 0.9777)
    scratch = _finetune_folder(tmp_path / "scratch", 0.9471)
    demo.main(["--finetuned", finetuned])
    printed = capsys.readouterr().out
    assert "validation split (359 images)" in printed and "scratch" not in printed
    assert "SimMIM pretrained, finetuned (last epoch)" in printed and "97.8%" in printed
    assert "logistic regression on raw pixels (scikit-learn)   95.8%" in printed
    report = demo.main(["--finetuned", finetuned, "--scratch", scratch])
    lines = report.splitlines()
    assert [line.split()[-1] for line in lines[1:]] == ["97.8%", "94.7%", "95.8%"]
    assert "same finetuning from scratch (last epoch)" in lines[2]


def test_report_names_a_selected_checkpoint_and_refuses_another_split(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "raw_pixel_baseline", lambda image_size, demo_dataset="digits": (0.958, 359))
    selected = _finetune_folder(tmp_path / "best", 0.99, best_checkpoint="checkpoint-20")
    assert "best epoch, chosen on these images" in demo.main(["--finetuned", selected])
    finetuned = _finetune_folder(tmp_path / "finetune", 0.98)
    for name, kwargs in (("fewer", dict(num_images=48)), ("bigger", dict(image_size=64))):
        other = _finetune_folder(tmp_path / name, 0.9, **kwargs)
        with pytest.raises(ValueError, match="not the same split"):
            demo.main(["--finetuned", finetuned, "--scratch", other])
    with pytest.raises(ValueError, match="48 images at 32 px"):
        demo.main(["--finetuned", str(tmp_path / "fewer")])
    with pytest.raises(FileNotFoundError, match="run run_image_classification.py"):
        demo.main(["--finetuned", str(tmp_path / "missing")])


def _make_dry_run(target, **variables):
    assignments = [f"{key}={value}" for key, value in variables.items()]
    result = subprocess.run(
        ["make", "-n", "-s", "-o", ".venv/.installed", target, "PYTHON=python", *assignments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return [line.strip() for line in result.stdout.replace("\\\n", " ").splitlines() if line.strip()]


def test_make_targets_run_the_demo_recipes_in_order():
    """`make demo`: pretrain -> finetune from it -> the report; `make demo-compare` adds the identical finetuning with
    --from_scratch and reports all three. Extra flags reach the scripts."""
    commands = _make_dry_run("demo", DEMO_DIR="out", DEMO_PRETRAIN_ARGS="--seed 3", DEMO_FINETUNE_ARGS="--seed 4")
    assert len(commands) == 3
    assert commands[0].startswith(f"python run_mim.py {PRETRAIN} --output_dir out/pretrain")
    assert commands[0].endswith("--seed 3")
    assert commands[1].startswith(f"python run_image_classification.py {FINETUNE} --model_name_or_path out/pretrain")
    assert "--output_dir out/finetune" in commands[1] and commands[1].endswith("--seed 4")
    assert commands[2] == "python -m modeling_simmim.demo --finetuned out/finetune"
    compare = _make_dry_run("demo-compare", DEMO_DIR="out")
    assert compare[:2] == _make_dry_run("demo", DEMO_DIR="out")[:2] and len(compare) == 4
    scratch = compare[2].split()
    assert scratch[:5] == ["python", "run_image_classification.py", FINETUNE, "--model_name_or_path", "out/pretrain"]
    assert "--from_scratch true" in compare[2] and "--output_dir out/scratch" in compare[2]
    assert compare[3] == "python -m modeling_simmim.demo --finetuned out/finetune --scratch out/scratch"


@pytest.mark.slow
def test_make_demo_compare_runs_end_to_end_at_two_steps(tmp_path):
    """The real targets with this interpreter, two optimizer steps per script: the report prints three rows."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": ROOT}
    result = subprocess.run(
        [
            "make",
            "-s",
            "-o",
            ".venv/.installed",
            "demo-compare",
            f"PYTHON={sys.executable}",
            f"DEMO_DIR={tmp_path}",
            "DEMO_PRETRAIN_ARGS=--max_steps 2",
            "DEMO_FINETUNE_ARGS=--max_steps 2 --disable_tqdm true",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = result.stdout[result.stdout.rindex("Demo 'digits'") :]
    assert "(last epoch)" in report and "from scratch" in report and "logistic regression" in report
