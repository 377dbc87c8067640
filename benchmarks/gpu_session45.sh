#!/usr/bin/env bash
# Device session 45, one H200: compare's readers copying to the GPU on streams of their own
# (readahead.COPY_STREAM) against the default stream, where the measuring thread works.
#   part "gputests": tests/gpu/test_gpu_compare.py and tests/test_readahead.py; then the test of a
#     unit let go while the caller's work still reads it, run with readahead._lend taken out: it
#     must fail there (the test can fail), logged as lend-removed.log.
#   part "knobs": benchmarks/compare_knobs.py --variants as-is,one-stream on each of SHAPES
#     (compare_knobs.py's arguments, ';' between shapes; default 2 GB runs of 1024-token tensors,
#     3 rounds, then 4096-token tensors, 2 rounds); no shape started after $DEADLINE seconds.
# Parts run one after another: `bash benchmarks/gpu_session45.sh gputests knobs`. Logs packed into
# $OUT/session45-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 45 knobs "$@"
case "$PART" in
gputests)
    timeout ${BUDGET:-200} python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_compare.py \
        tests/test_readahead.py > "$W/gputests.log" 2>&1
    echo "=== GPU tests (exit $?)"; tail -5 "$W/gputests.log"
    timeout 120 python3 -c "
import sys, pytest
from layerwise import readahead
readahead._lend = lambda tensors: None
sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', 'tests/gpu/test_gpu_compare.py', '-k', 'let_go and True']))
" > "$W/lend-removed.log" 2>&1
    echo "=== the same test without readahead._lend (exit $?: 1 expected)"; tail -3 "$W/lend-removed.log" ;;
knobs)
    IFS=';' read -ra shapes <<< "${SHAPES:---gb 2 --tokens 1024 --rounds 3;--gb 2 --tokens 4096 --rounds 2}"
    for shape in "${shapes[@]}"; do
        [ "$SECONDS" -gt "${DEADLINE:-99999}" ] && { echo "=== $shape not started: past $DEADLINE s"; break; }
        tag=knobs$(echo "$shape" | tr -d ' -')
        timeout ${EACH:-240} python3 benchmarks/compare_knobs.py $shape --variants as-is,one-stream \
            --dir /tmp/lw-$tag --out "$W/$tag.md" > "$W/$tag.log" 2>&1
        echo "=== compare_knobs.py $shape (exit $?, at $SECONDS s)"; tail -12 "$W/$tag.log"
    done ;;
esac
tar czf "$OUT/session45-$PART.tgz" -C "$W" . 2>/dev/null
