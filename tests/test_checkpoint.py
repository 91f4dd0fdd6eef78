"""Position-table resizing and the transfer report (modeling_simmim/weight_transfer.py), reading weight files
(modeling_simmim/loading.py)."""

import os

import numpy as np
import pytest
import torch

from modeling_simmim.loading import check_weight_files, load_state_dict_file
from modeling_simmim.weight_transfer import (
    LoadingReport,
    geometric_ratio,
    geometric_source_coordinates,
    interpolate_position_embeddings,
    resize_relative_position_bias_table,
    window_from_table_rows,
)

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "official_rpb_resize.npz")


def test_geometric_ratio_matches_definition():
    # 192/w6 -> 224/w7: n = 5 source steps must span m = 6 target offsets
    q = geometric_ratio(5, 6)
    assert 1.01 < q < 1.5
    assert abs(sum(q**k for k in range(5)) - 6) < 1e-4
    coords = geometric_source_coordinates(11, 13)
    assert coords.shape == (11,) and coords[5] == 0 and coords[6] == 1
    np.testing.assert_allclose(coords, -coords[::-1])
    np.testing.assert_allclose(np.diff(coords[6:]), q ** np.arange(1, 5))


@pytest.mark.parametrize("case", ["w6to7", "w12to14", "w7to6"])
def test_swin_table_resize_matches_official(case):
    """Fixture: inputs and the official SimMIM remap_pretrained_keys_swin output (interp2d, SciPy 1.13.1)."""
    data = np.load(FIXTURE)
    source = torch.from_numpy(data[f"src_{case}"])
    expected = data[f"official_{case}"]
    source_window = window_from_table_rows(source.shape[0])
    target_window = window_from_table_rows(expected.shape[0])
    resized = resize_relative_position_bias_table(source, source_window, target_window)
    assert resized.shape == expected.shape and resized.dtype == source.dtype
    np.testing.assert_allclose(resized.numpy(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", ["g4to5", "g14to16"])
def test_beit_table_resize_matches_official(case):
    """Fixture: the official remap_pretrained_keys_vit output for a shared table copied to blocks and resized."""
    data = np.load(FIXTURE)
    source = torch.from_numpy(data[f"beit_src_{case}"])
    expected = data[f"beit_official_{case}"]
    source_grid = window_from_table_rows(source.shape[0], 3)
    target_grid = window_from_table_rows(expected.shape[0], 3)
    resized = resize_relative_position_bias_table(source, source_grid, target_grid, num_extra_tokens=3)
    np.testing.assert_allclose(resized.numpy(), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(resized[-3:], source[-3:])  # CLS entries carried over


def test_resize_symmetric_and_keeps_centre():
    """A table symmetric in the relative offset stays symmetric, and the zero-offset value is kept."""
    torch.manual_seed(0)
    half = torch.randn(11, 11, 3)
    symmetric = half + half.flip(0).flip(1)  # b(dy, dx) == b(-dy, -dx)
    table = symmetric.reshape(121, 3)
    resized = resize_relative_position_bias_table(table, (6, 6), (7, 7)).reshape(13, 13, 3)
    torch.testing.assert_close(resized, resized.flip(0).flip(1), atol=1e-5, rtol=0)
    torch.testing.assert_close(resized[6, 6], symmetric[5, 5], atol=1e-5, rtol=0)
    # integer offsets the source also has (0 and +-1) are interpolated exactly
    torch.testing.assert_close(resized[7, 6], symmetric[6, 5], atol=1e-5, rtol=0)


def test_resize_identity_and_bad_shape():
    table = torch.randn(121, 2)
    torch.testing.assert_close(resize_relative_position_bias_table(table, (6, 6), (6, 6)), table)
    with pytest.raises(ValueError, match="does not fit window"):
        resize_relative_position_bias_table(table, (7, 7), (8, 8))
    with pytest.raises(ValueError, match="not a square"):
        window_from_table_rows(120)


def test_position_embedding_interpolation():
    pos = torch.randn(1, 1 + 16, 8)
    out = interpolate_position_embeddings(pos, (4, 4), (6, 6))
    assert out.shape == (1, 37, 8)
    torch.testing.assert_close(out[:, :1], pos[:, :1])
    constant = torch.ones(1, 17, 8)
    torch.testing.assert_close(interpolate_position_embeddings(constant, (4, 4), (6, 6)), torch.ones(1, 37, 8))


def test_loading_report_is_one_readable_table():
    report = LoadingReport(
        source="ckpt",
        model="SimMIMForImageClassification",
        loaded=[f"swin.encoder.layers.0.blocks.{i}.mlp.fc1.weight" for i in range(2)],
        resized={
            f"swin.encoder.layers.0.blocks.{i}.attention.relative_position_bias.relative_position_bias_table": "6x6 -> 7x7 (geometric bicubic)"
            for i in range(2)
        },
        newly_initialized=["classifier.weight", "classifier.bias"],
        unused={"decoder.0.weight": "SimMIM decoder (pretraining only)"},
    )
    lines = str(report).splitlines()
    assert lines[0] == "SimMIMForImageClassification LOAD REPORT from: ckpt"
    assert lines[1] == "2 weights loaded, 2 of them resized, interpolated or copied"
    assert [cell.strip() for cell in lines[2].split("|")] == ["Key", "Status", "Details"]
    rows = [[cell.strip() for cell in line.split("|")] for line in lines[4:]]
    assert rows == [
        [
            "swin.encoder.layers.*.blocks.*.attention.relative_position_bias.relative_position_bias_table (x2)",
            "RESIZED",
            "6x6 -> 7x7 (geometric bicubic)",
        ],
        ["classifier.bias", "NEW", "newly initialized: train these"],
        ["classifier.weight", "NEW", "newly initialized: train these"],
        ["decoder.0.weight", "UNUSED", "SimMIM decoder (pretraining only)"],
    ]
    assert report.changes_anything and not LoadingReport(loaded=["x"]).changes_anything


def test_corrupt_and_missing_weights_files(tmp_path):
    from safetensors.torch import save_file

    good = tmp_path / "model.safetensors"
    save_file({"swin.x": torch.ones(1000)}, str(good))
    assert check_weight_files(str(tmp_path)) == [str(good)]
    torch.testing.assert_close(load_state_dict_file(str(good))["swin.x"], torch.ones(1000))
    good.write_bytes(good.read_bytes()[:200])  # truncated download
    with pytest.raises(OSError, match="corrupt or truncated"):
        load_state_dict_file(str(good))
    with pytest.raises(OSError, match="corrupt or truncated"):
        check_weight_files(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no weights in"):
        check_weight_files(str(tmp_path / "empty"))
    official = tmp_path / "official.pth"
    torch.save({"model": {"encoder.x": torch.ones(1)}}, str(official))
    with pytest.raises(ValueError, match="convert_official"):
        load_state_dict_file(str(official))
