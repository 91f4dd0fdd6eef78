"""from_pretrained of our classes honours the transformers contract (dtype, device_map, cache_dir, revision, token,
transformers' loading report, unknown arguments), loads native transformers folders of every family (4.x parameter
names too), and moves checkpoints to another geometry with ONE report table."""

import json
import logging
import os

import pytest
import torch
import transformers
from packaging import version
from transformers import (
    BeitConfig,
    BeitForMaskedImageModeling,
    SwinConfig,
    SwinForImageClassification,
    SwinForMaskedImageModeling,
    SwinModel,
    Swinv2Config,
    Swinv2ForMaskedImageModeling,
    ViTConfig,
    ViTForMaskedImageModeling,
)

from modeling_simmim import SimMIMConfig, SimMIMForMaskedImageModeling, SimMIMMaskGenerator
from modeling_simmim.configuration_simmim import BEIT_SIMMIM_PRETRAIN
from modeling_simmim.modeling_simmim import SimMIMForImageClassification

SMALL = dict(image_size=64, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4, encoder_stride=8)
NATIVE_MIM = {
    "swin": (SwinForMaskedImageModeling, lambda: SwinConfig(**SMALL)),
    "swinv2": (Swinv2ForMaskedImageModeling, lambda: Swinv2Config(**SMALL)),
    "vit": (
        ViTForMaskedImageModeling,
        lambda: ViTConfig(
            image_size=64,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            encoder_stride=8,
        ),
    ),
    # BEiT's own MIM class predicts visual tokens (lm_head): its encoder is what we take
    "beit": (
        BeitForMaskedImageModeling,
        lambda: BeitConfig(
            image_size=64,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            **BEIT_SIMMIM_PRETRAIN,
        ),
    ),
}


def _randomize(model):
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


@pytest.fixture(scope="module")
def mim_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mim")
    SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("swin_test", mask_patch_size=16)).save_pretrained(folder)
    return folder


# ---- native folders of every family, as transformers saves them (4.x parameter names) ---------------------------
@pytest.mark.parametrize("family", list(NATIVE_MIM))
def test_native_folders_load_into_our_classes(tmp_path, family):
    native_class, make_config = NATIVE_MIM[family]
    native = _randomize(native_class(make_config())).eval()
    native.save_pretrained(tmp_path)  # transformers 5 writes the 4.x names of Swin/ViT/BEiT weights by default
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as handle:
        legacy = [key for key in handle.keys() if ".attention.self." in key or ".attention.attention." in key]
    assert legacy, "transformers saved the current names: this test would not cover the 4.x ones"

    ours = SimMIMForMaskedImageModeling.from_pretrained(tmp_path).eval()
    assert ours.config.mask_patch_size == 32 or ours.config.mask_patch_size in (8, 16)  # SimMIM fields: defaults
    prefix = ours.base_model_prefix
    theirs = {k: v for k, v in native.state_dict().items() if k.startswith(prefix + ".")}
    mine = ours.state_dict()
    for key, value in theirs.items():
        if key in mine:
            torch.testing.assert_close(mine[key], value, rtol=0, atol=0, msg=key)
    pixel_values = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = getattr(native, prefix)(pixel_values).last_hidden_state
        torch.testing.assert_close(ours.backbone(pixel_values).last_hidden_state, expected, rtol=1e-5, atol=1e-5)
    if family != "beit":  # same head: the same reconstruction and loss as transformers' class
        mask = SimMIMMaskGenerator(64, 16, ours.config.model_patch_size, 0.6)(2)
        with torch.no_grad():
            got, want = ours(pixel_values, bool_masked_pos=mask), native(pixel_values, bool_masked_pos=mask.flatten(1))
        assert abs(got.loss.item() - want.loss.item()) <= 1e-5
    classifier = SimMIMForImageClassification.from_pretrained(tmp_path, num_labels=3)
    assert set(classifier.loading_report.newly_initialized) >= {"classifier.weight", "classifier.bias"}
    assert len(classifier.loading_report.loaded) > 10


@pytest.mark.skipif(
    version.parse(transformers.__version__) < version.parse("5.24"),
    reason="transformers < 5.24 does not rename 4.x keys of a bare encoder loaded under a prefix",
)
def test_a_bare_encoder_folder_loads_into_the_pretraining_model(tmp_path):
    encoder = _randomize(SwinModel(SwinConfig(**SMALL), add_pooling_layer=False, use_mask_token=True))
    encoder.save_pretrained(tmp_path)
    model, info = SimMIMForMaskedImageModeling.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == {"decoder.0.weight", "decoder.0.bias"} and not info["unexpected_keys"]
    torch.testing.assert_close(model.swin.embeddings.mask_token, encoder.embeddings.mask_token, rtol=0, atol=0)


