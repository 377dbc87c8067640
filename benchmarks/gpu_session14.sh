#!/usr/bin/env bash
# Device session 14 (2 x H200): the data-parallel layer test again (layers dealt round-robin), a
# second sample of its speed-up (benchmarks/distributed.py --parts test).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
timeout 330 python3 benchmarks/distributed.py --parts test --out "$OUT" --command-timeout 200 \
    --dist-timeout 200 > "$OUT/distributed.log" 2>&1
echo "=== distributed (exit $?)"
grep -v 'tokenizer\|bos_token\|eos_token\|Warning\|warn_once' "$OUT/distributed.log" | tail -12
