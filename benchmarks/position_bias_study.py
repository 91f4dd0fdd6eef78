#!/usr/bin/env python
"""Does moving the relative position bias to a larger window lose accuracy? Finetune the digits demo's pretraining
(32 px, window 4) at 64 px / window 8 with three ways of moving its bias tables (7x7 offsets -> 15x15):

- `geometric`: the official resize (geometric source coordinates + bicubic spline; what this package does);
- `bicubic`: plain bicubic resampling of each head's offset grid (`torch.nn.functional.interpolate`,
  align_corners=False);
- `reinit`: new tables (truncated normal, std 0.02, the official init), what `ignore_mismatched_sizes=True` gives.

    nice -n 5 python benchmarks/position_bias_study.py --pretrained 'outputs/demo_runs/seed{seed}/pretrain' \
        --seeds 0 1 2 [--methods geometric bicubic reinit] [--finetune_args "--num_train_epochs 30"]

Each run is `run_image_classification.py configs/finetune/demo_swin_tiny_cpu.yaml --image_size 64 --window_size 8
--seed S` from the seed's pretraining (make it with `make demo DEMO_PRETRAIN_ARGS="--seed S" ...` or run_mim.py),
in this process with the table resize patched; top-1 is the last epoch's (the recipe selects nothing on the
validation images). Results: benchmarks/results/position_bias/NAME.json, mean and std per method.

    python benchmarks/position_bias_study.py --misclassified OUTPUT_DIR [OUTPUT_DIR ...]

lists which validation digits each finetuned folder gets wrong (the study's own evaluation, rebuilt: the demo split
stored at --image_size, the recipe's resize + centre crop), e.g. to see whether equal top-1 values of two runs are
the same model.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FINETUNE = os.path.join(ROOT, "configs", "finetune", "demo_swin_tiny_cpu.yaml")
METHODS = ("geometric", "bicubic", "reinit")


def bicubic_resize(
    table: torch.Tensor, source_window: tuple[int, int], target_window: tuple[int, int], num_extra_tokens: int = 0
) -> torch.Tensor:
    """Plain bicubic resampling of each head's (2h-1) x (2w-1) offset grid to the target window's."""
    source_h, source_w = 2 * source_window[0] - 1, 2 * source_window[1] - 1
    target_h, target_w = 2 * target_window[0] - 1, 2 * target_window[1] - 1
    extra = table[table.shape[0] - num_extra_tokens :] if num_extra_tokens else table[:0]
    grid = table[: source_h * source_w].T.reshape(1, -1, source_h, source_w).float()
    resized = torch.nn.functional.interpolate(grid, size=(target_h, target_w), mode="bicubic", align_corners=False)
    return torch.cat([resized.reshape(-1, target_h * target_w).T.to(table.dtype), extra], dim=0)


def reinitialized(
    table: torch.Tensor, source_window: tuple[int, int], target_window: tuple[int, int], num_extra_tokens: int = 0
) -> torch.Tensor:
    """A new table of the target window (official init: truncated normal, std 0.02); nothing transferred."""
    rows = (2 * target_window[0] - 1) * (2 * target_window[1] - 1) + num_extra_tokens
    return torch.nn.init.trunc_normal_(torch.empty(rows, table.shape[1], dtype=table.dtype), std=0.02)


def use_method(method: str) -> None:
    """Make the weight transfer move bias tables with `method` (this process only)."""
    import modeling_simmim.weight_transfer as transfer

    if not hasattr(transfer, "_official_resize"):
        transfer._official_resize = transfer.resize_relative_position_bias_table
    transfer.resize_relative_position_bias_table = {
        "geometric": transfer._official_resize,
        "bicubic": bicubic_resize,
        "reinit": reinitialized,
    }[method]


def misclassified(output_dirs: list[str], image_size: int) -> dict[str, list[int]]:
    """Indices of the validation digits each finetuned folder (a transformers folder) classifies wrongly."""
    from transformers import AutoModelForImageClassification

    from modeling_simmim.augmentation import build_classification_transform
    from modeling_simmim.demo_data import load_demo_dataset

    split = load_demo_dataset("digits", image_size=image_size)["validation"]  # what the script evaluates on
    transform = build_classification_transform(image_size, train=False)
    pixel_values = torch.stack([transform(image) for image in split["image"]])
    labels = torch.as_tensor(split["label"])
    wrong = {}
    for output_dir in output_dirs:
        model = AutoModelForImageClassification.from_pretrained(output_dir).eval()
        with torch.no_grad():
            predictions = model(pixel_values=pixel_values).logits.argmax(-1)
        wrong[output_dir] = (predictions != labels).nonzero().flatten().tolist()
        top1 = 1 - len(wrong[output_dir]) / len(labels)
        print(f"{output_dir}: top-1 {top1:.4f}, wrong: {wrong[output_dir]}", flush=True)
    return wrong


def summary(values: list[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.mean(values), 4),
        "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", help="Pretraining folder; '{seed}' is replaced by the seed.")
    parser.add_argument("--name", default="digits_32w4_to_64w8")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--window_size", type=int, default=8)
    parser.add_argument("--finetune_args", default="", help="Extra run_image_classification.py flags (one string).")
    parser.add_argument("--work_dir", default=os.path.join(ROOT, "outputs", "position_bias_study"))
    parser.add_argument("--results_dir", default=os.path.join(ROOT, "benchmarks", "results", "position_bias"))
    parser.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="Only combine the runs of results files (e.g. seeds run in parallel processes) into --name's file.",
    )
    parser.add_argument(
        "--misclassified",
        nargs="+",
        default=None,
        metavar="OUTPUT_DIR",
        help="Only list the validation digits that finetuned folders get wrong (at --image_size).",
    )
    args = parser.parse_args(argv)
    if args.misclassified:
        return {"misclassified": misclassified(args.misclassified, args.image_size)}
    if args.merge:
        return merge(args.merge, os.path.join(args.results_dir, f"{args.name}.json"))

    if not args.pretrained:
        parser.error("--pretrained is required to run the study")
    import run_image_classification

    record: dict[str, Any] = {
        "command": "python benchmarks/position_bias_study.py "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
        "load_average_at_start": os.getloadavg()[0],
        "runs": [],
    }
    os.makedirs(args.results_dir, exist_ok=True)
    path = os.path.join(args.results_dir, f"{args.name}.json")
    for seed in args.seeds:
        for method in args.methods:
            use_method(method)
            started = time.perf_counter()
            output_dir = os.path.join(args.work_dir, args.name, f"{method}_seed{seed}")
            results = run_image_classification.main(
                [
                    FINETUNE,
                    "--model_name_or_path",
                    args.pretrained.replace("{seed}", str(seed)),
                    "--image_size",
                    str(args.image_size),
                    "--window_size",
                    str(args.window_size),
                    *shlex.split(args.finetune_args),
                    "--seed",
                    str(seed),
                    "--output_dir",
                    output_dir,
                    "--overwrite_output_dir",
                    "true",
                    "--disable_tqdm",
                    "true",
                ]
            )
            run = {
                "seed": seed,
                "method": method,
                "top1": round(results["eval_accuracy"], 4),
                "wall_s": round(time.perf_counter() - started, 1),
            }
            record["runs"].append(run)
            print(json.dumps(run), flush=True)
            with open(path, "w") as handle:
                json.dump(record, handle, indent=1)
    return summarize(record, path)


def summarize(record: dict[str, Any], path: str) -> dict[str, Any]:
    """Mean and std of top-1 per method over the seeds; written to `path` and printed."""
    methods = list(dict.fromkeys(run["method"] for run in record["runs"]))
    record["summary"] = {
        method: summary([run["top1"] for run in record["runs"] if run["method"] == method]) for method in methods
    }
    with open(path, "w") as handle:
        json.dump(record, handle, indent=1)
    print(json.dumps(record["summary"], indent=1))
    return record


def merge(paths: list[str], path: str) -> dict[str, Any]:
    records = []
    for source in paths:
        with open(source) as handle:
            records.append(json.load(handle))
    merged: dict[str, Any] = {
        "commands": [record["command"] for record in records],
        "merged_from": [os.path.relpath(source, ROOT) for source in paths],
        "runs": sorted((run for record in records for run in record["runs"]), key=lambda r: (r["seed"], r["method"])),
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return summarize(merged, path)


if __name__ == "__main__":
    main()
