#!/usr/bin/env bash
# Device session 38, one H200:
#   part "gputests": the GPU test suite (tests/gpu) on this checkout.
#   part "profile": benchmarks/capture_ab.py against $BASE (default .base43: 3eaff83's src/; carry
#     it), shapes $SHAPES (default 1x128,1x512,4x128), $REPS interleaved rounds (default 9), with the
#     bookkeeping's 30 functions by own time under cProfile.
#   part "nonfinite": benchmarks/writer_processes.py --nonfinite, this checkout against $WBASE
#     (default .base42: this checkout's tree with b86215c^'s filebits.py; carry it), taking turns,
#     $WRUNS runs each (default 3), then the finite case once each.
# Parts run one after another: `bash benchmarks/gpu_session38.sh gputests profile nonfinite`. Logs
# packed into $OUT/session38-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 38 gputests "$@"
cat "$W/gpus.txt"
case "$PART" in
gputests)
    timeout ${GT:-330} python3 -m pytest -q -p no:cacheprovider tests/gpu --timeout 200 --durations=15 -rfs \
        --tb=short > "$W/gpu_tests.log" 2>&1
    echo "=== gpu tests (exit $?, at $SECONDS s)"; tail -30 "$W/gpu_tests.log" ;;
profile)
    timeout ${AB:-200} python3 benchmarks/capture_ab.py --base "${BASE:-.base43}/src" --shapes "${SHAPES:-1x128,1x512,4x128}" \
        --reps "${REPS:-9}" --book-profile 30 --out "$W" > "$W/ab.log" 2>&1
    echo "=== capture A/B and profile (exit $?, at $SECONDS s)"; tail -45 "$W/ab.log" ;;
nonfinite)
    base=${WBASE:-.base42}
    for i in $(seq "${WRUNS:-3}"); do
        for code in new base; do
            script=benchmarks/writer_processes.py; [ "$code" = base ] && script=$base/benchmarks/writer_processes.py
            timeout 120 python3 "$script" --nonfinite --configs 4x3 --rounds 5 --work /tmp --out "$W/$code$i" \
                > "$W/nonfinite-$code$i.log" 2>&1
            echo "=== nonfinite $code run $i (exit $?)"; tail -3 "$W/nonfinite-$code$i.log"
        done
    done
    for code in new base; do
        script=benchmarks/writer_processes.py; [ "$code" = base ] && script=$base/benchmarks/writer_processes.py
        timeout 120 python3 "$script" --configs 4x3 --rounds 5 --work /tmp --out "$W/finite-$code" \
            > "$W/finite-$code.log" 2>&1
        echo "=== finite $code (exit $?)"; tail -3 "$W/finite-$code.log"
    done ;;
esac
tar czf "$OUT/session38-$PART.tgz" -C "$W" . 2>/dev/null
