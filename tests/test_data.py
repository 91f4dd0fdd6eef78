"""Data loading, the official pretraining transform, robust decoding (skip + count) and the demo datasets."""

import io
import logging
import os

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from modeling_simmim import SimMIMDataCollator, SimMIMMaskGenerator
from modeling_simmim.data import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    SKIPPED_KEY,
    IndexSeededMasks,
    PretrainCollator,
    RobustImageDataset,
    build_pretrain_transform,
    decode_image,
    load_image_datasets,
    load_image_folders,
    resolve_image_column,
    scan_image_folder,
)
from modeling_simmim.demo_data import load_demo_dataset


def _save_image(path, size=(40, 30), mode="RGB", seed=0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(array).convert(mode).save(path)


def _write_truncated_jpeg(path):
    """A JPEG whose header is fine (PIL `verify` accepts it) but whose data stops early (decoding fails)."""
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    data = buffer.getvalue()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])


def _make_folder(root, corrupt=False):
    _save_image(os.path.join(root, "cat", "a.png"), seed=1)
    _save_image(os.path.join(root, "cat", "deeper", "nested", "b.jpg"), seed=2)
    _save_image(os.path.join(root, "dog", "c.png"), mode="L", seed=3)
    _save_image(os.path.join(root, "dog", "d.png"), mode="RGBA", seed=4)
    with open(os.path.join(root, "dog", "notes.txt"), "w") as handle:
        handle.write("not an image")
    if corrupt:
        with open(os.path.join(root, "dog", "broken.png"), "wb") as handle:
            handle.write(b"\x89PNG\r\n\x1a\n garbage")


# ---- transforms ------------------------------------------------------------------------------------------------------
def test_train_transform_is_the_official_one():
    transform = build_pretrain_transform(48)
    crops = [t for t in transform.transforms if isinstance(t, T.RandomResizedCrop)]
    assert len(crops) == 1
    assert crops[0].size == (48, 48)
    assert crops[0].scale == (0.67, 1.0)
    assert crops[0].ratio == pytest.approx((3 / 4, 4 / 3))
    assert crops[0].interpolation == T.InterpolationMode.BILINEAR  # torchvision default, as official
    assert any(isinstance(t, T.RandomHorizontalFlip) and t.p == 0.5 for t in transform.transforms)
    normalize = transform.transforms[-1]
    assert isinstance(normalize, T.Normalize)
    assert tuple(normalize.mean) == IMAGENET_DEFAULT_MEAN and tuple(normalize.std) == IMAGENET_DEFAULT_STD


def test_train_transform_flip_probability():
    """`hflip_prob` (run_mim.py --hflip_prob): 0 removes the flip (mirrored digits are other shapes), 1 always
    mirrors."""
    assert not any(
        isinstance(t, T.RandomHorizontalFlip) for t in build_pretrain_transform(32, hflip_prob=0.0).transforms
    )
    always = [
        t for t in build_pretrain_transform(32, hflip_prob=1.0).transforms if isinstance(t, T.RandomHorizontalFlip)
    ]
    assert len(always) == 1 and always[0].p == 1.0


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "P", "RGBA", "CMYK", "I", "I;16", "1"])
def test_every_image_mode_becomes_three_normalized_channels(mode):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)).convert(mode)
    for train in (True, False):
        out = build_pretrain_transform(32, train=train)(image)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32


def test_eval_transform_is_deterministic_resize_and_center_crop():
    array = np.zeros((40, 80, 3), dtype=np.uint8)
    array[:, 12:68] = 255  # a white band a little wider than the center crop (40 of 80 columns after resizing)
    image = Image.fromarray(array)
    transform = build_pretrain_transform(20, mean=(0, 0, 0), std=(1, 1, 1), train=False)
    first, second = transform(image), transform(image)
    assert torch.equal(first, second)
    # shorter side 40 -> 20, width 80 -> 40, center 20 columns: inside the band, the black borders are cut off
    assert first.shape == (3, 20, 20)
    assert first.min().item() > 0.99
    shifted = np.zeros_like(array)
    shifted[:, :40] = 255
    assert transform(Image.fromarray(shifted)).mean().item() == pytest.approx(0.5, abs=0.05)


