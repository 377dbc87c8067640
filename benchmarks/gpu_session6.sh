#!/usr/bin/env bash
# Device session 6 (2 GPUs): the FP8 issue's evidence. Part a: every GPU test (a hang fails one
# test, not the run) and one full-size FP8 layer at 1024 and 4096 tokens. Part b: all 62
# MiniMax-M2 layers held in GPU memory as FP8, the bf16 reference streamed from them, then
# the isolated and propagated FP8 error of every layer.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
step() { echo; echo "=== $* ==="; }
part=${1:-a}
{
step "machine $part"; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader; git log -1 --format=%h 2>/dev/null
if [ "$part" = a ]; then
  step "gpu tests"; timeout 400 python3 -m pytest -q -p no:cacheprovider tests/gpu --timeout 200 --durations=12 -rf 2>&1 | tail -30
  step "fp8 layer"; timeout 170 python3 benchmarks/fp8_minimax.py layer --tokens 1024 4096 --work /tmp/lw-fp8 --out "$OUT" 2>&1 | grep -v "tokenizer\|bos_token\|eos_token" | tail -6
else
  step "fp8 full depth"; timeout 560 python3 benchmarks/fp8_minimax.py full-depth --layers 62 --tokens 1024 --prompts 1 --work /tmp/lw-fp8d --out "$OUT" 2>&1 | grep -v "tokenizer\|bos_token\|eos_token" | tail -72
fi
} 2>&1 | tee "$OUT/session6$part.log"
