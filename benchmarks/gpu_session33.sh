#!/usr/bin/env bash
# Device session 33 (one H200): compare's throughput against a raw read of the same runs, once
# (benchmarks/compare_throughput.py), after a run's tensors are verified through views taken
# without torch calls (rawbytes.raw_bytes, 2852617). Logs packed into $OUT/session33.tgz.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; W=/tmp/s33; mkdir -p "$W"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$W/gpus.txt" 2>&1
cp BENCHMARKS.md "$W/compare_bench.md"
timeout ${LIMIT:-200} python3 benchmarks/compare_throughput.py --gb 1 --dir /tmp/lw-cmp --out "$W/compare_bench.md" \
    > "$W/compare.log" 2>&1
echo "=== compare (exit $?)"; tail -12 "$W/compare.log"
grep -A4 '^| machine' "$W/compare_bench.md" | tail -3 > "$W/rows.txt"; cat "$W/rows.txt"
tar czf "$OUT/session33.tgz" -C "$W" . 2>/dev/null
