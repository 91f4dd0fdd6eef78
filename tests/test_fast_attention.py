"""The "simmim_window" attention function computes transformers' Swin attention through its attention interface, and
`fast_window_attention` selects it (off by default).

References are transformers' own modules with `attn_implementation="eager"` (its explicit softmax path).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AttentionInterface, SwinConfig, SwinForMaskedImageModeling, SwinModel

from modeling_simmim import SimMIMConfig, SimMIMForMaskedImageModeling, swin_attention
from modeling_simmim.backbones import FAST_WINDOW_ATTENTION
from modeling_simmim.modeling_simmim import SimMIMForImageClassification


def _swin_config(attn: str = "eager", **overrides) -> SwinConfig:
    # Two stages, two blocks each (W-MSA then SW-MSA in both), window 4: stage resolutions 16 and 8 at 64 px.
    kwargs = dict(
        image_size=64,
        patch_size=4,
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 4],
        window_size=4,
        encoder_stride=8,
        drop_path_rate=0.0,
    )
    kwargs.update(overrides)
    config = SwinConfig(**kwargs)
    config._attn_implementation = attn
    return config


def _randomize(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    # transformers initializes bias tables and the mask token to zero: make every parameter matter.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * std)
    return model


def _pair_of_models(cls=SwinModel, **overrides):
    reference = _randomize(cls(_swin_config("eager", **overrides))).train()
    fast = cls(_swin_config(FAST_WINDOW_ATTENTION, **overrides)).train()
    fast.load_state_dict(reference.state_dict())
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


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of the registered attention function."""
    counted = []
    original = swin_attention.window_attention_forward

    def counting(*args, **kwargs):
        counted.append(1)
        return original(*args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, FAST_WINDOW_ATTENTION, counting)
    return counted


# ----------------------------------------------------------------------------------------------------------------------
# Numerics


@pytest.mark.parametrize("size", [(64, 64), (48, 80), (40, 56), (36, 36)])  # config, non-square, padded maps
def test_fp32_loss_and_gradients_match_transformers(size, calls):
    reference, fast = _pair_of_models()
    pixel_values = torch.randn(2, 3, *size)
    ref_loss, ref_grads = _loss_and_grads(reference, _feature_loss(pixel_values))
    fast_loss, fast_grads = _loss_and_grads(fast, _feature_loss(pixel_values))
    assert len(calls) == 4  # every block went through the registered function
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-5, atol=0)
    _assert_grads_close(ref_grads, fast_grads, rtol=1e-4, atol_scale=1e-5)
    assert all(g.abs().sum() > 0 for n, g in fast_grads.items() if n.endswith("relative_position_bias_table"))


def test_any_transformers_swin_selects_it_by_name(tmp_path):
    reference = _randomize(SwinForMaskedImageModeling(_swin_config("eager"))).eval()
    reference.save_pretrained(tmp_path)
    fast = SwinForMaskedImageModeling.from_pretrained(tmp_path, attn_implementation=FAST_WINDOW_ATTENTION).eval()
    assert fast.config._attn_implementation == FAST_WINDOW_ATTENTION
    pixel_values = torch.randn(2, 3, 64, 64)
    mask = torch.rand(2, 16 * 16, generator=torch.Generator().manual_seed(3)) < 0.6
    with torch.no_grad():
        expected, got = reference(pixel_values, bool_masked_pos=mask), fast(pixel_values, bool_masked_pos=mask)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(got.reconstruction, expected.reconstruction, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size", [(64, 64), (64, 96)])
def test_simmim_model_flag_on_and_off_give_the_same_loss_and_gradients(size, calls):
    config = SimMIMConfig.from_preset("swin_test", depths=[2, 2], num_heads=[2, 4], fast_window_attention=True)
    fast = _randomize(SimMIMForMaskedImageModeling(config))
    assert fast.swin.config._attn_implementation == FAST_WINDOW_ATTENTION
    slow = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("swin_test", depths=[2, 2], num_heads=[2, 4]))
    assert slow.swin.config._attn_implementation != FAST_WINDOW_ATTENTION  # off by default
    slow.load_state_dict(fast.state_dict())
    pixel_values = torch.randn(2, 3, *size)
    mask = torch.rand(2, size[0] // 4, size[1] // 4, generator=torch.Generator().manual_seed(0)) < 0.5
    ref_loss, ref_grads = _loss_and_grads(slow, lambda m: m(pixel_values, bool_masked_pos=mask).loss)
    assert not calls
    fast_loss, fast_grads = _loss_and_grads(fast, lambda m: m(pixel_values, bool_masked_pos=mask).loss)
    assert len(calls) == 4
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-5, atol=0)
    _assert_grads_close(ref_grads, fast_grads, rtol=1e-4, atol_scale=1e-5)


def test_bf16_autocast_is_close_to_transformers():
    reference, fast = _pair_of_models(cls=SwinForMaskedImageModeling)
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
    # Same RNG consumption and tensor shapes as transformers' eager function: identical random masks.
    reference, fast = _pair_of_models(attention_probs_dropout_prob=0.2, hidden_dropout_prob=0.1, drop_path_rate=0.3)
    pixel_values = torch.randn(2, 3, 48, 64)
    torch.manual_seed(7)
    ref_loss, ref_grads = _loss_and_grads(reference, _feature_loss(pixel_values))
    torch.manual_seed(7)
    fast_loss, fast_grads = _loss_and_grads(fast, _feature_loss(pixel_values))
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-5, atol=0)
    _assert_grads_close(ref_grads, fast_grads, rtol=1e-4, atol_scale=1e-5)
    torch.manual_seed(8)
    assert not torch.allclose(_feature_loss(pixel_values)(fast), fast_loss)  # the randomness is on


