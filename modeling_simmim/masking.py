"""SimMIM random block masking and the data collator that draws a whole batch of masks at once."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers.utils import logging

from .configuration_simmim import size_pair

logger = logging.get_logger(__name__)


class SimMIMMaskGenerator:
    """Official SimMIM masking: exactly `ceil(mask_ratio * n)` of the `n` mask patches (`mask_patch_size` pixels
    square) are masked, uniformly at random without replacement, then the mask is upsampled (nearest) to the
    model-patch grid.

    Args:
        input_size: image size in pixels, int or (height, width).
        mask_patch_size: side of a masked block in pixels (32 in the paper).
        model_patch_size: side of the encoder's patches in pixels (4 for Swin, 16 for ViT).
        mask_ratio: fraction of blocks to mask (0.6 in the paper).

    Calling it returns a bool tensor (batch_size, H / model_patch_size, W / model_patch_size), True = masked.
    """

    def __init__(
        self,
        input_size: int | Sequence[int] = 192,
        mask_patch_size: int = 32,
        model_patch_size: int = 4,
        mask_ratio: float = 0.6,
    ) -> None:
        height, width = size_pair(input_size)
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in (0, 1), got {mask_ratio}.")
        if mask_patch_size <= 0 or mask_patch_size % model_patch_size != 0:
            raise ValueError(
                f"mask_patch_size ({mask_patch_size}) must be a positive multiple of the model patch size "
                f"({model_patch_size})."
            )
        if height % mask_patch_size != 0 or width % mask_patch_size != 0:
            raise ValueError(f"Image size {height}x{width} is not divisible by mask_patch_size ({mask_patch_size}).")
        self.input_size = (height, width)
        self.mask_patch_size = mask_patch_size
        self.model_patch_size = model_patch_size
        self.mask_ratio = mask_ratio
        self.grid = (height // mask_patch_size, width // mask_patch_size)
        self.scale = mask_patch_size // model_patch_size
        self.num_mask_patches = self.grid[0] * self.grid[1]
        self.num_masked = int(math.ceil(self.num_mask_patches * mask_ratio))

    @property
    def model_grid(self) -> tuple[int, int]:
        return self.grid[0] * self.scale, self.grid[1] * self.scale

    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        # One vectorized draw for the whole batch: the ranks of uniform noise give a uniformly random subset of
        # exactly `num_masked` blocks per row (as numpy's permutation does in the official code).
        draw_device = generator.device if generator is not None else (device or "cpu")
        noise = torch.rand(batch_size, self.num_mask_patches, generator=generator, device=draw_device)
        masked_blocks = noise.argsort(dim=1)[:, : self.num_masked]
        mask = torch.zeros(batch_size, self.num_mask_patches, dtype=torch.bool, device=draw_device)
        mask.scatter_(1, masked_blocks, True)
        mask = mask.view(batch_size, *self.grid)
        if self.scale > 1:
            mask = mask.repeat_interleave(self.scale, dim=1).repeat_interleave(self.scale, dim=2)
        return mask.to(device) if device is not None else mask

    def seeded_mask(self, seed: int) -> torch.Tensor:
        """One mask (H / model_patch_size, W / model_patch_size) drawn from a fresh `torch.Generator` seeded with
        `seed`: a function of the seed alone, whichever process, worker or batch draws it (per-example masks, see
        `modeling_simmim.randomness`)."""
        # A permutation's first `num_masked` entries: a uniformly random subset, like the batched draw, with fewer
        # small-tensor operations (this runs once per image in the data workers).
        order = torch.randperm(self.num_mask_patches, generator=torch.Generator().manual_seed(seed))
        mask = torch.zeros(self.num_mask_patches, dtype=torch.bool)
        mask[order[: self.num_masked]] = True
        (rows, cols), scale = self.grid, self.scale
        return mask.view(rows, 1, cols, 1).expand(rows, scale, cols, scale).reshape(rows * scale, cols * scale)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(input_size={self.input_size}, mask_patch_size={self.mask_patch_size}, "
            f"model_patch_size={self.model_patch_size}, mask_ratio={self.mask_ratio})"
        )


class SimMIMDataCollator:
    """Stacks `pixel_values` and draws the masks of the whole batch in one vectorized call.

    Examples are mappings with a "pixel_values" tensor (C, H, W) and optionally "labels". When every example carries
    its own "bool_masked_pos" (masks keyed per example, see `modeling_simmim.randomness`), those are stacked instead of
    drawing new ones. Examples whose
    "pixel_values" is None (an image that could not be decoded) are dropped with a warning and counted in
    `num_skipped`.

    Args:
        mask_generator: a `SimMIMMaskGenerator` whose `input_size` matches the images.
        device: draw the masks directly on this device (e.g. "cuda" when collating in the main process).
        seed: fixes the masks (evaluation): the same seed gives the same sequence of masks. Each DataLoader worker
            offsets the seed by its id so that workers do not repeat each other's masks. Without a seed, masks come
            from torch's global RNG, which the DataLoader seeds differently in each worker.
    """

    def __init__(
        self,
        mask_generator: SimMIMMaskGenerator,
        device: torch.device | str | None = None,
        seed: int | None = None,
    ) -> None:
        self.mask_generator = mask_generator
        self.device = device
        self.seed = seed
        self.num_skipped = 0
        self._generators: dict[int, torch.Generator] = {}

    @classmethod
    def from_config(cls, config, image_size: int | Sequence[int] | None = None, **kwargs: Any) -> SimMIMDataCollator:
        """Collator for a `SimMIMConfig` (image size defaults to the backbone's)."""
        size = image_size if image_size is not None else config.image_size
        config.validate_geometry(size)
        generator = SimMIMMaskGenerator(size, config.mask_patch_size, config.model_patch_size, config.mask_ratio)
        return cls(generator, **kwargs)

    def _generator(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker is not None else 0
        if worker_id not in self._generators:
            device = self.device if self.device is not None else "cpu"
            self._generators[worker_id] = torch.Generator(device=device).manual_seed(self.seed + worker_id)
        return self._generators[worker_id]

    def reset(self) -> None:
        """Restart the seeded mask sequence (e.g. before each evaluation, so eval losses are comparable)."""
        self._generators.clear()

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        kept = [example for example in examples if example.get("pixel_values") is not None]
        if len(kept) < len(examples):
            skipped = len(examples) - len(kept)
            self.num_skipped += skipped
            logger.warning(
                "SimMIMDataCollator: dropped %d example(s) without pixel_values (unreadable images).", skipped
            )
        if not kept:
            raise ValueError("Every example in this batch lacks pixel_values: no image could be read.")
        pixel_values = torch.stack([torch.as_tensor(example["pixel_values"]) for example in kept])
        expected = self.mask_generator.input_size
        if tuple(pixel_values.shape[-2:]) != expected:
            raise ValueError(
                f"Images are {tuple(pixel_values.shape[-2:])} but the mask generator expects {expected}: "
                "make the transform's image size equal the mask generator's input_size."
            )
        if all(example.get("bool_masked_pos") is not None for example in kept):
            carried = [torch.as_tensor(example["bool_masked_pos"]) for example in kept]
            wrong = {tuple(mask.shape) for mask in carried} - {self.mask_generator.model_grid}
            if wrong:
                raise ValueError(
                    f"Examples carry masks of shape {sorted(wrong)} but the mask generator's "
                    f"model-patch grid is {self.mask_generator.model_grid}."
                )
            masks = torch.stack(carried)
            masks = masks.to(self.device) if self.device is not None else masks
        else:
            masks = self.mask_generator(len(kept), generator=self._generator(), device=self.device)
        batch = {"pixel_values": pixel_values, "bool_masked_pos": masks}
        label_key = "labels" if "labels" in kept[0] else "label" if "label" in kept[0] else None
        if label_key is not None:
            labels = [example[label_key] for example in kept]
            batch["labels"] = torch.stack(labels) if isinstance(labels[0], torch.Tensor) else torch.as_tensor(labels)
        return batch


__all__ = ["SimMIMMaskGenerator", "SimMIMDataCollator"]
