#!/usr/bin/env bash
# Device session 60, one H200: a large copy's NaN/Inf looked for on the GPU (the writer checks only
# what it did not find finite) and the intent's text made before the last files end, against
# $BASE's code (default .base60: 7e40644's src/ and benchmarks/, the commit before both; carry it).
#   part "e2e": gpu_parts.sh's e2e_ab: 16 x 256 and 16 x 4096, this checkout and $BASE in turns,
#     $RUNS pairs (default 3), $REPEAT rounds each (default 5).
#   part "ab": capture_ab.py at the short shapes (the capture's bookkeeping) against $BASE/src;
#     part "ablarge": at 4 x 4096, 16 x 1024 and 16 x 512 (copies of 64 MiB or more: the GPU's sums).
#   part "gputests": the GPU test suite (tests/gpu); part "gpuextract": its tests/gpu/test_gpu_extract.py.
#   part "threads": 12 writer threads against 16 (at most 3 a process), in both orders, this checkout.
# `bash benchmarks/gpu_session60.sh e2e`. Logs packed into $OUT/session60-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 60 e2e "$@"
BASE=${BASE:-.base60}
case "$PART" in
e2e)
    e2e_ab "$BASE" ;;
ab)
    timeout ${AB:-240} python3 benchmarks/capture_ab.py --base "$BASE/src" --reps 9 --book-profile 20 \
        --out "$W" > "$W/ab.log" 2>&1
    echo "=== capture A/B (exit $?, at $SECONDS s)"; tail -36 "$W/ab.log" ;;
ablarge)
    timeout ${AB:-200} python3 benchmarks/capture_ab.py --base "$BASE/src" --shapes 4x4096,16x1024,16x512 --reps 7 \
        --run-batches 2 --book-rounds 0 --out "$W" > "$W/ablarge.log" 2>&1
    echo "=== capture A/B, large copies (exit $?, at $SECONDS s)"; tail -8 "$W/ablarge.log" ;;
gputests)
    timeout ${GT:-300} python3 -m pytest -q -p no:cacheprovider tests/gpu --timeout 200 --durations=15 -rfs \
        --tb=short > "$W/gpu_tests.log" 2>&1
    echo "=== gpu tests (exit $?, at $SECONDS s)"; tail -30 "$W/gpu_tests.log" ;;
gpuextract)
    timeout ${GT:-120} python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_extract.py --timeout 100 -rfs \
        --tb=short > "$W/gpu_extract.log" 2>&1
    echo "=== gpu extract tests (exit $?, at $SECONDS s)"; tail -12 "$W/gpu_extract.log" ;;
threads)
    e2e_threads 12,16 16,12 ;;
esac
tar czf "$OUT/session60-$PART.tgz" -C "$W" . 2>/dev/null
