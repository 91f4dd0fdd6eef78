"""CPU matrix-multiply throughput: float32, PyTorch's bf16 kernel, and modeling_simmim's bf16 fallback.

The shapes are the linear layers of one Swin-T 192/w6 training step at batch 8 (tokens x in -> out, per stage), plus
one large square product. For each: GFLOP/s of `torch.mm` in float32, in bf16 (PyTorch's kernel: oneDNN where the
CPU has AVX512-BF16/AMX, a generic kernel elsewhere), and through `CPUBf16MatmulFallback` (float32 kernel on
bf16-rounded operands, bf16 result, conversions included). Best of `--repeats`, one process.

    python benchmarks/cpu_bf16_matmul.py --threads 2
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modeling_simmim.cpu_bf16 import CPUBf16MatmulFallback, native_cpu_bf16_matmul_supported  # noqa: E402

# (rows, inner, cols): Swin-T 192/w6 at batch 8. Stage s has 8 * (48 / 2**s)**2 tokens and 96 * 2**s channels.
SHAPES = [
    (18432, 96, 288),  # stage 1 qkv
    (18432, 96, 384),  # stage 1 MLP fc1
    (18432, 384, 96),  # stage 1 MLP fc2
    (4608, 192, 576),  # stage 2 qkv
    (1152, 384, 1536),  # stage 3 MLP fc1
    (288, 3072, 768),  # stage 4 MLP fc2
    (2048, 2048, 2048),  # large square
]


def _best_seconds(function, repeats: int) -> float:
    function()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def _product(a: torch.Tensor, b: torch.Tensor, fallback: bool) -> torch.Tensor:
    if fallback:
        with CPUBf16MatmulFallback():
            return torch.mm(a, b)
    return torch.mm(a, b)


def run(repeats: int, shapes: list[tuple[int, int, int]] = SHAPES) -> list[dict]:
    rows = []
    for m, k, n in shapes:
        a32, b32 = torch.randn(m, k), torch.randn(k, n)
        a16, b16 = a32.to(torch.bfloat16), b32.to(torch.bfloat16)
        flops = 2 * m * k * n

        seconds = {
            "fp32": _best_seconds(functools.partial(_product, a32, b32, fallback=False), repeats),
            "bf16 (PyTorch)": _best_seconds(functools.partial(_product, a16, b16, fallback=False), repeats),
            "bf16 (fallback)": _best_seconds(functools.partial(_product, a16, b16, fallback=True), repeats),
        }
        rows.append({"shape": f"{m}x{k} @ {k}x{n}", **{name: flops / s / 1e9 for name, s in seconds.items()}})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.repeats)
    print(format_table(rows))
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, native CPU bf16 matmul: "
        f"{'yes' if native_cpu_bf16_matmul_supported() else 'no'}",
        "",
        "| shape | fp32 GFLOP/s | bf16 PyTorch GFLOP/s | bf16 fallback GFLOP/s | fallback / PyTorch bf16 |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['shape']} | {row['fp32']:.1f} | {row['bf16 (PyTorch)']:.1f} | {row['bf16 (fallback)']:.1f} | "
            f"{row['bf16 (fallback)'] / row['bf16 (PyTorch)']:.1f}x |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
