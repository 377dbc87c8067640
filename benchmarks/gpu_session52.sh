#!/usr/bin/env bash
# Device session 52, one H200: the last commit's compare settings confirmed, and the GPU suite.
#   part "knobs": compare_knobs.py --variants as-is,0.5ms (readahead.SWITCH_INTERVAL 0.2 ms against
#     0.5 ms, the value before) on 2 GB runs of 1024-token tensors, $ROUNDS rounds (default 3).
#   part "knobs2": the same with compare_knobs.py's untimed first compare (the first call's round 1
#     put the process's start-up on its first setting), then 2 GB runs of 4096-token tensors,
#     as-is against stream-64 (readahead.STREAM_BYTES 16 MiB against 64), 2 rounds.
#   part "gputests": gpu_session40.sh's part: the GPU test suite (tests/gpu), GT seconds at most.
# Parts run one after another: `bash benchmarks/gpu_session52.sh knobs gputests`, then `... knobs2`. Logs packed into
# $OUT/session52-<part>.tgz (the suite's: session40-gputests.tgz).
. "$(dirname "$0")/gpu_parts.sh" 52 knobs "$@"
case "$PART" in
knobs)
    cmp_knobs "--gb 2 --tokens 1024 --rounds ${ROUNDS:-3} --variants as-is,0.5ms" ;;
knobs2)
    cmp_knobs "--gb 2 --tokens 1024 --rounds ${ROUNDS:-3} --variants as-is,0.5ms" \
        "--gb 2 --tokens 4096 --rounds 2 --variants as-is,stream-64" ;;
gputests)
    bash benchmarks/gpu_session40.sh gputests ;;
esac
tar czf "$OUT/session52-$PART.tgz" -C "$W" . 2>/dev/null
