#!/usr/bin/env bash
# Device session 48, one H200: whether compare's measuring thread, on 1024-token tensors, waits for
# a CPU or is blocked (compare_trace.py's schedstat figures), and the reader threads made nicer.
#   part "trace": compare_trace.py --variants $TVARIANTS (default as-is,nice-readers) on 1 GB runs
#     of 1024-token tensors.
#   part "knobs": compare_knobs.py on each of SHAPES ('|' between shapes, each its arguments with
#     --variants; default 2 GB runs of 1024-token tensors, as-is against nice-readers, 3 rounds;
#     then of 4096-token tensors, as-is against stream-all, 2 rounds); none started after $DEADLINE s.
# Parts run one after another: `bash benchmarks/gpu_session48.sh trace knobs`. Logs packed into
# $OUT/session48-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 48 knobs "$@"
case "$PART" in
trace)
    timeout ${EACH:-240} python3 benchmarks/compare_trace.py --gb 1 --tokens 1024 \
        --variants ${TVARIANTS:-as-is,nice-readers} --dir /tmp/lw-trace --out "$W/trace" > "$W/trace.log" 2>&1
    echo "=== compare_trace.py (exit $?, at $SECONDS s)"; grep -v '^wrote\|USDT\|warn' "$W/trace.log" | tail -40
    gzip "$W"/trace/trace-*.json ;;
knobs)
    IFS='|' read -ra shapes <<< "${SHAPES:---gb 2 --tokens 1024 --rounds 3 --variants as-is,nice-readers|--gb 2 --tokens 4096 --rounds 2 --variants as-is,stream-all}"
    for shape in "${shapes[@]}"; do
        [ "$SECONDS" -gt "${DEADLINE:-99999}" ] && { echo "=== $shape not started: past $DEADLINE s"; break; }
        tag=knobs$(echo "$shape" | tr -d ' -,')
        timeout ${EACH:-240} python3 benchmarks/compare_knobs.py $shape --dir /tmp/lw-$(echo "$shape" | cut -d' ' -f1-4 | tr -d ' -') \
            --out "$W/$tag.md" > "$W/$tag.log" 2>&1
        echo "=== compare_knobs.py $shape (exit $?, at $SECONDS s)"; tail -12 "$W/$tag.log"
    done ;;
esac
tar czf "$OUT/session48-$PART.tgz" -C "$W" . 2>/dev/null
