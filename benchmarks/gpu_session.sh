#!/usr/bin/env bash
# One device-machine session: the GPU tests, the issue-2 evidence (check, plan, load over 2+ GPUs
# with two device maps, plan vs actual) and the extract overhead benchmark. Logs go to $OUT.
# Usage (on the device machine, repo root): bash benchmarks/gpu_session.sh [extract-bench args]
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
LW="python3 -m layerwise"
step() { echo; echo "=== $* ==="; }
{
step "machine"; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv; nvidia-smi topo -m | head -8
python3 -c "import torch, transformers, accelerate, safetensors; print(torch.__version__, transformers.__version__, accelerate.__version__, safetensors.__version__)"
step "gpu tests"; timeout 240 python3 -m pytest -q -p no:cacheprovider tests/gpu tests/test_loading.py -k "gpu or balanced or live" 2>&1 | tail -15
step "check"; $LW check builtin:minimax-m2
step "plan real config on the GPUs present"; $LW plan builtin:minimax-m2
step "plan 8x80GB"; $LW plan builtin:minimax-m2 --gpus 8x80GB
step "medium checkpoint"; python3 - <<'PY'
import sys, time, torch; sys.path.insert(0, "benchmarks")
from synthetic import build_on_devices, minimax_config, write_checkpoint
cfg = minimax_config(4, experts=32)
t = time.time(); m = build_on_devices(cfg, {"": "cuda:0"}); write_checkpoint(m, "/tmp/medium", shard="2GB")
print(f"wrote /tmp/medium in {time.time() - t:.1f} s")
PY
du -sh /tmp/medium
for args in "--device-map balanced" "--device-map sequential --max-memory 0:4GB,1:30GB"; do
  step "plan /tmp/medium $args"; $LW plan /tmp/medium $args --tokens 4096
  step "load /tmp/medium $args"; $LW load /tmp/medium $args --tokens 4096
done
} 2>&1 | tee "$OUT/session.log"
step "extract overhead" | tee -a "$OUT/session.log"
python3 benchmarks/extract_overhead.py --out "$OUT" "$@" 2>&1 | tee -a "$OUT/session.log"
