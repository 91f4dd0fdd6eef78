"""modeling_simmim.cpu_bf16: bf16 matrix products on CPUs without native bf16 run as float32 kernels on bf16-rounded
operands. Checked against the exact bf16-GEMM contract, against PyTorch's own bf16 kernels, in every model family
(inside the step context the Trainer enters; never inside the models' own forward), and through run_mim.py --bf16."""

import contextlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from modeling_simmim import SimMIMConfig, SimMIMForImageClassification, SimMIMForMaskedImageModeling, cpu_bf16
from modeling_simmim.cpu_bf16 import CPUBf16MatmulFallback, fallback_context, set_cpu_bf16_matmul
from modeling_simmim.masking import SimMIMMaskGenerator

BF16 = torch.bfloat16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def mode():
    """Set the module's mode for one test and restore it afterwards."""
    previous = set_cpu_bf16_matmul("auto")
    yield set_cpu_bf16_matmul
    set_cpu_bf16_matmul(previous)


@pytest.fixture
def rerouted_calls(monkeypatch):
    """Counts the calls that the fallback reroutes."""
    calls = []
    real = cpu_bf16._float32_kernel_on_bf16_operands

    def counting(func, args, kwargs):
        calls.append(func)
        return real(func, args, kwargs)

    monkeypatch.setattr(cpu_bf16, "_float32_kernel_on_bf16_operands", counting)
    return calls


def _bf16_exact(tensor):
    return tensor.to(BF16).float()


def _leaf(*shape, scale=1.0):
    return (torch.randn(*shape) * scale).requires_grad_()


# ---- the kernel contract -----------------------------------------------------------------------------------------
def test_linear_is_a_float32_product_of_bf16_values_with_a_bf16_result():
    x, weight, bias = _leaf(64, 48), _leaf(32, 48), _leaf(32)
    with torch.autocast("cpu", dtype=BF16), CPUBf16MatmulFallback():
        out = F.linear(x, weight, bias)
    assert out.dtype == BF16
    expected = (_bf16_exact(x) @ _bf16_exact(weight).T + _bf16_exact(bias)).to(BF16)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)

    grad_out = torch.randn(64, 32).to(BF16)
    out.backward(grad_out)
    g = grad_out.float()
    # Gradients: float32 products of bf16 values, rounded to bf16 (what the native bf16 backward returns), then cast
    # back to the leaves' float32 by autocast's cast.
    torch.testing.assert_close(x.grad, (g @ _bf16_exact(weight)).to(BF16).float(), rtol=0, atol=0)
    torch.testing.assert_close(weight.grad, (g.T @ _bf16_exact(x)).to(BF16).float(), rtol=0, atol=0)
    torch.testing.assert_close(bias.grad, g.sum(0).to(BF16).float(), rtol=0, atol=0)


