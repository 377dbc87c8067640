#!/usr/bin/env bash
# Device session 26 (2 x H200). Part "dist": issue 12 after the layer test rehearses its first
# layer while reading it (streaming.rehearse): test and extract on 1 process vs 2 ranks, two
# rounds, each rank's timeline (benchmarks/distributed.py). Part "first": what the first forward
# pass of a MiniMax-M2-size layer costs a fresh process, plain and rehearsed
# (benchmarks/first_forward.py, GPU 0), then `layerwise check`'s bytecode line and the isolated
# profile end to end as the image runs it (benchmarks/isolated_profile.py, GPU 0; ISO_FLAGS=--bytecode-cache
# adds the same with a bytecode cache of its own).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpus.txt" 2>&1
git log -1 --format=%h > "$OUT/commit.txt" 2>/dev/null || true
filter() { grep -v 'tokenizer\|bos_token\|eos_token\|Warning\|warn_once'; }
case "${1:-dist}" in
dist)
    timeout ${BUDGET:-560} python3 benchmarks/distributed.py --parts test,extract --repeat 2 --out "$OUT" \
        --command-timeout 200 --dist-timeout 200 > "$OUT/distributed.log" 2>&1
    echo "=== distributed (exit $?)"; filter < "$OUT/distributed.log" | tail -14 ;;
first)
    rm -rf /tmp/lw-dist-ckpt /tmp/lw-dist-work  # part "dist"'s 100 GB: the disk holds 128
    CUDA_VISIBLE_DEVICES=0 timeout 150 python3 benchmarks/first_forward.py --rounds ${ROUNDS:-2} --out "$OUT" \
        > "$OUT/first_forward.log" 2>&1
    echo "=== first_forward (exit $?)"; filter < "$OUT/first_forward.log" | tail -6
    CUDA_VISIBLE_DEVICES=0 python3 -m layerwise check builtin:minimax-m2 > "$OUT/check.log" 2>&1
    echo "=== check (exit $?)"; grep -A3 'bytecode' "$OUT/check.log"
    CUDA_VISIBLE_DEVICES=0 timeout ${ISO:-330} python3 benchmarks/isolated_profile.py ${ISO_FLAGS:-} \
        --out "$OUT/iso" > "$OUT/isolated.log" 2>&1
    echo "=== isolated (exit $?)"; filter < "$OUT/isolated.log" | tail -24 ;;
esac
