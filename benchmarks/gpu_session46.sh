#!/usr/bin/env bash
# Device session 46, one H200: where compare's time goes on 1024-token tensors, thread by thread
# and on the GPU (benchmarks/compare_trace.py, cold then warm), and on 4096-token tensors beside it.
#   part "trace": compare_trace.py on each of SHAPES (its arguments, ';' between shapes; default 1 GB
#     runs of 1024-token tensors, then of 4096-token tensors); traces and summaries under $W.
# Logs packed into $OUT/session46-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 46 trace "$@"
case "$PART" in
trace)
    IFS=';' read -ra shapes <<< "${SHAPES:---gb 1 --tokens 1024;--gb 1 --tokens 4096}"
    for shape in "${shapes[@]}"; do
        tag=trace$(echo "$shape" | tr -d ' -')
        timeout ${EACH:-200} python3 benchmarks/compare_trace.py $shape --dir /tmp/lw-$tag --out "$W/$tag" \
            > "$W/$tag.log" 2>&1
        echo "=== compare_trace.py $shape (exit $?, at $SECONDS s)"; cat "$W/$tag.log" | grep -v '^wrote' | tail -14
    done ;;
esac
tar czf "$OUT/session46-$PART.tgz" -C "$W" . 2>/dev/null
