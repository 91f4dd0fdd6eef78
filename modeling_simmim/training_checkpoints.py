"""Trainer checkpoints that survive being killed at any moment.

- Writing: `SimMIMTrainer` lets the Trainer write `checkpoint-N` into the staging folder `_checkpoint-staging/` of
  the output folder, then `publish_checkpoint` flushes it to disk and renames it into place. A rename within one
  filesystem is atomic: a `checkpoint-N` folder is either absent or complete, whenever the process dies.
- Resuming: `find_resumable_checkpoint` takes the newest checkpoint that passes `checkpoint_problems` (state that
  parses, weights/optimizer/scheduler files present, non-empty and not truncated) and reports the newer ones it
  skipped and why (folders written in place by other tools, or damaged afterwards).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import zipfile
from dataclasses import dataclass

from transformers.utils import logging

logger = logging.get_logger(__name__)

# Not matched by the Trainer's `checkpoint-*` globs (rotation, `get_last_checkpoint`); "_" also keeps it out of the
# Trainer's Hub uploads of the output folder (ignore pattern "_*").
STAGING_DIR = "_checkpoint-staging"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# What a run itself writes into its output folder before its first complete checkpoint: a folder holding only these
# (and checkpoint folders) belongs to an interrupted run and can be resumed or restarted in place.
RUN_ARTIFACTS = frozenset({STAGING_DIR, "reconstructions", "runs"})

TRAINER_STATE = "trainer_state.json"
# Weights as the Trainer saves them: safetensors (possibly sharded), legacy pickles, FSDP shards, DeepSpeed folders.
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)
_WEIGHT_PREFIXES = ("pytorch_model_fsdp_", "global_step")
_OPTIMIZER_PREFIXES = ("optimizer", "global_step")
_TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def shard_names(index_path: str) -> list[str]:
    """The shard files that a sharded checkpoint's index (`model.safetensors.index.json`, ...) lists, sorted.
    Raises `OSError` or `ValueError` (a JSON error, or no `weight_map`) when the index cannot be used."""
    with open(index_path, encoding="utf-8") as handle:
        weight_map = json.load(handle).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError("no weight_map")
    return sorted(set(weight_map.values()))


@dataclass(frozen=True)
class SkippedCheckpoint:
    """A checkpoint folder that cannot be resumed from, and why."""

    path: str
    reason: str


def checkpoint_step(path: str) -> int | None:
    """N of a `checkpoint-N` folder name, else None."""
    match = CHECKPOINT_RE.match(os.path.basename(os.path.normpath(path)))
    return int(match.group(1)) if match else None


def _safetensors_problem(path: str) -> str | None:
    # A safetensors file is an 8-byte header length, a JSON header, then the tensor bytes the header accounts for:
    # a truncated file is shorter than that.
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as handle:
            (header_length,) = struct.unpack("<Q", handle.read(8))
            if header_length > size:
                return "truncated"
            header = json.loads(handle.read(header_length))
    except (OSError, struct.error, ValueError) as error:
        return f"unreadable header ({type(error).__name__})"
    data_end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    return None if size >= 8 + header_length + data_end else "truncated"


def _file_problem(path: str) -> str | None:
    if os.path.getsize(path) == 0:
        return "empty (0 bytes)"
    if path.endswith(".safetensors"):
        return _safetensors_problem(path)
    if path.endswith(_TORCH_SUFFIXES) and not zipfile.is_zipfile(path):
        return "truncated (not a complete torch.save archive)"
    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as handle:
                json.load(handle)
        except (OSError, ValueError) as error:
            return f"not valid JSON ({type(error).__name__})"
    return None


def _missing_shards(folder: str, names: set[str], problems: list[str]) -> list[str]:
    """Shards that a (readable) weight index of `folder` lists but that are absent."""
    missing = []
    for index in sorted(names & {"model.safetensors.index.json", "pytorch_model.bin.index.json"}):
        if any(problem.startswith(index) for problem in problems):
            continue
        try:
            shards = shard_names(os.path.join(folder, index))
        except (OSError, ValueError) as error:
            missing.append(f"{index} is unreadable ({error})")
            continue
        missing.extend(f"no {shard} (listed in {index})" for shard in shards if shard not in names)
    return missing


def checkpoint_problems(folder: str, require_optimizer: bool = True) -> list[str]:
    """Why `folder` cannot be resumed from; an empty list means it is complete.

    Complete: `trainer_state.json` parses and has a `global_step`; model weights are present; with
    `require_optimizer` (every run that does not set `save_only_model`), so are the optimizer and scheduler states;
    and no file is empty, truncated (safetensors sizes, torch.save archives) or invalid JSON."""
    if not os.path.isdir(folder):
        return ["not a folder"]
    names = set(os.listdir(folder))
    if not names:
        return ["empty folder"]
    problems = []
    for directory, _, files in os.walk(folder):
        for name in sorted(files):
            path = os.path.join(directory, name)
            problem = _file_problem(path)
            if problem:
                problems.append(f"{os.path.relpath(path, folder)} is {problem}")
    if TRAINER_STATE not in names:
        problems.append(f"no {TRAINER_STATE}")
    elif not any(problem.startswith(TRAINER_STATE) for problem in problems):
        with open(os.path.join(folder, TRAINER_STATE), encoding="utf-8") as handle:
            if "global_step" not in json.load(handle):
                problems.append(f"{TRAINER_STATE} has no global_step")
    if not names & set(_WEIGHT_FILES) and not any(name.startswith(_WEIGHT_PREFIXES) for name in names):
        problems.append("no model weights (model.safetensors)")
    problems.extend(_missing_shards(folder, names, problems))
    if require_optimizer:
        if not any(name.startswith(_OPTIMIZER_PREFIXES) for name in names):
            problems.append("no optimizer state (optimizer.pt)")
        if "scheduler.pt" not in names and not any(name.startswith("global_step") for name in names):
            problems.append("no scheduler state (scheduler.pt)")
    return problems


def list_checkpoints(output_dir: str) -> list[str]:
    """The `checkpoint-N` folders of `output_dir`, newest (highest N) first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(checkpoint_step(name), os.path.join(output_dir, name)) for name in os.listdir(output_dir)]
    return [
        path
        for step, path in sorted((item for item in found if item[0] is not None), reverse=True)
        if os.path.isdir(path)
    ]


