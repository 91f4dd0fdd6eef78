"""The fast window attention computes transformers' Swin function, keeps its state dict, and composes with the rest.

References are transformers' own modules with `attn_implementation="eager"` (its explicit softmax path) or "sdpa".
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import SwinConfig, SwinForMaskedImageModeling, SwinModel
from transformers.models.swin.modeling_swin import SwinLayer

from modeling_simmim import SimMIMConfig, SimMIMForMaskedImageModeling, swin_attention
from modeling_simmim.swin_attention import (
    FastSwinLayer,
    disable_fast_window_attention,
    enable_fast_window_attention,
    fast_window_attention_enabled,
    set_attention_backend,
)

BACKENDS = ["math", "sdpa"]


def _swin_config(**overrides) -> SwinConfig:
    # Two stages, two blocks each (W-MSA then SW-MSA in both), window 4: stage resolutions 16 and 8 at 64 px.
    kwargs = dict(image_size=64, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4,
                  encoder_stride=8, drop_path_rate=0.0)
    kwargs.update(overrides)
    config = SwinConfig(**kwargs)
    config._attn_implementation = "eager"
    return config


def _randomize(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    # transformers initializes bias tables and the mask token to zero: make every parameter matter.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * std)
    return model


@pytest.fixture(params=BACKENDS)
def backend(request):
    previous = set_attention_backend(request.param)
    yield request.param
    set_attention_backend(previous)


def _pair_of_models(config: SwinConfig, cls=SwinModel, **kwargs):
    reference = _randomize(cls(config, **kwargs)).train()
    fast = enable_fast_window_attention(copy.deepcopy(reference))
    return reference, fast


def _loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model)
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def _assert_grads_close(reference: dict, fast: dict, rtol: float, atol_scale: float) -> None:
    assert reference.keys() == fast.keys()
    for name, ref_grad in reference.items():
        atol = atol_scale * ref_grad.abs().max().clamp_min(1e-3).item()
        torch.testing.assert_close(fast[name], ref_grad, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def _feature_loss(pixel_values):
    # Weights each output element differently so that a token permutation error cannot cancel out.
    def loss_fn(model):
        hidden = model(pixel_values).last_hidden_state
        weights = torch.linspace(-1.0, 2.0, hidden.numel()).view_as(hidden)
        return (hidden * weights).sum() / hidden.numel() + hidden.square().mean()

    return loss_fn


# ----------------------------------------------------------------------------------------------------------------------
# Numerics


@pytest.mark.parametrize(
    "size, backend",
    [
        ((64, 64), "math"),  # config size; 16x16 and 8x8 maps, shifted windows in both stages
        ((48, 80), "math"),  # non-square, not the config size
        ((40, 56), "math"),  # 10x14 then 5x7 maps: padding to the window in both stages, shift masks on padded maps
        ((36, 36), "math"),  # 9x9: padding; second stage 5x5 > window: still shifted
        ((40, 56), "sdpa"),  # the SDPA formulation (GPU default) on the hardest geometry
    ],
)
def test_fp32_loss_and_gradients_match_transformers(size, backend):
    previous = set_attention_backend(backend)
    try:
        _check_fp32_equivalence(size)
    finally:
        set_attention_backend(previous)


def _check_fp32_equivalence(size):
    reference, fast = _pair_of_models(_swin_config())
    pixel_values = torch.randn(2, 3, *size)
    ref_loss, ref_grads = _loss_and_grads(reference, _feature_loss(pixel_values))
    fast_loss, fast_grads = _loss_and_grads(fast, _feature_loss(pixel_values))
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-5, atol=0)
    _assert_grads_close(ref_grads, fast_grads, rtol=1e-4, atol_scale=1e-5)
    # The bias table really is used and trained (the gather must backprop to it).
    assert all(g.abs().sum() > 0 for n, g in fast_grads.items() if n.endswith("relative_position_bias_table"))


def test_masked_image_modeling_loss_matches_transformers(backend):
    # Transformers' MIM head only accepts the config's square size; there the whole model must agree.
    reference, fast = _pair_of_models(_swin_config(), cls=SwinForMaskedImageModeling)
    pixel_values = torch.randn(2, 3, 64, 64)
    mask = torch.rand(2, 16 * 16, generator=torch.Generator().manual_seed(3)) < 0.6
    ref_loss, ref_grads = _loss_and_grads(reference, lambda m: m(pixel_values, bool_masked_pos=mask).loss)
    fast_loss, fast_grads = _loss_and_grads(fast, lambda m: m(pixel_values, bool_masked_pos=mask).loss)
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-5, atol=0)
    _assert_grads_close(ref_grads, fast_grads, rtol=1e-4, atol_scale=1e-5)
    assert fast_grads["swin.embeddings.mask_token"].abs().sum() > 0


@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_simmim_model_fast_vs_transformers_forward(size):
    # Our model with the flag on and off, with a mask, at a non-square size that transformers' own head rejects.
    config = SimMIMConfig.from_preset("swin_test", depths=[2, 2], num_heads=[2, 4], embed_dim=16)
    fast = _randomize(SimMIMForMaskedImageModeling(config))
    slow_config = copy.deepcopy(config)
    slow_config.fast_window_attention = False
    slow = SimMIMForMaskedImageModeling(slow_config)
    slow.load_state_dict(fast.state_dict())
    assert fast_window_attention_enabled(fast) and not fast_window_attention_enabled(slow)
    pixel_values = torch.randn(2, 3, *size)
    mask = torch.rand(2, size[0] // 4, size[1] // 4, generator=torch.Generator().manual_seed(0)) < 0.5
    ref_loss, ref_grads = _loss_and_grads(slow, lambda m: m(pixel_values, bool_masked_pos=mask).loss)
    fast_loss, fast_grads = _loss_and_grads(fast, lambda m: m(pixel_values, bool_masked_pos=mask).loss)
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-5, atol=0)
    _assert_grads_close(ref_grads, fast_grads, rtol=1e-4, atol_scale=1e-5)


def test_bf16_autocast_is_close_to_transformers(backend):
    reference, fast = _pair_of_models(_swin_config(), cls=SwinForMaskedImageModeling)
    pixel_values = torch.randn(2, 3, 64, 64)
    mask = torch.rand(2, 16 * 16, generator=torch.Generator().manual_seed(3)) < 0.6

    def loss_fn(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(pixel_values, bool_masked_pos=mask).loss

    ref_loss, ref_grads = _loss_and_grads(reference, loss_fn)
    fast_loss, fast_grads = _loss_and_grads(fast, loss_fn)
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-2, atol=0)
    ref_flat = torch.cat([g.flatten().float() for g in ref_grads.values()])
    fast_flat = torch.cat([fast_grads[n].flatten().float() for n in ref_grads])
    assert torch.nn.functional.cosine_similarity(ref_flat, fast_flat, dim=0) > 0.99
    assert (fast_flat - ref_flat).norm() / ref_flat.norm() < 0.1


def test_dropout_and_drop_path_draw_the_same_masks_as_transformers():
    # Same RNG consumption order and tensor shapes as transformers' eager path: bitwise-identical random masks.
    set_attention_backend("math")
    config = _swin_config(attention_probs_dropout_prob=0.2, hidden_dropout_prob=0.1, drop_path_rate=0.3)
    reference, fast = _pair_of_models(config)
    pixel_values = torch.randn(2, 3, 48, 64)
    torch.manual_seed(7)
    ref_loss, ref_grads = _loss_and_grads(reference, _feature_loss(pixel_values))
    torch.manual_seed(7)
    fast_loss, fast_grads = _loss_and_grads(fast, _feature_loss(pixel_values))
    set_attention_backend("auto")
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-5, atol=0)
    _assert_grads_close(ref_grads, fast_grads, rtol=1e-4, atol_scale=1e-5)
    # And the randomness is on: a different seed changes the loss; eval mode is deterministic.
    torch.manual_seed(8)
    assert not torch.allclose(_feature_loss(pixel_values)(fast), fast_loss)
    fast.eval()
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(fast(pixel_values).last_hidden_state, reference(pixel_values).last_hidden_state,
                                   rtol=1e-4, atol=1e-5)


def test_window_larger_than_feature_map_uses_the_centre_of_the_bias_table():
    # One stage at 12 px: a 3x3 map with window 4. transformers raises here; the fast path must equal a transformers
    # model built with window 3 whose 5x5 bias table is the centre of the 7x7 one.
    config = _swin_config(image_size=12, depths=[2], num_heads=[2], window_size=4, encoder_stride=4)
    reference_w4, fast = _pair_of_models(config)
    pixel_values = torch.randn(2, 3, 12, 12)
    with pytest.raises(RuntimeError):
        copy.deepcopy(reference_w4)(pixel_values)

    reference_w3 = SwinModel(_swin_config(image_size=12, depths=[2], num_heads=[2], window_size=3, encoder_stride=4))
    state = fast.state_dict()
    for name in [n for n in state if n.endswith("relative_position_bias_table")]:
        state[name] = state[name].view(7, 7, -1)[1:6, 1:6].reshape(25, -1)
    reference_w3.load_state_dict(state)
    ref_loss, _ = _loss_and_grads(reference_w3.train(), _feature_loss(pixel_values))
    fast_loss, _ = _loss_and_grads(fast, _feature_loss(pixel_values))
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-5, atol=0)
    # The fast layer did not mutate itself: the configured size still works afterwards.
    assert all(layer._fast_window == 4 for layer in fast.modules() if isinstance(layer, FastSwinLayer))
    fast(torch.randn(1, 3, 32, 32))


# ----------------------------------------------------------------------------------------------------------------------
# State dict, installation, configuration


def test_state_dict_is_transformers_native():
    reference = _randomize(SwinForMaskedImageModeling(_swin_config()))
    fast = enable_fast_window_attention(copy.deepcopy(reference))
    ref_state, fast_state = reference.state_dict(), fast.state_dict()
    assert list(ref_state) == list(fast_state)
    for name, tensor in ref_state.items():
        assert torch.equal(tensor, fast_state[name]), name
    # Our model's weights load strictly into transformers' class and give the same reconstruction.
    ours = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("swin_test", depths=[2, 2], num_heads=[2, 4]))
    assert fast_window_attention_enabled(ours)
    theirs = SwinForMaskedImageModeling(ours.config.backbone_config)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(pixel_values).reconstruction, theirs(pixel_values).reconstruction,
                                   rtol=1e-4, atol=1e-5)


def test_enable_is_idempotent_and_disable_restores_transformers():
    model = _randomize(SwinModel(_swin_config()))
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(pixel_values).last_hidden_state
        assert enable_fast_window_attention(model) is model
        enable_fast_window_attention(model)
        layers = [m for m in model.modules() if isinstance(m, SwinLayer)]
        assert len(layers) == 4 and all(type(m) is FastSwinLayer for m in layers)
        assert [m._fast_shift for m in layers] == [0, 2, 0, 2]
        torch.testing.assert_close(model(pixel_values).last_hidden_state, expected, rtol=1e-4, atol=1e-5)
        disable_fast_window_attention(model)
        assert all(type(m) is SwinLayer for m in model.modules() if isinstance(m, SwinLayer))
        assert not fast_window_attention_enabled(model)
        torch.testing.assert_close(model(pixel_values).last_hidden_state, expected, rtol=1e-6, atol=1e-6)


def test_config_flag_and_unsupported_backbones(tmp_path):
    off = SimMIMForMaskedImageModeling(_config_without_fast())
    assert not fast_window_attention_enabled(off)
    on = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("swin_test"))
    assert on.config.fast_window_attention and fast_window_attention_enabled(on)
    on.save_pretrained(tmp_path)
    reloaded = SimMIMForMaskedImageModeling.from_pretrained(tmp_path)
    assert fast_window_attention_enabled(reloaded)
    # SwinV2 ignores the flag (transformers' forward); calling the installer on it is a clear error.
    swinv2 = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("swinv2_test"))
    swinv2(torch.randn(1, 3, 64, 64), bool_masked_pos=torch.zeros(1, 16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="supports transformers' Swin"):
        enable_fast_window_attention(swinv2)
    with pytest.raises(ValueError, match="attention backend"):
        set_attention_backend("flash")


def _config_without_fast() -> SimMIMConfig:
    config = SimMIMConfig.from_preset("swin_test")
    config.fast_window_attention = False
    return config


def test_geometry_is_cached_and_shift_mask_matches_transformers():
    swin_attention._cached_geometry.cache_clear()
    layer = SwinModel(_swin_config()).encoder.layers[0].blocks[1]
    expected = layer.get_attn_mask(16, 16, dtype=torch.float32, device=torch.device("cpu"))
    perm, inverse, shift_mask, _ = swin_attention._geometry(16, 16, 4, 2, 4, torch.device("cpu"))
    torch.testing.assert_close(shift_mask, expected, rtol=0, atol=0)
    assert torch.equal(perm[inverse], torch.arange(256))
    swin_attention._geometry(16, 16, 4, 2, 4, torch.device("cpu"))
    assert swin_attention._cached_geometry.cache_info().hits >= 1


# ----------------------------------------------------------------------------------------------------------------------
# Composition: gradient checkpointing, torch.compile


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(monkeypatch):
    config = SimMIMConfig.from_preset("swin_test", depths=[2, 2], num_heads=[2, 4])
    model = _randomize(SimMIMForMaskedImageModeling(config)).train()
    pixel_values = torch.randn(2, 3, 64, 64)
    mask = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(0)) < 0.5
    calls = []
    original = swin_attention._window_attention
    monkeypatch.setattr(swin_attention, "_window_attention", lambda *a, **k: calls.append(1) or original(*a, **k))

    loss, grads = _loss_and_grads(model, lambda m: m(pixel_values, bool_masked_pos=mask).loss)
    plain_calls = len(calls)
    model.gradient_checkpointing_enable()
    calls.clear()
    ckpt_loss, ckpt_grads = _loss_and_grads(model, lambda m: m(pixel_values, bool_masked_pos=mask).loss)
    assert plain_calls == 4 and len(calls) > plain_calls  # the fast layers were recomputed in the backward
    torch.testing.assert_close(ckpt_loss, loss, rtol=1e-6, atol=0)
    _assert_grads_close(grads, ckpt_grads, rtol=1e-5, atol_scale=1e-6)


def test_torch_compile_fullgraph_captures_the_fast_model():
    # Graph capture (dynamo, fullgraph) of the forward, then backward; the inductor build is the slow test below.
    torch._dynamo.reset()
    config = SimMIMConfig.from_preset("swin_test", depths=[2, 2], num_heads=[2, 4])
    model = _randomize(SimMIMForMaskedImageModeling(config)).train()
    pixel_values = torch.randn(2, 3, 64, 96)
    mask = torch.rand(2, 16, 24, generator=torch.Generator().manual_seed(0)) < 0.5
    eager_loss, eager_grads = _loss_and_grads(model, lambda m: m(pixel_values, bool_masked_pos=mask).loss)
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # dynamo capture only: no graph break
    loss, grads = _loss_and_grads(compiled, lambda m: m(pixel_values, bool_masked_pos=mask).loss)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=0)
    _assert_grads_close({k.removeprefix("_orig_mod."): v for k, v in grads.items()}, eager_grads, 1e-4, 1e-5)


@pytest.mark.slow
def test_torch_compile_inductor_fullgraph_matches_eager():
    torch._dynamo.reset()
    config = SimMIMConfig.from_preset("swin_test", depths=[2, 2], num_heads=[2, 4])
    model = _randomize(SimMIMForMaskedImageModeling(config)).train()
    pixel_values = torch.randn(2, 3, 64, 64)
    mask = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(0)) < 0.5
    eager_loss, eager_grads = _loss_and_grads(model, lambda m: m(pixel_values, bool_masked_pos=mask).loss)
    compiled = torch.compile(model, fullgraph=True)
    loss, grads = _loss_and_grads(compiled, lambda m: m(pixel_values, bool_masked_pos=mask).loss)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-4, atol=0)
    _assert_grads_close({k.removeprefix("_orig_mod."): v for k, v in grads.items()}, eager_grads, 1e-3, 1e-4)


# ----------------------------------------------------------------------------------------------------------------------
# The benchmark script (tiny smoke run)


def test_pretrain_throughput_benchmark_runs_and_reports(tmp_path):
    import importlib.util
    import json
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "pretrain_throughput.py"
    spec = importlib.util.spec_from_file_location("pretrain_throughput", path)
    benchmark = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = benchmark  # dataclasses look their module up there
    spec.loader.exec_module(benchmark)
    out = tmp_path / "report.json"
    report = benchmark.main(["--model", "swin_test", "--batch_size", "2", "--steps", "2", "--warmup", "0",
                             "--dtype", "fp32", "--impls", "ours,hf_eager", "--timer", "cpu", "--json", str(out),
                             "--profile"])
    assert json.loads(out.read_text())["meta"]["model"] == "swin_test"
    rows = {r["impl"]: r for r in report["results"]}
    assert set(rows) == {"ours", "hf_eager"}
    assert rows["hf_eager"]["ratio_vs_hf_eager"] == 1.0 and rows["ours"]["ratio_vs_hf_eager"] > 0
    # Same model and weights: same FLOPs; the fused qkv does not change the count.
    assert rows["ours"]["gflop_per_step"] == pytest.approx(rows["hf_eager"]["gflop_per_step"], rel=1e-6)
    assert len(rows["ours"]["step_times_s"]) == 2 and rows["ours"]["extra"]["kernels"] > 0
    profile = rows["ours"]["extra"]["profile"]  # --profile: where one step's time goes
    assert 0 < profile["matmul_ms"] < profile["total_ms"] and 0 < profile["matmul_share"] < 1
    assert "matmul kernels" in benchmark.format_profiles(report)
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--steps", "0"])


def test_image_classification_uses_the_fast_path_with_the_same_logits():
    from modeling_simmim.modeling_simmim import SimMIMForImageClassification

    config = SimMIMConfig.from_preset("swin_test", depths=[2, 2], num_heads=[2, 4])
    config.num_labels = 5
    fast = _randomize(SimMIMForImageClassification(config)).eval()
    assert fast_window_attention_enabled(fast)
    slow = disable_fast_window_attention(copy.deepcopy(fast))
    pixel_values = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(fast(pixel_values).logits, slow(pixel_values).logits, rtol=1e-4, atol=1e-5)


def test_output_attentions_falls_back_to_transformers_weights():
    reference = _randomize(SwinModel(_swin_config())).eval()
    fast = enable_fast_window_attention(copy.deepcopy(reference))
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference(pixel_values, output_attentions=True).attentions
        got = fast(pixel_values, output_attentions=True)
        assert len(got.attentions) == len(expected) == 2
        for a, b in zip(got.attentions, expected):
            torch.testing.assert_close(a, b)
        # Without the flag the fast path is used again (and no weights are returned).
        assert not fast(pixel_values).attentions
