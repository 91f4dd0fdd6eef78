"""Per-device memory planner: how much memory one training process of a recipe needs, and the largest per-device
batch that fits a GPU, before renting one.

    python -m modeling_simmim.memory configs/pretrain/swinv2_huge_192_w12_800ep.yaml --per_device_batch 64 \
        [--fsdp 8] [--gradient_checkpointing] [--bf16 | --fp32] [--gpu_memory_gb 80 141]

Per device, for AdamW training with fp32 master weights (the Trainer's `--bf16` is autocast):
- parameters, gradients (4 bytes each per parameter) and the optimizer state (AdamW: 8 bytes), divided by N under
  FSDP (N shards), plus FSDP's all-gather buffers (the largest wrapped unit, gathered for the current and the
  prefetched unit, and its unsharded gradient before the reduce-scatter); DDP adds gradient buckets (4 bytes per
  parameter) when there are several processes;
- activations: measured, not modelled. One forward + backward runs at two tiny batches on the current device
  (gradients preallocated, so only what the step itself allocates counts) and the peak is fitted linearly in the batch
  size: `activations(B) = intercept + per_image * B`. On CUDA the peak comes from the caching allocator's statistics
  (`max_memory_allocated`); on CPU, from the allocation and free events that `torch.profiler` records with
  `profile_memory=True` (every tensor allocation by torch's CPU allocator, summed in time order). RSS would also see
  the allocator's cache and Python.

The total adds the four parts, as if the gradients existed at the activation peak (the start of the backward). They
are freed between steps (`zero_grad(set_to_none=True)`) and allocated while activations are released, so the total
is an upper bound by at most the gradients. It is checked against the measured peak of a real training step on CPU
(tests/test_memory.py, benchmarks/memory_check.py). Not counted: the CUDA context and cuDNN/cuBLAS workspaces, and
allocator fragmentation: `--reserve` (default 10%) of the GPU is kept free for them when the largest batch is
computed. On a CPU, Swin's attention is explicit (matmul + softmax); on GPUs it runs in SDPA, which keeps less for the
backward: CPU-measured activations are an upper bound for Swin there. Run the planner on the GPU for its own numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .modeling_simmim import SimMIMPreTrainedModel

GB = 1e9
BYTES_PER_PARAMETER = 4  # fp32 master weights (autocast keeps them)
ADAMW_STATE_BYTES_PER_PARAMETER = 8  # exp_avg + exp_avg_sq, fp32


# ---- measuring ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _native_stderr_silenced():
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_allocated_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak of the bytes that torch allocates while `fn()` runs, above what was allocated when it started."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - start)
    if device.type != "cpu":
        raise ValueError(f"Memory is measured on 'cpu' or 'cuda' devices, not {device.type!r}.")
    from torch.profiler import ProfilerActivity, profile

    profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _native_stderr_silenced():  # the profiler's C++ backend prints start/stop notices
        profiler.start()
    try:
        fn()
    finally:
        with _native_stderr_silenced():
            profiler.stop()
    results = profiler.profiler.kineto_results if profiler.profiler is not None else None
    if results is None:  # stop() sets them; None means the profiler never ran
        raise RuntimeError("The CPU profiler recorded nothing: memory cannot be measured.")
    events = [
        event
        for event in results.events()
        if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU
    ]
    live = peak = 0
    for event in sorted(events, key=lambda event: event.start_ns()):
        live += event.nbytes()  # type: ignore[attr-defined]  # torch's _KinetoEvent stub lacks nbytes (memory events)
        peak = max(peak, live)
    return peak


@dataclass(frozen=True)
class ActivationProfile:
    """Peak memory of one forward + backward beyond parameters and gradients, linear in the batch size."""

    intercept_bytes: float
    per_image_bytes: float
    batches: tuple[int, int]
    peaks_bytes: tuple[int, int]
    device: str

    def at(self, batch_size: int) -> float:
        return max(0.0, self.intercept_bytes + self.per_image_bytes * batch_size)


def measure_activations(
    model: nn.Module,
    make_inputs: Callable[[int], dict[str, torch.Tensor]],
    batches: tuple[int, int] = (1, 2),
    bf16: bool = False,
) -> ActivationProfile:
    """Fit `peak(B) = intercept + per_image * B` on two small batches. Gradients are allocated beforehand (zeros),
    so the measured peak holds what the step allocates: saved activations and the backward's transients."""
    if batches[0] >= batches[1]:
        raise ValueError(f"Two increasing batch sizes are needed, got {batches}.")
    parameter = next(model.parameters())
    device = parameter.device
    model.train()
    for param in model.parameters():
        if param.requires_grad:
            param.grad = torch.zeros_like(param)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def step(inputs: dict[str, torch.Tensor]) -> None:
        with autocast:
            loss = model(**inputs).loss
        loss.backward()

    peaks: list[int] = []
    for batch in batches:
        inputs = make_inputs(batch)
        step(inputs)  # warm-up: lazily built caches (masks, kernels) are not activations
        peaks.append(peak_allocated_bytes(functools.partial(step, inputs), device))
    for param in model.parameters():
        param.grad = None
    per_image = (peaks[1] - peaks[0]) / (batches[1] - batches[0])
    return ActivationProfile(
        intercept_bytes=peaks[0] - per_image * batches[0],
        per_image_bytes=per_image,
        batches=(batches[0], batches[1]),
        peaks_bytes=(peaks[0], peaks[1]),
        device=str(device),
    )


