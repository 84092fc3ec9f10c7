#!/usr/bin/env bash
# The GPU checks in one command, under 10 minutes on a GPU machine: the GPU tests (pytest -m gpu), then the
# tiled predictor at 4096² on the CUDA provider in fp32 and fp16 (and TensorRT's provider when the installed
# ONNX Runtime has it), as a table. Without a usable GPU it says so and exits 0.
#   bench/gpu.sh                 # PYTHON=... to use another interpreter than .venv/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
if ! "$PYTHON" -c 'import sys; from seg.inference.runtime import gpu_count; sys.exit(0 if gpu_count() else 1)'; then
    echo "bench/gpu.sh: no CUDA GPU usable by ONNX Runtime here; nothing to run"
    exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -m pytest -q -m gpu tests
"$PYTHON" bench/gpu.py "$@"
