#!/usr/bin/env bash
# Device session 24 (one H200): does the image cache bytecode? Start-up of a fresh process
# (`import layerwise.cli` and transformers' MiniMax-M2 modeling code, CUDA initialised) three times
# as the image runs it, then three times with PYTHONPYCACHEPREFIX (the first run fills it).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
{ env | grep '^PYTHON' ; python3 -c 'import sys, sysconfig; print("dont_write_bytecode", sys.dont_write_bytecode, "prefix", sys.pycache_prefix, "purelib", sysconfig.get_paths()["purelib"])'
  p=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'); touch "$p/.lw-probe" && echo writable && rm -f "$p/.lw-probe"
  find "$p/transformers" -name '*.pyc' | wc -l | sed 's/^/pyc files under transformers: /'; } 2>&1
S='import time; t=time.perf_counter(); import layerwise.cli, torch; import transformers.models.minimax_m2.modeling_minimax_m2; torch.zeros(1, device="cuda"); print(f"{time.perf_counter()-t:.2f}")'
for i in 1 2 3; do echo "as is: $(python3 -c "$S")"; done
for i in 1 2 3; do echo "PYTHONPYCACHEPREFIX: $(PYTHONPYCACHEPREFIX=/tmp/lw-pyc python3 -c "$S")"; done
echo "modules cached: $(find /tmp/lw-pyc -name '*.pyc' | wc -l)"
