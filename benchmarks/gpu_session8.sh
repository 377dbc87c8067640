#!/usr/bin/env bash
# Device session 8 (2 GPUs), the last of this session's budget: capture overhead on 1 and 2 GPUs
# (batch 1/4/16, 128-4096 tokens, end to end to disk), an FP8 checkpoint streamed from disk against
# the cold-read floor, two commands in fresh processes, compare throughput.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
run() { name=$1; shift; timeout "$@" > "$OUT/$name.log" 2>&1; echo "=== $name (exit $?)"; grep -v '^{\|tokenizer\|bos_token\|eos_token\|Warning\|warn_once' "$OUT/$name.log" | tail -22; }
run overhead1 80 env CUDA_VISIBLE_DEVICES=0 python3 benchmarks/extract_overhead.py --gpus 1 --tokens 128,512,1024,4096 --batches 1,4,16 --reps 5 --profile 1x512 --e2e 16x256,16x4096 --out "$OUT/g1"
run overhead2 80 python3 benchmarks/extract_overhead.py --gpus 2 --tokens 128,512,1024,4096 --batches 1,4,16 --reps 5 --profile "" --e2e 16x256,16x4096 --out "$OUT/g2"
run fp8stream 60 python3 benchmarks/fp8_minimax.py stream --layers 4 --tokens 1024 --prompts 2 --work /tmp/lw-fp8s --out "$OUT"
prompts=$(mktemp); printf 'The capital of France is\nHi\n' > "$prompts"
run fresh 30 bash -c "python3 -m layerwise extract builtin:minimax-m2-tiny --out /tmp/fr/ref --prompts $prompts --stream && python3 -m layerwise test builtin:minimax-m2-tiny --reference /tmp/fr/ref --layer all --out /tmp/fr/t --max-rel-l2 0"
run compare 40 python3 benchmarks/compare_throughput.py --gb 1 --dir /tmp/lw-cmp --out "$OUT/compare_bench.md"
