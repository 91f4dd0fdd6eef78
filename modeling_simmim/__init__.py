"""SimMIM (masked image modeling) for the Hugging Face ecosystem.

Importing the package registers, with transformers: the "simmim" model type of older saved folders (current ones are
native Swin/SwinV2/ViT/BEiT folders), the "simmim_window" attention function, and the checkpoint transfer that
`SimMIMForImageClassification.from_pretrained` uses to move a checkpoint to another geometry.
"""

from transformers import AutoConfig, AutoModelForImageClassification, AutoModelForMaskedImageModeling

from . import loading as _loading  # noqa: F401  (registers the checkpoint transfer)
from . import swin_attention as _swin_attention  # noqa: F401  (registers the "simmim_window" attention function)
from .configuration_simmim import PRESETS, SimMIMConfig
from .masking import SimMIMDataCollator, SimMIMMaskGenerator
from .modeling_simmim import (
    SimMIMForImageClassification,
    SimMIMForMaskedImageModeling,
    SimMIMMaskedImageModelingOutput,
    SimMIMPreTrainedModel,
    simmim_loss,
)
from .optimization import (
    create_optimizer,
    get_simmim_scheduler,
    param_groups_layer_decay,
    scale_learning_rate,
    simmim_lr_at,
)

__version__ = "0.1.0"

# Folders saved before the native format (model_type "simmim", nested backbone_config), and `from_config`.
AutoConfig.register("simmim", SimMIMConfig, exist_ok=True)
AutoModelForMaskedImageModeling.register(SimMIMConfig, SimMIMForMaskedImageModeling, exist_ok=True)
AutoModelForImageClassification.register(SimMIMConfig, SimMIMForImageClassification, exist_ok=True)

__all__ = [
    "PRESETS",
    "SimMIMConfig",
    "SimMIMDataCollator",
    "SimMIMForImageClassification",
    "SimMIMForMaskedImageModeling",
    "SimMIMMaskGenerator",
    "SimMIMMaskedImageModelingOutput",
    "SimMIMPreTrainedModel",
    "create_optimizer",
    "get_simmim_scheduler",
    "param_groups_layer_decay",
    "scale_learning_rate",
    "simmim_lr_at",
    "simmim_loss",
]
