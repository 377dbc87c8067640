#!/usr/bin/env bash
# Device session 53, one H200 (prepared at the end of stop 33, not yet run): whether compare's
# measuring thread, on 1024-token tensors, sleeps for the GIL its reader threads hold, or because a
# woken thread waits long to run again on this machine.
#   part "wake": benchmarks/wake_latency.py (an Event ping-pong, small torch ops beside reader-like
#     threads; idle, then with 12 processes spinning). CPU only, seconds.
#   part "readers": compare_knobs.py --variants as-is,readers2,readers1 on 2 GB runs of 1024-token
#     tensors, 3 rounds: if the measuring thread's tensor_metrics seconds fall with fewer readers,
#     it waited for them.
#   part "trace": compare_trace.py --variants as-is,readers1 (its sampled states with one reader).
# Parts run one after another: `bash benchmarks/gpu_session53.sh wake readers trace`. Logs packed
# into $OUT/session53-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 53 readers "$@"
case "$PART" in
wake)
    timeout 120 python3 benchmarks/wake_latency.py --busy 12 --out "$W/wake.md" > "$W/wake.log" 2>&1
    echo "=== wake_latency.py (exit $?)"; tail -8 "$W/wake.log" ;;
readers)
    cmp_knobs "--gb 2 --tokens 1024 --rounds ${ROUNDS:-3} --variants as-is,readers2,readers1" ;;
trace)
    cmp_trace as-is,readers1 ;;
esac
tar czf "$OUT/session53-$PART.tgz" -C "$W" . 2>/dev/null