# ---- robust decoding -----------------------------------------------------------------------------------------------
def test_robust_dataset_skips_unreadable_images_with_a_warning_naming_the_file(tmp_path, caplog):
    good = tmp_path / "good.png"
    _save_image(str(good))
    truncated = tmp_path / "truncated.jpg"
    _write_truncated_jpeg(str(truncated))
    rows = [
        {"image": {"path": str(good), "bytes": None}},
        {"image": {"path": str(truncated), "bytes": None}},
        {"image": {"path": None, "bytes": b"not an image at all"}},
    ]
    dataset = RobustImageDataset(rows, "image", build_pretrain_transform(32))
    with caplog.at_level(logging.WARNING, logger="modeling_simmim.data"):
        examples = [dataset[i] for i in range(3)]
    assert examples[0]["pixel_values"].shape == (3, 32, 32)
    assert [(e.index, os.path.basename(e.name)) for e in examples[1:]] == [(1, "truncated.jpg"), (2, "row 2")]
    assert "truncated.jpg" in caplog.text and "row 2" in caplog.text

    generator = SimMIMMaskGenerator(32, 16, 4, 0.6)
    batch = PretrainCollator(SimMIMDataCollator(generator))(examples)
    assert batch["pixel_values"].shape == (1, 3, 32, 32)
    assert batch["bool_masked_pos"].shape == (1, 8, 8)
    assert batch[SKIPPED_KEY].tolist() == [1, 2]  # the indices of the skipped images
    with pytest.raises(RuntimeError, match="Every image of a batch"):
        PretrainCollator(SimMIMDataCollator(generator))([None, None])


def test_decode_image_accepts_paths_bytes_dicts_arrays(tmp_path):
    path = tmp_path / "x.png"
    _save_image(str(path), size=(9, 7))
    data = path.read_bytes()
    for value in (
        str(path),
        data,
        {"bytes": data, "path": None},
        {"bytes": None, "path": str(path)},
        np.zeros((7, 9, 3), dtype=np.uint8),
    ):
        assert decode_image(value).size == (9, 7)


def test_eval_masks_depend_only_on_the_example_index():
    generator = SimMIMMaskGenerator(64, 16, 4, 0.6)
    masks = IndexSeededMasks(generator, seed=3)
    first = [masks(i, {})["bool_masked_pos"] for i in range(4)]
    again = [masks(i, {})["bool_masked_pos"] for i in reversed(range(4))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1])
    assert all(int(m.sum()) == 10 * 16 for m in first)  # ceil(0.6 * 16) blocks of 4x4 model patches
    # the collator keeps example masks (evaluation) instead of drawing new ones
    examples = [{"pixel_values": torch.zeros(3, 64, 64), **masks(i, {})} for i in range(2)]
    batch = PretrainCollator(SimMIMDataCollator(generator))(examples)
    assert torch.equal(batch["bool_masked_pos"][1], first[1])


# ---- folders -------------------------------------------------------------------------------------------------------
def test_scan_image_folder_any_nesting_labels_from_first_level(tmp_path):
    _make_folder(str(tmp_path))
    paths, labels = scan_image_folder(str(tmp_path))
    assert [os.path.relpath(p, tmp_path) for p in paths] == [
        os.path.join("cat", "a.png"),
        os.path.join("cat", "deeper", "nested", "b.jpg"),
        os.path.join("dog", "c.png"),
        os.path.join("dog", "d.png"),
    ]
    assert labels == ["cat", "cat", "dog", "dog"]
    flat = tmp_path / "flat"
    _save_image(str(flat / "x.png"))
    assert scan_image_folder(str(flat))[1] is None
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_image_folder(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="No image files"):
        scan_image_folder(str(tmp_path / "empty"))


def test_folder_loading_drops_corrupt_files_and_reports_them(tmp_path, caplog):
    _make_folder(str(tmp_path / "train"), corrupt=True)
    _make_folder(str(tmp_path / "val"))
    with caplog.at_level(logging.WARNING, logger="modeling_simmim.data"):
        loaded, skipped = load_image_folders(str(tmp_path / "train"), str(tmp_path / "val"))
    assert [os.path.basename(p) for p in skipped] == ["broken.png"]
    assert "broken.png" in caplog.text
    assert len(loaded["train"]) == 4 and len(loaded["validation"]) == 4
    assert loaded["train"].features["label"].names == ["cat", "dog"]
    assert loaded["train"]["label"] == [0, 0, 1, 1]


