#!/usr/bin/env python
"""The demo's evidence, measured: SimMIM pretraining + finetuning on the bundled digits vs the identical finetuning
from scratch, next to raw-pixel baselines, over several seeds. Used to choose the demo recipes
(configs/pretrain/demo_*.yaml + configs/finetune/demo_*.yaml); writes one results JSON per study.

    python benchmarks/digits_demo_study.py --name demo --seeds 0 1 2 \
        --pretrain configs/pretrain/demo_swin_tiny_cpu.yaml --finetune configs/finetune/demo_swin_tiny_cpu.yaml \
        [--pretrain_args "--hflip_prob 0.5"] [--finetune_args "--layer_decay 0.75"] [--no_scratch]

Per seed: `transformers.set_seed(seed)` before each script builds its model (the scripts build it before the
Trainer seeds), then `run_mim.py` and `run_image_classification.py` run in this process with the recipes plus the
given flags, `--seed seed`, and `--load_best_model_at_end false`: the reported top-1 is the LAST epoch's on the
validation split, never the best epoch selected on it. The scratch run is the same finetuning command with
`--from_scratch true`. Frozen-encoder probes (kNN, k=20, cosine, T=0.07; linear probe with BatchNorm) and the
raw-pixel logistic regression use the same train/validation split and the evaluation transform of the finetuning.
Times: wall clock and CPU time of this process per phase (with one torch thread, CPU time estimates the wall time
on an idle core when the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(function, *args, **kwargs) -> tuple[Any, dict[str, float]]:
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = function(*args, **kwargs)
    return result, {"wall_s": round(time.perf_counter() - wall, 2), "cpu_s": round(cpu_seconds() - cpu, 2)}


def eval_curve(output_dir: str) -> list[float]:
    """Top-1 after each evaluation of a finetuning run (from its trainer_state.json)."""
    path = os.path.join(output_dir, "trainer_state.json")
    if not os.path.isfile(path):
        return []
    with open(path) as handle:
        history = json.load(handle)["log_history"]
    return [round(entry["eval_accuracy"], 4) for entry in history if "eval_accuracy" in entry]


def finetune(args, seed: int, pretrained: str, output_dir: str, scratch: bool) -> dict[str, Any]:
    import transformers

    import run_image_classification

    argv = [
        args.finetune,
        "--model_name_or_path",
        pretrained,
        *shlex.split(args.finetune_args),
        "--seed",
        str(seed),
        "--output_dir",
        output_dir,
        "--overwrite_output_dir",
        "true",
        "--load_best_model_at_end",
        "false",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
    ]
    if scratch:
        argv += ["--from_scratch", "true"]
    transformers.set_seed(seed)
    results, times = timed(run_image_classification.main, argv)
    return {
        "top1": round(results["eval_accuracy"], 4),
        "top5": round(results["eval_top5_accuracy"], 4),
        "curve": eval_curve(output_dir),
        "steps": results.get("train_steps"),
        **times,
    }


def probes(pretrained: str, image_size: int, seed: int) -> dict[str, float]:
    """kNN and linear probe of the frozen pretrained encoder, of a random encoder of the same architecture, and
    logistic regression on the raw pixels, on the demo split through the finetuning's evaluation transform."""
    import torch
    import transformers

    from modeling_simmim import SimMIMForMaskedImageModeling
    from modeling_simmim.augmentation import build_classification_transform
    from modeling_simmim.data import load_demo_dataset
    from modeling_simmim.evaluation import (
        extract_features,
        knn_accuracy,
        linear_probe_accuracy,
        logistic_regression_accuracy,
        pixel_features,
    )

    splits = load_demo_dataset("digits", image_size=image_size)
    transform = build_classification_transform(image_size, train=False)

    def tensors(split):
        images = torch.stack([transform(image) for image in splits[split]["image"]])
        return images, torch.tensor(splits[split]["label"])

    (x_train, y_train), (x_val, y_val) = tensors("train"), tensors("validation")
    out: dict[str, float] = {}
    transformers.set_seed(seed)
    encoders = {"pretrained": SimMIMForMaskedImageModeling.from_pretrained(pretrained)}
    encoders["random"] = SimMIMForMaskedImageModeling(encoders["pretrained"].config)
    for name, model in encoders.items():
        f_train, f_val = extract_features(model, x_train), extract_features(model, x_val)
        out[f"knn_{name}"] = round(knn_accuracy(f_train, y_train, f_val, y_val), 4)
        out[f"linear_probe_{name}"] = round(linear_probe_accuracy(f_train, y_train, f_val, y_val, seed=seed), 4)
    p_train, p_val = pixel_features(x_train), pixel_features(x_val)
    out["knn_pixels"] = round(knn_accuracy(p_train, y_train, p_val, y_val), 4)
    out["linear_probe_pixels"] = round(linear_probe_accuracy(p_train, y_train, p_val, y_val, seed=seed), 4)
    out["logreg_pixels"] = round(logistic_regression_accuracy(p_train, y_train, p_val, y_val), 4)
    return out


def apply_experiment_patches(args) -> None:
    """Knobs the scripts do not expose, applied by patching this process (experiments only)."""
    if args.eval_full_image:
        import modeling_simmim.augmentation as augmentation

        augmentation.eval_resize_size = lambda image_size: image_size


