"""Runs `run_mim.py` or `run_image_classification.py` inside a launched process (accelerate launch, torchrun) and
records what tests/test_distributed.py checks about that process: its rank and world size, how the Trainer wrapped
the model, and every file it opened, created, copied or renamed for writing (Python's audit events, plus the paths
given to `torch.save` and safetensors' `save_file`), and the examples a streamed training set hands out.

    accelerate launch ... tests/launch_probe.py run_mim.py [flags]     (SIMMIM_PROBE_DIR=folder for the records)

Writes `rank{RANK}.json` into $SIMMIM_PROBE_DIR when the script returns.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _as_path(value) -> str | None:
    if isinstance(value, (str, bytes, os.PathLike)):
        return os.path.abspath(os.fsdecode(value))
    return None


def _written_path(event: str, args: tuple) -> str | None:
    if event == "open":  # (path, mode, flags): builtins.open gives a mode string, os.open flags
        path, mode, flags = args
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & _WRITE_FLAGS)
        return _as_path(path) if writes else None
    if event in ("os.mkdir", "os.remove", "os.rmdir", "os.truncate"):
        return _as_path(args[0])
    if event in ("os.rename", "shutil.copyfile", "shutil.copytree", "shutil.move"):
        return _as_path(args[1])
    return None


def _record_streamed_examples(record_dir: str) -> None:
    """Every example a stream hands out (in DataLoader workers too): one line "epoch<TAB>example id" in
    `stream_rank{RANK}_pid{PID}.txt`."""
    from modeling_simmim.data import StreamingImageDataset

    example_id = StreamingImageDataset.example_id
    os.makedirs(record_dir, exist_ok=True)

    def recording_example_id(self, row):
        name = example_id(self, row)
        path = os.path.join(record_dir, f"stream_rank{os.environ.get('RANK', '0')}_pid{os.getpid()}.txt")
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(f"{self.epoch}\t{name}\n")
        return name

    StreamingImageDataset.example_id = recording_example_id


def main() -> None:
    script, argv = sys.argv[1], sys.argv[2:]
    record_dir = os.environ["SIMMIM_PROBE_DIR"]
    written: list[str] = []

    def audit(event: str, args: tuple) -> None:
        path = _written_path(event, args)
        if path is not None:
            written.append(path)

    # torch.save and safetensors write through native code, which raises no audit event: record their paths.
    # Patched before the scripts import transformers, which binds safetensors' save_file by name.
    import safetensors.torch
    import torch

    def recording(save, path_position):
        def wrapper(*args, **kwargs):
            path = _as_path(args[path_position] if len(args) > path_position else None)
            if path is not None:
                written.append(path)
            return save(*args, **kwargs)

        return wrapper

    torch.save = recording(torch.save, 1)
    safetensors.torch.save_file = recording(safetensors.torch.save_file, 1)

    sys.path.insert(0, ROOT)
    module = importlib.import_module(os.path.splitext(os.path.basename(script))[0])
    from modeling_simmim.trainer import SimMIMRecipeTrainer

    record: dict = {}
    train = SimMIMRecipeTrainer.train  # both scripts' trainers

    def recording_train(self, *args, **kwargs):
        result = train(self, *args, **kwargs)
        from torch.distributed.fsdp import FSDPModule

        record.update(
            distributed_type=self.accelerator.distributed_type.value,
            num_processes=self.accelerator.num_processes,
            wrapper=type(self.model_wrapped).__name__,
            fsdp2=isinstance(self.model, FSDPModule) or isinstance(self.model_wrapped, FSDPModule),
            total_train_batch_size=self.get_total_train_batch_size(self.args),
        )
        return result

    SimMIMRecipeTrainer.train = recording_train
    _record_streamed_examples(record_dir)
    sys.addaudithook(audit)
    module.main(argv)
    rank = int(os.environ.get("RANK", "0"))
    record.update(rank=rank, world_size=int(os.environ.get("WORLD_SIZE", "1")), written=sorted(set(written)))
    os.makedirs(record_dir, exist_ok=True)
    with open(os.path.join(record_dir, f"rank{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump(record, handle)


if __name__ == "__main__":
    main()
