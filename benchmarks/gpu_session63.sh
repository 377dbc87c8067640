#!/usr/bin/env bash
# Device session 63, one H200: the batch's last hook flushes at once (the last layer's copy and
# files beside the model's final norm and head), against $BASE's code (default .base63: 90dbaad's
# src/, the commit before it, with this checkout's benchmarks/; carry it).
#   part "e2e": gpu_parts.sh's e2e_ab: 16 x 256 and 16 x 4096, this checkout's code and $BASE's in
#     turns, $RUNS pairs (default 3), $REPEAT rounds each (default 5).
#   part "capture": capture_ab.py, this code's capture against $BASE's in one process (interleaved
#     rounds, every copy on the host inside the timed region), short and long shapes.
#   part "gputests": the GPU test suite (tests/gpu).
# `bash benchmarks/gpu_session63.sh e2e capture gputests`. Logs packed into $OUT/session63-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 63 e2e "$@"
BASE=${BASE:-.base63}
case "$PART" in
e2e)
    e2e_ab "$BASE" ;;
capture)
    timeout ${CAP:-240} python3 benchmarks/capture_ab.py --base "$BASE/src" \
        --shapes ${SHAPES:-1x128,1x512,4x128,16x128,1x1024,4x4096,16x4096} --reps ${REPS:-7} --book-rounds 0 \
        --out "$W/capture" > "$W/capture.log" 2>&1
    echo "=== capture_ab (exit $?, at $SECONDS s)"; tail -25 "$W/capture.log" ;;
gputests)
    gpu_suite ;;
esac
tar czf "$OUT/session63-$PART.tgz" -C "$W" . 2>/dev/null
