#!/usr/bin/env bash
# Device session 66, one H200: the writer's processes make each file's manifest entries and their
# texts and send them with their replies (this process builds none; this stop's code), against
# $BASE's (default .base65: 934ebc4's src/, the last stop's,
# with this checkout's benchmarks/; carry it).
#   part "e2e": gpu_parts.sh's e2e_ab: 16 x 256 and 16 x 4096, the two codes in turns, $RUNS pairs
#     (default 3), $REPEAT rounds each (default 5).
#   part "e2e2": the same against $BASE2's code (default .base66: 43d48ed's src/, where this process's
#     reply threads made the entries, with this checkout's benchmarks/; carry it).
#   part "iso1": `layerwise check` (the bytecode cache filled), then isolated_profile.py once, this
#     checkout's code alone (--no-joint), within $ISO seconds (default 240).
#   part "gputests": the GPU test suite (tests/gpu), or the tests matching $GK (pytest -k).
# `bash benchmarks/gpu_session66.sh e2e gputests`. Logs packed into $OUT/session66-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 66 e2e "$@"
BASE=${BASE:-.base65}
case "$PART" in
e2e)
    e2e_ab "$BASE" ;;
e2e2)
    e2e_ab "${BASE2:-.base66}" ;;
gputests)
    gpu_suite ;;
iso1)
    python3 -m layerwise check builtin:minimax-m2 > "$W/check.log" 2>&1
    timeout ${ISO:-240} python3 benchmarks/isolated_profile.py --src src --no-joint --out "$W/here" > "$W/here.log" 2>&1
    echo "=== isolated profile, src (exit $?, at $SECONDS s)"; tail -14 "$W/here.log" ;;
esac
tar czf "$OUT/session66-$PART.tgz" -C "$W" . 2>/dev/null
