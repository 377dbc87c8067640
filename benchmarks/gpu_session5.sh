#!/usr/bin/env bash
# Device session 5 (2 GPUs), a probe before the final runs: GPU tests but the fresh-process CLI one
# (the reference-holding collector, GPU compare metrics, replay prefetch, FP8 scaled_mm with padded
# rows, self-tests exact in every extract mode), the capture overhead at three lengths on one GPU,
# and one full-size FP8 layer at 1024 tokens.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
step() { echo; echo "=== $* ==="; }
{
step "machine"; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader; nproc
step "gpu tests"; timeout 240 python3 -m pytest -q -p no:cacheprovider tests/gpu --deselect tests/gpu/test_gpu_cli.py::test_every_command_in_a_fresh_process --durations=5 2>&1 | tail -30
step "capture overhead, 1 GPU"; CUDA_VISIBLE_DEVICES=0 timeout 150 python3 benchmarks/extract_overhead.py --gpus 1 --tokens 128,512,4096 --batches 1 --reps 5 --profile 1x512 --e2e "" --out "$OUT" 2>&1 | grep -v '^{' | tail -8
step "fp8 layer"; timeout 150 python3 benchmarks/fp8_minimax.py layer --tokens 1024 --work /tmp/lw-fp8 --out "$OUT" 2>&1 | grep -v "tokenizer\|bos_token\|eos_token" | tail -6
} 2>&1 | tee "$OUT/session5.log"
