"""Test helper: run a training script and SIGKILL its process at the end of optimizer step STEP, after the optimizer
update and before that step's logging, evaluation and checkpoint (the worst moment: work done, nothing saved).

    python tests/kill_at_step.py STEP SCRIPT.py [script arguments ...]

`install(step)` does the same inside an already running interpreter (e.g. a forked test process).
"""

from __future__ import annotations

import os
import runpy
import signal
import sys

from transformers import TrainerCallback


class KillAtStep(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def install(step: int) -> None:
    """Every trainer of this package (`SimMIMRecipeTrainer` and its subclasses) created from now on in this process gets
    a `KillAtStep(step)` callback."""
    from modeling_simmim import trainer

    original = trainer.SimMIMRecipeTrainer.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.add_callback(KillAtStep(step))

    trainer.SimMIMRecipeTrainer.__init__ = __init__


if __name__ == "__main__":
    step, script, *script_args = sys.argv[1:]
    install(int(step))
    sys.argv = [script, *script_args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
