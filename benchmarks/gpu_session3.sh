#!/usr/bin/env bash
# Device session 3 (2 GPUs): GPU tests (capture over 2 GPUs, replay), capture overhead over 2 GPUs
# with the copier thread and where end-to-end extract time goes, streaming vs device_map vs
# accelerate disk offload (router kept fp32), compare throughput with large metric blocks.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/st"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
step() { echo; echo "=== $* ==="; }
{
step "machine"; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader; nproc
step "gpu tests"; timeout 150 python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tail -4
step "extract overhead"; timeout 200 python3 benchmarks/extract_overhead.py --layers 8 --gpus 2 --tokens 1024,4096 --e2e 16x4096 --reps 9 --work /tmp/lw-e2e --out "$OUT/x" 2>&1 | grep -v '^{'
step "streaming"; timeout 220 python3 benchmarks/streaming.py --layers 3 --tokens 4096 --prompts 4 --offload-gb 10 --out "$OUT/st" > "$OUT/st/stream.log" 2>&1; grep -v "tokenizer\|slow tokenizer\|sentencepiece\|(1)\|(2)\|(3)" "$OUT/st/stream.log" | tail -14
step "compare throughput"; timeout 150 python3 benchmarks/compare_throughput.py --gb 1 --dir /tmp/lw-cmp --out "$OUT/compare_bench.md" 2>&1 | tail -8
} 2>&1 | tee "$OUT/session3.log"
