"""How long `layerwise plan` of the real MiniMax-M2 configuration takes, quiet and with every core
busy: fresh processes, wall time from launch to exit, in turns: the first plan of the model (no
inputs kept: LAYERWISE_PLAN_CACHE=0, the model built on the meta device, its inputs kept), a plan
of it once planned before (answered from the kept inputs, _fastplan.py), and --base's code
(another commit's src/, e.g. `git archive COMMIT src | tar x -C .base`), all with a cache
directory of their own (--cache, default a new temporary one).

    python benchmarks/plan_time.py --rounds 3 --base .base46/src   # quiet, then loaded
    python benchmarks/plan_time.py --tiny                          # CPU dry run (tests/test_benchmarks.py)

"Loaded" runs the same rounds with one busy loop (a process spinning) per core. Prints a table;
JSON to --out/plan_time.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import SRC, layerwise_env  # noqa: E402


def _spin() -> None:
    while True:
        pass


def timed(src: Path, argv: list[str], env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "layerwise", "plan", *argv], env=layerwise_env(src, **env),
                          capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"plan with {src} exited {done.returncode}: {done.stderr.strip()[-400:]}")
    return wall


def rounds(codes: dict[str, tuple[Path, dict]], argv: list[str], count: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {name: [] for name in codes}
    for _ in range(count):
        for name, (src, env) in codes.items():
            out[name].append(timed(src, argv, env))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--base", help="another commit's src/ directory, timed in turns with this checkout's")
    ap.add_argument("--no-load", action="store_true", help="quiet rounds only")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--cache", help="LAYERWISE_CACHE of every plan (default: a new temporary directory)")
    ap.add_argument("--tiny", action="store_true", help="plan builtin:minimax-m2-tiny, for a dry run")
    args = ap.parse_args(argv)
    model = "builtin:minimax-m2-tiny" if args.tiny else "builtin:minimax-m2"
    command = [model, "--gpus", "8x141GB"]
    if args.base and not (Path(args.base) / "layerwise").is_dir():
        ap.error(f"--base {args.base} holds no layerwise package")
    cache = {"LAYERWISE_CACHE": args.cache or tempfile.mkdtemp(prefix="lw-plan-")}
    try:
        return _measure(args, command, cache)
    finally:
        if not args.cache:
            shutil.rmtree(cache["LAYERWISE_CACHE"], ignore_errors=True)


def _measure(args, command: list[str], cache: dict) -> int:
    codes = {"first plan": (SRC, {**cache, "LAYERWISE_PLAN_CACHE": "0"}), "planned before": (SRC, cache)}
    if args.base:
        codes["base"] = (Path(args.base).resolve(), cache)
    timed(SRC, command, cache)  # the inputs kept for "planned before"
    results = {"command": ["layerwise", "plan", *command], "cores": os.cpu_count(),
               "load_before": os.getloadavg(), "quiet": rounds(codes, command, args.rounds)}
    if not args.no_load:
        spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(os.cpu_count() or 1)]
        for p in spinners:
            p.start()
        try:
            results["loaded"] = rounds(codes, command, args.rounds)
            results["load_during"] = os.getloadavg()
        finally:
            for p in spinners:
                p.terminate()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan_time.json").write_text(json.dumps(results, indent=1))
    lines = [f"`layerwise plan {' '.join(command)}`, {os.cpu_count()} cores, fresh processes taking turns "
             f"(min / median / max of {args.rounds}):"]
    for when in ("quiet", "loaded"):
        for name, walls in results.get(when, {}).items():
            lines.append(f"  {when:6} {name:14} {min(walls):.2f} / {statistics.median(walls):.2f} / {max(walls):.2f} s  "
                         f"({', '.join(f'{w:.2f}' for w in walls)})")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
