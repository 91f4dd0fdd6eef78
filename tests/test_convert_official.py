"""Converting official SimMIM checkpoints (microsoft/SimMIM `.pth`) safely and exactly.

The official code is not a dependency, so these tests write checkpoints in the official key layout themselves:
`to_official_*` below is an inverse of the converter written independently of its name rules (it walks the
transformers modules and fuses q/k/v into `qkv`, renames layer scale to `gamma_1/2`, adds the buffers the official
models save, ...). The numerical cross-check against the official code itself is documented in the README ("Using the published SimMIM weights").
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import transformers
from transformers import BeitConfig, BeitForImageClassification, SwinConfig, SwinForImageClassification

import modeling_simmim.modeling_simmim as modeling_simmim
from modeling_simmim import SimMIMConfig, SimMIMForMaskedImageModeling
from modeling_simmim.convert_official import (
    OFFICIAL_DEFAULTS,
    architecture_from_config,
    convert_official_checkpoint,
    infer_architecture,
    load_official_checkpoint,
    main,
    read_official_yaml,
)
from modeling_simmim.safe_load import UnsafeCheckpointError, safe_load_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]

# Official-schema configs (MODEL.* / DATA.* as in SimMIM's config.py) of the tiny test models below.
SWIN_OFFICIAL = {
    "DATA": {"IMG_SIZE": 64, "MASK_PATCH_SIZE": 32, "MASK_RATIO": 0.6},
    "MODEL": {
        "TYPE": "swin",
        "NUM_CLASSES": 0,
        "DROP_PATH_RATE": 0.0,
        "SWIN": {"EMBED_DIM": 16, "DEPTHS": [2, 2], "NUM_HEADS": [1, 2], "WINDOW_SIZE": 4, "PATCH_SIZE": 4},
    },
}
VIT_OFFICIAL = {
    "DATA": {"IMG_SIZE": 64, "MASK_PATCH_SIZE": 32, "MASK_RATIO": 0.6},
    "MODEL": {
        "TYPE": "vit",
        "NUM_CLASSES": 0,
        "DROP_PATH_RATE": 0.1,
        "VIT": {
            "PATCH_SIZE": 16,
            "EMBED_DIM": 32,
            "DEPTH": 2,
            "NUM_HEADS": 2,
            "MLP_RATIO": 4,
            "USE_APE": False,
            "USE_RPB": False,
            "USE_SHARED_RPB": True,
            "USE_MEAN_POOLING": False,
        },
    },
}


# ----------------------------------------------------------------------------------------------------------------
# Test helper: transformers modules -> official key layout (independent of the converter's rules)
# ----------------------------------------------------------------------------------------------------------------


def _linear(sd: dict, name: str, linear: torch.nn.Module) -> None:
    sd[f"{name}.weight"] = linear.weight.detach().clone()
    if getattr(linear, "bias", None) is not None:
        sd[f"{name}.bias"] = linear.bias.detach().clone()


def _fused_qkv(attention) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]).detach().clone()
    if attention.q_proj.bias is None:
        return weight, None
    return weight, torch.cat([attention.q_proj.bias, attention.k_proj.bias, attention.v_proj.bias]).detach().clone()


def official_swin_encoder(swin) -> dict[str, torch.Tensor]:
    """transformers SwinModel -> the official `SwinTransformer(ForSimMIM)` state dict (with its saved buffers)."""
    cfg, emb, sd = swin.config, swin.embeddings, {}
    if emb.mask_token is not None:
        sd["mask_token"] = emb.mask_token.detach().clone()
    _linear(sd, "patch_embed.proj", emb.patch_embeddings.projection)
    _linear(sd, "patch_embed.norm", emb.norm)
    if emb.position_embeddings is not None:
        sd["absolute_pos_embed"] = emb.position_embeddings.detach().clone()
    for i, stage in enumerate(swin.encoder.layers):
        for j, block in enumerate(stage.blocks):
            prefix = f"layers.{i}.blocks.{j}"
            resolution = min(block.input_resolution)
            window = min(cfg.window_size, resolution)
            shifted = j % 2 == 1 and resolution > cfg.window_size
            _linear(sd, f"{prefix}.norm1", block.layernorm_before)
            table = block.attention.relative_position_bias.relative_position_bias_table
            sd[f"{prefix}.attn.relative_position_bias_table"] = table.detach().clone()
            sd[f"{prefix}.attn.relative_position_index"] = torch.randint(0, table.shape[0], (window**2, window**2))
            sd[f"{prefix}.attn.qkv.weight"], qkv_bias = _fused_qkv(block.attention)
            if qkv_bias is not None:
                sd[f"{prefix}.attn.qkv.bias"] = qkv_bias
            _linear(sd, f"{prefix}.attn.proj", block.attention.o_proj)
            _linear(sd, f"{prefix}.norm2", block.layernorm_after)
            _linear(sd, f"{prefix}.mlp.fc1", block.mlp.fc1)
            _linear(sd, f"{prefix}.mlp.fc2", block.mlp.fc2)
            if shifted:  # the official shifted blocks save their (num_windows, w*w, w*w) mask
                sd[f"{prefix}.attn_mask"] = torch.zeros((resolution // window) ** 2, window**2, window**2)
        if stage.downsample is not None:
            _linear(sd, f"layers.{i}.downsample.reduction", stage.downsample.reduction)
            _linear(sd, f"layers.{i}.downsample.norm", stage.downsample.norm)
    _linear(sd, "norm", swin.layernorm)
    return sd


def official_vit_encoder(beit) -> dict[str, torch.Tensor]:
    """transformers BeitModel -> the official BEiT-style `VisionTransformer(ForSimMIM)` state dict."""
    emb, sd = beit.embeddings, {}
    grid = beit.config.image_size // beit.config.patch_size
    index = torch.randint(0, 10, (grid * grid + 1, grid * grid + 1))
    sd["cls_token"] = emb.cls_token.detach().clone()
    if emb.mask_token is not None:
        sd["mask_token"] = emb.mask_token.detach().clone()
    if emb.position_embeddings is not None:
        sd["pos_embed"] = emb.position_embeddings.detach().clone()
    _linear(sd, "patch_embed.proj", emb.patch_embeddings.projection)
    if beit.shared_position_bias is not None:
        sd["rel_pos_bias.relative_position_bias_table"] = beit.shared_position_bias.relative_position_bias_table
        sd["rel_pos_bias.relative_position_index"] = index
    for i, layer in enumerate(beit.layers):
        prefix = f"blocks.{i}"
        sd[f"{prefix}.gamma_1"] = layer.lambda_1.detach().clone()
        sd[f"{prefix}.gamma_2"] = layer.lambda_2.detach().clone()
        _linear(sd, f"{prefix}.norm1", layer.layernorm_before)
        attention = layer.attention
        assert attention.k_proj.bias is None  # BEiT: q and v biases only
        sd[f"{prefix}.attn.qkv.weight"] = (
            torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]).detach().clone()
        )
        sd[f"{prefix}.attn.q_bias"] = attention.q_proj.bias.detach().clone()
        sd[f"{prefix}.attn.v_bias"] = attention.v_proj.bias.detach().clone()
        if layer.relative_position_bias is not None:
            table = layer.relative_position_bias.relative_position_bias_table
            sd[f"{prefix}.attn.relative_position_bias_table"] = table.detach().clone()
            sd[f"{prefix}.attn.relative_position_index"] = index
        _linear(sd, f"{prefix}.attn.proj", attention.o_proj)
        _linear(sd, f"{prefix}.norm2", layer.layernorm_after)
        _linear(sd, f"{prefix}.mlp.fc1", layer.mlp.fc1)
        _linear(sd, f"{prefix}.mlp.fc2", layer.mlp.fc2)
    if isinstance(beit.layernorm, torch.nn.LayerNorm):
        _linear(sd, "norm", beit.layernorm)
    if beit.pooler is not None and beit.pooler.layernorm is not None:
        _linear(sd, "fc_norm", beit.pooler.layernorm)
    return sd


def official_pretraining_state_dict(model: SimMIMForMaskedImageModeling) -> dict[str, torch.Tensor]:
    encoder = official_swin_encoder(model.swin) if hasattr(model, "swin") else official_vit_encoder(model.beit)
    sd = {f"encoder.{k}": v for k, v in encoder.items()}
    sd["decoder.0.weight"] = model.decoder[0].weight.detach().clone()
    sd["decoder.0.bias"] = model.decoder[0].bias.detach().clone()
    return sd


def official_finetuned_state_dict(model) -> dict[str, torch.Tensor]:
    sd = official_swin_encoder(model.swin) if hasattr(model, "swin") else official_vit_encoder(model.beit)
    _linear(sd, "head", model.classifier)
    return sd


def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move every parameter off its (often zero or constant) initialization so that mix-ups show in outputs."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return model.eval()


def tiny_swin_mim() -> SimMIMForMaskedImageModeling:
    # two blocks per stage so that stage 0 has a shifted block (the official attn_mask buffer)
    backbone = SwinConfig(
        image_size=64, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=4, drop_path_rate=0.0
    )
    return _perturb(SimMIMForMaskedImageModeling(SimMIMConfig(backbone_config=backbone)))


def tiny_vit_mim() -> SimMIMForMaskedImageModeling:
    backbone = BeitConfig(
        image_size=64,
        patch_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        layer_scale_init_value=0.1,
        use_absolute_position_embeddings=False,
        use_relative_position_bias=False,
        use_shared_relative_position_bias=True,
        use_mean_pooling=False,
        layer_norm_eps=1e-6,
        drop_path_rate=0.1,
    )
    return _perturb(SimMIMForMaskedImageModeling(SimMIMConfig(backbone_config=backbone)))


def tiny_swin_classifier() -> SwinForImageClassification:
    return _perturb(
        SwinForImageClassification(
            SwinConfig(
                image_size=64, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[1, 2], window_size=4, num_labels=5
            )
        )
    )


def tiny_vit_classifier() -> BeitForImageClassification:
    config = BeitConfig(
        image_size=64,
        patch_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        layer_scale_init_value=0.1,
        use_absolute_position_embeddings=False,
        use_relative_position_bias=True,
        use_shared_relative_position_bias=False,
        use_mean_pooling=True,
        layer_norm_eps=1e-6,
        num_labels=5,
    )
    return _perturb(BeitForImageClassification(config))


def _mask(model_patch: int, batch: int = 2, image: int = 64) -> torch.Tensor:
    grid = image // 32
    coarse = torch.rand(batch, grid, grid, generator=torch.Generator().manual_seed(1)) < 0.6
    coarse[:, 0, 0] = True
    coarse[:, -1, -1] = False
    scale = 32 // model_patch
    return coarse.repeat_interleave(scale, 1).repeat_interleave(scale, 2)


@contextlib.contextmanager
def fake_yacs():
    """A `yacs.config.CfgNode` importable only inside the block, pickled like yacs 0.1.8 pickles it."""
    saved = {name: sys.modules.get(name) for name in ("yacs", "yacs.config")}
    yacs, config = types.ModuleType("yacs"), types.ModuleType("yacs.config")

    class CfgNode(dict):
        def __init__(self, init_dict=None):
            init_dict = {k: CfgNode(v) if isinstance(v, dict) else v for k, v in (init_dict or {}).items()}
            super().__init__(init_dict)
            self.__dict__["__immutable__"] = True
            self.__dict__["__deprecated_keys__"] = set()
            self.__dict__["__renamed_keys__"] = {"EXAMPLE.OLD": ("EXAMPLE.NEW", "renamed")}
            self.__dict__["__new_allowed__"] = False

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    config.CfgNode, yacs.config = CfgNode, config
    sys.modules.update({"yacs": yacs, "yacs.config": config})
    try:
        yield CfgNode
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def save_official(path: Path, state_dict: dict, config: dict | None = None, **extras) -> Path:
    """torch.save in the layout of the official `save_checkpoint` (config pickled as a yacs CfgNode)."""
    payload = {
        "model": state_dict,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]},
        "lr_scheduler": {"t_initial": 100, "warmup_t": 10, "base_values": [1e-4]},
        "max_accuracy": 0.0,
        "epoch": 99,
        **extras,
    }
    if config is None:
        torch.save(payload, path)
        return path
    with fake_yacs() as cfg_node:
        payload["config"] = cfg_node(config)
        torch.save(payload, path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Safe loading
# ----------------------------------------------------------------------------------------------------------------


class _Exploit:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class _Opaque:
    """Any class instance: unpickling it imports and instantiates arbitrary code, so it is refused too."""

    def __init__(self):
        self.value = 1


class _EvalExploit:
    def __init__(self, source: str):
        self.source = source

    def __reduce__(self):
        return eval, (self.source,)


def test_yacs_config_loads_without_yacs(tmp_path):
    path = save_official(tmp_path / "ckpt.pth", {"w": torch.ones(2)}, SWIN_OFFICIAL)
    assert "yacs" not in sys.modules and "yacs.config" not in sys.modules
    checkpoint = load_official_checkpoint(path)
    assert "yacs" not in sys.modules  # nothing was imported
    assert checkpoint.config == SWIN_OFFICIAL
    assert type(checkpoint.config) is dict and type(checkpoint.config["MODEL"]["SWIN"]) is dict
    assert checkpoint.extras == {"epoch": 99, "max_accuracy": 0.0}
    assert torch.equal(checkpoint.state_dict["w"], torch.ones(2))


@pytest.mark.parametrize("payload", ["system", "eval", "class"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, payload):
    marker = tmp_path / "pwned"
    exploit = {
        "system": _Exploit(f"touch {marker}"),
        "eval": _EvalExploit(f"open({str(marker)!r}, 'w')"),
        "class": _Opaque(),
    }[payload]
    if payload == "system":  # the payload is real: a plain unpickle runs it
        pickle.loads(pickle.dumps(exploit))
        assert marker.exists()
        marker.unlink()
    path = save_official(tmp_path / "evil.pth", {"w": torch.ones(1)}, SWIN_OFFICIAL, amp=exploit)
    with pytest.raises(UnsafeCheckpointError) as info:
        safe_load_checkpoint(path)
    expected = {"system": "posix.system", "eval": "builtins.eval", "class": "_Opaque"}[payload]
    assert expected in str(info.value) and "Refusing to load" in str(info.value)
    assert not marker.exists()
    assert main(["--checkpoint", str(path), "--output_dir", str(tmp_path / "out")]) == 1
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_corrupted_and_missing_files(tmp_path):
    good = save_official(tmp_path / "good.pth", {"w": torch.ones(1000)}, SWIN_OFFICIAL)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"<html>Google Drive: virus scan warning</html>")
    for path in (truncated, garbage):
        with pytest.raises(ValueError, match="Could not read .* as a PyTorch checkpoint"):
            safe_load_checkpoint(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        safe_load_checkpoint(tmp_path / "missing.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not an official SimMIM one"):
        load_official_checkpoint(tmp_path / "list.pth")


def test_torchs_advice_to_disable_weights_only_never_reaches_the_user(tmp_path, capsys):
    """torch's load errors say that `weights_only=False` "will likely succeed" (i.e. run the pickle's code): neither
    the message nor the chained traceback of the converter passes that on."""
    import traceback

    good = save_official(tmp_path / "good.pth", {"w": torch.ones(1000)}, SWIN_OFFICIAL)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"<html>Google Drive: virus scan warning</html>")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    evil = save_official(tmp_path / "evil.pth", {"w": torch.ones(1)}, SWIN_OFFICIAL, amp=_Opaque())
    for path in (garbage, truncated, evil):
        with pytest.raises((ValueError, UnsafeCheckpointError)) as info:
            safe_load_checkpoint(path)
        shown = "".join(traceback.format_exception(info.value))
        assert "will likely succeed" not in shown and "set to `False`" not in shown, shown
        assert main(["--checkpoint", str(path), "--output_dir", str(tmp_path / "out")]) == 1
        err = capsys.readouterr().err
        assert "will likely succeed" not in err and "set to `False`" not in err and "error:" in err


# ----------------------------------------------------------------------------------------------------------------
# Round trips: official layout -> converted model, exact tensors and outputs
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["swin", "vit"])
def test_pretraining_round_trip(tmp_path, family, capsys):
    model = tiny_swin_mim() if family == "swin" else tiny_vit_mim()
    official = official_pretraining_state_dict(model)
    config = SWIN_OFFICIAL if family == "swin" else VIT_OFFICIAL
    path = save_official(tmp_path / "pt.pth", official, config)

    assert main(["--checkpoint", str(path), "--output_dir", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "Architecture: the config stored in the checkpoint" in printed and "pretraining" in printed
    converted = SimMIMForMaskedImageModeling.from_pretrained(tmp_path / "out").eval()
    assert (tmp_path / "out" / "preprocessor_config.json").exists()

    expected, actual = model.state_dict(), converted.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    assert converted.config.encoder_stride == model.config.encoder_stride
    assert converted.config.mask_patch_size == 32 and converted.config.mask_ratio == 0.6

    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    mask = _mask(model.config.model_patch_size)
    with torch.no_grad():
        reference, output = model(pixels, bool_masked_pos=mask), converted(pixels, bool_masked_pos=mask)
    torch.testing.assert_close(output.loss, reference.loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(output.reconstruction, reference.reconstruction, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["swin", "vit"])
def test_finetuned_round_trip(tmp_path, family):
    model = tiny_swin_classifier() if family == "swin" else tiny_vit_classifier()
    official = official_finetuned_state_dict(model)
    converted = convert_official_checkpoint(save_official(tmp_path / "ft.pth", official), tmp_path / "out")
    assert type(converted).__name__ == "SimMIMForImageClassification" and converted.config.num_labels == 5

    expected, actual = model.state_dict(), converted.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    reloaded = type(converted).from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        reference = model(pixels).logits
        torch.testing.assert_close(reloaded(pixels).logits, reference, rtol=0, atol=1e-6)
        # the folder itself is transformers' own classifier (no code, no package needed)
        assert json.loads((tmp_path / "out" / "config.json").read_text())["architectures"] == [type(model).__name__]
        native = type(model).from_pretrained(tmp_path / "out").eval()
        torch.testing.assert_close(native(pixels).logits, reference, rtol=0, atol=1e-6)


def test_imagenet_heads_get_imagenet_label_names(tmp_path):
    model = tiny_vit_classifier()
    official = official_finetuned_state_dict(model)
    official["head.weight"], official["head.bias"] = torch.randn(1000, 32), torch.randn(1000)
    converted = convert_official_checkpoint(save_official(tmp_path / "ft.pth", official))
    assert converted.config.num_labels == 1000
    assert (
        converted.config.id2label[0].startswith("tench")
        and converted.config.label2id["goldfish, Carassius auratus"] == 1
    )


def test_swin_stage_smaller_than_window(tmp_path):
    """Official Swin shrinks the window (and bias table) of stages smaller than it, like Swin-L's last stage."""
    backbone = SwinConfig(
        image_size=64, patch_size=4, embed_dim=16, depths=[2, 2, 2], num_heads=[1, 2, 2], window_size=8
    )  # stage resolutions 16, 8, 4: the last one runs a 4x4 window
    official = official_pretraining_state_dict(_perturb(SimMIMForMaskedImageModeling(SimMIMConfig(backbone))))
    for j in range(2):
        official[f"encoder.layers.2.blocks.{j}.attn.relative_position_bias_table"] = torch.randn(7 * 7, 2)
    config = {
        **SWIN_OFFICIAL,
        "MODEL": {
            **SWIN_OFFICIAL["MODEL"],
            "SWIN": {**SWIN_OFFICIAL["MODEL"]["SWIN"], "DEPTHS": [2, 2, 2], "NUM_HEADS": [1, 2, 2], "WINDOW_SIZE": 8},
        },
    }
    path = save_official(tmp_path / "pt.pth", official, config)
    target = SimMIMForMaskedImageModeling(SimMIMConfig(backbone))
    table = target.swin.encoder.layers[2].blocks[0].attention.relative_position_bias.relative_position_bias_table
    assert table.shape[0] == 7 * 7  # the swin adapter clamps windows like the official model
    converted = convert_official_checkpoint(path)
    converted_table = (
        converted.swin.encoder.layers[2].blocks[1].attention.relative_position_bias.relative_position_bias_table
    )
    assert torch.equal(converted_table, official["encoder.layers.2.blocks.1.attn.relative_position_bias_table"])
    output = converted(torch.randn(1, 3, 64, 64), bool_masked_pos=_mask(4, batch=1))
    assert torch.isfinite(output.loss)


