#!/usr/bin/env bash
# Device session 44, one H200: the prefetch reading each command's layers in its order (exactly
# their tensors, 4 threads, up to 16 GiB) against $BASE's code (default .base47: 1af0c42's src/,
# which read the first layer's span alone, on one thread; carry it), and what a command's end costs.
#   part "iso": `layerwise check` with each code, then benchmarks/isolated_profile.py with this
#     checkout's code and $BASE's, taking turns, $RUNS rounds (default 2), no round started after
#     $DEADLINE seconds (default 330); $ISO_ARGS go to isolated_profile.py (e.g. --no-joint).
#   part "exit": benchmarks/command_exit.py on the isolated profile's checkpoint (made by part
#     "iso"): the streamed extract and the layer test, $ROUNDS fresh processes each (default 2).
# Parts run one after another: `bash benchmarks/gpu_session44.sh iso exit`. Logs packed into
# $OUT/session44-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 44 iso "$@"
BASE=${BASE:-.base47}
CKPT=/tmp/lw-isolated-ckpt; WORK=/tmp/lw-isolated-work
case "$PART" in
iso)
    iso_ab "$BASE" ;;
exit)
    common=(--dtype bf16 --device cuda:0 --overwrite)
    timeout 150 python3 benchmarks/command_exit.py --rounds "${ROUNDS:-2}" --run $WORK/exit-ref --out "$W/extract" -- \
        extract $CKPT --stream --prompts $WORK/prompts.jsonl --out $WORK/exit-ref "${common[@]}" > "$W/extract.log" 2>&1
    echo "=== command_exit.py, streamed extract (exit $?, at $SECONDS s)"; tail -7 "$W/extract.log"
    timeout 150 python3 benchmarks/command_exit.py --rounds "${ROUNDS:-2}" --run $WORK/exit-test/isolated \
        --out "$W/test" -- test $CKPT --reference $WORK/exit-ref --test-type single --layer all \
        --out $WORK/exit-test "${common[@]}" > "$W/test.log" 2>&1
    echo "=== command_exit.py, layer test (exit $?, at $SECONDS s)"; tail -7 "$W/test.log" ;;
esac
tar czf "$OUT/session44-$PART.tgz" -C "$W" . 2>/dev/null
