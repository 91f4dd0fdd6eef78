"""What happens at each optimizer-step boundary so that a run never dies late, never learns from NaN, and stops
cleanly when a scheduler asks it to.

- Non-finite steps: when the loss or the gradient norm of a step is NaN/inf, the update is skipped (the gradients
  are dropped before `optimizer.step()`, so AdamW leaves weights AND its moments and step count untouched), the step
  is counted (`nonfinite_steps` in the logs) and named in a warning; after `max_nonfinite_steps` such steps in a row
  `NonFiniteTrainingError` stops the run, naming the step, lr, loss and gradient norm.
- Stop signals: SIGTERM and SIGUSR1 (what SLURM and cloud schedulers send before killing a job) are recorded
  instead of killing the process; at the next optimizer-step boundary the trainer saves a checkpoint and stops, and
  the scripts exit with `PREEMPTED_EXIT_CODE`.
- With several processes, both decisions are reduced over all of them in one small all-reduce per optimizer step, so
  every rank skips the same steps and stops at the same step.
"""

from __future__ import annotations

import math
import signal
import threading
from collections.abc import Iterable
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.utils import logging

logger = logging.get_logger(__name__)

# 128 + SIGTERM: what a shell reports for a process ended by SIGTERM, which schedulers (SLURM, Kubernetes) already read
# as "terminated on request", not as a crash. Used for SIGUSR1 too, so one code means "checkpoint saved, relaunch".
PREEMPTED_EXIT_CODE = 143
STOP_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)