def test_vit_without_qkv_bias_gets_zero_biases(tmp_path):
    model = tiny_vit_mim()
    official = official_pretraining_state_dict(model)
    for key in [k for k in official if k.endswith(("q_bias", "v_bias"))]:
        del official[key]
    config = {
        **VIT_OFFICIAL,
        "MODEL": {**VIT_OFFICIAL["MODEL"], "VIT": {**VIT_OFFICIAL["MODEL"]["VIT"], "QKV_BIAS": False}},
    }
    converted = convert_official_checkpoint(save_official(tmp_path / "pt.pth", official, config))
    assert not converted.beit.layers[0].attention.q_proj.bias.any()
    assert not converted.beit.layers[1].attention.v_proj.bias.any()


# ----------------------------------------------------------------------------------------------------------------
# Where the architecture comes from
# ----------------------------------------------------------------------------------------------------------------

ARCH_FIELDS = (
    "family",
    "image_size",
    "patch_size",
    "in_chans",
    "embed_dim",
    "depths",
    "num_heads",
    "mlp_ratio",
    "qkv_bias",
    "ape",
    "use_rpb",
    "use_shared_rpb",
    "use_mean_pooling",
)


@pytest.mark.parametrize("family", ["swin", "vit"])
def test_inferred_architecture_matches_the_config(family):
    model = tiny_swin_mim() if family == "swin" else tiny_vit_mim()
    encoder = {
        k.removeprefix("encoder."): v
        for k, v in official_pretraining_state_dict(model).items()
        if k.startswith("encoder.")
    }
    inferred = infer_architecture(encoder)
    stated = architecture_from_config(SWIN_OFFICIAL if family == "swin" else VIT_OFFICIAL, "test")
    for name in ARCH_FIELDS + (("window_size",) if family == "swin" else ()):
        assert getattr(inferred, name) == getattr(stated, name), name
    assert inferred.source == "inferred from the tensor shapes"


