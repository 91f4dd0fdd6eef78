"""run_image_classification.py end to end on tiny models and the bundled digits (CPU, seconds)."""

import json
import os

import pytest
import torch

import run_image_classification as ric
from modeling_simmim import SimMIMConfig, SimMIMForMaskedImageModeling
from modeling_simmim.modeling_simmim import SimMIMForImageClassification

TINY = [
    "--image_size",
    "32",
    "--per_device_train_batch_size",
    "16",
    "--per_device_eval_batch_size",
    "32",
    "--max_train_samples",
    "64",
    "--max_eval_samples",
    "48",
    "--num_train_epochs",
    "2",
    "--base_learning_rate",
    "1e-3",
    "--scale_learning_rate",
    "false",
    "--warmup_epochs",
    "1",
    "--report_to",
    "none",
    "--logging_steps",
    "1",
    "--dataloader_num_workers",
    "0",
    "--seed",
    "0",
]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny SimMIM pretraining checkpoint (Swin, 32 px, window 4; stages 8 and 4)."""
    folder = tmp_path_factory.mktemp("mim")
    config = SimMIMConfig.from_preset("swin_test", image_size=32, mask_patch_size=16)
    SimMIMForMaskedImageModeling(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def finetuned(pretrained, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("ft"))
    results = ric.main(
        [
            "--model_name_or_path",
            pretrained,
            *TINY,
            "--drop_path_rate",
            "0.1",
            "--output_dir",
            output,
            "--overwrite_output_dir",
            "true",
            "--layer_decay",
            "0.75",
        ]
    )
    return output, results


def test_finetune_end_to_end(finetuned):
    output, results = finetuned
    all_results = json.loads(open(os.path.join(output, "all_results.json")).read())
    for key in ("eval_accuracy", "eval_top5_accuracy", "train_loss"):
        assert key in all_results
    assert 0.0 <= all_results["eval_accuracy"] <= all_results["eval_top5_accuracy"] <= 1.0
    # every evaluation image counts (48 images, batches of 32: drop_last must not apply to evaluation)
    assert all_results["eval_samples"] == 48
    for key in ("eval_accuracy", "eval_top5_accuracy"):
        assert abs(all_results[key] * 48 - round(all_results[key] * 48)) < 1e-6
    config = json.loads(open(os.path.join(output, "config.json")).read())
    assert config["model_type"] == "swin" and config["architectures"] == ["SwinForImageClassification"]
    assert config["id2label"]["3"] == "3" and config.get("problem_type") is None  # Mixup never switched to BCE
    assert os.path.isfile(os.path.join(output, "preprocessor_config.json"))
    card = open(os.path.join(output, "README.md")).read()
    assert "top-1 accuracy" in card and 'pipeline("image-classification"' in card and "layer_decay" in card
    state = json.loads(open(os.path.join(output, "trainer_state.json")).read())
    # best checkpoint by top-1: the exported weights are those of the best evaluated checkpoint
    evals = [entry for entry in state["log_history"] if "eval_accuracy" in entry and "epoch" in entry]
    assert state["best_metric"] == max(entry["eval_accuracy"] for entry in evals)
    best = SimMIMForImageClassification.from_pretrained(state["best_model_checkpoint"])
    exported = SimMIMForImageClassification.from_pretrained(output)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(exported(x).logits, best(x).logits, atol=1e-5, rtol=0)
    # the logged lr is the head's (the highest group lr), the most decayed group's is logged too
    logs = [entry for entry in state["log_history"] if "learning_rate" in entry and "loss" in entry]
    assert logs and all(
        entry["learning_rate_min"] < entry["learning_rate"] for entry in logs if entry["learning_rate"]
    )
    ratio = logs[-1]["learning_rate_min"] / logs[-1]["learning_rate"]
    assert ratio == pytest.approx(0.75**3, rel=1e-4)  # swin_test: L = 2 blocks, ids 0..3


def test_eval_only_evaluates_the_given_model(finetuned, tmp_path):
    output, results = finetuned
    metrics = ric.main(
        [
            "--model_name_or_path",
            output,
            "--do_eval",
            "--image_size",
            "32",
            "--max_eval_samples",
            "48",
            "--per_device_eval_batch_size",
            "32",
            "--report_to",
            "none",
            "--seed",
            "0",
            "--output_dir",
            str(tmp_path),
        ]
    )
    assert "train_loss" not in metrics
    assert metrics["eval_accuracy"] == pytest.approx(results["eval_accuracy"], abs=1e-6)
    assert json.loads((tmp_path / "all_results.json").read_text())["eval_top5_accuracy"] == pytest.approx(
        results["eval_top5_accuracy"], abs=1e-6
    )


def test_push_to_hub_uploads_the_native_export_with_its_card(pretrained, tmp_path, fake_hub):
    """--push_to_hub goes through transformers' `Trainer.push_to_hub`: the uploaded folder is the native export (not
    the training layout the checkpoints keep), with the classifier's card."""
    output = str(tmp_path / "ft")
    ric.main(
        [
            "--model_name_or_path",
            pretrained,
            *TINY,
            "--num_train_epochs",
            "1",
            "--output_dir",
            output,
            "--push_to_hub",
            "true",
            "--hub_model_id",
            "me/simmim-digits",
        ]
    )
    assert fake_hub.created == ["me/simmim-digits"]
    final = fake_hub.uploads[-1]  # the Trainer also pushes at every checkpoint
    assert final["repo_id"] == "me/simmim-digits" and final["commit_message"] == "SimMIM finetuned classifier"
    assert {"README.md", "config.json", "model.safetensors", "preprocessor_config.json"} <= set(final["files"])
    assert not any(path.startswith("checkpoint-") for path in final["files"])
    assert json.loads(final["config"])["architectures"] == ["SwinForImageClassification"]
    assert 'pipeline("image-classification", model="simmim-digits")' in final["readme"]
    assert "top-1 accuracy" in final["readme"]


