"""The memory planner (`python -m modeling_simmim.memory`) against measurements, and its table for every recipe.

    python benchmarks/memory_planner.py check [--models swin_tiny swin_base] [--batch_size 8] [--threads 2] [--json]
    python benchmarks/memory_planner.py recipes [--recipes configs/pretrain/*.yaml] [--gpu_memory_gb 80 141] [--json]

`check`: for each preset model (192 px, fp32, AdamW), the planner's estimate at `--batch_size` (activations measured
at batches 1 and 2) next to the measured peak of a real training step at that batch: torch's own allocations (the
profiler's allocation events, `memory.measure_training_step`) and, as a cross-check, the process's peak RSS (VmHWM,
reset through /proc/self/clear_refs before the step) above its RSS before the model was built, in a fresh process.

`recipes`: the planner for each recipe at its own settings (bf16, per-device batch), under DDP over 16 processes and
FSDP over 8 with one block per unit (and with gradient checkpointing, `--gradient_checkpointing`): total at the
recipe's batch and the largest per-device batch on each GPU size (10% kept free). Prints a Markdown table (the
README's); recipes with the same model and settings are measured once.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from modeling_simmim import SimMIMConfig, SimMIMForMaskedImageModeling  # noqa: E402
from modeling_simmim.memory import (  # noqa: E402
    GB,
    RecipeModel,
    estimate_memory,
    input_maker,
    measure_activations,
    measure_training_step,
    model_from_recipe,
    plan,
)

BLOCK_CLASSES = {"swin": "SwinLayer", "swinv2": "Swinv2Layer", "beit": "BeitLayer", "vit": "ViTLayer"}


def _preset_model(name: str, image_size: int) -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    config = SimMIMConfig.from_preset(name, image_size=image_size)
    model = SimMIMForMaskedImageModeling(config)
    return model, input_maker(RecipeModel(model, "pretrain", config.image_size, 1, False), torch.device("cpu"))


def _rss_kib(field: str) -> int:
    with open("/proc/self/status", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_child(name: str, image_size: int, batch_size: int) -> None:
    """In a fresh process: peak RSS of the second training step above the RSS before the model was built."""
    from modeling_simmim.optimization import create_optimizer

    before = _rss_kib("VmRSS")
    model, make_inputs = _preset_model(name, image_size)
    model.train()
    optimizer = create_optimizer(model, learning_rate=1e-6)
    inputs = make_inputs(batch_size)

    def step():
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    with open("/proc/self/clear_refs", "w", encoding="utf-8") as handle:
        handle.write("5")  # resets VmHWM (peak RSS) to the current RSS
    step()
    print(json.dumps({"rss_peak_above_start": (_rss_kib("VmHWM") - before) * 1024}))


def check(args) -> list[dict]:
    rows = []
    for name in args.models:
        start = time.time()
        model, make_inputs = _preset_model(name, args.image_size)
        profile = measure_activations(model, make_inputs, (1, 2))
        estimate = estimate_memory(model, profile, args.batch_size, num_processes=1)
        measured = measure_training_step(model, make_inputs, args.batch_size)
        del model
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--threads",
                str(args.threads),
                "rss-child",
                name,
                str(args.image_size),
                str(args.batch_size),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        rss = json.loads(child.stdout.strip().splitlines()[-1])["rss_peak_above_start"]
        rows.append(
            {
                "model": name,
                "parameters_m": estimate.num_parameters / 1e6,
                "batch_size": args.batch_size,
                "estimate_gb": estimate.total / GB,
                "measured_torch_gb": measured / GB,
                "measured_rss_gb": rss / GB,
                "estimate_over_measured": estimate.total / measured,
                "activations_per_image_mb": profile.per_image_bytes / 1e6,
                "seconds": time.time() - start,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(
            "| model | parameters | batch | estimate | measured (torch allocations) | estimate / measured | "
            "measured (peak RSS) |"
        )
        print("|---|---|---|---|---|---|---|")
        for row in rows:
            print(
                f"| {row['model']} | {row['parameters_m']:.1f}M | {row['batch_size']} | {row['estimate_gb']:.3f} GB | "
                f"{row['measured_torch_gb']:.3f} GB | {row['estimate_over_measured']:.3f} | "
                f"{row['measured_rss_gb']:.3f} GB |"
            )
    return rows


def recipes(args) -> list[dict]:
    rows = []
    measured: dict[str, dict] = {}  # recipes with the same model and settings (Swin-B 100 / 800 ep) share numbers
    for path in args.recipes:
        with torch.device("meta"):
            recipe_model = model_from_recipe(path)
        key = json.dumps(
            [
                recipe_model.model.config.to_json_string(),
                recipe_model.per_device_batch,
                recipe_model.bf16,
                recipe_model.task,
            ]
        )
        if key in measured:
            rows.append({**measured[key], "recipe": os.path.relpath(path, ROOT)})
            continue
        start = time.time()
        base, recipe_model = plan(path, num_processes=args.num_processes, device="cpu")
        family = recipe_model.model.config.backbone_type
        # FSDP changes the static part only: the activations measured for DDP apply
        fsdp = estimate_memory(
            recipe_model.model,
            base.activation_profile,
            base.per_device_batch,
            fsdp=8,
            bf16=base.bf16,
            fsdp_layer_classes=[BLOCK_CLASSES[family]],
        )
        del recipe_model
        checkpointed = None
        if args.gradient_checkpointing:
            checkpointed, _ = plan(path, num_processes=args.num_processes, device="cpu", gradient_checkpointing=True)
        row = {
            "recipe": os.path.relpath(path, ROOT),
            "parameters_m": base.num_parameters / 1e6,
            "batch": base.per_device_batch,
            "bf16": base.bf16,
            "seconds": 0.0,
        }
        for label, estimate in (("ddp", base), ("checkpointing", checkpointed), ("fsdp8", fsdp)):
            if estimate is None:
                continue
            row[label] = {
                "total_gb": estimate.total / GB,
                "static_gb": estimate.static / GB,
                "per_image_mb": estimate.activation_profile.per_image_bytes / 1e6,
                "max_batch": {f"{gb:g}": estimate.max_batch(gb * GB, args.reserve) for gb in args.gpu_memory_gb},
            }
        row["seconds"] = time.time() - start
        rows.append(row)
        measured[key] = row
        print(json.dumps(row), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return rows
    sizes = [f"{gb:g}" for gb in args.gpu_memory_gb]
    largest = " / ".join(f"{size} GB" for size in sizes)
    columns = [("ddp", "DDP"), ("checkpointing", "DDP + gradient checkpointing"), ("fsdp8", "FSDP x8, block units")]
    columns = [(key, title) for key, title in columns if any(key in row for row in rows)]
    print(
        "| recipe | parameters | batch | "
        + " | ".join(f"{title}: total at batch / per image / largest batch {largest}" for _, title in columns)
        + " |"
    )
    print("|" + "---|" * (3 + len(columns)))
    for row in rows:
        cells = []
        for key, _ in columns:
            part = row[key]
            cells.append(
                f"{part['total_gb']:.1f} GB / {part['per_image_mb']:.0f} MB / "
                + " / ".join(str(part["max_batch"][size]) for size in sizes)
            )
        print(
            f"| `{os.path.basename(row['recipe'])}` | {row['parameters_m']:.1f}M | {row['batch']} | "
            + " | ".join(cells)
            + " |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    commands = parser.add_subparsers(dest="command", required=True)
    check_parser = commands.add_parser("check")
    check_parser.add_argument("--models", nargs="+", default=["swin_tiny", "swin_base"])
    check_parser.add_argument("--image_size", type=int, default=192)
    check_parser.add_argument("--batch_size", type=int, default=8)
    check_parser.add_argument("--json", action="store_true")
    recipes_parser = commands.add_parser("recipes")
    recipes_parser.add_argument(
        "--recipes", nargs="+", default=sorted(glob.glob(os.path.join(ROOT, "configs", "pretrain", "*.yaml")))
    )
    recipes_parser.add_argument("--gpu_memory_gb", type=float, nargs="+", default=[80.0, 141.0])
    recipes_parser.add_argument("--reserve", type=float, default=0.1)
    recipes_parser.add_argument("--num_processes", type=int, default=16)
    recipes_parser.add_argument(
        "--gradient_checkpointing",
        action="store_true",
        help="Also measure with gradient checkpointing (on CPUs without native bf16 matmul "
        "its bf16 recomputation uses PyTorch's generic kernel: over 20x slower).",
    )
    recipes_parser.add_argument("--json", action="store_true")
    child_parser = commands.add_parser("rss-child")
    child_parser.add_argument("name")
    child_parser.add_argument("image_size", type=int)
    child_parser.add_argument("batch_size", type=int)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.command == "check":
        check(args)
    elif args.command == "recipes":
        recipes(args)
    else:
        rss_child(args.name, args.image_size, args.batch_size)


if __name__ == "__main__":
    main()
