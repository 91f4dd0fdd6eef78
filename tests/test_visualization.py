"""Reconstruction grids and the callback that saves them (and sends them to TensorBoard)."""

import numpy as np
import torch
from PIL import Image
from transformers import TrainerControl, TrainerState, TrainingArguments

from modeling_simmim import SimMIMConfig, SimMIMForMaskedImageModeling, SimMIMMaskGenerator
from modeling_simmim.trainer import ReconstructionCallback
from modeling_simmim.visualization import MASK_FILL, make_reconstruction_grid, mask_to_pixels, reconstruction_panels

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _normalize(x):
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def test_panels_show_input_masked_reconstruction_and_pasted():
    torch.manual_seed(0)
    image = torch.rand(2, 3, 16, 16)
    recon = torch.rand(2, 3, 16, 16)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)  # model patch 4
    mask[:, 0, 0] = True
    mask[1, 3, 2] = True
    panels = reconstruction_panels(_normalize(image), mask, _normalize(recon), MEAN, STD)
    assert panels.shape == (2, 4, 3, 16, 16)
    pixel_mask = mask_to_pixels(mask, (16, 16))
    assert pixel_mask.shape == (2, 1, 16, 16) and pixel_mask[1, 0, 12:16, 8:12].eq(1).all()
    torch.testing.assert_close(panels[:, 0], image, atol=1e-5, rtol=0)  # de-normalized input
    torch.testing.assert_close(panels[:, 2], recon, atol=1e-5, rtol=0)
    visible = pixel_mask.expand(-1, 3, -1, -1) == 0
    torch.testing.assert_close(panels[:, 1][visible], image[visible], atol=1e-5, rtol=0)
    fill = torch.tensor(MASK_FILL).view(1, 3, 1, 1).expand(2, 3, 16, 16)
    torch.testing.assert_close(panels[:, 1][~visible], fill[~visible])
    torch.testing.assert_close(panels[:, 3][visible], image[visible], atol=1e-5, rtol=0)
    torch.testing.assert_close(panels[:, 3][~visible], recon[~visible], atol=1e-5, rtol=0)
    # a flattened (B, num_patches) mask means the same
    torch.testing.assert_close(mask_to_pixels(mask.flatten(1), (16, 16)), pixel_mask)


def test_grid_layout_and_values():
    image = torch.zeros(3, 3, 8, 8)
    image[:, 0] = 1.0  # red
    mask = torch.ones(3, 2, 2, dtype=torch.bool)
    grid = make_reconstruction_grid(
        image, mask, torch.zeros_like(image), mean=(0, 0, 0), std=(1, 1, 1), max_images=2, padding=2, min_cell_size=16
    )
    assert isinstance(grid, Image.Image) and grid.mode == "RGB"
    # 2 rows, 4 columns of 16 px cells (8 px upscaled x2), 2 px white padding
    assert grid.size == (4 * 16 + 5 * 2, 2 * 16 + 3 * 2)
    pixels = np.asarray(grid)
    assert tuple(pixels[0, 0]) == (255, 255, 255)
    assert tuple(pixels[2 + 5, 2 + 5]) == (255, 0, 0)  # input cell: red
    gray = round(MASK_FILL[0] * 255)
    assert tuple(pixels[2 + 5, 2 + 18 + 5]) == (gray, gray, gray)  # fully masked input: grey
    assert tuple(pixels[2 + 5, 2 + 3 * 18 + 5]) == (0, 0, 0)  # pasted: the (black) reconstruction everywhere


class _FakeWriter:
    def __init__(self):
        self.images = []

    def add_image(self, tag, image, step, dataformats):
        self.images.append((tag, image.shape, step, dataformats))

    def flush(self):
        pass


class _FakeTensorBoard:
    def __init__(self):
        self.tb_writer = _FakeWriter()


def test_callback_saves_pngs_at_due_steps_and_logs_to_tensorboard(tmp_path):
    config = SimMIMConfig.from_preset("swin_test", mask_patch_size=16)
    model = SimMIMForMaskedImageModeling(config)
    model.train()
    pixel_values = torch.randn(2, 3, 64, 64)
    mask = SimMIMMaskGenerator(64, 16, 4, 0.6)(2, generator=torch.Generator().manual_seed(0))
    callback = ReconstructionCallback(pixel_values, mask, str(tmp_path), visualize_steps=2)
    callback.tensorboard = _FakeTensorBoard()
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    state = TrainerState(max_steps=5)
    for step in range(1, 6):
        state.global_step = step
        callback.on_step_end(args, state, TrainerControl(), model=model)
    names = sorted(p.name for p in (tmp_path / "reconstructions").iterdir())
    assert names == ["step_00002.png", "step_00004.png", "step_00005.png"]  # every 2 steps + the last one
    assert [entry[2] for entry in callback.tensorboard.tb_writer.images] == [2, 4, 5]
    assert callback.tensorboard.tb_writer.images[0][3] == "HWC"
    assert model.training  # rendering restores training mode
    with Image.open(tmp_path / "reconstructions" / "step_00005.png") as grid:
        assert grid.size[0] > grid.size[1] / 2  # 4 columns of 2 rows
