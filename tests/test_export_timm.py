"""`python -m modeling_simmim.export --to timm`: the encoder as a timm state dict that timm loads strictly, with our
features."""

import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import load_file

from modeling_simmim import SimMIMConfig, SimMIMForMaskedImageModeling
from modeling_simmim.configuration_simmim import BEIT_SIMMIM_FINETUNE
from modeling_simmim.export import main, timm_state_dict
from modeling_simmim.modeling_simmim import SimMIMForImageClassification

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {
    "swin pretraining": lambda: SimMIMForMaskedImageModeling(
        SimMIMConfig.from_preset("swin_test", mask_patch_size=16)
    ),
    # Swin-L-like: the last stage (4x4) is smaller than the window 16; timm clamps it the official way too
    "swin stage smaller than the window": lambda: SimMIMForMaskedImageModeling(
        SimMIMConfig.from_preset("swin_test", mask_patch_size=16, window_size=16)
    ),
    "swin classifier 80 px / window 5": lambda: SimMIMForImageClassification(
        SimMIMConfig.from_preset("swin_test", mask_patch_size=16, image_size=80, window_size=5, num_labels=3)
    ),
    "beit pretraining (shared table)": lambda: SimMIMForMaskedImageModeling(
        SimMIMConfig.from_preset("beit_test", mask_patch_size=16)
    ),
    "beit finetuned (per-block tables, mean pooling)": lambda: SimMIMForImageClassification(
        SimMIMConfig.from_preset("beit_test", num_labels=3, **BEIT_SIMMIM_FINETUNE)
    ),
}


def _randomize(model):
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


@pytest.mark.parametrize("case", list(CASES))
def test_timm_loads_the_export_strictly_with_our_features(tmp_path, case, capsys):
    model = _randomize(CASES[case]())
    model.save_pretrained(tmp_path / "model")
    assert (
        main(["--to", "timm", "--model_name_or_path", str(tmp_path / "model"), "--output_dir", str(tmp_path / "timm")])
        == 0
    )
    assert "timm.create_model(" in capsys.readouterr().out
    spec = json.loads((tmp_path / "timm" / "timm_config.json").read_text())
    weights = str(tmp_path / "timm" / "model.safetensors")
    encoder = timm.create_model(
        spec["model_name"], pretrained=True, pretrained_cfg_overlay=dict(file=weights), **spec["kwargs"]
    ).eval()
    missing, unexpected = encoder.load_state_dict(load_file(weights), strict=True)  # every key, no filter
    assert not missing and not unexpected
    pixel_values = torch.randn(2, 3, *model.config.image_size)
    with torch.no_grad():
        ours = model.backbone(pixel_values)
        theirs = encoder.forward_features(pixel_values)
        tokens = theirs.flatten(1, 2) if theirs.dim() == 4 else theirs  # timm's Swin: (B, H, W, C)
        torch.testing.assert_close(tokens, ours.last_hidden_state, rtol=0, atol=1e-5)
        if isinstance(model, SimMIMForImageClassification):  # the pooled features the head reads
            pooled, _ = model.pooled_features(pixel_values)
            torch.testing.assert_close(encoder.forward_head(theirs, pre_logits=True), pooled, rtol=0, atol=1e-5)


def test_the_module_runs_as_a_command(tmp_path):
    SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("swin_test", mask_patch_size=16)).save_pretrained(tmp_path)
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "modeling_simmim.export",
            "--to",
            "timm",
            "--model_name_or_path",
            str(tmp_path),
            "--output_dir",
            str(tmp_path / "timm"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "timm.create_model('swin_tiny_patch4_window7_224', pretrained=True" in result.stdout


def test_what_timm_cannot_hold_is_refused():
    vit = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("vit_test"))
    with pytest.raises(ValueError, match="Swin and BEiT-style ViT, not vit"):
        timm_state_dict(vit.state_dict(), vit.config)
    config = SimMIMConfig.from_preset("swin_test", mask_patch_size=16, use_absolute_embeddings=True)
    swin = SimMIMForMaskedImageModeling(config)
    with pytest.raises(ValueError, match="no timm equivalent: timm's Swin has no absolute position embedding"):
        timm_state_dict(swin.state_dict(), swin.config)
