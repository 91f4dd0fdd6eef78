import pytest
import torch
from transformers import SwinForMaskedImageModeling, ViTForMaskedImageModeling

from modeling_simmim import SimMIMConfig, SimMIMForMaskedImageModeling, SimMIMMaskGenerator, simmim_loss

FAMILIES = ["swin_test", "swinv2_test", "vit_test", "beit_test"]


def _model(preset: str, **overrides) -> SimMIMForMaskedImageModeling:
    return SimMIMForMaskedImageModeling(SimMIMConfig.from_preset(preset, mask_patch_size=16, **overrides))


def _mask(model, batch, size=(64, 64)):
    return SimMIMMaskGenerator(size, 16, model.config.model_patch_size, 0.6)(batch)


@pytest.mark.parametrize("preset", FAMILIES)
@pytest.mark.parametrize("size", [(64, 64), (64, 96), (96, 96)])  # config size, non-square, larger than config
def test_shapes_for_every_family(preset, size):
    model = _model(preset).eval()
    pixel_values = torch.randn(2, 3, *size)
    out = model(pixel_values, bool_masked_pos=_mask(model, 2, size))
    assert out.reconstruction.shape == (2, 3, *size)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out = model(pixel_values)  # no mask: a reconstruction, no loss
    assert out.loss is None and out.reconstruction.shape == (2, 3, *size)


@pytest.mark.parametrize(
    "preset, reference_class, prefix",
    [("swin_test", SwinForMaskedImageModeling, "swin"), ("vit_test", ViTForMaskedImageModeling, "vit")],
)
def test_equivalent_to_transformers_masked_image_modeling(preset, reference_class, prefix):
    model = _model(preset).eval()
    reference = reference_class(model.config.backbone_config).eval()
    reference.load_state_dict(model.state_dict(), strict=True)  # state dicts are interchangeable
    assert set(reference.state_dict()) == set(model.state_dict())
    pixel_values = torch.randn(3, 3, 64, 64)
    mask = _mask(model, 3)
    ours = model(pixel_values, bool_masked_pos=mask)
    theirs = reference(pixel_values, bool_masked_pos=mask.flatten(1))
    assert (ours.reconstruction - theirs.reconstruction).abs().max() <= 1e-5
    assert abs(ours.loss.item() - theirs.loss.item()) <= 1e-5


def test_transformers_fails_where_we_work_non_square():
    model = _model("swin_test").eval()
    reference = SwinForMaskedImageModeling(model.config.backbone_config).eval()
    reference.load_state_dict(model.state_dict())
    pixel_values = torch.randn(1, 3, 64, 96)
    mask = _mask(model, 1, (64, 96))
    with pytest.raises(RuntimeError):
        reference(pixel_values, bool_masked_pos=mask.flatten(1))
    assert model(pixel_values, bool_masked_pos=mask).reconstruction.shape == (1, 3, 64, 96)


def test_mask_formats_are_equivalent():
    model = _model("swin_test").eval()
    pixel_values, mask = torch.randn(2, 3, 64, 64), _mask(model, 2)
    reference = model(pixel_values, bool_masked_pos=mask).loss
    for variant in (mask.int(), mask.flatten(1), mask.flatten(1).long()):
        assert torch.equal(model(pixel_values, bool_masked_pos=variant).loss, reference)
    with pytest.raises(ValueError, match=r"must be \(batch, 256\) or \(batch, 16, 16\)"):
        model(pixel_values, bool_masked_pos=torch.ones(2, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="not divisible by mask_patch_size"):
        model(torch.randn(1, 3, 72, 72))


def test_loss_is_the_official_formula_and_ignores_unmasked_pixels():
    pixel_values = torch.randn(2, 3, 32, 32)
    reconstruction = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 8, 8, dtype=torch.bool)
    mask[:, :4] = True  # top half masked at patch size 4
    loss = simmim_loss(pixel_values, reconstruction, mask, patch_size=4)
    mask_px = mask.repeat_interleave(4, 1).repeat_interleave(4, 2).unsqueeze(1).float()
    expected = ((pixel_values - reconstruction).abs() * mask_px).sum() / (mask_px.sum() + 1e-5) / 3
    assert torch.allclose(loss, expected)
    changed = reconstruction.clone()
    changed[:, :, 16:] += 100.0  # unmasked (bottom half) pixels
    assert torch.equal(simmim_loss(pixel_values, changed, mask, 4), loss)
    changed[:, :, :16] += 1.0  # masked pixels do count
    assert not torch.equal(simmim_loss(pixel_values, changed, mask, 4), loss)


