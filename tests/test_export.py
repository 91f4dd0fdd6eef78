"""Native export: the output folder runs in plain transformers, without this package (subprocess)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_simmim import SimMIMConfig
from modeling_simmim.augmentation import build_classification_transform
from modeling_simmim.export import export_to_transformers, to_native_model
from modeling_simmim.modeling_simmim import SimMIMForImageClassification

LABELS = {0: "cat", 1: "dog", 2: "fish"}
CASES = {
    "swin": ("swin_test", {}),
    "swinv2": ("swinv2_test", {}),
    "beit": (
        "beit_test",
        {"use_mean_pooling": True, "use_relative_position_bias": True, "use_shared_relative_position_bias": False},
    ),
    "vit": ("vit_test", {}),
}


def _classifier(family: str) -> SimMIMForImageClassification:
    preset, overrides = CASES[family]
    config = SimMIMConfig.from_preset(preset, **overrides)
    config.id2label = dict(LABELS)
    config.label2id = {v: k for k, v in LABELS.items()}
    model = SimMIMForImageClassification(config).eval()
    with torch.no_grad():  # a non-trivial head so that logits differ between classes
        model.classifier.weight.normal_(0, 1.0)
    return model


SUBPROCESS = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    sys.modules["modeling_simmim"] = None  # hidden even where the package is pip-installed (CI)
    try:
        import modeling_simmim  # noqa: F401
        sys.exit("modeling_simmim must not be importable here")
    except ImportError:
        pass
    from PIL import Image
    from transformers import AutoModelForImageClassification, pipeline
    results = {}
    image = Image.open(sys.argv[1])
    for family in sys.argv[2:]:
        folder = family
        classify = pipeline("image-classification", model=folder, device="cpu")
        predictions = classify(image, top_k=3)
        model = AutoModelForImageClassification.from_pretrained(folder).eval()
        pixel_values = torch.from_numpy(np.load(folder + "_pixels.npy"))
        with torch.no_grad():
            logits = model(pixel_values).logits
        processed = classify.image_processor(image, return_tensors="pt")["pixel_values"]
        np.save(folder + "_native_logits.npy", logits.numpy())
        np.save(folder + "_processed.npy", processed.numpy())
        results[family] = {"class": type(model).__name__, "predictions": predictions}
    # our own checkpoint (what the Trainer saves) is a native folder too: no remote code
    ours = AutoModelForImageClassification.from_pretrained("ours").eval()
    with torch.no_grad():
        np.save("ours_logits.npy", ours(torch.from_numpy(np.load("swin_pixels.npy"))).logits.numpy())
    results["ours"] = type(ours).__name__
    print(json.dumps(results))
    """
)


def test_export_runs_in_plain_transformers(tmp_path):
    """Native exports of the 4 families run in `pipeline` without this package, with our logits; our own saved
    classifier loads there too, natively."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(np.uint8(rng.random((90, 120, 3)) * 255))
    image.save(tmp_path / "image.png")
    ours = {}
    for family in CASES:
        model = _classifier(family)
        export_to_transformers(model, str(tmp_path / family))
        pixel_values = torch.randn(2, 3, *model.config.image_size)
        np.save(tmp_path / f"{family}_pixels.npy", pixel_values.numpy())
        with torch.no_grad():
            ours[family] = (model, model(pixel_values).logits.numpy())
        config = json.loads((tmp_path / family / "config.json").read_text())
        assert config["model_type"] == family and "problem_type" not in {k for k, v in config.items() if v}
        assert config["id2label"] == {"0": "cat", "1": "dog", "2": "fish"}
        processor = json.loads((tmp_path / family / "preprocessor_config.json").read_text())
        size = model.config.image_size[0]
        assert processor["size"] == {"shortest_edge": int(size * 256 / 224)}
        assert processor["crop_size"] == {"height": size, "width": size}
        assert processor["resample"] == 3 and processor["do_center_crop"]  # bicubic
        assert processor["image_mean"] == [0.485, 0.456, 0.406] and processor["image_std"] == [0.229, 0.224, 0.225]

        if family == "swin":
            model.save_pretrained(tmp_path / "ours")  # SimMIMForImageClassification.save_pretrained

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", HF_MODULES_CACHE=str(tmp_path / "modules")
    )
    # -I: isolated mode, neither the working directory nor PYTHONPATH is on sys.path (the repo is not importable)
    completed = subprocess.run(
        [sys.executable, "-I", "-c", SUBPROCESS, str(tmp_path / "image.png"), *CASES],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    for family, (model, logits) in ours.items():
        native_logits = np.load(tmp_path / f"{family}_native_logits.npy")
        np.testing.assert_allclose(native_logits, logits, atol=1e-5, rtol=0)
        assert results[family]["class"].lower().startswith(family)
        predictions = results[family]["predictions"]
        assert {p["label"] for p in predictions} == set(LABELS.values())
        # pipeline scores are the softmax of our logits on the processed image
        processed = torch.from_numpy(np.load(tmp_path / f"{family}_processed.npy"))
        with torch.no_grad():
            probabilities = model(processed).logits.softmax(-1)[0]
        top = max(predictions, key=lambda p: p["score"])
        assert top["label"] == LABELS[int(probabilities.argmax())]
        assert abs(top["score"] - float(probabilities.max())) < 1e-4
        # the exported processor reproduces our evaluation transform (up to resize rounding)
        expected = build_classification_transform(model.config.image_size[0], train=False)(image)
        assert processed.shape[1:] == expected.shape
        assert (processed[0] - expected).abs().mean() < 0.02
    assert results["ours"] == "SwinForImageClassification"
    assert not list(tmp_path.joinpath("ours").glob("*.py"))  # no code shipped
    np.testing.assert_allclose(np.load(tmp_path / "ours_logits.npy"), ours["swin"][1], atol=1e-5, rtol=0)


def test_mean_pooled_vit_has_no_native_class():
    config = SimMIMConfig.from_preset("vit_test")
    config.classifier_pooling = "mean"
    model = SimMIMForImageClassification(config)
    with pytest.raises(ValueError, match="no native class"):
        to_native_model(model)


def test_swin_window_larger_than_a_stage_has_no_native_export():
    config = SimMIMConfig.from_preset("swin_test", window_size=16)  # 64 px: stages 16 and 8
    config.num_labels = 2
    with pytest.raises(ValueError, match="no native export"):
        to_native_model(SimMIMForImageClassification(config))
