"""Loading any supported checkpoint into `SimMIMForImageClassification` at the asked geometry.

`SimMIMForImageClassification.from_pretrained` calls `load_classifier` (this module registers it when the package
is imported; the model core stays free of SciPy). Two loads, both through transformers' own `from_pretrained`, so
the transformers contract holds (dtype incl. "auto", device_map, revision, token, cache_dir, attn_implementation):

1. the checkpoint is loaded by the class that saved it, at its own geometry (transformers renames 4.x parameter
   names and reports a damaged checkpoint with its own loading report);
2. its state dict is adapted with the pure functions of `weight_transfer` and loaded into the classifier of the asked
   geometry; the one table of what was loaded, resized, interpolated, copied, newly initialized and left unused is
   logged (WARNING when anything changed, else INFO) and kept as `model.loading_report`.

A checkpoint that needs no transfer (a classifier with the same geometry and head) is one plain transformers load.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.utils import logging

from .backbones import get_adapter
from .configuration_simmim import HEAD_FIELDS, RUNTIME_FIELDS, SUPPORTED_BACKBONES, SimMIMConfig
from .modeling_simmim import SimMIMForImageClassification, SimMIMForMaskedImageModeling, SimMIMPreTrainedModel
from .training_checkpoints import shard_names
from .weight_transfer import LoadingReport, adapt_state_dict, finetuning_config

logger = logging.get_logger(__name__)

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
# from_pretrained keyword arguments that locate the checkpoint (download) ...
HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "force_download", "subfolder", "proxies")
# ... and those that transformers' loader reads (never config fields); the first group also applies to the
# checkpoint's own load.
SOURCE_LOAD_KWARGS = (
    "dtype",
    "torch_dtype",
    "use_safetensors",
    "weights_only",
    "variant",
    "key_mapping",
    "trust_remote_code",
    "code_revision",
)
TARGET_LOAD_KWARGS = (
    "device_map",
    "max_memory",
    "offload_folder",
    "offload_buffers",
    "attn_implementation",
    "low_cpu_mem_usage",
    "_from_auto",
    "_from_pipeline",
    "adapter_kwargs",
    "quantization_config",
    "distributed_config",
    "tp_plan",
    "tp_size",
    "device_mesh",
    "use_kernels",
    "kernel_config",
    "disable_mmap",
    "ignore_mismatched_sizes",
    "experts_implementation",
)
_OUR_CLASSES = {cls.__name__: cls for cls in (SimMIMForMaskedImageModeling, SimMIMForImageClassification)}


# --------------------------------------------------------------------------------------------------------------------
# Reading weight files (with errors that name the broken file)
# --------------------------------------------------------------------------------------------------------------------
def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """Read one weights file: safetensors, or a torch pickle with `weights_only=True` (never arbitrary classes)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors/pickle errors have many types; all mean the same to the user
        # torch's own text advises weights_only=False (running the pickle's code): never pass that on
        detail = f": {error}" if path.endswith(".safetensors") else ""
        raise OSError(
            f"cannot read the weights file {path} ({type(error).__name__}{detail}). The file is corrupt or "
            "truncated (or not a weights file): download or save the checkpoint again."
        ) from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        raise ValueError(
            f"{path} looks like an official SimMIM .pth checkpoint; convert it first with "
            "`python -m modeling_simmim.convert_official --checkpoint ... --output_dir ...`."
        )
    if not isinstance(state, dict):
        raise OSError(f"{path} does not hold a state dict (found {type(state).__name__})")
    return state


def check_weight_files(folder: str) -> list[str]:
    """The weight files of a model folder, each opened once (safetensors: header and size) so that a corrupt or
    truncated file fails here with a message naming it, not deep inside a loader."""
    for name in WEIGHT_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if name.endswith(".index.json"):
            try:
                files = [os.path.join(folder, shard) for shard in shard_names(path)]
            except (OSError, ValueError) as error:
                raise OSError(f"cannot read the shard index {path}: {error}") from error
        else:
            files = [path]
        for file in files:
            if file.endswith(".safetensors"):
                from safetensors import safe_open

                try:
                    with safe_open(file, "pt") as handle:
                        handle.keys()
                except Exception as error:  # SafetensorError, OSError: both mean an unusable file
                    raise OSError(
                        f"cannot read the weights file {file} ({type(error).__name__}: {error}). The file is "
                        "corrupt or truncated: download or save the checkpoint again."
                    ) from error
            else:
                load_state_dict_file(file)
        return files
    raise FileNotFoundError(f"no weights in {folder}: expected one of {', '.join(WEIGHT_FILES)}")


