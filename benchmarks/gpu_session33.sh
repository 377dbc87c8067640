#!/usr/bin/env bash
# Device session 33 (one H200): compare's throughput against a raw read of the same runs
# (benchmarks/compare_throughput.py) after a run's tensors are verified through views taken
# without torch calls (rawbytes.raw_bytes, 2852617). Part "one": once. Part "ab": four times,
# taking turns with a copy of the code whose raw_bytes takes every view through torch (as before
# 2852617). Logs packed into $OUT/session33[ab].tgz.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
case "${1:-one}" in
one)
    W=/tmp/s33; mkdir -p "$W"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$W/gpus.txt" 2>&1
    cp BENCHMARKS.md "$W/compare_bench.md"
    PYTHONPATH=$PWD/src timeout ${LIMIT:-200} python3 benchmarks/compare_throughput.py --gb 1 --dir /tmp/lw-cmp \
        --out "$W/compare_bench.md" > "$W/compare.log" 2>&1
    echo "=== compare (exit $?)"; tail -12 "$W/compare.log"
    tar czf "$OUT/session33.tgz" -C "$W" . 2>/dev/null ;;
ab)
    W=/tmp/s33ab; mkdir -p "$W"
    cp -r src /tmp/srcold
    sed -i 's/    if tensor.device.type == "cpu" and tensor.is_contiguous():/    if False:/' /tmp/srcold/layerwise/rawbytes.py
    grep -c 'if False' /tmp/srcold/layerwise/rawbytes.py  # 1: the old path for every tensor
    for i in 1 2; do
        for v in new old; do
            if [ $v = new ]; then P=$PWD/src; else P=/tmp/srcold; fi
            cp BENCHMARKS.md "$W/b_$v$i.md"
            PYTHONPATH=$P timeout 100 python3 benchmarks/compare_throughput.py --gb 1 --dir /tmp/lw-cmp \
                --out "$W/b_$v$i.md" > "$W/c_$v$i.log" 2>&1
            echo "$v $i: $(grep -E 'compare cold |raw read cold|compare cold /' "$W/c_$v$i.log" | tr '\n' ' ')"
        done
    done
    tar czf "$OUT/session33ab.tgz" -C "$W" . 2>/dev/null ;;
esac
