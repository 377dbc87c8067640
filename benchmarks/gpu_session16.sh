#!/usr/bin/env bash
# Device session 16 (2 x H200): capture overhead with FLUSH_BYTES (a flush waits for 16 MiB) side
# by side with a flush at every layer, on 1 and 2 GPUs (batch 1/4/16, 128-4096 tokens), and the
# end-to-end extracts to disk against their floor (benchmarks/extract_overhead.py).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
git log --oneline -1 > "$OUT/commit.txt" 2>/dev/null
run() { name=$1; shift; timeout "$@" > "$OUT/$name.log" 2>&1; echo "=== $name (exit $?)"; grep -v '^{\|tokenizer\|bos_token\|eos_token\|Warning\|warn_once' "$OUT/$name.log" | tail -20; }
run overhead1 280 env CUDA_VISIBLE_DEVICES=0 python3 benchmarks/extract_overhead.py --gpus 1 --tokens 128,512,1024,4096 --batches 1,4,16 --reps 5 --profile "" --e2e 16x256,16x4096 --work /tmp/lw-e2e1 --out "$OUT/g1"
run overhead2 270 python3 benchmarks/extract_overhead.py --gpus 2 --tokens 128,512,1024,4096 --batches 1,4,16 --reps 5 --profile "" --e2e 16x256,16x4096 --work /tmp/lw-e2e2 --out "$OUT/g2"
