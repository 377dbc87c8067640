#!/usr/bin/env bash
# Device session 17 (2 x H200): issue 12 after non-blocking sends in the layer-test pipeline and
# pinned slabs reserved while the model loads (benchmarks/distributed.py --parts extract,test
# --repeat 2), then compare throughput with the format-2 chunked digest, three times.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
git log --oneline -1 > "$OUT/commit.txt" 2>/dev/null
timeout ${BUDGET:-420} python3 benchmarks/distributed.py --parts extract,test --repeat 2 --out "$OUT" \
    --command-timeout 200 --dist-timeout 200 > "$OUT/distributed.log" 2>&1
echo "=== distributed (exit $?)"
grep -v 'tokenizer\|bos_token\|eos_token\|Warning\|warn_once' "$OUT/distributed.log" | tail -12
for i in 1 2 3; do
    cp BENCHMARKS.md "$OUT/compare_bench$i.md"
    timeout 60 python3 benchmarks/compare_throughput.py --gb 1 --dir /tmp/lw-cmp --out "$OUT/compare_bench$i.md" \
        > "$OUT/compare$i.log" 2>&1
    echo "=== compare $i (exit $?)"; tail -4 "$OUT/compare$i.log"
done
