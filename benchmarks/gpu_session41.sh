#!/usr/bin/env bash
# Device session 41, two H200s: where a torchrun job's start-up goes, and why the capture costs more
# with the model over two GPUs than on one.
#   part "dist": benchmarks/distributed.py, parts extract and test, $REPEAT rounds (default 1), with
#     each process's start-up stages (manifest stats' `startup`) in seconds after its launch.
#   part "prof2" / "prof1": benchmarks/extract_overhead.py with the model over 2 GPUs / on GPU 0,
#     shapes 1x128, 1x512, 4x128, 4x512, 5 rounds, and its where-the-time-goes part at $PROFILE
#     (default 4x128): the hooks' functions under cProfile, torch.profiler traces of a plain and a
#     captured forward (kept, gzipped, with the logs).
# Parts run one after another: `bash benchmarks/gpu_session41.sh dist prof2 prof1`. Logs packed
# into $OUT/session41-<part>.tgz.
. "$(dirname "$0")/gpu_parts.sh" 41 dist "$@"
filter() { grep -v 'tokenizer\|bos_token\|eos_token\|Warning\|warn_once'; }
case "$PART" in
dist)
    python3 -m layerwise check builtin:minimax-m2 > "$W/check.log" 2>&1  # fills layerwise's bytecode cache
    timeout ${BUDGET:-300} python3 benchmarks/distributed.py --parts extract,test --repeat ${REPEAT:-1} \
        --out "$W/dist" --command-timeout 200 --dist-timeout 200 > "$W/distributed.log" 2>&1
    echo "=== distributed (exit $?, at $SECONDS s)"; filter < "$W/distributed.log" | tail -20 | cut -c1-400 ;;
prof1|prof2)
    gpus=${PART#prof}
    timeout ${PROF:-150} python3 benchmarks/extract_overhead.py --gpus "$gpus" --tokens 128,512 --batches 1,4 \
        --reps 5 --profile "${PROFILE:-4x128}" --e2e '' --out "$W/run" > "$W/overhead.log" 2>&1
    echo "=== capture on $gpus GPU(s), profiled at ${PROFILE:-4x128} (exit $?, at $SECONDS s)"
    grep -A6 "^capture overhead" "$W/overhead.log"
    grep '"layerwise_functions"' "$W/overhead.log" | python3 -c "
import json, sys
for line in sys.stdin:
    d = json.loads(line)
    print('forward wall', round(d['forward_wall_ms'], 2), 'ms; completion thread', round(d['completion_thread_cpu_ms_per_forward'], 2), 'ms cpu')
    for k, v in sorted(d['layerwise_functions'].items(), key=lambda kv: -kv[1]['cumtime_ms_per_forward']):
        print(' ', k, {a: round(b, 3) for a, b in v.items()})
    print(' gpu', d['gpu_timeline'])" ;;
esac
tar czf "$OUT/session41-$PART.tgz" -C "$W" . 2>/dev/null
