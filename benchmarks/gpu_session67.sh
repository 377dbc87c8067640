#!/usr/bin/env bash
# Device session 67, one H200: does the storage read faster with more requests in flight, and where
# compare stands at this code.
#   part "disk": isolated_profile.py once at this checkout (it writes the 24.5 GB checkpoint to
#     /tmp/lw-isolated-ckpt first), the block device's settings, then cold_reads.py on the first
#     $GB GB of that checkpoint (default 6): one thread against the prefetch's reader with 4, 8, 16
#     and 32 threads of 64 MiB reads and 8 and 16 of 8 MiB, $ROUNDS rounds in turns (default 2).
#   part "cmp": compare_knobs.py's as-is setting (compare / raw cold read) on 2 GB runs of 1024-token
#     tensors, of 4096-token tensors (streamed) and of 512-token tensors with logits of a
#     200,064-token vocabulary, $ROUNDS rounds each (default 3), none started after $DEADLINE s.
#   part "cmpab": compare_knobs.py's as-is setting on the 1024-token and the logits shapes above, this
#     checkout's code and $BASE's (default .base67: 5b67106's src/, before one sync a metrics block,
#     with this checkout's benchmarks/; carry it) in turns, $ALT turns (default 2) of $ROUNDS rounds
#     (default 2) each, none started after $DEADLINE s; then the GPU compare tests (gpu_suite, -k compare).
#   part "isoab": gpu_parts.sh's iso_ab against $BASE (its prefetch reads on 4 threads, this code's on
#     8 here; and the metrics' syncs), --no-joint, $RUNS rounds (default 2).
#   part "trace": compare_trace.py on 1 GB runs of 512-token tensors with logits of a 200,064-token
#     vocabulary (the shape compare is slowest on), as it is: where the measuring thread's time goes.
#   part "gputests": the GPU test suite (tests/gpu), $GT seconds at most (default 300).
#   part "mbatch": metrics_batch.py on 116 pairs of 512 x 3072 (one pair a layer of the trace's
#     runs): tensor_metrics pair by pair against batched passes of 8, 32 and 116 pairs, 7 rounds.
# `bash benchmarks/gpu_session67.sh disk cmp`. Logs packed into $OUT/session67-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 67 disk "$@"
case "$PART" in
disk)
    python3 -m layerwise check builtin:minimax-m2 > "$W/check.log" 2>&1
    timeout ${ISO:-240} python3 benchmarks/isolated_profile.py --src src --no-joint --out "$W/iso" > "$W/iso.log" 2>&1
    echo "=== isolated profile, src (exit $?, at $SECONDS s)"; tail -12 "$W/iso.log"
    { lsblk -o NAME,TYPE,SIZE,ROTA,MODEL,SCHED,RQ-SIZE,RA,MIN-IO,OPT-IO; findmnt -T /tmp
      for q in /sys/block/*/queue; do echo "$q: nr_requests $(cat $q/nr_requests) max_sectors_kb $(cat $q/max_sectors_kb)" \
        "read_ahead_kb $(cat $q/read_ahead_kb) scheduler $(cat $q/scheduler)"; done; } > "$W/blockdev.txt" 2>&1
    cat "$W/blockdev.txt"
    timeout ${COLD:-200} python3 benchmarks/cold_reads.py --dir /tmp/lw-isolated-ckpt --gb ${GB:-6} \
        --threads 4,8,16,32 --chunk-mb 64 --repeat ${ROUNDS:-2} --out "$W/cold" > "$W/cold.log" 2>&1
    echo "=== cold_reads.py, 64 MiB (exit $?, at $SECONDS s)"; cat "$W/cold.log"
    timeout ${COLD:-200} python3 benchmarks/cold_reads.py --dir /tmp/lw-isolated-ckpt --gb ${GB:-6} \
        --threads 8,16 --chunk-mb 8 --repeat ${ROUNDS:-2} --out "$W/cold8" > "$W/cold8.log" 2>&1
    echo "=== cold_reads.py, 8 MiB (exit $?, at $SECONDS s)"; cat "$W/cold8.log" ;;
cmp)
    R=${ROUNDS:-3}
    cmp_knobs "--gb 2 --tokens 1024 --rounds $R --variants as-is" "--gb 2 --tokens 4096 --rounds $R --variants as-is" \
        "--gb 2 --tokens 512 --vocab 200064 --rounds $R --variants as-is" ;;
cmpab)
    for shape in "--tokens 1024" "--tokens 512 --vocab 200064"; do
        tag=$(echo "$shape" | tr -d ' -')
        for i in $(seq ${ALT:-2}); do
            for code in . "${BASE:-.base67}"; do
                [ "$SECONDS" -gt "${DEADLINE:-99999}" ] && { echo "=== $code $shape turn $i not started: past $DEADLINE s"; continue; }
                name=$tag-$i-$(basename "$code")
                timeout ${EACH:-200} python3 "$code/benchmarks/compare_knobs.py" --gb 2 $shape --rounds ${ROUNDS:-2} \
                    --variants as-is --dir "/tmp/lw-ab$tag" --out "$W/$name.md" > "$W/$name.log" 2>&1
                echo "=== compare_knobs.py $shape, code $code, turn $i (exit $?, at $SECONDS s)"; tail -4 "$W/$name.log"
            done
        done
    done
    GK=compare GT=${GT:-200} gpu_suite ;;
isoab)
    iso_ab "${BASE:-.base67}" ;;
trace)
    timeout ${EACH:-200} python3 benchmarks/compare_trace.py --gb 1 --tokens 512 --vocab 200064 --variants as-is \
        --dir /tmp/lw-trace512 --out "$W/trace" > "$W/trace.log" 2>&1
    echo "=== compare_trace.py, 512 tokens + logits (exit $?, at $SECONDS s)"
    grep -v '^wrote\|USDT\|warn' "$W/trace.log" | tail -40
    gzip -f "$W"/trace/trace-*.json ;;
gputests)
    gpu_suite ;;
mbatch)
    timeout ${EACH:-200} python3 benchmarks/metrics_batch.py --pairs 116 --tokens 512 --batch 8,32,116 --rounds 7 \
        --out "$W/mbatch" > "$W/mbatch.log" 2>&1
    echo "=== metrics_batch.py (exit $?, at $SECONDS s)"; cat "$W/mbatch.log" ;;
esac
tar czf "$OUT/session67-$PART.tgz" -C "$W" . 2>/dev/null
