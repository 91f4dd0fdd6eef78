"""modeling_simmim.evaluation: weighted kNN (against a loop-by-loop reference), the kNN monitor in run_mim.py, the
linear probe (head, folding, frozen encoder, `--linear_probe` / `--from_scratch` in run_image_classification.py)."""

import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import run_image_classification as ric
import run_mim
from modeling_simmim import SimMIMConfig, SimMIMForMaskedImageModeling
from modeling_simmim.evaluation import (
    KNNMonitorCallback,
    LinearProbeHead,
    extract_features,
    finish_linear_probe,
    knn_accuracy,
    knn_datasets_from_folder,
    knn_predict,
    linear_probe_accuracy,
    logistic_regression_accuracy,
    pixel_features,
    pooled_features,
    prepare_linear_probe,
)
from modeling_simmim.modeling_simmim import SimMIMForImageClassification


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _reference_knn(bank, bank_labels, queries, k, temperature, num_classes, leave_one_out=False):
    """InstDisc / DINO weighted kNN, one query at a time, in float64 numpy."""
    bank = bank.double().numpy()
    queries = queries.double().numpy()
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    predictions = []
    for i, query in enumerate(queries):
        similarity = bank @ query
        candidates = [j for j in range(len(bank)) if not (leave_one_out and j == i)]
        nearest = sorted(candidates, key=lambda j: -similarity[j])[:k]
        votes = np.zeros(num_classes)
        for j in nearest:
            votes[int(bank_labels[j])] += math.exp(similarity[j] / temperature)
        predictions.append(int(np.argmax(votes)))
    return predictions


def _clusters(num_per_class, num_classes=3, dim=8, spread=0.6, seed=0, noise_seed=None):
    """Gaussian clusters around class centers drawn from `seed`; the noise from `noise_seed` (default `seed`)."""
    centers = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(seed)) * 2
    labels = torch.arange(num_classes).repeat_interleave(num_per_class)
    noise = torch.randn(
        len(labels), dim, generator=torch.Generator().manual_seed(seed if noise_seed is None else noise_seed)
    )
    return centers[labels] + spread * noise, labels


# ---- kNN ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,temperature", [(20, 0.07), (5, 0.5), (1, 1.0)])
def test_knn_matches_the_reference_vote(k, temperature):
    bank, bank_labels = _clusters(15, spread=1.5)
    queries, _ = _clusters(7, spread=1.5, noise_seed=1)
    ours = knn_predict(bank, bank_labels, queries, k=k, temperature=temperature, num_classes=3, chunk_size=4)
    assert ours.tolist() == _reference_knn(bank, bank_labels, queries, k, temperature, 3)


def test_knn_weights_votes_by_similarity_not_count():
    # two far neighbours of class 1 against one identical neighbour of class 0: exp(1/T) wins at T = 0.07
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.2]])
    assert knn_predict(bank, labels, query, k=3, temperature=0.07).item() == 0
    assert knn_predict(bank, labels, query, k=3, temperature=100.0).item() == 1  # nearly uniform weights: count wins


def test_knn_leave_one_out_ignores_each_query_itself():
    bank, labels = _clusters(10, spread=2.0, seed=3)
    ours = knn_predict(bank, labels, bank, k=5, temperature=0.07, leave_one_out=True, chunk_size=7)
    assert ours.tolist() == _reference_knn(bank, labels, bank, 5, 0.07, 3, leave_one_out=True)
    # with itself in the bank, k = 1 would always be right: leave-one-out is not
    noisy_labels = torch.randint(0, 3, (30,), generator=torch.Generator().manual_seed(0))
    assert knn_accuracy(bank, noisy_labels, bank, noisy_labels, k=1) == 1.0
    assert knn_accuracy(bank, noisy_labels, k=1) < 0.7


