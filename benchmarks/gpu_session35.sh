#!/usr/bin/env bash
# Device session 35: what moves a layer's weights from the page cache onto the GPUs when one
# process or two (torchrun's ranks, each on its own GPU) read at once.
#   part "read": benchmarks/read_paths.py: the page-cache copy alone, the host-to-GPU link alone,
#     layerwise's read (pinned staging) and DMA from the page cache registered with CUDA, 4/8/16
#     threads, 1 and 2 processes, 8 GB a process. On the 2-GPU host each process has a GPU.
#   part "dist": issue 12's extract and layer test on 1 process vs 2 ranks (benchmarks/distributed.py),
#     REPEAT rounds (default 2), each rank's timeline, as session 32 ran it; the layer test once per
#     reading-thread count in READS (default "8,16": LAYERWISE_READ_THREADS), taking turns.
#   part "dist_ab": the layer test alone (1 process vs 2 ranks), ROUNDS rounds (default 2; none
#     started after DEADLINE seconds), taking turns between the code in $BASE (default .base: an earlier commit's src/ with this checkout's
#     benchmarks/distributed.py and synthetic.py beside it; carry it) and this checkout's, e.g.
#       mkdir .base && git archive 62bd395 src benchmarks | tar -x -C .base
#       cp benchmarks/distributed.py benchmarks/synthetic.py .base/benchmarks/
#   part "cmp_stream": benchmarks/compare_throughput.py on 4 GB runs of 25 MB tensors (4096 tokens, no
#     logits to speak of: a layer test's runs), compare warm with tensors of 64, 16 and 4 MiB or more
#     streamed to the GPU, taking turns, 3 rounds.
#   part "readers": the same kind of runs, 2 GB each: compare's reading alone (read_units), verified
#     and not, 1, 8 and 16 threads, beside compare warm with and without verification.
# Parts run one after another: `bash benchmarks/gpu_session35.sh read dist`. Logs packed into
# $OUT/session35-<part>.tgz. The device image has no blake3: its wheel is carried in .wheels/.
. "$(dirname "$0")/gpu_parts.sh" 35 read "$@"
filter() { grep -v 'tokenizer\|bos_token\|eos_token\|Warning\|warn_once'; }
case "$PART" in
read)
    timeout ${BUDGET:-300} python3 benchmarks/read_paths.py --gb ${GB:-8} --threads ${THREADS:-4,8,16} \
        --repeat ${REPEAT:-2} --modes ${MODES:-pread,h2d,copy,register,register256} --out "$W/read" > "$W/read.log" 2>&1
    echo "=== read paths (exit $?)"; grep -v '^|' "$W/read.log" | tail -30; rm -rf /tmp/lw-read-paths ;;
dist)
    python3 -m layerwise check builtin:minimax-m2 > "$W/check.log" 2>&1  # fills layerwise's bytecode cache
    timeout ${BUDGET:-540} python3 benchmarks/distributed.py --parts test,extract --repeat ${REPEAT:-2} \
        --read-threads "${READS:-8,16}" --out "$W/dist" --command-timeout 200 --dist-timeout 200 > "$W/distributed.log" 2>&1
    echo "=== distributed (exit $?)"; filter < "$W/distributed.log" | tail -14 ;;
cmp_stream)
    cp BENCHMARKS.md "$W/cmp.md"
    timeout ${BUDGET:-240} python3 benchmarks/compare_throughput.py --gb ${GB:-4} --tokens 4096 --vocab 8 \
        --stream-mb 64,16,4 --stream-rounds 3 --dir /tmp/lw-cmp-stream --out "$W/cmp.md" > "$W/cmp.log" 2>&1
    echo "=== compare by streaming size (exit $?)"; tail -14 "$W/cmp.log" ;;
readers)
    cp BENCHMARKS.md "$W/cmp.md"
    timeout ${BUDGET:-90} python3 benchmarks/compare_throughput.py --gb ${GB:-2} --tokens 4096 --vocab 8 \
        --readers 1,8,16 --dir /tmp/lw-cmp-readers --out "$W/cmp.md" > "$W/cmp.log" 2>&1
    echo "=== compare's reading alone (exit $?)"; tail -16 "$W/cmp.log" ;;
dist_ab)
    python3 -m layerwise check builtin:minimax-m2 > "$W/check.log" 2>&1  # both codes' bytecode cached first
    PYTHONPATH=${BASE:-.base}/src:$PYTHONPATH python3 -m layerwise check builtin:minimax-m2 > "$W/check_base.log" 2>&1
    for i in $(seq "${ROUNDS:-2}"); do
        [ "$SECONDS" -gt "${DEADLINE:-9999}" ] && { echo "=== round $i not started: past $DEADLINE s"; break; }
        for code in "${BASE:-.base}" .; do
            name=$( [ "$code" = . ] && echo new || echo base )
            timeout ${EACH:-200} python3 "$code/benchmarks/distributed.py" --parts test --repeat 1 \
                --out "$W/dist_$name$i" --command-timeout 150 --dist-timeout 150 > "$W/dist_$name$i.log" 2>&1
            echo "=== layer test, $name code, round $i (exit $?, at $SECONDS s)"; grep -A3 '^test --layer' "$W/dist_$name$i.log" | cut -c1-330
        done
    done ;;
esac
tar czf "$OUT/session35-$PART.tgz" -C "$W" . 2>/dev/null
