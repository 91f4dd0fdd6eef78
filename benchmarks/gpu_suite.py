#!/usr/bin/env python
"""The one-command GPU suite: training-step speed, MFU, memory, the largest batch and the input pipeline.

For Swin-B 192/w6 (our preset "swin_base"), the BEiT-style ViT-B/16 224 of SimMIM (preset "vit_base") and
transformers' ViT-B/16 224 `ViTForMaskedImageModeling` (the reference for ViT), in one process:

- throughput: the full training step (forward with the SimMIM loss, backward, fused AdamW step) at batch 128, in
  bf16 autocast and in fp32 with TF32 matmuls, eager and under `torch.compile`; our model with the fast window
  attention (`ours_fast`) and without (`ours_plain`) against transformers' own classes with their default attention
  (`hf_sdpa`) and `attn_implementation="eager"` (`hf_eager`). The cells of one (family, dtype, compiled) group are
  interleaved round by round and the median per-step time of the rounds is reported, with images/s, achieved
  TFLOP/s, MFU against the bf16 matmul peak measured in the same run, and peak memory;
- profile: one profiled bf16 step of Swin-B per implementation: the share of kernel time in GEMMs and
  convolutions, in fused attention and in everything else (elementwise, norms, copies), and the top kernels;
- max_batch: the largest per-device batch whose bf16 training step fits, by doubling then bisection (to ~10%),
  with and without gradient checkpointing, capped in batch and probes;
- loader: images/s of our real pretraining input path (`load_image_datasets` on an image folder ->
  `RobustImageDataset` with the official transform -> `PretrainCollator(SimMIMDataCollator)`) in a DataLoader with 8
  workers on generated ImageNet-like JPEGs (500x375, quality 90), against the GPU step's appetite (images/s).

FLOPs are counted once per architecture: `torch.utils.flop_counter` on one eager training step at batch 2 (SDPA
forced to its math backend so that attention is counted as the matrix products it is), divided by 2. They cover
the matrix products and convolutions of forward and backward; elementwise work, norms and the optimizer are not
counted. A failing cell (OOM, compile error) is recorded and the suite goes on; a time budget skips the cells that
no longer fit (and the tables say so). JSON and markdown are rewritten after every section.

    python benchmarks/gpu_suite.py --output_dir outputs/gpu_suite            # one GPU, at most --budget_s
    python benchmarks/gpu_suite.py --smoke --output_dir /tmp/gpu_suite_smoke  # tiny models on a CPU, about a minute
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from transformers import AutoModelForMaskedImageModeling, ViTConfig  # noqa: E402

from modeling_simmim import SimMIMConfig, SimMIMDataCollator, SimMIMForMaskedImageModeling  # noqa: E402
from modeling_simmim.masking import SimMIMMaskGenerator  # noqa: E402

SECTIONS = ("throughput", "profile", "loader", "max_batch", "compile")  # in the order they run
IMPL_HELP = {
    "ours_fast": "SimMIMForMaskedImageModeling, fast_window_attention=True",
    "ours_plain": "SimMIMForMaskedImageModeling, fast_window_attention=False (transformers' Swin forward)",
    "ours": "SimMIMForMaskedImageModeling (default config)",
    "hf_sdpa": "transformers' *ForMaskedImageModeling, attn_implementation='sdpa' (its default)",
    "hf_eager": "transformers' *ForMaskedImageModeling, attn_implementation='eager'",
}


# ---- what is measured ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Arch:
    """One architecture: its implementations are timed in the same interleaved group as the rest of its family."""

    key: str
    label: str
    family: str
    preset: str | None  # our preset; None = transformers' default ViTConfig (ViT-B/16, 224 px)
    impls: tuple[str, ...]
    max_batch_impls: tuple[str, ...]
    profile_impls: tuple[str, ...] = ()


@dataclass(frozen=True)
class Suite:
    archs: tuple[Arch, ...]
    batch_size: int = 128
    warmup_steps: int = 2
    rounds: int = 5
    steps_per_round: int = 5
    dtypes: tuple[str, ...] = ("bf16", "fp32")
    compile_dtypes: tuple[str, ...] = ("bf16", "fp32")
    compile_backend: str = "inductor"
    compile_impls: tuple[str, ...] | None = None  # None: every implementation
    compile_estimate_s: float = 120.0  # before the first compile has been timed
    max_batch_cap: int = 4096
    max_batch_cap_checkpointing: int = 4096
    max_batch_probes: int = 10
    loader_files: int = 320
    loader_workers: int = 8
    loader_batches: int = 32
    matmul_size: int = 8192
    budget_s: float = 420.0


FULL = Suite(
    archs=(
        Arch(
            "swin_base",
            "Swin-B 192/w6",
            "swin",
            "swin_base",
            ("ours_fast", "ours_plain", "hf_sdpa", "hf_eager"),
            ("ours_fast", "hf_sdpa"),
            ("ours_fast", "ours_plain", "hf_sdpa"),
        ),
        Arch("vit_base", "BEiT ViT-B/16 224 (SimMIM)", "vit", "vit_base", ("ours",), ("ours",)),
        Arch("vit_b16", "ViT-B/16 224 (transformers)", "vit", None, ("hf_sdpa", "hf_eager"), ("hf_sdpa",)),
    )
)
SMOKE = Suite(
    archs=(
        Arch(
            "swin_test",
            "Swin tiny (test)",
            "swin",
            "swin_test",
            ("ours_fast", "ours_plain", "hf_sdpa", "hf_eager"),
            ("ours_fast",),
            ("ours_fast", "hf_sdpa"),
        ),
        Arch("beit_test", "BEiT tiny (test)", "vit", "beit_test", ("ours",), ()),
        Arch("vit_test", "ViT tiny (test)", "vit", "vit_test", ("hf_eager",), ()),
    ),
    batch_size=4,
    warmup_steps=1,
    rounds=2,
    steps_per_round=1,
    compile_dtypes=("fp32",),
    compile_backend="eager",
    compile_impls=("ours_fast", "hf_sdpa"),  # the Swin pair only (the tiny ViT reference is "hf_eager")
    compile_estimate_s=5.0,
    max_batch_cap=8,
    max_batch_cap_checkpointing=8,
    max_batch_probes=4,
    loader_files=12,
    loader_workers=2,
    loader_batches=2,
    matmul_size=128,
    budget_s=120.0,
)


def simmim_config(arch: Arch, **overrides: Any) -> SimMIMConfig:
    if arch.preset is None:
        return SimMIMConfig(backbone_config=ViTConfig(), **overrides)
    return SimMIMConfig.from_preset(arch.preset, **overrides)


def build_model(arch: Arch, impl: str, device: torch.device) -> torch.nn.Module:
    """A fresh model in train mode on `device` (constructed there: initializing Swin-B on a CPU takes seconds)."""
    if impl.startswith("ours"):
        overrides = {} if impl == "ours" else {"fast_window_attention": impl == "ours_fast"}
        config = simmim_config(arch, **overrides)

        def make() -> torch.nn.Module:
            return SimMIMForMaskedImageModeling(config)
    else:
        config = simmim_config(arch)
        backbone_config = config.backbone_config
        backbone_config.encoder_stride = config.encoder_stride
        attention = {"hf_sdpa": "sdpa", "hf_eager": "eager"}[impl]

        def make() -> torch.nn.Module:
            return AutoModelForMaskedImageModeling.from_config(backbone_config, attn_implementation=attention)

    with torch.device(device):
        model = make()
    return model.to(device).train()


@dataclass
class Batch:
    pixel_values: torch.Tensor
    bool_masked_pos: torch.Tensor


def make_batch(arch: Arch, impl: str, batch_size: int, device: torch.device) -> Batch:
    """Random images and SimMIM masks; transformers' classes take the mask flattened to (B, num_patches)."""
    config = simmim_config(arch)
    generator = SimMIMMaskGenerator(
        config.image_size, config.mask_patch_size, config.model_patch_size, config.mask_ratio
    )
    mask = generator(batch_size, device=device)
    if not impl.startswith("ours"):
        mask = mask.flatten(1)
    return Batch(torch.randn(batch_size, config.num_channels, *config.image_size, device=device), mask)


