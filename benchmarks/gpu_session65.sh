#!/usr/bin/env bash
# Device session 65, one H200: a writer process's file indexed on the thread taking its reply, as
# it comes, `close` only waiting (43d48ed), against $BASE's code (default .base65: 934ebc4's src/,
# the commit before it, with this checkout's benchmarks/; carry it).
#   part "e2e": gpu_parts.sh's e2e_ab: 16 x 256 and 16 x 4096, the two codes in turns, $RUNS pairs
#     (default 3), $REPEAT rounds each (default 5).
#   part "table": gpu_parts.sh's capture_table: extract_overhead.py's capture table (11 shapes) and
#     end-to-end extracts, this checkout, $RUNS runs (default 3), none started after $DEADLINE s.
#   part "gputests": the GPU test suite (tests/gpu), or the tests matching $GK (pytest -k).
#   part "iso": gpu_parts.sh's iso_ab: the isolated profile with this checkout's code and $BASE's, in turns.
# `bash benchmarks/gpu_session65.sh e2e table`. Logs packed into $OUT/session65-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 65 e2e "$@"
BASE=${BASE:-.base65}
case "$PART" in
e2e)
    e2e_ab "$BASE" ;;
table)
    capture_table 1 3 ;;
gputests)
    gpu_suite ;;
iso)
    iso_ab "$BASE" ;;
esac
tar czf "$OUT/session65-$PART.tgz" -C "$W" . 2>/dev/null
