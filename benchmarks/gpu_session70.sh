#!/usr/bin/env bash
# Device session 70, one H200: branch next/writer-batches (a flush's files in one message to each
# writer process and one back) against main's code before it, carried as $BASE (default .base70:
# `git archive main src benchmarks`, git-ignored).
#   part "writers": writer_processes.py on this host, files handed one by one and 16 at a time side
#     by side (--batches 1,16), 4 processes x 3 threads (the default on 16 cores), $REPS rounds
#     (default 5), 2 runs.
#   part "ab": gpu_parts.sh's e2e_ab against $BASE: the end-to-end extracts (16 x 256, 16 x 4096,
#     $REPEAT rounds each, default 5) with this checkout's code and the base's taking turns, $RUNS
#     pairs (default 2), none started after $DEADLINE s.
#   part "gputests": the GPU tests of the capture, extract and replay (gpu_suite, -k $GK).
# `bash benchmarks/gpu_session70.sh writers ab`. Logs packed into $OUT/session70-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 70 ab "$@"
case "$PART" in
writers)
    for i in 1 2; do
        timeout ${EACH:-120} python3 benchmarks/writer_processes.py --configs 4x3 --batches 1,16 \
            --rounds "${REPS:-5}" --work /tmp --out "$W/writers$i" > "$W/writers$i.log" 2>&1
        echo "=== writer_processes.py --batches 1,16, run $i (exit $?, at $SECONDS s)"; tail -8 "$W/writers$i.log"
    done ;;
ab)
    RUNS=${RUNS:-2} e2e_ab "${BASE:-.base70}" ;;
gputests)
    GK=${GK-extract or replay or capture or writer} GT=${GT:-200} gpu_suite ;;
esac
tar czf "$OUT/session70-$PART.tgz" -C "$W" . 2>/dev/null
