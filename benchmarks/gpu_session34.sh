#!/usr/bin/env bash
# Device session 34 (one H200): blake3 digests (format version 3) and the run writer's own
# process (writerproc: the capture's host buffers in shared memory registered with CUDA, read by a
# process of its own that checks, hashes and writes every file) against this process's writer
# threads, side by side.
#   part "e2e": the GPU tests that write runs (extract bit-identical to output_hidden_states over
#     the GPUs, streamed, replayed), then benchmarks/extract_overhead.py end to end: 16 x 256 and
#     16 x 4096 tokens of 8 MiniMax-M2-size layers, 3 rounds each, writer process / threads, 8 and
#     16 writer threads.
#   part "cpu": benchmarks/digest_speed.py: what a byte written costs the CPU (NaN/Inf check,
#     sha256, blake3 from a wheel carried in .wheels/ where there is one, page-cache write), 1, 8
#     and 16 threads, and the CPU's layout.
#   part "compare": benchmarks/compare_throughput.py twice (compare cold and warm against a raw read
#     of the same files, 1 GB runs), the runs' digests blake3 (format version 3).
#   part "compare_ab": compare_throughput.py with an earlier commit's code and this checkout's,
#     taking turns (ROUNDS rounds, default 2), each on runs of its own; the earlier code's src/ and
#     benchmarks/ in $BASE (default .base, ignored by git; carry it), e.g.
#       mkdir .base && git archive 29fd079 src benchmarks | tar -x -C .base
#   part "iso": the isolated profile end to end (benchmarks/isolated_profile.py), as session 32 ran it.
#   part "capture": the capture overhead rows (host copies, the sink dropping them) with the host
#     buffers in shared registered memory (LAYERWISE_WRITER unset) and in torch's pinned memory
#     (LAYERWISE_WRITER=threads), one after the other, each with its own baseline in its rounds.
# On the 2-GPU host: `GPUS=2 bash benchmarks/gpu_session34.sh e2e` (the model over both GPUs; the
# GPU tests that need two GPUs run too). Parts run one after another:
# `bash benchmarks/gpu_session34.sh cpu capture`. Logs packed into $OUT/session34-<part>.tgz.
# The device image has no blake3: put its wheel in .wheels/ first (ignored by git; carry it), e.g.
#   pip download blake3 --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_17_x86_64 -d .wheels
set -uo pipefail
if [ $# -gt 1 ]; then for p in "$@"; do bash "$0" "$p"; done; exit 0; fi
PART=${1:-e2e}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; W=/tmp/s34-$PART; mkdir -p "$W"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
if ! python3 -c "import blake3" 2> /dev/null; then  # the image lacks it: the wheel carried in .wheels/
    pip install -q --no-index --target /tmp/pyextra .wheels/blake3-*.whl > /dev/null 2>&1
    export PYTHONPATH=$PYTHONPATH:/tmp/pyextra
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$W/gpus.txt" 2>&1
nproc >> "$W/gpus.txt"; python3 -VV >> "$W/gpus.txt"; git log -1 --format=%h >> "$W/gpus.txt" 2>/dev/null
case "$PART" in
e2e)
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_extract.py tests/gpu/test_gpu_replay.py \
        tests/gpu/test_gpu_compare.py tests/test_writerproc.py > "$W/gputests.log" 2>&1
    echo "=== GPU tests (exit $?)"; tail -3 "$W/gputests.log"
    timeout 330 python3 benchmarks/extract_overhead.py --gpus "${GPUS:-1}" --max-batch-tokens 0 --profile '' \
        --e2e 16x256,16x4096 --e2e-repeat 3 --writer process,threads --writer-threads "${WRITERS:-8,16}" \
        --out "$W/e2e" --work /tmp/lw-e2e > "$W/e2e.log" 2>&1
    echo "=== end to end (exit $?)"; grep '^extract' "$W/e2e.log" | cut -c1-400 ;;
cpu)
    lscpu > "$W/lscpu.txt" 2>&1
    timeout 120 python3 benchmarks/digest_speed.py --threads 1,8,16 --out "$W/digest" > "$W/digest.log" 2>&1
    echo "=== digest speed (exit $?)"; tail -8 "$W/digest.log" ;;
compare)
    cp BENCHMARKS.md "$W/compare_bench.md"
    for i in 1 2; do
        timeout 150 python3 benchmarks/compare_throughput.py --gb 1 --dir /tmp/lw-cmp --out "$W/compare_bench.md" \
            > "$W/compare$i.log" 2>&1
        echo "=== compare, run $i (exit $?)"; tail -10 "$W/compare$i.log"
    done ;;
compare_ab)
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_gpu_compare.py tests/test_readahead.py \
        > "$W/gputests.log" 2>&1
    echo "=== GPU compare tests (exit $?)"; tail -3 "$W/gputests.log"
    for i in $(seq "${ROUNDS:-2}"); do
        for code in "${BASE:-.base}" .; do
            name=$( [ "$code" = . ] && echo new || echo base ); cp BENCHMARKS.md "$W/compare_$name.md"
            timeout 150 python3 "$code/benchmarks/compare_throughput.py" --gb 1 --out "$W/compare_$name.md" \
                > "$W/compare_$name$i.log" 2>&1
            echo "=== compare, $name code, round $i (exit $?)"; tail -9 "$W/compare_$name$i.log" | grep -v '^wrote'
        done
    done ;;
iso)
    python3 -m layerwise check builtin:minimax-m2 > "$W/check.log" 2>&1  # fills layerwise's bytecode cache
    CUDA_VISIBLE_DEVICES=0 timeout ${ISO:-480} python3 benchmarks/isolated_profile.py --out "$W/iso" \
        > "$W/isolated.log" 2>&1
    echo "=== isolated (exit $?)"; grep -v 'tokenizer\|bos_token\|eos_token\|Warning\|warn_once' "$W/isolated.log" | tail -14 ;;
capture)
    for mode in process threads; do
        if [ $mode = threads ]; then export LAYERWISE_WRITER=threads; else unset LAYERWISE_WRITER; fi
        timeout 270 python3 benchmarks/extract_overhead.py --gpus 1 --tokens 128,512,1024,4096 --batches 1,4,16 \
            --max-batch-tokens 16384 --reps 5 --profile '' --e2e '' --out "$W/cap_$mode" > "$W/cap_$mode.log" 2>&1
        echo "=== capture, host buffers of the $mode writer (exit $?)"; grep '^|' "$W/cap_$mode.log" | tail -13
    done ;;
esac
tar czf "$OUT/session34-$PART.tgz" -C "$W" . 2>/dev/null
