"""What a process's end costs by what it holds: the kernel's teardown after `os._exit`.

A layerwise command ends with `os._exit` once its run is durable (distributed.exit_process), and
on the GPU machines 0.5-0.9 s still pass before the process is gone (command_exit.py). This
splits that time by what the process holds when it exits: a CUDA context alone, device memory,
pinned host memory (torch's pin_memory, as pinned.py and readahead.py allocate it), host memory
registered with cudaHostRegister (as shmbuffers.py pins the writer's shared buffers), and the
same freed before the exit (the time the free itself takes, then the exit). Each variant is a
fresh process, the variants taking turns, --rounds of each; the parent times from the child's
last stamp (taken just before `os._exit`) to the moment it sees the child gone.

    python benchmarks/exit_teardown.py --gb 4 --device-gb 24 --rounds 3
    python benchmarks/exit_teardown.py --tiny       # CPU dry run: plain host memory only (tests/test_benchmarks.py)

Prints a table; JSON to --out/exit_teardown.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

_CHILD = r'''
import ctypes, json, os, sys, time
import torch
variant, gb, device_gb = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
n = int(gb * 2**30)
held, stamps = [], {}
if variant != "host":
    torch.cuda.init()
    torch.empty(1, device="cuda")
if variant.startswith("device"):
    t = torch.empty(int(device_gb * 2**30), dtype=torch.uint8, device="cuda")
    t.fill_(1)
    torch.cuda.synchronize()
    held.append(t)
elif variant.startswith("pinned"):
    held.append(torch.empty(n, dtype=torch.uint8, pin_memory=True).fill_(1))
elif variant.startswith("registered"):
    t = torch.empty(n, dtype=torch.uint8).fill_(1)
    torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), n, 1))
    held.append(t)
elif variant == "host":
    held.append(torch.empty(n, dtype=torch.uint8).fill_(1))
if variant.endswith("freed"):
    start = time.time()
    if variant.startswith("registered"):
        torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(held[0].data_ptr()))
    held.clear()
    if variant.startswith("device"):
        torch.cuda.empty_cache()
    if variant.startswith("pinned"):
        torch._C._host_emptyCache()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    stamps["free_s"] = time.time() - start
stamps["exit"] = time.time()
sys.stderr.write("STAMPS " + json.dumps(stamps) + "\n")
sys.stderr.flush()
os._exit(0)
'''

GPU_VARIANTS = ("cuda", "device", "device freed", "pinned", "pinned freed", "registered", "registered freed")


def one(variant: str, gb: float, device_gb: float) -> dict:
    done = subprocess.run([sys.executable, "-c", _CHILD, variant, str(gb), str(device_gb)], capture_output=True,
                          text=True, timeout=600)
    ended = time.time()
    line = next((x for x in done.stderr.splitlines() if x.startswith("STAMPS ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"{variant}: exited {done.returncode}:\n{done.stderr[-1500:]}")
    stamps = json.loads(line[len("STAMPS "):])
    return {"teardown_s": ended - stamps["exit"], "free_s": stamps.get("free_s")}


def spread(values: list[float]) -> str:
    return f"{min(values):.3f} / {statistics.median(values):.3f} / {max(values):.3f} s"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=4.0, help="host memory pinned or registered (GB)")
    ap.add_argument("--device-gb", type=float, default=24.0, help="device memory held (GB)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--tiny", action="store_true", help="no GPU: a process holding 0.1 GB of plain host memory")
    args = ap.parse_args(argv)
    variants = ("host",) if args.tiny else GPU_VARIANTS
    gb = 0.1 if args.tiny else args.gb
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            results[v].append(one(v, gb, args.device_gb))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "exit_teardown.json").write_text(json.dumps({"gb": gb, "device_gb": args.device_gb, "results": results},
                                                       indent=1))
    lines = [f"process teardown after os._exit ({args.rounds} fresh processes each, min / median / max); "
             f"host {gb:g} GB, device {args.device_gb:g} GB:"]
    for v, rows in results.items():
        freed = [r["free_s"] for r in rows if r["free_s"] is not None]
        lines.append(f"  {v:<17} teardown {spread([r['teardown_s'] for r in rows])}"
                     + (f"; the free before it {spread(freed)}" if freed else ""))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