def train_step(
    model: Callable, optimizer: torch.optim.Optimizer, batch: Batch, dtype: str, device: torch.device
) -> Callable[[], None]:
    """The full training step as a closure: forward with the SimMIM loss, backward, fused AdamW step."""

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = model(pixel_values=batch.pixel_values, bool_masked_pos=batch.bool_masked_pos).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)


# ---- timing, memory and bookkeeping ------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device, collect: bool = False) -> None:
    """Return cached GPU memory; `collect` first frees reference cycles (compiled models), which takes a second
    with transformers imported: between groups only, and only where device memory is at stake."""
    if device.type == "cuda":
        if collect:
            gc.collect()
        torch.cuda.empty_cache()


def seconds_per_step(step: Callable[[], None], count: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(count):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / count


def tensor_bytes(tensors: Iterator[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def step_peak_memory_gib(
    step: Callable[[], None], model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
) -> float | None:
    """Peak tensor memory of one step of this model alone: its parameters and optimizer state plus the largest
    allocation increase during the step (other models of the group stay resident, so the absolute peak would
    count them too). CUDA only: on a CPU the suite does not measure memory."""
    if device.type != "cuda":
        return None
    free_memory(device)
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    synchronize(device)
    increase = torch.cuda.max_memory_allocated(device) - before
    state = (value for per_param in optimizer.state.values() for value in per_param.values())
    static = tensor_bytes(model.parameters()) + tensor_bytes(state)
    return (static + increase) / 2**30


class Budget:
    """Wall-clock budget of the suite: a cell starts only if its estimate still fits."""

    def __init__(self, seconds: float) -> None:
        self.start = time.monotonic()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def allows(self, estimate_s: float) -> bool:
        return self.elapsed() + estimate_s <= self.seconds


SKIPPED = "skipped: time budget"


def failure(error: BaseException) -> str:
    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"failed: {type(error).__name__}: {message[:200]}"


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA OOM, or a library's allocation failure on the edge of it (cuBLAS, cuDNN workspaces)."""
    text = str(error)
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower() or "ALLOC_FAILED" in text


def record_failure(row: dict[str, Any], error: BaseException) -> None:
    """A failed cell: the status says what, the row's traceback (JSON only) says where."""
    row["status"] = failure(error)
    row["traceback"] = traceback.format_exc(limit=-4)


# ---- sections ---------------------------------------------------------------------------------------------------
def matmul_peak_tflops(dtype: torch.dtype, size: int, device: torch.device, repeats: int = 10) -> float:
    """Best of 3 mean FLOP/s over `repeats` square matmuls of `size` (fp32 uses TF32 where it is enabled)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    best = 0.0
    for _ in range(3):
        seconds = seconds_per_step(lambda: torch.mm(a, b), repeats, device)
        best = max(best, 2 * size**3 / seconds / 1e12)
    return best


def flops_per_image(arch: Arch, device: torch.device) -> float:
    """Matrix-product and convolution FLOPs of one training step (forward + backward) per image, counted on the
    architecture's plainest implementation (the others do the same products, faster or not)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    impl = next(i for i in ("hf_eager", "ours_plain", "hf_sdpa", "ours", "ours_fast") if i in arch.impls)
    model = build_model(arch, impl, device)
    batch = make_batch(arch, impl, 2, device)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(pixel_values=batch.pixel_values, bool_masked_pos=batch.bool_masked_pos).loss.backward()
    return counter.get_total_flops() / 2


def image_size_label(arch: Arch) -> str:
    height, width = simmim_config(arch).image_size
    return f"{height}x{width}"


def prepare_cell(
    arch: Arch, impl: str, dtype: str, compiled: bool, suite: Suite, device: torch.device
) -> tuple[tuple[Callable[[], None], torch.nn.Module, torch.optim.Optimizer], float]:
    """Build, compile (optional), run the first step (the compilation; it also allocates the optimizer state) and
    warm up. Returns (step, model, optimizer) and the seconds until the first step ended."""
    start = time.perf_counter()
    model = build_model(arch, impl, device)
    optimizer = make_optimizer(model)
    runnable = torch.compile(model, backend=suite.compile_backend) if compiled else model
    step = train_step(runnable, optimizer, make_batch(arch, impl, suite.batch_size, device), dtype, device)
    seconds_per_step(step, 1, device)
    first_s = time.perf_counter() - start
    if suite.warmup_steps:
        seconds_per_step(step, suite.warmup_steps, device)
    return (step, model, optimizer), first_s


def measure_group(
    cells: list[tuple[Arch, str]],
    dtype: str,
    compiled: bool,
    suite: Suite,
    budget: Budget,
    device: torch.device,
    timings: dict[str, float],
) -> list[dict[str, Any]]:
    """Build, (compile,) warm up and time every cell of one group, round-robin; one row per cell."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    steps: dict[tuple[str, str], tuple[Callable[[], None], torch.nn.Module, torch.optim.Optimizer]] = {}
    for arch, impl in cells:
        key = (arch.key, impl)
        row = rows[key] = {
            "model": arch.key,
            "label": arch.label,
            "family": arch.family,
            "impl": impl,
            "dtype": dtype,
            "compiled": compiled,
            "batch_size": suite.batch_size,
            "image_size": image_size_label(arch),
        }
        estimate = timings.get("compile_s", suite.compile_estimate_s) if compiled else timings.get("build_s", 5.0)
        if not budget.allows(estimate):
            row["status"] = SKIPPED
            continue
        try:
            steps[key], first_s = prepare_cell(arch, impl, dtype, compiled, suite, device)
            row["round_step_s"] = []
        except Exception as error:  # noqa: BLE001 - one failing cell (OOM, compile error) must not stop the suite
            record_failure(row, error)
        if key not in steps:
            free_memory(device, collect=True)
            continue
        if compiled:
            row["compile_s"] = first_s
            timings["compile_s"] = max(first_s, timings.get("compile_s", 0.0))
        else:
            timings["build_s"] = first_s
    for _ in range(suite.rounds):
        for key, (step, _, _) in list(steps.items()):
            if not budget.allows(0.0):
                rows[key]["note"] = "rounds cut by the time budget"
                continue
            try:
                rows[key]["round_step_s"].append(seconds_per_step(step, suite.steps_per_round, device))
            except Exception as error:  # noqa: BLE001
                record_failure(rows[key], error)
                del steps[key]
                free_memory(device, collect=True)
    for key, (step, model, optimizer) in steps.items():
        row = rows[key]
        if not row["round_step_s"]:
            row["status"] = SKIPPED
            continue
        row["step_s"] = statistics.median(row["round_step_s"])
        row["images_per_s"] = suite.batch_size / row["step_s"]
        with contextlib.suppress(Exception):  # memory is a bonus: a failure here keeps the timing
            row["peak_memory_gib"] = step_peak_memory_gib(step, model, optimizer, device)
        row["status"] = "ok"
    steps.clear()
    if compiled:
        torch._dynamo.reset()
    free_memory(device, collect=True)
    return list(rows.values())


def add_derived(rows: list[dict[str, Any]], flops: dict[str, float], peaks: dict[str, float]) -> None:
    """TFLOP/s, MFU (against the bf16 matmul peak; fp32 rows also against TF32) and speed vs hf_sdpa."""
    for row in rows:
        if row.get("status") != "ok":
            continue
        if row["model"] in flops:
            row["tflops"] = flops[row["model"]] * row["images_per_s"] / 1e12
            if "bf16" in peaks:
                row["mfu"] = row["tflops"] / peaks["bf16"]
            if row["dtype"] == "fp32" and "tf32" in peaks:
                row["fraction_of_tf32_peak"] = row["tflops"] / peaks["tf32"]
        reference = [
            r
            for r in rows
            if r.get("status") == "ok"
            and r["impl"] == "hf_sdpa"
            and (r["family"], r["dtype"], r["compiled"]) == (row["family"], row["dtype"], row["compiled"])
        ]
        if reference:
            row["vs_hf_sdpa"] = row["images_per_s"] / reference[0]["images_per_s"]


def largest_fitting_batch(
    fits: Callable[[int], bool], start: int, cap: int, max_probes: int, rel_tol: float = 0.1
) -> dict[str, Any]:
    """Probe `fits(batch)`: double from `start` (halve while nothing fits), then bisect (multiples of 8 from 16 up)
    until the bracket is within `rel_tol`, at most `max_probes` probes. Returns the largest batch seen to fit and the
    smallest seen to fail (None: nothing failed up to `cap`)."""
    largest, failing, probes = 0, None, 0
    candidate = min(start, cap)
    while probes < max_probes:
        probes += 1
        if fits(candidate):
            largest = candidate
        else:
            failing = candidate
        if failing is None:
            if largest >= cap:
                break
            candidate = min(2 * largest, cap)
        elif largest == 0:
            if failing == 1:
                break
            candidate = max(failing // 2, 1)
        else:
            if failing - largest <= max(1.0, rel_tol * largest):
                break
            middle = (largest + failing) // 2
            candidate = middle // 8 * 8 if middle >= 16 else middle
            if candidate <= largest:
                break
    return {
        "largest_fitting": largest,
        "smallest_failing": failing,
        "probes": probes,
        "capped": failing is None and largest >= cap,
    }


def max_batch_cell(
    arch: Arch, impl: str, checkpointing: bool, suite: Suite, device: torch.device, budget: Budget
) -> dict[str, Any]:
    """The largest bf16 training-step batch that fits on `device` (eager)."""
    model = build_model(arch, impl, device)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    optimizer = make_optimizer(model)
    train_step(model, optimizer, make_batch(arch, impl, 2, device), "bf16", device)()  # optimizer state exists

    def fits(batch_size: int) -> bool:
        if not budget.allows(0.0):
            raise TimeoutError("time budget spent during the search")
        try:
            train_step(model, optimizer, make_batch(arch, impl, batch_size, device), "bf16", device)()
            synchronize(device)
            return True
        except RuntimeError as error:
            if not is_out_of_memory(error):
                raise
            optimizer.zero_grad(set_to_none=True)
        free_memory(device)  # the failed step's tensors were freed with its traceback; return them to the driver
        return False

    cap = suite.max_batch_cap_checkpointing if checkpointing else suite.max_batch_cap
    return largest_fitting_batch(fits, min(suite.batch_size, cap), cap, suite.max_batch_probes)


def loader_cell(config: SimMIMConfig, suite: Suite, device: torch.device, folder: str) -> dict[str, Any]:
    """Images/s of our pretraining input path in a DataLoader with `suite.loader_workers` workers, timed from the
    moment every worker has delivered its first batch."""
    from modeling_simmim.data import (
        PretrainCollator,
        RobustImageDataset,
        build_pretrain_transform,
        load_image_datasets,
    )

    image_size = config.image_size
    loaded = load_image_datasets(train_dir=folder, verify_images=False)
    dataset = RobustImageDataset(loaded.datasets["train"], loaded.image_column, build_pretrain_transform(image_size))
    generator = SimMIMMaskGenerator(image_size, config.mask_patch_size, config.model_patch_size, config.mask_ratio)
    warm_batches = suite.loader_workers
    sampler = torch.utils.data.RandomSampler(
        dataset, replacement=True, num_samples=suite.batch_size * (warm_batches + suite.loader_batches)
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=suite.batch_size,
        sampler=sampler,
        num_workers=suite.loader_workers,
        collate_fn=PretrainCollator(SimMIMDataCollator(generator)),
        pin_memory=device.type == "cuda",
        drop_last=True,
    )
    batches = iter(loader)
    for _ in range(warm_batches):
        next(batches)
    start = time.perf_counter()
    images = sum(batch["pixel_values"].shape[0] for batch in batches)
    seconds = time.perf_counter() - start
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}


# ---- the report --------------------------------------------------------------------------------------------------
def _fmt(value: Any, spec: str = ".0f", suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:{spec}}{suffix}"


def format_markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    peaks = meta.get("matmul_peak_tflops", {})
    lines = [
        f"# GPU suite ({'smoke, tiny models' if meta['smoke'] else 'full'}): {meta['device']}",
        "",
        f"`{meta['command']}`, {meta['date']}, torch {meta['torch']}, transformers {meta['transformers']}, "
        f"{_fmt(meta.get('elapsed_s'), '.0f')} s of a {meta['budget_s']:.0f} s budget.",
        f"Matmul peak measured in this run (TFLOP/s, {meta['matmul_size']}^3): "
        + (", ".join(f"{k} {v:.1f}" for k, v in peaks.items()) or "-")
        + ". "
        f"FLOPs per image (GFLOP, {meta['flop_method']}): "
        + (", ".join(f"{k} {v / 1e9:.1f}" for k, v in meta.get("flops_per_image", {}).items()) or "-")
        + ".",
        "",
        f"## Training step, batch {meta['batch_size']} (median of {meta['rounds']} interleaved rounds of "
        f"{meta['steps_per_round']} steps)",
        "",
        "| model | impl | dtype | compiled | img/s | step ms | vs hf_sdpa | TFLOP/s | MFU (bf16 peak) | peak mem GiB "
        "| compile s | status |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in report["throughput"]:
        lines.append(
            f"| {row['label']} | {row['impl']} | {row['dtype']} | {'yes' if row['compiled'] else 'no'} | "
            f"{_fmt(row.get('images_per_s'))} | {_fmt(row.get('step_s') and row['step_s'] * 1e3, '.1f')} | "
            f"{_fmt(row.get('vs_hf_sdpa'), '.2f', 'x')} | {_fmt(row.get('tflops'), '.3g')} | "
            f"{_fmt(row.get('mfu') and row['mfu'] * 100, '.1f', '%')} | {_fmt(row.get('peak_memory_gib'), '.1f')} | "
            f"{_fmt(row.get('compile_s'))} | {row.get('status', '-')}{'; ' + row['note'] if row.get('note') else ''} |"
        )
    lines += [
        "",
        "Implementations: " + "; ".join(f"`{k}` {v}" for k, v in IMPL_HELP.items()) + ". fp32 rows use "
        "TF32 matmuls; `vs hf_sdpa` compares with transformers' default class of the same family, dtype and "
        "compile setting (for ViT: the BEiT-style model against plain ViT-B, indicative only).",
        "",
    ]
    lines += [
        f"## Where a bf16 step's time goes (one profiled eager step, batch {meta['batch_size']})",
        "",
        "| model | impl | profiled ms | matmul + conv | fused attention | everything else | top (ms) | status |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for row in report["profile"]:
        top = "; ".join(f"{name[:60]} {ms:.1f}" for name, ms in row.get("top_ms", [])[:6])
        lines.append(
            f"| {row['label']} | {row['impl']} | {_fmt(row.get('total_ms'), '.1f')} | "
            f"{_fmt(row.get('matmul_share') and row['matmul_share'] * 100, '.0f', '%')} | "
            f"{_fmt(row.get('fused_attention_share') and row['fused_attention_share'] * 100, '.0f', '%')} | "
            f"{_fmt(row.get('outside_matmul_share') and row['outside_matmul_share'] * 100, '.0f', '%')} | "
            f"{top or '-'} | {row.get('status', '-')} |"
        )
    lines += ["", "(GPU: kernel time, split by kernel name; CPU: aten ops' self time.)", ""]
    lines += [
        "## Largest per-device batch (bf16 training step, eager)",
        "",
        "| model | impl | gradient checkpointing | largest that fits | smallest that failed | probes | status |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for row in report["max_batch"]:
        failing = row.get("smallest_failing")
        largest = row.get("largest_fitting")
        lines.append(
            f"| {row['label']} | {row['impl']} | {'yes' if row['checkpointing'] else 'no'} | "
            f"{_fmt(largest, 'd')}{' (cap)' if row.get('capped') else ''} | {_fmt(failing, 'd')} | "
            f"{_fmt(row.get('probes'), 'd')} | {row.get('status', '-')} |"
        )
    lines += [
        "",
        f"## Input pipeline ({meta['loader_workers']} workers, JPEG 500x375 q90) vs the GPU step's appetite",
        "",
        "| image size | loader img/s | appetite img/s (fastest bf16 `ours` step) | loader / appetite | status |",
        "|---|---:|---:|---:|---|",
    ]
    for row in report["loader"]:
        lines.append(
            f"| {row['image_size']} | {_fmt(row.get('images_per_s'))} | {_fmt(row.get('appetite_images_per_s'))}"
            f"{' (' + row['appetite_from'] + ')' if row.get('appetite_from') else ''} | "
            f"{_fmt(row.get('loader_over_appetite'), '.2f', 'x')} | {row.get('status', '-')} |"
        )
    skipped = [
        f"{r.get('label', r.get('image_size'))} {r.get('impl', '')} {r.get('dtype', '')}".strip()
        for section in ("throughput", "profile", "max_batch", "loader")
        for r in report[section]
        if r.get("status") == SKIPPED
    ]
    if meta.get("failures"):
        lines += ["", "Failed outside the tables: " + "; ".join(f"{k}: {v}" for k, v in meta["failures"].items())]
    if meta.get("sections_not_run"):
        lines += ["", "Sections not run (--sections): " + ", ".join(meta["sections_not_run"]) + "."]
    lines += [
        "",
        f"Skipped for the time budget: {len(skipped)} cell(s)" + (": " + "; ".join(skipped) if skipped else "."),
    ]
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], output_dir: Path, budget: Budget) -> None:
    report["meta"]["elapsed_s"] = budget.elapsed()
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "gpu_suite.json").write_text(json.dumps(report, indent=2, default=str))
    (output_dir / "gpu_suite.md").write_text(format_markdown(report))


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)"
    return f"CPU ({os.cpu_count()} logical CPUs)"


# ---- main --------------------------------------------------------------------------------------------------------
def new_report(
    suite: Suite, sections: tuple[str, ...], device: torch.device, command: str, smoke: bool
) -> dict[str, Any]:
    import transformers

    meta = {
        "command": command,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device_description(device),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "smoke": smoke,
        "budget_s": suite.budget_s,
        "batch_size": suite.batch_size,
        "rounds": suite.rounds,
        "steps_per_round": suite.steps_per_round,
        "matmul_size": suite.matmul_size,
        "loader_workers": suite.loader_workers,
        "compile_backend": suite.compile_backend,
        "tf32": True,
        "sections_not_run": [s for s in SECTIONS if s not in sections],
        "flop_method": "torch.utils.flop_counter, one eager step at batch 2, SDPA math backend, / 2",
        "matmul_peak_tflops": {},
        "flops_per_image": {},
        "failures": {},
    }
    return {"meta": meta, "throughput": [], "profile": [], "max_batch": [], "loader": []}


def reference_section(suite: Suite, device: torch.device, meta: dict[str, Any]) -> None:
    """The matmul peaks (bf16; TF32 on CUDA) and the FLOPs per image of every architecture, into `meta`."""
    dtypes = {"bf16": torch.bfloat16, "tf32": torch.float32} if device.type == "cuda" else {"bf16": torch.bfloat16}
    for name, dtype in dtypes.items():
        try:
            meta["matmul_peak_tflops"][name] = matmul_peak_tflops(dtype, suite.matmul_size, device)
        except Exception as error:  # noqa: BLE001 - then no MFU, but the rest still runs
            meta["failures"][f"matmul_peak_{name}"] = failure(error)
    for arch in suite.archs:
        try:
            meta["flops_per_image"][arch.key] = flops_per_image(arch, device)
        except Exception as error:  # noqa: BLE001
            meta["failures"][f"flops_{arch.key}"] = failure(error)
    free_memory(device, collect=True)


def throughput_section(
    suite: Suite,
    dtypes: tuple[str, ...],
    compiled: bool,
    device: torch.device,
    budget: Budget,
    report: dict[str, Any],
    save: Callable[[], None],
    timings: dict[str, float],
) -> None:
    """One interleaved group per (dtype, family); rows appended to the report, which is saved after each group."""
    families: dict[str, list[tuple[Arch, str]]] = {}
    for arch in suite.archs:
        impls = [i for i in arch.impls if not compiled or suite.compile_impls is None or i in suite.compile_impls]
        families.setdefault(arch.family, []).extend((arch, impl) for impl in impls)
    for dtype in dtypes:
        for cells in families.values():
            report["throughput"] += measure_group(cells, dtype, compiled, suite, budget, device, timings)
            add_derived(report["throughput"], report["meta"]["flops_per_image"], report["meta"]["matmul_peak_tflops"])
            save()


def profile_section(suite: Suite, device: torch.device, budget: Budget, report: dict[str, Any]) -> None:
    """One profiled bf16 eager step per listed implementation: where the device time goes, and the top kernels."""
    from step_profile import profile_step

    for arch in suite.archs:
        for impl in arch.profile_impls:
            row: dict[str, Any] = {
                "model": arch.key,
                "label": arch.label,
                "impl": impl,
                "dtype": "bf16",
                "batch_size": suite.batch_size,
            }
            if not budget.allows(10.0 if device.type == "cuda" else 0.0):
                row["status"] = SKIPPED
            else:
                try:
                    (step, _, _), _ = prepare_cell(arch, impl, "bf16", False, suite, device)
                    row.update(profile_step(step, device), status="ok")
                except Exception as error:  # noqa: BLE001
                    record_failure(row, error)
            report["profile"].append(row)
            free_memory(device, collect=True)


def max_batch_section(
    suite: Suite, device: torch.device, budget: Budget, report: dict[str, Any], save: Callable[[], None]
) -> None:
    for arch in suite.archs:
        for impl in arch.max_batch_impls:
            for checkpointing in (False, True):
                row = {
                    "model": arch.key,
                    "label": arch.label,
                    "impl": impl,
                    "dtype": "bf16",
                    "checkpointing": checkpointing,
                }
                if not budget.allows(30.0 if device.type == "cuda" else 0.0):
                    row["status"] = SKIPPED
                else:
                    try:
                        row.update(max_batch_cell(arch, impl, checkpointing, suite, device, budget), status="ok")
                    except TimeoutError:
                        row["status"] = SKIPPED
                    except Exception as error:  # noqa: BLE001
                        record_failure(row, error)
                free_memory(device, collect=True)
                report["max_batch"].append(row)
                save()


def run_suite(
    suite: Suite, sections: tuple[str, ...], device: torch.device, output_dir: Path, command: str, smoke: bool
) -> dict[str, Any]:
    """Every section in `sections`, in the order of SECTIONS; the report is saved after each step."""
    budget = Budget(suite.budget_s)
    report = new_report(suite, sections, device, command, smoke)

    def save() -> None:
        write_report(report, output_dir, budget)

    with suite_settings(cpu_threads=1 if device.type == "cpu" else None):
        reference_section(suite, device, report["meta"])
        save()
        timings: dict[str, float] = {}
        if "throughput" in sections:
            throughput_section(suite, suite.dtypes, False, device, budget, report, save, timings)
        if "profile" in sections:
            profile_section(suite, device, budget, report)
            save()
        if "loader" in sections:
            report["loader"] = loader_section(suite, device, report["throughput"], budget)
            save()
        if "max_batch" in sections:
            max_batch_section(suite, device, budget, report, save)
        if "compile" in sections:
            # Last, bf16 first (what users train in): the budget cuts the compiled fp32 cells first.
            dtypes = tuple(d for d in ("bf16", "fp32") if d in suite.compile_dtypes)
            throughput_section(suite, dtypes, True, device, budget, report, save, timings)
            report["loader"] = update_appetite(report["loader"], report["throughput"])
    save()
    return report


@contextlib.contextmanager
def suite_settings(cpu_threads: int | None) -> Iterator[None]:
    """TF32 for fp32 matmuls and convolutions, room for the many graphs one process compiles, and (smoke runs on a
    CPU) one intra-op thread, which tiny models run fastest with on a busy machine; restored after."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    threads = torch.get_num_threads()
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if cpu_threads:
        torch.set_num_threads(cpu_threads)
    try:
        with torch._dynamo.config.patch({limit: 64}):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
        torch.set_num_threads(threads)


def loader_section(
    suite: Suite, device: torch.device, throughput_rows: list[dict[str, Any]], budget: Budget
) -> list[dict[str, Any]]:
    """One row per image size of the suite's models, on the same generated JPEG folder."""
    from data_throughput import make_jpegs

    configs = {image_size_label(arch): simmim_config(arch) for arch in suite.archs}
    rows: list[dict[str, Any]] = [{"image_size": label, "workers": suite.loader_workers} for label in configs]
    estimate_s = 20.0 if device.type == "cuda" else 0.0
    if not budget.allows(estimate_s):
        return [dict(row, status=SKIPPED) for row in rows]
    with tempfile.TemporaryDirectory() as folder:
        make_jpegs(folder, suite.loader_files, 500, 375, quality=90)
        for row, config in zip(rows, configs.values()):
            if not budget.allows(estimate_s):
                row["status"] = SKIPPED
                continue
            try:
                row.update(loader_cell(config, suite, device, folder), status="ok")
            except Exception as error:  # noqa: BLE001
                record_failure(row, error)
    return update_appetite(rows, throughput_rows)


def update_appetite(loader_rows: list[dict[str, Any]], throughput_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The GPU step's appetite for each image size: the fastest bf16 step of our model (eager or compiled)."""
    for row in loader_rows:
        candidates = [
            r
            for r in throughput_rows
            if r.get("status") == "ok"
            and r["impl"].startswith("ours")
            and r["dtype"] == "bf16"
            and r.get("image_size") == row["image_size"]
        ]
        if candidates:
            best = max(candidates, key=lambda r: r["images_per_s"])
            row["appetite_images_per_s"] = best["images_per_s"]
            row["appetite_from"] = f"{best['model']} {best['impl']}{' compiled' if best['compiled'] else ''}"
            if row.get("images_per_s"):
                row["loader_over_appetite"] = row["images_per_s"] / best["images_per_s"]
    return loader_rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/gpu_suite")
    parser.add_argument("--smoke", action="store_true", help="tiny models, a few steps: checks the suite on a CPU")
    parser.add_argument("--budget_s", type=float, default=None, help="wall-clock budget (default: 420 s, smoke 120)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--compile_dtypes", default=None, help="comma-separated subset of bf16,fp32 to compile")
    parser.add_argument("--batch_size", type=int, default=None, help="throughput batch (default 128, smoke 4)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu (implies --smoke)")
    args = parser.parse_args(argv)
    sections = tuple(s for s in args.sections.split(",") if s)
    if unknown := [s for s in sections if s not in SECTIONS]:
        parser.error(f"unknown section(s) {unknown}; choose from {SECTIONS}")
    args.sections = sections
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":  # fewer fragmentation OOMs in the batch search; read at the first allocation
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    suite = SMOKE if args.smoke or device.type != "cuda" else FULL
    overrides: dict[str, Any] = {}
    if args.budget_s is not None:
        overrides["budget_s"] = args.budget_s
    if args.batch_size is not None:
        overrides["batch_size"] = args.batch_size
    if args.compile_dtypes is not None:
        overrides["compile_dtypes"] = tuple(d for d in args.compile_dtypes.split(",") if d)
    suite = dataclasses.replace(suite, **overrides) if overrides else suite
    command = " ".join(["python", "benchmarks/gpu_suite.py", *(argv if argv is not None else sys.argv[1:])])
    report = run_suite(suite, args.sections, device, Path(args.output_dir), command, smoke=suite.archs == SMOKE.archs)
    print(format_markdown(report))
    return report


if __name__ == "__main__":
    main()
