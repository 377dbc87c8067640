#!/usr/bin/env bash
# Device session 18 (2 x H200): capture overhead at the last commit on 1 and 2 GPUs (FLUSH_BYTES
# against a flush at every layer; the end-to-end extracts), then the isolated profile end to end
# on one GPU (benchmarks/isolated_profile.py: 3 MiniMax-M2-size layers, cold page cache).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
git log --oneline -1 > "$OUT/commit.txt" 2>/dev/null
run() { name=$1; shift; timeout "$@" > "$OUT/$name.log" 2>&1; echo "=== $name (exit $?)"; grep -v '^{\|tokenizer\|bos_token\|eos_token\|Warning\|warn_once' "$OUT/$name.log" | tail -20; }
run isolated 230 python3 benchmarks/isolated_profile.py --profile --out "$OUT/iso"
run overhead1 160 env CUDA_VISIBLE_DEVICES=0 python3 benchmarks/extract_overhead.py --gpus 1 --tokens 128,512,1024,4096 --batches 1,4,16 --reps 5 --profile "" --e2e 16x256,16x4096 --work /tmp/lw-e2e1 --out "$OUT/g1"
run overhead2 150 python3 benchmarks/extract_overhead.py --gpus 2 --tokens 128,512,1024,4096 --batches 1,4,16 --reps 5 --profile "" --e2e 16x256,16x4096 --work /tmp/lw-e2e2 --out "$OUT/g2"
