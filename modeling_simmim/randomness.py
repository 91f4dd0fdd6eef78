"""Randomness keyed by (seed, epoch, example index): the same run gives the same model, whatever the number of
processes, DataLoader workers or resumes.

Every random choice of the data path is a function of a key, never of a process's RNG history:

- the training order of an epoch: `KeyedEpochSampler`, a permutation drawn from (seed, epoch) only;
- per example (crop, flip, RandAugment, random erasing, the SimMIM mask): the sampler yields `ExampleKey`s
  (seed, epoch, index) instead of bare indices; the dataset runs its transform inside `seeded_global_rngs`, seeded
  from the key, so third-party transforms (timm, torchvision) that draw from torch's, numpy's and Python's global RNGs
  become keyed without being rewritten; masks come from a `torch.Generator` seeded from the key;
- per micro-batch (Mixup/CutMix lambda, mode and pairing): seeded from the ordered keys of its examples
  (`batch_seed`).

The epoch travels inside each key, from the sampler (main process) to the workers, so persistent workers need no
`set_epoch` of their own dataset copy. Model-internal randomness (dropout, stochastic depth) still uses torch's global
RNG of each process: `seed_everything` before the model is built, the Trainer's checkpointed RNG state after.
"""

from __future__ import annotations

import contextlib
import hashlib
import operator
import random
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch

# Field under which a keyed example carries its key to the collator (Mixup/CutMix seeds a micro-batch from them).
EXAMPLE_KEY_FIELD = "example_key"


def mix_seed(*parts: int | str) -> int:
    """A seed in [0, 2**63) from integers and strings, the same on every platform, process and Python version (BLAKE2b
    of a type-tagged encoding: `mix_seed(1, 23) != mix_seed(12, 3)`, and `mix_seed(1) != mix_seed("1")`)."""
    digest = hashlib.blake2b(digest_size=8, person=b"simmim-hf-seed")
    for part in parts:
        if isinstance(part, str):
            encoded = part.encode("utf-8")
            digest.update(b"s%d:" % len(encoded) + encoded)
        elif isinstance(part, bool):
            raise TypeError("mix_seed takes integers and strings, not bool")
        else:
            digest.update(b"i%d;" % operator.index(part))
    return int.from_bytes(digest.digest(), "little") >> 1


class ExampleKey(NamedTuple):
    """What the training sampler yields for one example: the run's data seed, the epoch and the example's index."""

    seed: int
    epoch: int
    index: int  # type: ignore[assignment]  # shadows tuple.index on purpose: keys are never searched

    def seed_for(self, stream: str) -> int:
        """The seed of one independent stream of this example's randomness ("transform", "mask", ...)."""
        return mix_seed(self.seed, self.epoch, self.index, stream)


def batch_seed(keys: Sequence[ExampleKey], stream: str) -> int:
    """The seed of a micro-batch's randomness: a function of the ordered keys of its examples."""
    parts: list[int | str] = [stream]
    for key in keys:
        parts.extend(key)
    return mix_seed(*parts)


def _generator_seeds(seed: int) -> tuple[int, int, int, int]:
    # One hash for the three generators, each with its own bits so that their streams are unrelated: torch (64 bits),
    # Python (64 bits), numpy's PCG64 state and increment (128 bits each).
    digest = hashlib.blake2b(b"%d" % operator.index(seed), digest_size=48, person=b"simmim-hf-rngs").digest()
    return (
        int.from_bytes(digest[0:8], "little"),
        int.from_bytes(digest[8:16], "little"),
        int.from_bytes(digest[16:32], "little"),
        int.from_bytes(digest[32:48], "little"),
    )


# The PCG64 that numpy's global functions draw from inside `seeded_global_rngs` (one per process; setting its state
# is ~10x cheaper than building a generator, and ~50x cheaper than saving and restoring numpy's legacy state).
# numpy's type stub imports `get_bit_generator` / `set_bit_generator` into `numpy.random` without re-exporting them,
# hence the `type: ignore[attr-defined]` on their uses.
_NUMPY_KEYED = np.random.PCG64(0) if hasattr(np.random, "set_bit_generator") else None  # numpy >= 1.25


def _keyed_numpy_generator(state: int, increment: int) -> np.random.PCG64:
    # A fresh generator when the shared one is already in use (nested blocks), so that the outer block's stream is
    # not reset.
    shared = _NUMPY_KEYED
    if shared is None or np.random.get_bit_generator() is shared:  # type: ignore[attr-defined]  # see _NUMPY_KEYED
        generator = np.random.PCG64(0)
    else:
        generator = shared
    generator.state = {
        "bit_generator": "PCG64",
        "state": {"state": state, "inc": increment | 1},
        "has_uint32": 0,
        "uinteger": 0,
    }
    return generator


