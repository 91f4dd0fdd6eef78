"""Window attention for transformers' Swin through its attention interface.

Importing this module registers `window_attention_forward` with transformers' `AttentionInterface` under the name
"simmim_window" (`modeling_simmim.backbones.FAST_WINDOW_ATTENTION`). Any transformers Swin model selects it like any
other implementation:

    import modeling_simmim  # registers "simmim_window"
    model = SwinForMaskedImageModeling.from_pretrained(path, attn_implementation="simmim_window")

and `SimMIMConfig(fast_window_attention=True)` selects it for our Swin models. Off by default: on the CPUs measured so
far it runs at 0.95-1.03x transformers' eager attention (README "Performance"), and no GPU measurement exists yet.

What it does differently from transformers' eager function, with the same numerics: the scaled scores and the
additive bias (relative position bias + shift mask, as transformers' `SwinAttention` combines them) come from ONE
`baddbmm` (scale and add fused into the matmul), and the softmax runs in place. Under reduced precision (autocast)
it adds the float32 bias and normalises in float32 like the eager path. It always returns the attention
probabilities, so `output_attentions=True` works and is never silently dropped.

What the interface cannot express, and this function therefore does not do (the earlier layer-level version did,
without a measured gain): the cyclic shift and window partition as one gather, one fused q/k/v matmul, and a bias
that broadcasts over the batch instead of the (batch * windows, heads, N, N) mask that `SwinAttention` builds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface

from .backbones import FAST_WINDOW_ATTENTION

__all__ = ["FAST_WINDOW_ATTENTION", "window_attention_forward"]

# Where the fused path keeps eager's numerics: eager normalises in float32, so bf16/fp16 take the other branch.
_FUSED_DTYPES = (torch.float32, torch.float64)


def window_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of (batch * windows, heads, N, head_dim) q/k/v with an additive mask broadcastable to
    (batch * windows, heads, N, N). Returns the output (batch * windows, N, heads, head_dim) and the probabilities."""
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    batch_windows, heads, tokens, head_dim = query.shape
    flat_query = query.reshape(batch_windows * heads, tokens, head_dim)
    flat_key_t = key.reshape(batch_windows * heads, tokens, head_dim).transpose(1, 2)
    if attention_mask is not None and attention_mask.dtype == query.dtype and query.dtype in _FUSED_DTYPES:
        bias = attention_mask.expand(batch_windows, heads, tokens, tokens).reshape(
            batch_windows * heads, tokens, tokens
        )
        scores = torch.baddbmm(bias, flat_query, flat_key_t, alpha=scaling)
        probs = torch.softmax(scores, dim=-1)
    else:
        # Reduced precision (autocast, bf16 weights): add the bias and normalise in float32, as eager does.
        scores = torch.bmm(flat_query, flat_key_t).mul_(scaling)
        if attention_mask is not None:
            scores = scores.view(batch_windows, heads, tokens, tokens) + attention_mask
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = probs.view(batch_windows, heads, tokens, tokens)
    if dropout > 0.0:
        probs = F.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value)
    return output.transpose(1, 2).contiguous(), probs


AttentionInterface.register(FAST_WINDOW_ATTENTION, window_attention_forward)