def measure_training_step(
    model: PreTrainedModel, make_inputs: Callable[[int], dict[str, torch.Tensor]], batch_size: int, bf16: bool = False
) -> float:
    """Measured peak bytes of one real training step at `batch_size` (the check of the estimate): AdamW over the
    model's parameter groups, a first step to create the optimizer state, then the peak of the second step
    (forward, backward, optimizer step, `zero_grad(set_to_none=True)` as the Trainer does) plus the parameters and
    optimizer state that exist when it starts."""
    from .optimization import create_optimizer

    device = next(model.parameters()).device
    model.train()
    optimizer = create_optimizer(model, learning_rate=1e-6)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    inputs = make_inputs(batch_size)

    def step():
        with autocast:
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    resident = sum(t.numel() * t.element_size() for t in model.parameters())
    resident += sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value)
    )
    return resident + peak_allocated_bytes(step, device)


def fsdp_units(model: nn.Module, layer_classes: Sequence[str] | None = None) -> list[int]:
    """Parameter counts of the units accelerate's FSDP2 makes under configs/accelerate/fsdp.yaml (transformer-based
    wrapping): each module whose class is in `layer_classes` (default: the model's `_no_split_modules`, e.g.
    SwinStage), innermost first; the input (patch) embedding; the root with what is left."""
    classes = set(layer_classes or getattr(model, "_no_split_modules", None) or ())
    assigned: set[int] = set()
    units: list[int] = []

    def take(module: nn.Module) -> None:
        fresh = [p for p in module.parameters() if id(p) not in assigned]
        assigned.update(id(p) for p in fresh)
        units.append(sum(p.numel() for p in fresh))

    modules = list(model.modules())
    for module in reversed(modules[1:]):  # children before parents, as accelerate wraps them
        if type(module).__name__ in classes:
            take(module)
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    if isinstance(embeddings, nn.Module):
        take(embeddings)
    take(model)
    return [count for count in units if count > 0]


# ---- the estimate ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device of one training process."""

    num_parameters: int
    per_device_batch: int
    fsdp: int
    num_processes: int
    bf16: bool
    gradient_checkpointing: bool
    parameters: float
    gradients: float
    optimizer_state: float
    communication_buffers: float  # DDP gradient buckets, or FSDP all-gather / reduce-scatter buffers
    activations: float
    activation_profile: ActivationProfile

    @property
    def static(self) -> float:
        """Everything but the activations (does not depend on the batch size)."""
        return self.parameters + self.gradients + self.optimizer_state + self.communication_buffers

    @property
    def total(self) -> float:
        return self.static + self.activations

    def max_batch(self, capacity_bytes: float, reserve: float = 0.1) -> int:
        """Largest per-device batch whose total fits `capacity_bytes * (1 - reserve)` (0 if none)."""
        budget = capacity_bytes * (1.0 - reserve) - self.static - self.activation_profile.intercept_bytes
        per_image = self.activation_profile.per_image_bytes
        if budget < per_image or per_image <= 0:
            return 0
        return int(math.floor(budget / per_image))

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values.update(static=self.static, total=self.total)
        return values


