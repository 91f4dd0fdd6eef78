"""benchmarks/fashion_mnist_transfer.py at tiny scale, on generated idx files: reader, subsets, the whole protocol."""

import gzip
import json
import os
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import fashion_mnist_transfer as fmt  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _write_idx(path, array, compress=True):
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    opener = gzip.open if compress else open
    with opener(path, "wb") as handle:
        handle.write(header + array.tobytes())


def _fake_fashion_mnist(folder, per_class_train=4, per_class_test=2):
    """Idx files shaped like Fashion-MNIST's: 28x28 uint8 images whose brightness depends on the class."""
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
        rng.shuffle(labels)
        images = np.clip(rng.normal(20 + 22 * labels[:, None, None], 15, (len(labels), 28, 28)), 0, 255)
        images_stem, labels_stem = fmt.FILES[split]
        _write_idx(os.path.join(folder, images_stem + ".gz"), images.astype(np.uint8))
        _write_idx(os.path.join(folder, labels_stem), labels, compress=False)  # plain files are read too
    return str(folder)


def test_read_idx_and_its_errors(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", array)
    np.testing.assert_array_equal(fmt.read_idx(str(tmp_path / "a.gz")), array)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an idx file"):
        fmt.read_idx(str(tmp_path / "bad"))
    (tmp_path / "short").write_bytes(bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + b"abc")
    with pytest.raises(ValueError, match="header says"):
        fmt.read_idx(str(tmp_path / "short"))
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        fmt.load_fashion_mnist(str(tmp_path / "nowhere"))


def test_balanced_subsets_are_seeded_and_disjoint_when_asked():
    labels = np.repeat(np.arange(10), 5)
    first = fmt.balanced_subset(labels, 2, seed=0)
    assert len(first) == 20 and np.bincount(labels[first]).tolist() == [2] * 10
    assert np.array_equal(first, fmt.balanced_subset(labels, 2, seed=0))
    assert not np.array_equal(first, fmt.balanced_subset(labels, 2, seed=1))
    other = fmt.balanced_subset(labels, 3, seed=1, exclude=first)
    assert not set(first) & set(other)
    assert len(fmt.balanced_subset(labels, None, seed=0)) == 50
    with pytest.raises(ValueError, match="fewer than"):
        fmt.balanced_subset(labels, 6, seed=0)
    with pytest.raises(ValueError, match="positive integers or 'all'"):
        fmt.parse_shots(["10", "some"])


def test_the_whole_protocol_at_tiny_scale(tmp_path):
    data_dir = _fake_fashion_mnist(tmp_path / "idx")
    results = str(tmp_path / "results.json")
    record = fmt.main(
        [
            "--data_dir",
            data_dir,
            "--work_dir",
            str(tmp_path / "work"),
            "--results",
            results,
            "--seeds",
            "1",
            "--shots",
            "2",
            "all",
            "--batch_size",
            "8",
            "--finetune_steps",
            "2",
            "--all_epochs",
            "0.5",
            "--knn_monitor_per_class",
            "1",
            "--pretrain_args",
            "--max_steps 2 --per_device_train_batch_size 8 --knn_eval_steps 1 --visualize_steps 0",
            "--finetune_args",
            "--per_device_eval_batch_size 16",
        ]
    )
    with open(results) as handle:
        saved = json.load(handle)
    assert saved["table"] == record["table"]
    assert [step for step, _ in saved["pretrain"]["knn_top1_curve"]] == [1, 2]
    for shot in ("2", "all"):
        summary = saved["summary"][shot]
        for key in (
            "finetune_pretrained",
            "finetune_scratch",
            "linear_probe_pretrained",
            "linear_probe_random",
            "linear_probe_pixels",
            "knn_pretrained",
            "knn_random",
            "knn_pixels",
            "logreg_pixels",
        ):
            assert len(summary[key]["values"]) == 1 and 0.0 <= summary[key]["mean"] <= 100.0, (shot, key)
    assert saved["runs"]["all"]["finetune_pretrained"][0]["steps"] == 2  # half an epoch of 40 images, batches of 8
    # the subsets are class-balanced image folders of links; the test split was never trained on
    subset = tmp_path / "work" / "subsets" / "k2_seed1"
    assert sorted(name for name in os.listdir(subset) if not name.startswith(".")) == list(fmt.CLASS_NAMES)
    assert all(len(os.listdir(subset / name)) == 2 for name in fmt.CLASS_NAMES)
    assert "| finetuned, SimMIM-pretrained |" in record["table"] and "k = 2 / class" in record["table"]

    # Another seed in a separate process reusing the pretraining, then both merged: per-seed values side by side.
    other = str(tmp_path / "seed2.json")
    fmt.main(
        [
            "--data_dir",
            data_dir,
            "--work_dir",
            str(tmp_path / "work"),
            "--results",
            other,
            "--seeds",
            "2",
            "--shots",
            "2",
            "--batch_size",
            "8",
            "--finetune_steps",
            "2",
            "--knn_monitor_per_class",
            "1",
            "--pretrained",
            str(tmp_path / "work" / "pretrain"),
            "--finetune_args",
            "--per_device_eval_batch_size 16",
        ]
    )
    with open(other) as handle:
        assert json.load(handle)["pretrain"]["knn_top1_curve"] == saved["pretrain"]["knn_top1_curve"]
    merged = fmt.main(["--merge", results, other, "--results", str(tmp_path / "merged.json")])
    pretrained = merged["summary"]["2"]["finetune_pretrained"]["values"]
    assert pretrained == [
        saved["summary"]["2"]["finetune_pretrained"]["values"][0],
        json.load(open(other))["summary"]["2"]["finetune_pretrained"]["values"][0],
    ]
    assert len(merged["summary"]["2"]["knn_pixels"]["values"]) == 2
    assert len(merged["summary"]["all"]["finetune_pretrained"]["values"]) == 1  # only the first run had "all"

    # Probes only, on the flattened final feature maps (reusing the pretraining), merged with the finetunings.
    maps = str(tmp_path / "maps.json")
    probed = fmt.main(
        [
            "--data_dir",
            data_dir,
            "--work_dir",
            str(tmp_path / "work"),
            "--results",
            maps,
            "--seeds",
            "1",
            "--shots",
            "2",
            "--pretrained",
            str(tmp_path / "work" / "pretrain"),
            "--no_finetune",
            "--probe_features",
            "map",
        ]
    )
    assert probed["runs"] == {} and not os.path.exists(tmp_path / "work" / "finetune" / "k2_seed1_pretrained_map")
    assert set(probed["summary"]["2"]) == {
        "linear_probe_pretrained_map",
        "linear_probe_random_map",
        "knn_pretrained_map",
        "knn_random_map",
    }
    both = fmt.main(["--merge", results, maps, "--results", str(tmp_path / "both.json")])
    assert {"finetune_pretrained", "linear_probe_pretrained", "linear_probe_pretrained_map"} <= set(
        both["summary"]["2"]
    )
    assert "final feature map" in both["table"]


def test_summary_table():
    summary = {
        "10": {
            "finetune_pretrained": fmt.mean_std([80.0, 82.0, 84.0]),
            "finetune_scratch": fmt.mean_std([70.0, 70.0, 70.0]),
        },
        "all": {"finetune_pretrained": fmt.mean_std([90.0])},
    }
    assert summary["10"]["finetune_pretrained"] == {"mean": 82.0, "std": 2.0, "values": [80.0, 82.0, 84.0]}
    table = fmt.markdown_table(summary, ["10", "all"]).splitlines()
    assert table[0] == "| top-1 on the 10,000 test images (mean ± std) | k = 10 / class | all 60,000 |"
    assert table[2] == "| finetuned, SimMIM-pretrained | 82.0 ± 2.0 | 90.0 ± 0.0 |"
    assert table[3] == "| finetuned, from scratch | 70.0 ± 0.0 | - |"
    assert len(table) == 4  # rows without any value are left out
