"""How long a thread of this process waits to run again after it is woken, on this machine: the
question behind compare's measuring thread sleeping half its time on a futex while the CPUs sit
idle (BENCHMARKS.md, compare throughput). On a virtual machine a woken thread whose CPU went idle
may wait for the host to run that CPU again; busy CPUs may wake sooner.

Two measurements, each with the machine otherwise idle and then with `--busy` processes spinning:
  ping-pong  two threads hand a turn back and forth through threading.Event (a futex each way):
             the one-way hand-off time, median / 90th / 99th percentile / max over `--pairs`
  torch ops  one thread runs small torch CPU ops (each gives the GIL up and takes it back) while
             `--readers` threads run short Python loops between sleeps, as compare's readers do:
             each op's wall time, the same percentiles, against the same ops with no readers

    python benchmarks/wake_latency.py --busy 12 --out /tmp/wake.md
    python benchmarks/wake_latency.py --tiny
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def ping_pong(pairs: int) -> list[float]:
    """One-way hand-off times (seconds) between two threads, `pairs` round trips."""
    ping, pong = threading.Event(), threading.Event()
    times: list[float] = []

    def other():
        for _ in range(pairs):
            ping.wait()
            ping.clear()
            pong.set()

    t = threading.Thread(target=other, daemon=True)
    t.start()
    for _ in range(pairs):
        start = time.perf_counter()
        ping.set()
        pong.wait()
        pong.clear()
        times.append((time.perf_counter() - start) / 2)
    t.join()
    return times


def torch_ops(ops: int, readers: int) -> list[float]:
    """Wall time of each of `ops` small torch ops on this thread while `readers` threads loop:
    a little Python (a dict built and dropped), then a sleep of 0.1 ms (a GIL-free wait)."""
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            {i: str(i) for i in range(50)}  # noqa: B018 - Python work holding the GIL
            time.sleep(1e-4)

    threads = [threading.Thread(target=reader, daemon=True) for _ in range(readers)]
    for t in threads:
        t.start()
    x = torch.zeros(16)
    times = []
    try:
        for _ in range(ops):
            start = time.perf_counter()
            x.add_(1.0)
            times.append(time.perf_counter() - start)
    finally:
        stop.set()
        for t in threads:
            t.join()
    return times


def quantiles(xs: list[float]) -> str:
    xs = sorted(xs)
    pick = [xs[min(len(xs) - 1, int(len(xs) * q))] for q in (0.5, 0.9, 0.99)]
    return " / ".join(f"{v * 1e6:.0f}" for v in pick + [xs[-1]]) + f" us (mean {statistics.fmean(xs) * 1e6:.0f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5000, help="ping-pong round trips (default: %(default)s)")
    parser.add_argument("--ops", type=int, default=20000, help="torch ops timed (default: %(default)s)")
    parser.add_argument("--readers", type=int, default=8, help="reader-like threads (default: %(default)s)")
    parser.add_argument("--busy", type=int, default=max(1, (os.cpu_count() or 2) - 4),
                        help="spinning processes for the busy rows (default: the CPUs less 4, at least 1)")
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--tiny", action="store_true", help="a quick dry run")
    args = parser.parse_args(argv)
    if min(args.pairs, args.ops, args.busy) < 1 or args.readers < 0:
        parser.error("--pairs, --ops and --busy must be at least 1, --readers at least 0")
    if args.tiny:
        args.pairs, args.ops, args.busy, args.readers = 200, 500, 1, 2
    torch.set_num_threads(1)
    rows = []
    spinning = f"{args.busy} spinning process" + ("es" if args.busy > 1 else "")
    for label, busy in (("idle", 0), (spinning, args.busy)):
        ctx = multiprocessing.get_context("spawn")
        stop = ctx.Event()
        spinners = [ctx.Process(target=_spin, args=(stop,), daemon=True) for _ in range(busy)]
        for p in spinners:
            p.start()
        try:
            time.sleep(0.2 if busy else 0)
            rows.append(f"| {label} | ping-pong hand-off | {quantiles(ping_pong(args.pairs))} |")
            rows.append(f"| {label} | torch op, alone | {quantiles(torch_ops(args.ops, 0))} |")
            rows.append(f"| {label} | torch op, {args.readers} reader threads | "
                        f"{quantiles(torch_ops(args.ops, args.readers))} |")
        finally:
            stop.set()
            for p in spinners:
                p.join(timeout=10)
        for row in rows[-3:]:
            print(row, flush=True)
    table = [f"wake_latency: {os.cpu_count()} CPUs, Python {sys.version.split()[0]}, torch {torch.__version__}", "",
             "| machine | what | median / 90th / 99th percentile / max |", "| --- | --- | --- |", *rows]
    if args.out:
        Path(args.out).write_text("\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
