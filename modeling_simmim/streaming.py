"""Exact resume of a streamed training run: the position of each process in its part of the stream, saved with every
checkpoint and fast-forwarded to on resume.

A stream has no index to skip to, and the Trainer's own resume skips batches counted from the start of the stream
(wrong once a process has passed the end of its part). Here each process records, per DataLoader worker, how many
batches of the current pass (stream epoch) it has trained on, and which worker gave the last one
(`StreamPosition`, written as `stream_state_{process}.json` into the checkpoint). On resume every worker skips the
rows of the batches it already gave, without decoding them (rows are still read), and the DataLoader yields the
remaining batches in the order of the uninterrupted run:

A DataLoader over an iterable dataset takes batches from its workers in turn (worker 0, 1, ..., W-1, 0, ...,
leaving out workers that have run out), so batch r of worker w comes in position (r, w) in lexicographic order. A run
stopped after batch (r, w*) resumes with the workers w <= w* one batch ahead of the others; for the turn order to
start at worker w* + 1, as the uninterrupted run would, those workers first give one filler batch (`StreamFiller`
examples) that the loader drops. Everything else about the order (shards per worker, shuffle buffers) is the
stream's own and is replayed from its start, so the resumed batches, their crops and masks (keyed by seed, epoch
and example name) are those of the uninterrupted run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Generator, Iterator
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch

STREAM_STATE_FILE = "stream_state_{process_index}.json"
STREAM_WORKER_KEY = "stream_worker"  # the DataLoader worker that made a batch (popped before the Trainer sees it)
_FILLER_KEY = "stream_filler"


class StreamFiller(NamedTuple):
    """A placeholder example a resumed worker yields before its first real batch (see the module docstring)."""

    worker: int


@dataclass(frozen=True)
class StreamPosition:
    """Where a process stands in its part of the stream: in pass `epoch`, `batches[w]` batches trained on from
    DataLoader worker w (one entry, worker 0, without workers), the last one from worker `last_worker` (-1: none yet
    in this pass). `batch_size`, `num_workers` and `world_size` tell which runs can resume from it."""

    epoch: int
    batches: tuple[int, ...]
    last_worker: int
    batch_size: int
    num_workers: int
    world_size: int

    def save(self, checkpoint: str, process_index: int) -> str:
        path = os.path.join(checkpoint, STREAM_STATE_FILE.format(process_index=process_index))
        os.makedirs(checkpoint, exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            json.dump({**asdict(self), "batches": list(self.batches)}, handle)
        return path

    @classmethod
    def load(cls, checkpoint: str, process_index: int) -> StreamPosition:
        path = os.path.join(checkpoint, STREAM_STATE_FILE.format(process_index=process_index))
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{checkpoint} has no stream position for process {process_index} ({os.path.basename(path)}): it was "
                "not saved by a --streaming run on this number of processes. Resume with the launch that saved it, "
                "or pass --ignore_data_skip true to restart the stream from its beginning."
            )
        with open(path, encoding="utf-8") as handle:
            fields = json.load(handle)
        return cls(**{**fields, "batches": tuple(int(count) for count in fields["batches"])})

    def check_resumable(self, batch_size: int, num_workers: int, world_size: int, checkpoint: str) -> None:
        """A position maps onto a run's rows only for the same batch size, workers and processes: else raise,
        naming the flags that restore them."""
        saved = (self.batch_size, self.num_workers, self.world_size)
        if saved != (batch_size, num_workers, world_size):
            raise ValueError(
                f"{checkpoint} saved the stream position of {self.world_size} process(es) x {self.num_workers} "
                f"DataLoader worker(s) x batches of {self.batch_size}; this run has {world_size} x {num_workers} x "
                f"{batch_size}. A stream's position is per worker: resume with --dataloader_num_workers "
                f"{self.num_workers} --per_device_train_batch_size {self.batch_size} on {self.world_size} "
                "process(es), or pass --ignore_data_skip true to restart the stream from its beginning."
            )

    def rows_to_skip(self) -> dict[int, int]:
        """Rows of the stream each worker has already given (per worker id)."""
        return {worker: count * self.batch_size for worker, count in enumerate(self.batches)}

    def filler_workers(self) -> tuple[int, ...]:
        """Workers that give a filler batch first (none without workers: a single reader has no turn order)."""
        return tuple(range(self.last_worker + 1)) if self.num_workers > 0 else ()


class _TaggingCollator:
    """Runs in the worker: collates, and tags the batch with the worker's id (a filler batch with a marker)."""

    def __init__(self, collator: Callable[[list[Any]], dict[str, Any]]) -> None:
        self.collator = collator

    def __call__(self, examples: list[Any]) -> dict[str, Any]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        if any(isinstance(example, StreamFiller) for example in examples):
            return {_FILLER_KEY: True, STREAM_WORKER_KEY: worker}
        batch = self.collator(examples)
        batch[STREAM_WORKER_KEY] = worker
        return batch