def test_bare_state_dict_is_inferred_and_yaml_overrides(tmp_path, capsys):
    model = tiny_swin_mim()
    path = tmp_path / "bare.pth"
    torch.save(official_pretraining_state_dict(model), path)  # no 'model'/'config' wrapper
    assert main(["--checkpoint", str(path), "--output_dir", str(tmp_path / "a")]) == 0
    assert "Architecture: inferred from the tensor shapes" in capsys.readouterr().out

    recipe = tmp_path / "recipe.yaml"  # an official-style recipe, fields missing -> official defaults
    recipe.write_text(
        "MODEL:\n  TYPE: swin\n  SWIN:\n    EMBED_DIM: 16\n    DEPTHS: [2, 2]\n    NUM_HEADS: [1, 2]\n"
        "    WINDOW_SIZE: 4\nDATA:\n  IMG_SIZE: 64\n  MASK_RATIO: 0.5\n"
    )
    assert main(["--checkpoint", str(path), "--output_dir", str(tmp_path / "b"), "--config", str(recipe)]) == 0
    assert f"Architecture: --config {recipe}" in capsys.readouterr().out
    assert SimMIMConfig.from_pretrained(tmp_path / "b").mask_ratio == 0.5


def test_read_official_yaml_fills_official_defaults_and_base(tmp_path):
    (tmp_path / "base.yaml").write_text("MODEL:\n  TYPE: vit\n  VIT:\n    DEPTH: 6\n")
    (tmp_path / "child.yaml").write_text("BASE: ['base.yaml']\nMODEL:\n  VIT:\n    NUM_HEADS: 6\n")
    cfg = read_official_yaml(tmp_path / "child.yaml")
    assert cfg["MODEL"]["VIT"]["DEPTH"] == 6 and cfg["MODEL"]["VIT"]["NUM_HEADS"] == 6
    assert cfg["MODEL"]["VIT"]["EMBED_DIM"] == OFFICIAL_DEFAULTS["MODEL"]["VIT"]["EMBED_DIM"]
    arch = architecture_from_config(cfg, "yaml")
    assert (arch.family, arch.image_size, arch.depths, arch.use_shared_rpb) == ("vit", 224, [6], True)


