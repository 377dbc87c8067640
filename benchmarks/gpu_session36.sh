#!/usr/bin/env bash
# Device session 36: what bounds compare on a layer test's 25 MB tensors, and the fix measured.
#   part "reads": benchmarks/tensor_reads.py (2 GB of 25 MB tensors, warm): the paths a tensor can
#     take from the page cache (mapped / pread / pinned / pieces), 1, 8 and 16 threads, verified and
#     not, with and without the measuring thread's copy to cuda:0; then compare_throughput.py
#     --readers 1,8,16 (read_units alone, as the code reads).
#   part "gputests": tests/gpu/test_gpu_compare.py, test_gpu_replay.py and tests/test_readahead.py.
#   part "cmp_ab": benchmarks/compare_throughput.py, taking turns between the code in $BASE (default
#     .base36: the previous commit's src/ with this checkout's compare_throughput.py and synthetic.py
#     beside it; carry it) and this checkout's, ROUNDS rounds (default 2), each cold and warm, on
#     each of SHAPES (compare_throughput.py's arguments, ';' between shapes; default 4 GB runs of
#     25 MB tensors, a layer test's at 4096 tokens, and 2 GB runs with MiniMax-M2's logits); no
#     round starts after DEADLINE seconds of the part (default none), so its logs come back. As
#     session 37 measured a branch against 1c6719d: BASE=.base37 ROUNDS=3 DEADLINE=290 SHAPES="--gb 2
#     --tokens 1024 --vocab 8;--gb 4 --tokens 4096 --vocab 8" ... gputests cmp_ab
#   part "dist_ab": gpu_session35.sh dist_ab with BASE defaulting to .base36 (carry it, with this
#     checkout's distributed.py and synthetic.py in its benchmarks/).
# Parts run one after another: `bash benchmarks/gpu_session36.sh reads`. Logs packed into
# $OUT/session36-<part>.tgz. The device image has no blake3: its wheel is carried in .wheels/.
. "$(dirname "$0")/gpu_parts.sh" 36 reads "$@"
cat "$W/gpus.txt"
case "$PART" in
reads)
    timeout ${BUDGET:-300} python3 benchmarks/tensor_reads.py --gb ${GB:-2} --threads ${THREADS:-1,8,16} \
        --repeat ${REPEAT:-1} --out "$W/reads" > "$W/reads.log" 2>&1
    echo "=== tensor reads (exit $?)"; grep -v '^|' "$W/reads.log" | tail -50
    cp BENCHMARKS.md "$W/cmp.md"
    timeout ${BUDGET2:-120} python3 benchmarks/compare_throughput.py --gb ${GB:-2} --tokens 4096 --vocab 8 \
        --readers 1,8,16 --dir /tmp/lw-cmp-readers --out "$W/cmp.md" > "$W/cmp.log" 2>&1
    echo "=== compare's reading alone (exit $?)"; tail -16 "$W/cmp.log" ;;
gputests)
    timeout ${BUDGET:-240} python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_compare.py \
        tests/gpu/test_gpu_replay.py tests/test_readahead.py > "$W/gputests.log" 2>&1
    echo "=== GPU tests (exit $?)"; tail -5 "$W/gputests.log" ;;
cmp_ab)
    IFS=';' read -ra shapes <<< "${SHAPES:---gb 4 --tokens 4096 --vocab 8;--gb 2 --tokens 4096}"
    for i in $(seq "${ROUNDS:-2}"); do
        [ "$SECONDS" -gt "${DEADLINE:-99999}" ] && { echo "=== round $i not started: past $DEADLINE s"; break; }
        for code in "${BASE:-.base36}" .; do
            name=$( [ "$code" = . ] && echo new || echo base )
            for shape in "${shapes[@]}"; do
                tag=$name$i-$(echo "$shape" | tr -d ' -')
                timeout ${EACH:-150} python3 "$code/benchmarks/compare_throughput.py" $shape \
                    --dir /tmp/lw-cmp-ab$(echo "$shape" | tr -d ' -') --out "$W/$tag.md" > "$W/$tag.log" 2>&1
                echo "=== compare, $name code, round $i, $shape (exit $?, at $SECONDS s)"
                grep -v '^wrote' "$W/$tag.log" | tail -9
            done
        done
    done ;;
dist_ab)  # gpu_session35.sh's part, with this session's base code (its logs: session35-dist_ab.tgz)
    BASE=${BASE:-.base36} bash benchmarks/gpu_session35.sh dist_ab ;;
esac
tar czf "$OUT/session36-$PART.tgz" -C "$W" . 2>/dev/null