def estimate_memory(
    model: nn.Module,
    activation_profile: ActivationProfile,
    per_device_batch: int,
    fsdp: int = 1,
    num_processes: int = 8,
    bf16: bool = False,
    gradient_checkpointing: bool = False,
    fsdp_layer_classes: Sequence[str] | None = None,
) -> MemoryEstimate:
    """Per-device memory of training `model` with AdamW at `per_device_batch` images (see the module docstring)."""
    if fsdp < 1:
        raise ValueError(f"--fsdp must be >= 1 (the number of shards), got {fsdp}.")
    if per_device_batch < 1:
        raise ValueError(f"--per_device_batch must be >= 1, got {per_device_batch}.")
    count = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if fsdp > 1:
        largest_unit = max(fsdp_units(model, fsdp_layer_classes))
        # the unit being computed and the prefetched one, gathered; one unit's gradient before its reduce-scatter
        buffers: float = 3 * largest_unit * BYTES_PER_PARAMETER
    else:
        buffers = trainable * BYTES_PER_PARAMETER if num_processes > 1 else 0.0  # DDP buckets (no bucket views)
    return MemoryEstimate(
        num_parameters=count,
        per_device_batch=per_device_batch,
        fsdp=fsdp,
        num_processes=num_processes,
        bf16=bf16,
        gradient_checkpointing=gradient_checkpointing,
        parameters=count * BYTES_PER_PARAMETER / fsdp,
        gradients=trainable * BYTES_PER_PARAMETER / fsdp,
        optimizer_state=trainable * ADAMW_STATE_BYTES_PER_PARAMETER / fsdp,
        communication_buffers=float(buffers),
        activations=activation_profile.at(per_device_batch),
        activation_profile=activation_profile,
    )


# ---- recipes ----------------------------------------------------------------------------------------------------------
@dataclass
class RecipeModel:
    model: SimMIMPreTrainedModel
    task: str  # "pretrain" or "finetune"
    image_size: tuple[int, int]
    per_device_batch: int
    bf16: bool
    num_labels: int = 0


def model_from_recipe(path: str, num_labels: int = 1000) -> RecipeModel:
    """The (randomly initialized) model a recipe of `configs/pretrain` or `configs/finetune` trains, parsed by the
    script that runs it (the keys decide which: finetuning recipes have augmentation keys pretraining does not)."""
    # The scripts own the recipe formats; import them only here (they are installed next to the package).
    import run_image_classification
    import run_mim

    from .cli import load_recipe

    recipe = load_recipe(path)
    pretrain_keys = {action.dest for action in run_mim.build_parser()._actions}
    finetune_keys = {action.dest for action in run_image_classification.build_parser()._actions}
    # bf16 is read from the recipe here, not by the parser: it refuses bf16 on CPUs without it
    argv = [path, "--output_dir", os.devnull, "--bf16", "false"]
    if set(recipe) <= pretrain_keys:
        model_args, _, training_args, _ = run_mim.parse_args(argv)
        config = run_mim.build_config(model_args)
        from .modeling_simmim import SimMIMForMaskedImageModeling

        model: SimMIMPreTrainedModel = SimMIMForMaskedImageModeling(config)
        task = "pretrain"
    elif set(recipe) <= finetune_keys:
        model_args, _, aug_args, training_args, _ = run_image_classification.parse_args(argv)
        if model_args.model_type is None and model_args.model_preset is None:
            raise ValueError(f"{path} names no architecture (model_type or model_preset): the planner needs one.")
        model_args.model_name_or_path = None  # the architecture of the recipe, randomly initialized
        model = run_image_classification.build_model(model_args, aug_args, {i: str(i) for i in range(num_labels)})
        config = model.config
        task = "finetune"
    else:
        unknown = sorted(set(recipe) - pretrain_keys - finetune_keys)
        raise ValueError(
            f"{path} is neither a run_mim.py nor a run_image_classification.py recipe (unknown keys {unknown})."
        )
    return RecipeModel(
        model=model,
        task=task,
        image_size=tuple(config.image_size),
        per_device_batch=training_args.per_device_train_batch_size,
        bf16=bool(recipe.get("bf16", False)),
        num_labels=num_labels if task == "finetune" else 0,
    )


