"""Where compare's time goes, thread by thread and on the GPU: one compare of two runs under
torch.profiler, cold (the files' pages dropped first) and then warm, each summarised from the
profiler's own trace; under each of compare_knobs.py's settings asked for (`--variants`).

For the measuring thread (the one that calls compare_runs) and for the other threads together
(the readers): wall span, time inside top-level torch ops, time outside any op (Python, the GIL,
locks, file reads), and the CUDA runtime calls by name (cudaStreamSynchronize and the
device-to-host cudaMemcpyAsync of each `.item()` are where the measuring thread waits for the
device); stalls: a top-level op or a gap between two over STALL_US. On the GPU: the busy time
of kernels and of copies, and the share of the compare's wall time it was idle. Each compare is
also timed once without the profiler, for its overhead, with the measuring thread's seconds on
a CPU, waiting for one and blocked, and the machine's CPUs by state (steal: the hypervisor's).

    python benchmarks/compare_trace.py --gb 1 --tokens 1024 --dir /tmp/trace --out /tmp/trace-out
    python benchmarks/compare_trace.py --gb 2 --tokens 512 --vocab 200064 ...   # logits-heavy runs
    python benchmarks/compare_trace.py --tiny          # a CPU dry run on two small runs it writes
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from compare_knobs import VARIANTS, setting  # noqa: E402
from compare_throughput import run_files, write_runs  # noqa: E402
from synthetic import drop_page_cache  # noqa: E402

from layerwise.compare import CompareOptions, compare_runs  # noqa: E402
from layerwise.runs import open_run  # noqa: E402

STALL_US = 1000  # a top-level op, or a gap between two, longer than this (us) counts as a stall


def union(spans: list[tuple[float, float]]) -> float:
    """Total length covered by (start, end) spans."""
    total, end = 0.0, -float("inf")
    for s, e in sorted(spans):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def summarise(trace: dict, main_tid: int) -> dict:
    """Seconds per thread group and on the GPU from a chrome trace's complete ("X") events."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    cpu = collections.defaultdict(list)  # tid -> [(start, end, name, cat)]
    gpu: dict[str, list] = collections.defaultdict(list)
    for e in events:
        span = (float(e["ts"]), float(e["ts"]) + float(e["dur"]))
        cat = e.get("cat", "")
        if cat in ("kernel", "gpu_memcpy", "gpu_memset"):
            gpu[cat].append(span)
        elif cat in ("cpu_op", "cuda_runtime", "cuda_driver"):
            cpu[int(e.get("tid", 0))].append((*span, e.get("name", "?"), cat))
    out = {"groups": {}, "gpu": {}}
    for label, tids in (("measuring thread", [t for t in cpu if t == main_tid]),
                        ("other threads", [t for t in cpu if t != main_tid])):
        spans, ops, runtime, threads, stalls = [], 0.0, collections.Counter(), 0, []
        for tid in tids:
            evs = sorted(cpu[tid])
            threads += 1
            spans.append((evs[0][0], max(e[1] for e in evs)))
            top, reach = [], -float("inf")
            for s, e, name, cat in evs:
                if cat == "cpu_op" and s >= reach:  # not nested in an earlier op of this thread
                    top.append((s, e))
                    reach = e
                if cat != "cpu_op":
                    runtime[name] += (e - s) / 1e6
            ops += union(top) / 1e6
            stalls += [(e - s) / 1e6 for s, e in top if e - s > STALL_US]
            stalls += [(b[0] - a[1]) / 1e6 for a, b in zip(top, top[1:]) if b[0] - a[1] > STALL_US]
        wall = sum(e - s for s, e in spans) / 1e6
        out["groups"][label] = {"threads": threads, "span_s": wall, "in_ops_s": ops, "outside_ops_s": wall - ops,
                                "runtime_s": dict(runtime.most_common(8)), "stalls": len(stalls),
                                "stalled_s": sum(stalls)}
    every = [s for spans in gpu.values() for s in spans]
    if every:
        first, last = min(s for s, _ in every), max(e for _, e in every)
        out["gpu"] = {k: union(v) / 1e6 for k, v in gpu.items()}
        out["gpu"].update(busy_s=union(every) / 1e6, span_s=(last - first) / 1e6)
    return out


