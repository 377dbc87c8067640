"""The isolated profile end to end, as a user runs it: a streamed reference, then every layer
tested alone, each command a fresh process on a cold page cache, against reading the checkpoint once.

A MiniMax-M2-shaped checkpoint (real dimensions, --layers layers, seeded random bf16 weights) is
written to --dir once, and --prompts prompts of --tokens random ids. With the checkpoint's pages
dropped before each step (POSIX_FADV_DONTNEED, no root needed), it times:

  cold_read  every shard read once by one reader, 64 MiB at a time (the floor: the bytes every step
             must read at least once), and again by 4 readers taking 64 MiB pieces in turn (a deeper
             queue: the stricter floor where the disk rewards it)
  startup    `python -c "import layerwise.cli; torch.cuda.init()"`: imports and CUDA, no work
  extract    `layerwise extract CKPT --stream` (process wall time; its own recording seconds)
  test       `layerwise test CKPT --reference REF --test-type single --layer all`
  joint      `layerwise test CKPT --record-reference --reference REF2 --prompts ... --layer all`: both
             from one read of the checkpoint

and the goal's ratio (extract + test) / cold_read (< 2), the same against the faster of the two cold
reads, and joint / cold_read. For each command,
in seconds after its launch: its start-up stages (its manifest's), what it read from storage when
(its /proc/PID/io sampled every 10 ms: the first and last read, the gaps of over 0.1 s without one,
where the disk sat idle), when its manifest was written and when it exited. With --no-prefetch
each command also runs with LAYERWISE_PREFETCH=0 (no first layer read while it imports,
_prefetch.py), the two taking turns. The start-up step also reports how many
of the modules it imported had no usable cached bytecode (compiled from source, as `layerwise
check` reports it). With --bytecode-cache the three commands run again with a bytecode cache
(PYTHONPYCACHEPREFIX in --work, PYTHONDONTWRITEBYTECODE unset), filled by one untimed extract
first. With --profile, each command runs once more under cProfile (not timed) and the functions
with the most cumulative time are listed: where the time beyond the reads goes. Prints a table;
JSON to --out/isolated_profile.json.
Dry run on a CPU: --tiny.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pstats
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import (SRC, build_on_devices, drop_page_cache, layerwise_env, minimax_config,  # noqa: E402
                       proc_read_bytes, write_checkpoint)

from layerwise import runs  # noqa: E402

GOAL = 2.0  # (extract + test) / cold read


class Bench:
    def __init__(self, args):
        self.args = args
        self.ckpt, self.work = Path(args.dir), Path(args.work)
        self.gpu = torch.cuda.is_available() and not args.tiny
        self.env = layerwise_env(args.src, TOKENIZERS_PARALLELISM="false")
        if self.gpu:
            self.env["CUDA_VISIBLE_DEVICES"] = "0"

    def shards(self) -> list[Path]:
        return sorted(self.ckpt.glob("*.safetensors"))

    def setup(self) -> dict:
        self.work.mkdir(parents=True, exist_ok=True)
        config = minimax_config(self.args.layers, tiny=self.args.tiny)
        if not (self.ckpt / "config.json").exists():
            model = build_on_devices(config, {"": "cuda:0" if self.gpu else "cpu"}, torch.bfloat16)
            write_checkpoint(model, self.ckpt, shard="4GB")
            del model
            if self.gpu:
                torch.cuda.empty_cache()
        generator = torch.Generator().manual_seed(0)
        with open(self.work / "prompts.jsonl", "w") as fh:
            for _ in range(self.args.prompts):
                ids = torch.randint(0, config.vocab_size, (self.args.tokens,), generator=generator).tolist()
                fh.write(json.dumps({"token_ids": ids}) + "\n")
        size = sum(f.stat().st_size for f in self.shards())
        card = torch.cuda.get_device_name(0) if self.gpu else platform.processor() or "cpu"
        return {"layers": self.args.layers, "checkpoint_gb": size / 1e9, "prompts": self.args.prompts,
                "tokens": self.args.tokens, "card": card, "cores": os.cpu_count(), "src": self.args.src, "versions": runs.library_versions()}

    def cold_read(self) -> float:
        drop_page_cache(self.shards())
        start = time.perf_counter()
        for f in self.shards():
            with open(f, "rb", buffering=0) as fh:
                while fh.read(64 << 20):
                    pass
        return time.perf_counter() - start

    def cold_read_parallel(self, readers: int = 4, chunk: int = 64 << 20) -> float:
        """The shards read once by `readers` threads taking 64 MiB pieces in turn (positioned
        reads, which release the GIL): the disk's pace with a deeper queue than one reader's, the
        stricter floor (a command that reads in parallel can beat the single reader)."""
        drop_page_cache(self.shards())
        pieces = [(f, at) for f in self.shards() for at in range(0, f.stat().st_size, chunk)]
        lock, start = threading.Lock(), time.perf_counter()

        def read() -> None:
            buffer = bytearray(chunk)
            fds = {}
            try:
                while True:
                    with lock:
                        if not pieces:
                            return
                        f, at = pieces.pop(0)
                    fd = fds.get(f) or fds.setdefault(f, os.open(f, os.O_RDONLY))
                    os.preadv(fd, [buffer], at)
            finally:
                for fd in fds.values():
                    os.close(fd)

        threads = [threading.Thread(target=read) for _ in range(readers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - start

    def timed(self, argv: list, profile: Path | None = None, env: dict | None = None) -> tuple[float, str, dict]:
        """One fresh process on a cold page cache; its wall seconds, output (exit 0 required) and
        what it read from storage when (`StorageReads`), its launch as `launched_unix`."""
        drop_page_cache(self.shards())
        head = [sys.executable] + (["-m", "cProfile", "-o", str(profile)] if profile else [])
        launched, start = time.time(), time.perf_counter()
        child = subprocess.Popen(head + [str(a) for a in argv], env=env or self.env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        watch = StorageReads(child.pid, start)
        try:
            stdout, stderr = child.communicate(timeout=self.args.command_timeout)
        finally:
            child.kill()
            reads = watch.stop()
        wall = time.perf_counter() - start
        if child.returncode != 0:
            tail = "\n".join((stderr or stdout).strip().splitlines()[-12:])
            raise RuntimeError(f"{' '.join(map(str, argv[:3]))} exited {child.returncode}:\n{tail}")
        return wall, stdout, {**reads, "launched_unix": launched}

    def cached_env(self) -> dict:
        """The environment with a bytecode cache of its own (emptied first)."""
        cache = self.work / "pycache"
        shutil.rmtree(cache, ignore_errors=True)
        env = {k: v for k, v in self.env.items() if k != "PYTHONDONTWRITEBYTECODE"}
        return {**env, "PYTHONPYCACHEPREFIX": str(cache)}

    def commands(self) -> dict[str, list]:
        device = ["--device", "cuda:0"] if self.gpu else []
        ref, test = self.work / "ref", self.work / "test"
        return {
            "startup": ["-c", "import torch, layerwise.cli; torch.cuda.init() if torch.cuda.is_available() else None; "
                        "import json; from layerwise import machine; print(json.dumps(machine.bytecode().__dict__))"],
            "extract": ["-m", "layerwise", "extract", self.ckpt, "--stream", *device, "--dtype", "bf16",
                        "--prompts", self.work / "prompts.jsonl", "--out", ref, "--overwrite"],
            "test": ["-m", "layerwise", "test", self.ckpt, "--reference", ref, "--test-type", "single", "--layer", "all",
                     "--dtype", "bf16", *device, "--out", test, "--overwrite"],
            "joint": ["-m", "layerwise", "test", self.ckpt, "--record-reference", "--reference", self.work / "ref-joint",
                      "--prompts", self.work / "prompts.jsonl", "--test-type", "single", "--layer", "all", "--dtype",
                      "bf16", *device, "--out", self.work / "test-joint", "--overwrite"],
        }


class StorageReads:
    """What a child process read from storage (its /proc/PID/io `read_bytes`: page-cache misses it
    caused, its threads together), sampled every `every` seconds on a thread while it runs. `stop`
    gives the bytes, when the reads began and ended (seconds after `origin`, a perf_counter time),
    and the gaps of over `gap` seconds between them in which nothing was read: where the disk sat
    idle inside a command (None where /proc cannot say)."""

    def __init__(self, pid: int, origin: float, every: float = 0.01, gap: float = 0.1):
        self.pid, self.origin, self.every, self.gap = pid, origin, every, gap
        self.samples: list[tuple[float, int]] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while not self.done.is_set():
            value = proc_read_bytes(self.pid)
            if value is not None:
                self.samples.append((time.perf_counter() - self.origin, value))
            self.done.wait(self.every)

    def stop(self) -> dict:
        self.done.set()
        self.thread.join()
        rising = [(t, b) for (t, b), (_, before) in zip(self.samples[1:], self.samples) if b > before]
        if not rising:
            return {"read_gb": None}
        gaps = [[round(a, 2), round(b, 2)] for (a, _), (b, _) in zip(rising, rising[1:]) if b - a > self.gap]
        return {"read_gb": (rising[-1][1] - self.samples[0][1]) / 1e9, "first_read_s": rising[0][0],
                "last_read_s": rising[-1][0], "idle_gaps": gaps, "idle_s": sum(b - a for a, b in gaps)}


def top(profile: Path, n: int = 12) -> list[str]:
    """The `n` functions of most cumulative time in a cProfile dump (layerwise's, torch's, ...)."""
    stats = pstats.Stats(str(profile))
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][3])
    out = []
    for (file, line, name), (_, calls, _, cumulative, _) in rows:
        if name.startswith("<") and name != "<module>":
            continue
        where = "/".join(Path(file).parts[-2:])
        out.append(f"{cumulative:8.2f} s  {calls:>7}  {where}:{line}({name})")
        if len(out) == n:
            break
    return out


def command_timeline(reads: dict, stats: dict, manifest: Path, wall: float) -> dict:
    """Where a command's wall time went, in seconds after its launch: its start-up stages (from its
    manifest's stats), the storage reads (`StorageReads`), when its manifest was written and how
    long the process ran after its last read."""
    startup, launched = stats.get("startup") or {}, reads.pop("launched_unix")
    began = startup.get("process_start_unix")
    stages = [[s, round(at + began - launched, 2)] for s, at in startup.get("stages", [])] if began else []
    timeline = {"stages": stages, **reads, "manifest_s": manifest.stat().st_mtime - launched, "wall_s": wall}
    if reads.get("read_gb") is not None:
        timeline["after_last_read_s"] = wall - reads["last_read_s"]
    if stats.get("timeline_origin_unix") is not None:  # its phases per layer (the manifest's timeline)
        shift = stats["timeline_origin_unix"] - launched
        timeline["phases"] = [[p, k, round(a + shift, 3), round(b + shift, 3)] for p, k, a, b in stats["timeline"]]
    return timeline


def last_layers_line(t: dict) -> str:
    """The phases of a command's last two layers (a streamed extract's last: its norm and head),
    seconds after its launch."""
    phases = t.get("phases") or []
    last = max((k for _, k, _, _ in phases), default=None)
    if last is None:
        return ""
    parts = [f"layer {k}: " + ", ".join(f"{p} {a:.2f}-{b:.2f}" for p, kk, a, b in phases if kk == k)
             for k in (last - 1, last) if k >= 0]
    return "    " + "; ".join(parts)


def timeline_line(name: str, t: dict, cold_gbps: float) -> str:
    stages = ", ".join(f"{s} {at:.2f}" for s, at in t["stages"])
    if t.get("read_gb") is None:
        reads = "reads from storage not seen (/proc/PID/io)"
    else:
        span = t["last_read_s"] - t["first_read_s"]
        reads = (f"read {t['read_gb']:.1f} GB from storage from {t['first_read_s']:.2f} to {t['last_read_s']:.2f} s "
                 f"({t['read_gb'] / span if span > 0 else 0:.2f} GB/s against the cold read's {cold_gbps:.2f}; "
                 f"{t['idle_s']:.2f} s idle in {len(t['idle_gaps'])} gaps), "
                 f"{t['after_last_read_s']:.2f} s after the last read")
    line = f"  {name}: {stages}; manifest {t['manifest_s']:.2f}, exit {t['wall_s']:.2f} s; {reads}"
    return line + ("\n" + last_layers_line(t) if t.get("phases") else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--dir", default="/tmp/lw-isolated-ckpt", help="the synthetic checkpoint (kept for a rerun)")
    ap.add_argument("--work", default="/tmp/lw-isolated-work")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--profile", action="store_true", help="run extract and test once more under cProfile")
    ap.add_argument("--bytecode-cache", action="store_true",
                    help="run the commands again with a bytecode cache of their own (PYTHONPYCACHEPREFIX)")
    ap.add_argument("--no-prefetch", action="store_true",
                    help="each command again with LAYERWISE_PREFETCH=0, taking turns with the default")
    ap.add_argument("--no-joint", action="store_true", help="leave out the one-read test (--record-reference)")
    ap.add_argument("--src", default=str(SRC),
                    help="the layerwise code the commands run (default: this checkout's src/)")
    ap.add_argument("--command-timeout", type=float, default=600)
    ap.add_argument("--tiny", action="store_true", help="tiny dimensions on the CPU: a dry run")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bench = Bench(args)
    results = {"setup": bench.setup()}

    def save() -> None:  # after every step: a session cut short keeps what it measured
        (out / "isolated_profile.json").write_text(json.dumps(results, indent=1, default=str))

    commands = bench.commands()
    if args.no_joint:
        del commands["joint"]
    results["cold_read_s"] = bench.cold_read()
    results["cold_read_parallel_s"] = bench.cold_read_parallel()
    print(f"cold read: {results['cold_read_s']:.2f} s; 4 readers {results['cold_read_parallel_s']:.2f} s", flush=True)

    def timed(prefix: str, name: str, env: dict | None) -> None:
        results[f"{prefix}{name}_s"], printed, reads = bench.timed(commands[name], env=env)
        run = {"extract": "ref", "test": "test/isolated", "joint": "test-joint/isolated"}.get(name)
        stats = (lambda r: json.loads((bench.work / r / "manifest.json").read_text())["stats"])
        if name == "startup":
            results[f"{prefix}startup_bytecode"] = json.loads(printed.strip().splitlines()[-1])
        elif name == "extract":
            results[f"{prefix}extract_recording_s"] = stats(run).get("seconds")
        elif name == "test":
            results[f"{prefix}test_replay_s"], results[f"{prefix}test_load_s"] = stats(run).get("seconds"), \
                stats(run).get("load_seconds")
        elif name == "joint":
            results[f"{prefix}joint_test_s"] = stats(run).get("seconds")
        if run:  # the joint test's start-up is in the reference it records
            results[f"{prefix}{name}_timeline"] = command_timeline(
                reads, stats("ref-joint" if name == "joint" else run), bench.work / run / "manifest.json",
                results[f"{prefix}{name}_s"])
        print(f"{prefix}{name}: {results[f'{prefix}{name}_s']:.2f} s", flush=True)
        save()

    fastest = min(results["cold_read_s"], results["cold_read_parallel_s"])

    def steps(*variants: tuple[str, dict | None]) -> None:
        """Every command once per variant (prefix, environment), the variants taking turns."""
        for name in commands:
            for prefix, env in variants:
                timed(prefix, name, env)
        for prefix, _ in variants:
            both = results[f"{prefix}extract_s"] + results[f"{prefix}test_s"]
            results[f"{prefix}ratio"] = both / results["cold_read_s"]
            results[f"{prefix}ratio_fastest"] = both / fastest
            if f"{prefix}joint_s" in results:
                results[f"{prefix}joint_ratio"] = results[f"{prefix}joint_s"] / results["cold_read_s"]

    off = [("noprefetch_", {**bench.env, "LAYERWISE_PREFETCH": "0"})] if args.no_prefetch else []
    steps(("", None), *off)
    if args.bytecode_cache:
        env = bench.cached_env()
        results["cached_fill_s"] = bench.timed(commands["extract"], env=env)[0]  # fills the cache, untimed in the ratio
        steps(("cached_", env))
    if args.profile:
        for name in ("extract", "test"):
            dump = out / f"{name}.prof"
            bench.timed(commands[name], dump)
            results[f"{name}_profile"] = top(dump)
            save()
    save()
    s = results["setup"]
    lines = [f"isolated profile: {s['layers']} MiniMax-M2 layers ({s['checkpoint_gb']:.1f} GB bf16), {s['prompts']} "
             f"prompts x {s['tokens']} tokens; {s['card']}; cold read {results['cold_read_s']:.2f} s "
             f"({s['checkpoint_gb'] / results['cold_read_s']:.2f} GB/s), with 4 readers "
             f"{results['cold_read_parallel_s']:.2f} s ({s['checkpoint_gb'] / results['cold_read_parallel_s']:.2f} GB/s)"]
    gbps = s["checkpoint_gb"] / results["cold_read_s"]
    for prefix, what in (("", "as the environment runs"), ("noprefetch_", "without the first layer's prefetch "
                         "(LAYERWISE_PREFETCH=0)"), ("cached_", "with a bytecode cache")):
        if f"{prefix}ratio" not in results:
            continue
        r, code = (lambda k: results[prefix + k]), results[f"{prefix}startup_bytecode"]
        lines += [f"{what}: start-up (imports + CUDA) {r('startup_s'):.2f} s, {code['compiled']} of "
                  f"{code['modules']} modules compiled from source",
                  f"  extract --stream {r('extract_s'):.2f} s (recording {r('extract_recording_s'):.2f} s); "
                  f"test single all {r('test_s'):.2f} s (replay {r('test_replay_s'):.2f} s, "
                  f"reading and building {r('test_load_s'):.2f} s)",
                  f"  (extract + test) / cold read = {r('ratio'):.2f}x (goal < {GOAL:.0f}x); against the faster "
                  f"of the two cold reads {r('ratio_fastest'):.2f}x"]
        if f"{prefix}joint_s" in results:
            lines.append(f"  test --record-reference (one read for both) {r('joint_s'):.2f} s (reference and test "
                         f"{r('joint_test_s'):.2f} s): {r('joint_ratio'):.2f}x the cold read")
        lines += ["  each command, seconds after its launch:"] + [
            timeline_line(name, results[f"{prefix}{name}_timeline"], gbps) for name in ("extract", "test", "joint")
            if f"{prefix}{name}_timeline" in results]
    for name in ("extract", "test"):
        if f"{name}_profile" in results:
            lines += ["", f"{name} under cProfile, most cumulative time:"] + results[f"{name}_profile"]
    text = "\n".join(lines)
    print(text, flush=True)
    (out / "isolated_profile.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
