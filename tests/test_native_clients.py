"""Saved pretraining folders work in plain transformers, in a process where `modeling_simmim` cannot be imported:
the Auto classes, AutoBackbone, pipeline("image-feature-extraction"), and the from_pretrained calls that transformers'
example scripts run_mim.py and run_image_classification.py make (the scripts themselves need the network:
run_image_classification.py loads its metric with `evaluate.load("accuracy")`, run_mim.py sends telemetry and both
download their default datasets, so their exact calls are run here instead)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from modeling_simmim import SimMIMConfig, SimMIMForMaskedImageModeling, SimMIMMaskGenerator
from modeling_simmim.export import build_image_processor

FAMILIES = {"swin": "swin_test", "swinv2": "swinv2_test", "vit": "vit_test", "beit": "beit_test"}

CLIENTS = textwrap.dedent(
    """
    import json, sys
    sys.modules["modeling_simmim"] = None  # hidden even where the package is installed
    import numpy as np, torch
    from PIL import Image
    import transformers.models.auto.auto_factory as auto_factory
    from transformers import (AutoBackbone, AutoConfig, AutoImageProcessor, AutoModel,
                              AutoModelForImageClassification, AutoModelForMaskedImageModeling, pipeline)

    # transformers 5.24's AutoBackbone asks the Hub whether a *local* folder is a Hub repo (and fails offline):
    # answer as the Hub would for a model repository.
    auto_factory.hf_api = lambda: type("Hub", (), {"repo_exists": staticmethod(lambda name: True)})()
    results = {}
    for family in sys.argv[1:]:
        folder, reference, row = family, torch.load(family + "/reference.pt"), {}
        remote = family == "beit"  # no pixel-regression BEiT MIM class in transformers: our code, as remote code
        mim = AutoModelForMaskedImageModeling.from_pretrained(folder, trust_remote_code=remote).eval()
        with torch.no_grad():  # transformers' MIM classes take (batch, num_patches)
            out = mim(reference["pixel_values"], bool_masked_pos=reference["mask"].flatten(1))
        row["mim"] = type(mim).__module__.split(".")[0] + "." + type(mim).__name__
        row["loss"] = abs(out.loss.item() - reference["loss"].item())
        row["reconstruction"] = (out.reconstruction - reference["reconstruction"]).abs().max().item()

        classifier, info = AutoModelForImageClassification.from_pretrained(folder, num_labels=10,
                                                                           output_loading_info=True)
        row["classifier"] = type(classifier).__name__
        row["new"] = sorted(info["missing_keys"])
        row["unused"] = sorted(info["unexpected_keys"])

        encoder = AutoModel.from_pretrained(folder).eval()
        with torch.no_grad():
            features = encoder(reference["pixel_values"]).last_hidden_state
        row["encoder"] = type(encoder).__name__
        row["features"] = (features - reference["features"]).abs().max().item()

        extractor = pipeline("image-feature-extraction", model=folder, device="cpu")
        image = Image.fromarray(np.uint8(np.random.default_rng(0).random((80, 70, 3)) * 255))
        row["pipeline"] = list(np.array(extractor(image)).shape)
        if family != "vit":  # transformers has no ViT backbone class
            row["backbone"] = type(AutoBackbone.from_pretrained(folder)).__name__

        # run_mim.py: AutoConfig, config.update(image/patch size, stride), AutoImageProcessor, then the model
        config = AutoConfig.from_pretrained(folder, trust_remote_code=remote)
        config.update({"image_size": config.image_size, "patch_size": config.patch_size,
                       "encoder_stride": config.encoder_stride})
        processor = AutoImageProcessor.from_pretrained(folder)
        model = AutoModelForMaskedImageModeling.from_pretrained(folder, config=config, trust_remote_code=remote)
        crop = [processor.crop_size["height"], processor.crop_size["width"]]
        row["run_mim"] = [type(model).__name__, config.mask_patch_size, config.mask_ratio, crop]

        # run_image_classification.py (here with --trust_remote_code true, as the issue tried): AutoConfig with the
        # dataset's labels, then the model
        labels = ["cat", "dog", "fish"]
        config = AutoConfig.from_pretrained(folder, num_labels=3, label2id={l: str(i) for i, l in enumerate(labels)},
                                            id2label={str(i): l for i, l in enumerate(labels)},
                                            finetuning_task="image-classification", trust_remote_code=True)
        model = AutoModelForImageClassification.from_pretrained(folder, config=config, ignore_mismatched_sizes=False,
                                                                trust_remote_code=True)
        names = {int(k): v for k, v in model.config.id2label.items()}
        row["run_image_classification"] = [type(model).__name__, names[2], model.classifier.out_features]
        results[family] = row
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def client_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("native")
    for family, preset in FAMILIES.items():
        config = SimMIMConfig.from_preset(preset, mask_patch_size=16, mask_ratio=0.5)
        model = SimMIMForMaskedImageModeling(config).eval()
        folder = root / family
        model.save_pretrained(folder)
        build_image_processor(64).save_pretrained(folder)  # what run_mim.py saves next to the model
        pixel_values = torch.randn(2, 3, 64, 64)
        mask = SimMIMMaskGenerator(64, 16, config.model_patch_size, 0.5)(2)
        with torch.no_grad():
            out = model(pixel_values, bool_masked_pos=mask)
            features = model.backbone(pixel_values).last_hidden_state
        torch.save(
            {
                "pixel_values": pixel_values,
                "mask": mask,
                "loss": out.loss,
                "reconstruction": out.reconstruction,
                "features": features,
            },
            folder / "reference.pt",
        )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", HF_MODULES_CACHE=str(root / "modules"))
    # -I: isolated mode, neither the working directory nor PYTHONPATH is on sys.path (the repo is not importable)
    completed = subprocess.run(
        [sys.executable, "-I", "-c", CLIENTS, *FAMILIES],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_masked_image_modeling_gives_our_loss(client_results, family):
    row = client_results[family]
    expected = {
        "swin": "transformers.SwinForMaskedImageModeling",
        "swinv2": "transformers.Swinv2ForMaskedImageModeling",
        "vit": "transformers.ViTForMaskedImageModeling",
        "beit": "transformers_modules.SimMIMBeitForMaskedImageModeling",
    }[family]
    assert row["mim"] == expected
    assert row["loss"] <= 1e-5 and row["reconstruction"] <= 1e-5


@pytest.mark.parametrize("family", list(FAMILIES))
def test_classification_loads_the_encoder_and_only_the_head_is_new(client_results, family):
    row = client_results[family]
    assert (
        row["classifier"]
        == {
            "swin": "SwinForImageClassification",
            "swinv2": "Swinv2ForImageClassification",
            "vit": "ViTForImageClassification",
            "beit": "BeitForImageClassification",
        }[family]
    )
    assert row["new"] == ["classifier.bias", "classifier.weight"]
    assert {name.split(".")[0] for name in row["unused"]} <= {"decoder", family}  # the decoder and mask token
    assert all(name.startswith("decoder.") or name.endswith("mask_token") for name in row["unused"])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_encoder_backbone_and_feature_extraction(client_results, family):
    row = client_results[family]
    assert (
        row["encoder"]
        == {"swin": "SwinModel", "swinv2": "Swinv2Model", "vit": "ViTModel", "beit": "BeitModel"}[family]
    )
    assert row["features"] <= 1e-5
    tokens = 64 if family in ("swin", "swinv2") else 65  # Swin: 8x8 final map; ViT/BEiT: CLS + 8x8 patches
    assert row["pipeline"] == [1, tokens, 32]
    if family != "vit":
        assert row["backbone"] == {"swin": "SwinBackbone", "swinv2": "Swinv2Backbone", "beit": "BeitBackbone"}[family]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_transformers_example_scripts_calls(client_results, family):
    row = client_results[family]
    mim_class = "SimMIMBeitForMaskedImageModeling" if family == "beit" else row["mim"].split(".")[-1]
    assert row["run_mim"] == [mim_class, 16, 0.5, [64, 64]]  # the SimMIM fields travel in the config
    native = {
        "swin": "SwinForImageClassification",
        "swinv2": "Swinv2ForImageClassification",
        "vit": "ViTForImageClassification",
        "beit": "BeitForImageClassification",
    }[family]
    assert row["run_image_classification"] == [native, "fish", 3]
