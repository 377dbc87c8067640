"""How fast this machine's storage gives a checkpoint's bytes back from a cold page cache, by how many
requests are in flight: one thread reading one file after another (isolated_profile.py's floor)
against the prefetch's own reader (`layerwise._prefetch._read`: CHUNK-sized preads taken in order
by T threads), for several T and chunk sizes.

The isolated profile's two commands read 1.9x the floor's bytes, so they can come under 2x the
floor only if they read faster than its one thread does. This says whether more requests in flight
make the disk faster here, and how many it takes.

    python benchmarks/cold_reads.py --dir /tmp/lw-isolated-ckpt --gb 8 --threads 4,8,16,32 --repeat 2
    python benchmarks/cold_reads.py --tiny                           # CPU dry run (tests/test_benchmarks.py)

--dir's files matching --glob are read (their first --gb GB together); where there are none,
--gb GB of incompressible files are written there first (and kept). Before every read the files'
pages are dropped (fsync, POSIX_FADV_DONTNEED), and what the read took from storage is this
process's /proc/self/io read_bytes: a "from storage" under 1.0 means part came from memory and
the figure is not a cold one. Settings take turns, round after round. Prints a table; JSON to
--out/cold_reads.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import drop_page_cache, proc_read_bytes  # noqa: E402

from layerwise import _prefetch  # noqa: E402


def spans(files: list[Path], limit: int) -> list[tuple[Path, int, int]]:
    """(file, 0, length) in order, `limit` bytes in all."""
    out, left = [], limit
    for f in files:
        if left <= 0:
            break
        take = min(f.stat().st_size, left)
        out.append((f, 0, take))
        left -= take
    return out


def one_thread(parts: list[tuple[Path, int, int]], chunk: int) -> int:
    """The floor's read: each file from its start, `chunk` bytes a read, one after another."""
    done = 0
    for path, _, length in parts:
        with open(path, "rb", buffering=0) as fh:
            while done_here := len(fh.read(min(chunk, length))):
                done += done_here
                length -= done_here
                if length <= 0:
                    break
    return done


def pooled(parts: list[tuple[Path, int, int]], chunk: int, threads: int) -> int:
    """The prefetch's read (`_prefetch._read`) of the same bytes with `chunk` and `threads`."""
    saved = _prefetch._CHUNK
    _prefetch._CHUNK = chunk
    try:
        return _prefetch._read([parts], budget=sum(p[2] for p in parts), threads=threads)
    finally:
        _prefetch._CHUNK = saved


def make_files(directory: Path, total: int, count: int = 4) -> list[Path]:
    """`count` files of incompressible bytes, `total` in all, written and fsynced."""
    directory.mkdir(parents=True, exist_ok=True)
    block = os.urandom(min(64 << 20, max(1, total // count)))
    files = []
    for i in range(count):
        path = directory / f"cold-{i}.bin"
        with open(path, "wb") as fh:
            left = total // count
            while left > 0:
                left -= fh.write(block[:left])
            fh.flush()
            os.fsync(fh.fileno())
        files.append(path)
    return files


def where(directory: Path) -> dict:
    """The mount holding `directory` (device, filesystem) and its block device's read-ahead."""
    best = ("", "", "")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fs = line.split()[:3]
            if str(directory.resolve()).startswith(mnt) and len(mnt) >= len(best[1]):
                best = (dev, mnt, fs)
    except OSError:
        pass
    readahead = None
    name = Path(best[0]).name
    for candidate in (name, name.rstrip("0123456789").removesuffix("p")):
        ra = Path("/sys/block") / candidate / "queue" / "read_ahead_kb"
        if candidate and ra.is_file():
            readahead = int(ra.read_text())
            break
    return {"device": best[0], "mount": best[1], "filesystem": best[2], "read_ahead_kb": readahead}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/tmp/lw-isolated-ckpt")
    ap.add_argument("--glob", default="*.safetensors")
    ap.add_argument("--gb", type=float, default=8.0, help="GB read a setting (written first if --dir has none)")
    ap.add_argument("--threads", default="4,8,16,32", help="the prefetch reader's thread counts")
    ap.add_argument("--chunk-mb", default="64", help="its read sizes, MiB (the one-thread floor reads 64)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--tiny", action="store_true", help="32 MB in a temporary folder: a dry run")
    args = ap.parse_args(argv)
    directory = Path(args.dir)
    total = int((0.032 if args.tiny else args.gb) * 1e9)
    files = sorted(directory.glob(args.glob)) if directory.is_dir() else []
    if not files:
        files = make_files(directory, total)
    parts = spans(files, total)
    size = sum(p[2] for p in parts)
    settings = {"1 thread, one file after another": lambda: one_thread(parts, 64 << 20)}
    for mb in (int(m) for m in args.chunk_mb.split(",")):
        for t in (int(t) for t in args.threads.split(",")):
            settings[f"{t} threads x {mb} MiB"] = lambda t=t, mb=mb: pooled(parts, mb << 20, t)
    results: dict[str, list[dict]] = {name: [] for name in settings}
    for _ in range(args.repeat):
        for name, read in settings.items():
            drop_page_cache([p[0] for p in parts])
            before, start = proc_read_bytes(), time.perf_counter()
            got = read()
            seconds = time.perf_counter() - start
            after = proc_read_bytes()
            if got != size:
                raise RuntimeError(f"{name}: read {got} bytes of {size}")
            stored = None if before is None or after is None else (after - before) / size
            results[name].append({"s": seconds, "gbps": size / seconds / 1e9, "from_storage": stored})
    info = {"bytes": size, "files": [str(p[0]) for p in parts], "cores": os.cpu_count(), **where(directory)}
    print(f"cold reads of {size / 1e9:.2f} GB in {len(parts)} files, {info['device']} "
          f"({info['filesystem']}, read-ahead {info['read_ahead_kb']} KiB), {args.repeat} rounds in turns")
    print(f"{'setting':34s} {'GB/s min / median / max':>26s} {'from storage':>13s}")
    for name, rows in results.items():
        rates = sorted(r["gbps"] for r in rows)
        stored = [r["from_storage"] for r in rows if r["from_storage"] is not None]
        cold = f"{min(stored):.2f}-{max(stored):.2f}" if stored else "?"
        print(f"{name:34s} {rates[0]:8.2f} / {statistics.median(rates):5.2f} / {rates[-1]:5.2f} {cold:>13s}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "cold_reads.json").write_text(json.dumps({**info, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
