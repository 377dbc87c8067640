#!/usr/bin/env bash
# Device session 69, one H200: the compare figures again at the last commit, and the short shapes'
# capture overhead measured over several forward passes a round.
#   part "confirm": compare_knobs.py as-is (four threads reading whole) against whole2 and unbatched,
#     on 2 GB runs of 512-token tensors with the logits of a 200,064-token vocabulary ($R1 rounds,
#     default 4) and of 1024-token tensors ($R2, default 3), none started after $DEADLINE s; then the
#     whole GPU test suite ($GT s at most, default 300).
#   part "deep": compare_knobs.py as-is against unbatched on 2 GB runs of 4096-token tensors ($R3
#     rounds, default 3).
#   part "short": extract_overhead.py on the short shapes (1 and 4 prompts of 128 and 512 tokens, $REPS
#     rounds, default 7), each timed one forward pass a round and 8 passes a round (--passes 1,8) in
#     the same run, $RUNS runs (default 2), none started after $DEADLINE s; the first with the
#     where-the-time-goes profile of $PROFILE (default 1x128; '' for none: cProfile of the forward
#     thread, torch.profiler traces).
#   part "iso": `layerwise check` (the bytecode cache filled), then isolated_profile.py (with the one-read
#     path, --record-reference) $RUNS times (default 2), none started after $DEADLINE s (default 200),
#     each within $ISO s (default 200).
#   part "capab": capture_ab.py, this code's capture (db53f9a, 08d7df9: the host views and the cutting on
#     the completion thread, while the copy is under way) against $BASE's (default .base69: 87909eb's
#     src/, carried) in one process, interleaved rounds ($REPS, default 9), short shapes and one long.
#   part "e2e": gpu_parts.sh's e2e_ab against $BASE: 16 x 256 and 16 x 4096, $RUNS pairs (default 1).
#   part "e2ehere": extract_overhead.py's end-to-end extracts only (16 x 256, 16 x 4096, $REPEAT rounds
#     each, default 5), this checkout's code, $RUNS times (default 2), none started after $DEADLINE s.
#   part "gputests": the GPU tests of the capture, extract and replay (gpu_suite, -k $GK).
# `bash benchmarks/gpu_session69.sh confirm short`. Logs packed into $OUT/session69-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 69 confirm "$@"
case "$PART" in
confirm)
    cmp_knobs "--gb 2 --tokens 512 --vocab 200064 --rounds ${R1:-4} --variants as-is,whole2,unbatched" \
        "--gb 2 --tokens 1024 --rounds ${R2:-3} --variants as-is,whole2,unbatched"
    GK= GT=${GT:-300} gpu_suite ;;
deep)
    cmp_knobs "--gb 2 --tokens 4096 --rounds ${R3:-3} --variants as-is,unbatched" ;;
short)
    for i in $(seq "${RUNS:-2}"); do
        [ "$SECONDS" -gt "${DEADLINE:-99999}" ] && { echo "=== short run $i not started: past $DEADLINE s"; break; }
        profile=$([ "$i" = 1 ] && echo "${PROFILE-1x128}" || echo '')
        timeout ${EACH:-200} python3 benchmarks/extract_overhead.py --gpus 1 --tokens 128,512 --batches 1,4 \
            --reps "${REPS:-7}" --passes 1,8 --profile "$profile" --e2e '' --out "$W/short$i" > "$W/short$i.log" 2>&1
        echo "=== short shapes, run $i (exit $?, at $SECONDS s)"; grep -v '^{' "$W/short$i.log" | tail -12
        grep '"forward_wall_ms"' "$W/short$i.log" | cut -c1-1500
    done ;;
capab)
    capture_vs "${BASE:-.base69}" ;;
e2e)
    RUNS=${RUNS:-1} e2e_ab "${BASE:-.base69}" ;;
e2ehere)
    for i in $(seq "${RUNS:-2}"); do
        [ "$SECONDS" -gt "${DEADLINE:-99999}" ] && { echo "=== e2e run $i not started: past $DEADLINE s"; break; }
        timeout ${EACH:-120} python3 benchmarks/extract_overhead.py --gpus 1 --max-batch-tokens 0 --profile '' \
            --e2e 16x256,16x4096 --e2e-repeat "${REPEAT:-5}" --writer process --out "$W/e2e$i" > "$W/e2e$i.log" 2>&1
        echo "=== e2e run $i (exit $?, at $SECONDS s)"; grep '^extract' "$W/e2e$i.log" | cut -c1-420
    done ;;
gputests)
    GK=${GK-extract or replay or capture} GT=${GT:-150} gpu_suite ;;
iso)
    iso_runs 2 ;;
esac
tar czf "$OUT/session69-$PART.tgz" -C "$W" . 2>/dev/null
