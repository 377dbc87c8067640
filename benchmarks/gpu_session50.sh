#!/usr/bin/env bash
# Device session 50 (run at 1e2e185, where as-is was 0.5 ms; 0.2 ms since 9646647), one H200: Python's GIL switch interval while compare reads ahead
# (readahead.SWITCH_INTERVAL) at 0.5 ms (as it is), 0.2 ms and 0.1 ms, on 1024-token tensors.
#   part "knobs": compare_knobs.py --variants $VARIANTS (default as-is,0.2ms,0.1ms) on 2 GB runs of
#     1024-token tensors, $ROUNDS rounds (default 3).
# Logs packed into $OUT/session50-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 50 knobs "$@"
case "$PART" in
knobs)
    cmp_knobs "--gb 2 --tokens 1024 --rounds ${ROUNDS:-3} --variants ${VARIANTS:-as-is,0.2ms,0.1ms}" ;;
esac
tar czf "$OUT/session50-$PART.tgz" -C "$W" . 2>/dev/null
