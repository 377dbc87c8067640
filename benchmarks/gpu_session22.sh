#!/usr/bin/env bash
# Device session 22 (2 x H200): issue 12 after the chain's pairs are connected both ways while the
# first layer is read, and extract pins its whole default budget ahead: test and extract on 1
# process vs 2 ranks, two rounds, with each rank's timeline (benchmarks/distributed.py).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpus.txt" 2>&1
timeout ${BUDGET:-540} python3 benchmarks/distributed.py --parts test,extract --repeat 2 --out "$OUT" \
    --command-timeout 200 --dist-timeout 200 > "$OUT/distributed.log" 2>&1
echo "=== distributed (exit $?)"
grep -v 'tokenizer\|bos_token\|eos_token\|Warning\|warn_once' "$OUT/distributed.log" | tail -8