def test_knn_accuracy_and_errors():
    bank, labels = _clusters(20, spread=0.3)
    queries, query_labels = _clusters(5, spread=0.3, noise_seed=2)
    assert knn_accuracy(bank, labels, queries, query_labels) == 1.0
    assert knn_accuracy(bank[:2], labels[:2], queries, query_labels, k=20) >= 0.0  # k larger than the bank: clamped
    with pytest.raises(ValueError, match="same C"):
        knn_predict(bank, labels, queries[:, :3])
    with pytest.raises(ValueError, match="labels"):
        knn_predict(bank, labels[:-1], queries)
    with pytest.raises(ValueError, match="k must be"):
        knn_predict(bank, labels, queries, k=0)
    with pytest.raises(ValueError, match="besides the query"):
        knn_predict(bank[:1], labels[:1], bank[:1], leave_one_out=True)
    with pytest.raises(ValueError, match="pass query_labels"):
        knn_accuracy(bank, labels, queries)


# ---- features ----------------------------------------------------------------------------------------------------
def test_pretraining_and_classifier_features_agree(tmp_path):
    config = SimMIMConfig.from_preset("swin_test", image_size=32, mask_patch_size=16)
    mim = SimMIMForMaskedImageModeling(config)
    mim.save_pretrained(tmp_path)
    classifier = SimMIMForImageClassification.from_pretrained(str(tmp_path), num_labels=3)
    images = torch.randn(5, 3, 32, 32)
    mim.train()
    features = extract_features(mim, images, batch_size=2)
    assert features.shape == (5, config.hidden_size) and mim.training  # eval for the features, mode restored
    torch.testing.assert_close(features, extract_features(classifier, images), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features[:2], pooled_features(mim.eval(), images[:2]), atol=1e-6, rtol=0)
    assert pixel_features(images).shape == (5, 3 * 32 * 32)
    with pytest.raises(TypeError, match="not a SimMIM model"):
        pooled_features(torch.nn.Linear(2, 2), images)


# ---- kNN monitor -------------------------------------------------------------------------------------------------
def _labelled_folder(root, classes=("a", "b", "c"), per_class=4, size=32):
    rng = np.random.default_rng(0)
    for index, name in enumerate(classes):
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for j in range(per_class):
            pixels = np.clip(rng.normal(60 + 70 * index, 20, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, name, f"{j}.png"))
    return str(root)


def test_knn_folder_layouts_and_errors(tmp_path):
    transform = lambda image: torch.zeros(3, 8, 8)  # noqa: E731
    bank, queries = knn_datasets_from_folder(_labelled_folder(tmp_path / "flat"), transform)
    assert len(bank) == 12 and queries is None and bank[0]["labels"] == 0
    _labelled_folder(tmp_path / "split" / "train")
    _labelled_folder(tmp_path / "split" / "val", per_class=2)
    bank, queries = knn_datasets_from_folder(str(tmp_path / "split"), transform)
    assert (len(bank), len(queries)) == (12, 6)
    with pytest.raises(FileNotFoundError, match="knn_eval_dir"):
        knn_datasets_from_folder(str(tmp_path / "missing"), transform)
    os.makedirs(tmp_path / "flat_files")
    Image.new("RGB", (8, 8)).save(tmp_path / "flat_files" / "x.png")
    with pytest.raises(ValueError, match="class sub-folder"):
        knn_datasets_from_folder(str(tmp_path / "flat_files"), transform)
    with pytest.raises(ValueError, match="single class"):
        knn_datasets_from_folder(_labelled_folder(tmp_path / "one", classes=("a",)), transform)
    with pytest.raises(ValueError, match="every_n_steps"):
        KNNMonitorCallback(bank, every_n_steps=-1)


