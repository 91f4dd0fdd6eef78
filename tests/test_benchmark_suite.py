"""The benchmark scripts at tiny scale: the GPU suite's --smoke mode on the CPU (so that it never rots before a GPU
runs it), its budget guard, failure recording and batch search, and the CPU profile's time outside the matmuls."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def suite():
    return _load("gpu_suite")


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_smoke_suite_measures_every_section_and_records_a_failing_cell(suite, tmp_path, monkeypatch):
    build_model = suite.build_model

    def build_or_fail(arch, impl, device):
        if impl == "ours_plain":
            raise RuntimeError("CUDA out of memory (simulated)")
        return build_model(arch, impl, device)

    monkeypatch.setattr(suite, "build_model", build_or_fail)
    report = suite.main(["--smoke", "--output_dir", str(tmp_path), "--budget_s", "900"])
    saved = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert saved["meta"]["smoke"] and saved["meta"]["sections_not_run"] == []
    assert [row["impl"] for row in saved["throughput"]] == [row["impl"] for row in report["throughput"]]
    meta = report["meta"]
    assert _positive(meta["matmul_peak_tflops"]["bf16"]) and not meta["failures"]
    assert set(meta["flops_per_image"]) == {arch.key for arch in suite.SMOKE.archs}
    assert all(_positive(value) for value in meta["flops_per_image"].values())

    rows = report["throughput"]
    # every implementation in bf16 and fp32 eager; the smoke suite compiles two of them in fp32
    eager = {(r["model"], r["impl"], r["dtype"]) for r in rows if not r["compiled"]}
    assert len(eager) == 2 * sum(len(arch.impls) for arch in suite.SMOKE.archs)
    assert {(r["model"], r["impl"]) for r in rows if r["compiled"]} == {
        ("swin_test", "ours_fast"),
        ("swin_test", "hf_sdpa"),
    }
    failed = [row for row in rows if row["impl"] == "ours_plain"]
    assert [row["status"] for row in failed] == ["failed: RuntimeError: CUDA out of memory (simulated)"] * 2
    assert "build_or_fail" in saved["throughput"][rows.index(failed[0])]["traceback"]
    for row in rows:
        if row["impl"] == "ours_plain":
            continue
        assert row["status"] == "ok", row
        assert all(_positive(row[key]) for key in ("images_per_s", "step_s", "tflops", "mfu"))
        assert len(row["round_step_s"]) == suite.SMOKE.rounds
        assert row["images_per_s"] == pytest.approx(row["batch_size"] / row["step_s"])
        assert _positive(row["compile_s"]) if row["compiled"] else "compile_s" not in row
        if row["family"] == "swin":
            assert row["vs_hf_sdpa"] == 1.0 if row["impl"] == "hf_sdpa" else _positive(row["vs_hf_sdpa"])

    assert [row["impl"] for row in report["profile"]] == ["ours_fast", "hf_sdpa"]
    for row in report["profile"]:
        assert row["status"] == "ok" and 0 < row["outside_matmul_share"] < 1 and 0 < row["matmul_share"] < 1
        assert row["top_ms"] and all(_positive(ms) for _, ms in row["top_ms"])

    assert [(r["impl"], r["checkpointing"]) for r in report["max_batch"]] == [
        ("ours_fast", False),
        ("ours_fast", True),
    ]
    for row in report["max_batch"]:  # the smoke cap is 8: nothing fails below it on a CPU
        assert row["status"] == "ok" and row["largest_fitting"] == 8 and row["capped"]

    (loader,) = report["loader"]
    assert loader["status"] == "ok" and loader["image_size"] == "64x64"
    assert _positive(loader["images_per_s"]) and _positive(loader["appetite_images_per_s"])
    assert loader["loader_over_appetite"] == pytest.approx(loader["images_per_s"] / loader["appetite_images_per_s"])

    markdown = (tmp_path / "gpu_suite.md").read_text()
    assert markdown.count("| Swin tiny (test) |") == sum(r["model"] == "swin_test" for r in rows) + 2 + 2
    assert markdown.count("| failed: RuntimeError: CUDA out of memory (simulated) |") == 2
    for heading in (
        "## Training step",
        "## Where a bf16 step's time goes",
        "## Largest per-device batch",
        "## Input pipeline",
    ):
        assert heading in markdown
    assert "Skipped for the time budget: 0 cell(s)." in markdown


def test_time_budget_skips_cells_and_says_so(suite, tmp_path):
    report = suite.main(
        [
            "--smoke",
            "--output_dir",
            str(tmp_path),
            "--budget_s",
            "0",
            "--sections",
            "throughput,profile,loader,max_batch",
        ]
    )
    cells = report["throughput"] + report["profile"] + report["max_batch"] + report["loader"]
    assert cells and all(row["status"] == suite.SKIPPED for row in cells)
    markdown = (tmp_path / "gpu_suite.md").read_text()
    assert f"Skipped for the time budget: {len(cells)} cell(s): Swin tiny (test) ours_fast bf16" in markdown
    assert "Sections not run (--sections): compile." in markdown


@pytest.mark.parametrize(
    ("limit", "start", "cap", "expected"),
    [
        (100, 16, 4096, (96, 104)),  # doubling to 128 (fails), then bisection to within 10%
        (40, 128, 4096, (40, 48)),  # nothing fits at the start: halve, then bisect
        (10_000, 128, 512, (512, None)),  # everything fits up to the cap
        (0, 4, 64, (0, 1)),  # nothing fits at all
    ],
)
def test_largest_fitting_batch_brackets_the_limit(suite, limit, start, cap, expected):
    probed = []

    def fits(batch_size):
        probed.append(batch_size)
        return batch_size <= limit

    result = suite.largest_fitting_batch(fits, start, cap, max_probes=12)
    assert (result["largest_fitting"], result["smallest_failing"]) == expected
    assert result["probes"] == len(probed) <= 12 and result["capped"] == (expected[1] is None)


def test_max_batch_section_treats_out_of_memory_as_too_big(suite, tmp_path, monkeypatch):
    import torch

    make_batch = suite.make_batch

    def batch_or_oom(arch, impl, batch_size, device):
        if batch_size > 6:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return make_batch(arch, impl, batch_size, device)

    monkeypatch.setattr(suite, "make_batch", batch_or_oom)
    report = suite.main(["--smoke", "--output_dir", str(tmp_path), "--sections", "max_batch", "--budget_s", "900"])
    for row in report["max_batch"]:  # 4 fits, 8 fails, then 6 fits and 7 fails
        assert (row["status"], row["largest_fitting"], row["smallest_failing"], row["probes"]) == ("ok", 6, 7, 4)
    assert "| Swin tiny (test) | ours_fast | yes | 6 | 7 | 4 | ok |" in (tmp_path / "gpu_suite.md").read_text()


def test_batch_search_stops_at_the_probe_limit(suite):
    result = suite.largest_fitting_batch(lambda batch_size: batch_size <= 1000, 8, 4096, max_probes=3)
    assert result == {"largest_fitting": 32, "smallest_failing": None, "probes": 3, "capped": False}


def test_unknown_section_is_rejected(suite):
    with pytest.raises(SystemExit):
        suite.parse_args(["--sections", "throughput,speed"])


def test_cpu_profile_reports_the_time_outside_the_matmuls():
    benchmark = _load("pretrain_throughput")
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
            "fp32",
            "--impls",
            "ours_fast,hf_sdpa",
            "--timer",
            "cpu",
            "--threads",
            "1",
            "--profile",
        ]
    )
    for row in report["results"]:
        profile = row["extra"]["profile"]
        assert 0 < profile["outside_matmul_share"] < 1 and 0 < profile["matmul_share"] < 1
        parts = profile["matmul_ms"] + profile["fused_attention_ms"] + profile["outside_matmul_ms"]
        assert parts == pytest.approx(profile["total_ms"])
    shares = {row["impl"]: row["extra"]["profile"]["fused_attention_share"] for row in report["results"]}
    assert shares["hf_sdpa"] > 0  # the SDPA op is seen; its CPU math path runs bmm, counted as products
    assert "outside the matmuls" in benchmark.format_profiles(report)


@pytest.mark.parametrize(
    ("name", "on_device", "expected"),
    [
        ("aten::addmm", False, "matmul"),
        ("aten::_slow_conv2d_backward", False, "matmul"),  # CPU convolutions are matrix products too
        ("aten::_scaled_dot_product_flash_attention_for_cpu", False, "attention"),
        ("aten::copy_", False, "other"),
        ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", True, "matmul"),  # cuBLASLt on Hopper
        ("triton_tem_fused_mm_3", True, "matmul"),  # inductor's GEMM template
        ("flash_fwd_kernel", True, "attention"),
        ("triton_poi_fused_add_native_layer_norm_0", True, "other"),
        ("void at::native::unrolled_elementwise_kernel<direct_copy_kernel_cuda>", True, "other"),
    ],
)
def test_profile_classifies_ops_and_kernels(name, on_device, expected):
    assert _load("step_profile").classify(name, on_device) == expected
