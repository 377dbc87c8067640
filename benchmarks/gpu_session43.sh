#!/usr/bin/env bash
# Device session 43, one H200: where each command of the isolated profile spends its wall time
# (its start-up stages, what it reads from storage when, its exit), with the interpreter's
# teardown skipped at a command's end (this checkout) against $BASE's code (default .base46:
# 8ea22da's src/, which tore it down; carry it).
#   part "iso": `layerwise check` with each code (fills the bytecode cache, as a second command
#     finds it), then benchmarks/isolated_profile.py with this checkout's code and $BASE's, taking
#     turns, $RUNS rounds (default 2), no round started after $DEADLINE seconds (default 330).
#   part "variants": benchmarks/capture_variants.py on GPU 0 (the flushing thread polling its
#     events included), shapes $SHAPES (default 1x128,4x128,1x512,1x1024), $REPS rounds (default 7).
# Parts run one after another: `bash benchmarks/gpu_session43.sh iso variants`. Logs packed into
# $OUT/session43-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 43 iso "$@"
BASE=${BASE:-.base46}
case "$PART" in
iso)
    iso_ab "$BASE" ;;
variants)
    timeout ${EACH:-150} python3 benchmarks/capture_variants.py --gpus 1 --shapes "${SHAPES:-1x128,4x128,1x512,1x1024}" \
        --reps "${REPS:-7}" --out "$W/gpus1" > "$W/variants1.log" 2>&1
    echo "=== capture variants on 1 GPU (exit $?, at $SECONDS s)"; tail -8 "$W/variants1.log" ;;
esac
tar czf "$OUT/session43-$PART.tgz" -C "$W" . 2>/dev/null
