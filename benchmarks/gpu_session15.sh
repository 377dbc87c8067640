#!/usr/bin/env bash
# Device session 15 (2 x H200): issue 12 again after parallel reads (tensorfile.READ_THREADS) and
# the next layer's read submitted before the current one is built: the read speed from the page
# cache by threads, then data-parallel extract and layer test on 2 ranks against one process, two
# rounds each (benchmarks/distributed.py --parts read,extract,test --repeat 2).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpus.txt" 2>&1
git log --oneline -1 >> "$OUT/gpus.txt" 2>/dev/null
timeout ${BUDGET:-560} python3 benchmarks/distributed.py --parts read,extract,test --repeat 2 --out "$OUT" \
    --command-timeout 200 --dist-timeout 200 > "$OUT/distributed.log" 2>&1
echo "=== distributed (exit $?)"
grep -v 'tokenizer\|bos_token\|eos_token\|Warning\|warn_once' "$OUT/distributed.log" | tail -30