class NonFiniteTrainingError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient norm."""


class NonFiniteWeightsError(RuntimeError):
    """Refusal to save a model whose weights hold NaN or inf."""


def nonfinite_tensor_names(named_tensors: Iterable[tuple[str, torch.Tensor]], limit: int = 5) -> list[str]:
    """Names of the floating-point tensors that hold NaN or inf (at most `limit`)."""
    names = []
    for name, tensor in named_tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor.detach()).all()):
            names.append(name)
            if len(names) == limit:
                break
    return names


def check_finite_weights(model: torch.nn.Module) -> None:
    """Raise `NonFiniteWeightsError` naming the parameters/buffers of `model` that hold NaN or inf."""
    bad = nonfinite_tensor_names([*model.named_parameters(), *model.named_buffers()])
    if bad:
        raise NonFiniteWeightsError(
            f"Not saving a model with non-finite weights (NaN/inf in {', '.join(bad)}): training diverged. Lower "
            "--base_learning_rate, lengthen the warmup (--warmup_epochs), or check the data."
        )


class StopSignalHandler:
    """Records SIGTERM/SIGUSR1 instead of letting them end the process (`install` / `uninstall`; main thread only)."""

    def __init__(self, signals: Iterable[signal.Signals] = STOP_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        # Only set a flag: logging or saving here could re-enter code the signal interrupted.
        if self.received is None:
            self.received = signal.Signals(signum)

    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            logger.warning("Not in the main thread: SIGTERM/SIGUSR1 will end the run without a checkpoint.")
            return False
        self.received = None
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return True

    def uninstall(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()


def _is_finite(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all())
    return math.isfinite(float(value))


class StepGuardCallback(TrainerCallback):
    """The per-step policy above. The trainer feeds it each micro-batch loss (`add_loss`) and each step's gradient
    norm (`set_grad_norm`); it decides in `on_pre_optimizer_step` (skip the update or not) and acts on stop signals
    in `on_step_end` (save, stop). It also keeps the mean loss of the applied steps, which the trainer logs in place
    of the Trainer's own average (that one treats a NaN step as 0 or as the previous average)."""

    def __init__(self, max_nonfinite_steps: int = 20, handle_signals: bool = True) -> None:
        if max_nonfinite_steps < 1:
            raise ValueError(f"--max_nonfinite_steps must be >= 1, got {max_nonfinite_steps}.")
        self.max_nonfinite_steps = max_nonfinite_steps
        self.signals = StopSignalHandler() if handle_signals else None
        self.stop_signal: str | None = None  # name of the signal that stopped the run (any process)
        self.nonfinite_steps = 0
        self.consecutive_nonfinite_steps = 0
        self._step_loss: torch.Tensor | None = None
        self._grad_norm: Any = None
        self._window_loss = 0.0
        self._window_steps = 0
        self._run_loss = 0.0
        self._run_steps = 0

    # ---- inputs from the trainer ---------------------------------------------------------------------------------
    def add_loss(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float().reshape(())
        self._step_loss = loss if self._step_loss is None else self._step_loss + loss

    def set_grad_norm(self, grad_norm: Any) -> None:
        self._grad_norm = grad_norm

    # ---- signals -------------------------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        self.stop_signal = None
        if self.signals is not None:
            self.signals.install()

    def uninstall_signal_handlers(self) -> None:
        if self.signals is not None:
            self.signals.uninstall()

    # ---- the decision at each optimizer step ---------------------------------------------------------------------
    def _reduced_flags(self, device: torch.device) -> tuple[bool, bool, float]:
        """(some process saw a non-finite loss or gradient norm, some process received a stop signal, the step's loss
        averaged over processes). One host sync, on a 4-number tensor."""
        loss = self._step_loss.to(device) if self._step_loss is not None else torch.zeros((), device=device)
        grad_norm = self._grad_norm
        if isinstance(grad_norm, torch.Tensor):
            grad_flag = (~torch.isfinite(grad_norm.detach().float().to(device))).any().float()
        else:
            grad_flag = torch.tensor(float(not _is_finite(grad_norm)), device=device)
        received = self.signals is not None and self.signals.received is not None
        flags = torch.stack(
            [grad_flag, (~torch.isfinite(loss)).float(), torch.tensor(float(received), device=device), loss]
        )
        world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        if world_size > 1:
            torch.distributed.all_reduce(flags)  # sums: a flag > 0 means "on some process"
        grad_flag, loss_flag, signal_flag, loss_sum = flags.tolist()
        return grad_flag > 0 or loss_flag > 0, signal_flag > 0, loss_sum / world_size

    def on_pre_optimizer_step(self, args, state, control, model=None, lr_scheduler=None, **kwargs):
        device = args.device if args is not None else torch.device("cpu")
        nonfinite, stop, loss = self._reduced_flags(device)
        grad_norm = self._grad_norm
        self._step_loss, self._grad_norm = None, None
        if stop and self.stop_signal is None:
            received = self.signals.received if self.signals is not None else None
            self.stop_signal = received.name if received is not None else "a stop signal (another process)"
        if not nonfinite:
            self.consecutive_nonfinite_steps = 0
            self._window_loss += loss
            self._window_steps += 1
            self._run_loss += loss
            self._run_steps += 1
            return
        if model is not None:
            for parameter in model.parameters():
                parameter.grad = None  # optimizer.step() then leaves weights and optimizer state as they are
        self.nonfinite_steps += 1
        self.consecutive_nonfinite_steps += 1
        step = state.global_step + 1
        lr = max(lr_scheduler.get_last_lr()) if lr_scheduler is not None else float("nan")
        norm = float(grad_norm) if grad_norm is not None else float("nan")
        details = f"step {step}, lr {lr:.4g}, loss {loss:.4g}, grad norm {norm:.4g}"
        logger.warning(
            "Non-finite loss or gradient norm at %s: update skipped (weights and optimizer state "
            "unchanged), %d in a row, %d in this run.",
            details,
            self.consecutive_nonfinite_steps,
            self.nonfinite_steps,
        )
        if self.consecutive_nonfinite_steps >= self.max_nonfinite_steps:
            raise NonFiniteTrainingError(
                f"Training diverged: {self.consecutive_nonfinite_steps} optimizer steps in a row had a non-finite loss "
                f"or gradient norm (--max_nonfinite_steps {self.max_nonfinite_steps}); the last one: {details}. "
                f"The weights are those of step {step - self.consecutive_nonfinite_steps}. Lower --base_learning_rate, "
                "lengthen the warmup (--warmup_epochs), keep gradient clipping (--max_grad_norm), or look for NaN/inf "
                "in the data."
            )

    def on_step_end(self, args, state, control, **kwargs):
        if self.stop_signal is not None:
            control.should_save = True
            control.should_training_stop = True
            control.should_evaluate = False
            control.should_log = True

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stop_signal is not None:  # saved at the step already; the epoch-end save or evaluation would be late
            control.should_save = False
            control.should_evaluate = False

    # ---- what the trainer logs -----------------------------------------------------------------------------------
    def window_loss(self) -> float:
        """Mean loss of the applied steps since the previous call (NaN when every step was skipped); restarts."""
        loss = self._window_loss / self._window_steps if self._window_steps else float("nan")
        self._window_loss, self._window_steps = 0.0, 0
        return loss

    def run_loss(self) -> float:
        """Mean loss of the applied steps of this `train()` call (NaN when there were none)."""
        return self._run_loss / self._run_steps if self._run_steps else float("nan")

    def reset(self) -> None:
        self.nonfinite_steps = self.consecutive_nonfinite_steps = 0
        self._step_loss, self._grad_norm = None, None
        self._window_loss, self._window_steps, self._run_loss, self._run_steps = 0.0, 0, 0.0, 0


__all__ = [
    "PREEMPTED_EXIT_CODE",
    "STOP_SIGNALS",
    "NonFiniteTrainingError",
    "NonFiniteWeightsError",
    "StopSignalHandler",
    "StepGuardCallback",
    "check_finite_weights",
    "nonfinite_tensor_names",
]