def test_bad_arguments_fail_early(pretrained, tmp_path):
    with pytest.raises(ValueError, match="must be even"):
        ric.main(
            [
                *TINY,
                "--model_name_or_path",
                pretrained,
                "--per_device_train_batch_size",
                "15",
                "--output_dir",
                str(tmp_path),
            ]
        )
    with pytest.raises(ValueError, match="holds a swin backbone, not --model_type vit"):
        ric.main([*TINY, "--model_name_or_path", pretrained, "--model_type", "vit", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="--learning_rate is not used"):
        ric.main([*TINY, "--model_name_or_path", pretrained, "--learning_rate", "1e-3", "--output_dir", str(tmp_path)])
    with pytest.raises(ValueError, match="Give --model_name_or_path"):
        ric.main([*TINY, "--output_dir", str(tmp_path)])


def test_hflip_prob_reaches_the_training_transform(pretrained, tmp_path, monkeypatch):
    """--hflip_prob sets the training flip (official 0.5; 0 for digits); outside [0, 1] it is refused early."""
    seen = []
    real_transform = ric.build_classification_transform

    def recording_transform(*args, **kwargs):
        if kwargs.get("train"):
            seen.append(kwargs["hflip_prob"])
        return real_transform(*args, **kwargs)

    class Built(Exception):
        pass

    def no_dataset(*args, **kwargs):
        raise Built

    monkeypatch.setattr(ric, "build_classification_transform", recording_transform)
    monkeypatch.setattr(ric, "RobustImageDataset", no_dataset)
    for flag, expected in ((["--hflip_prob", "0"], 0.0), ([], 0.5)):
        with pytest.raises(Built):
            ric.main([*TINY, "--model_name_or_path", pretrained, *flag, "--output_dir", str(tmp_path / "out")])
        assert seen[-1] == expected
    with pytest.raises(ValueError, match=r"--hflip_prob is a probability in \[0, 1\]"):
        ric.main([*TINY, "--model_name_or_path", pretrained, "--hflip_prob", "-1", "--output_dir", str(tmp_path)])


def _class_folders(root, readable, unreadable=()):
    """One sub-folder per class with 8 small PNGs each; the `unreadable` classes hold only corrupt files."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for name in (*readable, *unreadable):
        os.makedirs(root / name, exist_ok=True)
        for i in range(8):
            if name in unreadable:
                (root / name / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n corrupt")
            else:
                pixels = (torch.rand(24, 24, 3, generator=generator) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(root / name / f"{i}.png")
    return str(root)


def test_a_training_subset_that_misses_classes_names_max_train_samples(pretrained, tmp_path):
    """10 classes, --max_train_samples 4: most classes have no training image, and the error says why."""
    folders = _class_folders(tmp_path / "ten", [f"class{i}" for i in range(10)])
    args = [*TINY, "--model_name_or_path", pretrained, "--train_dir", folders, "--train_val_split", "0.25"]
    args += ["--max_train_samples", "4", "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "o")]
    with pytest.raises(ValueError, match=r"have no readable training image.*--max_train_samples 4 keeps a random"):
        ric.main(args)


def test_finetunes_that_cannot_learn_fail_before_training(pretrained, tmp_path):
    common = [
        *TINY,
        "--model_name_or_path",
        pretrained,
        "--per_device_train_batch_size",
        "4",
        "--train_val_split",
        "0.25",
    ]
    single = _class_folders(tmp_path / "single", ["cat"])
    with pytest.raises(
        ValueError, match=r"at least 2 classes with training images; the training data has 1 \(\['cat'\]\)"
    ):
        ric.main([*common, "--train_dir", single, "--output_dir", str(tmp_path / "o1")])
    empty = _class_folders(tmp_path / "empty", ["cat", "dog"], unreadable=["owl"])
    with pytest.raises(
        ValueError, match=r"Class\(es\) \['owl'\] have no readable training image.*--drop_empty_classes"
    ):
        ric.main([*common, "--train_dir", empty, "--output_dir", str(tmp_path / "o2")])
    with pytest.raises(ValueError, match="Only 12 training images: fewer than one global batch"):
        ric.main(
            [
                *common,
                "--train_dir",
                _class_folders(tmp_path / "few", ["cat", "dog"]),
                "--per_device_train_batch_size",
                "16",
                "--output_dir",
                str(tmp_path / "o3"),
            ]
        )


def test_drop_empty_classes_trains_without_them_and_reports_top1_only(pretrained, tmp_path, caplog):
    train = _class_folders(tmp_path / "train", ["cat", "dog"], unreadable=["owl"])
    validation = _class_folders(tmp_path / "val", ["cat", "dog", "owl"])  # owl images exist only here
    output = str(tmp_path / "out")
    with caplog.at_level("WARNING"):
        results = ric.main(
            [
                *TINY,
                "--model_name_or_path",
                pretrained,
                "--per_device_train_batch_size",
                "4",
                "--train_dir",
                train,
                "--validation_dir",
                validation,
                "--drop_empty_classes",
                "true",
                "--output_dir",
                output,
            ]
        )
    assert "Dropping 1 class(es) without training images from the classifier: ['owl']" in caplog.text
    assert "Left out 8 evaluation image(s) of the dropped classes" in caplog.text
    with open(os.path.join(output, "config.json")) as handle:
        assert sorted(json.load(handle)["id2label"].values()) == ["cat", "dog"]
    assert results["eval_samples"] == 16 and "eval_accuracy" in results
    assert "eval_top5_accuracy" not in results  # 2 classes: top-5 would be 100% by construction
    assert results["num_skipped_images"] == 8


def test_labels_are_matched_to_the_model_by_name():
    import datasets

    from modeling_simmim.data import LoadedImageData

    strings = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"image": ["a", "b", "c"], "label": ["dog", "cat", "dog"]})}
    )
    loaded = LoadedImageData(strings, "image", "label", "test")
    names = ric.label_names(loaded)
    assert names == ["cat", "dog"]
    mapping = ric.label_mapping(loaded, names, {"cat": 0, "dog": 1})
    assert mapping(0, {"labels": "dog"}) == {"labels": 1}
    features = datasets.Features({"image": datasets.Value("string"), "label": datasets.ClassLabel(names=["x", "y"])})
    ids = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"image": ["a"], "label": [1]}, features=features)}
    )
    loaded = LoadedImageData(ids, "image", "label", "test")
    assert ric.label_mapping(loaded, ["x", "y"], {"x": 0, "y": 1}) is None  # already the model's ids
    swapped = ric.label_mapping(loaded, ["x", "y"], {"y": 0, "x": 1})  # evaluation of a model with another order
    assert swapped(0, {"labels": 1}) == {"labels": 0}
    with pytest.raises(ValueError, match="not classes of the model"):
        ric.label_mapping(loaded, ["x", "y"], {"x": 0})


def test_evaluation_sees_every_image_and_no_mixup(tmp_path):
    config = SimMIMConfig.from_preset("swin_test", image_size=32)
    config.num_labels = 3
    examples = [{"pixel_values": torch.randn(3, 32, 32), "labels": i % 3} for i in range(5)]
    args = ric.FinetuneTrainingArguments(
        output_dir=str(tmp_path),
        per_device_eval_batch_size=4,
        report_to="none",
        dataloader_drop_last=True,
        eval_strategy="no",
        load_best_model_at_end=False,
    )
    trainer = ric.ImageClassificationTrainer(
        model=SimMIMForImageClassification(config),
        args=args,
        eval_dataset=examples,
        data_collator=ric.MixupCollator(num_labels=3),
        eval_data_collator=ric.collate_classification,
    )
    batches = list(trainer.get_eval_dataloader())
    assert sum(len(batch["labels"]) for batch in batches) == 5  # the last, incomplete batch is kept
    assert all(batch["labels"].dtype == torch.long for batch in batches)  # class ids: evaluation is never mixed
    assert trainer.args.dataloader_drop_last  # training keeps the official drop_last
