#!/usr/bin/env bash
# The GPU suite from a fresh checkout on a GPU machine (torch with CUDA already installed there), in at most
# 8 minutes: checks the Python packages, installs missing ones from wheels in .whl/ (the machine may have no
# internet; `make gpu-wheels` fills .whl/ on a machine that has it) or else with pip, then runs
# benchmarks/gpu_suite.py under a hard time limit. Results: OUTPUT_DIR/gpu_suite.{json,md} and OUTPUT_DIR/log.txt.
#
#   bash benchmarks/run_gpu_suite.sh [OUTPUT_DIR] [more gpu_suite.py flags, e.g. --sections compile]
#
# Environment: PYTHON (default python3), SUITE_BUDGET_S (default 420: the suite's own budget, which the startup
# and this script's checks come on top of), SUITE_TIMEOUT_S (default 470: the hard limit of the python process).
set -euo pipefail
cd "$(dirname "$0")/.."
OUTPUT_DIR=${1:-outputs/gpu_suite}
shift || true
PYTHON=${PYTHON:-python3}

install_missing_packages() {
    # Import name -> pip name of what the suite imports beyond torch (the loader section needs `datasets`).
    local missing
    missing=$("$PYTHON" - <<'EOF'
import importlib.util
needed = {"torchvision": "torchvision", "transformers": "transformers", "datasets": "datasets", "dill": "dill",
          "multiprocess": "multiprocess", "PIL": "pillow", "numpy": "numpy", "sklearn": "scikit-learn",
          "skimage": "scikit-image"}
print(" ".join(pip_name for module, pip_name in needed.items() if importlib.util.find_spec(module) is None))
EOF
    )
    [ -z "$missing" ] && return 0
    echo "missing Python packages: $missing"
    if compgen -G ".whl/*.whl" > /dev/null; then
        # --target leaves the machine's own packages alone; the carried wheels come first on the path.
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/simmim_site .whl/*.whl \
            || echo "installing .whl/ failed: the sections that need $missing will be reported as failed"
        export PYTHONPATH=/tmp/simmim_site${PYTHONPATH:+:$PYTHONPATH}
    else
        # shellcheck disable=SC2086  # one argument per package
        "$PYTHON" -m pip install -q $missing \
            || echo "could not install $missing: the sections that need them will be reported as failed"
    fi
}

print_versions() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
    "$PYTHON" - <<'EOF' || true
import importlib.metadata as metadata
import os

import torch
print("cuda available:", torch.cuda.is_available(), "| cuda", torch.version.cuda, "| cpus", os.cpu_count())
for name in ("torch", "transformers", "datasets", "pyarrow", "fsspec", "huggingface_hub", "timm", "torchvision"):
    try:
        print(name, metadata.version(name))
    except metadata.PackageNotFoundError:
        print(name, "not installed")
EOF
}

run_suite() {
    install_missing_packages
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    print_versions
    local status=0
    timeout --signal=TERM "${SUITE_TIMEOUT_S:-470}" "$PYTHON" benchmarks/gpu_suite.py --output_dir "$OUTPUT_DIR" \
        --budget_s "${SUITE_BUDGET_S:-420}" "$@" || status=$?
    if [ "$status" = 124 ]; then
        echo "the suite passed its hard limit and was stopped: $OUTPUT_DIR holds the sections finished before"
    fi
    return "$status"
}

mkdir -p "$OUTPUT_DIR"
run_suite "$@" 2>&1 | tee "$OUTPUT_DIR/log.txt"
exit "${PIPESTATUS[0]}"
