"""How good is an encoder's representation: kNN on frozen features (a pretraining monitor), linear probes.

- `extract_features(model, images)` / `dataset_features(model, dataset)`: pooled final encoder features (B, C) of a
  `SimMIMForMaskedImageModeling` (the mean of its final feature map, nothing masked) or a
  `SimMIMForImageClassification` (its pooled features, the classifier's input).
- `knn_predict` / `knn_accuracy`: the weighted kNN of InstDisc (Wu et al. 2018) and DINO's `eval_knn.py`: cosine
  similarity to every labelled bank feature, the k = 20 nearest vote for their class with weight exp(sim / 0.07).
  `leave_one_out=True` classifies each image of one labelled set by all the others.
- `KNNMonitorCallback` (`add_knn_monitor(trainer, ...)`): logs `knn_top1` every N optimizer steps and at the last
  step into the Trainer's log history (trainer_state.json) and its reporters (TensorBoard).
- `LinearProbeHead`, `prepare_linear_probe`, `finish_linear_probe`: MAE's linear probe (He et al. 2022,
  `main_linprobe.py`): frozen encoder in eval mode, BatchNorm without affine parameters + a linear layer on the
  pooled features; folded into one `nn.Linear` afterwards, so the classifier exports as a plain transformers model.
- `linear_probe_accuracy`: the same head trained on cached features (fast; for benchmarks), `pixel_features` the
  raw-pixel baseline's input, `logistic_regression_accuracy` scikit-learn's logistic regression (the classic
  raw-pixel baseline).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging

logger = logging.get_logger(__name__)

KNN_K = 20
KNN_TEMPERATURE = 0.07
VALIDATION_FOLDER_NAMES = ("val", "validation", "test")


# ----------------------------------------------------------------------------------------------------------------
# Features
def pooled_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, C) pooled final encoder features: a classifier's `pooled_features`, or for a SimMIM pretraining model the
    spatial mean of the encoder's final feature map (the same quantity: Swin's pooler averages the final normed
    tokens) with nothing masked."""
    # Duck-typed (getattr, not isinstance): models loaded with trust_remote_code come from other module objects.
    pooled = getattr(model, "pooled_features", None)
    if pooled is not None:
        return pooled(pixel_values)[0]
    adapter = getattr(model, "backbone_adapter", None)
    if adapter is not None:
        feature_map, _ = adapter.feature_map(model.backbone, pixel_values)
        return feature_map.mean(dim=(2, 3))
    raise TypeError(f"{type(model).__name__} is not a SimMIM model (no pooled_features / backbone_adapter).")


def _batches(data: torch.Tensor | Iterable, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor | None]]:
    if isinstance(data, torch.Tensor):
        for start in range(0, len(data), batch_size):
            yield data[start : start + batch_size], None
        return
    for batch in data:
        yield batch["pixel_values"], batch.get("labels")


