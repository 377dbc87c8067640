#!/usr/bin/env bash
# Device session 37: the capture after 8c1240f (flush completing the last copy on its own thread,
# each name's facts worked out once, router rows cut without a reshape), on one H200.
#   part "capture": benchmarks/capture_ab.py against $BASE (default .base40: 14da67f's src/, the
#     code before; carry it), 9 interleaved rounds in one process; then extract_overhead.py's
#     capture table (11 shapes, 5 rounds) and its end-to-end extracts (16 x 256, 16 x 4096, 3 rounds).
#   part "iso": `layerwise check` (fills the bytecode cache, as a second command finds it), then
#     benchmarks/isolated_profile.py RUNS times (default 3), no run started after DEADLINE seconds.
# Parts run one after another: `bash benchmarks/gpu_session37.sh capture iso`. Logs packed into
# $OUT/session37-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 37 capture "$@"
cat "$W/gpus.txt"
case "$PART" in
capture)
    timeout ${AB:-150} python3 benchmarks/capture_ab.py --base "${BASE:-.base40}/src" --reps 9 --out "$W" \
        > "$W/ab.log" 2>&1
    echo "=== capture A/B (exit $?, at $SECONDS s)"; tail -8 "$W/ab.log"
    timeout ${TABLE:-300} python3 benchmarks/extract_overhead.py --gpus 1 --tokens 128,512,1024,4096 \
        --batches 1,4,16 --max-batch-tokens 16384 --reps 5 --profile '' --e2e 16x256,16x4096 --e2e-repeat 3 \
        --writer process --out "$W" > "$W/table.log" 2>&1
    echo "=== capture table and end to end (exit $?, at $SECONDS s)"; tail -40 "$W/table.log" ;;
iso)
    python3 -m layerwise check builtin:minimax-m2 > "$W/check.log" 2>&1  # fills the bytecode cache
    for i in $(seq "${RUNS:-3}"); do
        [ "$SECONDS" -gt "${DEADLINE:-99999}" ] && { echo "=== run $i not started: past $DEADLINE s"; break; }
        timeout ${ISO:-240} python3 benchmarks/isolated_profile.py --out "$W/iso$i" > "$W/iso$i.log" 2>&1
        echo "=== isolated profile, run $i (exit $?, at $SECONDS s)"; tail -14 "$W/iso$i.log"
    done ;;
esac
tar czf "$OUT/session37-$PART.tgz" -C "$W" . 2>/dev/null
