#!/usr/bin/env bash
# Device session 23 (one H200 of the 2-GPU host): the isolated profile end to end at the last
# commit (benchmarks/isolated_profile.py: 3 MiniMax-M2-size layers, cold page cache, fresh
# processes), after the layer test's clock, timeline and GPU warm-up changed its path.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
timeout ${ISO:-300} python3 benchmarks/isolated_profile.py --out "$OUT/iso" > "$OUT/isolated.log" 2>&1
echo "=== isolated (exit $?)"; grep -v 'tokenizer\|bos_token\|eos_token\|Warning\|warn_once' "$OUT/isolated.log" | tail -30
