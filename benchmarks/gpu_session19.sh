#!/usr/bin/env bash
# Device session 19 (2 x H200, one GPU used): compare throughput with the format-2 chunked digest
# (twice), then the isolated profile end to end (benchmarks/isolated_profile.py, 3 MiniMax-M2-size
# layers, cold page cache, with cProfile runs) after the inference-mode fix of the parallel reads.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
git log --oneline -1 > "$OUT/commit.txt" 2>/dev/null
for i in 1 2; do
    cp BENCHMARKS.md "$OUT/compare_bench$i.md"
    timeout 50 python3 benchmarks/compare_throughput.py --gb 1 --dir /tmp/lw-cmp --out "$OUT/compare_bench$i.md" \
        > "$OUT/compare$i.log" 2>&1
    echo "=== compare $i (exit $?)"; tail -4 "$OUT/compare$i.log"
done
timeout ${ISO:-230} python3 benchmarks/isolated_profile.py --profile --out "$OUT/iso" > "$OUT/isolated.log" 2>&1
echo "=== isolated (exit $?)"; grep -v 'tokenizer\|bos_token\|eos_token\|Warning\|warn_once' "$OUT/isolated.log" | tail -40
