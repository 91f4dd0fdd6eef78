"""One small adapter per backbone family: the only place that knows a family's parameter names and geometry.

Each adapter builds transformers' own encoder (no re-implemented blocks), turns its output into the final feature map
(B, C, H/s, W/s) that the SimMIM decoder reads, applies the official initialization where transformers' differs, and
maps parameter names to the layer ids of the official layer-wise learning-rate decay rule.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod

import torch
from torch import nn
from transformers import BeitModel, PretrainedConfig, PreTrainedModel, SwinModel, Swinv2Model, ViTModel
from transformers import initialization as init
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_simmim import size_pair

# Name of the window attention function that `modeling_simmim.swin_attention` registers with transformers'
# attention interface; `fast_window_attention=True` selects it for transformers' Swin.
FAST_WINDOW_ATTENTION = "simmim_window"


class BackboneAdapter(ABC):
    """Base class; subclasses set `family`, `base_model_prefix` and `model_class`."""

    family: str = ""
    # Attribute name of the encoder inside our models. It equals transformers' own (`SwinForMaskedImageModeling.swin`,
    # `BeitForImageClassification.beit`, ...), so our state dicts load into transformers' classes and back.
    base_model_prefix: str = ""
    model_class: type[PreTrainedModel]
    # Substrings of parameter names that the official code excludes from weight decay, besides 1-D tensors and
    # biases (excluded everywhere), per stage. The official ViT (plain and BEiT-style) excludes `pos_embed` and
    # `cls_token` in both stages: its relative position bias tables are decayed, and so is its mask token (only the
    # Swin SimMIM encoder adds `mask_token` to its exclusions).
    pretraining_no_weight_decay_keywords: tuple[str, ...] = ("cls_token", "position_embeddings")
    finetuning_no_weight_decay_keywords: tuple[str, ...] = ("cls_token", "position_embeddings")

    def no_weight_decay_keywords(self, stage: str) -> tuple[str, ...]:
        """The official exclusions of `stage` ("pretraining" or "finetuning")."""
        if stage == "pretraining":
            return self.pretraining_no_weight_decay_keywords
        if stage == "finetuning":
            return self.finetuning_no_weight_decay_keywords
        raise ValueError(f"stage must be 'pretraining' or 'finetuning', got {stage!r}.")

    def build(
        self,
        backbone_config: PretrainedConfig,
        use_mask_token: bool,
        add_pooling_layer: bool,
        fast_window_attention: bool = False,
    ) -> PreTrainedModel:
        """The transformers encoder. `fast_window_attention` only matters for Swin (see `SwinAdapter.build`)."""
        return self.model_class(backbone_config, add_pooling_layer=add_pooling_layer, use_mask_token=use_mask_token)

    @abstractmethod
    def feature_map(
        self,
        backbone: nn.Module,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Run the encoder; return the last feature map (B, C, H/s, W/s) and the hidden states if asked.
        `bool_masked_pos` is (B, num_patches) on the model-patch grid."""

    @abstractmethod
    def num_layers(self, backbone_config: PretrainedConfig) -> int:
        """L of the official layer-decay rule: the number of transformer blocks."""

    @abstractmethod
    def layer_id(self, name: str, backbone_config: PretrainedConfig) -> int:
        """Official layer id (0 .. L+1) of a parameter, `name` relative to the encoder module."""

    @abstractmethod
    def official_init(self, backbone: nn.Module) -> None:
        """Re-initialize what transformers initializes differently from the official code. Uses
        `transformers.initialization`, which leaves weights loaded from a checkpoint untouched."""

    @staticmethod
    def _tokens_to_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch_size, _, channels = tokens.shape
        # Without .contiguous() this is a channels-last view; the 1x1 decoder conv then returns a channels-last weight
        # gradient whose strides differ from the weight's, and DDP warns and copies it into its bucket every step.
        return tokens.transpose(1, 2).reshape(batch_size, channels, height, width).contiguous()