@contextlib.contextmanager
def seeded_global_rngs(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator, Python's `random` and numpy's global RNG from `seed` for the block, then restore the
    three streams the caller had.

    Inside, draws are a function of `seed` alone; outside, the caller's RNG streams (e.g. the dropout of a model trained
    in the same process) are unaffected by how many draws the block made. numpy's global functions draw, inside, from a
    seeded PCG64 put in place with `np.random.set_bit_generator`; the caller's generator object is put back untouched
    (only numpy's cached spare Gaussian is dropped). Not thread-safe (global state), like the transforms it wraps;
    DataLoader workers are processes. CUDA generators are not touched.
    """
    torch_seed, python_seed, numpy_state, numpy_increment = _generator_seeds(seed)
    torch_state = torch.default_generator.get_state()
    python_state = random.getstate()
    numpy_outer = (
        np.random.get_bit_generator()  # type: ignore[attr-defined]  # see _NUMPY_KEYED
        if _NUMPY_KEYED is not None
        else np.random.get_state()
    )
    try:
        torch.default_generator.manual_seed(torch_seed)
        random.seed(python_seed)
        if _NUMPY_KEYED is not None:
            np.random.set_bit_generator(  # type: ignore[attr-defined]  # see _NUMPY_KEYED
                _keyed_numpy_generator(numpy_state, numpy_increment)
            )
        else:
            np.random.seed(numpy_state % 2**32)
        yield
    finally:
        torch.default_generator.set_state(torch_state)
        random.setstate(python_state)
        if isinstance(numpy_outer, np.random.BitGenerator):  # the one get_bit_generator returned (numpy >= 1.25)
            np.random.set_bit_generator(numpy_outer)  # type: ignore[attr-defined]  # see _NUMPY_KEYED
        else:
            np.random.set_state(numpy_outer)


def keyed_rngs(key: ExampleKey | None, stream: str = "transform") -> contextlib.AbstractContextManager:
    """`seeded_global_rngs(key.seed_for(stream))`, or a no-op context for unkeyed access (`key` None)."""
    return contextlib.nullcontext() if key is None else seeded_global_rngs(key.seed_for(stream))


class KeyedEpochSampler(torch.utils.data.Sampler):
    """The training order: each epoch a permutation that is a function of (seed, epoch) only.

    With accelerate's batch sharding (each process takes whole per-device batches round-robin, `split_batches=False`),
    the examples of optimizer step k are then entries [k * G, (k + 1) * G) of the permutation, G = per-device batch x
    processes x gradient accumulation, whatever the number of processes. With `drop_last`, an epoch keeps the largest
    multiple of `global_batch_size` so that no process is padded or wrapped around, and every optimizer step is full.

    Args:
        num_examples: size of the dataset.
        seed: the data seed of the run.
        global_batch_size: examples per optimizer step over all processes (only used with `drop_last`).
        drop_last: drop the epoch's tail beyond the last full global batch.
        yield_keys: yield `ExampleKey`s (datasets that key their randomness) or plain indices.

    `set_epoch(epoch)` selects the epoch (the Trainer calls it before each epoch).
    """

    def __init__(
        self,
        num_examples: int,
        seed: int,
        global_batch_size: int = 1,
        drop_last: bool = False,
        yield_keys: bool = True,
    ) -> None:
        if num_examples < 0 or global_batch_size < 1:
            raise ValueError(
                f"num_examples must be >= 0 and global_batch_size >= 1, got {num_examples}, {global_batch_size}."
            )
        self.num_examples = int(num_examples)
        self.seed = int(seed)
        self.global_batch_size = int(global_batch_size)
        self.drop_last = bool(drop_last)
        self.yield_keys = bool(yield_keys)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_examples // self.global_batch_size * self.global_batch_size
        return self.num_examples

    def permutation(self, epoch: int) -> list[int]:
        """The example indices of `epoch`, in training order (tail already dropped)."""
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch, "order"))
        return torch.randperm(self.num_examples, generator=generator)[: len(self)].tolist()

    def __iter__(self) -> Iterator[ExampleKey | int]:
        epoch = self.epoch  # fixed for the whole pass, even if set_epoch is called meanwhile
        for index in self.permutation(epoch):
            yield ExampleKey(self.seed, epoch, index) if self.yield_keys else index


def seed_everything(seed: int, full_determinism: bool = False) -> None:
    """transformers' `set_seed` (or `enable_full_determinism` with `full_determinism`): call it right before the model is
    built, so that its initial weights are a function of the seed (the Trainer seeds again, but only after)."""
    from transformers import enable_full_determinism, set_seed

    if full_determinism:
        enable_full_determinism(seed)
    else:
        set_seed(seed)


__all__ = [
    "EXAMPLE_KEY_FIELD",
    "ExampleKey",
    "KeyedEpochSampler",
    "batch_seed",
    "keyed_rngs",
    "mix_seed",
    "seed_everything",
    "seeded_global_rngs",
]
