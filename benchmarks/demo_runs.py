#!/usr/bin/env python
"""`make demo` / `make demo-compare` as a user runs them, per seed: wall and CPU time of each step and the printed
top-1s (the README's quick-start numbers).

    nice -n 5 python benchmarks/demo_runs.py --seeds 0 1 2 [--json benchmarks/results/digits_demo/make_demo.json]

The commands are those of `make -n demo-compare` (with this interpreter and `DEMO_*_ARGS="--seed S"`), run one by
one: `make demo` = pretrain + finetune + its report; `make demo-compare` adds the from-scratch finetuning and the
three-way report. CPU time is user + system of the step's processes; on a shared machine it estimates the idle
time better than the wall clock (the load average is recorded before each seed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_commands(
    target: str, demo_dir: str, pretrain_args: str = "", finetune_args: str = "", python: str = sys.executable
) -> list[str]:
    """The shell commands `make TARGET` would run (dry run; the venv set-up step is taken as done)."""
    venv_marker = os.path.join(".venv", ".installed")
    result = subprocess.run(
        [
            "make",
            "-n",
            "-s",
            "-o",
            venv_marker,
            target,
            f"PYTHON={python}",
            f"DEMO_DIR={demo_dir}",
            f"DEMO_PRETRAIN_ARGS={pretrain_args}",
            f"DEMO_FINETUNE_ARGS={finetune_args}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return [line.strip() for line in result.stdout.replace("\\\n", " ").splitlines() if line.strip()]


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_step(command: str) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": ROOT}
    wall, cpu = time.perf_counter(), children_cpu()
    result = subprocess.run(command, shell=True, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    return {
        "command": command,
        "wall_s": round(time.perf_counter() - wall, 1),
        "cpu_s": round(children_cpu() - cpu, 1),
        "stdout_tail": result.stdout[-600:],
    }


def report_values(text: str) -> dict[str, float]:
    """The percentages of a `modeling_simmim.demo` report, by row name."""
    return {
        match.group(1).strip(): float(match.group(2))
        for match in re.finditer(r"^\s{2}(\S.*?)\s+([\d.]+)%$", text, flags=re.MULTILINE)
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--work_dir", default=os.path.join(ROOT, "outputs", "demo_runs"))
    parser.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "digits_demo", "make_demo.json"))
    parser.add_argument(
        "--pretrain_args",
        default="",
        help="Extra run_mim.py flags (one string), e.g. an ablation of the pretraining recipe.",
    )
    args = parser.parse_args(argv)
    record: dict[str, Any] = {
        "command": "python benchmarks/demo_runs.py " + shlex.join(argv or sys.argv[1:]),
        "cpus": os.cpu_count(),
        "runs": [],
    }
    for seed in args.seeds:
        demo_dir = os.path.join(args.work_dir, f"seed{seed}")
        flags = f"--seed {seed}"
        pretrain_flags = f"{flags} {args.pretrain_args}".strip()
        pretrain, finetune, scratch, compare_report = make_commands("demo-compare", demo_dir, pretrain_flags, flags)
        (demo_report,) = [
            c for c in make_commands("demo", demo_dir, pretrain_flags, flags) if "modeling_simmim.demo" in c
        ]
        run: dict[str, Any] = {"seed": seed, "load_average_before": [round(x, 2) for x in os.getloadavg()]}
        steps = {
            "pretrain": pretrain,
            "finetune": finetune,
            "demo_report": demo_report,
            "scratch": scratch,
            "compare_report": compare_report,
        }
        run["steps"] = {name: run_step(command) for name, command in steps.items()}
        run["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        demo_steps = ("pretrain", "finetune", "demo_report")
        run["make_demo"] = {
            key: round(sum(run["steps"][s][key] for s in demo_steps), 1) for key in ("wall_s", "cpu_s")
        }
        run["make_demo_compare"] = {
            key: round(
                run["make_demo"][key]
                + run["steps"]["scratch"][key]
                + run["steps"]["compare_report"][key]
                - run["steps"]["demo_report"][key],
                1,
            )
            for key in ("wall_s", "cpu_s")
        }
        run["top1"] = report_values(run["steps"]["compare_report"]["stdout_tail"])
        record["runs"].append(run)
        print(
            json.dumps(
                {
                    k: run[k]
                    for k in (
                        "seed",
                        "make_demo",
                        "make_demo_compare",
                        "top1",
                        "load_average_before",
                        "load_average_after",
                    )
                }
            ),
            flush=True,
        )
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=1)
    return record


if __name__ == "__main__":
    main()