class StreamDataLoader(torch.utils.data.DataLoader):
    """The training DataLoader of a stream (`data.StreamingImageDataset`): counts, per worker, the batches it hands
    out, so that `position()` can be saved with a checkpoint, and starts from a saved position (`resume_from`).

    One iteration is one pass over the process's part of the stream. The Trainer numbers passes from 0 at every
    `train()` call (`set_epoch`); a resumed loader adds the pass it resumed in."""

    def __init__(
        self, dataset: Any, collate_fn: Callable[[list[Any]], dict[str, Any]], world_size: int = 1, **kwargs: Any
    ) -> None:
        super().__init__(dataset, collate_fn=_TaggingCollator(collate_fn), **kwargs)
        self.world_size = int(world_size)
        self.epoch = 0
        self._first_epoch = 0
        self._resume: StreamPosition | None = None
        self._batches = [0] * max(self.num_workers, 1)
        self._last_worker = -1

    @property
    def _batch_size(self) -> int:
        if self.batch_size is None:
            raise ValueError("StreamDataLoader batches the stream itself: give batch_size.")
        return int(self.batch_size)

    def resume_from(self, position: StreamPosition, checkpoint: str = "the checkpoint") -> None:
        """Start the next pass where `position` stands (raises when this loader cannot, see `check_resumable`)."""
        position.check_resumable(self._batch_size, self.num_workers, self.world_size, checkpoint)
        self._resume = position
        self._first_epoch = self.epoch = position.epoch

    def set_epoch(self, epoch: int) -> None:
        epoch = self._first_epoch + int(epoch)
        if epoch != self.epoch:  # a new pass: nothing of it trained on yet
            self._batches, self._last_worker = [0] * max(self.num_workers, 1), -1
        self.epoch = epoch

    def position(self) -> StreamPosition:
        return StreamPosition(
            self.epoch, tuple(self._batches), self._last_worker, self._batch_size, self.num_workers, self.world_size
        )

    # A generator over DataLoader's own iterator (the stub types __iter__ as returning the iterator class).
    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        resume = self._resume if self._resume is not None and self._resume.epoch == self.epoch else None
        self._resume = None
        yielded = yield from self._pass(resume)
        if resume is not None and not yielded:
            # Saved at the very end of its pass: go on with the next pass in this iteration, since the Trainer ends
            # training at a pass without batches. Its later passes shift by one.
            self._first_epoch += 1
            self.epoch += 1
            yield from self._pass(None)

    def _pass(self, resume: StreamPosition | None) -> Generator[dict[str, Any], None, bool]:
        """The batches of pass `self.epoch` (from `resume` when given); returns whether it gave any."""
        stream: Any = self.dataset  # a data.StreamingImageDataset
        stream.set_epoch(self.epoch)
        if resume is not None:
            stream.start_at(resume.rows_to_skip(), resume.filler_workers(), self._batch_size)
            self._batches, self._last_worker = list(resume.batches), resume.last_worker
        else:
            stream.start_at({}, (), 0)
            self._batches, self._last_worker = [0] * max(self.num_workers, 1), -1
        yielded = False
        for batch in super().__iter__():
            worker = int(batch.pop(STREAM_WORKER_KEY))
            if batch.pop(_FILLER_KEY, False):
                continue
            self._batches[worker] += 1
            self._last_worker = worker
            yielded = True
            yield batch
        return yielded


__all__ = ["STREAM_STATE_FILE", "STREAM_WORKER_KEY", "StreamFiller", "StreamPosition", "StreamDataLoader"]
