"""The demo's verdict (`make demo`, `make demo-compare`): the finetuned top-1 next to the raw-pixel baseline.

    python -m modeling_simmim.demo --finetuned outputs/demo/finetune [--scratch outputs/demo/scratch]

Prints the final evaluation of each finetuning run (`eval_results.json`: the model at the end of training; the demo
recipe keeps the last epoch, nothing selected on the validation images) beside scikit-learn's logistic regression
(defaults) on the raw pixels of the same bundled split, measured here: the images through the finetuning's
evaluation transform (resize, centre crop, normalize) at the finetuned model's resolution, flattened.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

from .data import DEMO_DATASETS, load_demo_dataset


@dataclass
class FinetuneResult:
    """The final evaluation of one finetuning output folder."""

    top1: float
    num_images: int
    image_size: int
    selected_on_validation: bool  # the exported model is a best checkpoint chosen on the validation images


def read_finetune_result(output_dir: str) -> FinetuneResult:
    """Top-1 of the final evaluation of `run_image_classification.py`'s `output_dir`, its image count and size."""
    path = os.path.join(output_dir, "eval_results.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No {path}: run run_image_classification.py with --output_dir {output_dir} first "
            "(with an evaluation split)."
        )
    with open(path, encoding="utf-8") as handle:
        metrics = json.load(handle)
    with open(os.path.join(output_dir, "config.json"), encoding="utf-8") as handle:
        image_size = json.load(handle)["image_size"]
    state_path = os.path.join(output_dir, "trainer_state.json")
    selected = False
    if os.path.isfile(state_path):
        with open(state_path, encoding="utf-8") as handle:
            selected = json.load(handle).get("best_model_checkpoint") is not None
    size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
    return FinetuneResult(float(metrics["eval_accuracy"]), int(metrics["eval_samples"]), int(size), selected)


def raw_pixel_baseline(image_size: int, demo_dataset: str = "digits") -> tuple[float, int]:
    """(top-1, validation images) of scikit-learn's logistic regression (defaults, enough iterations to converge)
    on the raw pixels of the bundled demo split, through the finetuning's evaluation transform at `image_size`."""
    import torch

    from .augmentation import build_classification_transform
    from .evaluation import logistic_regression_accuracy, pixel_features

    splits = load_demo_dataset(demo_dataset, image_size=image_size)  # the split the scripts use (seed 0)
    transform = build_classification_transform(image_size, train=False)

    def tensors(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([transform(image) for image in splits[split]["image"]])
        return pixel_features(images), torch.tensor(splits[split]["label"])

    (x_train, y_train), (x_val, y_val) = tensors("train"), tensors("validation")
    return logistic_regression_accuracy(x_train, y_train, x_val, y_val), len(y_val)


def render_report(rows: Sequence[tuple[str, float]], num_images: int, demo_dataset: str) -> str:
    width = max(len(name) for name, _ in rows)
    lines = [f"Demo '{demo_dataset}', validation split ({num_images} images), top-1:"]
    lines += [f"  {name:<{width}}  {100 * top1:5.1f}%" for name, top1 in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--finetuned", required=True, help="Output folder of the finetuning from SimMIM pretraining.")
    parser.add_argument("--scratch", default=None, help="Output folder of the same finetuning with --from_scratch.")
    parser.add_argument("--demo_dataset", default="digits", choices=DEMO_DATASETS)
    args = parser.parse_args(argv)

    runs = [("SimMIM pretrained, finetuned", read_finetune_result(args.finetuned))]
    if args.scratch is not None:
        runs.append(("same finetuning from scratch", read_finetune_result(args.scratch)))
    image_size = runs[0][1].image_size
    baseline, num_images = raw_pixel_baseline(image_size, args.demo_dataset)
    rows = []
    for name, result in runs:
        if result.num_images != num_images or result.image_size != image_size:
            raise ValueError(
                f"{name}: evaluated on {result.num_images} images at {result.image_size} px, the demo "
                f"split has {num_images} at {image_size} px: not the same split, nothing to compare."
            )
        when = "best epoch, chosen on these images" if result.selected_on_validation else "last epoch"
        rows.append((f"{name} ({when})", result.top1))
    rows.append(("logistic regression on raw pixels (scikit-learn)", baseline))
    report = render_report(rows, num_images, args.demo_dataset)
    print("\n" + report)
    return report


if __name__ == "__main__":
    main()
