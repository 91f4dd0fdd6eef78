"""Where one training step's time goes: matrix products, fused attention, and everything else.

On a CPU the profiler's self time of aten ops is split by op name. On a GPU the aten ops only launch kernels, so the
device time of the kernels is split by kernel name (cuBLAS / CUTLASS / Triton-template GEMMs and cuDNN convolutions
vs flash / memory-efficient / cuDNN attention kernels); the top kernels are listed, so that copies and elementwise
kernels that dominate show by name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# CPU: aten ops of matrix products, and every convolution op (conv2d, convolution_backward, _slow_conv2d_forward,
# mkldnn_convolution, ...). The wrappers (linear, matmul, ...) have little self time but are listed so that none
# of it counts as "outside the matmuls".
MATMUL_OPS = frozenset(
    {
        "aten::mm",
        "aten::addmm",
        "aten::bmm",
        "aten::baddbmm",
        "aten::addbmm",
        "aten::linear",
        "aten::matmul",
        "aten::_mkldnn_linear",
    }
)
CONVOLUTION_OP_WORDS = ("convolution", "conv1d", "conv2d", "conv3d", "conv_")
# Fused attention ops and kernels: matrix products and softmax in one, so neither inside nor outside the matmuls.
ATTENTION_OP_PREFIXES = ("aten::_scaled_dot_product", "aten::_flash_attention", "aten::_efficient_attention")
ATTENTION_KERNEL_WORDS = ("flash", "fmha", "attention", "sdpa")
MATMUL_KERNEL_WORDS = ("gemm", "nvjet", "xmma", "cutlass", "triton_tem_", "conv", "fprop", "dgrad", "wgrad")


def classify(name: str, on_device: bool) -> str:
    """ "matmul", "attention" or "other" for a profiler event name (aten op on a CPU, kernel on a GPU)."""
    if not on_device:
        if name in MATMUL_OPS or any(word in name for word in CONVOLUTION_OP_WORDS):
            return "matmul"
        return "attention" if name.startswith(ATTENTION_OP_PREFIXES) else "other"
    lowered = name.lower()
    if any(word in lowered for word in ATTENTION_KERNEL_WORDS):
        return "attention"
    return "matmul" if any(word in lowered for word in MATMUL_KERNEL_WORDS) else "other"


def profile_step(step: Callable[[], object], device: torch.device, top: int = 10) -> dict:
    """Run `step` once under torch.profiler. Returns total, matmul, fused attention and outside-the-matmuls time
    (ms and shares of the total) and the `top` events: aten ops' self CPU time on a CPU, kernels' time on a GPU."""
    from torch.profiler import ProfilerActivity, profile

    on_device = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    with profile(activities=activities) as profiler:
        step()
        if on_device:
            torch.cuda.synchronize(device)
    if on_device:  # kernels only: an aten op's device time is that of the kernels it launched (counted once)
        times = {
            e.key: e.self_device_time_total / 1e3
            for e in profiler.key_averages()
            if e.device_type == torch.autograd.DeviceType.CUDA
        }
    else:
        times = {e.key: e.self_cpu_time_total / 1e3 for e in profiler.key_averages()}
    parts = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    for name, ms in times.items():
        parts[classify(name, on_device)] += ms
    total = sum(parts.values())
    per_total = 1 / total if total else 0.0
    ranked = sorted(times.items(), key=lambda item: item[1], reverse=True)[:top]
    return {
        "total_ms": total,
        "matmul_ms": parts["matmul"],
        "fused_attention_ms": parts["attention"],
        "outside_matmul_ms": parts["other"],
        "matmul_share": parts["matmul"] * per_total,
        "fused_attention_share": parts["attention"] * per_total,
        "outside_matmul_share": parts["other"] * per_total,
        "top_ms": [[name, round(ms, 2)] for name, ms in ranked],
    }
