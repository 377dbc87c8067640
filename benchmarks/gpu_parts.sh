# Sourced by benchmarks/gpu_session35.sh and later as `. gpu_parts.sh SESSION DEFAULT_PART "$@"`:
# with several parts named, runs the calling script once per part (one after another) and exits;
# with one (or none: DEFAULT_PART), sets PART, OUT (default /tmp/out) and W (/tmp/sSESSION-PART,
# the part's log directory) and sources gpu_env.sh (layerwise from this checkout, blake3, the
# machine written to $W/gpus.txt).
_session=$1; _default=$2; shift 2
set -uo pipefail
if [ $# -gt 1 ]; then for p in "$@"; do bash "$0" "$p"; done; exit 0; fi
PART=${1:-$_default}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; W=/tmp/s$_session-$PART; mkdir -p "$W"
. "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
