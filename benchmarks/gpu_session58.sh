#!/usr/bin/env bash
# Device session 58, one H200: the end-to-end extract with the files indexed for the manifest
# while the last are written (RunWriter.close) against $BASE's code (default .base58: ae2ef38's
# src/ and benchmarks/, the commit before; carry it).
#   part "e2e": gpu_parts.sh's e2e_ab: 16 x 256 and 16 x 4096, this checkout and $BASE in turns,
#     $RUNS pairs (default 3), $REPEAT rounds each (default 5).
# `bash benchmarks/gpu_session58.sh e2e`. Logs packed into $OUT/session58-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 58 e2e "$@"
BASE=${BASE:-.base58}
case "$PART" in
e2e)
    e2e_ab "$BASE" ;;
esac
tar czf "$OUT/session58-$PART.tgz" -C "$W" . 2>/dev/null
