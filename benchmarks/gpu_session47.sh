#!/usr/bin/env bash
# Device session 47, one H200: compare's readers with every tensor of 1 MiB or more bound for the
# GPU read with pread into pinned staging buffers (compare_knobs.py's "stream-all"), against the
# code as it is (read through safetensors' memory map), traced and timed.
#   part "trace": compare_trace.py --variants as-is,stream-all on 1 GB runs of 1024-token tensors.
#   part "knobs": compare_knobs.py --variants $VARIANTS (default as-is,stream-all) on each of
#     SHAPES (';' between shapes; default 2 GB runs of 1024-token tensors, 3 rounds, then of
#     4096-token tensors, 2 rounds); no shape started after $DEADLINE seconds.
# Parts run one after another: `bash benchmarks/gpu_session47.sh trace knobs`. Logs packed into
# $OUT/session47-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 47 knobs "$@"
case "$PART" in
trace)
    cmp_trace as-is,stream-all ;;
knobs)
    IFS=';' read -ra shapes <<< "${SHAPES:---gb 2 --tokens 1024 --rounds 3;--gb 2 --tokens 4096 --rounds 2}"
    cmp_knobs "${shapes[@]/%/ --variants ${VARIANTS:-as-is,stream-all}}" ;;
esac
tar czf "$OUT/session47-$PART.tgz" -C "$W" . 2>/dev/null
