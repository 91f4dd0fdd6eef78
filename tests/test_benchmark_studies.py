"""The measurements of the demo's studies: benchmarks/decoder_kernel_study.py (block-edge artifact measure) and
benchmarks/position_bias_study.py (the three ways of moving bias tables)."""

import json
import os
import statistics
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import decoder_kernel_study  # noqa: E402
import position_bias_study  # noqa: E402

import modeling_simmim.weight_transfer as transfer  # noqa: E402


def test_block_edge_measure_separates_borders_from_block_interiors():
    stride = 8
    steps = torch.arange(4.0).repeat_interleave(stride)  # constant inside each 8 px block, +1 at every border
    blocky = steps.view(1, 1, 1, 32).expand(1, 3, 32, 32).clone()
    everywhere = torch.ones(1, 32, 32, dtype=torch.bool)
    jumps = decoder_kernel_study.adjacent_jumps(blocky, everywhere, stride)
    # horizontal border pairs jump by 1, vertical border pairs by 0: across = 0.5; nothing changes inside blocks
    assert jumps["across_borders"] == pytest.approx(0.5) and jumps["inside_blocks"] == 0.0
    ramp = torch.arange(32.0).view(1, 1, 1, 32).expand(1, 3, 32, 32).clone()  # no block structure at all
    assert decoder_kernel_study.adjacent_jumps(ramp, everywhere, stride)["edge_ratio"] == pytest.approx(1.0)
    # only pairs whose two pixels are both masked count: unmask the left half, the border at x = 15|16 drops out
    half = everywhere.clone()
    half[:, :, :16] = False
    jumps = decoder_kernel_study.adjacent_jumps(blocky, half, stride)
    # horizontal border 23|24 in 32 rows (jump 1), vertical borders 7|8, 15|16, 23|24 in 16 columns (jump 0)
    assert jumps["across_borders"] == pytest.approx(32 / (32 + 48))
    blocky[:, :, :, :16] = 100.0  # changes in unmasked pixels do not count
    assert decoder_kernel_study.adjacent_jumps(blocky, half, stride) == jumps


def test_bias_table_moves():
    table = torch.randn(7 * 7, 3)
    resized = position_bias_study.bicubic_resize(table, (4, 4), (8, 8))
    assert resized.shape == (15 * 15, 3)
    constant = torch.full((7 * 7, 2), 0.25)
    torch.testing.assert_close(
        position_bias_study.bicubic_resize(constant, (4, 4), (8, 8)), torch.full((225, 2), 0.25)
    )
    grid = table.T.reshape(3, 7, 7)
    centre = position_bias_study.bicubic_resize(table, (4, 4), (8, 8)).T.reshape(3, 15, 15)[:, 7, 7]
    assert torch.allclose(centre, grid[:, 3, 3], atol=0.5)  # the zero offset stays near the zero offset
    with_cls = torch.randn(7 * 7 + 3, 2)
    assert torch.equal(position_bias_study.bicubic_resize(with_cls, (4, 4), (8, 8), 3)[-3:], with_cls[-3:])
    fresh = position_bias_study.reinitialized(table, (4, 4), (8, 8))
    assert fresh.shape == (225, 3) and 0.015 < fresh.std() < 0.025  # trunc_normal_(std=0.02), as the official init


def test_use_method_patches_the_weight_transfer_and_restores_the_official_resize():
    official = transfer.resize_relative_position_bias_table
    try:
        position_bias_study.use_method("bicubic")
        assert transfer.resize_relative_position_bias_table is position_bias_study.bicubic_resize
        position_bias_study.use_method("reinit")
        assert transfer.resize_relative_position_bias_table is position_bias_study.reinitialized
        position_bias_study.use_method("geometric")
        assert transfer.resize_relative_position_bias_table is official
    finally:
        transfer.resize_relative_position_bias_table = official


def test_merge_combines_seeds_run_in_separate_processes(tmp_path):
    parts = []
    for seed, values in ((0, (0.9, 0.8)), (1, (0.7, 0.6))):
        path = tmp_path / f"seed{seed}.json"
        runs = [{"seed": seed, "method": m, "top1": v} for m, v in zip(("geometric", "reinit"), values)]
        path.write_text(json.dumps({"command": f"seed {seed}", "runs": runs}))
        parts.append(str(path))
    merged = position_bias_study.main(["--pretrained", "x", "--results_dir", str(tmp_path), "--merge", *parts])
    assert merged["commands"] == ["seed 0", "seed 1"]
    assert merged["summary"]["geometric"] == {"mean": 0.8, "std": round(statistics.stdev([0.9, 0.7]), 4), "n": 2}
    assert merged["summary"]["reinit"]["mean"] == 0.7
    assert json.loads((tmp_path / "digits_32w4_to_64w8.json").read_text())["summary"] == merged["summary"]


def test_misclassified_lists_the_validation_digits_a_folder_gets_wrong(tmp_path):
    from transformers import SwinConfig, SwinForImageClassification

    from modeling_simmim.demo_data import load_demo_dataset

    config = SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1], num_heads=[1], window_size=4)
    config.num_labels = 10
    model = SwinForImageClassification(config)
    with torch.no_grad():  # a head that always answers "3": wrong exactly where the label is not 3
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.arange(10) == 3)
    model.save_pretrained(tmp_path / "always3")
    wrong = position_bias_study.main(["--misclassified", str(tmp_path / "always3"), "--image_size", "32"])
    labels = load_demo_dataset("digits", image_size=32)["validation"]["label"]
    assert wrong["misclassified"][str(tmp_path / "always3")] == [i for i, label in enumerate(labels) if label != 3]
