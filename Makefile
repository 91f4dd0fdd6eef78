# Each target sets up its own virtual environment (.venv) on first use.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
DEMO_DIR ?= outputs/demo
GPU_SUITE_DIR ?= outputs/gpu_suite
GPU_PYTHON ?= python3

# Extra flags for the demo's scripts (e.g. DEMO_PRETRAIN_ARGS="--seed 1" DEMO_FINETUNE_ARGS="--seed 1").
DEMO_PRETRAIN_ARGS ?=
DEMO_FINETUNE_ARGS ?=

.PHONY: setup demo demo-pretrain demo-finetune demo-compare test test-slow test-minimum typecheck lint bench bench-gpu \
	gpu-wheels clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

## Quick start 1: pretrain a tiny SimMIM model on the bundled digits, finetune it, print its top-1 beside a
## logistic regression on the raw pixels of the same split.
demo: demo-finetune
	$(PYTHON) -m modeling_simmim.demo --finetuned $(DEMO_DIR)/finetune

## The same, plus the identical finetuning from random weights (--from_scratch true): all three side by side.
demo-compare: demo-finetune
	$(PYTHON) run_image_classification.py configs/finetune/demo_swin_tiny_cpu.yaml --model_name_or_path $(DEMO_DIR)/pretrain \
		--from_scratch true --output_dir $(DEMO_DIR)/scratch --overwrite_output_dir true $(DEMO_FINETUNE_ARGS)
	$(PYTHON) -m modeling_simmim.demo --finetuned $(DEMO_DIR)/finetune --scratch $(DEMO_DIR)/scratch

demo-pretrain: $(VENV)/.installed
	$(PYTHON) run_mim.py configs/pretrain/demo_swin_tiny_cpu.yaml --output_dir $(DEMO_DIR)/pretrain --overwrite_output_dir true \
		$(DEMO_PRETRAIN_ARGS)

demo-finetune: demo-pretrain
	$(PYTHON) run_image_classification.py configs/finetune/demo_swin_tiny_cpu.yaml --model_name_or_path $(DEMO_DIR)/pretrain \
		--output_dir $(DEMO_DIR)/finetune --overwrite_output_dir true $(DEMO_FINETUNE_ARGS)

## Quick start 2: the test suite (fast; `make test-slow` adds the long end-to-end runs).
test: $(VENV)/.installed
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PYTHON) -m pytest -q --durations=15

test-slow: $(VENV)/.installed
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PYTHON) -m pytest -q -m slow

## The oldest supported transformers (5.9.0) and the Hub client it needs, installed beside .venv (--target) and put
## first on PYTHONPATH: everything else is .venv's. The whole fast suite runs on it (MIN_TESTS narrows it).
MIN_TF_DIR ?= .venv-min-tf
MIN_TESTS ?=

$(MIN_TF_DIR)/.installed: $(VENV)/.installed
	$(PYTHON) -m pip install -q --no-deps --target $(MIN_TF_DIR) "transformers==5.9.0" "huggingface-hub>=1.31,<2" \
		"tokenizers>=0.22,<=0.23.0" httpx httpcore
	touch $@

test-minimum: $(MIN_TF_DIR)/.installed
	PYTHONPATH=$(abspath $(MIN_TF_DIR)) HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PYTHON) -m pytest -q $(MIN_TESTS)

typecheck: $(VENV)/.installed
	$(VENV)/bin/mypy

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: $(VENV)/.installed
	$(PYTHON) benchmarks/pretrain_throughput.py
	$(PYTHON) benchmarks/data_throughput.py

## The GPU suite (benchmarks/gpu_suite.py, at most 8 minutes on one GPU) with the machine's own torch + CUDA.
bench-gpu:
	PYTHON=$(GPU_PYTHON) bash benchmarks/run_gpu_suite.sh $(GPU_SUITE_DIR)

## Wheels for a GPU machine without internet (Python 3.12): the suite's loader section needs `datasets`.
gpu-wheels:
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19

clean:
	rm -rf $(VENV) $(MIN_TF_DIR) .mypy_cache outputs build *.egg-info
