#!/usr/bin/env bash
# Device session 73, one H200: the streamed extract reads the final norm and head while its last
# layer runs (and not at all when nothing after the layers is captured), against the code before
# it (53d32ea, carried as $BASE, default .base73: `git archive 53d32ea src benchmarks`, git-ignored).
#   part "isoab": gpu_parts.sh's iso_ab against $BASE: isolated_profile.py with this checkout's
#     src/ and the base's taking turns, $RUNS rounds (default 2), none started after $DEADLINE s.
#   part "gputests": the whole GPU suite (gpu_suite, -k $GK: empty, every test).
#   part "teardown": exit_teardown.py, what a process's end costs by what it holds ($GB host GB,
#     default 2; $DGB device GB, default 24; $ROUNDS, default 2).
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
teardown)
    timeout ${EACH:-300} python3 benchmarks/exit_teardown.py --gb "${GB:-2}" --device-gb "${DGB:-24}" \
        --rounds "${ROUNDS:-2}" --out "$W/teardown" > "$W/teardown.log" 2>&1
    echo "=== exit_teardown.py (exit $?, at $SECONDS s)"; tail -12 "$W/teardown.log" ;;
esac
tar czf "$OUT/session73-$PART.tgz" -C "$W" . 2>/dev/null
