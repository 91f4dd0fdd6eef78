"""bf16 on CPUs without native bf16 matrix multiplication: bf16 numerics at float32 GEMM speed.

PyTorch runs CPU bf16 matmuls and convolutions fast only where oneDNN has hardware bf16 (AVX512-BF16 or AMX).
Everywhere else (AVX2 CPUs: AMD Zen 2/3, most Intel client and older server CPUs) it falls back to a generic
kernel that `benchmarks/cpu_bf16_matmul.py` measures 30x to several hundred times slower than float32, so `--bf16` /
`torch.autocast("cpu", torch.bfloat16)` turns a 1.7 s Swin-T training step into ~40 s.

`CPUBf16MatmulFallback` is a `TorchFunctionMode` that the training loop enters around each step when such a step is
about to run (`fallback_context`; `SimMIMTrainer.compute_loss_context_manager` does it, the model files never do,
so a saved model runs with torch and transformers alone). It reroutes every matrix product and convolution whose
operands are bf16 (explicitly, or by autocast) through the float32 kernel, on operands first rounded to bf16, and
rounds the result to bf16. That is the numeric contract of a bf16 GEMM everywhere (bf16 inputs, float32 accumulation,
bf16 output; cuBLAS and oneDNN alike), so the result matches the native kernel up to the order of the float32
accumulation. The backward keeps the contract too: gradients are float32 products of bf16 values, rounded to bf16
where the native backward returns bf16. The inputs saved for the backward are stored as bf16 (they are exactly
representable), so activation memory stays that of bf16 training.

Rerouted: the whole matmul family (`matmul`/`@`, `mm`, `bmm`, `addmm`, `baddbmm`, `addbmm`, `addmv`, `mv`, `dot`,
`inner`, `einsum`, `tensordot`, `linalg.matmul`, `linalg.multi_dot`, their Tensor methods), `F.linear`, `F.bilinear`,
`F.conv1d/2d/3d`, `F.conv_transpose1d/2d/3d` and `scaled_dot_product_attention`. Everything else (LayerNorm, softmax,
GELU, the loss...) runs exactly as autocast decides. Nothing changes on CPUs with native bf16, on GPUs, in float32,
under `torch.compile`, or when gradient checkpointing is on (its recomputation runs outside the step's context; see
`fallback_context`).

    from modeling_simmim.cpu_bf16 import cpu_bf16_matmul, set_cpu_bf16_matmul
    set_cpu_bf16_matmul("native")   # "auto" (default), "fallback" (always, e.g. to test it), "native" (never)
    with cpu_bf16_matmul("native"): ...   # the same for one block

The environment variable `SIMMIM_CPU_BF16_MATMUL` sets the initial value.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

__all__ = [
    "CPUBf16MatmulFallback",
    "cpu_bf16_matmul",
    "describe_cpu_bf16_path",
    "fallback_context",
    "native_cpu_bf16_matmul_supported",
    "set_cpu_bf16_matmul",
]

_MODES = ("auto", "fallback", "native")
_MODE = os.environ.get("SIMMIM_CPU_BF16_MATMUL", "auto")
if _MODE not in _MODES:
    raise ValueError(f"SIMMIM_CPU_BF16_MATMUL must be one of {_MODES}, got {_MODE!r}")


def set_cpu_bf16_matmul(mode: str) -> str:
    """ "auto": use the fallback on CPUs without native bf16 matmul; "fallback": always on CPU; "native": never.
    Returns the previous value."""
    global _MODE
    if mode not in _MODES:
        raise ValueError(f"cpu bf16 matmul mode must be one of {_MODES}, got {mode!r}")
    previous, _MODE = _MODE, mode
    return previous


@contextlib.contextmanager
def cpu_bf16_matmul(mode: str):
    """`set_cpu_bf16_matmul(mode)` for the duration of a `with` block, then the previous mode again."""
    previous = set_cpu_bf16_matmul(mode)
    try:
        yield
    finally:
        set_cpu_bf16_matmul(previous)


@functools.lru_cache(maxsize=1)
def native_cpu_bf16_matmul_supported() -> bool:
    """True where oneDNN runs bf16 matmuls in hardware (AVX512-BF16 / AMX): PyTorch's own test of the CPU."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN: no fast bf16 kernel either
        return False


# The functions whose bf16 kernels are the slow ones: the matmul family and the convolutions (nn.Linear -> F.linear,
# nn.Conv2d -> F.conv2d, attention -> matmul / bmm / baddbmm / SDPA, ...). In-place variants are left alone: their
# result must stay in the operand's storage.
_REROUTED = frozenset(
    {
        F.linear,
        F.bilinear,
        F.conv1d,
        F.conv2d,
        F.conv3d,
        F.conv_transpose1d,
        F.conv_transpose2d,
        F.conv_transpose3d,
        F.scaled_dot_product_attention,
        torch.matmul,
        torch.mm,
        torch.bmm,
        torch.addmm,
        torch.baddbmm,
        torch.addbmm,
        torch.addmv,
        torch.mv,
        torch.dot,
        torch.inner,
        torch.einsum,
        torch.tensordot,
        torch.linalg.matmul,
        torch.linalg.multi_dot,
        torch.Tensor.matmul,
        torch.Tensor.__matmul__,
        torch.Tensor.__rmatmul__,
        torch.Tensor.mm,
        torch.Tensor.bmm,
        torch.Tensor.addmm,
        torch.Tensor.baddbmm,
        torch.Tensor.addbmm,
        torch.Tensor.addmv,
        torch.Tensor.mv,
        torch.Tensor.dot,
        torch.Tensor.inner,
    }
)


