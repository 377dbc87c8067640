#!/usr/bin/env bash
# Device session 29 (one H200): the isolated profile end to end as the image runs it, with
# layerwise's own bytecode cache filled by one `layerwise check`: the two commands and the one-read
# test (`layerwise test --record-reference`), each once with a command's first layer read while it
# imports (_prefetch.py, the default) and once without (LAYERWISE_PREFETCH=0), taking turns.
# Everything is logged under $W and packed into $OUT/session29.tgz (the device returns 8 files).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; W=/tmp/s29; mkdir -p "$W"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$W/gpus.txt" 2>&1
filter() { grep -v 'tokenizer\|bos_token\|eos_token\|Warning\|warn_once'; }
python3 -m layerwise check builtin:minimax-m2 > "$W/check.log" 2>&1  # fills layerwise's bytecode cache
echo "=== check"; grep -A2 'bytecode' "$W/check.log"
CUDA_VISIBLE_DEVICES=0 timeout ${ISO:-480} python3 benchmarks/isolated_profile.py --no-prefetch --out "$W/iso" \
    > "$W/isolated.log" 2>&1
echo "=== isolated (exit $?)"; filter < "$W/isolated.log" | tail -24
tar czf "$OUT/session29.tgz" -C "$W" . 2>/dev/null