def test_output_attentions_are_returned_never_dropped():
    reference, fast = _pair_of_models()
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference.eval()(pixel_values, output_attentions=True).attentions
        got = fast.eval()(pixel_values, output_attentions=True).attentions
    assert len(got) == len(expected) == 2 and all(a is not None for a in got)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------------
# Configuration


def test_flag_is_a_kernel_choice_not_saved_and_state_dicts_stay_native(tmp_path):
    on = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("swin_test", fast_window_attention=True))
    theirs = SwinForMaskedImageModeling(on.config.backbone_config)
    theirs.load_state_dict(on.state_dict(), strict=True)
    on.save_pretrained(tmp_path)
    assert "fast_window_attention" not in (tmp_path / "config.json").read_text()
    assert not SimMIMForMaskedImageModeling.from_pretrained(tmp_path).config.fast_window_attention
    again = SimMIMForMaskedImageModeling.from_pretrained(tmp_path, fast_window_attention=True)
    assert again.swin.config._attn_implementation == FAST_WINDOW_ATTENTION


def test_swinv2_ignores_the_flag_and_a_missing_registration_is_a_clear_error(monkeypatch):
    swinv2 = SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("swinv2_test", fast_window_attention=True))
    swinv2(torch.randn(1, 3, 64, 64), bool_masked_pos=torch.zeros(1, 16, 16, dtype=torch.bool))
    monkeypatch.delitem(AttentionInterface._global_mapping, FAST_WINDOW_ATTENTION)
    with pytest.raises(ValueError, match="needs the 'simmim_window' attention function.*import modeling_simmim"):
        SimMIMForMaskedImageModeling(SimMIMConfig.from_preset("swin_test", fast_window_attention=True))


def test_image_classification_uses_it_with_the_same_logits():
    config = SimMIMConfig.from_preset("swin_test", depths=[2, 2], num_heads=[2, 4], num_labels=5)
    slow = _randomize(SimMIMForImageClassification(config)).eval()
    fast_config = copy.deepcopy(config)
    fast_config.fast_window_attention = True
    fast = SimMIMForImageClassification(fast_config).eval()
    fast.load_state_dict(slow.state_dict())
    assert fast.swin.config._attn_implementation == FAST_WINDOW_ATTENTION
    pixel_values = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(fast(pixel_values).logits, slow(pixel_values).logits, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# Composition: gradient checkpointing, torch.compile


def test_gradient_checkpointing_recomputes_and_gives_the_same_gradients(calls):
    config = SimMIMConfig.from_preset("swin_test", depths=[2, 2], num_heads=[2, 4], fast_window_attention=True)
    model = _randomize(SimMIMForMaskedImageModeling(config)).train()
    pixel_values = torch.randn(2, 3, 64, 64)
    mask = torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(0)) < 0.5
    loss, grads = _loss_and_grads(model, lambda m: m(pixel_values, bool_masked_pos=mask).loss)
    plain_calls = len(calls)
    model.gradient_checkpointing_enable()
    calls.clear()
    ckpt_loss, ckpt_grads = _loss_and_grads(model, lambda m: m(pixel_values, bool_masked_pos=mask).loss)
    assert plain_calls == 4 and len(calls) > plain_calls  # the blocks were recomputed in the backward
    torch.testing.assert_close(ckpt_loss, loss, rtol=1e-6, atol=0)
    _assert_grads_close(grads, ckpt_grads, rtol=1e-5, atol_scale=1e-6)


def test_torch_compile_fullgraph_captures_it():
    torch._dynamo.reset()
    config = SimMIMConfig.from_preset("swin_test", depths=[2, 2], num_heads=[2, 4], fast_window_attention=True)
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
    config = SimMIMConfig.from_preset("swin_test", depths=[2, 2], num_heads=[2, 4], fast_window_attention=True)
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
    report = benchmark.main(
        [
            "--model",
            "swin_test",
            "--batch_size",
            "2",
            "--steps",
            "2",
            "--warmup",
            "0",
            "--dtype",
            "fp32",
            "--impls",
            "ours,hf_eager",
            "--timer",
            "cpu",
            "--json",
            str(out),
            "--profile",
        ]
    )
    assert json.loads(out.read_text())["meta"]["model"] == "swin_test"
    rows = {r["impl"]: r for r in report["results"]}
    assert set(rows) == {"ours", "hf_eager"}
    assert rows["hf_eager"]["ratio_vs_hf_eager"] == 1.0 and rows["ours"]["ratio_vs_hf_eager"] > 0
    # Same model and weights: same FLOPs.
    assert rows["ours"]["gflop_per_step"] == pytest.approx(rows["hf_eager"]["gflop_per_step"], rel=1e-6)
    assert len(rows["ours"]["step_times_s"]) == 2 and rows["ours"]["extra"]["kernels"] > 0
    profile = rows["ours"]["extra"]["profile"]  # --profile: where one step's time goes
    assert 0 < profile["matmul_ms"] < profile["total_ms"] and 0 < profile["matmul_share"] < 1
    assert "matmul kernels" in benchmark.format_profiles(report)
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--steps", "0"])
