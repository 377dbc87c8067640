"""compare cold and warm on the same two runs under settings of how its threads share the GIL, taking
turns, each round beside a raw cold read of the same files.

The settings (`--variants`, comma list, default all):
  as-is     the code as it is: tensorfile.PAGE_IN_HEAD (each file's header read with plain reads,
            GIL released, before safe_open reads it through its memory map, GIL held) and
            readahead.SWITCH_INTERVAL (Python's GIL switch interval, 0.2 ms, while runs are read)
  no-head   PAGE_IN_HEAD off
  5ms       SWITCH_INTERVAL 5 ms (Python's default)
  0.5ms, 0.2ms, 0.1ms  SWITCH_INTERVAL 0.5 ms (the value before 0.2 ms), 0.2 ms, 0.1 ms: the shorter,
            the sooner a reader holding the GIL gives it back to the measuring thread, which drops
            it at every torch op
  neither   both off: the code before them
  readers8, readers4, readers3, readers2, readers1  as it is, with 8, 4, 3, 2 or 1 reader threads of
            each kind (readahead.READ_WORKERS, streaming, and WHOLE_READERS*, reading whole; 8, and 4 or 2,
            by default): fewer threads to share the GIL with the measuring thread, still reading ahead
  whole8, whole4, whole2  as it is, with 8 (the value before 2), 4 or 2 threads reading whole
            (readahead.WHOLE_READERS and WHOLE_READERS_CPU, 4 and 2 by default)
  stream-all  as it is, with readahead.STREAM_BYTES = 1 MiB (default 16 MiB): every tensor of 1 MiB
            or more bound for a GPU (routers' aside) read with pread into pinned staging buffers,
            hashed and copied from there, as the large ones are, not read through a memory map
  stream-64 as it is, with readahead.STREAM_BYTES = 64 MiB (the value before 16 MiB)
  cpu-blocks-32m  as it is, with measuring.CHUNK_ELEMENTS = 1 << 22: metrics on the CPU in blocks of
            32 MiB of float64 per buffer (the value before 4 MiB)
  mmap-reads  as it is, with tensorfile.PLAIN_READS = False: tensors read whole through safetensors'
            memory map (the path before plain reads), which holds the GIL while it faults pages in
  unbatched as it is, with measuring.BATCH_BYTES = 0: on a GPU every tensor measured by tensor_metrics
            as it comes (the path before tensor metrics were batched over units)
Each compare is timed by function as compare_profile.py does: the measuring thread's seconds
waiting for the readers and in tensor_metrics (batched or not). The order of the settings turns each round; one
compare before the first round is not timed (the process's start-up would fall on one setting).

    python benchmarks/compare_knobs.py --gb 2 --tokens 1024 --rounds 3 --dir /tmp/knobs
    python benchmarks/compare_knobs.py --tiny          # a CPU dry run on two small runs it writes
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_profile import Timers  # noqa: E402
from compare_throughput import raw_read, run_files, write_runs  # noqa: E402
from synthetic import drop_page_cache  # noqa: E402

from layerwise import measuring, readahead, tensorfile  # noqa: E402
from layerwise.compare import CompareOptions, compare_runs  # noqa: E402
from layerwise.runs import open_run  # noqa: E402

VARIANTS = ("as-is", "no-head", "5ms", "0.5ms", "0.2ms", "0.1ms", "neither", "readers8", "readers4", "readers3",
            "readers2", "readers1", "whole8", "stream-all", "stream-64", "cpu-blocks-32m",
            "unbatched", "mmap-reads", "whole4", "whole2")


@contextlib.contextmanager
def setting(name: str):
    saved = (tensorfile.PLAIN_READS, tensorfile.PAGE_IN_HEAD, readahead.SWITCH_INTERVAL, readahead.READ_WORKERS,
             readahead.WHOLE_READERS, readahead.WHOLE_READERS_CPU, readahead.STREAM_BYTES, measuring.CHUNK_ELEMENTS,
             measuring.BATCH_BYTES)
    try:
        if name in ("no-head", "neither"):
            tensorfile.PAGE_IN_HEAD = False
        if name in ("5ms", "neither"):
            readahead.SWITCH_INTERVAL = 5e-3
        if name in ("0.5ms", "0.2ms", "0.1ms"):
            readahead.SWITCH_INTERVAL = float(name[:-2]) * 1e-3
        if name.startswith("readers"):
            readahead.READ_WORKERS = readahead.WHOLE_READERS = readahead.WHOLE_READERS_CPU = int(name[len("readers"):])
        if name in ("whole8", "whole4", "whole2"):
            readahead.WHOLE_READERS = readahead.WHOLE_READERS_CPU = int(name[len("whole"):])
        if name == "mmap-reads":
            tensorfile.PLAIN_READS = False
        if name == "stream-all":
            readahead.STREAM_BYTES = 1 << 20
        if name == "stream-64":
            readahead.STREAM_BYTES = 64 << 20
        if name == "cpu-blocks-32m":
            measuring.CHUNK_ELEMENTS = 1 << 22
        if name == "unbatched":
            measuring.BATCH_BYTES = 0
        yield
    finally:
        (tensorfile.PLAIN_READS, tensorfile.PAGE_IN_HEAD, readahead.SWITCH_INTERVAL, readahead.READ_WORKERS,
         readahead.WHOLE_READERS, readahead.WHOLE_READERS_CPU, readahead.STREAM_BYTES, measuring.CHUNK_ELEMENTS,
         measuring.BATCH_BYTES) = saved


def timed(paths, timers: Timers) -> tuple[float, float, float]:
    """compare's seconds, the measuring thread's seconds waiting for the readers and in tensor_metrics
    (batched or not)."""
    timers.clear()
    start = time.perf_counter()
    report = compare_runs(open_run(paths[0]), open_run(paths[1]), CompareOptions(verify=True))
    seconds = time.perf_counter() - start
    assert report.rows, "nothing compared"
    return (seconds, timers.seconds["waiting for the readers"],
            timers.seconds["tensor_metrics"] + timers.seconds["batch_tensor_metrics"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="size of each run in GB (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens of the one prompt (default: %(default)s)")
    parser.add_argument("--vocab", type=int, default=8, help="the head's logits' width (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--dir", help="where to write the runs (default: a temporary directory, deleted)")
    parser.add_argument("--out", help="also write the table to this file")
    parser.add_argument("--tiny", action="store_true", help="a CPU dry run: two small runs, one round")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    if args.tiny:
        args.gb, args.tokens, args.rounds = 0.004, 64, 1
    scratch = None if args.dir else tempfile.TemporaryDirectory(prefix="layerwise-knobs-")
    root = Path(args.dir or scratch.name)
    timers = Timers()
    rows, cold = [], {v: [] for v in variants}
    try:
        paths, shape = write_runs(root, args.gb, args.tokens, args.vocab)
        files = run_files(paths)
        size = sum(f.stat().st_size for f in files)
        timed(paths, timers)  # untimed: the process's start-up (CUDA, allocators) falls on no setting
        for r in range(args.rounds):
            drop_page_cache(files)
            raw = raw_read(files)
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            for v in order:
                with setting(v):
                    drop_page_cache(files)
                    c = timed(paths, timers)
                    w = timed(paths, timers)
                cold[v].append(raw / c[0])
                rows.append(f"| {r + 1} | {v} | {size / raw / 1e9:.2f} | {size / c[0] / 1e9:.2f} ({c[0]:.2f} s) | "
                            f"**{raw / c[0]:.2f}** | {c[1]:.2f} / {c[2]:.2f} s | {size / w[0] / 1e9:.2f} | "
                            f"{w[1]:.2f} / {w[2]:.2f} s |")
                print(rows[-1], flush=True)
    finally:
        timers.restore()
        if scratch is not None:
            scratch.cleanup()
    table = [f"{size / 1e9:.2f} GB: {shape}, two runs", "",
             "| round | setting | raw read cold GB/s | compare cold GB/s | compare / raw (cold) | cold: waiting for the "
             "readers / tensor_metrics | compare warm GB/s | warm: waiting / tensor_metrics |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |", *rows, "",
             "compare / raw (cold), min / median / max: " + "; ".join(
                 f"{v} {min(x):.2f} / {statistics.median(x):.2f} / {max(x):.2f}" for v, x in cold.items())]
    print("\n".join(table[-1:]))
    if args.out:
        Path(args.out).write_text("\n".join(table) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
