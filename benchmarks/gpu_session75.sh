#!/usr/bin/env bash
# Device session 75, one H200: a command's page-locked host memory made pageable when its work
# ended (shmbuffers.unpin_all), the readers' staging buffers registered regions instead of torch's
# pinned memory, and a layer test pinning ahead what one layer captures (not 1 GiB), against the
# code before it ($BASE, default .base75: `git archive cc52e46 src benchmarks`, git-ignored; carry it).
#   part "gputests": the GPU tests of this change (-k $GK, default the staging buffers' test and
#     every command in a fresh process), $GT seconds at most (default 200).
#   part "isoab": gpu_parts.sh's iso_ab against $BASE, $RUNS rounds (default 1), none started
#     after $DEADLINE s (the order alternates by round; BASE_FIRST=1 puts the base first).
#   part "exit": command_exit.py on the isolated profile's checkpoint (made by part "isoab"): the
#     streamed extract, then the layer test, this checkout's code and $BASE's taking turns,
#     $ROUNDS fresh processes each (default 2): each step after the manifest, and what was still
#     page-locked when `cli.main` returned.
# Parts run one after another: `bash benchmarks/gpu_session75.sh gputests isoab exit`. Logs packed
# into $OUT/session75-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 75 isoab "$@"
BASE=${BASE:-.base75}
CKPT=/tmp/lw-isolated-ckpt; WORK=/tmp/lw-isolated-work
case "$PART" in
gputests)
    GK=${GK-staging or every_command} GT=${GT:-200} gpu_suite ;;
isoab)
    RUNS=${RUNS:-1} iso_ab "$BASE" ;;
exit)
    common=(--dtype bf16 --device cuda:0 --overwrite)
    for src in src "$BASE/src"; do
        name=${src//\//_}
        timeout ${EACH:-120} python3 benchmarks/command_exit.py --src "$src" --rounds "${ROUNDS:-2}" \
            --run $WORK/exit-ref --out "$W/extract-$name" -- extract $CKPT --stream --prompts $WORK/prompts.jsonl \
            --out $WORK/exit-ref "${common[@]}" > "$W/extract-$name.log" 2>&1
        echo "=== command_exit.py, streamed extract, $src (exit $?, at $SECONDS s)"; tail -9 "$W/extract-$name.log"
    done
    for src in src "$BASE/src"; do
        name=${src//\//_}
        timeout ${EACH:-120} python3 benchmarks/command_exit.py --src "$src" --rounds "${ROUNDS:-2}" \
            --run $WORK/exit-test/isolated --out "$W/test-$name" -- test $CKPT --reference $WORK/exit-ref \
            --test-type single --layer all --out $WORK/exit-test "${common[@]}" > "$W/test-$name.log" 2>&1
        echo "=== command_exit.py, layer test, $src (exit $?, at $SECONDS s)"; tail -9 "$W/test-$name.log"
    done ;;
esac
tar czf "$OUT/session75-$PART.tgz" -C "$W" . 2>/dev/null