def profiled(paths, out_dir: Path, label: str) -> tuple[float, dict]:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        compare_runs(open_run(paths[0]), open_run(paths[1]), CompareOptions(verify=True))
        seconds = time.perf_counter() - start
    trace_path = out_dir / f"trace-{label}.json"
    prof.export_chrome_trace(str(trace_path))
    return seconds, summarise(json.loads(trace_path.read_text()), threading.get_native_id())


# Run in a process of its own (no share in this one's GIL): samples a thread's scheduler state and
# kernel wait channel every 0.5 ms until stopped, then prints {"state wchan": samples} as JSON.
SAMPLER = """
import collections, json, os, signal, sys, time
pid, main = sys.argv[1], sys.argv[2]
mine, others, during = collections.Counter(), collections.Counter(), collections.Counter()
running = [True]
signal.signal(signal.SIGTERM, lambda *_: running.__setitem__(0, False))


def look(tid):
    task = f"/proc/{pid}/task/{tid}"
    state = open(task + "/stat").read().rsplit(")", 1)[1].split()[0]
    return state + " " + ((open(task + "/wchan").read().strip() or "-") if state != "R" else "-")


print("ready", flush=True)
while running[0]:
    try:
        me = look(main)
    except OSError:
        break
    mine[me] += 1
    for tid in os.listdir(f"/proc/{pid}/task"):
        if tid != main:
            try:
                seen = look(tid)
            except OSError:
                continue
            if not seen.startswith("S "):  # asleep by choice: idle pool threads, timers
                others[seen] += 1
                if "futex" in me:
                    during[seen] += 1
    time.sleep(0.0005)
print(json.dumps({"mine": mine, "others": others, "during": during}))
"""


def plain(paths) -> tuple[float, dict]:
    """compare's seconds without the profiler, and where the measuring thread and the machine's
    CPUs were meanwhile (`sched_state` deltas; "waits": the thread's sampled state and wait channel)."""
    sampler = None
    if Path(f"/proc/{os.getpid()}/task/{threading.get_native_id()}/wchan").exists():
        sampler = subprocess.Popen([sys.executable, "-c", SAMPLER, str(os.getpid()), str(threading.get_native_id())],
                                   stdout=subprocess.PIPE, text=True)
        sampler.stdout.readline()
    before = sched_state()
    start = time.perf_counter()
    compare_runs(open_run(paths[0]), open_run(paths[1]), CompareOptions(verify=True))
    seconds = time.perf_counter() - start
    after = sched_state()
    out = {k: after[k] - before[k] for k in after if k in before}
    if sampler is not None:
        sampler.terminate()
        out["waits"] = json.loads(sampler.communicate(timeout=10)[0] or "{}")
    return seconds, out