# ---- the transformers contract -------------------------------------------------------------------------------------
def test_dtype_including_auto_and_device_map(tmp_path, mim_folder):
    bf16_folder = tmp_path / "bf16"
    SimMIMForMaskedImageModeling.from_pretrained(mim_folder).to(torch.bfloat16).save_pretrained(bf16_folder)
    for cls, extra in (
        (SimMIMForMaskedImageModeling, {}),
        (SimMIMForImageClassification, dict(num_labels=3, image_size=80, window_size=5)),
    ):
        assert next(cls.from_pretrained(bf16_folder, dtype="auto", **extra).parameters()).dtype == torch.bfloat16
        model = cls.from_pretrained(bf16_folder, dtype=torch.float32, device_map="cpu", **extra)
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        assert {p.device.type for p in model.parameters()} == {"cpu"}
    pipeline_style = SimMIMForImageClassification.from_pretrained(mim_folder, dtype="auto", num_labels=2)
    assert next(pipeline_style.parameters()).dtype == torch.float32  # "auto" = the checkpoint's float32


def test_cache_dir_revision_and_token_reach_the_hub_download(tmp_path, mim_folder):
    """A Hub id resolved from a local Hub cache (offline): cache_dir and revision are used, a wrong revision fails."""
    commit = "a" * 40
    repo = tmp_path / "models--user--simmim-tiny"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name in os.listdir(mim_folder):
        (snapshot / name).write_bytes((mim_folder / name).read_bytes())
    hub = dict(cache_dir=str(tmp_path), token="hf_not_needed_offline")
    model = SimMIMForMaskedImageModeling.from_pretrained("user/simmim-tiny", revision="main", **hub)
    assert model.config.mask_patch_size == 16
    classifier = SimMIMForImageClassification.from_pretrained(
        "user/simmim-tiny", revision=commit, num_labels=3, image_size=80, window_size=5, **hub
    )
    assert classifier.loading_report.source.startswith("user/simmim-tiny")
    for cls in (SimMIMForMaskedImageModeling, SimMIMForImageClassification):
        with pytest.raises(OSError):
            cls.from_pretrained("user/simmim-tiny", revision="b" * 40, **hub)


def test_unknown_arguments_are_rejected_and_config_fields_set(mim_folder):
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['colour'\]"):
        SimMIMForImageClassification.from_pretrained(mim_folder, num_labels=2, colour="blue")
    with pytest.raises(TypeError, match="colour"):  # transformers' own behaviour: passed to __init__, refused there
        SimMIMForMaskedImageModeling.from_pretrained(mim_folder, colour="blue")
    model = SimMIMForImageClassification.from_pretrained(
        mim_folder, num_labels=2, label_smoothing=0.1, output_hidden_states=True
    )
    assert model.config.label_smoothing == 0.1 and model.config.output_hidden_states
    mim = SimMIMForMaskedImageModeling.from_pretrained(mim_folder, mask_ratio=0.5, drop_path_rate=0.2)
    assert mim.config.mask_ratio == 0.5 and mim.config.backbone_config.drop_path_rate == 0.2  # as transformers does


class _TransformersLog:
    """Collects what transformers logs (its loggers do not propagate to pytest's capture)."""

    def __init__(self):
        import io

        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.logger = logging.getLogger("transformers")

    def __enter__(self):
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)

    def text(self) -> str:
        return self.stream.getvalue()


def test_plain_loads_print_transformers_own_report(tmp_path):
    native = SwinForImageClassification(SwinConfig(**SMALL, num_labels=4))
    native.save_pretrained(tmp_path)
    with _TransformersLog() as log:
        model = SimMIMForMaskedImageModeling.from_pretrained(tmp_path)
    text = log.text()
    assert "SimMIMForMaskedImageModeling LOAD REPORT" in text and "decoder.0.weight" in text and "MISSING" in text
    assert "classifier.weight" in text and "UNEXPECTED" in text
    assert model.decoder[0].weight.abs().sum() > 0  # newly initialized, as the report says
    # a classifier with the same geometry and head: one plain transformers load, nothing to report
    with _TransformersLog() as log:
        again = SimMIMForImageClassification.from_pretrained(tmp_path)
    assert "LOAD REPORT" not in log.text() and again.loading_report.newly_initialized == []