@pytest.mark.parametrize("preset", FAMILIES)
def test_gradients_reach_mask_token_and_decoder(preset):
    model = _model(preset).train()
    out = model(torch.randn(2, 3, 64, 64), bool_masked_pos=_mask(model, 2))
    out.loss.backward()
    mask_token = model.backbone.embeddings.mask_token
    assert mask_token.grad is not None and mask_token.grad.abs().sum() > 0
    assert model.decoder[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("preset", ["swin_test", "beit_test"])
def test_gradient_checkpointing_gives_the_same_gradients(preset):
    model = _model(preset).train()
    pixel_values, mask = torch.randn(2, 3, 64, 64), _mask(model, 2)
    model(pixel_values, bool_masked_pos=mask).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    model(pixel_values, bool_masked_pos=mask).loss.backward()
    for name, grad in expected.items():
        assert torch.allclose(dict(model.named_parameters())[name].grad, grad, atol=1e-6), name


def test_official_initialization():
    swin = _model("swin_test")
    assert 0.01 < swin.backbone.embeddings.mask_token.std() < 0.03  # trunc-normal 0.02 (transformers: zeros)
    table = swin.backbone.encoder.layers[0].blocks[0].attention.relative_position_bias.relative_position_bias_table
    assert 0.01 < table.std() < 0.03
    beit = _model("beit_test", num_hidden_layers=4)
    assert 0.01 < beit.backbone.embeddings.mask_token.std() < 0.03
    assert torch.allclose(beit.backbone.layers[0].lambda_1, torch.full((32,), 0.1))
    # BEiT's output projections are rescaled by 1/sqrt(2 * depth).
    first, last = beit.backbone.layers[0].mlp.fc2.weight.std(), beit.backbone.layers[3].mlp.fc2.weight.std()
    assert 1.7 < (first / last).item() < 2.3  # layer 1 divided by sqrt(2), layer 4 by sqrt(8): ratio 2


@pytest.mark.parametrize("preset", FAMILIES)
def test_save_load_round_trip_is_exact(preset, tmp_path):
    model = _model(preset).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    # Saved under the current names: the Trainer's resume / best-model reload use a plain load_state_dict.
    from safetensors.torch import load_file

    model.load_state_dict(load_file(tmp_path / "model.safetensors"), strict=True)
    loaded = SimMIMForMaskedImageModeling.from_pretrained(tmp_path).eval()
    for (name, value), (other_name, other) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert name == other_name and torch.equal(value, other), name
    pixel_values, mask = torch.randn(1, 3, 64, 64), _mask(model, 1)
    assert torch.equal(model(pixel_values, bool_masked_pos=mask).loss, loaded(pixel_values, bool_masked_pos=mask).loss)


def test_bf16_autocast_forward_backward():
    model = _model("swin_test").train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 64, 64), bool_masked_pos=_mask(model, 2))
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()


def test_return_tuple():
    model = _model("vit_test").eval()
    loss, reconstruction = model(torch.randn(1, 3, 64, 64), bool_masked_pos=_mask(model, 1), return_dict=False)
    assert loss.ndim == 0 and reconstruction.shape == (1, 3, 64, 64)


def test_swin_stage_smaller_than_window_uses_the_official_smaller_table():
    # Like Swin-L 192/w12 (last stage 6x6): here stage 2 is 8x8 with window 16 -> window 8, table 15x15, no shift.
    config = SimMIMConfig.from_preset("swin_test", mask_patch_size=16, window_size=16, fast_window_attention=True)
    model = SimMIMForMaskedImageModeling(config).eval()
    tables = {n: tuple(p.shape) for n, p in model.named_parameters() if n.endswith("relative_position_bias_table")}
    assert tables == {
        "swin.encoder.layers.0.blocks.0.attention.relative_position_bias.relative_position_bias_table": (31 * 31, 1),
        "swin.encoder.layers.1.blocks.0.attention.relative_position_bias.relative_position_bias_table": (15 * 15, 2),
    }
    pixel_values, mask = torch.randn(2, 3, 64, 64), _mask(model, 2)
    fast = model(pixel_values, bool_masked_pos=mask)
    config.fast_window_attention = False
    plain = SimMIMForMaskedImageModeling(config).eval()
    plain.load_state_dict(model.state_dict())
    reference = plain(pixel_values, bool_masked_pos=mask)
    assert torch.allclose(fast.reconstruction, reference.reconstruction, atol=1e-5)


def test_normalized_targets_match_a_direct_neighbourhood_computation():
    from modeling_simmim.modeling_simmim import normalize_targets

    pixels = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    window = 5
    expected = torch.empty_like(pixels)
    for y in range(9):
        for x in range(11):
            patch = pixels[:, :, max(0, y - 2) : y + 3, max(0, x - 2) : x + 3].flatten(2)
            mean, var = patch.mean(-1), patch.var(-1, unbiased=True)
            expected[:, :, y, x] = (pixels[:, :, y, x] - mean) / (var + 1e-6).sqrt()
    assert torch.allclose(normalize_targets(pixels, window).double(), expected, atol=1e-4)