def _relative_error(got, reference):
    return ((got.double() - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize(
    "name, function, shapes",
    [
        ("linear", lambda x, w: F.linear(x, w), [(2, 40, 24), (16, 24)]),
        ("matmul 4d", lambda a, b: torch.matmul(a, b.transpose(-1, -2)), [(2, 3, 9, 8), (2, 3, 9, 8)]),
        ("operator @", lambda a, b: a @ b, [(5, 7, 8), (5, 8, 6)]),
        ("bmm", torch.bmm, [(4, 10, 8), (4, 8, 12)]),
        ("conv2d patchify", lambda x, w: F.conv2d(x, w, stride=4), [(2, 3, 16, 16), (8, 3, 4, 4)]),
        ("conv2d 1x1", lambda x, w: F.conv2d(x, w), [(2, 16, 3, 3), (48, 16, 1, 1)]),
        ("sdpa", lambda q, k, v: F.scaled_dot_product_attention(q, k, v), [(2, 2, 9, 8)] * 3),
        ("addmm", lambda c, a, b: torch.addmm(c, a, b), [(6, 5), (6, 16), (16, 5)]),
        ("baddbmm", lambda c, a, b: torch.baddbmm(c, a, b, alpha=0.5), [(3, 6, 5), (3, 6, 16), (3, 16, 5)]),
        ("addbmm", torch.addbmm, [(6, 5), (3, 6, 16), (3, 16, 5)]),
        ("inner n-d", torch.inner, [(5, 8), (4, 8)]),
        ("einsum list", lambda a, b: torch.einsum("bij,bjk->bik", [a, b]), [(2, 5, 8), (2, 8, 3)]),
        ("einsum varargs", lambda a, b: torch.einsum("ij,kj->ik", a, b), [(5, 8), (4, 8)]),
        ("tensordot", lambda a, b: torch.tensordot(a, b, dims=2), [(3, 4, 8), (4, 8, 5)]),
        (
            "linalg",
            lambda a, b, c: torch.linalg.multi_dot([a, b, c]) + torch.linalg.matmul(a, b @ c),
            [(5, 8), (8, 6), (6, 4)],
        ),
        ("conv1d", lambda x, w: F.conv1d(x, w, padding=1), [(2, 6, 10), (4, 6, 3)]),
        ("conv3d", lambda x, w: F.conv3d(x, w), [(1, 3, 4, 6, 6), (4, 3, 2, 3, 3)]),
        ("conv_transpose2d", lambda x, w: F.conv_transpose2d(x, w, stride=2), [(2, 4, 5, 5), (4, 3, 2, 2)]),
    ],
)
def test_every_rerouted_call_is_as_accurate_as_pytorchs_bf16_kernel(name, function, shapes, rerouted_calls):
    """Forward and gradients against a float64 computation on the same bf16 operands: the fallback's relative error
    is at most a bf16 rounding (1e-2), or 1.5x that of PyTorch's own bf16 kernel where that one is larger."""
    leaves = [_bf16_exact(torch.randn(*shape)) for shape in shapes]
    reference_inputs = [leaf.double().requires_grad_() for leaf in leaves]
    reference = function(*reference_inputs)
    grad_output = torch.randn(reference.shape).to(BF16)
    reference.backward(grad_output.double())

    errors = {}
    for use_fallback in (False, True):
        inputs = [leaf.clone().requires_grad_() for leaf in leaves]
        rerouted_calls.clear()
        with torch.autocast("cpu", dtype=BF16), CPUBf16MatmulFallback() if use_fallback else contextlib.nullcontext():
            out = function(*inputs)
        assert bool(rerouted_calls) == use_fallback, name
        assert out.dtype == BF16
        out.backward(grad_output)
        errors[use_fallback] = [_relative_error(out, reference.detach())] + [
            _relative_error(i.grad, r.grad) for i, r in zip(inputs, reference_inputs)
        ]
    for native_error, fallback_error in zip(errors[False], errors[True]):
        assert fallback_error <= max(1.5 * native_error, 1e-2), (name, errors)


@pytest.mark.parametrize(
    "name, function, shapes",
    [
        ("addmv / mv", lambda c, a, v: torch.addmv(c, a, v) + a.mv(v), [(6,), (6, 16), (16,)]),
        ("dot / inner", lambda a, b: torch.dot(a, b) + torch.inner(a, b) + a.dot(b), [(32,), (32,)]),
        ("bilinear", lambda a, b, w: F.bilinear(a, b, w), [(4, 6), (4, 5), (3, 6, 5)]),
    ],
)
def test_products_that_autocast_keeps_in_float32(name, function, shapes, rerouted_calls):
    """PyTorch's autocast leaves these in float32, so does the fallback; with bf16 operands they are rerouted, as
    accurate as PyTorch's bf16 kernel."""
    leaves = [torch.randn(*shape) for shape in shapes]
    with torch.autocast("cpu", dtype=BF16):
        native = function(*leaves)
        with CPUBf16MatmulFallback():
            out = function(*leaves)
    assert not rerouted_calls and out.dtype == torch.float32
    torch.testing.assert_close(out, native, rtol=0, atol=0)
    bf16_leaves = [leaf.to(BF16) for leaf in leaves]
    reference = function(*[leaf.double() for leaf in bf16_leaves])
    with CPUBf16MatmulFallback():
        out = function(*bf16_leaves)
    assert rerouted_calls and out.dtype == BF16
    native = function(*bf16_leaves)
    assert _relative_error(out, reference) <= max(1.5 * _relative_error(native, reference), 1e-2), name


def test_saved_operands_are_stored_as_bf16(monkeypatch):
    """The float32 kernel's saved inputs hold bf16 values only, so they are kept as bf16 (half the memory); what is
    not an operand (SDPA's output, log-sum-exp) is kept as it is."""
    packed = []
    real_hooks = torch.autograd.graph.saved_tensors_hooks

    def spying_hooks(pack, unpack):
        def spy(tensor):
            result = pack(tensor)
            packed.append((tensor.dtype, result[1].dtype))
            return result

        return real_hooks(spy, unpack)

    monkeypatch.setattr(torch.autograd.graph, "saved_tensors_hooks", spying_hooks)
    x, weight = _leaf(32, 16), _leaf(8, 16)
    with torch.autocast("cpu", dtype=BF16), CPUBf16MatmulFallback():
        out = F.linear(x, weight)
    assert packed and all(stored == BF16 for _, stored in packed), packed
    out.float().sum().backward()  # unpacking works
    assert x.grad is not None and weight.grad is not None

    packed.clear()
    q, k, v = (_leaf(1, 2, 8, 4) for _ in range(3))
    with torch.autocast("cpu", dtype=BF16), CPUBf16MatmulFallback():
        out = F.scaled_dot_product_attention(q, k, v)
    stored = [dtype for _, dtype in packed]
    assert stored.count(BF16) >= 3 and torch.float32 in stored  # q, k, v as bf16; output/logsumexp as float32
    out.float().sum().backward()
    assert q.grad is not None


def test_other_calls_and_other_dtypes_pass_through(rerouted_calls):
    x, weight = torch.randn(4, 8), torch.randn(3, 8)
    with CPUBf16MatmulFallback():
        out = F.linear(x, weight)  # float32 without autocast: untouched
        torch.softmax(x, dim=-1)
        (x.to(torch.float64) @ weight.to(torch.float64).T)
    with torch.autocast("cpu", dtype=BF16), CPUBf16MatmulFallback():
        double = x.double() @ weight.double().T  # autocast leaves float64 alone, and so does the fallback
    assert not rerouted_calls and out.dtype == torch.float32 and double.dtype == torch.float64
    torch.testing.assert_close(out, x @ weight.T)
    torch.testing.assert_close(double, x.double() @ weight.double().T)
    with CPUBf16MatmulFallback():
        out = F.linear(x.to(BF16), weight.to(BF16))  # all-bf16 operands without autocast: rerouted
    assert rerouted_calls == [F.linear] and out.dtype == BF16


# ---- when the models use it --------------------------------------------------------------------------------------
def _mim(preset, **overrides):
    config = SimMIMConfig.from_preset(preset, **overrides)
    model = SimMIMForMaskedImageModeling(config)
    size = config.image_size[0]
    pixels = torch.randn(2, 3, size, size)
    mask = SimMIMMaskGenerator(size, config.mask_patch_size, config.model_patch_size)(
        2, torch.Generator().manual_seed(1)
    )
    return model, pixels, mask


def _loss_and_grads(model, pixels, mask):
    model.zero_grad()
    with torch.autocast("cpu", dtype=BF16), fallback_context(model, pixels):  # what the SimMIM Trainer enters
        loss = model(pixels, bool_masked_pos=mask).loss
    loss.backward()
    return loss.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("preset", ["swin_test", "swinv2_test", "vit_test", "beit_test"])
def test_mim_models_train_the_same_with_the_fallback(preset, mode, rerouted_calls):
    model, pixels, mask = _mim(preset)
    mode("native")
    native_loss, native_grads = _loss_and_grads(model, pixels, mask)
    assert not rerouted_calls
    mode("fallback")
    loss, grads = _loss_and_grads(model, pixels, mask)
    assert rerouted_calls
    # The tolerance for bf16 paths: the same loss within 1e-2 relative; gradients point the same way.
    assert abs(loss - native_loss) <= 1e-2 * abs(native_loss)
    assert F.cosine_similarity(grads, native_grads, dim=0) > 0.999
    assert (grads - native_grads).norm() <= 2e-2 * native_grads.norm()


def test_classifier_uses_it_too(mode, rerouted_calls):
    config = SimMIMConfig.from_preset("swin_test")
    config.num_labels = 5
    model = SimMIMForImageClassification(config)
    pixels, labels = torch.randn(2, 3, 64, 64), torch.tensor([1, 3])
    outputs = {}
    for name in ("native", "fallback"):
        mode(name)
        with torch.autocast("cpu", dtype=BF16), fallback_context(model, pixels):
            outputs[name] = model(pixels, labels=labels)
    assert rerouted_calls
    torch.testing.assert_close(
        outputs["fallback"].logits.float(), outputs["native"].logits.float(), rtol=2e-2, atol=2e-2
    )
    assert abs(outputs["fallback"].loss - outputs["native"].loss) <= 1e-2 * outputs["native"].loss


def test_a_model_cast_to_bf16_uses_it_without_autocast(mode, rerouted_calls):
    model, pixels, mask = _mim("swin_test")
    model = model.to(BF16).eval()
    mode("fallback")
    with torch.no_grad(), fallback_context(model):  # decided from the model's bf16 weights
        reconstruction = model(pixels.to(BF16)).reconstruction
    assert rerouted_calls and reconstruction.dtype == BF16
    mode("native")
    with torch.no_grad():
        native = model(pixels.to(BF16)).reconstruction
    torch.testing.assert_close(reconstruction.float(), native.float(), rtol=3e-2, atol=3e-2)


def test_the_models_never_enter_it_themselves(mode, rerouted_calls):
    """The model files run with torch and transformers alone: the fallback is the training loop's choice."""
    model, pixels, mask = _mim("swin_test")
    mode("fallback")
    with torch.autocast("cpu", dtype=BF16):
        model(pixels, bool_masked_pos=mask).loss.backward()
    assert not rerouted_calls
    import modeling_simmim.modeling_simmim as core

    assert "cpu_bf16" not in open(core.__file__).read()


def test_the_trainer_flag_decides_without_autocast_or_inputs(mode, monkeypatch):
    model, _, _ = _mim("swin_test")
    monkeypatch.setattr(cpu_bf16, "native_cpu_bf16_matmul_supported", lambda: False)
    mode("auto")
    assert isinstance(fallback_context(model, bf16=True), CPUBf16MatmulFallback)  # Trainer(args.bf16=True)
    assert not isinstance(fallback_context(model, bf16=False), CPUBf16MatmulFallback)


def test_auto_follows_the_cpu(mode, monkeypatch):
    model, pixels, _ = _mim("swin_test")
    mode("auto")
    with torch.autocast("cpu", dtype=BF16):
        monkeypatch.setattr(cpu_bf16, "native_cpu_bf16_matmul_supported", lambda: False)
        assert isinstance(fallback_context(model, pixels), CPUBf16MatmulFallback)
        monkeypatch.setattr(cpu_bf16, "native_cpu_bf16_matmul_supported", lambda: True)  # AVX512-BF16 / AMX
        assert not isinstance(fallback_context(model, pixels), CPUBf16MatmulFallback)
    mode("native")
    monkeypatch.setattr(cpu_bf16, "native_cpu_bf16_matmul_supported", lambda: False)
    with torch.autocast("cpu", dtype=BF16):
        assert not isinstance(fallback_context(model, pixels), CPUBf16MatmulFallback)


def test_not_used_in_float32_under_compile_or_with_gradient_checkpointing(mode, monkeypatch, rerouted_calls):
    model, pixels, mask = _mim("swin_test")
    mode("fallback")
    assert not isinstance(fallback_context(model, pixels), CPUBf16MatmulFallback)  # float32
    with torch.autocast("cpu", dtype=BF16):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert not isinstance(fallback_context(model, pixels), CPUBf16MatmulFallback)
        monkeypatch.undo()
        model.gradient_checkpointing_enable()
        model.train()
        assert not isinstance(fallback_context(model, pixels), CPUBf16MatmulFallback)
        model.eval()  # no recomputation in eval: the fallback is safe again
        assert isinstance(fallback_context(model, pixels), CPUBf16MatmulFallback)
    # Training with checkpointing under bf16 still works (PyTorch's kernels, recomputed layers).
    model.train()
    loss, grads = _loss_and_grads(model, pixels, mask)
    assert torch.isfinite(loss) and torch.isfinite(grads).all()


def test_the_context_manager_restores_the_mode(mode):
    mode("fallback")
    with cpu_bf16.cpu_bf16_matmul("native"):
        assert cpu_bf16._MODE == "native"
        with pytest.raises(ValueError, match="auto"), cpu_bf16.cpu_bf16_matmul("sometimes"):
            pass
    assert cpu_bf16._MODE == "fallback"


def test_bad_modes_are_refused():
    with pytest.raises(ValueError, match="auto"):
        set_cpu_bf16_matmul("fast")
    result = subprocess.run(
        [sys.executable, "-c", "import modeling_simmim.cpu_bf16"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "SIMMIM_CPU_BF16_MATMUL": "always"},
    )
    assert result.returncode != 0 and "SIMMIM_CPU_BF16_MATMUL must be one of" in result.stderr


def test_run_mim_with_bf16_on_the_cpu(tmp_path, mode, rerouted_calls, caplog):
    import logging

    import run_mim

    mode("fallback")  # on any CPU, so that this test checks the same path on machines with native bf16
    output_dir = str(tmp_path / "bf16")
    with caplog.at_level(logging.INFO, logger="modeling_simmim.trainer"):
        results = run_mim.main(
            [
                "--model_preset",
                "swin_test",
                "--mask_patch_size",
                "16",
                "--per_device_train_batch_size",
                "4",
                "--max_steps",
                "2",
                "--logging_steps",
                "1",
                "--save_strategy",
                "no",
                "--use_cpu",
                "--bf16",
                "--disable_tqdm",
                "true",
                "--report_to",
                "none",
                "--max_train_samples",
                "16",
                "--max_eval_samples",
                "4",
                "--output_dir",
                output_dir,
            ]
        )
    assert "float32 kernels on bf16-rounded operands" in caplog.text  # the log says which kernels run
    assert rerouted_calls, "the Trainer's bf16 autocast did not reach the fallback"
    assert results["train_loss"] > 0 and torch.isfinite(torch.tensor(results["train_loss"]))


# ---- the benchmarks ----------------------------------------------------------------------------------------------
def _load_benchmark(name):
    import importlib.util

    path = os.path.join(ROOT, "benchmarks", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_matmul_benchmark_reports_the_three_kernels():
    benchmark = _load_benchmark("cpu_bf16_matmul")
    rows = benchmark.run(repeats=1, shapes=[(64, 32, 16)])
    assert rows[0]["shape"] == "64x32 @ 32x16"
    assert all(rows[0][name] > 0 for name in ("fp32", "bf16 (PyTorch)", "bf16 (fallback)"))
    assert "| 64x32 @ 32x16 |" in benchmark.format_table(rows)


def test_pretrain_benchmark_separates_the_fallback(mode):
    benchmark = _load_benchmark("pretrain_throughput")
    mode("fallback")
    report = benchmark.main(
        [
            "--model",
            "swin_test",
            "--batch_size",
            "2",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--dtype",
            "bf16",
            "--impls",
            "ours,ours_native_bf16",
            "--timer",
            "cpu",
        ]
    )
    rows = {r["impl"]: r for r in report["results"]}
    assert set(rows) == {"ours", "ours_native_bf16"}
    assert "native_cpu_bf16_matmul" in report["meta"]
    # The fallback adds the bf16 rounding copies of the operands: more kernels than PyTorch's bf16 path.
    assert rows["ours"]["extra"]["kernels"] > rows["ours_native_bf16"]["extra"]["kernels"]
    assert cpu_bf16._MODE == "fallback"  # the benchmark restores the mode after each native step