def enable_activation_checkpointing(model: PreTrainedModel) -> None:
    """What `--gradient_checkpointing` does (transformers >= 5.x renamed it; older 5.x only has the old name)."""
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()


def input_maker(recipe_model: RecipeModel, device: torch.device, seed: int = 0) -> Callable[[int], dict]:
    """Random inputs of the recipe's task and image size: images + masks (pretraining) or labels (finetuning)."""
    from .masking import SimMIMMaskGenerator

    model, (height, width) = recipe_model.model, recipe_model.image_size
    config = model.config
    generator = torch.Generator().manual_seed(seed)

    def make(batch: int) -> dict[str, torch.Tensor]:
        pixel_values = torch.randn(batch, 3, height, width, generator=generator).to(device)
        if recipe_model.task == "pretrain":
            masks = SimMIMMaskGenerator(
                (height, width), config.mask_patch_size, config.model_patch_size, config.mask_ratio
            )
            return {"pixel_values": pixel_values, "bool_masked_pos": masks(batch, generator=generator).to(device)}
        labels = torch.randint(0, recipe_model.num_labels, (batch,), generator=generator).to(device)
        return {"pixel_values": pixel_values, "labels": labels}

    return make


def plan(
    recipe: str,
    per_device_batch: int | None = None,
    fsdp: int = 1,
    gradient_checkpointing: bool = False,
    bf16: bool | None = None,
    num_processes: int = 8,
    device: str | torch.device | None = None,
    probe_batches: tuple[int, int] = (1, 2),
    fsdp_layer_classes: Sequence[str] | None = None,
) -> tuple[MemoryEstimate, RecipeModel]:
    """Build the recipe's model on `device` (default: CUDA when available), measure its activations and estimate
    the per-device memory at `per_device_batch` (default: the recipe's)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    recipe_model = model_from_recipe(recipe)
    # transformers declares `to` with functools.wraps(nn.Module.to): typeshed then expects `self` as the argument.
    model = recipe_model.model.to(device)  # type: ignore[arg-type]
    if gradient_checkpointing:
        enable_activation_checkpointing(model)
    use_bf16 = recipe_model.bf16 if bf16 is None else bf16
    profile = measure_activations(model, input_maker(recipe_model, device), probe_batches, bf16=use_bf16)
    estimate = estimate_memory(
        model,
        profile,
        per_device_batch or recipe_model.per_device_batch,
        fsdp=fsdp,
        num_processes=num_processes,
        bf16=use_bf16,
        gradient_checkpointing=gradient_checkpointing,
        fsdp_layer_classes=fsdp_layer_classes,
    )
    return estimate, recipe_model


# ---- CLI ----------------------------------------------------------------------------------------------------------
def _gb(value: float) -> str:
    return f"{value / GB:.2f} GB"


def render(estimate: MemoryEstimate, recipe: str, capacities_gb: Sequence[float], reserve: float) -> str:
    profile = estimate.activation_profile
    if estimate.fsdp > 1:
        setup = f"FSDP over {estimate.fsdp} processes"
    elif estimate.num_processes > 1:
        setup = f"DDP over {estimate.num_processes} processes"
    else:
        setup = "one process"
    setup += (", bf16 autocast" if estimate.bf16 else ", fp32") + (
        ", gradient checkpointing" if estimate.gradient_checkpointing else ""
    )
    buffers = "FSDP gather/scatter buffers" if estimate.fsdp > 1 else "DDP gradient buckets"
    rows = [
        ("parameters", _gb(estimate.parameters), ""),
        ("gradients", _gb(estimate.gradients), ""),
        ("optimizer state", _gb(estimate.optimizer_state), "AdamW"),
        (buffers, _gb(estimate.communication_buffers), ""),
        (
            "activations",
            _gb(estimate.activations),
            f"{profile.per_image_bytes / 1e6:.1f} MB per image + {profile.intercept_bytes / 1e6:.1f} MB, measured on "
            f"{profile.device} at batches {list(profile.batches)}",
        ),
        ("total", _gb(estimate.total), ""),
    ]
    lines = [
        f"{recipe}: {estimate.num_parameters / 1e6:.1f}M parameters, {setup}, {estimate.per_device_batch} images "
        "per device"
    ]
    lines += [f"  {name:<28}{value:>10}" + (f"  ({note})" if note else "") for name, value, note in rows]
    for capacity in capacities_gb:
        fits = "fits" if estimate.total <= capacity * GB * (1 - reserve) else "does NOT fit"
        lines.append(
            f"  {capacity:g} GB GPU ({reserve:.0%} kept free): {fits}; largest per-device batch "
            f"{estimate.max_batch(capacity * GB, reserve)}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m modeling_simmim.memory",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", help="A recipe of configs/pretrain or configs/finetune (YAML/JSON).")
    parser.add_argument("--per_device_batch", type=int, default=None, help="Images per device (default: recipe's).")
    parser.add_argument("--fsdp", type=int, default=1, help="Shard over N processes (FSDP); 1 = DDP.")
    parser.add_argument(
        "--fsdp_layers",
        default=None,
        help="FSDP unit classes, comma-separated, as --fsdp_transformer_layer_cls_to_wrap (default: "
        "the model's _no_split_modules, as configs/accelerate/fsdp.yaml).",
    )
    parser.add_argument(
        "--num_processes",
        type=int,
        default=8,
        help="Processes of a DDP run (more than 1 adds DDP's gradient buckets).",
    )
    parser.add_argument("--gradient_checkpointing", action="store_true", help="Recompute activations in backward.")
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--bf16", dest="bf16", action="store_true", default=None, help="bf16 autocast.")
    precision.add_argument("--fp32", dest="bf16", action="store_false", help="fp32 (default: the recipe's bf16).")
    parser.add_argument("--device", default=None, help="Where activations are measured (default: cuda if any).")
    parser.add_argument(
        "--probe_batches",
        type=int,
        nargs=2,
        default=[1, 2],
        metavar=("B1", "B2"),
        help="The two small batches the activations are measured at.",
    )
    parser.add_argument(
        "--gpu_memory_gb",
        type=float,
        nargs="*",
        default=[80.0, 141.0],
        help="GPU sizes to fit (GB): the largest per-device batch of each is printed.",
    )
    parser.add_argument(
        "--reserve",
        type=float,
        default=0.1,
        help="Fraction of the GPU kept free (CUDA context, workspaces, fragmentation).",
    )
    parser.add_argument("--json", action="store_true", help="Print the numbers as JSON.")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if not 0.0 <= args.reserve < 1.0:
        raise SystemExit(f"--reserve must lie in [0, 1), got {args.reserve}.")
    estimate, _ = plan(
        args.recipe,
        args.per_device_batch,
        fsdp=args.fsdp,
        gradient_checkpointing=args.gradient_checkpointing,
        bf16=args.bf16,
        num_processes=args.num_processes,
        device=args.device,
        probe_batches=tuple(args.probe_batches),
        fsdp_layer_classes=args.fsdp_layers.split(",") if args.fsdp_layers else None,
    )
    result = {
        "recipe": args.recipe,
        **estimate.to_dict(),
        "max_per_device_batch": {f"{gb:g}": estimate.max_batch(gb * GB, args.reserve) for gb in args.gpu_memory_gb},
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(render(estimate, args.recipe, args.gpu_memory_gb, args.reserve))
    return result


if __name__ == "__main__":
    main()