def test_norm_target_window_changes_the_target_and_is_validated():
    model = _model("swin_test").eval()
    pixel_values, mask = torch.randn(2, 3, 64, 64), _mask(model, 2)
    raw = model(pixel_values, bool_masked_pos=mask).loss
    model.config.norm_target_window = 7
    normalized = model(pixel_values, bool_masked_pos=mask)
    from modeling_simmim.modeling_simmim import normalize_targets

    expected = simmim_loss(normalize_targets(pixel_values, 7), normalized.reconstruction, mask, 4)
    assert torch.allclose(normalized.loss, expected) and not torch.allclose(normalized.loss, raw)
    with pytest.raises(ValueError, match="norm_target_window must be an odd size >= 3 .* got 8"):
        SimMIMConfig.from_preset("swin_test", mask_patch_size=16).__class__(norm_target_window=8)


@pytest.mark.parametrize("preset", ["swin_test", "vit_test"])
def test_decoder_kernel_size_default_is_the_official_1x1(preset):
    """Default 1: the official decoder (1x1 conv, no padding), the same weights as before for the same seed, and a
    reconstruction block that depends on its own feature only."""
    torch.manual_seed(0)
    default = _model(preset)
    torch.manual_seed(0)
    explicit = _model(preset, decoder_kernel_size=1)
    conv = default.decoder[0]
    assert default.config.decoder_kernel_size == 1 and conv.kernel_size == (1, 1) and conv.padding == (0, 0)
    assert conv.weight.shape == (default.config.encoder_stride**2 * 3, default.config.hidden_size, 1, 1)
    for (name, value), (_, other) in zip(default.state_dict().items(), explicit.state_dict().items()):
        assert torch.equal(value, other), name


def _decoder_reach(model) -> tuple[torch.Tensor, int]:
    """Which reconstruction pixels change when one feature (at (1, 1) of a 4 x 4 feature map) changes; the stride."""
    stride = model.config.encoder_stride
    features = torch.randn(1, model.config.hidden_size, 4, 4)
    moved = features.clone()
    moved[:, :, 1, 1] += 1.0
    with torch.no_grad():
        return (model.decoder(moved) - model.decoder(features)).abs().sum(1)[0] > 0, stride


@pytest.mark.parametrize("preset", FAMILIES)
def test_decoder_kernel_size_3_reconstructs_from_neighbouring_features(preset):
    model = _model(preset, decoder_kernel_size=3).eval()
    conv = model.decoder[0]
    assert conv.kernel_size == (3, 3) and conv.padding == (1, 1)
    pixel_values = torch.randn(2, 3, 64, 96)
    out = model(pixel_values, bool_masked_pos=_mask(model, 2, (64, 96)))
    assert out.reconstruction.shape == (2, 3, 64, 96) and torch.isfinite(out.loss)
    changed, stride = _decoder_reach(model)
    blocks = changed.view(4, stride, 4, stride).any(3).any(1)  # which stride x stride blocks changed
    assert blocks[:3, :3].all() and not blocks[3, :].any() and not blocks[:, 3].any()  # the 3 x 3 neighbourhood
    changed, _ = _decoder_reach(_model(preset).eval())
    blocks = changed.view(4, stride, 4, stride).any(3).any(1)
    assert blocks[1, 1] and blocks.sum() == 1  # the official 1x1: its own block only


def test_decoder_kernel_size_is_saved_loaded_and_validated(tmp_path):
    model = _model("swin_test", decoder_kernel_size=3).eval()
    model.save_pretrained(tmp_path)
    import json

    saved = json.loads((tmp_path / "config.json").read_text())
    # transformers' SwinForMaskedImageModeling has a 1x1 decoder: this folder ships our model code instead
    assert saved["decoder_kernel_size"] == 3 and saved["architectures"] == ["SimMIMForMaskedImageModeling"]
    assert "AutoModelForMaskedImageModeling" in saved["auto_map"]
    loaded = SimMIMForMaskedImageModeling.from_pretrained(tmp_path).eval()
    assert loaded.config.decoder_kernel_size == 3
    pixel_values, mask = torch.randn(1, 3, 64, 64), _mask(model, 1)
    with torch.no_grad():
        assert torch.equal(
            loaded(pixel_values, bool_masked_pos=mask).reconstruction,
            model(pixel_values, bool_masked_pos=mask).reconstruction,
        )
    _model("swin_test").save_pretrained(tmp_path / "official")
    official = json.loads((tmp_path / "official" / "config.json").read_text())
    assert official["decoder_kernel_size"] == 1 and official["architectures"] == ["SwinForMaskedImageModeling"]
    for bad in (0, 2, -3):
        with pytest.raises(ValueError, match=f"decoder_kernel_size must be an odd size >= 1 .* got {bad}"):
            SimMIMConfig.from_preset("swin_test", mask_patch_size=16, decoder_kernel_size=bad)