def test_load_image_datasets_sources_splits_and_limits(tmp_path):
    _make_folder(str(tmp_path / "train"), corrupt=True)
    data = load_image_datasets(train_dir=str(tmp_path / "train"), train_val_split=0.25, seed=0)
    assert data.num_skipped == 1 and data.image_column == "image" and data.label_column == "label"
    assert len(data.datasets["train"]) == 3 and len(data.datasets["validation"]) == 1
    assert not data.datasets["train"].features["image"].decode  # decoded later, robustly

    # a datasets "hub" source: a local folder goes through datasets.load_dataset (imagefolder builder)
    hub = load_image_datasets(dataset_name=str(tmp_path / "train"), max_train_samples=2, seed=0)
    assert hub.image_column == "image" and len(hub.datasets["train"]) == 2
    assert not hub.datasets["train"].features["image"].decode

    with pytest.raises(ValueError, match="either --dataset_name or --train_dir"):
        load_image_datasets(dataset_name="x", train_dir=str(tmp_path))
    with pytest.raises(ValueError, match="train_val_split"):
        load_image_datasets(train_dir=str(tmp_path / "train"), train_val_split=1.5)


def test_image_column_is_auto_detected_or_fails_listing_columns():
    features = datasets.Features({"photo": datasets.Image(), "y": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict({"photo": [Image.new("RGB", (4, 4))], "y": [1]}, features=features)
    assert resolve_image_column(ds) == "photo"
    plain = datasets.Dataset.from_dict({"a": [1], "b": [2]})
    with pytest.raises(ValueError, match=r"Cannot find an image column among \['a', 'b'\]"):
        resolve_image_column(plain)
    with pytest.raises(ValueError, match="--image_column_name 'c' is not a column"):
        resolve_image_column(plain, "c")


# ---- demo data -------------------------------------------------------------------------------------------------------
def test_demo_digits_is_a_labeled_stratified_dataset():
    demo = load_demo_dataset("digits", image_size=32)
    assert set(demo) == {"train", "validation"}
    assert len(demo["train"]) + len(demo["validation"]) == 1797
    assert demo["train"].features["label"].names == [str(i) for i in range(10)]
    assert sorted(set(demo["validation"]["label"])) == list(range(10))
    image = demo["train"][0]["image"]
    assert image.mode == "RGB" and image.size == (32, 32)
    assert np.asarray(image).std() > 10  # real strokes, not blank
    # callers may replace splits without touching the cached copy
    demo["train"] = demo["train"].select(range(3))
    assert len(load_demo_dataset("digits", image_size=32)["train"]) > 3


def test_demo_photos_are_crops_of_bundled_photos():
    demo = load_demo_dataset("photos", image_size=32, crops_per_photo=4)
    names = demo["train"].features["label"].names
    assert {"astronaut", "coffee", "chelsea"} <= set(names)
    assert len(demo["train"]) + len(demo["validation"]) == 4 * len(names)
    assert demo["validation"][0]["image"].size == (32, 32)


def test_data_throughput_benchmark_runs_and_reports_both_pipelines():
    import importlib.util

    path = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "data_throughput.py"
    )
    spec = importlib.util.spec_from_file_location("data_throughput", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    previous = torch.get_num_threads()
    try:
        results = module.run(num_images=4, batch_size=2, image_size=64, width=100, height=75, repeats=1, num_workers=0)
    finally:
        torch.set_num_threads(previous)
    assert set(results["pipeline_images_per_second"]) == {"ours", "ours_keyed", "transformers_run_mim"}
    assert all(value > 0 for value in results["pipeline_images_per_second"].values())
    assert "| ours" in module.format_table(results)
    # the baseline's masks are the example's: flattened, exactly ceil(0.6 * 4) of 4 blocks of 8 x 8 model patches
    mask = module.ExampleMaskGenerator(64, 32, 4, 0.6)()
    assert mask.shape == (256,) and int(mask.sum()) == 3 * 64
