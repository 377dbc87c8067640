#!/usr/bin/env bash
# Device session 42, two H200s: which part of the capture costs more with the model over two GPUs.
#   part "variants": benchmarks/capture_variants.py (full capture, hooks alone, tensors held
#     without copies, copies on the compute streams, spinning events) with the model over 2 GPUs,
#     then on GPU 0 alone, shapes $SHAPES (default 4x128,1x512,1x1024), $REPS rounds (default 7).
#   part "ab": benchmarks/capture_ab.py with the model over 2 GPUs, then on GPU 0, against $BASE
#     (default .base45: 86583d3's src/, before the last layer's input flushed; carry it), shapes
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
    for g in 2 1; do
        timeout ${AB:-150} python3 benchmarks/capture_ab.py --gpus $g --base "${BASE:-.base45}/src" \
            --shapes "${SHAPES:-1x128,1x512,4x128,1x1024}" --reps "${REPS:-9}" --book-rounds 0 --run-batches 0 \
            --out "$W/gpus$g" > "$W/ab$g.log" 2>&1
        echo "=== capture A/B on $g GPU(s) (exit $?, at $SECONDS s)"; tail -5 "$W/ab$g.log"
    done ;;
esac
tar czf "$OUT/session42-$PART.tgz" -C "$W" . 2>/dev/null
