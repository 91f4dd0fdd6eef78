"""SimMIM models on top of transformers' own Swin, SwinV2, ViT and BEiT encoders.

The whole method: mask token in the encoder input, last feature map -> 1x1 conv -> PixelShuffle, L1 loss on the
masked pixels only. State dicts are transformers-native (`swin.*`, `beit.*`, ... and `decoder.0.*`), and so are the
saved configs (see `SimMIMConfig`): plain transformers loads a saved folder with its own classes wherever it has one.

This file, `configuration_simmim.py` and `backbones.py` are the model core: they import torch and transformers only,
so a folder that ships them as remote code runs with those two packages alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BeitConfig, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.dynamic_module_utils import custom_object_save
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.utils import ModelOutput

from .backbones import FAST_WINDOW_ATTENTION, get_adapter
from .configuration_simmim import SimMIMConfig

# The Auto class that loads a folder whose model has no transformers class (see `SimMIMConfig.native_architecture`),
# and the class its `auto_map` names where that is not the model's own class.
_AUTO_CLASSES = {
    "SimMIMForMaskedImageModeling": "AutoModelForMaskedImageModeling",
    "SimMIMForImageClassification": "AutoModelForImageClassification",
}
_REMOTE_CODE_CLASSES = {("SimMIMForMaskedImageModeling", "beit"): "SimMIMBeitForMaskedImageModeling"}


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


def normalize_targets(pixel_values: torch.Tensor, window: int) -> torch.Tensor:
    """The official `NORM_TARGET` regression target (SwinV2 recipe): every pixel minus the mean of its `window`-square
    neighbourhood, divided by the neighbourhood's unbiased standard deviation (+1e-6 inside the root). Neighbourhoods
    are cut at the image border: statistics use only the pixels inside the image."""
    pixels = pixel_values.float()
    pool: dict[str, Any] = dict(kernel_size=window, stride=1, padding=window // 2)
    local_mean = F.avg_pool2d(pixels, count_include_pad=False, **pool)
    local_mean_of_squares = F.avg_pool2d(pixels * pixels, count_include_pad=False, **pool)
    count = F.avg_pool2d(torch.ones_like(pixels[:, :1]), count_include_pad=True, **pool) * window * window
    variance = ((local_mean_of_squares - local_mean**2) * count / (count - 1)).clamp_min(0.0)
    return (pixels - local_mean) / (variance + 1e-6).sqrt()


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

    loss: torch.Tensor | None = None
    reconstruction: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class SimMIMPreTrainedModel(PreTrainedModel):
    """Weight initialization, loading and saving conventions shared by the SimMIM models.

    The models accept a `SimMIMConfig` or a transformers Swin/SwinV2/ViT/BEiT config (SimMIM fields read from its extra
    keys), so they load native transformers folders, and they save native ones (see `save_pretrained`).
    """

    config_class: type[PretrainedConfig] = SimMIMConfig  # BeitConfig for the BEiT remote-code class
    config: SimMIMConfig
    base_model_prefix = "simmim"  # per instance: the backbone's attribute name ("swin", "beit", ...)
    main_input_name = "pixel_values"
    input_modalities = ("image",)  # type: ignore[assignment]  # a tuple, as in transformers' image models
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True
    # Our losses are batch means and ignore `num_items_in_batch`; without this the Trainer (seeing **kwargs) skips
    # its division by the gradient-accumulation steps and multiplies the loss by the number of processes.
    accepts_loss_kwargs = False
    # Buffers that current transformers recomputes instead of loading (older checkpoints carry them).
    _keys_to_ignore_on_load_unexpected = [r".*relative_position_index.*", r".*attn_mask.*"]

    def __init__(self, config: SimMIMConfig | PretrainedConfig) -> None:
        if not isinstance(config, SimMIMConfig):
            config = SimMIMConfig.from_native(config)
        super().__init__(config)
        # transformers adds or strips this prefix when a checkpoint of the bare encoder (`SwinModel`, ...) is loaded.
        self.base_model_prefix = get_adapter(config).base_model_prefix

    @property
    def backbone_adapter(self):
        return get_adapter(self.config)

    @property
    def backbone(self) -> PreTrainedModel:
        """The transformers encoder (`self.swin`, `self.beit`, ...)."""
        return getattr(self, self.backbone_adapter.base_model_prefix)

    def _build_backbone(self, use_mask_token: bool, add_pooling_layer: bool) -> None:
        config = self.config
        fast = bool(config.fast_window_attention) or config._attn_implementation == FAST_WINDOW_ATTENTION
        adapter = get_adapter(config)
        backbone = adapter.build(
            config.backbone_config,
            use_mask_token=use_mask_token,
            add_pooling_layer=add_pooling_layer,
            fast_window_attention=fast,
        )
        setattr(self, adapter.base_model_prefix, backbone)

    def get_input_embeddings(self) -> nn.Module:
        # The encoder's patch embedding. accelerate's FSDP2 wrapping asks for it, and transformers' default raises
        # NotImplementedError for a model whose encoder sits under another attribute name.
        return self.backbone.get_input_embeddings()

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

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        """`PreTrainedModel.from_pretrained` (dtype, device_map, revision, token, cache_dir, transformers' loading
        report), for SimMIM folders and native transformers Swin/SwinV2/ViT/BEiT folders alike. `config` may be a
        `SimMIMConfig` or a transformers config of those families. A `config` of another backbone family than the
        checkpoint raises `ValueError` naming both (transformers would load nothing and report it)."""
        if config is not None and not isinstance(config, (SimMIMConfig, str)):
            config = SimMIMConfig.from_native(config)
        if isinstance(config, SimMIMConfig) and pretrained_model_name_or_path is not None:
            _check_checkpoint_family(pretrained_model_name_or_path, config, kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, config=config, **kwargs)

    def save_pretrained(self, save_directory, *args, save_original_format: bool = False, **kwargs):
        """`PreTrainedModel.save_pretrained`, writing a native transformers folder: `config.json` is the backbone's
        own config (model_type "swin", "beit", ...) with the SimMIM fields as extra keys and `architectures` naming
        transformers' class. Where transformers has no class for the model (BEiT pretraining, see
        `SimMIMConfig.native_architecture`), the folder gets `auto_map` and the model-core files (remote code that
        needs torch and transformers only).

        Weights keep their current names by default: transformers 5 otherwise renames Swin/ViT/BEiT weights back to
        their 4.x names, and the Trainer's `load_best_model_at_end` and `resume_from_checkpoint` read checkpoints with
        a plain `load_state_dict`, which then matches nothing and silently keeps the current weights. (transformers
        loads both namings.)"""
        name = type(self).__name__
        remote_class = _REMOTE_CODE_CLASSES.get((name, self.config.backbone_type), name)
        needs_code = name in _AUTO_CLASSES and self.config.native_architecture(name) is None
        self.config.__dict__.pop("auto_map", None)
        if needs_code:
            self.config.auto_map = {_AUTO_CLASSES[name]: f"modeling_simmim.{remote_class}"}
            if kwargs.get("is_main_process", True):
                # Before saving: `save_pretrained(..., push_to_hub=True)` uploads the folder as it returns.
                os.makedirs(save_directory, exist_ok=True)
                custom_object_save(self, save_directory)  # this file and its relative imports: the model core
        kwargs["save_original_format"] = save_original_format
        return super().save_pretrained(save_directory, *args, **kwargs)


def _check_checkpoint_family(name_or_path, config: SimMIMConfig, kwargs: dict[str, Any]) -> None:
    """Raise when the checkpoint's backbone family differs from `config`'s (swin vs vit, ...)."""
    hub = {
        key: kwargs[key]
        for key in ("cache_dir", "revision", "token", "local_files_only", "force_download", "subfolder", "proxies")
        if key in kwargs
    }
    try:
        saved = SimMIMConfig.from_pretrained(name_or_path, **hub)
    except OSError:  # no readable config.json: transformers reports it when it loads the weights
        return
    if saved.backbone_type != config.backbone_type:
        raise ValueError(
            f"{name_or_path} holds a {saved.backbone_type} backbone but the given config is {config.backbone_type}: "
            f"use a {saved.backbone_type} config (or drop `config`)."
        )


class SimMIMForMaskedImageModeling(SimMIMPreTrainedModel):
    """SimMIM pretraining model: a transformers encoder with a learnable mask token, and a one-layer decoder
    (a `decoder_kernel_size` conv, official 1x1, to `encoder_stride**2 * num_channels` channels +
    `PixelShuffle(encoder_stride)`).

    Works for any image size that the geometry allows (non-square, or different from `config.image_size`).
    """

    def __init__(self, config: SimMIMConfig | PretrainedConfig) -> None:
        super().__init__(config)
        config = self.config
        self._build_backbone(use_mask_token=True, add_pooling_layer=False)
        stride, kernel = config.encoder_stride, getattr(config, "decoder_kernel_size", 1)
        self.decoder = nn.Sequential(
            nn.Conv2d(config.hidden_size, stride**2 * config.num_channels, kernel_size=kernel, padding=kernel // 2),
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
            target = pixel_values
            window = getattr(self.config, "norm_target_window", None)
            if window:
                with torch.no_grad():
                    target = normalize_targets(pixel_values, window)
            loss = simmim_loss(target, reconstruction, mask, self.config.model_patch_size)

        if not return_dict:
            output = (reconstruction,) + ((hidden_states,) if output_hidden_states else ())
            return ((loss,) + output) if loss is not None else output
        return SimMIMMaskedImageModelingOutput(loss=loss, reconstruction=reconstruction, hidden_states=hidden_states)


class SimMIMBeitForMaskedImageModeling(SimMIMForMaskedImageModeling):
    """`SimMIMForMaskedImageModeling` as the remote code of a BEiT-style pretraining folder (transformers has no
    pixel-regression BEiT MIM class: its `BeitForMaskedImageModeling` predicts visual tokens). Only `config_class`
    differs: transformers' Auto classes register remote code under the folder's own config class, `BeitConfig`."""

    config_class = BeitConfig


__all__ = [
    "SimMIMBeitForMaskedImageModeling",
    "SimMIMPreTrainedModel",
    "SimMIMForMaskedImageModeling",
    "SimMIMMaskedImageModelingOutput",
    "normalize_targets",
    "simmim_loss",
]


# ====================================================================================================================
# Image classification (finetuning)
# ====================================================================================================================
def classification_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy for class ids (B,), with optional label smoothing; soft-target cross-entropy for float targets
    (B, num_labels) such as Mixup/CutMix outputs (their smoothing is already folded in). Never BCE."""
    logits = logits.float()
    if labels.is_floating_point():
        if labels.shape != logits.shape:
            raise ValueError(
                f"float labels must be soft targets of shape {tuple(logits.shape)} (batch, num_labels), "
                f"got {tuple(labels.shape)}; pass class ids as an integer tensor."
            )
        return torch.sum(-labels * torch.log_softmax(logits, dim=-1), dim=-1).mean()
    return nn.functional.cross_entropy(logits, labels.view(-1).long(), label_smoothing=label_smoothing)


