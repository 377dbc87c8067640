#!/usr/bin/env bash
# Device session 71, one H200: no garbage collection while a batch's layers are launched (afbe9ae)
# and the manifest sorted by one integer an entry (2c9c231), against the code before both
# (bf5146a), carried as $BASE (default .base71: `git archive bf5146a src benchmarks`, git-ignored).
#   part "capab": capture_ab.py, this code's capture against $BASE's in one process, interleaved
#     rounds ($REPS, default 9), short shapes and one long, 8 batches in a row too, the bookkeeping
#     alone ($CAP s at most, default 260).
#   part "ab": gpu_parts.sh's e2e_ab against $BASE: the end-to-end extracts (16 x 256, 16 x 4096,
#     $REPEAT rounds each, default 5) with this checkout's code and the base's taking turns, $RUNS
#     pairs (default 2), none started after $DEADLINE s.
#   part "gputests": the GPU tests of the capture, extract and replay (gpu_suite, -k $GK).
#   part "table": gpu_parts.sh's capture_table on 1 GPU, $RUNS runs (default 1): the capture table
#     (11 shapes, 5 rounds) and the end-to-end extracts (3 rounds each), this checkout's code.
#   part "iso": `layerwise check` (the bytecode cache filled), then isolated_profile.py $RUNS times
#     (default 1), none started after $DEADLINE s (default 200), each within $ISO s (default 200).
#   part "shortab": extract_overhead.py's capture table on the short shapes (1 and 4 prompts of 128
#     and 512 tokens, one pass a round, $REPS rounds, default 7) with this checkout's script and code
#     and with $BASE's, taking turns, $RUNS pairs (default 2), none started after $DEADLINE s.
# `bash benchmarks/gpu_session71.sh capab ab`. Logs packed into $OUT/session71-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 71 ab "$@"
case "$PART" in
capab)
    capture_vs "${BASE:-.base71}" ;;
ab)
    RUNS=${RUNS:-2} e2e_ab "${BASE:-.base71}" ;;
gputests)
    GK=${GK-extract or replay or capture} GT=${GT:-200} gpu_suite ;;
table)
    capture_table 1 1 ;;
shortab)
    for i in $(seq "${RUNS:-2}"); do
        for code in . "${BASE:-.base71}"; do
            [ "$SECONDS" -gt "${DEADLINE:-99999}" ] && { echo "=== $code run $i not started: past $DEADLINE s"; break 2; }
            name=short$i-$([ "$code" = . ] && echo here || echo base)
            timeout ${EACH:-150} python3 "$code/benchmarks/extract_overhead.py" --gpus 1 --tokens 128,512 --batches 1,4 \
                --reps "${REPS:-7}" --passes 1 --profile '' --e2e '' --out "$W/$name" > "$W/$name.log" 2>&1
            echo "=== $name (exit $?, at $SECONDS s)"; grep -A6 '^batch' "$W/$name.log" | tail -5
        done
    done ;;
iso)
    iso_runs 1 ;;
esac
tar czf "$OUT/session71-$PART.tgz" -C "$W" . 2>/dev/null
