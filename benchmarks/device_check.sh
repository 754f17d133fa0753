#!/usr/bin/env bash
# One GPU check, one call, well under 8 minutes on an H100/H200:
#   1. the CUDA-marked tests (tests/test_cuda.py, tests/test_generation_speed_paths.py: CPU/GPU parity,
#      CUDA-graph decoding, bf16, fused SDPA, Trainer on CUDA)
#   2. benchmarks/device_check.py: bf16 training step of a ViT-B/16-size MaMMUT with MFU, greedy and
#      beam tokens/s eager vs compiled (CUDA graphs), bf16 token agreement, embed_image images/s,
#      FSDP2 under torchrun on one GPU -- printed as one table.
# Usage (repository root, on the GPU machine):  bash benchmarks/device_check.sh [OUT_DIR]
# Sets up .venv with `make setup` when it is missing.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp/device_check}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
PY=.venv/bin/python
if [ ! -x "$PY" ]; then
    if python3 -c "import torch, mammut" 2>/dev/null; then PY=python3; else make setup >"$out/setup.log" 2>&1 || { tail -20 "$out/setup.log"; exit 1; }; fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$out/gpu.txt"
status=0
timeout 240 "$PY" -m pytest tests/test_cuda.py tests/test_generation_speed_paths.py -m cuda -q -p no:cacheprovider -o addopts="-ra" 2>&1 | tee "$out/cuda_tests.log" || status=1
timeout 300 "$PY" benchmarks/device_check.py --json "$out/device_check.json" 2>&1 | tee "$out/device_check.log" || status=1
exit $status
