"""`run_mim.main` with test-only slow-downs and event files, for the tests that kill a real run in a subprocess
(tests/test_preemption.py). Run as `python tests/scripted_run_mim.py <run_mim arguments>` (or under torchrun).

Environment:
    SIMMIM_TEST_EVENTS        folder where each process writes `pid-<rank>` (its pid) at start and `step-<rank>-<N>`
                              after optimizer step N
    SIMMIM_TEST_STEP_SECONDS  sleep this long after each optimizer step (time for a test to send a signal mid-run)
    SIMMIM_TEST_SLOW_SAVE_STEP  N: while writing checkpoint-N, after its weights file is written, write `saving-<N>`
                              and sleep for 10 minutes (a test kills the process during that save)
"""

import os
import sys
import time

import transformers.modeling_utils as modeling_utils
from transformers import TrainerCallback

import run_mim
from modeling_simmim.trainer import SimMIMTrainer

EVENTS = os.environ["SIMMIM_TEST_EVENTS"]
RANK = os.environ.get("RANK", "0")
STEP_SECONDS = float(os.environ.get("SIMMIM_TEST_STEP_SECONDS", "0"))
SLOW_SAVE_STEP = os.environ.get("SIMMIM_TEST_SLOW_SAVE_STEP")


def _touch(name: str, text: str = "") -> None:
    with open(os.path.join(EVENTS, name), "w") as handle:
        handle.write(text)


class _Events(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        _touch(f"step-{RANK}-{state.global_step}")
        time.sleep(STEP_SECONDS)


_write_weights = modeling_utils.safe_save_file


def _slow_weights_writer(tensors, filename, *args, **kwargs):
    _write_weights(tensors, filename, *args, **kwargs)
    if SLOW_SAVE_STEP is not None and f"checkpoint-{SLOW_SAVE_STEP}" in str(filename):
        _touch(f"saving-{SLOW_SAVE_STEP}", str(filename))
        time.sleep(600)


_trainer_init = SimMIMTrainer.__init__


def _trainer_init_with_events(self, *args, **kwargs):
    _trainer_init(self, *args, **kwargs)
    self.add_callback(_Events())


if __name__ == "__main__":
    os.makedirs(EVENTS, exist_ok=True)
    _touch(f"pid-{RANK}", str(os.getpid()))
    modeling_utils.safe_save_file = _slow_weights_writer
    SimMIMTrainer.__init__ = _trainer_init_with_events
    run_mim.main(sys.argv[1:])
