#!/usr/bin/env bash
# Device session 57, one H200: the end-to-end extract with 0f11845's digests (a tensor of 16 MiB
# or more hashed on several threads as it is written) against $BASE's code (default .base57:
# e104fac's src/ and benchmarks/, the commit before; carry it).
#   part "e2e": gpu_parts.sh's e2e_ab: 16 x 256 (tensors under 16 MiB: unchanged, the control) and
#     16 x 4096, this checkout and $BASE in turns, $RUNS pairs (default 3), $REPEAT rounds each.
# `bash benchmarks/gpu_session57.sh e2e`. Logs packed into $OUT/session57-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 57 e2e "$@"
BASE=${BASE:-.base57}
case "$PART" in
e2e)
    e2e_ab "$BASE" ;;
esac
tar czf "$OUT/session57-$PART.tgz" -C "$W" . 2>/dev/null