def test_swin_without_any_size_hint_asks_for_the_config(tmp_path):
    # one block per stage: no shifted block, hence no attn_mask from which the image size could be read
    model = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("swin_test"))
    torch.save({"model": official_pretraining_state_dict(model)}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="Cannot infer the image size.*--config"):
        convert_official_checkpoint(tmp_path / "x.pth")


# ----------------------------------------------------------------------------------------------------------------
# Errors that say what is wrong
# ----------------------------------------------------------------------------------------------------------------


def test_unknown_missing_and_mismatched_tensors_are_listed(tmp_path):
    official = official_pretraining_state_dict(tiny_swin_mim())

    unknown = dict(official, **{"encoder.layers.0.blocks.0.attn.extra_scale": torch.ones(1)})
    with pytest.raises(ValueError, match=r"no counterpart.*layers\.0\.blocks\.0\.attn\.extra_scale"):
        convert_official_checkpoint(save_official(tmp_path / "a.pth", unknown, SWIN_OFFICIAL))

    missing = {k: v for k, v in official.items() if k != "encoder.norm.weight"}
    with pytest.raises(ValueError, match=r"missing in the checkpoint: swin\.layernorm\.weight"):
        convert_official_checkpoint(save_official(tmp_path / "b.pth", missing, SWIN_OFFICIAL))

    wrong_window = {
        **SWIN_OFFICIAL,
        "MODEL": {**SWIN_OFFICIAL["MODEL"], "SWIN": {**SWIN_OFFICIAL["MODEL"]["SWIN"], "WINDOW_SIZE": 2}},
    }
    with pytest.raises(ValueError, match=r"shape mismatches: .*relative_position_bias_table: checkpoint \(49, 1\)"):
        convert_official_checkpoint(save_official(tmp_path / "c.pth", official, wrong_window))

    with pytest.raises(ValueError, match="Neither an official SimMIM pretraining checkpoint"):
        convert_official_checkpoint(save_official(tmp_path / "d.pth", {"backbone.w": torch.ones(1)}))


