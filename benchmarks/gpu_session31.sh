#!/usr/bin/env bash
# Device session 31 (one H200): where an extract's time goes after its forward pass
# (benchmarks/extract_overhead.py, end to end only: 16 x 256 and 16 x 4096 tokens of 8
# MiniMax-M2-size layers, 3 rounds each, the wall time of the whole call against the floor, with
# a trace of every file written), with 4, 8 (the default on 8 cores or more) and 16 writer threads
# side by side, each under the interpreter's default GIL switch interval (5 ms) and 0.5 ms.
# On the 2-GPU host it ran as `GPUS=2 WRITERS=8,16 SWITCH= bash benchmarks/gpu_session31.sh` (the
# model over both GPUs, the default switch interval only). Logs packed into $OUT/session31.tgz.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; W=/tmp/s31; mkdir -p "$W"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$W/gpus.txt" 2>&1
nproc >> "$W/gpus.txt"; python3 -VV >> "$W/gpus.txt"
timeout 400 python3 benchmarks/extract_overhead.py --gpus "${GPUS:-1}" --max-batch-tokens 0 --profile '' \
    --e2e 16x256,16x4096 --e2e-repeat 3 --writer-threads "${WRITERS:-4,8,16}" --switch-interval "${SWITCH-5,0.5}" \
    --out "$W/e2e" --work /tmp/lw-e2e > "$W/e2e.log" 2>&1
echo "=== end to end (exit $?)"; grep '^extract\|^model' "$W/e2e.log"
tar czf "$OUT/session31.tgz" -C "$W" . 2>/dev/null
