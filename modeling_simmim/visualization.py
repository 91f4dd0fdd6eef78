"""Reconstruction grids: what a SimMIM model sees and what it rebuilds, as one PNG.

Each row is one image; the columns are: input | masked input | reconstruction | reconstruction pasted into the
visible pixels. All are de-normalized to [0, 1] with the dataset mean/std. The checkerboard of `encoder_stride`
blocks in the reconstruction is expected (each output feature predicts its own block independently).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

MASK_FILL = (0.5, 0.5, 0.5)  # grey for masked pixels in the "masked input" column


def mask_to_pixels(bool_masked_pos: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) or (B, h*w) patch mask -> (B, 1, H, W) float pixel mask (nearest upsampling, 1 = masked)."""
    mask = bool_masked_pos.float()
    if mask.dim() == 2:  # flattened patch grid: recover (h, w) from the image aspect ratio
        height, width = image_size
        num_patches = mask.shape[1]
        patch = int(round((height * width / num_patches) ** 0.5))
        mask = mask.reshape(mask.shape[0], height // patch, width // patch)
    return F.interpolate(mask[:, None], size=image_size, mode="nearest")


def denormalize(
    pixel_values: torch.Tensor,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> torch.Tensor:
    """Undo `Normalize(mean, std)` and clamp to [0, 1]."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=pixel_values.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=pixel_values.device).view(1, -1, 1, 1)
    return (pixel_values.float() * std_t + mean_t).clamp(0.0, 1.0)


def reconstruction_panels(
    pixel_values: torch.Tensor,
    bool_masked_pos: torch.Tensor,
    reconstruction: torch.Tensor,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> torch.Tensor:
    """(B, 4, 3, H, W) in [0, 1]: input, masked input, reconstruction, reconstruction pasted into the visible pixels."""
    if pixel_values.shape != reconstruction.shape:
        raise ValueError(
            f"pixel_values {tuple(pixel_values.shape)} and reconstruction {tuple(reconstruction.shape)} differ"
        )
    image = denormalize(pixel_values.detach().cpu(), mean, std)
    recon = denormalize(reconstruction.detach().cpu(), mean, std)
    mask = mask_to_pixels(bool_masked_pos.detach().cpu(), (image.shape[-2], image.shape[-1]))
    fill = torch.tensor(MASK_FILL).view(1, 3, 1, 1)
    masked = image * (1 - mask) + fill * mask
    pasted = image * (1 - mask) + recon * mask
    return torch.stack([image, masked, recon, pasted], dim=1)


def make_reconstruction_grid(
    pixel_values: torch.Tensor,
    bool_masked_pos: torch.Tensor,
    reconstruction: torch.Tensor,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    max_images: int = 8,
    padding: int = 2,
    min_cell_size: int = 96,
) -> Image.Image:
    """The reconstruction grid as a PIL RGB image: one row per image (at most `max_images`), four columns (see the
    module docstring), white `padding` between cells. Small inputs are upscaled (nearest) to `min_cell_size` so the
    grid stays readable. Pure function: no model, no I/O."""
    panels = reconstruction_panels(
        pixel_values[:max_images], bool_masked_pos[:max_images], reconstruction[:max_images], mean, std
    )
    rows, cols, _, height, width = panels.shape
    scale = max(1, -(-min_cell_size // max(height, width)))  # ceil division
    cell_h, cell_w = height * scale, width * scale
    grid = np.full((rows * cell_h + (rows + 1) * padding, cols * cell_w + (cols + 1) * padding, 3), 255, np.uint8)
    for r in range(rows):
        for c in range(cols):
            cell = panels[r, c]
            if scale > 1:
                cell = F.interpolate(cell[None], scale_factor=scale, mode="nearest")[0]
            top, left = padding + r * (cell_h + padding), padding + c * (cell_w + padding)
            grid[top : top + cell_h, left : left + cell_w] = (cell.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(
                np.uint8
            )
    return Image.fromarray(grid)


@torch.no_grad()
def reconstruct(model: torch.nn.Module, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
    """Run a SimMIM model in eval mode on one batch and return its reconstruction (restores the training mode)."""
    was_training = model.training
    model.eval()
    try:
        output = model(pixel_values=pixel_values, bool_masked_pos=bool_masked_pos)
    finally:
        model.train(was_training)
    return output.reconstruction if hasattr(output, "reconstruction") else output[1]


__all__ = [
    "mask_to_pixels",
    "denormalize",
    "reconstruction_panels",
    "make_reconstruction_grid",
    "reconstruct",
]
