#!/usr/bin/env bash
# Device session 73, one H200: the streamed extract reads the final norm and head while its last
# layer runs (and not at all when nothing after the layers is captured), against the code before
# it (53d32ea, carried as $BASE, default .base73: `git archive 53d32ea src benchmarks`, git-ignored).
#   part "isoab": gpu_parts.sh's iso_ab against $BASE: isolated_profile.py with this checkout's
#     src/ and the base's taking turns, $RUNS rounds (default 2), none started after $DEADLINE s.
#   part "gputests": the whole GPU suite (gpu_suite, -k $GK: empty, every test).
#   part "iso": `layerwise check`, then isolated_profile.py with this checkout's code, $RUNS rounds
#     (default 1), none started after $DEADLINE s.
# `RUNS=2 bash benchmarks/gpu_session73.sh isoab`. Logs packed into $OUT/session73-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 73 isoab "$@"
case "$PART" in
isoab)
    iso_ab "${BASE:-.base73}" ;;
gputests)
    GK=${GK-} GT=${GT:-200} gpu_suite ;;
iso)
    iso_runs 1 ;;
esac
tar czf "$OUT/session73-$PART.tgz" -C "$W" . 2>/dev/null
