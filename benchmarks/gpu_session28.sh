#!/usr/bin/env bash
# Device session 28 (2 x H200). Part "dist": issue 12's layer test on 1 process vs 2 ranks (two
# rounds, each rank's timeline; benchmarks/distributed.py) after a layer's recorded inputs are
# read on INPUT_READERS threads. Part "iso": the isolated profile end to end on GPU 0, as the image
# runs it with layerwise's own bytecode cache filled by one `layerwise check`, with the one-read
# test (`layerwise test --record-reference`) beside the two commands it replaces.
# Everything is logged under $W and packed into $OUT/session28.tgz (the device returns 8 files).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; W=/tmp/s28; mkdir -p "$W"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$W/gpus.txt" 2>&1
git log -1 --format=%h > "$W/commit.txt" 2>/dev/null || true
filter() { grep -v 'tokenizer\|bos_token\|eos_token\|Warning\|warn_once'; }
pack() { tar czf "$OUT/session28-$1.tgz" -C "$W" . 2>/dev/null; }
case "${1:-dist}" in
dist)
    python3 -m layerwise check builtin:minimax-m2 > "$W/check-fill.log" 2>&1  # fills layerwise's bytecode cache
    timeout ${BUDGET:-480} python3 benchmarks/distributed.py --parts test --repeat 2 --out "$W/dist" \
        --command-timeout 200 --dist-timeout 200 > "$W/distributed.log" 2>&1
    echo "=== distributed (exit $?)"; filter < "$W/distributed.log" | tail -14
    pack dist ;;
iso)
    rm -rf /tmp/lw-dist-ckpt /tmp/lw-dist-work  # part "dist"'s 100 GB: the disk holds 128
    python3 -m layerwise check builtin:minimax-m2 > "$W/check.log" 2>&1
    echo "=== check"; grep -A2 'bytecode' "$W/check.log"
    CUDA_VISIBLE_DEVICES=0 timeout ${ISO:-500} python3 benchmarks/isolated_profile.py --out "$W/iso" \
        > "$W/isolated.log" 2>&1
    echo "=== isolated (exit $?)"; filter < "$W/isolated.log" | tail -12
    pack iso ;;
esac