def sched_state() -> dict:
    """This thread's seconds on a CPU and waiting for one (Linux schedstat), its voluntary and
    involuntary context switches, and the machine's CPU seconds by state (/proc/stat: user,
    system, idle, iowait, steal ...); {} where /proc has none of it."""
    out: dict = {}
    try:
        run, delay, _ = Path("/proc/thread-self/schedstat").read_text().split()[:3]
        out.update(on_cpu_s=int(run) / 1e9, runqueue_s=int(delay) / 1e9)
        for line in Path("/proc/thread-self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
                out[key] = int(value)
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        tick = os.sysconf("SC_CLK_TCK")
        for name, value in zip(("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"), fields):
            out[f"cpus_{name}_s"] = int(value) / tick
    except (OSError, ValueError):
        pass
    return out


def sched_line(seconds: float, d: dict) -> str:
    if "on_cpu_s" not in d:
        return "- (no schedstat here)"
    blocked = seconds - d["on_cpu_s"] - d["runqueue_s"]
    cpus = {k[5:-2]: v for k, v in d.items() if k.startswith("cpus_")}
    total = sum(cpus.values()) or 1.0
    return (f"- without the profiler, the measuring thread: on a CPU {d['on_cpu_s']:.2f} s, waiting for one "
            f"{d['runqueue_s']:.2f} s, blocked (GIL, locks, faults) {blocked:.2f} s; context switches "
            f"{d.get('voluntary_ctxt_switches', 0)} voluntary, {d.get('nonvoluntary_ctxt_switches', 0)} involuntary. "
            "The machine's CPUs: " + ", ".join(f"{k} {v / total:.0%}" for k, v in cpus.items() if v)
            + _waits_line(d.get("waits") or {}))


def _waits_line(waits: dict) -> str:
    """The sampled states ("S futex_do_wait": asleep on a futex, the GIL's or a lock's; "D ...": in
    the kernel, uninterruptible, e.g. on a page's I/O or mmap_lock; "R -": running) of the measuring
    thread; of the other threads (those not asleep by choice), per sample; and of the other threads
    while the measuring thread slept on a futex."""
    mine = waits.get("mine") or {}
    total = sum(mine.values())
    if not total:
        return ""

    def top(counts: dict, per: float, as_share: bool) -> str:
        items = sorted(counts.items(), key=lambda kv: -kv[1])[:6]
        return ", ".join(f"{k} {v / per:.0%}" if as_share else f"{k} {v / per:.2f}" for k, v in items) or "-"

    waiting = sum(v for k, v in mine.items() if "futex" in k)
    return ("\n- its state, sampled every 0.5 ms: " + top(mine, total, True)
            + "\n- the other threads not asleep by choice, per sample: " + top(waits.get("others") or {}, total, False)
            + "\n- the same while it slept on a futex, per such sample: "
            + top(waits.get("during") or {}, max(1, waiting), False))


def report(label: str, size: int, plain_run: tuple[float, dict], seconds: float, s: dict) -> list[str]:
    plain_s = plain_run[0]
    lines = [f"## {label}: compare {seconds:.2f} s under the profiler ({size / seconds / 1e9:.2f} GB/s), "
             f"{plain_s:.2f} s without it ({size / plain_s / 1e9:.2f} GB/s)", "", sched_line(*plain_run)]
    for name, g in s["groups"].items():
        calls = ", ".join(f"{k} {v:.3f}" for k, v in g["runtime_s"].items())
        lines.append(f"- {name} ({g['threads']}): span {g['span_s']:.2f} s, in torch ops {g['in_ops_s']:.2f} s, "
                     f"outside {g['outside_ops_s']:.2f} s; stalls (an op or a gap between ops over "
                     f"{STALL_US / 1000:g} ms) {g['stalls']}, {g['stalled_s']:.2f} s; CUDA runtime (s): {calls or '-'}")
    if s["gpu"]:
        g = s["gpu"]
        parts = ", ".join(f"{k} {v:.3f} s" for k, v in g.items() if k not in ("busy_s", "span_s"))
        lines.append(f"- GPU: busy {g['busy_s']:.3f} s of {seconds:.2f} s ({parts}); idle "
                     f"{1 - g['busy_s'] / seconds:.0%} of the compare")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0, help="size of each run in GB (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens of the one prompt (default: %(default)s)")
    parser.add_argument("--vocab", type=int, default=8,
                        help="logits' vocabulary (default: %(default)s, logits of no weight; 200064: MiniMax-M2's)")
    parser.add_argument("--dir", help="where to write the runs (default: a temporary directory, deleted)")
    parser.add_argument("--out", help="directory for the traces and the summary (default: none kept)")
    parser.add_argument("--variants", default="as-is",
                        help=f"compare_knobs.py's settings to trace, comma list (default: %(default)s; {', '.join(VARIANTS)})")
    parser.add_argument("--tiny", action="store_true", help="a CPU dry run: two small runs")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    if not variants or set(variants) - set(VARIANTS):
        parser.error(f"--variants: choose from {', '.join(VARIANTS)}")
    if args.tiny:
        args.gb, args.tokens = 0.004, 64
    scratch = tempfile.TemporaryDirectory(prefix="layerwise-trace-")
    root = Path(args.dir) if args.dir else Path(scratch.name) / "runs"
    out_dir = Path(args.out) if args.out else Path(scratch.name) / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        paths, shape = write_runs(root, args.gb, args.tokens, args.vocab)
        files = run_files(paths)
        size = sum(f.stat().st_size for f in files)
        lines, summary = [f"# compare_trace: {size / 1e9:.2f} GB, {shape}, two runs", ""], {}
        for v in variants:
            with setting(v):
                drop_page_cache(files)
                cold_plain = plain(paths)
                drop_page_cache(files)
                cold = profiled(paths, out_dir, f"{v}-cold")
                warm_plain = plain(paths)
                warm = profiled(paths, out_dir, f"{v}-warm")
            part = report(f"{v}, cold", size, cold_plain, *cold) + report(f"{v}, warm", size, warm_plain, *warm)
            print("\n".join(part), flush=True)
            lines += part
            summary[v] = {"cold": cold[1], "warm": warm[1], "cold_sched": cold_plain[1], "warm_sched": warm_plain[1]}
        (out_dir / "summary.md").write_text("\n".join(lines))
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    finally:
        scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
