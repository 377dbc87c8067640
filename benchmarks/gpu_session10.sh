#!/usr/bin/env bash
# Device session 10 (2 x H200): every GPU test at this commit (the fresh-process CLI test with its
# own 450 s limit), then an FP8 checkpoint streamed from disk against the cold-read floor.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
echo "=== gpu tests"
timeout 420 python3 -m pytest -q -p no:cacheprovider tests/gpu --timeout 200 --durations=15 -rf --tb=short \
    > "$OUT/gpu_tests.log" 2>&1
echo "(exit $?)"; tail -30 "$OUT/gpu_tests.log"
echo "=== fp8 stream"
timeout 150 python3 benchmarks/fp8_minimax.py stream --layers 4 --tokens 1024 --prompts 2 --work /tmp/lw-fp8s \
    --out "$OUT" > "$OUT/fp8_stream.log" 2>&1
echo "(exit $?)"; grep -v 'tokenizer\|bos_token\|eos_token' "$OUT/fp8_stream.log" | tail -30
