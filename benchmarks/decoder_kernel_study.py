#!/usr/bin/env python
"""The checkerboard question: does a decoder with spatial context (`decoder_kernel_size=3`) reconstruct without the
block-edge artifacts of the official 1x1 decoder, and does it change what the encoder learns? On the digits demo
recipes (configs/pretrain|finetune/demo_swin_tiny_cpu.yaml), per seed and kernel:

    nice -n 5 python benchmarks/decoder_kernel_study.py --seeds 0 1 2 --kernels 1 3 \
        [--reuse 'outputs/demo_runs/seed{seed}']   # kernel 1 = the demo itself: reuse `make demo` folders

- pretraining with `--decoder_kernel_size K --seed S` (or, with --reuse and K=1, the demo's pretraining folder);
- masked-pixel L1: the mean absolute error over the masked pixels of the 359 validation digits (normalized pixel
  units, the SimMIM loss), with fixed masks (`IndexSeededMasks`, seed 0), through the pretraining's evaluation
  transform;
- block-edge artifact: in the reconstructions, the mean absolute difference between horizontally or vertically
  adjacent pixels that are both masked, split into pairs that straddle an encoder-stride block border and pairs
  inside a block; `edge_ratio` = across / inside (the same ratio of the true images is the reference: a
  reconstruction without block artifacts has about the ground truth's ratio);
- downstream top-1: the demo finetuning (last epoch, nothing selected on the validation images), or with --reuse
  and K=1, the demo folder's `finetune/eval_results.json`.

A seed/kernel whose folders already hold a finished run (finetune/eval_results.json) is measured, not retrained.

Results: benchmarks/results/decoder_kernel/NAME.json (after every run), with the mean and std per kernel.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PRETRAIN = os.path.join(ROOT, "configs", "pretrain", "demo_swin_tiny_cpu.yaml")
FINETUNE = os.path.join(ROOT, "configs", "finetune", "demo_swin_tiny_cpu.yaml")


def adjacent_jumps(images: torch.Tensor, masked: torch.Tensor, stride: int) -> dict[str, float]:
    """Mean |difference| (over channels) of horizontally or vertically adjacent pixels that are both masked, for pairs
    straddling an encoder-stride block border vs pairs inside a block. `images` (B, C, H, W), `masked` (B, H, W)."""
    height, width = images.shape[-2:]
    horizontal = (images[..., :, 1:] - images[..., :, :-1]).abs().mean(dim=1)  # (B, H, W-1): pixel x vs x+1
    vertical = (images[..., 1:, :] - images[..., :-1, :]).abs().mean(dim=1)  # (B, H-1, W)
    both_h = masked[:, :, 1:] & masked[:, :, :-1]
    both_v = masked[:, 1:, :] & masked[:, :-1, :]
    border_h = ((torch.arange(width - 1) + 1) % stride == 0).view(1, 1, -1).expand_as(both_h)
    border_v = ((torch.arange(height - 1) + 1) % stride == 0).view(1, -1, 1).expand_as(both_v)
    across = torch.cat([horizontal[both_h & border_h], vertical[both_v & border_v]]).mean().item()
    inside = torch.cat([horizontal[both_h & ~border_h], vertical[both_v & ~border_v]]).mean().item()
    return {
        "across_borders": across,
        "inside_blocks": inside,
        "edge_ratio": across / inside if inside > 0 else float("inf"),
    }


@torch.no_grad()
def reconstruction_metrics(pretrained: str, mask_seed: int = 0) -> dict[str, float]:
    """Masked-pixel L1 and the block-edge artifact measure of a pretraining folder on the demo validation digits."""
    from modeling_simmim import SimMIMForMaskedImageModeling, SimMIMMaskGenerator
    from modeling_simmim.data import IndexSeededMasks, build_pretrain_transform, load_demo_dataset

    model = SimMIMForMaskedImageModeling.from_pretrained(pretrained).eval()
    config = model.config
    image_size = config.image_size[0]
    transform = build_pretrain_transform(image_size, train=False)
    split = load_demo_dataset("digits", image_size=image_size)["validation"]
    masks = IndexSeededMasks(
        SimMIMMaskGenerator(image_size, config.mask_patch_size, config.model_patch_size, config.mask_ratio),
        seed=mask_seed,
    )
    images = torch.stack([transform(image) for image in split["image"]])
    mask = torch.stack([torch.as_tensor(masks(index, {})["bool_masked_pos"]) for index in range(len(images))]).bool()
    reconstruction = model(images, bool_masked_pos=mask).reconstruction
    patch = config.model_patch_size
    pixel_mask = mask.repeat_interleave(patch, 1).repeat_interleave(patch, 2)  # (B, H, W)
    l1 = (reconstruction - images).abs().mean(dim=1)[pixel_mask].mean().item()
    stride = config.encoder_stride
    ours, truth = adjacent_jumps(reconstruction, pixel_mask, stride), adjacent_jumps(images, pixel_mask, stride)
    return {
        "masked_l1": round(l1, 4),
        **{k: round(v, 4) for k, v in ours.items()},
        "true_edge_ratio": round(truth["edge_ratio"], 4),
        "images": len(images),
    }


def last_top1(finetune_dir: str) -> float:
    with open(os.path.join(finetune_dir, "eval_results.json")) as handle:
        return round(json.load(handle)["eval_accuracy"], 4)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.mean(values), 4),
        "std": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0,
        "n": len(values),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", default="digits_demo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--kernels", type=int, nargs="+", default=[1, 3])
    parser.add_argument(
        "--reuse",
        default=None,
        help="Demo folder per seed ('{seed}' replaced) holding pretrain/ and finetune/ of `make demo` "
        "with --seed: used for kernel 1 (the demo recipe is kernel 1) instead of training again.",
    )
    parser.add_argument("--pretrain_args", default="", help="Extra run_mim.py flags (one string).")
    parser.add_argument("--finetune_args", default="", help="Extra run_image_classification.py flags (one string).")
    parser.add_argument("--work_dir", default=os.path.join(ROOT, "outputs", "decoder_kernel_study"))
    parser.add_argument("--results_dir", default=os.path.join(ROOT, "benchmarks", "results", "decoder_kernel"))
    args = parser.parse_args(argv)

    import run_image_classification
    import run_mim

    record: dict[str, Any] = {
        "command": "python benchmarks/decoder_kernel_study.py "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start",
        "runs": [],
    }
    os.makedirs(args.results_dir, exist_ok=True)
    path = os.path.join(args.results_dir, f"{args.name}.json")
    for seed in args.seeds:
        for kernel in args.kernels:
            run: dict[str, Any] = {"seed": seed, "decoder_kernel_size": kernel}
            reuse = args.reuse.replace("{seed}", str(seed)) if args.reuse and kernel == 1 else None
            base = os.path.join(args.work_dir, f"k{kernel}_seed{seed}")
            if reuse:
                pretrained, finetuned = os.path.join(reuse, "pretrain"), os.path.join(reuse, "finetune")
                run["reused"] = reuse
            else:
                pretrained, finetuned = os.path.join(base, "pretrain"), os.path.join(base, "finetune")
            if os.path.isfile(os.path.join(finetuned, "eval_results.json")):
                run["reused"] = run.get("reused", os.path.realpath(os.path.dirname(finetuned)))  # measured only
            else:
                run_mim.main(
                    [
                        PRETRAIN,
                        *shlex.split(args.pretrain_args),
                        "--decoder_kernel_size",
                        str(kernel),
                        "--seed",
                        str(seed),
                        "--output_dir",
                        pretrained,
                        "--overwrite_output_dir",
                        "true",
                        "--disable_tqdm",
                        "true",
                    ]
                )
                run_image_classification.main(
                    [
                        FINETUNE,
                        "--model_name_or_path",
                        pretrained,
                        *shlex.split(args.finetune_args),
                        "--seed",
                        str(seed),
                        "--output_dir",
                        finetuned,
                        "--overwrite_output_dir",
                        "true",
                        "--disable_tqdm",
                        "true",
                    ]
                )
            run.update(reconstruction_metrics(pretrained))
            run["top1"] = last_top1(finetuned)
            record["runs"].append(run)
            print(json.dumps(run), flush=True)
            with open(path, "w") as handle:
                json.dump(record, handle, indent=1)
    record["summary"] = {
        str(kernel): {
            key: summary([run[key] for run in record["runs"] if run["decoder_kernel_size"] == kernel])
            for key in ("masked_l1", "across_borders", "inside_blocks", "edge_ratio", "true_edge_ratio", "top1")
        }
        for kernel in args.kernels
    }
    with open(path, "w") as handle:
        json.dump(record, handle, indent=1)
    print(json.dumps(record["summary"], indent=1))
    return record


if __name__ == "__main__":
    main()
