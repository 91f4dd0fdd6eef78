"""SimMIMForImageClassification: heads, losses, and transfer from pretraining / native checkpoints."""

import json

import pytest
import torch
from transformers import SwinConfig, SwinForImageClassification

from modeling_simmim import SimMIMConfig, SimMIMForMaskedImageModeling
from modeling_simmim.augmentation import MixupCollator
from modeling_simmim.modeling_simmim import SimMIMForImageClassification, classification_loss

TABLE = "relative_position_bias.relative_position_bias_table"


def _mim(tmp_path, preset="swin_test", **overrides):
    """A saved SimMIM pretraining checkpoint (tiny). Swin analog of 192/w6: 48 px, window 6 (stages 12, 6)."""
    config = SimMIMConfig.from_preset(preset, mask_patch_size=8 if preset.startswith("swin") else 16, **overrides)
    model = SimMIMForMaskedImageModeling(config)
    folder = tmp_path / f"mim_{preset}"
    model.save_pretrained(folder)
    return model, folder


def _symmetrize_tables(model):
    """Make every bias table symmetric in the relative offset: b(dy, dx) == b(-dy, -dx)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                side = int(param.shape[0] ** 0.5)
                grid = param.view(side, side, -1)
                param.copy_((grid + grid.flip(0).flip(1)).reshape(param.shape) / 2)


def test_transfer_192w6_to_224w7_keeps_every_backbone_weight(tmp_path):
    mim, folder = _mim(tmp_path, image_size=48, window_size=6)
    _symmetrize_tables(mim)
    mim.save_pretrained(folder)
    model = SimMIMForImageClassification.from_pretrained(
        folder, num_labels=5, image_size=56, window_size=7, drop_path_rate=0.1
    )
    report = model.loading_report
    assert model.config.backbone_config.window_size == 7 and model.config.backbone_config.image_size == 56
    assert model.config.backbone_config.drop_path_rate == 0.1
    assert sorted(report.newly_initialized) == ["classifier.bias", "classifier.weight"]  # nothing else is new
    assert set(report.unused) == {"decoder.0.weight", "decoder.0.bias", "swin.embeddings.mask_token"}
    tables = [k for k in model.state_dict() if k.endswith("relative_position_bias_table")]
    assert tables and set(tables) == set(report.resized)
    source = mim.state_dict()
    target = model.state_dict()
    for key, value in source.items():
        if key.startswith("swin.") and "mask_token" not in key and not key.endswith("relative_position_bias_table"):
            torch.testing.assert_close(target[key], value, rtol=0, atol=0)
    for key in tables:
        assert target[key].shape[0] == 13 * 13 and source[key].shape[0] == 11 * 11
        grid = target[key].view(13, 13, -1)
        torch.testing.assert_close(grid, grid.flip(0).flip(1), atol=1e-5, rtol=0)  # symmetric like the source
        torch.testing.assert_close(grid[6, 6], source[key].view(11, 11, -1)[5, 5], atol=1e-5, rtol=0)  # centre
    logits = model(torch.randn(2, 3, 56, 56)).logits
    assert logits.shape == (2, 5)
    text = str(report)
    assert "SimMIMForImageClassification LOAD REPORT from:" in text
    rows = {line.split("|")[0].strip(): line.split("|")[1].strip() for line in text.splitlines()[4:]}
    assert rows[f"swin.encoder.layers.*.blocks.*.attention.{TABLE} (x2)"] == "RESIZED"
    assert rows["classifier.weight"] == rows["classifier.bias"] == "NEW"
    assert rows["decoder.0.weight"] == rows["swin.embeddings.mask_token"] == "UNUSED"
    assert "6x6 -> 7x7 (geometric bicubic)" in text


def test_classification_checkpoint_round_trip_and_labels(tmp_path):
    _, folder = _mim(tmp_path, image_size=48, window_size=6)
    labels = {0: "a", 1: "b", 2: "c"}
    model = SimMIMForImageClassification.from_pretrained(folder, id2label=labels, label_smoothing=0.1)
    assert model.config.num_labels == 3 and model.config.label2id == {"a": 0, "b": 1, "c": 2}
    model.save_pretrained(tmp_path / "clf")
    saved = json.loads((tmp_path / "clf" / "config.json").read_text())
    assert saved["architectures"] == ["SwinForImageClassification"] and saved["model_type"] == "swin"  # native
    assert saved.get("problem_type") is None and saved["label_smoothing"] == 0.1
    again = SimMIMForImageClassification.from_pretrained(tmp_path / "clf")
    assert again.loading_report.newly_initialized == [] and again.config.label_smoothing == 0.1
    x = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(again(x).logits, model.eval()(x).logits)


def test_native_transformers_checkpoint_loads(tmp_path):
    native_config = SwinConfig(
        image_size=48, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=6, num_labels=4
    )
    native = SwinForImageClassification(native_config).eval()
    native.save_pretrained(tmp_path / "native")
    model = SimMIMForImageClassification.from_pretrained(tmp_path / "native")
    assert model.loading_report.newly_initialized == [] and model.config.num_labels == 4
    x = torch.randn(2, 3, 48, 48)
    torch.testing.assert_close(model(x).logits, native(x).logits, atol=1e-5, rtol=0)
    # and at another window: tables resized, head kept
    bigger = SimMIMForImageClassification.from_pretrained(tmp_path / "native", image_size=56, window_size=7)
    assert bigger.loading_report.newly_initialized == [] and len(bigger.loading_report.resized) == 2


@pytest.mark.parametrize("preset", ["beit_test", "vit_test", "swinv2_test"])
def test_transfer_other_families(tmp_path, preset):
    mim, folder = _mim(tmp_path, preset)
    if preset == "swinv2_test":
        model = SimMIMForImageClassification.from_pretrained(folder, num_labels=3, window_size=8)
        assert model.loading_report.resized == {}  # continuous position bias: nothing to resize
        assert list(model.config.backbone_config.pretrained_window_sizes) == [4, 4]
        size = 64
    else:
        model = SimMIMForImageClassification.from_pretrained(folder, num_labels=3, image_size=80)
        size = 80
    report = model.loading_report
    new = set(report.newly_initialized)
    if preset == "beit_test":
        # official finetuning: one table per block copied from the shared one, mean pooling + fc_norm
        assert new == {
            "classifier.weight",
            "classifier.bias",
            "beit.pooler.layernorm.weight",
            "beit.pooler.layernorm.bias",
        }
        shared = mim.state_dict()["beit.shared_position_bias.relative_position_bias_table"]
        for i in range(2):
            table = model.state_dict()[f"beit.layers.{i}.relative_position_bias.relative_position_bias_table"]
            assert table.shape[0] == 19 * 19 + 3
            torch.testing.assert_close(table[-3:], shared[-3:])  # CLS entries carried over
            assert (
                "copied from the shared table"
                in report.resized[f"beit.layers.{i}.relative_position_bias.relative_position_bias_table"]
            )
        assert model.config.backbone_config.use_mean_pooling
    else:
        assert new == {"classifier.weight", "classifier.bias"}
    if preset == "vit_test":
        assert report.resized == {"vit.embeddings.position_embeddings": "8x8 -> 10x10 (bicubic)"}
    assert model(torch.randn(2, 3, size, size)).logits.shape == (2, 3)


def test_wrong_family_is_refused(tmp_path):
    _, folder = _mim(tmp_path, "swin_test")
    with pytest.raises(ValueError, match="holds a swin backbone but the given config is vit"):
        SimMIMForImageClassification.from_pretrained(folder, config=SimMIMConfig.from_preset("vit_test"))
    with pytest.raises(ValueError, match="window_size applies to Swin"):
        SimMIMForImageClassification.from_pretrained(_mim(tmp_path, "vit_test")[1], window_size=7)
    from modeling_simmim.weight_transfer import adapt_state_dict

    model = SimMIMForImageClassification(SimMIMConfig.from_preset("vit_test"))
    with pytest.raises(ValueError, match="holds a swinv2 backbone but the model is vit"):
        adapt_state_dict({"swinv2.embeddings.norm.weight": torch.ones(2)}, model, "vit")


def test_corrupt_checkpoint_is_reported(tmp_path):
    _, folder = _mim(tmp_path, "swin_test")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(OSError, match="corrupt or truncated"):
        SimMIMForImageClassification.from_pretrained(folder, num_labels=2)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(OSError, match="valid JSON"):
        SimMIMForImageClassification.from_pretrained(folder, num_labels=2)


def test_losses():
    logits = torch.randn(4, 5)
    ids = torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(classification_loss(logits, ids), torch.nn.functional.cross_entropy(logits, ids))
    smooth = classification_loss(logits, ids, label_smoothing=0.1)
    expected = 0.9 * torch.nn.functional.cross_entropy(logits, ids) + 0.1 * (-logits.log_softmax(-1)).mean(-1).mean()
    torch.testing.assert_close(smooth, expected)
    soft = torch.softmax(torch.randn(4, 5), -1)
    torch.testing.assert_close(classification_loss(logits, soft), (-soft * logits.log_softmax(-1)).sum(-1).mean())
    with pytest.raises(ValueError, match="soft targets of shape"):
        classification_loss(logits, torch.rand(4))


def test_mixup_targets_train_with_soft_cross_entropy():
    torch.manual_seed(0)
    config = SimMIMConfig.from_preset("swin_test")
    config.num_labels = 3
    model = SimMIMForImageClassification(config).train()
    examples = [{"pixel_values": torch.randn(3, 64, 64), "labels": i % 3} for i in range(4)]
    batch = MixupCollator(num_labels=3, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)(examples)
    labels = batch["labels"]
    assert labels.dtype == torch.float32 and labels.shape == (4, 3)
    torch.testing.assert_close(labels.sum(-1), torch.ones(4))
    assert labels.min() >= 0.1 / 3 - 1e-6  # smoothing folded into the targets
    output = model(**batch)
    expected = (-labels * output.logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(output.loss, expected)
    output.loss.backward()
    assert model.classifier.weight.grad is not None
    assert getattr(model.config, "problem_type", None) is None  # never switched to multi-label BCE


def test_stochastic_depth_and_pooling():
    config = SimMIMConfig.from_preset("swin_test", drop_path_rate=0.2)
    config.num_labels = 2
    model = SimMIMForImageClassification(config)
    assert any("DropPath" in type(m).__name__ for m in model.modules())
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    features, outputs = model.pooled_features(x)
    torch.testing.assert_close(features, outputs.last_hidden_state.mean(1))  # average of the final normed tokens
    vit = SimMIMConfig.from_preset("vit_test")
    vit.classifier_pooling = "mean"
    vit_model = SimMIMForImageClassification(vit).eval()
    features, outputs = vit_model.pooled_features(x)
    torch.testing.assert_close(features, outputs.last_hidden_state[:, 1:].mean(1))
