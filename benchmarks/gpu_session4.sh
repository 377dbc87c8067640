#!/usr/bin/env bash
# Device session 4 (2 GPUs), a probe of the FP8 work before the final runs: the GPU tests (every
# command in a fresh process, self-tests exact in every extract mode, scaled_mm vs emulation,
# FP8 checkpoints through every path) and one full-size FP8 layer at 1024 tokens.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
step() { echo; echo "=== $* ==="; }
{
step "machine"; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader; nproc; df -h /tmp | tail -1
step "gpu tests"; timeout 330 python3 -m pytest -q -p no:cacheprovider -x tests/gpu --durations=8 2>&1 | tail -25
step "fp8 layer"; timeout 200 python3 benchmarks/fp8_minimax.py layer --tokens 1024 --work /tmp/lw-fp8 --out "$OUT" 2>&1 | grep -v "tokenizer\|bos_token\|eos_token" | tail -8
} 2>&1 | tee "$OUT/session4.log"
