#!/usr/bin/env python
"""How long would a demo recipe take on an idle machine? Estimated on a busy one, relative to a reference recipe
whose idle time is known.

    python benchmarks/demo_timing.py --reference OLD_PRETRAIN.yaml OLD_FINETUNE.yaml --reference_idle_s 184 \
        --candidate configs/pretrain/demo_swin_tiny_cpu.yaml configs/finetune/demo_swin_tiny_cpu.yaml

Each script of each recipe runs as a subprocess twice, with `--max_steps` short and long, the reference and the
candidate interleaved so that they see the same load. The CPU time of a run (user + system of the subprocess) is
fixed cost + steps x step cost; the two runs give both. A recipe's CPU time is then fixed + its full number of steps
x step cost (evaluations counted at the recipe's frequency by running them in the timed runs too), and the idle
estimate is reference_idle_s x candidate CPU / reference CPU: CPU time is inflated by a busy machine (shared caches,
SMT siblings), by about the same factor for two recipes measured together.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_run(argv: list[str]) -> dict[str, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": ROOT}
    wall, cpu = time.perf_counter(), child_cpu()
    result = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{result.stderr[-3000:]}")
    return {"wall_s": time.perf_counter() - wall, "cpu_s": child_cpu() - cpu}


def recipe_steps(script: str, recipe: str, extra: list[str]) -> tuple[int, int]:
    """(optimizer steps of the full recipe, evaluation interval in steps or 0) from its parsed arguments."""
    sys.path.insert(0, ROOT)
    import run_image_classification
    import run_mim
    from modeling_simmim.data import load_demo_dataset, num_batches

    if script == "run_mim.py":
        training_args = run_mim.parse_args([recipe, *extra, "--output_dir", "/tmp/unused"])[2]
    else:
        training_args = run_image_classification.parse_args([recipe, *extra, "--output_dir", "/tmp/unused"])[3]
    train_size = len(load_demo_dataset("digits")["train"])
    per_epoch = num_batches(train_size, training_args.per_device_train_batch_size, training_args.dataloader_drop_last)
    steps = training_args.max_steps if training_args.max_steps > 0 else int(training_args.num_train_epochs * per_epoch)
    strategy = str(getattr(training_args.eval_strategy, "value", training_args.eval_strategy))
    interval = {"epoch": per_epoch, "steps": int(training_args.eval_steps or 0)}.get(strategy, 0)
    return steps, interval


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", nargs=2, required=True, metavar=("PRETRAIN", "FINETUNE"))
    parser.add_argument(
        "--reference_idle_s",
        type=float,
        required=True,
        help="Measured idle wall time of the reference (both scripts, environment ready).",
    )
    parser.add_argument("--candidate", nargs=2, required=True, metavar=("PRETRAIN", "FINETUNE"))
    parser.add_argument("--short_steps", type=int, default=10)
    parser.add_argument("--long_steps", type=int, default=50)
    parser.add_argument("--json", default=None, help="Write the estimate here.")
    args = parser.parse_args(argv)

    work = tempfile.mkdtemp(prefix="demo_timing_")
    recipes = {"reference": args.reference, "candidate": args.candidate}
    measured: dict[str, dict[str, dict[str, float]]] = {name: {} for name in recipes}
    # the finetuning needs a pretrained folder of the same architecture: a 2-step pretraining of each recipe
    pretrained = {}
    for name, (pretrain, _) in recipes.items():
        pretrained[name] = os.path.join(work, name, "pretrained")
        timed_run(
            [
                "run_mim.py",
                pretrain,
                "--max_steps",
                "2",
                "--output_dir",
                pretrained[name],
                "--overwrite_output_dir",
                "true",
                "--do_eval",
                "false",
                "--report_to",
                "none",
            ]
        )
    for steps in (args.short_steps, args.long_steps):
        for name, (pretrain, finetune) in recipes.items():
            for script, recipe, extra in (
                ("run_mim.py", pretrain, []),
                ("run_image_classification.py", finetune, ["--model_name_or_path", pretrained[name]]),
            ):
                _, interval = recipe_steps(script, recipe, extra)
                flags = [
                    "--max_steps",
                    str(steps),
                    "--output_dir",
                    os.path.join(work, name, f"{script}_{steps}"),
                    "--overwrite_output_dir",
                    "true",
                    "--report_to",
                    "none",
                    "--save_strategy",
                    "no",
                ]
                if interval:  # evaluate as often (in steps) as the full recipe does
                    flags += ["--eval_strategy", "steps", "--eval_steps", str(interval)]
                if script == "run_image_classification.py":  # no checkpoints to select from (a few ms each)
                    flags += ["--load_best_model_at_end", "false"]
                measured[name][f"{script}_{steps}"] = timed_run([script, recipe, *extra, *flags])
    estimate: dict[str, dict[str, float]] = {}
    for name, (pretrain, finetune) in recipes.items():
        total = 0.0
        for script, recipe, extra in (
            ("run_mim.py", pretrain, []),
            ("run_image_classification.py", finetune, ["--model_name_or_path", pretrained[name]]),
        ):
            short, long = measured[name][f"{script}_{args.short_steps}"], measured[name][f"{script}_{args.long_steps}"]
            per_step = (long["cpu_s"] - short["cpu_s"]) / (args.long_steps - args.short_steps)
            fixed = short["cpu_s"] - args.short_steps * per_step
            steps, _ = recipe_steps(script, recipe, extra)
            cpu = fixed + steps * per_step
            estimate.setdefault(name, {})[script] = {
                "steps": steps,
                "cpu_per_step_s": round(per_step, 4),
                "fixed_cpu_s": round(fixed, 1),
                "cpu_s": round(cpu, 1),
            }
            total += cpu
        estimate[name]["total_cpu_s"] = round(total, 1)
    ratio = estimate["candidate"]["total_cpu_s"] / estimate["reference"]["total_cpu_s"]
    result = {
        "measured": measured,
        "estimate": estimate,
        "ratio": round(ratio, 3),
        "candidate_idle_estimate_s": round(args.reference_idle_s * ratio, 1),
        "load_average": os.getloadavg(),
        "args": vars(args),
    }
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=1)
    return result


if __name__ == "__main__":
    main()