class SwinAdapter(BackboneAdapter):
    family = "swin"
    base_model_prefix = "swin"
    model_class: type[PreTrainedModel] = SwinModel
    _block = re.compile(r"^encoder\.layers\.(\d+)\.blocks\.(\d+)\.")
    _downsample = re.compile(r"^encoder\.layers\.(\d+)\.downsample\.")
    # Official Swin: `absolute_pos_embed` in both stages, the SimMIM encoder's `mask_token` in pretraining, the
    # relative position bias tables in finetuning only (pretraining's prefixed keyword never matches them).
    pretraining_no_weight_decay_keywords: tuple[str, ...] = ("mask_token", "position_embeddings")
    finetuning_no_weight_decay_keywords: tuple[str, ...] = ("position_embeddings", "relative_position_bias_table")

    def build(self, backbone_config, use_mask_token, add_pooling_layer, fast_window_attention=False):
        if fast_window_attention:
            if FAST_WINDOW_ATTENTION not in ALL_ATTENTION_FUNCTIONS:
                raise ValueError(
                    f"fast_window_attention=True needs the {FAST_WINDOW_ATTENTION!r} attention function, which "
                    "`import modeling_simmim` registers (pip install simmim-hf); or set fast_window_attention=False."
                )
            backbone_config._attn_implementation = FAST_WINDOW_ATTENTION
        backbone = super().build(backbone_config, use_mask_token, add_pooling_layer)
        self.fit_windows_to_stages(backbone)
        return backbone

    @staticmethod
    def fit_windows_to_stages(backbone: SwinModel) -> None:
        """Official Swin rule: a block whose feature map (at `config.image_size`) is smaller than the window uses a
        window of the map's size, no shift, and a bias table built for that window (e.g. Swin-L 192/w12: the last stage
        is 6x6, table 11x11, as in the official checkpoints). transformers builds every table at the configured window
        and then fails in forward on such stages."""
        from transformers.models.swin.modeling_swin import SwinLayer, SwinRelativePositionBias

        blocks = [module for module in backbone.encoder.modules() if isinstance(module, SwinLayer)]  # all stages'
        for block in blocks:
            resolution = min(block.input_resolution)
            if resolution < block.window_size:
                heads = block.attention.relative_position_bias.relative_position_bias_table.shape[1]
                block.attention.relative_position_bias = SwinRelativePositionBias(heads, (resolution, resolution))
                block.window_size, block.shift_size = resolution, 0

    def feature_map(self, backbone, pixel_values, bool_masked_pos=None, output_hidden_states=False):
        outputs = backbone(pixel_values, bool_masked_pos=bool_masked_pos, output_hidden_states=output_hidden_states)
        stride = backbone.config.patch_size * 2 ** (len(backbone.config.depths) - 1)
        height, width = pixel_values.shape[-2] // stride, pixel_values.shape[-1] // stride
        hidden_states = outputs.hidden_states if output_hidden_states else None
        return self._tokens_to_map(outputs.last_hidden_state, height, width), hidden_states

    def num_layers(self, backbone_config):
        return int(sum(backbone_config.depths))

    def layer_id(self, name, backbone_config):
        depths = list(backbone_config.depths)
        if name.startswith("embeddings."):
            return 0
        if match := self._block.match(name):
            stage, block = int(match.group(1)), int(match.group(2))
            return sum(depths[:stage]) + block + 1
        if match := self._downsample.match(name):
            # The patch merging that ends stage i shares the id of that stage's last block.
            return sum(depths[: int(match.group(1)) + 1])
        return sum(depths) + 1

    def official_init(self, backbone):
        # Official Swin: trunc-normal(0.02) mask token and bias tables; transformers uses zeros.
        if backbone.embeddings.mask_token is not None:
            init.trunc_normal_(backbone.embeddings.mask_token, std=0.02)
        for name, param in backbone.named_parameters():
            if name.endswith("relative_position_bias_table"):
                init.trunc_normal_(param, std=0.02)