@torch.no_grad()
def _encode(model: nn.Module, data, batch_size: int, autocast_dtype: torch.dtype | None):
    parameter = next(model.parameters())
    was_training = model.training
    model.eval()
    features, labels = [], []
    try:
        for pixel_values, batch_labels in _batches(data, batch_size):
            pixel_values = pixel_values.to(parameter.device, non_blocking=True)
            with torch.autocast(parameter.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                features.append(pooled_features(model, pixel_values).float().cpu())
            if batch_labels is not None:
                labels.append(torch.as_tensor(batch_labels).cpu())
    finally:
        model.train(was_training)
    return torch.cat(features), (torch.cat(labels) if labels else None)


def extract_features(
    model: nn.Module, images: torch.Tensor, batch_size: int = 256, autocast_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Pooled features (N, C), float32 on the CPU, of normalized images (N, 3, H, W), in eval mode, no gradients."""
    return _encode(model, images, batch_size, autocast_dtype)[0]


def dataset_features(
    model: nn.Module,
    dataset: Any,
    batch_size: int = 256,
    num_workers: int = 0,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, C), labels (N,)) of a dataset of {"pixel_values", "labels"} examples (e.g. a
    `RobustImageDataset` with a label column; unreadable images are skipped)."""
    from .augmentation import collate_classification
    from .data import SKIPPED_KEY, SkipNoneCollator

    collate = SkipNoneCollator(collate_classification)

    def collate_without_count(examples):
        batch = collate(examples)
        batch.pop(SKIPPED_KEY, None)
        return batch

    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_without_count
    )
    features, labels = _encode(model, loader, batch_size, autocast_dtype)
    if labels is None:
        raise ValueError("dataset_features needs labelled examples (a 'labels' entry per example).")
    return features, labels


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """The raw-pixel baseline's features: each image flattened (N, C*H*W), float32."""
    return images.reshape(len(images), -1).float()


# ----------------------------------------------------------------------------------------------------------------
# kNN
@torch.no_grad()
def knn_predict(
    bank_features: torch.Tensor,
    bank_labels: torch.Tensor,
    query_features: torch.Tensor,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    num_classes: int | None = None,
    leave_one_out: bool = False,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class ids (N_query,) by temperature-weighted kNN on cosine similarity (InstDisc / DINO): the `k` most similar
    bank features vote for their class with weight exp(similarity / temperature).

    `leave_one_out=True`: the queries ARE the bank (same rows, same order) and each one ignores itself."""
    if bank_features.ndim != 2 or query_features.ndim != 2 or bank_features.shape[1] != query_features.shape[1]:
        raise ValueError(
            f"features must be (N, C) with the same C, got {tuple(bank_features.shape)} and "
            f"{tuple(query_features.shape)}."
        )
    if len(bank_features) != len(bank_labels):
        raise ValueError(f"{len(bank_features)} bank features but {len(bank_labels)} labels.")
    if leave_one_out and len(bank_features) != len(query_features):
        raise ValueError("leave_one_out=True needs the queries to be the bank itself.")
    available = len(bank_features) - int(leave_one_out)
    if available < 1:
        raise ValueError("kNN needs at least one labelled bank feature besides the query.")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}.")
    k = min(k, available)
    bank_labels = bank_labels.long()
    num_classes = int(num_classes if num_classes is not None else bank_labels.max().item() + 1)
    bank = nn.functional.normalize(bank_features.float(), dim=1)
    queries = nn.functional.normalize(query_features.float(), dim=1)
    predictions = []
    for start in range(0, len(queries), chunk_size):
        similarity = queries[start : start + chunk_size] @ bank.T
        if leave_one_out:
            rows = torch.arange(len(similarity))
            similarity[rows, rows + start] = -math.inf
        top_similarity, top_index = similarity.topk(k, dim=1)
        weights = (top_similarity / temperature).exp()
        votes = torch.zeros(len(similarity), num_classes)
        votes.scatter_add_(1, bank_labels[top_index], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions)


def knn_accuracy(
    bank_features: torch.Tensor,
    bank_labels: torch.Tensor,
    query_features: torch.Tensor | None = None,
    query_labels: torch.Tensor | None = None,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
) -> float:
    """Top-1 of `knn_predict`; without queries, leave-one-out over the bank."""
    leave_one_out = query_features is None
    if query_features is None:
        query_features, query_labels = bank_features, bank_labels
    elif query_labels is None:
        raise ValueError("knn_accuracy: pass query_labels with query_features (or neither, for leave-one-out).")
    num_classes = int(max(bank_labels.max().item(), query_labels.max().item()) + 1)
    predictions = knn_predict(
        bank_features,
        bank_labels,
        query_features,
        k=k,
        temperature=temperature,
        num_classes=num_classes,
        leave_one_out=leave_one_out,
    )
    return (predictions == query_labels.long()).float().mean().item()


class KNNMonitorCallback(TrainerCallback):
    """Logs `knn_top1` (see `knn_accuracy`) every `every_n_steps` optimizer steps (0: only at the end) and at the
    last step, through `trainer.log`: into `trainer_state.json`'s log history and every reporter (TensorBoard).

    `query_dataset=None`: leave-one-out over `bank_dataset`. Datasets yield {"pixel_values", "labels"} with the
    evaluation transform. Every process computes the features (sharded models need all ranks); the Trainer's
    reporters write from the main process only. Use `add_knn_monitor` to create and attach it."""

    def __init__(
        self,
        bank_dataset: Any,
        query_dataset: Any | None = None,
        every_n_steps: int = 0,
        k: int = KNN_K,
        temperature: float = KNN_TEMPERATURE,
        batch_size: int = 256,
    ) -> None:
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0 (0: only at the end of training), got {every_n_steps}.")
        self.bank_dataset, self.query_dataset = bank_dataset, query_dataset
        self.every_n_steps, self.k, self.temperature, self.batch_size = every_n_steps, k, temperature, batch_size
        self.trainer = None
        self.history: list[tuple[int, float]] = []

    def attach(self, trainer) -> KNNMonitorCallback:
        self.trainer = trainer
        return self

    def evaluate(self, model: nn.Module, autocast_dtype: torch.dtype | None = None) -> float:
        bank, bank_labels = dataset_features(model, self.bank_dataset, self.batch_size, autocast_dtype=autocast_dtype)
        if self.query_dataset is None:
            return knn_accuracy(bank, bank_labels, k=self.k, temperature=self.temperature)
        query, query_labels = dataset_features(
            model, self.query_dataset, self.batch_size, autocast_dtype=autocast_dtype
        )
        return knn_accuracy(bank, bank_labels, query, query_labels, k=self.k, temperature=self.temperature)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        due = (self.every_n_steps > 0 and step % self.every_n_steps == 0) or step == state.max_steps
        if not due or model is None or (self.history and self.history[-1][0] == step):
            return
        if self.trainer is None:
            raise RuntimeError(
                "KNNMonitorCallback is not attached to its trainer: use add_knn_monitor(trainer, ...) "
                "or callback.attach(trainer)."
            )
        dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else None
        top1 = self.evaluate(model, autocast_dtype=dtype)
        self.history.append((step, top1))
        self.trainer.log({"knn_top1": round(top1, 4)})


def knn_datasets_from_folder(folder: str, transform: Callable, verify: bool = True) -> tuple[Any, Any | None]:
    """(bank, queries) for the kNN monitor from a labelled image folder: `folder/train/<class>/...` with
    `folder/val|validation|test/<class>/...` gives bank and queries; a plain `folder/<class>/...` gives one set for
    leave-one-out (queries None)."""
    from .data import RobustImageDataset, load_image_folders

    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"--knn_eval_dir {folder!r} is not a folder (it takes labelled images: "
            "one sub-folder per class, or train/ and val/ with one sub-folder per class each)."
        )
    query_dir = next(
        (os.path.join(folder, name) for name in VALIDATION_FOLDER_NAMES if os.path.isdir(os.path.join(folder, name))),
        None,
    )
    train_dir = os.path.join(folder, "train")
    if query_dir is not None and os.path.isdir(train_dir):
        splits, _ = load_image_folders(train_dir, query_dir, verify=verify)
    else:
        splits, _ = load_image_folders(folder, None, verify=verify)
    if "label" not in splits["train"].column_names:
        raise ValueError(f"--knn_eval_dir {folder!r} needs labels: put every image in a class sub-folder.")
    if len(set(splits["train"]["label"])) < 2:
        raise ValueError(f"--knn_eval_dir {folder!r} has a single class: kNN accuracy needs at least two.")
    bank = RobustImageDataset(splits["train"], "image", transform, label_column="label")
    queries = None
    if "validation" in splits:
        queries = RobustImageDataset(splits["validation"], "image", transform, label_column="label")
    return bank, queries


def add_knn_monitor(
    trainer, bank_dataset: Any, query_dataset: Any | None = None, every_n_steps: int = 0, **kwargs: Any
) -> KNNMonitorCallback:
    """Create a `KNNMonitorCallback`, attach it to `trainer` and register it; returns it."""
    callback = KNNMonitorCallback(bank_dataset, query_dataset, every_n_steps=every_n_steps, **kwargs).attach(trainer)
    trainer.add_callback(callback)
    return callback


# ----------------------------------------------------------------------------------------------------------------
# Linear probe
class LinearProbeHead(nn.Module):
    """MAE's linear-probe head: BatchNorm without affine parameters (eps 1e-6), then a linear layer (weights
    trunc-normal std 0.01, bias 0)."""

    def __init__(self, in_features: int, num_labels: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(in_features, affine=False, eps=1e-6)
        self.linear = nn.Linear(in_features, num_labels)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(features))

    @torch.no_grad()
    def fold(self) -> nn.Linear:
        """One `nn.Linear` equal to this head in eval mode (the BatchNorm's running statistics folded in)."""
        running_mean, running_var = self.norm.running_mean, self.norm.running_var
        assert running_mean is not None and running_var is not None  # track_running_stats is on (the default)
        scale = (running_var + self.norm.eps).rsqrt()
        folded = nn.Linear(self.linear.in_features, self.linear.out_features).to(self.linear.weight)
        folded.weight.copy_(self.linear.weight * scale)
        folded.bias.copy_(self.linear.bias - folded.weight @ running_mean)
        return folded


def _keep_eval_mode(module: nn.Module, args: Any) -> None:
    module.eval()


def prepare_linear_probe(model: nn.Module) -> nn.Module:
    """Turn a `SimMIMForImageClassification` into a linear probe in place: every encoder parameter frozen, the encoder
    kept in eval mode (no drop path or dropout) whatever `model.train()` says, the classifier replaced by a
    `LinearProbeHead`. Returns the model."""
    classifier = getattr(model, "classifier", None)
    if not isinstance(classifier, nn.Linear):
        raise ValueError(
            "prepare_linear_probe needs a classifier with a linear head `classifier` "
            "(SimMIMForImageClassification with num_labels > 0)."
        )
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module):
        raise ValueError("prepare_linear_probe needs the encoder as a module `backbone` (a SimMIM model).")
    for name, param in model.named_parameters():
        if not name.startswith("classifier."):
            param.requires_grad_(False)
    backbone.register_forward_pre_hook(_keep_eval_mode)
    model.classifier = LinearProbeHead(classifier.in_features, classifier.out_features).to(classifier.weight)
    return model


def finish_linear_probe(model: nn.Module) -> nn.Module:
    """Fold the trained `LinearProbeHead` into a plain `nn.Linear` classifier (exportable); returns the model."""
    if isinstance(model.classifier, LinearProbeHead):
        model.classifier = model.classifier.fold()
    return model


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    epochs: int = 100,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> float:
    """Top-1 on the test features of a `LinearProbeHead` trained on cached train features: AdamW, cosine schedule,
    a fixed number of epochs (nothing selected on the test set)."""
    generator = torch.Generator().manual_seed(seed)
    num_classes = int(max(train_labels.max().item(), test_labels.max().item()) + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = LinearProbeHead(train_features.shape[1], num_classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=learning_rate, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_features) / batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
    train_features, train_labels = train_features.float(), train_labels.long()
    head.train()
    for _ in range(epochs):
        order = torch.randperm(len(train_features), generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            if len(index) < 2:  # BatchNorm needs two examples
                continue
            loss = nn.functional.cross_entropy(head(train_features[index]), train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    head.eval()
    with torch.no_grad():
        predictions = head(test_features.float()).argmax(dim=1)
    return (predictions == test_labels.long()).float().mean().item()


def logistic_regression_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    max_iter: int = 1000,
) -> float:
    """scikit-learn's `LogisticRegression` (defaults, `max_iter` raised so that it converges) on the given features:
    the classic raw-pixel baseline."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        classifier = LogisticRegression(max_iter=max_iter).fit(train_features.numpy(), train_labels.numpy())
    return float(classifier.score(test_features.numpy(), test_labels.numpy()))


__all__ = [
    "KNN_K",
    "KNN_TEMPERATURE",
    "KNNMonitorCallback",
    "LinearProbeHead",
    "add_knn_monitor",
    "dataset_features",
    "extract_features",
    "finish_linear_probe",
    "knn_accuracy",
    "knn_datasets_from_folder",
    "knn_predict",
    "linear_probe_accuracy",
    "logistic_regression_accuracy",
    "pixel_features",
    "pooled_features",
    "prepare_linear_probe",
]
