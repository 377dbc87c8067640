#!/usr/bin/env bash
# Device session 72, one H200: the manifest's entries ordered and encoded while an extract's last
# files are written (ManifestDraft), against the code before it (20bea99, carried as $BASE,
# default .base72: `git archive 20bea99 src benchmarks`, git-ignored).
#   part "ab": gpu_parts.sh's e2e_ab against $BASE: the end-to-end extracts (16 x 256, 16 x 4096,
#     $REPEAT rounds each, default 5) with this checkout's code and the base's taking turns, $RUNS
#     pairs (default 3), none started after $DEADLINE s.
#   part "gputests": the whole GPU suite (gpu_suite, -k $GK: empty, every test).
#   part "table": gpu_parts.sh's capture_table on 1 GPU, $RUNS runs (default 1).
# `RUNS=3 bash benchmarks/gpu_session72.sh ab`. Logs packed into $OUT/session72-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 72 ab "$@"
case "$PART" in
ab)
    RUNS=${RUNS:-3} e2e_ab "${BASE:-.base72}" ;;
gputests)
    GK=${GK-} GT=${GT:-200} gpu_suite ;;
table)
    capture_table 1 1 ;;
esac
tar czf "$OUT/session72-$PART.tgz" -C "$W" . 2>/dev/null