class Swinv2Adapter(SwinAdapter):
    family = "swinv2"
    base_model_prefix = "swinv2"
    model_class = Swinv2Model
    # SwinV2 replaces the bias table by a continuous position bias MLP and a learned logit scale; its finetuning
    # excludes them (`cpb_mlp`, `logit_scale`), its pretraining decays them (the same prefix bug as Swin's tables).
    finetuning_no_weight_decay_keywords = (
        "position_embeddings",
        "relative_position_bias_table",
        "continuous_position_bias_mlp",
        "logit_scale",
    )

    def build(self, backbone_config, use_mask_token, add_pooling_layer, fast_window_attention=False):
        # The fast window attention covers transformers' Swin only; SwinV2's cosine attention keeps its own.
        return BackboneAdapter.build(self, backbone_config, use_mask_token, add_pooling_layer)


class ViTAdapter(BackboneAdapter):
    family = "vit"
    base_model_prefix = "vit"
    model_class: type[PreTrainedModel] = ViTModel
    # transformers 5.x names blocks `layers.i`; 4.x named them `encoder.layer.i`.
    _block = re.compile(r"^(?:layers|encoder\.layer)\.(\d+)\.")

    def _encode(self, backbone, pixel_values, bool_masked_pos, output_hidden_states):
        config_size = size_pair(backbone.config.image_size)
        interpolate = tuple(pixel_values.shape[-2:]) != config_size
        return backbone(
            pixel_values,
            bool_masked_pos=bool_masked_pos,
            interpolate_pos_encoding=interpolate,
            output_hidden_states=output_hidden_states,
        )

    def feature_map(self, backbone, pixel_values, bool_masked_pos=None, output_hidden_states=False):
        outputs = self._encode(backbone, pixel_values, bool_masked_pos, output_hidden_states)
        patch = size_pair(backbone.config.patch_size)[0]
        height, width = pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch
        tokens = outputs.last_hidden_state[:, 1:]  # drop CLS
        hidden_states = outputs.hidden_states if output_hidden_states else None
        return self._tokens_to_map(tokens, height, width), hidden_states

    def num_layers(self, backbone_config):
        return int(backbone_config.num_hidden_layers)

    def layer_id(self, name, backbone_config):
        if name.startswith("embeddings."):
            return 0
        if match := self._block.match(name):
            return int(match.group(1)) + 1
        return self.num_layers(backbone_config) + 1

    def official_init(self, backbone):
        embeddings = backbone.embeddings
        init.trunc_normal_(embeddings.cls_token, std=0.02)
        if embeddings.mask_token is not None:
            init.trunc_normal_(embeddings.mask_token, std=0.02)


class BeitAdapter(ViTAdapter):
    """The official SimMIM ViT: BEiT-style (layer scale, q/v bias, shared relative position bias)."""

    family = "beit"
    base_model_prefix = "beit"
    model_class = BeitModel

    def build(self, backbone_config, use_mask_token, add_pooling_layer, fast_window_attention=False):
        # BeitModel reads the mask token switch from its config rather than from an argument.
        backbone_config.use_mask_token = use_mask_token
        return self.model_class(backbone_config, add_pooling_layer=add_pooling_layer)

    def official_init(self, backbone):
        super().official_init(backbone)
        # BEiT / official SimMIM ViT `fix_init_weight`: scale each block's output projections by 1/sqrt(2 * depth).
        for index, layer in enumerate(backbone.layers):
            for linear in (layer.attention.o_proj, layer.mlp.fc2):
                if not getattr(linear.weight, "_is_hf_initialized", False):
                    with torch.no_grad():
                        linear.weight.div_(math.sqrt(2.0 * (index + 1)))


_ADAPTERS: dict[str, BackboneAdapter] = {
    adapter.family: adapter for adapter in (SwinAdapter(), Swinv2Adapter(), ViTAdapter(), BeitAdapter())
}


def get_adapter(config: PretrainedConfig) -> BackboneAdapter:
    """The adapter of a `SimMIMConfig` or of a backbone config (swin, swinv2, vit, beit)."""
    backbone_config = getattr(config, "backbone_config", None) or config
    family = backbone_config.model_type
    if family not in _ADAPTERS:
        raise ValueError(f"Unsupported backbone type {family!r}: SimMIM supports {sorted(_ADAPTERS)}.")
    return _ADAPTERS[family]


__all__ = ["FAST_WINDOW_ATTENTION", "BackboneAdapter", "get_adapter"]