def _check_local_checkpoint(name_or_path: str, subfolder: str = "") -> None:
    if os.path.isdir(name_or_path):
        check_weight_files(os.path.join(name_or_path, subfolder or ""))


# --------------------------------------------------------------------------------------------------------------------
# Stage 1: the checkpoint's own state dict, under current parameter names
# --------------------------------------------------------------------------------------------------------------------
def _source_class(source_config: SimMIMConfig) -> type[PreTrainedModel]:
    """The class that saved the checkpoint: ours, the transformers class named in `architectures` (same family), or
    the family's bare encoder."""
    import transformers

    config_class = SUPPORTED_BACKBONES[source_config.backbone_type]
    for name in source_config.architectures or []:
        if name in _OUR_CLASSES:
            return _OUR_CLASSES[name]
        candidate = getattr(transformers, name, None)
        if (
            isinstance(candidate, type)
            and issubclass(candidate, PreTrainedModel)
            and (candidate.config_class is config_class)
        ):
            return candidate
    return get_adapter(source_config).model_class


def source_state_dict(name_or_path, source_config: SimMIMConfig, **load_kwargs: Any) -> dict[str, torch.Tensor]:
    """State dict of a saved model under the current transformers parameter names, keys prefixed with the backbone's
    attribute name ("swin.", "beit.", ...). transformers 5 saves Swin/ViT/BEiT weights under their 4.x names and
    renames them when its own `from_pretrained` loads them, so the checkpoint is loaded by the class that saved it."""
    source_class = _source_class(source_config)
    if issubclass(source_class, SimMIMPreTrainedModel):
        # The shared loader, not the transfer entry point of the subclass. mypy models a classmethod read from its
        # class as a plain function; at runtime it is a bound method, which has `__func__`.
        plain_load = SimMIMPreTrainedModel.from_pretrained.__func__  # type: ignore[attr-defined]
        model = plain_load(source_class, name_or_path, config=source_config, **load_kwargs)
    else:
        model = source_class.from_pretrained(name_or_path, **load_kwargs)
    prefix = get_adapter(source_config).base_model_prefix
    bare = not isinstance(getattr(model, prefix, None), torch.nn.Module)
    return {(f"{prefix}.{key}" if bare else key): value for key, value in model.state_dict().items()}


