#!/usr/bin/env bash
# Device session 21 (2 x H200): issue 12 after the layer test's new pipeline schedule (isolated
# batches while the chain's input is on its way, pair connections and the GPU warmed while the
# first layer is read, determinism after the first send): test and extract on 1 process vs 2
# ranks, two rounds, with each rank's timeline; then the page cache's write rate with 1 and 2
# processes (the data-parallel extract's floor).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpus.txt" 2>&1
timeout ${BUDGET:-560} python3 benchmarks/distributed.py --parts test,extract,write --repeat 2 --out "$OUT" \
    --command-timeout 200 --dist-timeout 200 > "$OUT/distributed.log" 2>&1
echo "=== distributed (exit $?)"
grep -v 'tokenizer\|bos_token\|eos_token\|Warning\|warn_once' "$OUT/distributed.log" | tail -14
