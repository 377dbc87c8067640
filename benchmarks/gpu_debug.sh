#!/usr/bin/env bash
# Device: rerun the GPU tests that failed in session 6a, keeping their whole output under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/gpu --timeout 150 -x --tb=long -rf \
  --deselect tests/gpu/test_gpu_extract.py --deselect tests/gpu/test_gpu_compare.py > "$OUT/gpu_tests.log" 2>&1
tail -5 "$OUT/gpu_tests.log"
