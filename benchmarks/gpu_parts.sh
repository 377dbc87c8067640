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
# capture_table GPUS RUNS: extract_overhead.py's capture table (11 shapes, 5 rounds) and end-to-end
# extracts (16 x 256, 16 x 4096, 3 rounds) with the model over GPUS GPUs, $RUNS times (default
# RUNS), none started after $DEADLINE seconds; logs table<i>.log and run<i>/ under $W.
capture_table() {
    for i in $(seq "${RUNS:-$2}"); do
        [ "$SECONDS" -gt "${DEADLINE:-99999}" ] && { echo "=== run $i not started: past $DEADLINE s"; break; }
        timeout ${TABLE:-300} python3 benchmarks/extract_overhead.py --gpus "$1" --tokens 128,512,1024,4096 \
            --batches 1,4,16 --max-batch-tokens 16384 --reps 5 --profile '' --e2e 16x256,16x4096 --e2e-repeat 3 \
            --writer process --out "$W/run$i" > "$W/table$i.log" 2>&1
        echo "=== capture table and end to end on $1 GPU(s), run $i (exit $?, at $SECONDS s)"; tail -22 "$W/table$i.log"
    done
}
# iso_ab BASE: `layerwise check` with this checkout's src/ and BASE's (fills the bytecode cache, as a
# second command finds it), then isolated_profile.py with each, taking turns, $RUNS rounds (default
# 2), none started after $DEADLINE seconds (default 330); which goes first alternates by round (this
# checkout's in odd rounds; BASE's with BASE_FIRST=1), since a call's first round runs right after
# the checkpoint was written; $ISO_ARGS go to isolated_profile.py; logs iso<i>-<code>.log and
# iso<i>-<code>/ under $W.
iso_ab() {
    for src in src "$1/src"; do
        PYTHONPATH=$PWD/$src:$PYTHONPATH python3 -m layerwise check builtin:minimax-m2 > "$W/check-${src//\//_}.log" 2>&1
    done
    for i in $(seq "${RUNS:-2}"); do
        order=(src "$1/src")
        [ $(( (i + ${BASE_FIRST:-0}) % 2 )) -eq 0 ] && order=("$1/src" src)
        for src in "${order[@]}"; do
            [ "$SECONDS" -gt "${DEADLINE:-330}" ] && { echo "=== $src round $i not started: past ${DEADLINE:-330} s"; return; }
            name=iso$i-${src//\//_}
            timeout ${ISO:-240} python3 benchmarks/isolated_profile.py --src "$src" ${ISO_ARGS:-} --out "$W/$name" \
                > "$W/$name.log" 2>&1
            echo "=== isolated profile, $src, round $i (exit $?, at $SECONDS s)"; tail -12 "$W/$name.log"
        done
    done
}
# capture_vs BASE: capture_ab.py, this checkout's capture against BASE's src/ in one process,
# interleaved rounds ($REPS, default 9), the short shapes and one long ($SHAPES), 8 batches in a row
# too, the bookkeeping alone, $CAP seconds at most (default 260); capture.log and capture/ under $W.
capture_vs() {
    timeout ${CAP:-260} python3 benchmarks/capture_ab.py --base "$1/src" \
        --shapes ${SHAPES:-1x128,1x512,4x128,16x128,1x1024,4x4096} --reps ${REPS:-9} --book-rounds 3 \
        --out "$W/capture" > "$W/capture.log" 2>&1
    echo "=== capture_ab (exit $?, at $SECONDS s)"; tail -25 "$W/capture.log"
}
# iso_runs RUNS: `layerwise check` (fills the bytecode cache, as a second command finds it), then
# isolated_profile.py with this checkout's code $RUNS times (default RUNS), none started after
# $DEADLINE seconds (default 200), each within $ISO seconds (default 200); logs iso<i>.log and
# iso<i>/ under $W.
iso_runs() {
    python3 -m layerwise check builtin:minimax-m2 > "$W/check.log" 2>&1
    for i in $(seq "${RUNS:-$1}"); do
        [ "$SECONDS" -gt "${DEADLINE:-200}" ] && { echo "=== isolated profile $i not started: past ${DEADLINE:-200} s"; break; }
        timeout ${ISO:-200} python3 benchmarks/isolated_profile.py --src src --out "$W/iso$i" > "$W/iso$i.log" 2>&1
        echo "=== isolated profile $i (exit $?, at $SECONDS s)"; tail -14 "$W/iso$i.log"
    done
}
# cmp_trace VARIANTS: compare_trace.py on 1 GB runs of 1024-token tensors under compare_knobs.py's
# settings VARIANTS (a comma list); trace.log and trace/ (summaries, gzipped traces) under $W.
cmp_trace() {
    timeout ${EACH:-240} python3 benchmarks/compare_trace.py --gb 1 --tokens 1024 --variants "$1" \
        --dir /tmp/lw-trace --out "$W/trace" > "$W/trace.log" 2>&1
    echo "=== compare_trace.py --variants $1 (exit $?, at $SECONDS s)"
    grep -v '^wrote\|USDT\|warn' "$W/trace.log" | tail -40
    gzip -f "$W"/trace/trace-*.json
}
# cmp_knobs SHAPE...: compare_knobs.py once per SHAPE (its arguments, --variants among them), none
# started after $DEADLINE seconds; knobs<shape>.log and .md under $W.
cmp_knobs() {
    for shape in "$@"; do
        [ "$SECONDS" -gt "${DEADLINE:-99999}" ] && { echo "=== $shape not started: past $DEADLINE s"; break; }
        tag=knobs$(echo "$shape" | tr -d ' -,')
        timeout ${EACH:-300} python3 benchmarks/compare_knobs.py $shape \
            --dir "/tmp/lw-$(echo "$shape" | cut -d' ' -f1-4 | tr -d ' -')" --out "$W/$tag.md" > "$W/$tag.log" 2>&1
        echo "=== compare_knobs.py $shape (exit $?, at $SECONDS s)"; tail -12 "$W/$tag.log"
    done
}
# e2e_ab BASE: extract_overhead.py's end-to-end extracts only (16 x 256, 16 x 4096, $REPEAT rounds
# each, default 5) with this checkout's script and code and with BASE's own copy of both, taking
# turns, $RUNS pairs (default 3), none started after $DEADLINE seconds (default 420); logs
# e2e<i>-here.log / e2e<i>-base.log and their directories under $W.
e2e_ab() {
    for i in $(seq "${RUNS:-3}"); do
        for code in . "$1"; do
            [ "$SECONDS" -gt "${DEADLINE:-420}" ] && { echo "=== $code run $i not started: past ${DEADLINE:-420} s"; return; }
            name=e2e$i-$([ "$code" = . ] && echo here || echo base)
            timeout ${EACH:-150} python3 "$code/benchmarks/extract_overhead.py" --gpus 1 --max-batch-tokens 0 \
                --profile '' --e2e 16x256,16x4096 --e2e-repeat "${REPEAT:-5}" --writer process --out "$W/$name" \
                > "$W/$name.log" 2>&1
            echo "=== $name (exit $?, at $SECONDS s)"; grep '^extract' "$W/$name.log" | cut -c1-420
        done
    done
}
# e2e_threads ORDER...: the end-to-end extracts (16 x 256, 16 x 4096, $REPEAT rounds, default 5) with
# each ORDER's writer thread counts side by side (a comma list, at most 3 a process), this
# checkout; logs threads<order>.log and directories under $W.
e2e_threads() {
    for order in "$@"; do
        timeout ${EACH:-200} python3 benchmarks/extract_overhead.py --gpus 1 --max-batch-tokens 0 --profile '' \
            --e2e 16x256,16x4096 --e2e-repeat "${REPEAT:-5}" --writer process --writer-threads $order \
            --process-threads 3 --out "$W/threads$order" > "$W/threads$order.log" 2>&1
        echo "=== writer threads $order (exit $?, at $SECONDS s)"; grep '^extract' "$W/threads$order.log" | cut -c1-330
    done
}
# gpu_suite: the GPU test suite (tests/gpu), or the tests matching $GK (pytest -k), for $GT seconds
# at most (default 300); log gpu_tests.log under $W.
gpu_suite() {
    timeout ${GT:-300} python3 -m pytest -q -p no:cacheprovider tests/gpu --timeout 200 --durations=15 -rfs \
        --tb=short ${GK:+-k "$GK"} > "$W/gpu_tests.log" 2>&1
    echo "=== gpu tests (exit $?, at $SECONDS s)"; tail -30 "$W/gpu_tests.log"
}