def find_resumable_checkpoint(
    output_dir: str, require_optimizer: bool = True
) -> tuple[str | None, list[SkippedCheckpoint]]:
    """(the newest complete checkpoint of `output_dir` or None, the newer incomplete ones that were skipped)."""
    skipped: list[SkippedCheckpoint] = []
    for path in list_checkpoints(output_dir):
        problems = checkpoint_problems(path, require_optimizer)
        if not problems:
            return path, skipped
        skipped.append(SkippedCheckpoint(path, "; ".join(problems)))
    return None, skipped


def holds_only_run_artifacts(output_dir: str) -> bool:
    """True when `output_dir` contains nothing but what an interrupted run writes (checkpoints, staging folder,
    reconstructions, logs): it can be resumed or restarted in place without clobbering someone's files."""
    return all(name in RUN_ARTIFACTS or checkpoint_step(name) is not None for name in os.listdir(output_dir))


def _fsync(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError:  # some filesystems (and directories on some platforms) do not support it
        pass
    finally:
        os.close(descriptor)


def publish_checkpoint(staged: str, final: str) -> None:
    """Flush every file of `staged` to disk, then rename it to `final` (atomic on one filesystem). An existing
    `final` (the same step saved again, or an incomplete folder left by an older writer) is replaced."""
    for directory, _, files in os.walk(staged):
        for name in files:
            _fsync(os.path.join(directory, name))
        _fsync(directory)
    replaced = None
    if os.path.lexists(final):
        replaced = os.path.join(os.path.dirname(staged), f"replaced-{os.path.basename(final)}")
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
    os.rename(staged, final)
    _fsync(os.path.dirname(os.path.abspath(final)))
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)


__all__ = [
    "STAGING_DIR",
    "RUN_ARTIFACTS",
    "SkippedCheckpoint",
    "checkpoint_step",
    "checkpoint_problems",
    "list_checkpoints",
    "find_resumable_checkpoint",
    "holds_only_run_artifacts",
    "publish_checkpoint",
    "shard_names",
]
