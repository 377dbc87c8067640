#!/usr/bin/env bash
# Device session 7 (2 GPUs): every GPU test (whole output kept), then all 62 MiniMax-M2 layers held
# in GPU memory as FP8, the bf16 reference streamed from them, the FP8 error of every layer.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
echo "=== gpu tests"; timeout 230 python3 -m pytest -q -p no:cacheprovider tests/gpu --timeout 150 --durations=10 -rf --tb=short > "$OUT/gpu_tests.log" 2>&1
tail -14 "$OUT/gpu_tests.log"
echo "=== fp8 full depth"; timeout 340 python3 benchmarks/fp8_minimax.py full-depth --layers 62 --tokens 1024 --prompts 1 --work /tmp/lw-fp8d --out "$OUT" > "$OUT/fp8_full_depth.log" 2>&1
grep -v "tokenizer\|bos_token\|eos_token" "$OUT/fp8_full_depth.log" | tail -70
