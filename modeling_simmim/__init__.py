"""SimMIM (masked image modeling) for the Hugging Face ecosystem.

Importing the package registers `simmim` with transformers' Auto classes.
"""

from transformers import AutoConfig, AutoModelForImageClassification, AutoModelForMaskedImageModeling

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

AutoConfig.register("simmim", SimMIMConfig, exist_ok=True)
AutoModelForMaskedImageModeling.register(SimMIMConfig, SimMIMForMaskedImageModeling, exist_ok=True)
# `save_pretrained` writes `auto_map` and copies the code files, so the Hub loads saved folders with
# `trust_remote_code=True` where this package is not installed.
SimMIMConfig.register_for_auto_class()
SimMIMForMaskedImageModeling.register_for_auto_class("AutoModelForMaskedImageModeling")
AutoModelForImageClassification.register(SimMIMConfig, SimMIMForImageClassification, exist_ok=True)
SimMIMForImageClassification.register_for_auto_class("AutoModelForImageClassification")

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
