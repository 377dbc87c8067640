#!/usr/bin/env bash
# Device session 55, one H200: the isolated profile (benchmarks/isolated_profile.py) at this
# checkout, whose layer test ends with compare's reading changed since it was last measured
# (9646647's 0.2 ms switch interval; 289b2d4's two threads reading whole), against $BASE's code
# (default .base55: b1f765e's src/, the last measured; carry it).
#   part "iso": `layerwise check` with each code, then isolated_profile.py with this checkout's
#     code and $BASE's, taking turns, $RUNS rounds (default 2), none started after $DEADLINE
#     seconds (default 330).
#   part "here": isolated_profile.py --no-joint with this checkout's code alone, once (a round
#     where the device time left holds no pair).
# `bash benchmarks/gpu_session55.sh iso`. Logs packed into $OUT/session55-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 55 iso "$@"
BASE=${BASE:-.base55}
case "$PART" in
iso)
    iso_ab "$BASE" ;;
here)  # `layerwise check` first, as iso_ab runs it (the commands then find their bytecode cached)
    PYTHONPATH=$PWD/src:$PYTHONPATH python3 -m layerwise check builtin:minimax-m2 > "$W/check.log" 2>&1
    timeout ${ISO:-240} python3 benchmarks/isolated_profile.py --src src --no-joint --out "$W/here" > "$W/here.log" 2>&1
    echo "=== isolated profile, src (exit $?, at $SECONDS s)"; tail -12 "$W/here.log" ;;
esac
tar czf "$OUT/session55-$PART.tgz" -C "$W" . 2>/dev/null
