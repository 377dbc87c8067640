#!/usr/bin/env bash
# Device session 61, one H200: the writer's processes at nice +10, a reply read into 64 KiB (not
# 1 MiB), a file's path handed over as a string (12bfc4b, e46d45e, f67c2cc), each manifest entry
# encoded as its file is indexed (2dba831), against $BASE's code (default .base61: 5c84bbc's src/,
# the commit before them, with this checkout's benchmarks/; carry it).
#   part "e2e": gpu_parts.sh's e2e_ab: 16 x 256 and 16 x 4096, this checkout's code and $BASE's in
#     turns (each with this checkout's script: both traces give the CPU of the threads beside the
#     forward), $RUNS pairs (default 3), $REPEAT rounds each (default 5).
#   part "gputests": the GPU test suite (tests/gpu).
#   part "table": extract_overhead.py's capture table and end-to-end extracts, this checkout, $RUNS runs.
# `bash benchmarks/gpu_session61.sh e2e gputests`. Logs packed into $OUT/session61-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 61 e2e "$@"
BASE=${BASE:-.base61}
case "$PART" in
e2e)
    e2e_ab "$BASE" ;;
gputests)
    timeout ${GT:-300} python3 -m pytest -q -p no:cacheprovider tests/gpu --timeout 200 --durations=15 -rfs \
        --tb=short > "$W/gpu_tests.log" 2>&1
    echo "=== gpu tests (exit $?, at $SECONDS s)"; tail -30 "$W/gpu_tests.log" ;;
table)
    capture_table 1 1 ;;
esac
tar czf "$OUT/session61-$PART.tgz" -C "$W" . 2>/dev/null
