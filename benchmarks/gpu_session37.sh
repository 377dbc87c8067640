#!/usr/bin/env bash
# Device session 37: compare on a layer test's tensors (1024 and 4096 tokens) with the code in $BASE
# against this checkout's, taking turns. It measured branch next/compare-sync (one transfer per
# block of metric sums, the readers' own copy streams; not kept: BENCHMARKS.md) against main.
#   part "gputests": tests/gpu/test_gpu_compare.py, test_gpu_replay.py and tests/test_readahead.py.
#   part "cmp_ab": benchmarks/compare_throughput.py, taking turns between $BASE (default .base37:
#     an earlier commit's src/, with this checkout's compare_throughput.py and synthetic.py in
#     its benchmarks/; carry it) and this checkout, ROUNDS rounds (default 3): 2 GB runs of
#     1024-token tensors (--vocab 8) and GB4 GB runs (default 4) of 4096-token ones, each cold and
#     warm; no round starts after DEADLINE seconds of the part (default 420), so its logs come back.
#   part "dist_ab": gpu_session35.sh dist_ab with BASE defaulting to .base37 (its distributed.py too).
# e.g. mkdir -p .base37/benchmarks && git archive 1c6719d src | tar -x -C .base37 &&
#      cp benchmarks/{compare_throughput,synthetic,distributed}.py .base37/benchmarks/
set -uo pipefail
if [ $# -gt 1 ]; then for p in "$@"; do bash "$0" "$p"; done; exit 0; fi
PART=${1:-gputests}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; W=/tmp/s37-$PART; mkdir -p "$W"
. "$(dirname "$0")/gpu_env.sh"
cat "$W/gpus.txt"
case "$PART" in
gputests)
    timeout ${BUDGET:-240} python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_compare.py \
        tests/gpu/test_gpu_replay.py tests/test_readahead.py > "$W/gputests.log" 2>&1
    echo "=== GPU tests (exit $?)"; tail -5 "$W/gputests.log" ;;
cmp_ab)
    for i in $(seq "${ROUNDS:-3}"); do
        [ "$SECONDS" -gt "${DEADLINE:-420}" ] && { echo "=== round $i not started: past ${DEADLINE:-420} s"; break; }
        for code in "${BASE:-.base37}" .; do
            name=$( [ "$code" = . ] && echo new || echo base )
            for shape in "--gb 2 --tokens 1024 --vocab 8" "--gb ${GB4:-4} --tokens 4096 --vocab 8"; do
                tag=$name$i-$(echo "$shape" | tr -d ' -')
                timeout ${EACH:-150} python3 "$code/benchmarks/compare_throughput.py" $shape \
                    --dir /tmp/lw-cmp-ab$(echo "$shape" | tr -d ' -') --out "$W/$tag.md" > "$W/$tag.log" 2>&1
                echo "=== compare, $name code, round $i, $shape (exit $?, at $SECONDS s)"; grep -v '^wrote' "$W/$tag.log" | tail -9
            done
        done
    done ;;
dist_ab)
    BASE=${BASE:-.base37} bash benchmarks/gpu_session35.sh dist_ab ;;
esac
tar czf "$OUT/session37-$PART.tgz" -C "$W" . 2>/dev/null
