#!/usr/bin/env bash
# Device session 39, one H200: this checkout's capture bookkeeping and NaN/Inf counting against 3eaff83's.
#   part "ab": benchmarks/capture_ab.py against $BASE (default .base43: 3eaff83's src/; carry it),
#     5 shapes, 9 interleaved rounds, with the bookkeeping's 20 functions by own time under cProfile.
#   part "writes": benchmarks/writer_processes.py --nonfinite (4 processes x 3 threads), this checkout,
#     .base44 (3eaff83's src/ and script) and .base42 (that tree with b86215c^'s filebits.py), taking
#     turns, $WRUNS runs each (default 3); then the finite case once each.
#   part "table": benchmarks/extract_overhead.py's capture table (11 shapes, 5 rounds) and its
#     end-to-end extracts (16 x 256, 16 x 4096, 3 rounds), $RUNS times (default 3), none started
#     after $DEADLINE seconds.
# Parts run one after another: `bash benchmarks/gpu_session39.sh ab writes table`. Logs packed into
# $OUT/session39-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 39 ab "$@"
cat "$W/gpus.txt"
case "$PART" in
ab)
    timeout ${AB:-240} python3 benchmarks/capture_ab.py --base "${BASE:-.base43}/src" --reps 9 --book-profile 20 \
        --out "$W" > "$W/ab.log" 2>&1
    echo "=== capture A/B (exit $?, at $SECONDS s)"; tail -36 "$W/ab.log" ;;
writes)
    for i in $(seq "${WRUNS:-3}"); do
        for code in new .base44 .base42; do
            script=benchmarks/writer_processes.py; [ "$code" = new ] || script=$code/benchmarks/writer_processes.py
            timeout 120 python3 "$script" --nonfinite --configs 4x3 --rounds 5 --work /tmp --out "$W/nonfinite$code$i" \
                > "$W/nonfinite$code$i.log" 2>&1
            echo "=== nonfinite $code run $i (exit $?)"; tail -1 "$W/nonfinite$code$i.log"
        done
    done
    for code in new .base44; do
        script=benchmarks/writer_processes.py; [ "$code" = new ] || script=$code/benchmarks/writer_processes.py
        timeout 120 python3 "$script" --configs 4x3 --rounds 5 --work /tmp --out "$W/finite$code" > "$W/finite$code.log" 2>&1
        echo "=== finite $code (exit $?)"; tail -1 "$W/finite$code.log"
    done ;;
table)
    capture_table 1 3 ;;
esac
tar czf "$OUT/session39-$PART.tgz" -C "$W" . 2>/dev/null
