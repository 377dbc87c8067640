#!/usr/bin/env bash
# Device session 49 (and 51: `bash benchmarks/gpu_session49.sh trace`, the sampler watching every
# thread), one H200: readahead.STREAM_BYTES at 16 MiB (a 4096-token residual tensor
# streamed) against 64 MiB, and what compare's measuring thread waits on in the kernel.
#   part "gputests": tests/gpu/test_gpu_compare.py and tests/test_readahead.py.
#   part "trace": compare_trace.py (as-is) on 1 GB runs of 1024-token tensors: the measuring
#     thread's state and wait channel sampled every 0.5 ms from another process.
#   part "knobs": compare_knobs.py --variants as-is,stream-64 on 2 GB runs of 4096-token tensors,
#     $ROUNDS rounds (default 3).
# Parts run one after another: `bash benchmarks/gpu_session49.sh gputests trace knobs`. Logs packed
# into $OUT/session49-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 49 knobs "$@"
case "$PART" in
gputests)
    timeout ${BUDGET:-200} python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_compare.py \
        tests/test_readahead.py > "$W/gputests.log" 2>&1
    echo "=== GPU tests (exit $?)"; tail -3 "$W/gputests.log" ;;
trace)
    cmp_trace as-is ;;
knobs)
    cmp_knobs "--gb 2 --tokens 4096 --rounds ${ROUNDS:-3} --variants as-is,stream-64" ;;
esac
tar czf "$OUT/session49-$PART.tgz" -C "$W" . 2>/dev/null
