#!/usr/bin/env bash
# Device session 68, one H200: compare with its tensor metrics batched over units (measuring.py,
# metricsbatch.py) against the same code measuring each tensor as it comes (compare_knobs.py's
# "unbatched": measuring.BATCH_BYTES = 0), in turns in one process.
#   part "tests": the GPU tests of compare and of the batched metrics (gpu_suite, -k compare).
#   part "mbatch": metrics_batch.py on 116 pairs of 512 x 3072 (one pair a layer of the logits-heavy
#     runs): tensor_metrics pair by pair against layerwise's batched pass of 8, 32 and 116 pairs.
#   part "ab": compare_knobs.py --variants as-is,unbatched (compare / raw cold read) on 2 GB runs of
#     512-token tensors with logits of a 200,064-token vocabulary ($R1 rounds, default 5), of
#     1024-token tensors ($R2, default 3) and of 4096-token tensors ($R3, default 2), none started
#     after $DEADLINE s.
#   part "reads": compare_knobs.py with plain reads (the code) against safetensors' memory map
#     ("mmap-reads"), four threads reading whole ("whole4") and every tensor of 1 MiB or more streamed
#     ("stream-all") on the logits-heavy runs ($R1 rounds, default 4), then as-is, mmap-reads and
#     unbatched on the 1024-token ($R2, default 3) and 4096-token runs ($R3, default 2).
#   part "confirm": compare_knobs.py as-is (four threads reading whole) against whole2 (two, the value
#     before) and unbatched, on the logits-heavy runs ($R1 rounds, default 4) and the 1024-token runs
#     ($R2, default 3); then the whole GPU test suite ($GT s at most, default 300).
#   part "final": compare_knobs.py as-is against unbatched on the 4096-token runs ($R3 rounds, default
#     3); compare_trace.py as-is against unbatched on the logits-heavy runs (part "trace"); then, if
#     started before $DEADLINE s (default 330), isolated_profile.py once (--no-joint).
#   part "trace": compare_trace.py --variants as-is,unbatched on 1 GB runs of 512-token tensors
#     with logits: the measuring thread's torch calls and the GPU's idle share, each way.
# `bash benchmarks/gpu_session68.sh tests mbatch ab`. Logs packed into $OUT/session68-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 68 ab "$@"
case "$PART" in
tests)
    GK="compare" GT=${GT:-200} gpu_suite ;;
mbatch)
    timeout ${EACH:-120} python3 benchmarks/metrics_batch.py --pairs 116 --tokens 512 --batch 8,32,116 --rounds 7 \
        --out "$W/mbatch" > "$W/mbatch.log" 2>&1
    echo "=== metrics_batch.py (exit $?, at $SECONDS s)"; cat "$W/mbatch.log" ;;
ab)
    cmp_knobs "--gb 2 --tokens 512 --vocab 200064 --rounds ${R1:-5} --variants as-is,unbatched" \
        "--gb 2 --tokens 1024 --rounds ${R2:-3} --variants as-is,unbatched" \
        "--gb 2 --tokens 4096 --rounds ${R3:-2} --variants as-is,unbatched" ;;
reads)
    cmp_knobs "--gb 2 --tokens 512 --vocab 200064 --rounds ${R1:-4} --variants as-is,mmap-reads,whole4,stream-all" \
        "--gb 2 --tokens 1024 --rounds ${R2:-3} --variants as-is,mmap-reads,unbatched" \
        "--gb 2 --tokens 4096 --rounds ${R3:-2} --variants as-is,mmap-reads,unbatched" ;;
confirm)
    cmp_knobs "--gb 2 --tokens 512 --vocab 200064 --rounds ${R1:-4} --variants as-is,whole2,unbatched" \
        "--gb 2 --tokens 1024 --rounds ${R2:-3} --variants as-is,whole2,unbatched"
    GK= GT=${GT:-300} gpu_suite ;;
final)
    cmp_knobs "--gb 2 --tokens 4096 --rounds ${R3:-3} --variants as-is,unbatched"
    bash "$0" trace  # its logs: $OUT/session68-trace.tgz
    if [ "$SECONDS" -gt "${DEADLINE:-330}" ]; then echo "=== isolated profile not started: past ${DEADLINE:-330} s"
    else
        timeout ${ISO:-240} python3 benchmarks/isolated_profile.py --src src --no-joint --out "$W/iso" > "$W/iso.log" 2>&1
        echo "=== isolated profile (exit $?, at $SECONDS s)"; tail -14 "$W/iso.log"
    fi ;;
trace)
    timeout ${EACH:-200} python3 benchmarks/compare_trace.py --gb 1 --tokens 512 --vocab 200064 \
        --variants as-is,unbatched --dir /tmp/lw-trace512 --out "$W/trace" > "$W/trace.log" 2>&1
    echo "=== compare_trace.py, 512 tokens + logits (exit $?, at $SECONDS s)"
    grep -v '^wrote\|USDT\|warn' "$W/trace.log" | tail -60
    gzip -f "$W"/trace/trace-*.json ;;
esac
tar czf "$OUT/session68-$PART.tgz" -C "$W" . 2>/dev/null
