"""What the end of a layerwise command costs: from its manifest to the process's exit, step by step.

The command runs in a fresh process as `layerwise` runs it (a program named `layerwise`, so it
prefetches and keeps bytecode as the console script does), whose end does what
`distributed.exit_process` does, one step at a time, each stamped with the unix time: `cli.main`
returned (the report printed), the non-daemon threads joined, the atexit functions run (the run
writer's processes stopped), then `os._exit`. The parent stamps when it saw the process end: what
lies after `os._exit` is the kernel's teardown of the process (its memory, pinned pages, the GPU's
context). All in seconds after the manifest of the run the command wrote (--run) was written,
with the host memory still page-locked when `cli.main` returned (torch's pinned memory, and the
registered regions `shmbuffers.unpin_all` did not unpin): what the teardown has to unlock.
--rounds fresh processes; min / median / max.

    python benchmarks/command_exit.py --run /tmp/w/ref -- extract CKPT --stream --prompts P --out /tmp/w/ref --overwrite
    python benchmarks/command_exit.py --cold CKPT --run ... -- ...   # the checkpoint read from the disk
    python benchmarks/command_exit.py --tiny          # CPU dry run (tests/test_benchmarks.py)
    python benchmarks/command_exit.py --src .base75/src --run ... -- ...   # another checkout's code

Prints a table; JSON to --out/command_exit.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import drop_page_cache, layerwise_env  # noqa: E402

STEPS = ("main returned", "threads joined", "atexit run", "process ended")

_WRAPPER = '''import atexit, json, os, sys, threading, time
from layerwise import cli
code = cli.main(sys.argv[1:])
stamps = {"main returned": time.time()}
import torch
from layerwise import shmbuffers
locked = {"torch pinned": torch.cuda.host_memory_stats().get("allocated_bytes.current", 0)
          if torch.cuda.is_initialized() else 0,
          "registered": sum(r.size for r in list(shmbuffers._REGIONS.values()) if r.pinned)}
threading._shutdown()
stamps["threads joined"] = time.time()
atexit._run_exitfuncs()
stamps["atexit run"] = time.time()
sys.stdout.flush()
sys.stderr.write("\\nSTAMPS " + json.dumps({**stamps, "locked": locked}) + "\\n")
sys.stderr.flush()
os._exit(code)
'''


def one(args, wrapper: Path, env: dict) -> dict:
    """One fresh process: its steps in seconds after the run's manifest was written."""
    manifest = Path(args.run) / "manifest.json"
    if args.cold:
        drop_page_cache(f for f in Path(args.cold).rglob("*") if f.is_file())
    launched = time.time()
    done = subprocess.run([sys.executable, str(wrapper), *args.command], env=env, capture_output=True, text=True,
                          timeout=args.command_timeout)
    ended = time.time()
    line = next((x for x in done.stderr.splitlines() if x.startswith("STAMPS ")), None)
    if done.returncode != 0 or line is None or not manifest.is_file():
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise RuntimeError(f"the command exited {done.returncode} without its run's manifest or stamps:\n{tail}")
    written = manifest.stat().st_mtime
    stamps = {**json.loads(line[len("STAMPS "):]), "process ended": ended}
    return {"wall_s": ended - launched, "manifest_s": written - launched,
            "after_manifest": {step: stamps[step] - written for step in STEPS},
            "locked_gb": {k: v / 1e9 for k, v in stamps["locked"].items()}}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="the run directory the command writes (its manifest's time is the origin)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--command-timeout", type=float, default=600)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--tiny", action="store_true", help="a streamed extract of builtin:minimax-m2-tiny on the CPU")
    ap.add_argument("--src", help="the layerwise code the command runs (default: this checkout's src/)")
    ap.add_argument("--cold", help="a directory (the checkpoint) whose files are dropped from the page cache "
                                   "before each process: the command reads them from the disk")
    args = ap.parse_args(argv[:split])
    args.command = argv[split + 1:]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            args.run = args.run or str(Path(tmp) / "run")
            args.command = args.command or ["extract", "builtin:minimax-m2-tiny", "--stream", "--prompt", "hello",
                                            "--out", args.run, "--overwrite"]
        if not args.run or not args.command:
            ap.error("give --run RUN and the command after --, or --tiny")
        wrapper = Path(tmp) / "layerwise"  # named as the console script: a layerwise command (_boot.is_command)
        wrapper.write_text(_WRAPPER)
        env = layerwise_env(*([args.src] if args.src else []))
        rounds = []
        for i in range(args.rounds):
            rounds.append(one(args, wrapper, env))
            print(f"round {i + 1}: " + ", ".join(f"{k} {v:+.2f} s" for k, v in rounds[-1]["after_manifest"].items())
                  + "; page-locked when main returned: " + ", ".join(f"{k} {v:.2f} GB" for k, v in
                                                                     rounds[-1]["locked_gb"].items()), flush=True)
    (out / "command_exit.json").write_text(json.dumps({"command": args.command, "src": args.src, "rounds": rounds},
                                                      indent=1))
    lines = [f"`layerwise {' '.join(args.command[:2])} ...`, {len(rounds)} fresh processes, seconds after the manifest "
             "was written (min / median / max):"]
    for key in ("wall_s", "manifest_s"):
        lines.append(f"  {key.removesuffix('_s')} after launch: {spread([r[key] for r in rounds])}")
    for step in STEPS:
        lines.append(f"  {step}: {spread([r['after_manifest'][step] for r in rounds])}")
    for kind in rounds[0]["locked_gb"]:
        gb = [r["locked_gb"][kind] for r in rounds]
        lines.append(f"  page-locked ({kind}) when main returned: {min(gb):.2f} / {statistics.median(gb):.2f} / "
                     f"{max(gb):.2f} GB")
    print("\n".join(lines))
    return 0


def spread(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f} s"


if __name__ == "__main__":
    sys.exit(main())
