"""SimMIM on the transformers `Trainer`: the official optimization recipe, and callbacks for reconstructions and
throughput.

Why a subclass: the stock `Trainer` (transformers 5.x) cannot express the official recipe. Its schedules warm up from
0 (not from `warmup_lr`), have no multistep decay, give a min-lr floor relative to each group's lr; its optimizer
groups know nothing of layer-wise decay or the SimMIM no-decay rules; `max_grad_norm` defaults to 1.0 (official
5.0); it logs the lr of param group 0 (the most decayed group under layer decay) and no throughput. Everything
else (loop, checkpointing, resuming, accelerate/DeepSpeed/FSDP, reporters) is the Trainer's, except the training
dataloader: its order and per-example randomness are keyed by (seed, epoch, index) (`modeling_simmim.randomness`), so
that runs do not depend on the number of processes, workers or resumes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from transformers import EvalPrediction, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR,
    EvalLoopOutput,
    SaveStrategy,
    get_last_checkpoint,
    has_length,
    rotate_checkpoints,
    seed_worker,
)
from transformers.utils import ExplicitEnum, logging

from .cpu_bf16 import describe_cpu_bf16_path, fallback_context
from .data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, SKIPPED_KEY, StreamingImageDataset
from .model_card import classifier_card, pretraining_card
from .modeling_simmim import normalize_targets, simmim_loss
from .optimization import create_optimizer, get_simmim_scheduler, scale_learning_rate
from .randomness import KeyedEpochSampler, mix_seed
from .step_guard import PREEMPTED_EXIT_CODE, StepGuardCallback, check_finite_weights
from .streaming import StreamDataLoader, StreamPosition
from .training_checkpoints import STAGING_DIR, publish_checkpoint
from .visualization import make_reconstruction_grid, reconstruct

logger = logging.get_logger(__name__)

RECONSTRUCTIONS_DIR = "reconstructions"
TOP_K = 5  # classification reports top-1 and top-5
TOP_K_METRIC_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics", "top_k_accuracy")


class SimMIMSchedulerType(ExplicitEnum):
    """Schedules of the official code (timm 0.4.12 semantics, stepped per iteration)."""

    COSINE = "cosine"  # linear warmup from warmup_lr, then cosine (over the whole run) to min_lr
    MULTISTEP = "multistep"  # linear warmup from warmup_lr, then lr * gamma ** (number of milestones passed)


@dataclass
class SimMIMTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the official SimMIM optimization recipe.

    Learning rates are given **per 512 images** and linearly scaled by the total batch size (per-device batch x
    processes x gradient accumulation), as the official code does, unless `--scale_learning_rate false`.
    `--learning_rate` is not used: the peak lr is `base_learning_rate * total_batch / 512` (written back into
    `learning_rate` when training starts, so that saved arguments show the lr actually used).
    """

    base_learning_rate: float = field(
        default=2e-4, metadata={"help": "Peak learning rate per 512 images (official Swin-B 100 ep: 2e-4)."}
    )
    warmup_learning_rate: float = field(
        default=1e-6, metadata={"help": "Learning rate the warmup starts from, per 512 images."}
    )
    min_learning_rate: float = field(
        default=1e-5, metadata={"help": "Final learning rate of the cosine schedule, per 512 images."}
    )
    scale_learning_rate: bool = field(
        default=True,
        metadata={"help": "Scale base/warmup/min lr by total_batch_size / 512 (official). False: use them as given."},
    )
    warmup_epochs: float = field(
        default=10.0,
        metadata={"help": "Warmup length in epochs (official: 10). A positive --warmup_steps overrides it."},
    )
    lr_scheduler_type: SimMIMSchedulerType | str = field(
        default="cosine",
        metadata={
            "help": "cosine: warmup then cosine to min lr; multistep: warmup then x lr_gamma at each milestone."
        },
    )
    lr_milestones: list[float] = field(
        default_factory=list, metadata={"help": "Epochs at which multistep multiplies the lr by lr_gamma (e.g. 700)."}
    )
    lr_gamma: float = field(default=0.1, metadata={"help": "Multistep decay factor."})
    layer_decay: float = field(
        default=1.0, metadata={"help": "Layer-wise lr decay (1.0 = off; official finetuning uses 0.65-0.9)."}
    )
    no_weight_decay_keywords: list[str] = field(
        default_factory=list,
        metadata={
            "help": "More parameters to exclude from weight decay (substrings of their names), beyond the "
            "official exclusions of the family and stage, e.g. `relative_position_bias_table` (which the "
            "official code decays in pretraining and in ViT finetuning)."
        },
    )
    visualize_steps: int = field(
        default=0,
        metadata={
            "help": "Save reconstructions/step_XXXXX.png every N optimizer steps (and at the last step); 0 = "
            "only at the last step."
        },
    )
    num_visualize_images: int = field(default=8, metadata={"help": "Images (rows) in each reconstruction grid."})
    torch_num_threads: int | None = field(
        default=None,
        metadata={
            "help": "CPU threads of torch in this process (default: torch's choice). 1 is fastest for tiny "
            "models on a busy or small CPU."
        },
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into a non-empty --output_dir that has no checkpoint."}
    )
    # Defaults that differ from TrainingArguments': a pretraining script trains (and evaluates when there is an
    # evaluation split) unless told otherwise; the rest are the official values.
    do_train: bool = field(default=True, metadata={"help": "Train (default). --no_do_train to only evaluate."})
    do_eval: bool = field(default=True, metadata={"help": "Evaluate at the end when there is an evaluation split."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (official 0.05)."})
    max_grad_norm: float = field(
        default=5.0, metadata={"help": "Clip the global gradient L2 norm at this value (official 5.0); 0 = no clip."}
    )
    dataloader_drop_last: bool = field(
        default=True, metadata={"help": "Drop the last incomplete batch of an epoch (official)."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep False: the image column is decoded by our dataset wrapper."}
    )
    max_nonfinite_steps: int = field(
        default=20,
        metadata={
            "help": "Stop the run (non-zero exit) after this many optimizer steps in a row with a NaN/inf loss "
            "or gradient norm; each such step is skipped (weights and optimizer state untouched) and counted."
        },
    )
    logging_nan_inf_filter: bool = field(
        default=False,
        metadata={
            "help": "No effect on the logs: non-finite steps are skipped and counted (nonfinite_steps); the "
            "logged loss is the mean of the applied steps, NaN when there were none."
        },
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={
            "help": "DDP searches the graph for unused parameters every step (TrainingArguments: yes). Every "
            "parameter of the SimMIM models is used in every step, so no; set true for a model that leaves "
            "some out."
        },
    )

    def __post_init__(self) -> None:
        schedule = self.lr_scheduler_type
        schedule = schedule.value if isinstance(schedule, ExplicitEnum) else str(schedule)
        if schedule not in {s.value for s in SimMIMSchedulerType}:
            raise ValueError(
                f"--lr_scheduler_type {schedule!r} is not a SimMIM schedule; choose 'cosine' or 'multistep'."
            )
        # The parent converts lr_scheduler_type to its own enum, which has no "multistep": give it a valid
        # placeholder, then put ours back.
        self.lr_scheduler_type = "cosine"
        super().__post_init__()
        self.lr_scheduler_type = SimMIMSchedulerType(schedule)
        if self.lr_scheduler_type == SimMIMSchedulerType.MULTISTEP and not self.lr_milestones:
            raise ValueError("--lr_scheduler_type multistep needs --lr_milestones (epochs, e.g. 700).")
        if self.lr_milestones and any(m <= 0 for m in self.lr_milestones):
            raise ValueError(f"--lr_milestones must be positive epochs, got {self.lr_milestones}.")
        if self.max_grad_norm < 0:
            raise ValueError(f"--max_grad_norm must be >= 0 (0 turns clipping off), got {self.max_grad_norm}.")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"--layer_decay must lie in (0, 1], got {self.layer_decay}.")
        if self.torch_num_threads is not None and self.torch_num_threads < 1:
            raise ValueError(f"--torch_num_threads must be >= 1, got {self.torch_num_threads}.")
        if self.visualize_steps < 0:
            raise ValueError(f"--visualize_steps must be >= 0, got {self.visualize_steps}.")
        if self.dataloader_persistent_workers and self.dataloader_num_workers == 0:
            # Meaningless without workers, and torch's DataLoader (ours and the Trainer's) refuses the pair: a recipe
            # that keeps its workers alive still runs with --dataloader_num_workers 0.
            self.dataloader_persistent_workers = False
        self._check_training_arguments()

    def _check_training_arguments(self) -> None:
        """Values that cannot train, refused at parse time (before any data or weights are loaded)."""
        positive = {
            "--base_learning_rate": self.base_learning_rate,
            "--lr_gamma": self.lr_gamma,
            "--per_device_train_batch_size": self.per_device_train_batch_size,
            "--per_device_eval_batch_size": self.per_device_eval_batch_size,
            "--gradient_accumulation_steps": self.gradient_accumulation_steps,
            "--max_nonfinite_steps": self.max_nonfinite_steps,
        }
        if self.save_strategy == SaveStrategy.STEPS:
            positive["--save_steps"] = self.save_steps
        if self.eval_strategy == "steps" and self.eval_steps is not None:
            positive["--eval_steps"] = self.eval_steps
        for flag, value in positive.items():
            if not value > 0:
                raise ValueError(f"{flag} must be > 0, got {value}.")
        non_negative = {
            "--warmup_learning_rate": self.warmup_learning_rate,
            "--min_learning_rate": self.min_learning_rate,
            "--warmup_epochs": self.warmup_epochs,
            "--num_train_epochs": self.num_train_epochs,
            "--dataloader_num_workers": self.dataloader_num_workers,
        }
        for flag, value in non_negative.items():
            if value < 0:
                raise ValueError(f"{flag} must be >= 0, got {value}.")
        if any(not keyword.strip() for keyword in self.no_weight_decay_keywords):
            # an empty substring is in every name: it would silently turn weight decay off for the whole model
            raise ValueError(
                f"--no_weight_decay_keywords takes parts of parameter names, got an empty one: "
                f"{self.no_weight_decay_keywords}."
            )
        if self.max_steps < -1:
            raise ValueError(f"--max_steps must be > 0 (or -1: use --num_train_epochs), got {self.max_steps}.")
        if self.do_train and self.max_steps <= 0 and self.num_train_epochs == 0:
            raise ValueError(
                "--num_train_epochs 0 (and no --max_steps) trains 0 steps: give a positive "
                "--num_train_epochs or --max_steps, or --do_train false to only evaluate."
            )

    def resolve_schedule(
        self, total_batch_size: int, num_update_steps_per_epoch: int, num_training_steps: int | None = None
    ) -> SimMIMSchedule:
        """The absolute lrs and step counts of this recipe for a run with `total_batch_size` images per optimizer
        step and `num_update_steps_per_epoch` optimizer steps per epoch. `num_training_steps` defaults to
        `num_train_epochs` epochs (a positive `max_steps` wins, as in the Trainer)."""
        if num_training_steps is None:
            if self.max_steps > 0:
                num_training_steps = self.max_steps
            else:
                num_training_steps = math.ceil(self.num_train_epochs * num_update_steps_per_epoch)

        def scaled(lr: float) -> float:
            return scale_learning_rate(lr, total_batch_size) if self.scale_learning_rate else float(lr)

        if self.warmup_steps > 0:  # TrainingArguments semantics: an int, or a ratio of the run when < 1
            num_warmup_steps = self.get_warmup_steps(num_training_steps)
        else:
            # Official: int(WARMUP_EPOCHS * iterations per epoch).
            num_warmup_steps = int(self.warmup_epochs * num_update_steps_per_epoch)
        if num_warmup_steps >= num_training_steps > 0:
            # Legal, but the peak lr is never reached (e.g. a short --max_steps trial of an epoch-based recipe).
            logger.warning(
                "Warmup (%d steps) is as long as the run (%d steps): the lr never reaches its peak and the cosine "
                "decay never starts. Lower --warmup_epochs (or set --warmup_steps) for a short run.",
                num_warmup_steps,
                num_training_steps,
            )
        milestones: tuple[int, ...] = ()
        if self.lr_scheduler_type == SimMIMSchedulerType.MULTISTEP:
            milestones = tuple(int(m * num_update_steps_per_epoch) for m in self.lr_milestones)
            if num_warmup_steps > min(milestones):
                raise ValueError(
                    f"Warmup ({num_warmup_steps} steps) ends after the first lr milestone ({min(milestones)} steps): "
                    "lower --warmup_epochs or raise --lr_milestones."
                )
        return SimMIMSchedule(
            scheduler_type=SimMIMSchedulerType(self.lr_scheduler_type).value,
            total_batch_size=int(total_batch_size),
            num_update_steps_per_epoch=int(num_update_steps_per_epoch),
            num_training_steps=int(num_training_steps),
            num_warmup_steps=int(num_warmup_steps),
            learning_rate=scaled(self.base_learning_rate),
            warmup_learning_rate=scaled(self.warmup_learning_rate),
            min_learning_rate=scaled(self.min_learning_rate),
            milestones=milestones,
            gamma=float(self.lr_gamma),
        )


@dataclass(frozen=True)
class SimMIMSchedule:
    """A resolved learning-rate schedule: absolute lrs (already scaled) and optimizer-step counts."""

    scheduler_type: str
    total_batch_size: int
    num_update_steps_per_epoch: int
    num_training_steps: int
    num_warmup_steps: int
    learning_rate: float
    warmup_learning_rate: float
    min_learning_rate: float
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------------------------
# Callbacks
class ThroughputCallback(TrainerCallback):
    """Measures training images/s between two logs, excluding the time spent in evaluation and checkpoint saving.

    The trainer feeds it the number of images of each micro-batch (`add_images`) and asks it for the rate when it
    logs (`images_per_second`); the count is multiplied by the number of processes (global throughput).
    """

    def __init__(self, num_processes: int = 1) -> None:
        self.num_processes = num_processes
        self._reset(time.perf_counter())
        self._last_step_end: float | None = None

    def _reset(self, now: float) -> None:
        self._start = now
        self._images = 0
        self._paused = 0.0

    def add_images(self, count: int) -> None:
        self._images += int(count)

    def on_train_begin(self, args, state, control, **kwargs):
        self._reset(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        self._last_step_end = time.perf_counter()

    def _pause_since_step_end(self) -> None:
        if self._last_step_end is not None:
            now = time.perf_counter()
            self._paused += now - self._last_step_end
            self._last_step_end = now

    def on_evaluate(self, args, state, control, **kwargs):
        self._pause_since_step_end()

    def on_save(self, args, state, control, **kwargs):
        self._pause_since_step_end()

    def images_per_second(self) -> float | None:
        """Global images/s since the previous call (None before any image); restarts the measurement."""
        now = time.perf_counter()
        elapsed = now - self._start - self._paused
        images = self._images * self.num_processes
        self._reset(now)
        if images == 0 or elapsed <= 0:
            return None
        return images / elapsed


class SamplerEpochCallback(TrainerCallback):
    """Sets the epoch of the keyed training sampler at the start of every epoch, from the step count.

    The Trainer's own `set_epoch` calls do not reach a sampler wrapped in accelerate's `BatchSamplerShard` once
    `skip_first_batches` has wrapped it again (a multi-process run resumed mid-epoch): without this, that epoch would
    replay the order and augmentations of epoch 0."""

    def __init__(self) -> None:
        self.sampler: KeyedEpochSampler | None = None
        self.num_update_steps_per_epoch: int | None = None

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.sampler is not None and self.num_update_steps_per_epoch:
            self.sampler.set_epoch(state.global_step // self.num_update_steps_per_epoch)


class ReconstructionCallback(TrainerCallback):
    """Saves `reconstructions/step_XXXXX.png` (see `visualization.make_reconstruction_grid`) for a fixed batch with
    fixed masks every `visualize_steps` optimizer steps and at the last step, and sends it to TensorBoard when
    TensorBoard is a reporter. The forward runs on every process (sharded models need all ranks); only the main
    process writes."""

    def __init__(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor,
        output_dir: str,
        visualize_steps: int = 0,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        self.pixel_values = pixel_values
        self.bool_masked_pos = bool_masked_pos
        self.output_dir = os.path.join(output_dir, RECONSTRUCTIONS_DIR)
        self.visualize_steps = visualize_steps
        self.mean, self.std = tuple(mean), tuple(std)
        self.tensorboard = None  # set by SimMIMTrainer when a TensorBoardCallback is present
        self.saved: list[str] = []
        self._last_rendered_step = -1

    def render(self, model: torch.nn.Module, args: TrainingArguments):
        """The grid for the current weights (PIL image)."""
        parameter = next(model.parameters())
        pixel_values = self.pixel_values.to(parameter.device)
        mask = self.bool_masked_pos.to(parameter.device)
        dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        with torch.autocast(device_type=parameter.device.type, dtype=dtype, enabled=dtype is not None):
            reconstruction = reconstruct(model, pixel_values, mask)
        return make_reconstruction_grid(
            self.pixel_values,
            self.bool_masked_pos,
            reconstruction.float().cpu(),
            self.mean,
            self.std,
            max_images=len(self.pixel_values),
        )

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        due = (self.visualize_steps > 0 and step % self.visualize_steps == 0) or step == state.max_steps
        if not due or model is None or step == self._last_rendered_step:
            return
        self._last_rendered_step = step
        grid = self.render(model, args)
        if not state.is_world_process_zero:
            return
        os.makedirs(self.output_dir, exist_ok=True)
        path = os.path.join(self.output_dir, f"step_{step:05d}.png")
        grid.save(path)
        self.saved.append(path)
        logger.info("Saved reconstructions to %s", path)
        writer = getattr(self.tensorboard, "tb_writer", None)
        if writer is not None:
            import numpy as np

            writer.add_image("reconstructions", np.asarray(grid), step, dataformats="HWC")
            writer.flush()


# --------------------------------------------------------------------------------------------------------------------
def check_launch(accelerator: Any) -> None:
    """Fail early when launched processes do not form one run, and say when a launch config's FSDP is not applied.

    On a machine without GPUs, `accelerate launch` / `torchrun` without `--use_cpu` start processes that each train
    alone (accelerate picks no distributed backend), all writing the same output folder; and accelerate applies FSDP
    to GPU processes only: on CPUs an FSDP launch config trains with DDP."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        raise RuntimeError(
            f"{launched} processes were launched (WORLD_SIZE={launched}) but this one trains alone: accelerate found "
            "no GPU backend. On CPUs add --use_cpu true (gloo; FSDP and DeepSpeed launch configs then train with "
            "DDP); with GPUs check that CUDA is visible to every process."
        )
    distributed_type = getattr(accelerator.distributed_type, "value", accelerator.distributed_type)
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and distributed_type != "FSDP":
        logger.warning(
            "The launch config asks for FSDP, but accelerate applies it on GPUs only: these %d %s "
            "processes train with %s (every process holds the whole model).",
            accelerator.num_processes,
            accelerator.device.type,
            distributed_type,
        )


def per_example_reconstruction_loss(
    config: Any, pixel_values: torch.Tensor, reconstruction: torch.Tensor, bool_masked_pos: torch.Tensor
) -> torch.Tensor:
    """The SimMIM loss of each image (B,): `simmim_loss` applied to one image at a time, on the model's target
    (pixels, or locally normalized pixels when `config.norm_target_window` is set). Every image has the same number
    of masked pixels, so their mean equals the batch loss up to the formula's 1e-5."""
    target = pixel_values
    if getattr(config, "norm_target_window", None):
        target = normalize_targets(pixel_values, config.norm_target_window)
    grid = bool_masked_pos.reshape(len(pixel_values), *config.mask_grid_size(tuple(pixel_values.shape[-2:])))
    return torch.stack(
        [
            simmim_loss(target[i : i + 1], reconstruction[i : i + 1], grid[i : i + 1], config.model_patch_size)
            for i in range(len(pixel_values))
        ]
    )


class SimMIMRecipeTrainer(Trainer):
    """`Trainer` with the official SimMIM optimization (the base of `SimMIMTrainer` for pretraining and of the
    finetuning script's classification trainer): AdamW on `param_groups_layer_decay` groups (the official weight-decay
    exclusions of the model's family and stage, plus `--no_weight_decay_keywords`), per-iteration
    warmup + cosine/multistep schedule with linearly scaled lrs, clipping at `max_grad_norm` (pre-clip norm logged).

    Logs, every logging step: `loss` (mean over the applied steps: NaN when all were skipped, never 0 in place of
    NaN), `grad_norm` (pre-clip), `learning_rate` (the highest group lr, i.e. the head's; `learning_rate_min` too under
    layer decay), `images_per_second`, `nonfinite_steps` (skipped updates so far); `num_skipped_images` (distinct
    unreadable images) once images were skipped.

    Reliability (see `step_guard` and `training_checkpoints`): a step with a NaN/inf loss or gradient norm is skipped
    and counted, `max_nonfinite_steps` in a row stop the run; SIGTERM/SIGUSR1 save a checkpoint at the next step
    boundary and stop (`stop_signal` names the signal); checkpoints are written to a staging folder and renamed into
    place; a model with non-finite weights is never saved.

    Training data (map-style datasets): a `KeyedEpochSampler` orders each epoch from (data seed, epoch) only and, with
    `dataloader_drop_last`, keeps a multiple of the global batch (per-device batch x processes x accumulation): the
    examples of optimizer step k are the same for any number of processes. Datasets with `accepts_example_keys`
    (`RobustImageDataset`) receive `ExampleKey`s and key their augmentations and masks by them. Streams
    (`StreamingImageDataset`): each process reads its own part; its position is saved with every checkpoint
    (`stream_state_{rank}.json`) and a resume starts there (`modeling_simmim.streaming`).
    """

    args: SimMIMTrainingArguments

    def __init__(self, *args: Any, model_card_info: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, SimMIMTrainingArguments):
            raise TypeError(f"{type(self).__name__} needs SimMIMTrainingArguments (the official recipe fields).")
        check_launch(self.accelerator)
        if self.args.torch_num_threads is not None:
            torch.set_num_threads(self.args.torch_num_threads)
        self.throughput = ThroughputCallback(num_processes=self.accelerator.num_processes)
        self.add_callback(self.throughput)
        tensorboard = next(
            (cb for cb in self.callback_handler.callbacks if type(cb).__name__ == "TensorBoardCallback"), None
        )
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, ReconstructionCallback):
                callback.tensorboard = tensorboard
        self.sampler_epoch = SamplerEpochCallback()
        self.add_callback(self.sampler_epoch)
        self.model_card_info = dict(model_card_info or {})
        self.step_guard = StepGuardCallback(self.args.max_nonfinite_steps)
        self.add_callback(self.step_guard)
        self.skipped_train_images: set[int] = set()  # dataset indices of unreadable images, each counted once
        self.skipped_eval_images: set[int] = set()
        self.num_anonymous_skips = 0  # unreadable examples without an index (datasets that return None)
        self.last_checkpoint: str | None = None
        self._staging_checkpoint = False
        self.schedule: SimMIMSchedule | None = None
        self._num_update_steps_per_epoch: int | None = None
        self._stream_loader: StreamDataLoader | None = None  # the training loader of a stream, for its position
        self._resume_checkpoint: str | None = None  # set while train() resumes: where the stream position is

    # ---- schedule & optimizer -------------------------------------------------------------------------------------
    def set_initial_training_values(self, args, dataloader):
        values = super().set_initial_training_values(args, dataloader)
        # (num_train_epochs, num_update_steps_per_epoch, ...): epochs of the recipe are counted in these steps.
        self._num_update_steps_per_epoch = values[1]
        self.sampler_epoch.num_update_steps_per_epoch = values[1]
        if not hasattr(dataloader, "__len__"):
            logger.warning("The training data has no length: an 'epoch' of the lr schedule means the whole run.")
        return values

    def resolve_schedule(self, num_training_steps: int | None = None) -> SimMIMSchedule:
        steps_per_epoch = self._num_update_steps_per_epoch
        if steps_per_epoch is None:  # called outside train(): derive it the way the Trainer does
            dataloader = self.get_train_dataloader()
            steps_per_epoch = max(math.ceil(len(dataloader) / self.args.gradient_accumulation_steps), 1)
        return self.args.resolve_schedule(
            self.get_total_train_batch_size(self.args), steps_per_epoch, num_training_steps
        )

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            self.schedule = self.resolve_schedule()
            # Saved arguments should show the lr really used, not TrainingArguments' default.
            self.args.learning_rate = self.schedule.learning_rate
            self.optimizer = create_optimizer(
                opt_model,
                learning_rate=self.schedule.learning_rate,
                weight_decay=self.args.weight_decay,
                layer_decay=self.args.layer_decay,
                betas=(self.args.adam_beta1, self.args.adam_beta2),
                eps=self.args.adam_epsilon,
                extra_no_weight_decay_keywords=self.args.no_weight_decay_keywords,
            )
        return self.optimizer

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> torch.optim.lr_scheduler.LRScheduler:
        if self.lr_scheduler is None:
            optimizer = self.optimizer if optimizer is None else optimizer
            if optimizer is None:
                raise ValueError("create_scheduler needs an optimizer: call create_optimizer first or pass one.")
            self.schedule = self.resolve_schedule(num_training_steps)
            schedule = self.schedule
            self.lr_scheduler = get_simmim_scheduler(
                optimizer,
                base_lr=schedule.learning_rate,
                num_training_steps=schedule.num_training_steps,
                num_warmup_steps=schedule.num_warmup_steps,
                warmup_lr=schedule.warmup_learning_rate,
                min_lr=schedule.min_learning_rate,
                scheduler_type=schedule.scheduler_type,
                milestones=schedule.milestones,
                gamma=schedule.gamma,
            )
            self._created_lr_scheduler = True
            logger.info("SimMIM lr schedule: %s", json.dumps(schedule.to_dict()))
        return self.lr_scheduler

    def _learning_rate_scales(self) -> tuple[float, float] | None:
        """(highest, lowest) group lr relative to group 0's: constant over the run, since every group follows the
        same schedule factor times its own initial lr (`get_simmim_scheduler`). None for another scheduler."""
        base_lrs = getattr(self.lr_scheduler, "base_lrs", None)
        if not base_lrs or not base_lrs[0]:
            return None
        return max(base_lrs) / base_lrs[0], min(base_lrs) / base_lrs[0]

    # ---- training data --------------------------------------------------------------------------------------------
    @property
    def data_seed(self) -> int:
        """Seed of the data order and augmentations: `--data_seed` when given, else `--seed`."""
        return self.args.data_seed if self.args.data_seed is not None else self.args.seed

    def get_train_dataloader(self):
        dataset = self.train_dataset
        if dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        if isinstance(dataset, StreamingImageDataset):
            return self._streaming_train_dataloader(dataset)
        if isinstance(dataset, torch.utils.data.IterableDataset) or not has_length(dataset):
            return super().get_train_dataloader()
        args = self.args
        if args.remove_unused_columns:  # the Trainer's column filtering, with its own order
            logger.warning(
                "--remove_unused_columns true: the training order and augmentations are not keyed by seed "
                "and epoch (keep it false for reproducible, resumable runs)."
            )
            return super().get_train_dataloader()
        sampler = KeyedEpochSampler(
            len(dataset),
            seed=self.data_seed,
            global_batch_size=self.get_total_train_batch_size(args),
            drop_last=args.dataloader_drop_last,
            yield_keys=getattr(dataset, "accepts_example_keys", False),
        )
        self.sampler_epoch.sampler = sampler
        num_workers = args.dataloader_num_workers
        options: dict[str, Any] = {}
        if not getattr(
            args, "dataloader_in_order", True
        ):  # TrainingArguments >= 5.x; out of order is not reproducible
            options["in_order"] = False
        dataloader = torch.utils.data.DataLoader(
            dataset,
            batch_size=self._train_batch_size,
            sampler=sampler,
            drop_last=args.dataloader_drop_last,
            collate_fn=self.data_collator,
            num_workers=num_workers,
            pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers,
            # transformers 5.9.0's TrainingArguments has no such field.
            multiprocessing_context=getattr(args, "dataloader_multiprocessing_context", None),
            prefetch_factor=args.dataloader_prefetch_factor,
            worker_init_fn=partial(seed_worker, num_workers=num_workers, rank=args.process_index),
            # Its own generator (for the workers' base seed): creating an iterator then draws nothing from torch's
            # global RNG, which the model's dropout / drop path use.
            generator=torch.Generator().manual_seed(mix_seed(self.data_seed, "dataloader")),
            **options,
        )
        return self.accelerator.prepare(dataloader)

    def _streaming_train_dataloader(self, dataset: StreamingImageDataset) -> StreamDataLoader:
        # Each process reads its own part of the stream (`for_process`), so the loader is not handed to accelerate,
        # which would either read everything on rank 0 and send batches out, or shard the part again. On resume it
        # starts at the position saved with the checkpoint (see `streaming`), and the Trainer skips nothing itself
        # (`_init_training_state`).
        args = self.args
        if args.dataloader_persistent_workers:
            raise ValueError(
                "--dataloader_persistent_workers keeps each worker's copy of the stream at epoch 0 "
                "(same shuffle and augmentations every epoch): leave it off with --streaming."
            )
        num_workers = args.dataloader_num_workers
        loader = StreamDataLoader(
            dataset.for_process(self.data_seed, args.process_index, args.world_size),
            collate_fn=self.data_collator,
            world_size=args.world_size,
            batch_size=self._train_batch_size,
            drop_last=args.dataloader_drop_last,
            num_workers=num_workers,
            pin_memory=args.dataloader_pin_memory,
            multiprocessing_context=getattr(args, "dataloader_multiprocessing_context", None),  # not in 5.9
            prefetch_factor=args.dataloader_prefetch_factor,
            worker_init_fn=partial(seed_worker, num_workers=num_workers, rank=args.process_index),
            generator=torch.Generator().manual_seed(mix_seed(self.data_seed, "dataloader")),
        )
        if self._resume_checkpoint is not None and not args.ignore_data_skip:
            position = StreamPosition.load(self._resume_checkpoint, args.process_index)
            loader.resume_from(position, self._resume_checkpoint)
            logger.info(
                "Resuming the stream in pass %d after %s batches (per DataLoader worker) of process %d.",
                position.epoch,
                list(position.batches),
                args.process_index,
            )
        self._stream_loader = loader
        return loader

    def _init_training_state(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        epochs_trained, steps_trained_in_current_epoch = super()._init_training_state(*args, **kwargs)
        if self._stream_loader is not None and isinstance(self.train_dataset, StreamingImageDataset):
            # The stream resumes at its saved position: skipping batches counted from the start of the stream (the
            # Trainer's way) would skip them twice. With nothing to skip, the Trainer restores the RNG state at once.
            steps_trained_in_current_epoch = 0
        return epochs_trained, steps_trained_in_current_epoch

    # ---- inputs & logging -----------------------------------------------------------------------------------------
    def _record_skipped(self, inputs, seen: set[int]) -> None:
        skipped = inputs.pop(SKIPPED_KEY, None)
        if skipped is None:
            return
        for index in torch.as_tensor(skipped).reshape(-1).tolist():
            if index < 0:
                self.num_anonymous_skips += 1
            else:
                seen.add(int(index))

    @property
    def num_skipped_images(self) -> int:
        """Distinct unreadable images met by this process (training and evaluation)."""
        return len(self.skipped_train_images) + len(self.skipped_eval_images) + self.num_anonymous_skips

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        self._record_skipped(inputs, self.skipped_eval_images)  # (training batches: in training_step)
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def compute_loss_context_manager(self):
        """The Trainer's loss context plus the CPU bf16 matmul fallback (a no-op except for bf16 on CPUs without
        native bf16 matmul; see `cpu_bf16.fallback_context`)."""
        stack = super().compute_loss_context_manager()
        stack.enter_context(fallback_context(self.model, bf16=self.args.bf16 or self.args.bf16_full_eval))
        return stack

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._record_skipped(inputs, self.skipped_train_images)
        pixel_values = inputs.get("pixel_values")
        if pixel_values is not None:
            self.throughput.add_images(pixel_values.shape[0])
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.step_guard.add_loss(loss)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        # The only place the Trainer hands out each step's (pre-clip) gradient norm: the step guard checks it.
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self.step_guard.set_grad_norm(grad_norm)
        return grad_norm

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any):
        """`Trainer.train`, with SIGTERM/SIGUSR1 recorded (not fatal) while it runs; see `step_guard`."""
        # The training dataloader is built inside; a stream needs to know the checkpoint it resumes from.
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        self._resume_checkpoint = (resume_from_checkpoint or None) if isinstance(resume_from_checkpoint, str) else None
        self.step_guard.reset()
        self.step_guard.install_signal_handlers()
        try:
            return super().train(resume_from_checkpoint, *args, **kwargs)
        finally:
            self.step_guard.uninstall_signal_handlers()
            self._resume_checkpoint = None

    @property
    def stop_signal(self) -> str | None:
        """Name of the signal that stopped the last `train()` early (after saving a checkpoint), else None."""
        return self.step_guard.stop_signal

    def get_eval_dataloader(self, eval_dataset=None):
        return self._evaluation_dataloader(super().get_eval_dataloader, eval_dataset)

    def get_test_dataloader(self, test_dataset):
        return self._evaluation_dataloader(super().get_test_dataloader, test_dataset)

    def _evaluation_dataloader(self, build, dataset):
        # dataloader_drop_last (official for training) also applies to evaluation in the Trainer: it would silently
        # leave out the last images (all of them when there are fewer than a batch). Evaluate on every image.
        drop_last = self.args.dataloader_drop_last
        self.args.dataloader_drop_last = False
        try:
            dataloader = build(dataset)
        finally:
            self.args.dataloader_drop_last = drop_last
        # Each new iterator draws its workers' base seed from the loader's generator, by default torch's global RNG,
        # which the model's dropout / drop path use: how often that happens depends on persistent workers (cached
        # loaders) and on resumes. A generator of its own keeps evaluation out of the training's random stream.
        getattr(dataloader, "base_dataloader", dataloader).generator = torch.Generator().manual_seed(
            mix_seed(self.data_seed, "eval_dataloader")
        )
        return dataloader

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "train_loss" in logs:  # the end-of-training summary: the mean over the applied steps
            logs["train_loss"] = self.step_guard.run_loss()
            logs["nonfinite_steps"] = self.step_guard.nonfinite_steps
        if "loss" in logs:  # a training log (not eval, not the end-of-training summary)
            logs["loss"] = self.step_guard.window_loss()
            logs["nonfinite_steps"] = self.step_guard.nonfinite_steps
            rate = self.throughput.images_per_second()
            if rate is not None:
                logs["images_per_second"] = round(rate, 3)
            scales = self._learning_rate_scales()
            if scales is not None and "learning_rate" in logs:
                # The Trainer logs group 0's lr (of the step just taken); under layer decay that is the most decayed
                # group. Report the highest (the head's, scale 1) and the lowest beside it.
                group0_lr = logs["learning_rate"]
                logs["learning_rate"] = group0_lr * scales[0]
                if self.args.layer_decay != 1.0:
                    logs["learning_rate_min"] = group0_lr * scales[1]
            if self.num_skipped_images:
                logs["num_skipped_images"] = self.num_skipped_images
        super().log(logs, start_time)

    def total_skipped_images(self) -> int:
        """Distinct images skipped at run time over all processes (call it on every process)."""
        if self.accelerator.num_processes == 1:
            return self.num_skipped_images
        from accelerate.utils import gather_object

        parts = gather_object(
            [(sorted(self.skipped_train_images), sorted(self.skipped_eval_images), self.num_anonymous_skips)]
        )
        train = set().union(*(set(part[0]) for part in parts))
        evaluation = set().union(*(set(part[1]) for part in parts))
        return len(train) + len(evaluation) + sum(part[2] for part in parts)

    # ---- checkpoints and saving -----------------------------------------------------------------------------------
    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is written, the Trainer's `checkpoint-N` goes to the staging folder (see _save_checkpoint)
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING_DIR) if self._staging_checkpoint else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        # Only the Trainer's private save writes checkpoint-N (in place): let it write a staging copy, then rename.
        run_dir = self._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, STAGING_DIR)
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        if self.args.should_save:
            shutil.rmtree(staging_root, ignore_errors=True)  # what a killed save left behind
        self.accelerator.wait_for_everyone()
        push_to_hub, self.args.push_to_hub = self.args.push_to_hub, False  # push the published folder, not the staged
        self._staging_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
            if self._stream_loader is not None:  # each process's place in its part of the stream
                self._stream_loader.position().save(staged, self.args.process_index)
        finally:
            self._staging_checkpoint = False
            self.args.push_to_hub = push_to_hub
        if self.state.best_model_checkpoint is not None and os.path.normpath(
            self.state.best_model_checkpoint
        ) == os.path.normpath(staged):
            self.state.best_model_checkpoint = final
        self.accelerator.wait_for_everyone()  # every process has written its part (RNG states, shards)
        if self.args.should_save:
            self.state.save_to_json(os.path.join(staged, "trainer_state.json"))  # with the published best path
            publish_checkpoint(staged, final)
            shutil.rmtree(staging_root, ignore_errors=True)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()
        self.last_checkpoint = final
        if push_to_hub:
            self._push_from_checkpoint(final)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """`Trainer.save_model`, refusing weights with NaN/inf (`NonFiniteWeightsError` naming the tensors)."""
        if self.model is not None:
            check_finite_weights(self.model)
        super().save_model(output_dir, _internal_call)

    # ---- model card ------------------------------------------------------------------------------------------------
    @property
    def run_output_dir(self) -> str:
        """`args.output_dir`, absolute (TrainingArguments always sets it: "trainer_output" by default)."""
        assert self.args.output_dir is not None
        return os.path.abspath(self.args.output_dir)

    def model_card(self, model_name: str) -> str | None:
        """The README.md of the output folder (subclasses: `modeling_simmim.model_card`); None: transformers' card."""
        return None

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        """Write `model_card(model_name)` as README.md into `output_dir` (main process); `push_to_hub` calls this
        before uploading. The card replaces transformers' generic one: the other arguments only reach that one."""
        output_dir = self.run_output_dir
        card = self.model_card(model_name or os.path.basename(output_dir))
        if card is None:
            super().create_model_card(language, license, tags, model_name, *args, **kwargs)
            return
        if self.is_world_process_zero():
            with open(os.path.join(output_dir, "README.md"), "w", encoding="utf-8") as handle:
                handle.write(card)


class SimMIMTrainer(SimMIMRecipeTrainer):
    """`SimMIMRecipeTrainer` for masked image modeling: evaluation reports the reconstruction loss (the mean over
    every evaluation image, gathered across processes), and the model card shows the latest reconstructions."""

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # Evaluation of masked image modeling is its loss. The stock step computes a loss only when the batch holds
        # the model's "label" arguments, and a SimMIM model has none (the mask plays that role): no eval_loss.
        # The loss of each image comes back as the "predictions" (see `evaluation_loop`).
        self._record_skipped(inputs, self.skipped_eval_images)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs = model(**inputs)
        config = self.accelerator.unwrap_model(model).config
        losses = per_example_reconstruction_loss(
            config, inputs["pixel_values"], outputs.reconstruction, inputs["bool_masked_pos"]
        )
        return losses.mean(), losses, None

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ):
        # With several processes, accelerate completes the last evaluation batch of a process with images from the
        # start of the set, and the stock loop averages batch losses, so those images leak into eval_loss. The
        # per-image losses are gathered with the padding dropped: eval_loss is the mean over the evaluation set,
        # the same for any number of processes and any batch size.
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if output.predictions is None:
            return output
        losses = np.asarray(output.predictions, dtype=np.float64).reshape(-1)
        losses = losses[np.isfinite(losses)]
        metrics = dict(output.metrics)
        if losses.size:
            metrics[f"{metric_key_prefix}_loss"] = float(losses.mean())
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=output.num_samples)

    # ---- model card -----------------------------------------------------------------------------------------------
    def latest_reconstruction(self) -> str | None:
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, ReconstructionCallback) and callback.saved:
                return callback.saved[-1]
        return None

    def model_card(self, model_name: str) -> str:
        """Recipe, data, steps, final losses and the latest reconstruction grid (see `model_card.pretraining_card`)."""
        history = [entry for entry in self.state.log_history if "loss" in entry]
        evals = [entry for entry in self.state.log_history if "eval_loss" in entry]
        reconstruction = self.latest_reconstruction()
        return pretraining_card(
            model_name=model_name,
            config=getattr(self.model, "config", None),
            recipe=self.model_card_info.get("recipe", {}),
            data=self.model_card_info.get("data", ""),
            global_step=self.state.global_step,
            epoch=self.state.epoch,
            final_loss=history[-1]["loss"] if history else None,
            eval_loss=evals[-1]["eval_loss"] if evals else None,
            schedule=self.schedule,
            reconstruction=os.path.relpath(reconstruction, self.run_output_dir) if reconstruction else None,
            base_model=self.model_card_info.get("base_model"),
            dataset_id=self.model_card_info.get("dataset_id"),
            nonfinite_steps=self.step_guard.nonfinite_steps,
        )


