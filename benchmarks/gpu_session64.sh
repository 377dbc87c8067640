#!/usr/bin/env bash
# Device session 64, one H200: this stop's code (intent.json beside the forward, the batch's last
# hook flushing at once, its sums on the compute stream) against $BASE's (default .base62: a382d60's
# src/, the last stop's, with this checkout's benchmarks/; carry it).
#   part "e2e": gpu_parts.sh's e2e_ab: 16 x 256 and 16 x 4096, the two codes in turns, $RUNS pairs
#     (default 3), $REPEAT rounds each (default 5).
#   part "gputests": the GPU test suite (tests/gpu), or the tests matching $GK (pytest -k).
# `bash benchmarks/gpu_session64.sh e2e gputests`. Logs packed into $OUT/session64-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 64 e2e "$@"
BASE=${BASE:-.base62}
case "$PART" in
e2e)
    e2e_ab "$BASE" ;;
gputests)
    gpu_suite ;;
esac
tar czf "$OUT/session64-$PART.tgz" -C "$W" . 2>/dev/null
