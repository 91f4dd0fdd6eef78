"""SimMIM models on top of transformers' own Swin, SwinV2, ViT and BEiT encoders.

The whole method: mask token in the encoder input, last feature map -> 1x1 conv -> PixelShuffle, L1 loss on the
masked pixels only. State dicts are transformers-native (`swin.*`, `beit.*`, ... and `decoder.0.*`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .backbones import get_adapter
from .configuration_simmim import SimMIMConfig


def simmim_loss(
    pixel_values: torch.Tensor,
    reconstruction: torch.Tensor,
    bool_masked_pos: torch.Tensor,
    patch_size: int,
) -> torch.Tensor:
    """The official SimMIM loss: mean L1 error over masked pixels (all channels).

    `bool_masked_pos` is the model-patch grid (B, H/p, W/p); it is upsampled to pixels here.
    `sum(|x - x_rec| * mask_px) / (sum(mask_px) + 1e-5) / C`, computed in float32 (also under autocast).
    """
    mask = bool_masked_pos.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2).unsqueeze(1)
    mask = mask.to(torch.float32)
    error = (pixel_values.float() - reconstruction.float()).abs()
    return (error * mask).sum() / (mask.sum() + 1e-5) / pixel_values.shape[1]


def _mask_grid(bool_masked_pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Accept (B, num_patches) or (B, H/p, W/p), bool or int; return a bool (B, H/p, W/p)."""
    height, width = grid
    if bool_masked_pos.dim() == 2 and bool_masked_pos.shape[1] == height * width:
        bool_masked_pos = bool_masked_pos.view(-1, height, width)
    if bool_masked_pos.dim() != 3 or tuple(bool_masked_pos.shape[1:]) != grid:
        raise ValueError(
            f"bool_masked_pos has shape {tuple(bool_masked_pos.shape)}; for these images it must be "
            f"(batch, {height * width}) or (batch, {height}, {width}) on the model-patch grid."
        )
    return bool_masked_pos.bool()


@dataclass
class SimMIMMaskedImageModelingOutput(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*): SimMIM L1 loss on masked pixels, when a mask is given.
        reconstruction (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`): predicted pixels.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): the encoder's hidden states, when asked for.
    """

    loss: torch.FloatTensor | None = None
    reconstruction: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class SimMIMPreTrainedModel(PreTrainedModel):
    """Weight initialization and loading conventions shared by the SimMIM models."""

    config_class = SimMIMConfig
    config: SimMIMConfig
    base_model_prefix = "simmim"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    # Buffers that current transformers recomputes instead of loading (older checkpoints carry them).
    _keys_to_ignore_on_load_unexpected = [r".*relative_position_index.*", r".*attn_mask.*"]

    @property
    def backbone_adapter(self):
        return get_adapter(self.config)

    @property
    def backbone(self) -> PreTrainedModel:
        """The transformers encoder (`self.swin`, `self.beit`, ...)."""
        return getattr(self, self.backbone_adapter.base_model_prefix)

    def _init_weights(self, module: nn.Module) -> None:
        # The encoder's own modules are initialized by its own transformers class (composite-model dispatch);
        # this runs for our own modules (decoder, classifier).
        if isinstance(module, nn.Conv2d):
            # The official decoder keeps PyTorch's default Conv2d initialization.
            init.kaiming_uniform_(module.weight, a=5**0.5)
            if module.bias is not None:
                fan_in = module.weight.shape[1] * module.weight.shape[2] * module.weight.shape[3]
                bound = 1 / fan_in**0.5
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """transformers' initialization, then the official one where it differs (mask token, bias tables, ...).
        Weights loaded from a checkpoint are flagged by transformers and left untouched."""
        super().initialize_weights()
        self.backbone_adapter.official_init(self.backbone)


class SimMIMForMaskedImageModeling(SimMIMPreTrainedModel):
    """SimMIM pretraining model: a transformers encoder with a learnable mask token, and a one-layer decoder
    (1x1 conv to `encoder_stride**2 * num_channels` channels + `PixelShuffle(encoder_stride)`).

    Works for any image size that the geometry allows (non-square, or different from `config.image_size`).
    """

    def __init__(self, config: SimMIMConfig) -> None:
        super().__init__(config)
        adapter = get_adapter(config)
        setattr(self, adapter.base_model_prefix,
                adapter.build(config.backbone_config, use_mask_token=True, add_pooling_layer=False))
        stride = config.encoder_stride
        self.decoder = nn.Sequential(
            nn.Conv2d(config.hidden_size, stride**2 * config.num_channels, kernel_size=1),
            nn.PixelShuffle(stride),
        )
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SimMIMMaskedImageModelingOutput | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Normalized images; height and width multiples of `mask_patch_size` and of the encoder stride.
        bool_masked_pos (`torch.BoolTensor` or int tensor of shape `(batch_size, num_patches)` or
            `(batch_size, height / patch_size, width / patch_size)`, *optional*): 1 = masked model patch.
            Without it nothing is masked and no loss is returned.
        """
        height, width = pixel_values.shape[-2:]
        self.config.validate_geometry((height, width))
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states = bool(output_hidden_states)

        mask = None
        if bool_masked_pos is not None:
            mask = _mask_grid(bool_masked_pos, self.config.mask_grid_size((height, width)))
        features, hidden_states = self.backbone_adapter.feature_map(
            self.backbone,
            pixel_values,
            bool_masked_pos=mask.flatten(1) if mask is not None else None,
            output_hidden_states=output_hidden_states,
        )
        reconstruction = self.decoder(features)

        loss = None
        if mask is not None:
            loss = simmim_loss(pixel_values, reconstruction, mask, self.config.model_patch_size)

        if not return_dict:
            output = (reconstruction,) + ((hidden_states,) if output_hidden_states else ())
            return ((loss,) + output) if loss is not None else output
        return SimMIMMaskedImageModelingOutput(loss=loss, reconstruction=reconstruction, hidden_states=hidden_states)


__all__ = [
    "SimMIMPreTrainedModel",
    "SimMIMForMaskedImageModeling",
    "SimMIMMaskedImageModelingOutput",
    "simmim_loss",
]
