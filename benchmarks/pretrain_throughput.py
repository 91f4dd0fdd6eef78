"""Training-step throughput: our SimMIMForMaskedImageModeling vs transformers' own masked-image-modeling classes.

One process, same config, same weights, same batch and mask. Each timed step is a full training step (forward with
the SimMIM loss, backward, AdamW step, zero_grad); the implementations are interleaved step by step so that a noisy
(shared) machine slows them alike; warm-up steps are dropped and the median of `--steps` is reported.

Implementations (`--impls`):
  ours        SimMIMForMaskedImageModeling with its default config
  ours_fast   the same with `fast_window_attention=True` (Swin only)
  ours_plain  the same with `fast_window_attention=False` (transformers' forward inside our model)
  ours_native_bf16  `ours` with the CPU bf16 matmul fallback off (PyTorch's own bf16 kernels; differs from `ours`
              only for bf16 on CPUs without native bf16 matmul, see modeling_simmim/cpu_bf16.py)
  hf_sdpa     transformers' SwinForMaskedImageModeling / ViTForMaskedImageModeling, default attention (SDPA)
  hf_eager    the same with attn_implementation="eager"

Models (`--model`):
  swin_tiny (default; Swin-T 192 px, window 6), swin_base: our preset vs SwinForMaskedImageModeling, shared weights.
  vit_base: plain ViT-B/16 at 224 in our model vs ViTForMaskedImageModeling, shared weights.
  beit_base: our BEiT-style ViT-B/16 (the official SimMIM ViT, preset "vit_base") vs ViTForMaskedImageModeling with
     ViT-B/16 (different architectures, so only `ours` is ours; ratios are indicative).
  swin_test, vit_test: tiny models for smoke tests.

Also reported: FLOPs per step (torch.utils.flop_counter on one step), achieved FLOP/s and its fraction of the matmul
peak measured in the same run for that dtype, and peak memory (CUDA: max_memory_allocated; CPU: peak RSS increase
during one step, sampled every 2 ms).

    python benchmarks/pretrain_throughput.py                      # Swin-T 192/w6, batch 8, fp32 and bf16
    python benchmarks/pretrain_throughput.py --dtype fp32 --steps 10 --threads 2 --json results.json
    python benchmarks/pretrain_throughput.py --model vit_base --torch_compile
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_profile import profile_step  # noqa: E402
from transformers import SwinForMaskedImageModeling, ViTConfig, ViTForMaskedImageModeling  # noqa: E402

from modeling_simmim import SimMIMConfig, SimMIMForMaskedImageModeling  # noqa: E402
from modeling_simmim.cpu_bf16 import fallback_context, native_cpu_bf16_matmul_supported  # noqa: E402
from modeling_simmim.masking import SimMIMMaskGenerator  # noqa: E402
from modeling_simmim.optimization import create_optimizer  # noqa: E402

MODELS = ("swin_tiny", "swin_base", "vit_base", "beit_base", "swin_test", "vit_test")
IMPLS = ("ours", "ours_fast", "ours_plain", "ours_native_bf16", "hf_sdpa", "hf_eager")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _vit_b16(image_size: int = 224) -> ViTConfig:
    return ViTConfig(
        image_size=image_size,
        patch_size=16,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        encoder_stride=16,
    )


def simmim_config(model: str, **overrides) -> SimMIMConfig:
    """Our config for a benchmark model name (`overrides`: SimMIMConfig fields such as fast_window_attention)."""
    if model == "vit_base":
        return SimMIMConfig(backbone_config=_vit_b16(), **overrides)
    if model == "beit_base":
        return SimMIMConfig.from_preset("vit_base", **overrides)
    return SimMIMConfig.from_preset(model, **overrides)


def _reference_backbone_config(model: str, config: SimMIMConfig):
    if model == "beit_base":
        return _vit_b16()  # transformers has no SimMIM head for BEiT; the closest class is plain ViT-B/16
    backbone_config = copy.deepcopy(config.backbone_config)
    backbone_config.encoder_stride = config.encoder_stride
    return backbone_config


def build_models(model: str, impls: list[str], device: torch.device) -> dict[str, torch.nn.Module]:
    """All implementations with identical weights (where the architectures are identical)."""
    config = simmim_config(model)
    ours = SimMIMForMaskedImageModeling(config)
    models: dict[str, torch.nn.Module] = {}
    for impl in impls:
        if impl == "ours":
            models[impl] = ours
        elif impl in ("ours_fast", "ours_plain"):
            models[impl] = SimMIMForMaskedImageModeling(
                simmim_config(model, fast_window_attention=impl == "ours_fast")
            )
            models[impl].load_state_dict(ours.state_dict())
        elif impl == "ours_native_bf16":
            models[impl] = SimMIMForMaskedImageModeling(config)
            models[impl].load_state_dict(ours.state_dict())
        else:
            backbone_config = _reference_backbone_config(model, config)
            backbone_config._attn_implementation = "sdpa" if impl == "hf_sdpa" else "eager"
            reference_class = (
                SwinForMaskedImageModeling if backbone_config.model_type == "swin" else (ViTForMaskedImageModeling)
            )
            if backbone_config.model_type not in ("swin", "vit"):
                raise ValueError(f"transformers has no masked-image-modeling class for {model}")
            reference = reference_class(backbone_config)
            if model != "beit_base":
                reference.load_state_dict(ours.state_dict(), strict=True)
            models[impl] = reference
    return {name: m.to(device).train() for name, m in models.items()}


@dataclass
class Result:
    impl: str
    dtype: str
    compiled: bool
    step_s: float
    images_per_s: float
    step_times_s: list[float]
    step_cpu_times_s: list[float]
    ratio_vs_hf_sdpa: float | None = None
    ratio_vs_hf_eager: float | None = None
    gflop_per_step: float | None = None
    achieved_tflops: float | None = None
    fraction_of_matmul_peak: float | None = None
    peak_memory_mib: float | None = None
    compile_s: float | None = None
    extra: dict = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_tflops(dtype: torch.dtype, device: torch.device, repeats: int = 3, timer: str = "wall") -> float:
    """Best FLOP/s of large square matmuls in `dtype` (the step's matmul dtype), best of `repeats` per size, timed
    with the same clock as the steps."""
    clock = time.process_time if timer == "cpu" else time.perf_counter
    if device.type == "cuda":
        sizes = (4096, 8192)
    else:  # CPUs without native bf16 run it ~10x slower than fp32: keep the probe short there
        sizes = (1024, 2048) if dtype == torch.float32 else (512, 1024)
    best = 0.0
    for size in sizes:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        torch.mm(a, b)
        _sync(device)
        for _ in range(repeats):
            start = clock()
            torch.mm(a, b)
            _sync(device)
            best = max(best, 2 * size**3 / max(clock() - start, 1e-9) / 1e12)
    return best


def _release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc), so an RSS delta is not hidden by memory an earlier step freed."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class _RssSampler:
    """Peak resident set size of this process while active (CPU memory of torch is invisible to tracemalloc)."""

    def __init__(self, interval_s: float = 0.002):
        import psutil

        self._process = psutil.Process(os.getpid())
        self._interval = interval_s
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.start = self._process.memory_info().rss
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self._interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def make_step(model, optimizer, pixel_values, mask, dtype: torch.dtype, device: torch.device, impl: str):
    """One full training step as a closure; returns the loss tensor."""
    # transformers' MIM heads take (B, num_patches); ours takes the (B, H/p, W/p) grid directly.
    model_mask = mask if impl.startswith("ours") else mask.flatten(1)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    # Ours: the step runs in the CPU bf16 fallback's context, as the SimMIM Trainer runs it (a no-op except for bf16
    # on CPUs without native bf16 matmul); ours_native_bf16: without it.
    use_fallback = impl.startswith("ours") and impl != "ours_native_bf16"

    def step():
        with autocast, fallback_context(model, pixel_values) if use_fallback else contextlib.nullcontext():
            loss = model(pixel_values, bool_masked_pos=model_mask).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


# Ops that only create views (no kernel, no memory traffic) are not counted as kernels.
_VIEW_OPS = {
    "view",
    "_unsafe_view",
    "reshape",
    "t",
    "transpose",
    "permute",
    "expand",
    "unsqueeze",
    "squeeze",
    "slice",
    "select",
    "as_strided",
    "detach",
    "alias",
    "split",
    "split_with_sizes",
    "unbind",
    "flatten",
    "unflatten",
    "view_as",
    "expand_as",
    "_reshape_alias",
    "lift_fresh",
    "empty",
    "empty_like",
    "empty_strided",
    "new_empty",
    "new_empty_strided",
    "_has_compatible_shallow_copy_type",
    "is_same_size",
    "sym_size",
    "sym_stride",
}
# Ops whose only job is to move or convert data (layout copies, dtype casts, gathers, padding, rolls).
_COPY_OPS = {
    "copy_",
    "clone",
    "_to_copy",
    "contiguous",
    "cat",
    "index_select",
    "roll",
    "constant_pad_nd",
    "stack",
    "repeat",
    "repeat_interleave",
    "index",
    "gather",
    "pixel_shuffle",
    "pixel_unshuffle",
}


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten kernels of a step (views excluded) and the bytes written by pure data-movement ops: a
    machine-independent proxy for per-op overhead (kernel launches on GPUs) and copy traffic."""

    def __init__(self):
        super().__init__()
        self.kernels = 0
        self.copy_ops = 0
        self.copy_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in _VIEW_OPS:
            self.kernels += 1
            if name in _COPY_OPS:
                self.copy_ops += 1
                for tensor in torch.utils._pytree.tree_leaves(out):
                    if isinstance(tensor, torch.Tensor):
                        self.copy_bytes += tensor.numel() * tensor.element_size()
        return out


def format_profiles(report: dict) -> str:
    lines = []
    for r in report["results"]:
        summary = r["extra"].get("profile")
        if summary:
            top = ", ".join(f"{name} {ms:.0f}" for name, ms in summary["top_ms"])
            lines.append(
                f"{r['impl']} {r['dtype']}: matmul kernels {summary['matmul_ms']:.0f} of "
                f"{summary['total_ms']:.0f} ms profiled self time ({100 * summary['matmul_share']:.0f}%), "
                f"fused attention {summary['fused_attention_ms']:.0f} ms "
                f"({100 * summary['fused_attention_share']:.0f}%), outside the matmuls "
                f"{summary['outside_matmul_ms']:.0f} ms ({100 * summary['outside_matmul_share']:.0f}%); "
                f"top ops (ms): {top}"
            )
    return "\n".join(lines)


def count_flops(step) -> tuple[float, dict[str, int]]:
    """FLOPs of one step (torch.utils.flop_counter) and its kernel / copy counts."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, _OpCounter() as ops:
        step()
    return float(counter.get_total_flops()), {
        "kernels": ops.kernels,
        "copy_ops": ops.copy_ops,
        "copy_mib": round(ops.copy_bytes / 2**20, 1),
    }


def first_step_seconds(steps: dict, device: torch.device) -> dict[str, float]:
    """First call of each step alone: compilation time when compiling. It also fills one-time caches (e.g. the
    window geometry), so that later counts are those of a steady-state step."""
    seconds = {}
    for impl, step in steps.items():
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        seconds[impl] = time.perf_counter() - start
    return seconds


def timed_steps(steps: dict, args: argparse.Namespace, device: torch.device, dtype_name: str):
    """Wall and CPU seconds of each step after `args.warmup` ones; implementations interleaved step by step."""
    times: dict[str, list[float]] = {impl: [] for impl in steps}
    cpu_times: dict[str, list[float]] = {impl: [] for impl in steps}
    for index in range(args.warmup + args.steps):
        for impl, step in steps.items():
            _sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            step()
            _sync(device)
            if index >= args.warmup:
                times[impl].append(time.perf_counter() - start)
                cpu_times[impl].append(time.process_time() - start_cpu)
        if args.verbose:
            print(
                f"[{dtype_name}] step {index + 1}/{args.warmup + args.steps}: "
                + ", ".join(f"{k} {v[-1]:.3f}s wall {cpu_times[k][-1]:.3f}s cpu" for k, v in times.items() if v),
                file=sys.stderr,
                flush=True,
            )
    return times, cpu_times


def peak_memory_mib(step, device: torch.device) -> float:
    """Peak memory of one more step, alone: CUDA's allocator peak, or the process RSS growth on a CPU."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    _release_free_memory()
    with _RssSampler() as sampler:
        step()
    return (sampler.peak - sampler.start) / 2**20


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    impls = [impl for impl in args.impls.split(",") if impl]
    for impl in impls:
        if impl not in IMPLS:
            raise ValueError(f"unknown implementation {impl!r}; choose from {IMPLS}")
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]

    config = simmim_config(args.model)
    image_size = config.image_size
    generator = SimMIMMaskGenerator(image_size, config.mask_patch_size, config.model_patch_size, config.mask_ratio)
    pixel_values = torch.randn(args.batch_size, config.num_channels, *image_size, device=device)
    mask = generator(args.batch_size, device=device)  # the mask lives on the device, like our collator's

    results: list[Result] = []
    peaks: dict[str, float] = {}
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        peaks[dtype_name] = matmul_peak_tflops(dtype, device, timer=args.timer)
        models = build_models(args.model, impls, device)
        steps = {}
        for impl, model in models.items():
            optimizer = create_optimizer(model, learning_rate=1e-4, fused=None)
            runnable = model
            if args.torch_compile:
                # Our model compiles as one graph (tested); transformers' may break graphs, so no fullgraph there.
                runnable = torch.compile(model, fullgraph=impl.startswith("ours") and args.model.startswith("swin"))
            steps[impl] = make_step(runnable, optimizer, pixel_values, mask, dtype, device, impl)
        compile_s = first_step_seconds(steps, device)
        # FLOPs on the eager model (FlopCounterMode and compiled graphs do not mix).
        flops, op_counts = {}, {}
        for impl, model in models.items():
            optimizer = create_optimizer(model, learning_rate=1e-4, fused=None)
            step = make_step(model, optimizer, pixel_values, mask, dtype, device, impl)
            flops[impl], op_counts[impl] = count_flops(step)
        times, cpu_times = timed_steps(steps, args, device, dtype_name)
        memory = {impl: peak_memory_mib(step, device) for impl, step in steps.items()}
        if args.profile:
            for impl, step in steps.items():
                op_counts[impl]["profile"] = profile_step(step, device)
        timed = cpu_times if args.timer == "cpu" else times
        medians = {impl: statistics.median(values) for impl, values in timed.items()}
        for impl, median in medians.items():
            result = Result(
                impl=impl,
                dtype=dtype_name,
                compiled=bool(args.torch_compile),
                step_s=median,
                images_per_s=args.batch_size / median,
                step_times_s=times[impl],
                step_cpu_times_s=cpu_times[impl],
                gflop_per_step=flops[impl] / 1e9,
                achieved_tflops=flops[impl] / median / 1e12,
                peak_memory_mib=memory[impl],
                compile_s=compile_s[impl] if args.torch_compile else None,
                extra=op_counts[impl],
            )
            result.fraction_of_matmul_peak = result.achieved_tflops / peaks[dtype_name]
            if "hf_sdpa" in medians:
                result.ratio_vs_hf_sdpa = medians["hf_sdpa"] / median
            if "hf_eager" in medians:
                result.ratio_vs_hf_eager = medians["hf_eager"] / median
            results.append(result)
        del models, steps

    return {
        "meta": {
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "model": args.model,
            "image_size": list(image_size),
            "batch_size": args.batch_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "timer": args.timer,
            "threads": torch.get_num_threads(),
            "device": device_name(device),
            "native_cpu_bf16_matmul": native_cpu_bf16_matmul_supported() if device.type == "cpu" else None,
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "matmul_peak_tflops": peaks,
        },
        "results": [asdict(r) for r in results],
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} ({os.cpu_count()} logical CPUs, torch CPU capability {torch.backends.cpu.get_cpu_capability()})"


