#!/usr/bin/env bash
# Device session 2 (2 GPUs): GPU tests, extract overhead again (copier-thread capture), streaming
# vs device_map vs accelerate offload, a full-size MiniMax-M2 single-layer test, compare speed.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
step() { echo; echo "=== $* ==="; }
{
step "machine"; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader; nproc; free -g | head -2
step "gpu tests"; timeout 200 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -6
step "extract overhead"; timeout 200 python3 benchmarks/extract_overhead.py --layers 8 --gpus ${GPUS:-2} --tokens 1024,4096 --e2e 8x4096 --reps 9 --work /tmp/lw-e2e --out "$OUT/x" 2>&1 | grep -v '^{'
step "single full-size layer"; timeout 150 python3 benchmarks/single_layer_gpu.py --out "$OUT/s" 2>&1 | tail -20
step "streaming"; timeout 240 python3 benchmarks/streaming.py --layers 3 --tokens 4096 --prompts 4 --offload-gb 10 --out "$OUT/st" 2>&1 | tail -16
step "compare throughput (CPU side of the GPU machine)"; timeout 200 python3 benchmarks/compare_throughput.py --gb 1 --dir /tmp/lw-cmp --out "$OUT/compare_bench.md" 2>&1 | tail -8
} 2>&1 | tee "$OUT/session2.log"