def test_wrong_family_in_config(tmp_path):
    official = official_pretraining_state_dict(tiny_swin_mim())
    with pytest.raises(ValueError, match=r"MODEL.TYPE='vit'.*official 'swin' model"):
        convert_official_checkpoint(save_official(tmp_path / "a.pth", official, VIT_OFFICIAL))
    other = {**SWIN_OFFICIAL, "MODEL": {**SWIN_OFFICIAL["MODEL"], "TYPE": "swinv2"}}
    with pytest.raises(ValueError, match="Unsupported MODEL.TYPE 'swinv2'"):
        convert_official_checkpoint(save_official(tmp_path / "b.pth", official, other))


def test_push_to_hub_uploads_model_and_processor(tmp_path, monkeypatch):
    pushed = []
    monkeypatch.setattr(SimMIMForMaskedImageModeling, "push_to_hub", lambda self, repo, **kw: pushed.append(repo))
    monkeypatch.setattr("transformers.BitImageProcessor.push_to_hub", lambda self, repo, **kw: pushed.append(repo))
    path = save_official(tmp_path / "pt.pth", official_pretraining_state_dict(tiny_vit_mim()), VIT_OFFICIAL)
    assert main(["--checkpoint", str(path), "--push_to_hub", "someone/simmim-vit"]) == 0
    assert pushed == ["someone/simmim-vit", "someone/simmim-vit"]