def test_run_mim_logs_knn_top1_every_n_steps_and_at_the_end(tmp_path):
    folder = _labelled_folder(tmp_path / "knn", per_class=5)
    output_dir = str(tmp_path / "out")
    run_mim.main(
        [
            "--model_preset",
            "swin_test",
            "--image_size",
            "32",
            "--mask_patch_size",
            "16",
            "--per_device_train_batch_size",
            "8",
            "--max_steps",
            "5",
            "--warmup_steps",
            "1",
            "--max_train_samples",
            "40",
            "--max_eval_samples",
            "8",
            "--save_strategy",
            "no",
            "--use_cpu",
            "--disable_tqdm",
            "true",
            "--report_to",
            "tensorboard",
            "--logging_steps",
            "1",
            "--knn_eval_dir",
            folder,
            "--knn_eval_steps",
            "2",
            "--output_dir",
            output_dir,
        ]
    )
    with open(os.path.join(output_dir, "trainer_state.json")) as handle:
        history = json.load(handle)["log_history"]
    knn = [entry for entry in history if "knn_top1" in entry]
    assert [entry["step"] for entry in knn] == [2, 4, 5]
    assert all(0.0 <= entry["knn_top1"] <= 1.0 for entry in knn)
    events = [
        os.path.join(root, name)
        for root, _, names in os.walk(os.path.join(output_dir, "runs"))
        for name in names
        if name.startswith("events.out.tfevents")
    ]
    assert events and any(b"knn_top1" in open(path, "rb").read() for path in events)


def test_knn_monitor_measures_the_model(tmp_path):
    # images whose class is their brightness: even a random encoder's features mostly separate them
    bank, _ = knn_datasets_from_folder(
        _labelled_folder(tmp_path / "knn", per_class=6),
        lambda image: torch.from_numpy(np.asarray(image, dtype=np.float32) / 64 - 2).permute(2, 0, 1),
    )
    model = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("swin_test", image_size=32, mask_patch_size=16))
    monitor = KNNMonitorCallback(bank, k=3, batch_size=5)
    images = torch.stack([bank[i]["pixel_values"] for i in range(len(bank))])
    labels = torch.tensor([bank[i]["labels"] for i in range(len(bank))])
    expected = knn_accuracy(extract_features(model, images), labels, k=3)
    assert monitor.evaluate(model) == pytest.approx(expected) and expected > 0.5  # chance: 1/3
    with pytest.raises(RuntimeError, match="not attached"):
        from transformers import TrainerState

        monitor.on_step_end(None, TrainerState(global_step=1, max_steps=1), None, model=model)


# ---- linear probe ------------------------------------------------------------------------------------------------
def test_linear_probe_head_folds_into_one_linear_layer():
    head = LinearProbeHead(6, 4)
    head.train()
    for _ in range(5):
        head(torch.randn(32, 6) * 3 + 1)
    head.eval()
    features = torch.randn(7, 6) * 3 + 1
    folded = head.fold()
    assert isinstance(folded, torch.nn.Linear)
    torch.testing.assert_close(folded(features), head(features), atol=1e-5, rtol=1e-5)


def test_prepare_linear_probe_freezes_the_encoder_in_eval_mode():
    config = SimMIMConfig.from_preset("swin_test", image_size=32, mask_patch_size=16, num_labels=3, drop_path_rate=0.5)
    model = prepare_linear_probe(SimMIMForImageClassification(config))
    assert [name for name, p in model.named_parameters() if p.requires_grad] == [
        "classifier.linear.weight",
        "classifier.linear.bias",
    ]
    model.train()
    images = torch.randn(4, 3, 32, 32)
    first, second = model.pooled_features(images)[0], model.pooled_features(images)[0]
    torch.testing.assert_close(first, second, atol=0, rtol=0)  # drop path 0.5 would differ in train mode
    model(images, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("classifier."))
    model.eval()
    before = model(images).logits
    finish_linear_probe(model)
    assert isinstance(model.classifier, torch.nn.Linear)
    torch.testing.assert_close(model(images).logits, before, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="linear head"):
        prepare_linear_probe(model.swin)
    headless = torch.nn.Module()
    headless.classifier = torch.nn.Linear(4, 2)
    with pytest.raises(ValueError, match="module `backbone`"):
        prepare_linear_probe(headless)
    assert headless.classifier.weight.requires_grad  # refused before freezing anything


