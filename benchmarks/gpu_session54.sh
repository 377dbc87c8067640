#!/usr/bin/env bash
# Device session 54, one H200: how many reader threads compare should run. Session 53 found that
# with 2 readers instead of 8 a 1024-token compare's measuring thread spends 0.7 s in
# tensor_metrics instead of 3.0 s, and compare reads at 0.87-1.01 of the raw cold read instead
# of 0.75-0.82 (wake_latency.py: a small torch op takes 51 us at the median beside 8 reader-like
# threads, 5 us alone).
#   part "readers": compare_knobs.py on 2 GB runs of 1024-token tensors (as-is, 4, 3, 2 readers),
#     of 4096-token tensors (streamed: as-is, 4, 2) and of 512-token tensors with logits of a
#     200,064-token vocabulary (as-is, 2), $ROUNDS rounds (default 3; 2 for the logits).
#   part "confirm": the committed default (2 threads reading whole, 8 streaming) against 8 reading
#     whole (whole8, the value before), the same three shapes ($ROUNDS rounds; 2 for 4096 and logits).
#   part "gputests": gpu_session40.sh's part: the GPU test suite (tests/gpu), GT seconds at most.
# Parts run one after another: `bash benchmarks/gpu_session54.sh readers`, then `... confirm gputests`. Logs packed into
# $OUT/session54-<part>.tgz (the suite's: session40-gputests.tgz).
. "$(dirname "$0")/gpu_parts.sh" 54 readers "$@"
case "$PART" in
readers)
    cmp_knobs "--gb 2 --tokens 1024 --rounds ${ROUNDS:-3} --variants as-is,readers4,readers3,readers2" \
        "--gb 2 --tokens 4096 --rounds ${ROUNDS:-3} --variants as-is,readers4,readers2" \
        "--gb 2 --tokens 512 --vocab 200064 --rounds 2 --variants as-is,readers2" ;;
confirm)
    cmp_knobs "--gb 2 --tokens 1024 --rounds ${ROUNDS:-3} --variants as-is,whole8" \
        "--gb 2 --tokens 4096 --rounds 2 --variants as-is,whole8" \
        "--gb 2 --tokens 512 --vocab 200064 --rounds 2 --variants as-is,whole8" ;;
gputests)
    bash benchmarks/gpu_session40.sh gputests ;;
esac
tar czf "$OUT/session54-$PART.tgz" -C "$W" . 2>/dev/null
