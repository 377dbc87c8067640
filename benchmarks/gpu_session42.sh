#!/usr/bin/env bash
# Device session 42, two H200s: which part of the capture costs more with the model over two GPUs.
#   part "variants": benchmarks/capture_variants.py (full capture, hooks alone, tensors held
#     without copies, copies on the compute streams, spinning events) with the model over 2 GPUs,
#     then on GPU 0 alone, shapes $SHAPES (default 4x128,1x512,1x1024), $REPS rounds (default 7).
#   part "ab": benchmarks/capture_ab.py --gpus 2 against $BASE (default .base45; carry it), shapes
#     $SHAPES, $REPS rounds (default 9), no bookkeeping part.
# Parts run one after another. Logs packed into $OUT/session42-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 42 variants "$@"
case "$PART" in
variants)
    for g in 2 1; do
        timeout ${EACH:-150} python3 benchmarks/capture_variants.py --gpus $g --shapes "${SHAPES:-4x128,1x512,1x1024}" \
            --reps "${REPS:-7}" --out "$W/gpus$g" > "$W/variants$g.log" 2>&1
        echo "=== capture variants on $g GPU(s) (exit $?, at $SECONDS s)"; tail -5 "$W/variants$g.log"
    done ;;
ab)
    timeout ${AB:-240} python3 benchmarks/capture_ab.py --gpus 2 --base "${BASE:-.base45}/src" \
        --shapes "${SHAPES:-4x128,1x512,1x1024,1x128}" --reps "${REPS:-9}" --book-rounds 0 --run-batches 0 \
        --out "$W" > "$W/ab.log" 2>&1
    echo "=== capture A/B on 2 GPUs (exit $?, at $SECONDS s)"; tail -8 "$W/ab.log" ;;
esac
tar czf "$OUT/session42-$PART.tgz" -C "$W" . 2>/dev/null