def test_a_transfer_prints_one_table_at_warning(mim_folder, caplog):
    with caplog.at_level(logging.INFO), _TransformersLog() as log:
        model, info = SimMIMForImageClassification.from_pretrained(
            mim_folder, num_labels=3, image_size=80, window_size=5, output_loading_info=True
        )
    records = [r for r in caplog.records if "LOAD REPORT" in r.getMessage()]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "LOAD REPORT" not in log.text()  # transformers' own table of the adapted load is not shown
    text = records[0].getMessage()
    for expected in (
        "SimMIMForImageClassification LOAD REPORT",
        "RESIZED",
        "4x4 -> 5x5 (geometric bicubic)",
        "classifier.weight",
        "NEW",
        "decoder.0.weight",
        "UNUSED",
    ):
        assert expected in text, expected
    assert info["missing_keys"] == {"classifier.weight", "classifier.bias"} and info["report"] is model.loading_report
    assert {"decoder.0.weight", "decoder.0.bias", "swin.embeddings.mask_token"} == info["unexpected_keys"]


def test_a_checkpoint_of_another_family_is_an_error_naming_both(mim_folder):
    vit = SimMIMConfig.from_preset("vit_test")
    with pytest.raises(ValueError, match="holds a swin backbone but the given config is vit"):
        SimMIMForMaskedImageModeling.from_pretrained(mim_folder, config=vit)
    with pytest.raises(ValueError, match="holds a swin backbone but the given config is vit"):
        SimMIMForMaskedImageModeling.from_pretrained(mim_folder, config=vit.backbone_config)  # a native config too
    with pytest.raises(ValueError, match="holds a swin backbone but the given config is vit"):
        SimMIMForImageClassification.from_pretrained(mim_folder, config=vit)


def test_an_official_pth_file_is_pointed_to_the_converter(tmp_path):
    path = tmp_path / "simmim_pretrain__swin_base__img192_window6__100ep.pth"
    torch.save({"model": {}}, path)
    for cls in (SimMIMForMaskedImageModeling, SimMIMForImageClassification):
        with pytest.raises(ValueError, match="convert_official"):
            cls.from_pretrained(str(path))


# ---- the scripts ---------------------------------------------------------------------------------------------------
def test_run_mim_continues_a_native_folder_with_simmim_fields_from_flags(tmp_path):
    import run_mim

    native_folder = tmp_path / "native"
    _randomize(SwinForMaskedImageModeling(SwinConfig(**SMALL))).save_pretrained(native_folder)
    output = tmp_path / "out"
    run_mim.main(
        [
            "--model_name_or_path",
            str(native_folder),
            "--mask_patch_size",
            "16",
            "--mask_ratio",
            "0.5",
            "--max_steps",
            "1",
            "--per_device_train_batch_size",
            "4",
            "--max_train_samples",
            "8",
            "--max_eval_samples",
            "4",
            "--save_strategy",
            "no",
            "--use_cpu",
            "--report_to",
            "none",
            "--disable_tqdm",
            "true",
            "--output_dir",
            str(output),
        ]
    )
    saved = json.loads((output / "config.json").read_text())
    assert (saved["model_type"], saved["mask_patch_size"], saved["mask_ratio"]) == ("swin", 16, 0.5)


@pytest.mark.slow
def test_run_image_classification_shows_the_transfer_table(tmp_path, mim_folder):
    """The table reaches the script's output (its logging setup), at the default log level."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [
        sys.executable,
        os.path.join(root, "run_image_classification.py"),
        "--model_name_or_path",
        str(mim_folder),
        "--image_size",
        "80",
        "--window_size",
        "5",
        "--max_steps",
        "1",
        "--eval_strategy",
        "no",
        "--per_device_train_batch_size",
        "8",
        "--max_train_samples",
        "64",
        "--max_eval_samples",
        "8",
        "--save_strategy",
        "no",
        "--load_best_model_at_end",
        "false",
        "--output_dir",
        str(tmp_path / "ft"),
        "--report_to",
        "none",
        "--use_cpu",
        "--disable_tqdm",
        "true",
    ]
    env = {**os.environ, "PYTHONPATH": root, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SimMIMForImageClassification LOAD REPORT" in result.stdout, result.stdout[-2000:]
    assert "4x4 -> 5x5 (geometric bicubic)" in result.stdout and "classifier.weight" in result.stdout