# --------------------------------------------------------------------------------------------------------------------
# Stage 2 and the entry point
# --------------------------------------------------------------------------------------------------------------------
class _DropLoadReport(std_logging.Filter):
    def filter(self, record: std_logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def _without_transformers_report() -> Iterator[None]:
    """Drop transformers' own loading report of the adapted load: ours replaces it (one table, not two). Its
    content (missing keys, i.e. newly initialized weights) is merged into ours."""
    report_logger = logging.get_logger("transformers.modeling_utils")
    report_filter = _DropLoadReport()
    report_logger.addFilter(report_filter)
    try:
        yield
    finally:
        report_logger.removeFilter(report_filter)


def _report_from_info(info: dict[str, Any], model: torch.nn.Module, source: str) -> LoadingReport:
    missing = set(info.get("missing_keys") or ())
    return LoadingReport(
        source=source,
        model=type(model).__name__,
        loaded=sorted(key for key in model.state_dict() if key not in missing),
        newly_initialized=sorted(missing),
        unused={key: "not in this model" for key in sorted(info.get("unexpected_keys") or ())},
    )


def _split_kwargs(kwargs: dict[str, Any], source_config: SimMIMConfig) -> tuple[dict, dict, dict, dict]:
    """(hub, source-load, target-load, config-field) keyword arguments; unknown ones raise TypeError."""
    hub = {key: kwargs.pop(key) for key in HUB_KWARGS if key in kwargs}
    source_load = {key: kwargs.pop(key) for key in SOURCE_LOAD_KWARGS if key in kwargs}
    target_load = {key: kwargs.pop(key) for key in TARGET_LOAD_KWARGS if key in kwargs}
    fields = {
        key: kwargs.pop(key)
        for key in list(kwargs)
        if hasattr(source_config, key) or key in HEAD_FIELDS + RUNTIME_FIELDS
    }
    if kwargs:
        raise TypeError(
            f"SimMIMForImageClassification.from_pretrained got unexpected keyword arguments {sorted(kwargs)}: they are "
            "neither loading options nor fields of the config."
        )
    return hub, source_load, target_load, fields


def load_classifier(model_class, pretrained_model_name_or_path, *model_args, **kwargs):
    """`SimMIMForImageClassification.from_pretrained` (see its docstring)."""
    if model_args:
        raise TypeError(f"{model_class.__name__}.from_pretrained takes no extra positional arguments")
    config = kwargs.pop("config", None)
    if config is not None and not isinstance(config, SimMIMConfig):
        config = SimMIMConfig.from_native(config)
    labels = {key: kwargs.pop(key, None) for key in ("num_labels", "id2label", "label2id")}
    overrides = dict(kwargs.pop("backbone_overrides", None) or {})
    for name in ("image_size", "window_size", "drop_path_rate"):
        value = kwargs.pop(name, None)
        if value is not None:
            overrides[name] = value
    output_loading_info = kwargs.pop("output_loading_info", False)
    name = str(pretrained_model_name_or_path)
    hub = {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}
    source_config = SimMIMConfig.from_pretrained(pretrained_model_name_or_path, **hub)
    _check_local_checkpoint(name, hub.get("subfolder", ""))
    hub, source_load, target_load, fields = _split_kwargs(kwargs, source_config)
    architectures = list(source_config.architectures or [])
    from_mim = not any("ImageClassification" in arch for arch in architectures)
    target_config = finetuning_config(
        source_config,
        from_mim,
        config=config,
        overrides=overrides,
        fields=fields,
        architecture=model_class.__name__,
        **labels,
    )
    plain_load = SimMIMPreTrainedModel.from_pretrained.__func__

    same_head = not from_mim and target_config.num_labels == source_config.num_labels
    if same_head and not overrides and config is None:
        # nothing to move: one transformers load, with transformers' own loading report
        model, info = plain_load(
            model_class,
            pretrained_model_name_or_path,
            config=target_config,
            output_loading_info=True,
            **hub,
            **source_load,
            **target_load,
        )
        report = _report_from_info(info, model, name)
    else:
        state = source_state_dict(pretrained_model_name_or_path, source_config, **hub, **source_load)
        with torch.device("meta"):
            target_shapes = {key: tuple(value.shape) for key, value in model_class(target_config).state_dict().items()}
        weights, report = adapt_state_dict(
            state,
            target_shapes,
            get_adapter(target_config).base_model_prefix,
            source_backbone_config=source_config.backbone_config,
            target_backbone_config=target_config.backbone_config,
            source=name,
        )
        if from_mim and architectures:
            report.source += " (pretraining checkpoint)"
        with _without_transformers_report():
            model, info = plain_load(
                model_class,
                None,
                config=target_config,
                state_dict=weights,
                output_loading_info=True,
                **{k: v for k, v in source_load.items() if k in ("dtype", "torch_dtype")},
                **target_load,
            )
        unexpected = set(info.get("unexpected_keys") or ())
        if unexpected or info.get("mismatched_keys"):  # adapt_state_dict keeps only fitting keys: this is a bug
            raise RuntimeError(f"adapted weights do not fit {model_class.__name__}: {info}")
        report.newly_initialized = sorted(set(report.newly_initialized) | set(info.get("missing_keys") or ()))
        report.model = model_class.__name__
        logger.log(logging.WARNING if report.changes_anything else logging.INFO, "%s", report)
    model.loading_report = report
    if output_loading_info:
        return model, {
            "missing_keys": set(report.newly_initialized),
            "unexpected_keys": set(report.unused),
            "mismatched_keys": set(report.resized),
            "error_msgs": [],
            "report": report,
        }
    return model


SimMIMForImageClassification.checkpoint_transfer = load_classifier

__all__ = ["check_weight_files", "load_classifier", "load_state_dict_file", "source_state_dict"]