def format_table(report: dict) -> str:
    meta = report["meta"]
    lines = [
        f"model {meta['model']} {meta['image_size'][0]}x{meta['image_size'][1]}, batch {meta['batch_size']}, "
        f"median of {meta['steps']} steps after {meta['warmup']} warm-up ({meta['timer']} time), "
        f"{meta['threads']} threads, {meta['device']}",
        "matmul peak (TFLOP/s): "
        + ", ".join(f"{k} {v:.3f}" for k, v in meta["matmul_peak_tflops"].items())
        + (
            ""
            if meta.get("native_cpu_bf16_matmul") is None
            else f"; native CPU bf16 matmul: {'yes' if meta['native_cpu_bf16_matmul'] else 'no'}"
        ),
        "",
        "| impl | dtype | compiled | img/s | step ms | vs hf_sdpa | vs hf_eager | GFLOP/step | TFLOP/s | % matmul peak "
        "| peak mem MiB | kernels/step | copy ops (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def ratio(value):
        return f"{value:.2f}x" if value is not None else "-"

    for r in report["results"]:
        lines.append(
            f"| {r['impl']} | {r['dtype']} | {'yes' if r['compiled'] else 'no'} | {r['images_per_s']:.2f} | "
            f"{r['step_s'] * 1e3:.0f} | {ratio(r['ratio_vs_hf_sdpa'])} | {ratio(r['ratio_vs_hf_eager'])} | "
            f"{r['gflop_per_step']:.1f} | {r['achieved_tflops']:.3f} | {100 * r['fraction_of_matmul_peak']:.0f}% | "
            f"{r['peak_memory_mib']:.0f} | {r['extra'].get('kernels', '-')} | "
            f"{r['extra'].get('copy_ops', '-')} ({r['extra'].get('copy_mib', '-')}) |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="swin_tiny")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per implementation (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    parser.add_argument(
        "--dtype",
        choices=["fp32", "bf16", "both"],
        default="both",
        help="fp32, or bf16 autocast (weights and optimizer stay fp32)",
    )
    parser.add_argument("--impls", default="ours,hf_sdpa,hf_eager", help=f"comma-separated subset of {IMPLS}")
    parser.add_argument("--torch_compile", action="store_true", help="torch.compile every model")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the full report (incl. every step time) here")
    parser.add_argument(
        "--timer",
        choices=["wall", "cpu"],
        default="wall",
        help="wall clock (default), or process CPU time: robust on a shared CPU when --threads 1 (with more threads "
        "it counts OpenMP spin-waits); use wall on GPUs",
    )
    parser.add_argument("--verbose", action="store_true", help="print every step's times to stderr")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile one more step per implementation: share of time in matmul kernels, top ops",
    )
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        report = run(args)
    finally:  # --threads must not outlive the call (tests run it in-process)
        torch.set_num_threads(threads)
    print(format_table(report))
    if args.profile:
        print()
        print(format_profiles(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
