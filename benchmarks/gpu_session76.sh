#!/usr/bin/env bash
# Device session 76, one H200: the figures of stop 47's code measured again at this checkout, and
# the isolated profile against a second, stricter floor (the checkpoint read by 4 readers).
#   part "table": gpu_parts.sh's capture_table on 1 GPU, $RUNS runs (default 1), none started after
#     $DEADLINE s, each within $TABLE s (default 300).
#   part "isoab": gpu_parts.sh's iso_ab against $BASE (default .base75: `git archive cc52e46 src
#     benchmarks`, git-ignored; carry it), $RUNS rounds (default 2; BASE_FIRST=1 puts the base first).
#   part "exit": command_exit.py on a cold page cache (--cold: the isolated profile's checkpoint, made
#     by part "isoab", dropped before each process): the streamed extract, this checkout's code and
#     $BASE's taking turns, $ROUNDS fresh processes each (default 2).
# Parts run one after another: `bash benchmarks/gpu_session76.sh table isoab exit`. Logs packed into
# $OUT/session76-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 76 isoab "$@"
BASE=${BASE:-.base75}
CKPT=/tmp/lw-isolated-ckpt; WORK=/tmp/lw-isolated-work
case "$PART" in
table)
    capture_table 1 1 ;;
isoab)
    RUNS=${RUNS:-2} iso_ab "$BASE" ;;
exit)
    for round in $(seq "${ROUNDS:-2}"); do
        for src in src "$BASE/src"; do
            name=${src//\//_}-$round
            timeout ${EACH:-100} python3 benchmarks/command_exit.py --src "$src" --rounds 1 --cold $CKPT \
                --run $WORK/exit-ref --out "$W/extract-$name" -- extract $CKPT --stream --prompts $WORK/prompts.jsonl \
                --out $WORK/exit-ref --dtype bf16 --device cuda:0 --overwrite > "$W/extract-$name.log" 2>&1
            echo "=== command_exit.py --cold, streamed extract, $src, round $round (exit $?, at $SECONDS s)"
            tail -7 "$W/extract-$name.log"
        done
    done ;;
esac
tar czf "$OUT/session76-$PART.tgz" -C "$W" . 2>/dev/null