def test_probes_on_cached_features_learn_separable_data():
    train, train_labels = _clusters(40, num_classes=4, dim=16, spread=0.8)
    test, test_labels = _clusters(10, num_classes=4, dim=16, spread=0.8, noise_seed=5)
    accuracy = linear_probe_accuracy(train, train_labels, test, test_labels, epochs=30, learning_rate=1e-2)
    assert accuracy >= 0.95
    assert accuracy == linear_probe_accuracy(train, train_labels, test, test_labels, epochs=30, learning_rate=1e-2)
    shuffled = train_labels[torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(1))]
    assert linear_probe_accuracy(train, shuffled, test, test_labels, epochs=30, learning_rate=1e-2) < 0.6
    assert logistic_regression_accuracy(train, train_labels, test, test_labels) >= 0.95


# ---- run_image_classification.py: --from_scratch, --linear_probe -------------------------------------------------
TINY_FT = [
    "--image_size",
    "32",
    "--per_device_train_batch_size",
    "16",
    "--per_device_eval_batch_size",
    "32",
    "--max_train_samples",
    "48",
    "--max_eval_samples",
    "32",
    "--num_train_epochs",
    "1",
    "--base_learning_rate",
    "1e-3",
    "--scale_learning_rate",
    "false",
    "--warmup_epochs",
    "0",
    "--report_to",
    "none",
    "--dataloader_num_workers",
    "0",
    "--seed",
    "0",
    "--save_strategy",
    "no",
    "--load_best_model_at_end",
    "false",
    "--overwrite_output_dir",
    "true",
    "--disable_tqdm",
    "true",
]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mim")
    config = SimMIMConfig.from_preset("swin_test", image_size=32, mask_patch_size=16)
    SimMIMForMaskedImageModeling(config).save_pretrained(folder)
    return str(folder)


def _encoder_state(model):
    return {name: tensor for name, tensor in model.state_dict().items() if name.startswith("swin.")}


def test_from_scratch_keeps_the_architecture_not_the_weights(pretrained, tmp_path):
    _, _, aug_args, _, _ = ric.parse_args(["--output_dir", str(tmp_path)])
    loaded = ric.build_model(
        ric.parse_args(["--model_name_or_path", pretrained, "--output_dir", str(tmp_path)])[0],
        aug_args,
        {0: "a", 1: "b"},
    )
    scratch = ric.build_model(
        ric.parse_args(["--model_name_or_path", pretrained, "--from_scratch", "true", "--output_dir", str(tmp_path)])[
            0
        ],
        aug_args,
        {0: "a", 1: "b"},
    )
    assert scratch.config.to_dict() == loaded.config.to_dict()
    loaded_state, scratch_state = _encoder_state(loaded), _encoder_state(scratch)
    assert loaded_state.keys() == scratch_state.keys()
    weights = [name for name in loaded_state if name.endswith(".weight") and loaded_state[name].ndim > 1]
    assert weights and all(not torch.equal(loaded_state[name], scratch_state[name]) for name in weights)
    with pytest.raises(ValueError, match="--from_scratch true takes its architecture"):
        ric.main(["--model_type", "swin", "--from_scratch", "true", "--output_dir", str(tmp_path / "x")])


def test_linear_probe_trains_only_the_head_and_exports_a_linear_classifier(pretrained, tmp_path):
    output = str(tmp_path / "probe")
    results = ric.main(
        [
            "--model_name_or_path",
            pretrained,
            "--linear_probe",
            "true",
            "--weight_decay",
            "0",
            "--drop_path_rate",
            "0.3",
            *TINY_FT,
            "--output_dir",
            output,
        ]
    )
    assert 0.0 <= results["eval_accuracy"] <= 1.0
    exported = SimMIMForImageClassification.from_pretrained(output)
    source = SimMIMForImageClassification.from_pretrained(pretrained, num_labels=10)
    for name, tensor in _encoder_state(source).items():
        torch.testing.assert_close(exported.state_dict()[name], tensor, atol=0, rtol=0)
    assert isinstance(exported.classifier, torch.nn.Linear)
    with open(os.path.join(output, "config.json")) as handle:
        assert json.load(handle)["architectures"] == ["SwinForImageClassification"]
