#!/usr/bin/env bash
# Device session 32, after the run writer's per-file work changed (NaN/Inf from the bits, fewer
# turns of the GIL, a thread per core up to 16) and a process's reading threads became half its
# cores (4 to 8). Part "dist" (2 x H200): issue 12's extract and layer test on 1 process vs 2
# ranks, two rounds, each rank's timeline (benchmarks/distributed.py). Part "iso" (one H200): the
# isolated profile end to end as the image runs it, layerwise's bytecode cache filled by one
# `layerwise check` (benchmarks/isolated_profile.py). Logs packed into $OUT/session32-<part>.tgz.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; W=/tmp/s32; mkdir -p "$W"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$W/gpus.txt" 2>&1
nproc >> "$W/gpus.txt"
filter() { grep -v 'tokenizer\|bos_token\|eos_token\|Warning\|warn_once'; }
python3 -m layerwise check builtin:minimax-m2 > "$W/check.log" 2>&1  # fills layerwise's bytecode cache
case "${1:-dist}" in
dist)
    timeout ${BUDGET:-540} python3 benchmarks/distributed.py --parts test,extract --repeat ${REPEAT:-2} \
        --out "$W/dist" --command-timeout 200 --dist-timeout 200 > "$W/distributed.log" 2>&1
    echo "=== distributed (exit $?)"; filter < "$W/distributed.log" | tail -14 ;;
iso)
    CUDA_VISIBLE_DEVICES=0 timeout ${ISO:-480} python3 benchmarks/isolated_profile.py --out "$W/iso" \
        > "$W/isolated.log" 2>&1
    echo "=== isolated (exit $?)"; filter < "$W/isolated.log" | tail -14 ;;
esac
tar czf "$OUT/session32-${1:-dist}.tgz" -C "$W" . 2>/dev/null
