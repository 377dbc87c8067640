#!/usr/bin/env bash
# Device session 20 (2 x H200): where a two-rank layer test waits. `test --layer all` on 1 process
# and on 2 ranks, two rounds (benchmarks/distributed.py --parts test --repeat 2), with each rank's
# per-layer timeline (read on the reader thread, read_wait, build, chain_wait, chain, compute,
# send_wait) kept in distributed.json.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpus.txt" 2>&1
timeout ${BUDGET:-480} python3 benchmarks/distributed.py --parts test --repeat 2 --out "$OUT" \
    --command-timeout 200 --dist-timeout 200 > "$OUT/distributed.log" 2>&1
echo "=== distributed (exit $?)"
grep -v 'tokenizer\|bos_token\|eos_token\|Warning\|warn_once' "$OUT/distributed.log" | tail -14