def summary(values: list[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.mean(values), 4),
        "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="Study name: results in --results_dir/NAME.json.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pretrain", default="configs/pretrain/demo_swin_tiny_cpu.yaml")
    parser.add_argument("--finetune", default="configs/finetune/demo_swin_tiny_cpu.yaml")
    parser.add_argument("--pretrain_args", default="", help="Extra run_mim.py flags (one string).")
    parser.add_argument("--finetune_args", default="", help="Extra run_image_classification.py flags (one string).")
    parser.add_argument(
        "--pretrained",
        default=None,
        help="Reuse this pretraining folder ('{seed}' is replaced by the seed) instead of pretraining: "
        "ablations of the finetuning recipe.",
    )
    parser.add_argument("--no_scratch", action="store_true", help="Skip the from-scratch finetuning.")
    parser.add_argument("--no_probes", action="store_true", help="Skip kNN / linear probes / raw-pixel baselines.")
    parser.add_argument(
        "--eval_full_image",
        action="store_true",
        help="Experiment: evaluate on the whole image (resize to the model size, no centre crop of "
        "224/256; patches the finetuning's evaluation transform).",
    )
    parser.add_argument("--work_dir", default=os.path.join(ROOT, "outputs", "digits_demo_study"))
    parser.add_argument("--results_dir", default=os.path.join(ROOT, "benchmarks", "results", "digits_demo"))
    parser.add_argument(
        "--merge",
        nargs="+",
        default=None,
        help="Merge these studies (names in --results_dir) into --name instead of running.",
    )
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.name, args.results_dir)

    apply_experiment_patches(args)
    import run_mim

    record: dict[str, Any] = {
        "name": args.name,
        "command": "python benchmarks/digits_demo_study.py " + shlex.join(argv or sys.argv[1:]),
        "pretrain": args.pretrain,
        "finetune": args.finetune,
        "pretrain_args": args.pretrain_args,
        "finetune_args": args.finetune_args,
        "eval_full_image": args.eval_full_image,
        "machine": f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start",
        "runs": [],
    }
    os.makedirs(args.results_dir, exist_ok=True)
    results_path = os.path.join(args.results_dir, f"{args.name}.json")
    for seed in args.seeds:
        import transformers

        base = os.path.join(args.work_dir, args.name, f"seed{seed}")
        run: dict[str, Any] = {"seed": seed}
        if args.pretrained:
            pretrained = args.pretrained.replace("{seed}", str(seed))
            run["pretrained"] = pretrained
        else:
            pretrained = os.path.join(base, "pretrain")
            transformers.set_seed(seed)
            pre_results, pre_times = timed(
                run_mim.main,
                [
                    args.pretrain,
                    *shlex.split(args.pretrain_args),
                    "--seed",
                    str(seed),
                    "--output_dir",
                    pretrained,
                    "--overwrite_output_dir",
                    "true",
                    "--report_to",
                    "none",
                    "--disable_tqdm",
                    "true",
                ],
            )
            run["pretrain"] = {
                "eval_loss": round(pre_results.get("eval_loss", float("nan")), 4),
                "train_loss": round(pre_results.get("train_loss", float("nan")), 4),
                **pre_times,
            }
        run["finetune"] = finetune(args, seed, pretrained, os.path.join(base, "finetune"), scratch=False)
        if not args.no_scratch:
            run["scratch"] = finetune(args, seed, pretrained, os.path.join(base, "scratch"), scratch=True)
        if not args.no_probes:
            from modeling_simmim.configuration_simmim import SimMIMConfig

            image_size = SimMIMConfig.from_pretrained(pretrained).image_size[0]
            run["probes"], run["probe_times"] = timed(probes, pretrained, image_size, seed)
        record["runs"].append(run)
        print(json.dumps(run), flush=True)
        with open(results_path, "w") as handle:  # after every seed: a partial study is still readable
            json.dump(record, handle, indent=1)

    finish(record, results_path)
    return record


def finish(record: dict[str, Any], results_path: str) -> None:
    """Mean/std over the runs of `record` into record["summary"]; written to `results_path` and printed."""
    record["summary"] = {}
    for key in ("finetune", "scratch"):
        values = [run[key]["top1"] for run in record["runs"] if key in run]
        if values:
            record["summary"][f"{key}_top1"] = summary(values)
    for key in record["runs"][0].get("probes", {}):
        record["summary"][key] = summary([run["probes"][key] for run in record["runs"]])
    record["summary"]["time_s"] = {
        phase: summary([run[phase]["cpu_s"] for run in record["runs"] if phase in run])
        for phase in ("pretrain", "finetune", "scratch")
        if phase in record["runs"][0]
    }
    with open(results_path, "w") as handle:
        json.dump(record, handle, indent=1)
    print(json.dumps(record["summary"], indent=1))


def merge(names: list[str], name: str, results_dir: str) -> dict[str, Any]:
    """One study from several (e.g. one seed per process): their runs, their commands, a new summary."""
    records = []
    for part in names:
        with open(os.path.join(results_dir, f"{part}.json")) as handle:
            records.append(json.load(handle))
    record = {
        **records[0],
        "name": name,
        "command": [part["command"] for part in records],
        "runs": [run for part in records for run in part["runs"]],
    }
    finish(record, os.path.join(results_dir, f"{name}.json"))
    return record


if __name__ == "__main__":
    main()