# Products that CPU autocast leaves in float32 (it casts only the ops on its lower-precision list; einsum, tensordot,
# multi_dot and N-d inner reach a listed op inside): under autocast they are rerouted only for all-bf16 operands, so
# that the fallback never computes in bf16 what PyTorch computes in float32.
_KEPT_FLOAT32_BY_AUTOCAST = frozenset(
    {
        F.bilinear,
        torch.addmv,
        torch.mv,
        torch.dot,
        torch.Tensor.addmv,
        torch.Tensor.mv,
        torch.Tensor.dot,
    }
)


def _computes_in_bf16(func, floating: list[torch.Tensor]) -> bool:
    """Whether PyTorch's own call would compute in bf16 (the slow kernel): all-bf16 operands, or a bf16 autocast
    that casts this op (autocast leaves float64 alone)."""
    if all(t.dtype == torch.bfloat16 for t in floating):
        return True
    if not _autocast_bf16() or any(t.dtype == torch.float64 for t in floating):
        return False
    if func in _KEPT_FLOAT32_BY_AUTOCAST:
        return False
    if func in (torch.inner, torch.Tensor.inner):
        return all(t.dim() > 1 for t in floating)
    return True


def describe_cpu_bf16_path() -> str:
    """One sentence for the logs of a bf16 run on the CPU: which kernels its matrix products will use."""
    if _MODE == "native" or (_MODE == "auto" and native_cpu_bf16_matmul_supported()):
        reason = "native bf16 on this CPU" if native_cpu_bf16_matmul_supported() else "SIMMIM_CPU_BF16_MATMUL=native"
        return f"bf16 on the CPU: PyTorch's bf16 matmul kernels ({reason})."
    return (
        "bf16 on the CPU: matrix products run as float32 kernels on bf16-rounded operands with bf16 results "
        "(modeling_simmim.cpu_bf16; this CPU has no native bf16 matmul, where PyTorch's bf16 kernel is over 20x "
        "slower than float32), except in training with gradient checkpointing."
    )


def _autocast_bf16() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


class CPUBf16MatmulFallback(TorchFunctionMode):
    """While active, bf16 matrix products / convolutions on the CPU run as float32 kernels on bf16-rounded operands,
    with a bf16 result (see the module docstring). Other calls pass through untouched."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _REROUTED:
            # einsum and multi_dot take their operands as a list
            tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
            floating = [t for t in tensors if t.is_floating_point()]
            on_cpu = floating and all(t.device.type == "cpu" for t in tensors)
            if on_cpu and _computes_in_bf16(func, floating):
                return _float32_kernel_on_bf16_operands(func, args, kwargs)
        return func(*args, **kwargs)


def _float32_kernel_on_bf16_operands(func, args, kwargs):
    # Round every floating operand to bf16 (what autocast or bf16 weights give the native kernel), compute in float32.
    exact_storages: set[int] = set()

    def as_rounded_float32(value):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            rounded = value.to(torch.bfloat16).float()
            exact_storages.add(rounded.untyped_storage().data_ptr())
            return rounded
        return value

    def pack(tensor: torch.Tensor):
        # Saved operands hold bf16 values only: keep them as bf16 (lossless, half the memory). Anything else the
        # float32 kernel saves (e.g. SDPA's output and log-sum-exp) stays float32.
        if tensor.dtype == torch.float32 and tensor.untyped_storage().data_ptr() in exact_storages:
            return True, tensor.to(torch.bfloat16)
        return False, tensor

    def unpack(packed):
        was_rounded, tensor = packed
        return tensor.float() if was_rounded else tensor

    rounded_args, rounded_kwargs = tree_map(as_rounded_float32, (tuple(args), dict(kwargs)))
    with torch.autocast("cpu", enabled=False), torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        result = func(*rounded_args, **rounded_kwargs)
    return result.to(torch.bfloat16)


def _bf16_requested(model: nn.Module, reference: torch.Tensor | None, bf16: bool) -> bool:
    if bf16 or _autocast_bf16():
        return True
    parameter = next(model.parameters(), None)
    return (reference is not None and reference.dtype == torch.bfloat16) or (
        parameter is not None and parameter.dtype == torch.bfloat16
    )


def _checkpointing(model: nn.Module) -> bool:
    # transformers >= 5.2x calls it `is_activation_checkpointing` (the old name warns); 5.9 only has the old one.
    name = (
        "is_activation_checkpointing"
        if hasattr(type(model), "is_activation_checkpointing")
        else ("is_gradient_checkpointing")
    )
    return bool(getattr(model, name, False))


def fallback_context(
    model: nn.Module, reference: torch.Tensor | None = None, bf16: bool = False
) -> contextlib.AbstractContextManager:
    """The context a training or evaluation step of `model` runs in: `CPUBf16MatmulFallback` when the step runs on
    the CPU (`reference`, e.g. the input images, or else the model's parameters), computes in bf16 (`bf16=True`, as
    the Trainer's `--bf16`; an active bf16 autocast; bf16 inputs or weights), and the CPU lacks native bf16 matmul
    (mode "auto") or the mode is "fallback"; otherwise a no-op. Also a no-op under `torch.compile` (the compiler picks
    its own kernels) and when the model trains with gradient checkpointing (the recomputation would run without the
    mode and differ from the forward)."""
    if reference is None:
        reference = next(model.parameters(), None)
    on_cpu = reference is None or reference.device.type == "cpu"
    if _MODE == "native" or not on_cpu or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    if _MODE == "auto" and native_cpu_bf16_matmul_supported():
        return contextlib.nullcontext()
    if not _bf16_requested(model, reference, bf16):
        return contextlib.nullcontext()
    if model.training and _checkpointing(model):
        return contextlib.nullcontext()
    return CPUBf16MatmulFallback()