# ----------------------------------------------------------------------------------------------------------------
# The command line, as users run it
# ----------------------------------------------------------------------------------------------------------------


def test_cli_help_and_conversion_in_a_subprocess(tmp_path):
    model = tiny_vit_classifier()
    path = save_official(
        tmp_path / "ft.pth",
        official_finetuned_state_dict(model),
        {
            **VIT_OFFICIAL,
            "MODEL": {
                **VIT_OFFICIAL["MODEL"],
                "NUM_CLASSES": 5,
                "VIT": {
                    **VIT_OFFICIAL["MODEL"]["VIT"],
                    "USE_RPB": True,
                    "USE_SHARED_RPB": False,
                    "USE_MEAN_POOLING": True,
                },
            },
        },
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [sys.executable, "-m", "modeling_simmim.convert_official"]
    # Both runs at once: each spends most of its time importing torch and transformers.
    runs = [
        subprocess.Popen(
            command + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path
        )
        for args in (["--help"], ["--checkpoint", str(path), "--output_dir", str(tmp_path / "out")])
    ]
    (help_out, _), (out, err) = (run.communicate(timeout=300) for run in runs)
    assert runs[0].returncode == 0
    for flag in ("--checkpoint", "--output_dir", "--config", "--push_to_hub"):
        assert flag in help_out
    assert runs[1].returncode == 0, err
    assert "Architecture: the config stored in the checkpoint" in out
    assert "finetuned classifier, 5 classes" in out
    saved_class = json.loads((tmp_path / "out" / "config.json").read_text())["architectures"][0]
    reloaded = getattr(modeling_simmim, saved_class, None) or getattr(transformers, saved_class)
    reloaded = reloaded.from_pretrained(tmp_path / "out").eval()
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixels).logits, model(pixels).logits, rtol=0, atol=1e-6)


def test_cli_errors_exit_nonzero_with_the_reason(tmp_path, capsys):
    assert main(["--checkpoint", str(tmp_path / "nope.pth"), "--output_dir", str(tmp_path / "x")]) == 1
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--checkpoint", "x.pth"])  # neither --output_dir nor --push_to_hub
