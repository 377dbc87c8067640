#!/usr/bin/env bash
# Device session 25 (one H200): does a filled bytecode cache take the image's compiling off every
# process? `layerwise check`'s bytecode line as the image runs, then the isolated profile end to
# end (benchmarks/isolated_profile.py: 3 MiniMax-M2-size layers, cold page cache, fresh
# processes) as the image runs it and again with a cache of its own (--bytecode-cache:
# PYTHONPYCACHEPREFIX, PYTHONDONTWRITEBYTECODE unset, filled by one untimed extract).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
python3 -m layerwise check builtin:minimax-m2 > "$OUT/check.log" 2>&1
echo "=== check (exit $?)"; grep -A4 'bytecode' "$OUT/check.log"
timeout ${ISO:-540} python3 benchmarks/isolated_profile.py --bytecode-cache --out "$OUT/iso" > "$OUT/isolated.log" 2>&1
echo "=== isolated (exit $?)"; grep -v 'tokenizer\|bos_token\|eos_token\|Warning\|warn_once' "$OUT/isolated.log" | tail -30
