#!/usr/bin/env bash
# Device session 56, one H200: the end of an extract at this checkout (the manifest's and
# intent.json's text by json's C encoder, the library versions looked up once a process, the
# manifest's entries without a directory walk, this process's writer threads started only for a
# file the writer's process cannot write) against $BASE's code (default .base56: 61ded5b's src/
# and benchmarks/, the commit before; carry it).
#   part "e2e" (gpu_parts.sh's e2e_ab): extract_overhead.py's end-to-end extracts only (16 x 256, 16 x 4096, $REPEAT
#     rounds each, default 5), with this checkout's code and $BASE's (its own copy of the script),
#     taking turns, $RUNS pairs (default 3), none started after $DEADLINE seconds (default 420).
#   part "threads": this checkout's end-to-end extracts with 12 writer threads (the default here) and
#     16, at most 3 a process, side by side, then in the other order ($REPEAT rounds, default 5):
#     whether the last layer's 16 files (one wave on 16 threads, two on 12) end sooner.
#   part "gputests": gpu_session40.sh's part: the GPU test suite (tests/gpu), GT seconds at most.
# `bash benchmarks/gpu_session56.sh e2e gputests`, then `... threads`. Logs packed into $OUT/session56-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 56 e2e "$@"
BASE=${BASE:-.base56}
case "$PART" in
e2e)
    e2e_ab "$BASE" ;;
threads)
    e2e_threads 12,16 16,12 ;;
gputests)
    bash benchmarks/gpu_session40.sh gputests ;;
esac
tar czf "$OUT/session56-$PART.tgz" -C "$W" . 2>/dev/null