def top_k_indices(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`preprocess_logits_for_metrics`: keep the ranked top-k class ids (k = `TOP_K`), not (N, num_labels) logits."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.topk(min(TOP_K, logits.shape[-1]), dim=-1).indices


def build_compute_metrics(num_labels: int) -> Callable[[EvalPrediction], dict[str, float]]:
    """`compute_metrics` on `top_k_indices` predictions: top-1 accuracy, and top-5 when there are more than 5 classes
    (with 5 or fewer it is 100% by construction), through `evaluate`, with the metric module shipped in this package
    (no network)."""
    import evaluate

    metric = evaluate.load(TOP_K_METRIC_PATH)
    top_k = [TOP_K] if num_labels > TOP_K else []

    def compute_metrics(eval_prediction: EvalPrediction) -> dict[str, float]:
        ranked = np.asarray(eval_prediction.predictions)
        references = np.asarray(eval_prediction.label_ids)
        results = metric.compute(predictions=ranked.tolist(), references=references.tolist(), top_k=top_k)
        return {
            "accuracy": results["accuracy"],
            **({"top5_accuracy": results[f"top{TOP_K}_accuracy"]} if top_k else {}),
        }

    return compute_metrics


class ImageClassificationTrainer(SimMIMRecipeTrainer):
    """`SimMIMRecipeTrainer` for finetuning a `SimMIMForImageClassification`: evaluation batches are never mixed (their
    own collator, `eval_data_collator`); the final model (`save_model()` into `output_dir`, also on `push_to_hub`) is
    exported as a native transformers classifier with its image processor (a linear probe's head folded first);
    checkpoints stay in the training layout (resumable)."""

    def __init__(self, *args: Any, eval_data_collator: Callable | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator

    def _evaluation_dataloader(self, build, dataset):
        train_collator = self.data_collator
        if self.eval_data_collator is not None:
            self.data_collator = self.eval_data_collator
        try:
            return super()._evaluation_dataloader(build, dataset)
        finally:
            self.data_collator = train_collator

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        target = os.path.abspath(output_dir) if output_dir is not None else self.run_output_dir
        if target != self.run_output_dir:  # a checkpoint: the training layout
            super().save_model(output_dir, _internal_call)
            return
        from .evaluation import finish_linear_probe
        from .export import export_to_transformers

        model = self.model
        assert model is not None
        finish_linear_probe(model)  # a linear probe's head folds into one linear layer (no-op otherwise)
        check_finite_weights(model)  # a diverged model is never exported
        if self.args.should_save:
            export_to_transformers(model, target, self.processing_class)
        self.accelerator.wait_for_everyone()

    def model_card(self, model_name: str) -> str:
        """Accuracy of the exported weights, recipe, data (see `model_card.classifier_card`)."""
        return classifier_card(
            model_name=model_name,
            config=getattr(self.model, "config", None),
            log_history=self.state.log_history,
            recipe=self.model_card_info.get("recipe"),
            data=self.model_card_info.get("data", ""),
            base_model=self.model_card_info.get("base_model"),
            dataset_id=self.model_card_info.get("dataset_id"),
            schedule=self.schedule,
            best_model_checkpoint=self.state.best_model_checkpoint,
            loading_report=self.model_card_info.get("loading_report"),
        )


def check_training_data_size(num_examples: int, args: SimMIMTrainingArguments, drop_last_fixed_by: str = "") -> None:
    """Refuse, before the model is built, a training set too small for one optimizer step: no images, or (with
    `dataloader_drop_last`) fewer than one batch on every process. `drop_last_fixed_by` names what requires full
    batches, when something does (e.g. Mixup), so the message does not suggest turning it off."""
    if num_examples == 0:
        raise ValueError("The training split has no images: check the data arguments (and --max_train_samples).")
    # The keyed sampler keeps whole global batches per epoch (per-device batch x processes x accumulation steps).
    per_step = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    if args.dataloader_drop_last and num_examples < per_step:
        processes = f" x {args.world_size} processes" if args.world_size > 1 else ""
        accumulation = (
            f" x {args.gradient_accumulation_steps} accumulation steps" if args.gradient_accumulation_steps > 1 else ""
        )
        largest = max(num_examples // (args.world_size * args.gradient_accumulation_steps), 1)
        advice = (
            f"lower --per_device_train_batch_size to at most {largest}"
            + (" or run on fewer processes" if args.world_size > 1 else "")
            + (" or accumulate fewer steps" if accumulation else "")
            + ", or add images"
        )
        if not drop_last_fixed_by:
            advice += ", or keep the last incomplete batch with --dataloader_drop_last false"
        else:
            advice += f" ({drop_last_fixed_by} needs full batches)"
        raise ValueError(
            f"Only {num_examples} training images: fewer than one global batch ({args.per_device_train_batch_size} per "
            f"process{processes}{accumulation} = {per_step}), and incomplete batches are dropped, so no optimizer step "
            "would run. "
            f"{advice[0].upper()}{advice[1:]}."
        )


def train_and_evaluate(
    trainer: SimMIMTrainer,
    train_dataset: Any,
    eval_dataset: Any,
    do_train: bool,
    resume_from_checkpoint: str | bool | None = None,
    num_skipped_at_load: int = 0,
    save_model: bool = False,
) -> dict[str, Any]:
    """The scripts' common run: train (resuming if asked; `save_model` saves the final model to the output folder),
    log and save train metrics and the state, then evaluate. Returns every metric; `num_skipped_images` counts the
    unreadable images dropped at load time and met during the run (each once), `nonfinite_steps` the skipped updates.

    A run stopped by SIGTERM/SIGUSR1 saves its checkpoint and exits here with `PREEMPTED_EXIT_CODE` (`SystemExit`):
    no final model, no evaluation; the same command resumes it."""
    results: dict[str, Any] = {}
    if (trainer.args.bf16 or trainer.args.bf16_full_eval) and trainer.args.device.type == "cpu":
        logger.info(describe_cpu_bf16_path())
    if do_train:
        train_result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        if trainer.stop_signal is not None:
            logger.warning(
                "Stopped by %s at step %d after saving %s: run the same command to resume (exit code %d).",
                trainer.stop_signal,
                trainer.state.global_step,
                trainer.last_checkpoint,
                PREEMPTED_EXIT_CODE,
            )
            raise SystemExit(PREEMPTED_EXIT_CODE)
        if trainer.step_guard.nonfinite_steps:
            logger.warning(
                "%d optimizer step(s) had a non-finite loss or gradient norm and were skipped.",
                trainer.step_guard.nonfinite_steps,
            )
        if save_model:
            # No upload here (the Trainer pushes on a public save_model call): the scripts push once, after evaluation,
            # so that the card carries the final metrics.
            trainer.save_model(_internal_call=True)
        metrics = dict(train_result.metrics)
        if has_length(train_dataset):  # a stream has no length
            metrics["train_samples"] = len(train_dataset)
        metrics["num_skipped_images"] = num_skipped_at_load + trainer.total_skipped_images()
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        results.update(metrics)
    if eval_dataset is not None:
        metrics = trainer.evaluate()
        metrics["eval_samples"] = len(eval_dataset)
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)
    return results


__all__ = [
    "check_training_data_size",
    "check_launch",
    "per_example_reconstruction_loss",
    "train_and_evaluate",
    "SimMIMSchedulerType",
    "SimMIMTrainingArguments",
    "SimMIMSchedule",
    "ThroughputCallback",
    "ReconstructionCallback",
    "SamplerEpochCallback",
    "SimMIMRecipeTrainer",
    "SimMIMTrainer",
    "ImageClassificationTrainer",
    "build_compute_metrics",
    "top_k_indices",
    "RECONSTRUCTIONS_DIR",
]
