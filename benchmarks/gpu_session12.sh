#!/usr/bin/env bash
# Device session 12 (2 x H200): issue 12's data-parallel extract and layer tests again, with the
# layers dealt round-robin over the ranks (benchmarks/distributed.py).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 LAYERWISE_CACHE=/tmp/lw-cache TOKENIZERS_PARALLELISM=false
git log --oneline -1 > "$OUT/commit.txt" 2>/dev/null
timeout 500 python3 benchmarks/distributed.py --parts extract,test --out "$OUT" --command-timeout 300 \
    --dist-timeout 300 > "$OUT/distributed.log" 2>&1
echo "=== distributed (exit $?)"
grep -v 'tokenizer\|bos_token\|eos_token\|Warning\|warn_once' "$OUT/distributed.log" | tail -25
python3 - "$OUT/distributed.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for name, part in d["parts"].items():
    print(name, {k: v for k, v in part.items() if k not in ("per_rank",)})
    print("  per rank:", part.get("per_rank"))
PY