class SimMIMForImageClassification(SimMIMPreTrainedModel):
    """A SimMIM encoder with a linear head `classifier`, laid out like transformers' `XForImageClassification`
    (`self.swin` / `self.swinv2` / `self.beit` / `self.vit` + `self.classifier`), so its weights are
    transformers-native and export to `SwinForImageClassification` & co. (see `checkpoint.export_to_transformers`).

    Pooling: Swin/SwinV2 average the final normed tokens (the backbone's pooler); BEiT-style ViT with
    `use_mean_pooling=True` averages the patch tokens and applies a LayerNorm (`fc_norm`, the official finetune head),
    otherwise it takes the CLS token; plain ViT takes the CLS token, or the mean of the patch tokens when
    `config.classifier_pooling == "mean"`. Stochastic depth comes from the backbone's `drop_path_rate`.
    Loss: cross-entropy for class ids (with `config.label_smoothing`, default 0), soft-target cross-entropy for float
    targets (B, num_labels).

    `from_pretrained` also takes a SimMIM pretraining checkpoint or a native transformers checkpoint and moves it to
    new geometry (image size, window size) with the official resizing rules; see its docstring.
    """

    def __init__(self, config: SimMIMConfig | PretrainedConfig) -> None:
        super().__init__(config)
        config = self.config
        family = get_adapter(config).family
        pooling = getattr(config, "classifier_pooling", "cls")
        if family == "vit" and pooling not in ("cls", "mean"):
            raise ValueError(f"classifier_pooling must be 'cls' or 'mean', got {pooling!r}.")
        # transformers' ViT pooler is a dense+tanh layer that ViTForImageClassification does not use: leave it out.
        self._build_backbone(use_mask_token=False, add_pooling_layer=family != "vit")
        num_labels = config.num_labels or 0  # None: no id2label, so no labels
        self.num_labels = num_labels
        self.classifier = nn.Linear(config.hidden_size, num_labels) if num_labels > 0 else nn.Identity()
        self.post_init()

    def pooled_features(
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False, output_attentions: bool = False
    ):
        """Run the encoder and pool: returns (features (B, C), encoder outputs)."""
        family = self.backbone_adapter.family
        kwargs = {}
        if family in ("vit", "beit"):
            config_size = self.config.image_size
            kwargs["interpolate_pos_encoding"] = tuple(pixel_values.shape[-2:]) != tuple(config_size)
        if output_hidden_states:
            kwargs["output_hidden_states"] = True
        if output_attentions:
            kwargs["output_attentions"] = True
        outputs = self.backbone(pixel_values, **kwargs)
        if family == "vit":
            tokens = outputs.last_hidden_state
            if getattr(self.config, "classifier_pooling", "cls") == "mean":
                return tokens[:, 1:].mean(dim=1), outputs
            return tokens[:, 0], outputs
        return outputs.pooler_output, outputs

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`): normalized images.
        labels (`torch.LongTensor` of shape `(batch_size,)` or `torch.FloatTensor` of shape
            `(batch_size, num_labels)`, *optional*): class ids, or soft targets (Mixup/CutMix).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        features, outputs = self.pooled_features(
            pixel_values, output_hidden_states=bool(output_hidden_states), output_attentions=bool(output_attentions)
        )
        logits = self.classifier(features)
        loss = None
        if labels is not None:
            loss = classification_loss(logits, labels, float(getattr(self.config, "label_smoothing", 0.0) or 0.0))
        hidden_states = outputs.hidden_states if output_hidden_states else None
        attentions = outputs.attentions if output_attentions else None
        if not return_dict:
            output = (logits,) + tuple(x for x in (hidden_states, attentions) if x is not None)
            return ((loss,) + output) if loss is not None else output
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=hidden_states, attentions=attentions)

    # Moving a checkpoint to another geometry or task (resized bias tables, BEiT's shared table copied into every
    # block, ...) needs SciPy, so it lives outside the model core: `modeling_simmim.loading` sets this when the
    # package is imported. A remote-code copy of this file (no package) loads checkpoints as they are.
    checkpoint_transfer: ClassVar[Callable[..., Any] | None] = None
    _TRANSFER_ARGUMENTS = ("image_size", "window_size", "drop_path_rate", "backbone_overrides")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Load a SimMIM pretraining checkpoint, one of our classification checkpoints, or a native transformers
        Swin/SwinV2/BEiT/ViT (classification, MIM or bare encoder) folder or Hub id, into a classifier of the asked
        geometry:

            SimMIMForImageClassification.from_pretrained(
                "outputs/simmim_swin_base", num_labels=1000, id2label=..., image_size=224, window_size=7,
                drop_path_rate=0.1)

        Backbone overrides (`image_size`, `window_size` (Swin/SwinV2), `drop_path_rate`, and any backbone config
        field in `backbone_overrides={...}`) are applied before loading. A MIM checkpoint loses its decoder and mask
        token; a BEiT-style encoder gets one relative position bias table per block (copied from the shared one)
        and mean pooling + LayerNorm, as in the official finetuning; Swin tables are resized with the official
        geometric bicubic method, ViT absolute position embeddings bicubically; SwinV2 needs no resize (continuous
        position bias; `pretrained_window_sizes` is set to the pretraining windows). The head is new when the number
        of labels changes. One table (logged at WARNING when anything was resized, newly initialized or left unused)
        lists what happened to every weight; it is also `model.loading_report`, and `output_loading_info=True`
        returns transformers' loading info with it. The transformers contract holds: `dtype` (also "auto"),
        `device_map`, `revision`, `token`, `cache_dir`, `attn_implementation`; other keyword arguments set config
        fields (e.g. `label_smoothing=0.1`) and unknown ones are rejected. A checkpoint of another backbone family
        than `config` raises `ValueError`.
        """
        transfer = SimMIMForImageClassification.checkpoint_transfer
        if transfer is not None:
            return transfer(cls, pretrained_model_name_or_path, *model_args, **kwargs)
        asked = sorted(name for name in cls._TRANSFER_ARGUMENTS if kwargs.get(name) is not None)
        if asked:
            raise ValueError(
                f"{asked} move a checkpoint to another geometry, which needs the simmim-hf package "
                "(`pip install simmim-hf`, `import modeling_simmim`)."
            )
        for name in cls._TRANSFER_ARGUMENTS:
            kwargs.pop(name, None)
        return super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)


__all__ += ["SimMIMForImageClassification", "classification_loss"]
