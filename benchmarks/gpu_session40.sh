#!/usr/bin/env bash
# Device session 40, two H200s (issue 12's evidence at this checkout, and issue 11's on 2 GPUs):
#   part "gputests": the GPU test suite (tests/gpu), the 2-GPU tests included.
#   part "dist": benchmarks/distributed.py, parts extract and test, $REPEAT rounds (default 2): the
#     data-parallel extract and `test --layer all` on 1 process against 2 ranks, bit-identical runs.
#   part "tp": benchmarks/distributed.py --parts tp: `extract --tp` on 2 ranks against the
#     one-process device_map run, per layer attention rel_l2, MoE rel_l2 and routing flips.
#   part "table": benchmarks/extract_overhead.py's capture table and end-to-end extracts with the
#     model over both GPUs, $RUNS runs (default 2), none started after $DEADLINE seconds.
# Parts run one after another: `bash benchmarks/gpu_session40.sh gputests dist`. Logs packed into
# $OUT/session40-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 40 gputests "$@"
cat "$W/gpus.txt"
filter() { grep -v 'tokenizer\|bos_token\|eos_token\|Warning\|warn_once'; }
case "$PART" in
gputests)
    timeout ${GT:-300} python3 -m pytest -q -p no:cacheprovider tests/gpu --timeout 200 --durations=15 -rfs \
        --tb=short > "$W/gpu_tests.log" 2>&1
    echo "=== gpu tests (exit $?, at $SECONDS s)"; tail -30 "$W/gpu_tests.log" ;;
dist|tp)
    parts=extract,test; [ "$PART" = tp ] && parts=tp
    python3 -m layerwise check builtin:minimax-m2 > "$W/check.log" 2>&1  # fills layerwise's bytecode cache
    timeout ${BUDGET:-400} python3 benchmarks/distributed.py --parts $parts --repeat ${REPEAT:-2} \
        --out "$W/dist" --command-timeout 200 --dist-timeout 200 > "$W/distributed.log" 2>&1
    echo "=== distributed $parts (exit $?, at $SECONDS s)"; filter < "$W/distributed.log" | tail -24 ;;
table)
    capture_table 2 2 ;;
esac
tar czf "$OUT/session40-$PART.tgz" -C "$W" . 2>/dev/null
