"""FSDP2 on CPU processes (gloo), wrapped the way `accelerate launch --config_file configs/accelerate/fsdp.yaml` wraps
on GPUs: accelerate's own `fsdp2_prepare_model` with a plugin built from the YAML's `fsdp_config`.

accelerate 1.15 never selects FSDP for CPU processes (its state switches to FSDP only from a GPU-type distributed
setup; with `--use_cpu` a launch is MULTI_CPU, i.e. DDP), so the plugin is handed to the state here. Run under torchrun
with 2 processes; rank 0 writes `record.json` and the gathered full model into $SIMMIM_PROBE_DIR:

- the distributed type accelerate chose, the wrapped units and whether every parameter is a sharded DTensor;
- the losses of 2 AdamW steps on per-rank batches, and the max difference to one process training on both batches
  (the same model, the gradient of the whole batch);
- `model/`: `save_pretrained` of the full state dict gathered as accelerate does for FULL_STATE_DICT.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from accelerate import Accelerator  # noqa: E402
from accelerate.utils import FullyShardedDataParallelPlugin  # noqa: E402
from accelerate.utils.fsdp_utils import fsdp2_prepare_model  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402
from torch.distributed.fsdp import FSDPModule  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from modeling_simmim import SimMIMConfig, SimMIMForMaskedImageModeling, create_optimizer  # noqa: E402
from modeling_simmim.masking import SimMIMMaskGenerator  # noqa: E402

BATCH, STEPS = 2, 2


def plugin_from_yaml(
    path: str, wrap_policy: str | None = None, layers: str | None = None
) -> FullyShardedDataParallelPlugin:
    """The plugin `accelerate launch --config_file path` builds (its `fsdp_config`); `wrap_policy` and `layers`
    override the file's, as `--fsdp_auto_wrap_policy` and `--fsdp_transformer_layer_cls_to_wrap` do."""
    with open(path, encoding="utf-8") as handle:
        fsdp_config = yaml.safe_load(handle)["fsdp_config"]
    layers = layers or fsdp_config.get("fsdp_transformer_layer_cls_to_wrap")
    return FullyShardedDataParallelPlugin(
        fsdp_version=fsdp_config["fsdp_version"],
        auto_wrap_policy=(wrap_policy or fsdp_config["fsdp_auto_wrap_policy"]).lower(),
        min_num_params=fsdp_config.get("fsdp_min_num_params", 1000),
        transformer_cls_names_to_wrap=layers.split(",") if layers else None,
        reshard_after_forward=fsdp_config["fsdp_reshard_after_forward"],
        state_dict_type=fsdp_config["fsdp_state_dict_type"],
        cpu_ram_efficient_loading=fsdp_config["fsdp_cpu_ram_efficient_loading"],
        activation_checkpointing=fsdp_config["fsdp_activation_checkpointing"],
    )


def batch_of(rank: int, config: SimMIMConfig) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + rank)
    masks = SimMIMMaskGenerator(64, config.mask_patch_size, config.model_patch_size, config.mask_ratio)
    return {
        "pixel_values": torch.randn(BATCH, 3, 64, 64, generator=generator),
        "bool_masked_pos": masks(BATCH, generator=generator),
    }


def train(model, batches, steps=STEPS) -> list[float]:
    optimizer = create_optimizer(model, learning_rate=1e-2, fused=False)
    losses = []
    for _ in range(steps):
        loss = model(**batches).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def main() -> None:
    record_dir = os.environ["SIMMIM_PROBE_DIR"]
    config_file = os.path.join(ROOT, "configs", "accelerate", "fsdp.yaml")
    wrap_policy = os.environ.get("SIMMIM_FSDP_WRAP_POLICY")  # e.g. SIZE_BASED_WRAP, to see its refusal
    layers = os.environ.get("SIMMIM_FSDP_LAYERS")  # e.g. ViTLayer
    preset = os.environ.get("SIMMIM_FSDP_PRESET", "swin_test")
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin_from_yaml(config_file, wrap_policy, layers))
    chosen = accelerator.distributed_type.value
    rank, world_size = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)
    config = SimMIMConfig.from_preset(preset, mask_patch_size=16)
    model = SimMIMForMaskedImageModeling(config)
    reference = copy.deepcopy(model)
    accelerator.state.fsdp_plugin = plugin_from_yaml(config_file, wrap_policy, layers)  # as accelerate on GPUs
    model = fsdp2_prepare_model(accelerator, model)
    units = [name or "<root>" for name, module in model.named_modules() if isinstance(module, FSDPModule)]
    sharded = all(isinstance(parameter, DTensor) for parameter in model.parameters())

    losses = train(model, batch_of(rank, config))
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        # one process, both ranks' batches: the whole batch's gradient (equal masked counts per image)
        whole = {
            key: torch.cat([batch_of(r, config)[key] for r in range(world_size)])
            for key in ("pixel_values", "bool_masked_pos")
        }
        reference_losses = train(reference, whole)
        difference = max(float((state[name] - value).abs().max()) for name, value in reference.state_dict().items())
        keys = sorted(state)
        # save_pretrained empties the dict it is given
        SimMIMForMaskedImageModeling(config).save_pretrained(os.path.join(record_dir, "model"), state_dict=dict(state))
        with open(os.path.join(record_dir, "record.json"), "w", encoding="utf-8") as handle:
            json.dump(
                {
                    "distributed_type": chosen,
                    "world_size": world_size,
                    "units": units,
                    "sharded": sharded,
                    "fsdp2": isinstance(model, FSDPModule),
                    "losses": losses,
                    "reference_losses": reference_losses,
                    "max_difference_to_one_process": difference,
                    "state_dict_keys": keys,
                },
                handle,
            )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
