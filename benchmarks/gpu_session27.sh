#!/usr/bin/env bash
# Device session 27 (one H200; prepared, not yet run): the isolated profile end to end as the image
# runs it (PYTHONDONTWRITEBYTECODE set), without and with layerwise's own bytecode cache (_boot.py:
# $LAYERWISE_CACHE/pycache, filled by one `layerwise check` first), side by side in one session;
# then the first forward pass, plain and rehearsed, with three fresh processes per mode.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpus.txt" 2>&1
filter() { grep -v 'tokenizer\|bos_token\|eos_token\|Warning\|warn_once'; }
LAYERWISE_BYTECODE_CACHE=0 timeout 260 python3 benchmarks/isolated_profile.py --out "$OUT/iso-off" \
    > "$OUT/isolated-off.log" 2>&1
echo "=== isolated, LAYERWISE_BYTECODE_CACHE=0 (exit $?)"; filter < "$OUT/isolated-off.log" | tail -5
python3 -m layerwise check builtin:minimax-m2 > "$OUT/check-fill.log" 2>&1  # fills the cache
python3 -m layerwise check builtin:minimax-m2 > "$OUT/check.log" 2>&1
echo "=== check, the second time"; grep -A3 'bytecode' "$OUT/check.log"
timeout 220 python3 benchmarks/isolated_profile.py --out "$OUT/iso-on" > "$OUT/isolated-on.log" 2>&1
echo "=== isolated, layerwise's bytecode cache (exit $?)"; filter < "$OUT/isolated-on.log" | tail -5
timeout 100 python3 benchmarks/first_forward.py --rounds 3 --out "$OUT" > "$OUT/first_forward.log" 2>&1
echo "=== first_forward (exit $?)"; filter < "$OUT/first_forward.log" | tail -5
