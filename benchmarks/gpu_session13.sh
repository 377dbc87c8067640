#!/usr/bin/env bash
# Device session 13 (2 x H200 host, 32 cores): compare throughput against the cold read, three
# runs, after large tensors are hashed while they are read (benchmarks/compare_throughput.py).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
for i in 1 2 3; do
    timeout 150 python3 benchmarks/compare_throughput.py --gb 1 --dir /tmp/lw-cmp --out "$OUT/compare_$i.md" \
        > "$OUT/compare_$i.log" 2>&1
    echo "=== run $i (exit $?)"; tail -6 "$OUT/compare_$i.log"
done
