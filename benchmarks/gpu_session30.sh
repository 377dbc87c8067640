#!/usr/bin/env bash
# Device session 30 (one H200): compare's throughput against a raw read of the same runs, twice
# (benchmarks/compare_throughput.py). It ran at 168b47f, where a run's tensors were read with large
# reads side by side (tensorfile.read_tensors) and the script measured safetensors' memory-mapped
# reader beside it, cold, taking turns: the memory map was faster, and 168b47f was reverted. At
# later commits it measures compare as it reads (the memory map). Logs packed into $OUT/session30.tgz.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; W=/tmp/s30; mkdir -p "$W"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$W/gpus.txt" 2>&1
for i in 1 2; do
    cp BENCHMARKS.md "$W/compare_bench$i.md"
    timeout 150 python3 benchmarks/compare_throughput.py --gb 1 --dir /tmp/lw-cmp --out "$W/compare_bench$i.md" \
        > "$W/compare$i.log" 2>&1
    echo "=== compare $i (exit $?)"; tail -12 "$W/compare$i.log"
    grep -A4 '^| machine' "$W/compare_bench$i.md" | tail -3 > "$W/rows$i.txt"
done
tar czf "$OUT/session30.tgz" -C "$W" . 2>/dev/null
