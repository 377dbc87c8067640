#!/usr/bin/env bash
# Device session 9 (2 x H200): issue 12's evidence. Data-parallel extract and layer tests on 2
# ranks against one process (8 MiniMax-M2-size layers, 32 prompts x 1024 tokens), and the TP=2
# candidate against the one-process reference (benchmarks/distributed.py, the real command line).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpus.txt" 2>&1
nvidia-smi topo -m >> "$OUT/gpus.txt" 2>&1
git log --oneline -1 >> "$OUT/gpus.txt" 2>/dev/null
timeout 550 python3 benchmarks/distributed.py --out "$OUT" --command-timeout 300 --dist-timeout 300 \
    > "$OUT/distributed.log" 2>&1
echo "=== distributed (exit $?)"
grep -v 'tokenizer\|bos_token\|eos_token\|Warning\|warn_once' "$OUT/distributed.log" | tail -45
