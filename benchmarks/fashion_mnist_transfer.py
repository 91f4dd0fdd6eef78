#!/usr/bin/env python
"""Does SimMIM pretraining help on real images? Fashion-MNIST, few labels, pretrained vs from scratch.

Data: Debian's `dataset-fashion-mnist` (no network at run time):

    sudo apt-get install -y dataset-fashion-mnist      # idx files in /usr/share/datasets/fashion-mnist

Protocol (one command; with the defaults 40 min of wall time on an idle 2-vCPU AMD EPYC with AVX512: pretraining
11 min, the 18 finetuning runs 22 min (about 1 min each for k = 10 and 100, 2 min for all), the pooled-feature
probes 6 min; about 50 min on an AVX2 CPU, where the pretraining takes 15 min; one torch thread per run):

    python benchmarks/fashion_mnist_transfer.py [--seeds 0 1 2] [--shots 10 100 all]

1. The idx files are read (a tiny reader below) and written once as PNG image folders (`train/<class>/`,
   `test/<class>/`) under `--work_dir`.
2. SimMIM pretraining (`run_mim.py benchmarks/recipes/fashion_mnist_pretrain.yaml`) on the 60,000 training images,
   labels unused. Its kNN monitor (`--knn_eval_dir`) watches 100 + 100 labelled training images per class.
3. For each k in `--shots` (labelled images per class; "all" = the 60,000) and each seed: a class-balanced subset
   drawn with that seed; `run_image_classification.py benchmarks/recipes/fashion_mnist_finetune.yaml` finetunes the
   pretrained encoder and, identically, the same architecture from scratch (`--from_scratch true`); both are
   evaluated once, after the last step, on the 10,000 test images (nothing is selected on the test set).
4. Frozen encoders (the pretrained one and a random one of the same architecture): kNN (k=20, cosine, T=0.07) and a
   linear probe (BatchNorm + linear, MAE) on pooled features of the same k-shot subsets; the same probes and
   scikit-learn's logistic regression on the raw pixels.
5. Mean and std over seeds; results JSON (`--results`) and a Markdown table (printed, and in the JSON).

The seeds vary the labelled subset and every initialization/augmentation of the finetuning runs; the pretraining
runs once (seed `--pretrain_seed`); `--pretrained DIR` reuses one, so seeds can run as parallel processes (then
`--merge`).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASS_NAMES = (
    "0_tshirt_top",
    "1_trouser",
    "2_pullover",
    "3_dress",
    "4_coat",
    "5_sandal",
    "6_shirt",
    "7_sneaker",
    "8_bag",
    "9_ankle_boot",
)  # sorted folder names = label order
IDX_TYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
INSTALL_HINT = (
    "Fashion-MNIST not found in {dir}: install Debian's package (sudo apt-get install -y "
    "dataset-fashion-mnist) or pass --data_dir DIR holding the four idx files (.gz or not)."
)


# ----------------------------------------------------------------------------------------------------------------
# Data
def read_idx(path: str) -> np.ndarray:
    """An idx file (LeCun's MNIST format, optionally gzipped) as a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in IDX_TYPES:
        raise ValueError(f"{path} is not an idx file (bad magic number {data[:4].hex()}).")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(IDX_TYPES[data[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - offset != expected:
        raise ValueError(f"{path}: header says {shape} ({expected} bytes) but {len(data) - offset} bytes follow.")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)


def find_idx(data_dir: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        if os.path.isfile(os.path.join(data_dir, name)):
            return os.path.join(data_dir, name)
    raise FileNotFoundError(INSTALL_HINT.format(dir=data_dir))


def load_fashion_mnist(data_dir: str = DEBIAN_DIR) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train": (images (60000, 28, 28) uint8, labels (60000,)), "test": (10000 ...)}."""
    splits = {}
    for split, (images_stem, labels_stem) in FILES.items():
        images, labels = read_idx(find_idx(data_dir, images_stem)), read_idx(find_idx(data_dir, labels_stem))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{split}: images {images.shape} and labels {labels.shape} do not match.")
        splits[split] = (images, labels.astype(np.int64))
    return splits


def write_image_folder(images: np.ndarray, labels: np.ndarray, root: str) -> str:
    """`root/<class>/<index>.png` for every image (once: a finished folder has a `.complete` marker)."""
    from PIL import Image

    marker = os.path.join(root, ".complete")
    if os.path.isfile(marker):
        return root
    for name in CLASS_NAMES:
        os.makedirs(os.path.join(root, name), exist_ok=True)
    for index, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image, mode="L").save(
            os.path.join(root, CLASS_NAMES[label], f"{index:05d}.png"), compress_level=1
        )
    open(marker, "w").close()
    return root


def balanced_subset(labels: np.ndarray, per_class: int | None, seed: int, exclude: Sequence[int] = ()) -> np.ndarray:
    """Sorted indices of `per_class` random examples of each class (all of them for None), drawn with `seed`."""
    if per_class is None:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    excluded = set(int(i) for i in exclude)
    chosen = []
    for label in range(len(CLASS_NAMES)):
        candidates = [i for i in np.flatnonzero(labels == label) if int(i) not in excluded]
        if len(candidates) < per_class:
            raise ValueError(f"class {label} has {len(candidates)} examples, fewer than {per_class}.")
        chosen.extend(rng.choice(candidates, size=per_class, replace=False))
    return np.sort(np.asarray(chosen))


def link_subset(source_root: str, labels: np.ndarray, indices: np.ndarray, root: str) -> str:
    """An image folder of symbolic links to the chosen images of `source_root` (made once)."""
    marker = os.path.join(root, ".complete")
    if os.path.isfile(marker):
        return root
    for index in indices:
        name = CLASS_NAMES[labels[index]]
        os.makedirs(os.path.join(root, name), exist_ok=True)
        target = os.path.join(root, name, f"{index:05d}.png")
        if not os.path.lexists(target):
            os.symlink(os.path.abspath(os.path.join(source_root, name, f"{index:05d}.png")), target)
    open(marker, "w").close()
    return root


def shot_label(shot: int | None) -> str:
    return "all" if shot is None else str(shot)


# ----------------------------------------------------------------------------------------------------------------
# Runs
def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def timed(function, *args, **kwargs):
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = function(*args, **kwargs)
    return result, {"wall_s": round(time.perf_counter() - wall, 1), "cpu_s": round(cpu_seconds() - cpu, 1)}


def finetune_steps(args, shot: int | None, num_images: int) -> int:
    """Optimizer steps of one finetuning run: `--finetune_steps` for k-shot subsets; for "all", `--all_epochs`
    epochs of the full training set."""
    if shot is None:
        return max(1, int(args.all_epochs * (num_images // args.batch_size)))
    return args.finetune_steps


def run_finetune(
    args, pretrained: str, train_dir: str, test_dir: str, output_dir: str, seed: int, steps: int, scratch: bool = False
) -> dict[str, Any]:
    import transformers

    import run_image_classification

    argv = [
        args.finetune_recipe,
        "--model_name_or_path",
        pretrained,
        "--train_dir",
        train_dir,
        "--validation_dir",
        test_dir,
        "--max_steps",
        str(steps),
        "--per_device_train_batch_size",
        str(args.batch_size),
        "--seed",
        str(seed),
        "--output_dir",
        output_dir,
        "--overwrite_output_dir",
        "true",
        "--eval_strategy",
        "no",
        "--save_strategy",
        "no",
        "--load_best_model_at_end",
        "false",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--verify_images",
        "false",
        *shlex.split(args.finetune_args),
    ]
    if scratch:
        argv += ["--from_scratch", "true"]
    transformers.set_seed(seed)  # the script builds the model (new head / scratch weights) before the Trainer seeds
    results, times = timed(run_image_classification.main, argv)
    return {"top1": round(100 * results["eval_accuracy"], 2), "steps": steps, **times}


def encoder_features(model, images: np.ndarray, image_size: int, batch_size: int = 512, kind: str = "pooled"):
    """Features of uint8 gray images through the finetuning's evaluation transform: "pooled" (the encoder's pooled
    final features, what a classifier head sees) or "map" (the final feature map, flattened: channels x tokens)."""
    import torch
    from PIL import Image

    from modeling_simmim.augmentation import build_classification_transform
    from modeling_simmim.evaluation import extract_features

    transform = build_classification_transform(image_size, train=False)
    features = []
    model.eval()
    for start in range(0, len(images), batch_size):
        batch = torch.stack(
            [transform(Image.fromarray(image, mode="L")) for image in images[start : start + batch_size]]
        )
        if kind == "pooled":
            features.append(extract_features(model, batch, batch_size=batch_size))
        else:
            with torch.no_grad():
                feature_map, _ = model.backbone_adapter.feature_map(model.backbone, batch)
            features.append(feature_map.flatten(1).float())
    return torch.cat(features)


def run_probes(
    pretrained: str, data: dict, subsets: dict, seeds: Sequence[int], pretrain_seed: int, kind: str = "pooled"
) -> dict:
    """kNN and linear probes of the frozen pretrained / random encoder and of raw pixels, per shot and seed. `kind`
    "map" probes the flattened final feature maps instead of the pooled features (rows `*_map`; no pixel rows)."""
    import torch
    import transformers

    from modeling_simmim import SimMIMForMaskedImageModeling
    from modeling_simmim.evaluation import knn_accuracy, linear_probe_accuracy, logistic_regression_accuracy

    (train_images, train_labels), (test_images, test_labels) = data["train"], data["test"]
    model = SimMIMForMaskedImageModeling.from_pretrained(pretrained)
    image_size = model.config.image_size[0]
    transformers.set_seed(pretrain_seed)
    encoders = {"pretrained": model, "random": SimMIMForMaskedImageModeling(model.config)}
    suffix = "" if kind == "pooled" else f"_{kind}"
    features = {}
    for name, encoder in encoders.items():
        features[name + suffix] = (
            encoder_features(encoder, train_images, image_size, kind=kind),
            encoder_features(encoder, test_images, image_size, kind=kind),
        )
    pixels = (
        torch.from_numpy(train_images.reshape(len(train_images), -1) / 255.0).float(),
        torch.from_numpy(test_images.reshape(len(test_images), -1) / 255.0).float(),
    )
    if kind == "pooled":
        features["pixels"] = pixels
    y_train, y_test = torch.from_numpy(train_labels), torch.from_numpy(test_labels)
    results: dict[str, dict[str, list[float]]] = {}
    for shot_name, per_seed in subsets.items():
        table = results.setdefault(shot_name, {})
        for seed in seeds:
            index = torch.from_numpy(per_seed[seed])
            for name, (f_train, f_test) in features.items():
                table.setdefault(f"knn_{name}", []).append(
                    round(100 * knn_accuracy(f_train[index], y_train[index], f_test, y_test), 2)
                )
                table.setdefault(f"linear_probe_{name}", []).append(
                    round(100 * linear_probe_accuracy(f_train[index], y_train[index], f_test, y_test, seed=seed), 2)
                )
            if (
                kind == "pooled" and len(index) <= 20000
            ):  # scikit-learn's solver on 60,000 x 784 takes minutes; the probe above is there
                table.setdefault("logreg_pixels", []).append(
                    round(
                        100 * logistic_regression_accuracy(pixels[0][index], y_train[index], pixels[1], y_test),
                        2,
                    )
                )
    return results


def mean_std(values: Sequence[float]) -> dict[str, float]:
    return {
        "mean": round(statistics.mean(values), 2),
        "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
        "values": list(values),
    }


ROWS = [
    ("finetune_pretrained", "finetuned, SimMIM-pretrained"),
    ("finetune_scratch", "finetuned, from scratch"),
    ("linear_probe_pretrained", "linear probe, frozen pretrained encoder"),
    ("linear_probe_random", "linear probe, frozen random encoder"),
    ("linear_probe_pixels", "linear probe, raw pixels"),
    ("logreg_pixels", "logistic regression (scikit-learn), raw pixels"),
    ("knn_pretrained", "kNN, frozen pretrained encoder"),
    ("knn_random", "kNN, frozen random encoder"),
    ("knn_pixels", "kNN, raw pixels"),
    ("linear_probe_pretrained_map", "linear probe, frozen pretrained encoder, final feature map"),
    ("linear_probe_random_map", "linear probe, frozen random encoder, final feature map"),
    ("knn_pretrained_map", "kNN, frozen pretrained encoder, final feature map"),
    ("knn_random_map", "kNN, frozen random encoder, final feature map"),
]


def markdown_table(summary: dict[str, dict[str, dict[str, float]]], shots: Sequence[str]) -> str:
    lines = [
        "| top-1 on the 10,000 test images (mean ± std) | "
        + " | ".join(f"k = {shot} / class" if shot != "all" else "all 60,000" for shot in shots)
        + " |",
        "|---|" + "---:|" * len(shots),
    ]
    for key, label in ROWS:
        cells = []
        for shot in shots:
            entry = summary.get(shot, {}).get(key)
            cells.append(f"{entry['mean']:.1f} ± {entry['std']:.1f}" if entry else "-")
        if any(cell != "-" for cell in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_shots(values: Sequence[str]) -> list[int | None]:
    shots = []
    for value in values:
        if value == "all":
            shots.append(None)
        elif value.isdigit() and int(value) > 0:
            shots.append(int(value))
        else:
            raise ValueError(f"--shots takes positive integers or 'all', got {value!r}.")
    return shots


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=DEBIAN_DIR, help="Folder of the four idx files (.gz or not).")
    parser.add_argument("--work_dir", default=os.path.join(ROOT, "outputs", "fashion_mnist"))
    parser.add_argument(
        "--results", default=os.path.join(ROOT, "benchmarks", "results", "fashion_mnist_transfer.json")
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--shots", nargs="+", default=["10", "100", "all"], help="Labelled images per class, or all.")
    parser.add_argument(
        "--pretrain_recipe", default=os.path.join(ROOT, "benchmarks", "recipes", "fashion_mnist_pretrain.yaml")
    )
    parser.add_argument(
        "--finetune_recipe", default=os.path.join(ROOT, "benchmarks", "recipes", "fashion_mnist_finetune.yaml")
    )
    parser.add_argument("--pretrain_seed", type=int, default=0)
    parser.add_argument("--pretrain_args", default="", help="Extra run_mim.py flags (one string).")
    parser.add_argument("--finetune_args", default="", help="Extra run_image_classification.py flags (one string).")
    parser.add_argument("--batch_size", type=int, default=64, help="Finetuning batch size.")
    parser.add_argument("--finetune_steps", type=int, default=400, help="Optimizer steps of a k-shot finetuning.")
    parser.add_argument("--all_epochs", type=float, default=1.0, help="Epochs of the finetuning on all images.")
    parser.add_argument(
        "--knn_monitor_per_class",
        type=int,
        default=100,
        help="Labelled training images per class for the pretraining's kNN monitor (bank and "
        "queries each; 0 = no monitor).",
    )
    parser.add_argument("--no_probes", action="store_true", help="Skip the frozen-encoder and raw-pixel probes.")
    parser.add_argument(
        "--probe_features",
        choices=["pooled", "map"],
        default="pooled",
        help="Frozen-encoder features of the probes: pooled (as the classifier head) or the flattened final map.",
    )
    parser.add_argument(
        "--no_finetune",
        action="store_true",
        help="Skip step 2 (only the probes; with --pretrained, then --merge with the finetuning results).",
    )
    parser.add_argument("--max_pretrain_images", type=int, default=None, help="Tiny runs: fewer pretraining images.")
    parser.add_argument(
        "--pretrained",
        default=None,
        help="Skip step 1: reuse this pretraining output folder (e.g. to run seeds in parallel "
        "processes, each with its own --seeds and --results, then --merge).",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="Only combine results files of the same protocol (other seeds) into --results.",
    )
    args = parser.parse_args(argv)
    shots = parse_shots(args.shots)
    if args.merge:
        return merge_results(args.merge, args.results)

    import run_mim

    data = load_fashion_mnist(args.data_dir)
    if args.max_pretrain_images is not None:
        data = {
            "train": (data["train"][0][: args.max_pretrain_images], data["train"][1][: args.max_pretrain_images]),
            "test": data["test"],
        }
    train_labels = data["train"][1]
    folders = {
        split: write_image_folder(*data[split], os.path.join(args.work_dir, "images", split))
        for split in ("train", "test")
    }
    record: dict[str, Any] = {
        "command": "python benchmarks/fashion_mnist_transfer.py "
        + shlex.join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} at start",
        "protocol": "pretrain once on all training images (labels unused); per seed a class-balanced k-shot subset; "
        "finetune pretrained and from scratch with the same recipe; last-step top-1 on the test set",
        "pretrain_recipe": os.path.relpath(args.pretrain_recipe, ROOT),
        "finetune_recipe": os.path.relpath(args.finetune_recipe, ROOT),
        "runs": {},
    }

    # 1. pretraining (labels unused), kNN monitor on held-out labelled training images
    if args.pretrained is not None:
        pretrained = args.pretrained
        record["pretrain"] = reused_pretraining(pretrained)
    else:
        pretrained = os.path.join(args.work_dir, "pretrain")
        pretrain_argv = [
            args.pretrain_recipe,
            "--train_dir",
            folders["train"],
            "--validation_dir",
            folders["test"],
            "--seed",
            str(args.pretrain_seed),
            "--output_dir",
            pretrained,
            "--overwrite_output_dir",
            "true",
            "--report_to",
            "none",
            "--disable_tqdm",
            "true",
            "--verify_images",
            "false",
        ]
        if args.knn_monitor_per_class:
            bank = balanced_subset(train_labels, args.knn_monitor_per_class, seed=10_000)
            queries = balanced_subset(train_labels, args.knn_monitor_per_class, seed=10_001, exclude=bank)
            knn_dir = os.path.join(args.work_dir, f"knn_monitor_{args.knn_monitor_per_class}")
            link_subset(folders["train"], train_labels, bank, os.path.join(knn_dir, "train"))
            link_subset(folders["train"], train_labels, queries, os.path.join(knn_dir, "val"))
            pretrain_argv += ["--knn_eval_dir", knn_dir]
        import transformers

        transformers.set_seed(args.pretrain_seed)
        pretrain_results, pretrain_times = timed(run_mim.main, pretrain_argv + shlex.split(args.pretrain_args))
        with open(os.path.join(pretrained, "trainer_state.json")) as handle:
            history = json.load(handle)["log_history"]
        record["pretrain"] = {
            "eval_loss": pretrain_results.get("eval_loss"),
            **pretrain_times,
            "knn_top1_curve": [(entry["step"], entry["knn_top1"]) for entry in history if "knn_top1" in entry],
        }
        print(json.dumps({"pretrain": record["pretrain"]}), flush=True)

    # 2. finetuning, pretrained and from scratch, per shot and seed
    subsets: dict[str, dict[int, np.ndarray]] = {}
    for shot in shots:
        name = shot_label(shot)
        subsets[name] = {seed: balanced_subset(train_labels, shot, seed) for seed in args.seeds}
        for seed in [] if args.no_finetune else args.seeds:
            indices = subsets[name][seed]
            train_dir = (
                folders["train"]
                if shot is None
                else link_subset(
                    folders["train"],
                    train_labels,
                    indices,
                    os.path.join(args.work_dir, "subsets", f"k{name}_seed{seed}"),
                )
            )
            steps = finetune_steps(args, shot, len(indices))
            for kind, scratch in (("pretrained", False), ("scratch", True)):
                output_dir = os.path.join(args.work_dir, "finetune", f"k{name}_seed{seed}_{kind}")
                result = run_finetune(args, pretrained, train_dir, folders["test"], output_dir, seed, steps, scratch)
                record["runs"].setdefault(name, {}).setdefault(f"finetune_{kind}", []).append(result)
                print(json.dumps({"shot": name, "seed": seed, "kind": kind, **result}), flush=True)
            save(record, args.results)

    # 3. frozen encoders and raw pixels
    probe_results = {}
    if not args.no_probes:
        probe_results, record["probe_times"] = timed(
            run_probes, pretrained, data, subsets, args.seeds, args.pretrain_seed, args.probe_features
        )
    record["probes"] = probe_results
    return summarize_and_save(record, args.results)


def summarize_and_save(record: dict[str, Any], path: str) -> dict[str, Any]:
    """Mean and std over seeds of every finetuning and probe, the Markdown table; written to `path`, printed."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    probes = record.get("probes", {})
    shots = list(dict.fromkeys([*record["runs"], *probes]))
    for name in shots:
        runs_by_kind = record["runs"].get(name, {})
        summary[name] = {key: mean_std([run["top1"] for run in runs]) for key, runs in runs_by_kind.items()}
        summary[name].update({key: mean_std(values) for key, values in probes.get(name, {}).items()})
    record["summary"] = summary
    record["table"] = markdown_table(summary, shots)
    save(record, path)
    print(record["table"])
    return record


def reused_pretraining(folder: str) -> dict[str, Any]:
    """What step 1 records, read back from a finished pretraining folder."""
    with open(os.path.join(folder, "trainer_state.json")) as handle:
        history = json.load(handle)["log_history"]
    with open(os.path.join(folder, "all_results.json")) as handle:
        results = json.load(handle)
    return {
        "eval_loss": results.get("eval_loss"),
        "reused": os.path.abspath(folder),
        "knn_top1_curve": [(entry["step"], entry["knn_top1"]) for entry in history if "knn_top1" in entry],
    }


def merge_results(paths: Sequence[str], output: str) -> dict[str, Any]:
    """One record from several (the same protocol, other seeds): runs and probe values concatenated per shot."""
    records = []
    for path in paths:
        with open(path) as handle:
            records.append(json.load(handle))
    merged = {key: value for key, value in records[0].items() if key not in ("summary", "table", "runs", "probes")}
    # a record that is itself a merge contributes its own sources and commands
    merged["merged_from"] = [
        source
        for path, record in zip(paths, records)
        for source in record.get("merged_from", [os.path.relpath(path, ROOT)])
    ]
    merged["commands"] = [command for record in records for command in record.get("commands", [record["command"]])]
    merged["runs"], merged["probes"] = {}, {}
    for record in records:
        for field in ("runs", "probes"):
            for shot, by_kind in record.get(field, {}).items():
                for kind, values in by_kind.items():
                    merged[field].setdefault(shot, {}).setdefault(kind, []).extend(values)
    return summarize_and_save(merged, output)


def save(record: dict[str, Any], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(record, handle, indent=1)


if __name__ == "__main__":
    main()
