#!/usr/bin/env bash
# Device session 62, one H200: intent.json written by a thread of its own beside the first forward
# pass, the prompts' text made once for intent.json and the manifest (92b6190), against $BASE's
# code (default .base62: a382d60's src/, the commit before it, with this checkout's benchmarks/;
# carry it).
#   part "e2e": gpu_parts.sh's e2e_ab: 16 x 256 and 16 x 4096, this checkout's code and $BASE's in
#     turns (each with this checkout's script), $RUNS pairs (default 3), $REPEAT rounds each (default 5).
#   part "gputests": the GPU test suite (tests/gpu).
#   part "iso": gpu_parts.sh's iso_ab: the isolated profile with this checkout's code and $BASE's, in turns.
# `bash benchmarks/gpu_session62.sh e2e gputests`. Logs packed into $OUT/session62-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 62 e2e "$@"
BASE=${BASE:-.base62}
case "$PART" in
e2e)
    e2e_ab "$BASE" ;;
gputests)
    gpu_suite ;;
iso)
    iso_ab "$BASE" ;;
esac
tar czf "$OUT/session62-$PART.tgz" -C "$W" . 2>/dev/null
