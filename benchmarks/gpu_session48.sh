#!/usr/bin/env bash
# Device session 48, one H200 (run at af384ae; its nice-readers setting was removed in c1215ea,
# so later commits need TVARIANTS / SHAPES without it): whether compare's measuring thread, on
# 1024-token tensors, waits for a CPU or is blocked (compare_trace.py's schedstat figures), and the
# reader threads made nicer.
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
    cmp_trace "${TVARIANTS:-as-is,nice-readers}" ;;
knobs)
    IFS='|' read -ra shapes <<< "${SHAPES:---gb 2 --tokens 1024 --rounds 3 --variants as-is,nice-readers|--gb 2 --tokens 4096 --rounds 2 --variants as-is,stream-all}"
    cmp_knobs "${shapes[@]}" ;;
esac
tar czf "$OUT/session48-$PART.tgz" -C "$W" . 2>/dev/null
