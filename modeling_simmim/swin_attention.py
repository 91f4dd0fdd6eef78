"""Faster shifted-window attention for transformers' Swin, installed in place.

`enable_fast_window_attention(backbone)` swaps the class of every `SwinLayer` inside a `transformers.SwinModel`
(or any module containing one, e.g. `SwinForMaskedImageModeling`) for `FastSwinLayer`, a subclass whose forward
computes the same function with fewer and cheaper operations. Parameters, buffers and module names are untouched,
so the state dict stays exactly transformers-native and checkpoints remain interchangeable with transformers'
classes. `disable_fast_window_attention` restores the original classes.

What the fast forward does differently (the maths is the same):

- Cyclic shift + window partition (and their inverses) are ONE token gather each, with a permutation index that is
  built once per geometry and cached. Its backward is the gather with the inverse permutation (no scatter-add).
- q, k and v come from one matmul: their weights are concatenated at run time (cheap: C x 3C), the attention scale
  is folded into the q rows, while the three `nn.Linear` parameters stay separate.
- The relative position bias (gathered from the table on every call, so it still backprops into the table) and the
  shift mask (cached per geometry) are folded into one additive mask of shape (windows, heads, N, N) that broadcasts
  over the batch; it is added in place to the attention scores.
- The attention itself runs either through explicit matmul + softmax (fastest on CPU, where SDPA falls back to its
  math path anyway because the mask needs a gradient), or through `torch.nn.functional.scaled_dot_product_attention`
  (CUDA: the memory-efficient kernel supports a mask with gradient). See `set_attention_backend`.

Semantics preserved: padding of feature maps that are not a multiple of the window (zero padding after the
LayerNorm, padded tokens attend and are attended to, exactly like transformers), non-square inputs, inputs of a size
other than `config.image_size`, attention/hidden dropout and drop path (same RNG consumption order for the hidden
dropout), gradient checkpointing (the class keeps `GradientCheckpointingLayer`'s wrapper), eval and train mode,
`always_partition`, and `torch.compile(fullgraph=True)`.

One deliberate difference: when a feature map is smaller than the window, transformers shrinks the window to
`min(H, W)` but keeps the full-size bias, which raises a shape error (and it mutates the layer's window for every later
call). The fast path shrinks the window the same way without mutating the layer, and uses the centre of the bias
table, i.e. the biases of exactly the relative offsets that occur in the smaller window.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.swin.modeling_swin import SwinLayer

__all__ = [
    "FastSwinLayer",
    "disable_fast_window_attention",
    "enable_fast_window_attention",
    "fast_window_attention_enabled",
    "set_attention_backend",
]

# "auto": explicit matmul/softmax on CPU, SDPA elsewhere. "math" / "sdpa" force one of them (tests, benchmarks).
_ATTENTION_BACKEND = "auto"
_BACKENDS = ("auto", "math", "sdpa")


def set_attention_backend(backend: str) -> str:
    """Select how the fast layers compute attention: "auto" (default), "math" or "sdpa". Returns the previous value."""
    global _ATTENTION_BACKEND
    if backend not in _BACKENDS:
        raise ValueError(f"attention backend must be one of {_BACKENDS}, got {backend!r}")
    previous, _ATTENTION_BACKEND = _ATTENTION_BACKEND, backend
    return previous


# --------------------------------------------------------------------------------------------------------------------
# Geometry: permutation indices and shift masks, built once per (padded size, window, shift, device).
# --------------------------------------------------------------------------------------------------------------------


def _build_window_permutation(height: int, width: int, window: int, shift: int, device) -> torch.Tensor:
    """Index `perm` such that `x_flat[:, perm]` equals transformers' window_partition(roll(x, -shift)) flattened.

    Windows are ordered row-major over the window grid, tokens row-major inside each window, like transformers.
    """
    grid = torch.arange(height * width, device=device).view(height, width)
    if shift > 0:
        grid = torch.roll(grid, shifts=(-shift, -shift), dims=(0, 1))
    grid = grid.view(height // window, window, width // window, window).transpose(1, 2)
    return grid.reshape(-1)


def _build_shift_mask(height: int, width: int, window: int, shift: int, device) -> torch.Tensor:
    """transformers' SW-MSA mask: 0 within a region, -100 across regions; shape (num_windows, N, N), float32."""
    h_idx = torch.arange(height, device=device)
    w_idx = torch.arange(width, device=device)
    h_region = (h_idx >= height - window).long() + (h_idx >= height - shift).long()
    w_region = (w_idx >= width - window).long() + (w_idx >= width - shift).long()
    region = (h_region[:, None] * 3 + w_region[None, :]).view(height // window, window, width // window, window)
    region = region.transpose(1, 2).reshape(-1, window * window)
    different = region.unsqueeze(1) != region.unsqueeze(2)
    return torch.zeros(different.shape, device=device).masked_fill(different, -100.0)


def _build_relative_index(window: int, table_window: int, device) -> torch.Tensor:
    """Flat (N*N,) index into a (2T-1)^2 bias table for a window of size `window` <= T (the centre of the table)."""
    coords = torch.stack(
        torch.meshgrid(torch.arange(window, device=device), torch.arange(window, device=device), indexing="ij")
    ).flatten(1)
    relative = coords[:, :, None] - coords[:, None, :] + (table_window - 1)  # 2, N, N; offsets shifted to >= 0
    return (relative[0] * (2 * table_window - 1) + relative[1]).reshape(-1)


@lru_cache(maxsize=64)
def _cached_geometry(height, width, window, shift, table_window, device):
    perm = _build_window_permutation(height, width, window, shift, device)
    inverse = torch.argsort(perm)
    shift_mask = _build_shift_mask(height, width, window, shift, device) if shift > 0 else None
    index = _build_relative_index(window, table_window, device)
    return perm, inverse, shift_mask, index


def _geometry(height: int, width: int, window: int, shift: int, table_window: int, device: torch.device):
    if torch.compiler.is_compiling():
        # Built inside the graph (constant inputs, folded by the compiler); lru_cache is not traceable.
        perm = _build_window_permutation(height, width, window, shift, device)
        inverse = torch.argsort(perm)
        shift_mask = _build_shift_mask(height, width, window, shift, device) if shift > 0 else None
        return perm, inverse, shift_mask, _build_relative_index(window, table_window, device)
    return _cached_geometry(height, width, window, shift, table_window, device)


class _PermuteTokens(torch.autograd.Function):
    """x[:, perm] for a permutation; the backward is a gather with the inverse permutation (no scatter-add)."""

    @staticmethod
    def forward(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, perm)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(1, inverse), None, None


def _permute_tokens(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        # The compiler derives an equivalent gather backward itself and fuses it with neighbouring ops.
        return x.index_select(1, perm)
    return _PermuteTokens.apply(x, perm, inverse)


# --------------------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------------------


def _use_sdpa(device: torch.device) -> bool:
    if _ATTENTION_BACKEND == "auto":
        return device.type != "cpu"
    return _ATTENTION_BACKEND == "sdpa"


def _window_attention(
    attention: nn.Module,
    windows: torch.Tensor,
    num_windows: int,
    window_area: int,
    shift_mask: torch.Tensor | None,
    bias_index: torch.Tensor,
) -> torch.Tensor:
    """Multi-head attention inside windows. `windows`: (B, num_windows * N, C) in window order -> same shape."""
    batch_size, _, channels = windows.shape
    num_heads = attention.num_attention_heads
    head_dim = attention.head_dim
    scaling = attention.scaling

    q_proj, k_proj, v_proj = attention.q_proj, attention.k_proj, attention.v_proj
    weight = torch.cat([q_proj.weight * scaling, k_proj.weight, v_proj.weight])
    bias = None
    if q_proj.bias is not None:
        bias = torch.cat([q_proj.bias * scaling, k_proj.bias, v_proj.bias])
    qkv = F.linear(windows, weight, bias)
    # (B*nW, N, 3, heads, d) -> (3, B*nW, heads, N, d): one layout copy for q, k and v together.
    qkv = qkv.view(batch_size * num_windows, window_area, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
    qkv = qkv.contiguous()
    query, key, value = qkv.unbind(0)

    table = attention.relative_position_bias.relative_position_bias_table
    position_bias = table[bias_index].view(window_area, window_area, num_heads).permute(2, 0, 1)  # heads, N, N
    if shift_mask is not None:
        additive = position_bias.unsqueeze(0) + shift_mask.unsqueeze(1)  # nW, heads, N, N
    else:
        additive = position_bias.unsqueeze(0)  # 1, heads, N, N
    dropout_p = attention.attention_dropout if attention.training else 0.0

    if _use_sdpa(windows.device):
        # q, k, v are contiguous (B*nW, heads, N, d): viewing them as (B, nW*heads, N, d) lets the mask broadcast
        # over the batch only, without materialising it per image.
        shape = (batch_size, -1, window_area, head_dim)
        mask = additive.to(query.dtype).expand(num_windows, -1, -1, -1).reshape(1, -1, window_area, window_area)
        out = F.scaled_dot_product_attention(
            query.view(shape), key.view(shape), value.view(shape), attn_mask=mask, dropout_p=dropout_p, scale=1.0
        )
        out = out.view(batch_size * num_windows, num_heads, window_area, head_dim)
    else:
        scores = torch.matmul(query, key.transpose(-1, -2))  # B*nW, heads, N, N (q already scaled)
        scores = scores.view(batch_size, -1, num_heads, window_area, window_area)
        # In place: matmul's backward needs q and k only; the mask's dtype follows the scores under autocast.
        scores = scores.add_(additive.to(scores.dtype))
        probs = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            probs = F.dropout(probs, p=dropout_p, training=True)
        out = torch.matmul(probs.view(batch_size * num_windows, num_heads, window_area, window_area), value)

    out = out.transpose(1, 2).reshape(batch_size, num_windows * window_area, channels)
    return attention.o_proj(out)


# --------------------------------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------------------------------


class FastSwinLayer(SwinLayer):
    """`SwinLayer` with the fast forward. Never constructed directly: `enable_fast_window_attention` swaps the class
    of existing layers, so no parameter is created, renamed or copied.

    Extra attributes set by the swap (plain Python attributes, not in the state dict): `_fast_window` (the configured
    window, i.e. the size the bias table was built for) and `_fast_shift` (the configured shift of this block).
    """

    _fast_window: int
    _fast_shift: int

    def _window_and_shift(self, height: int, width: int, always_partition: bool) -> tuple[int, int]:
        window, shift = self._fast_window, self._fast_shift
        if not always_partition and min(height, width) <= window:
            # transformers' rule (set_shift_and_window_size), without mutating the module.
            return min(height, width), 0
        return window, shift

    def forward(
        self,
        hidden_states: torch.Tensor,
        input_dimensions: tuple[int, int],
        always_partition: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        height, width = input_dimensions
        batch_size, _, channels = hidden_states.shape
        window, shift = self._window_and_shift(height, width, always_partition)

        shortcut = hidden_states
        hidden_states = self.layernorm_before(hidden_states)

        pad_bottom = (window - height % window) % window
        pad_right = (window - width % window) % window
        if pad_bottom or pad_right:
            hidden_states = hidden_states.view(batch_size, height, width, channels)
            hidden_states = F.pad(hidden_states, (0, 0, 0, pad_right, 0, pad_bottom))
            hidden_states = hidden_states.view(batch_size, -1, channels)
        height_pad, width_pad = height + pad_bottom, width + pad_right

        perm, inverse, shift_mask, bias_index = _geometry(
            height_pad, width_pad, window, shift, self._fast_window, hidden_states.device
        )
        windows = _permute_tokens(hidden_states, perm, inverse)
        num_windows = (height_pad // window) * (width_pad // window)
        attention_output = _window_attention(
            self.attention, windows, num_windows, window * window, shift_mask, bias_index
        )
        # Same element order as transformers' (windows, N, C) tensor, so dropout draws the same mask.
        attention_output = self.dropout(attention_output)
        attention_output = _permute_tokens(attention_output, inverse, perm)

        if pad_bottom or pad_right:
            attention_output = attention_output.view(batch_size, height_pad, width_pad, channels)
            attention_output = attention_output[:, :height, :width, :].reshape(batch_size, height * width, channels)

        hidden_states = shortcut + self.drop_path(attention_output)
        residual = hidden_states
        hidden_states = self.mlp(self.layernorm_after(hidden_states))
        hidden_states = self.dropout(hidden_states) + residual
        # transformers returns the attention weights here; SDPA never materialises them, neither do we.
        return hidden_states, None


# --------------------------------------------------------------------------------------------------------------------
# Installation
# --------------------------------------------------------------------------------------------------------------------


def _swin_stages(module: nn.Module):
    from transformers.models.swin.modeling_swin import SwinStage

    return [m for m in module.modules() if isinstance(m, SwinStage)]


def enable_fast_window_attention(backbone: nn.Module) -> nn.Module:
    """Install the fast window attention into every transformers `SwinLayer` inside `backbone`, in place.

    `backbone` may be a `SwinModel`, a `SwinForMaskedImageModeling`, our `SimMIMForMaskedImageModeling` or any module
    containing Swin stages. Idempotent. Returns `backbone`. The state dict is unchanged (same keys, shapes, values).
    Raises `ValueError` when the module contains no Swin layer (e.g. a Swinv2 or ViT backbone).
    """
    stages = _swin_stages(backbone)
    if not stages:
        raise ValueError(
            f"enable_fast_window_attention found no transformers SwinStage in {type(backbone).__name__}; it supports "
            "transformers' Swin (model_type 'swin') only. Use the default attention for other backbones."
        )
    for stage in stages:
        window = stage.config.window_size
        for index, layer in enumerate(stage.blocks):
            if isinstance(layer, FastSwinLayer):
                continue
            if type(layer) is not SwinLayer:
                raise ValueError(f"expected a transformers SwinLayer, got {type(layer).__name__}; not patching it")
            table_window = layer.attention.relative_position_bias.window_size[0]
            layer._fast_window = table_window
            # SwinStage's construction rule; read from the config because transformers mutates layer.shift_size.
            layer._fast_shift = 0 if index % 2 == 0 else window // 2
            layer._fast_original_class = type(layer)
            layer.__class__ = FastSwinLayer
    return backbone


def disable_fast_window_attention(backbone: nn.Module) -> nn.Module:
    """Undo `enable_fast_window_attention` (restores transformers' `SwinLayer` class). Idempotent."""
    for module in backbone.modules():
        if isinstance(module, FastSwinLayer):
            module.__class__ = module._fast_original_class
            # transformers' forward mutates these from the input size; start from the configured values again.
            module.window_size, module.shift_size = module._fast_window, module._fast_shift
    return backbone


def fast_window_attention_enabled(backbone: nn.Module) -> bool:
    """True when every Swin layer inside `backbone` uses the fast forward."""
    layers = [m for m in backbone.modules() if isinstance(m, SwinLayer)]
    return bool(layers) and all(isinstance(m, FastSwinLayer) for m in layers)
