"""Moving a file from the page cache onto a GPU: which path, how many threads, one process or two.

A layer test or a streamed model reads each layer's weights from the page cache onto a GPU. With
torchrun's data parallelism two or more processes do it at once, each onto its own GPU, and the
speed-up of a read-bound layer test is what they move together against one process alone. This
measures, on warm files of --gb GB per process:

  pread     threads copy the file into pageable buffers (the page-cache copy alone, no GPU);
  h2d       one pinned buffer copied to the GPU (the host-to-GPU link alone, no file);
  copy      layerwise's read (tensorfile.read_tensors: pieces read into pinned staging buffers,
            copied to the GPU asynchronously, READ_THREADS threads);
  register  the file's pages mapped, registered with CUDA read-only (cudaHostRegister) in pieces
            and copied by DMA straight from the page cache: no copy by the CPU (64 MB pieces;
            register256: 256 MB pieces).

Every mode with 1 process and with --procs processes side by side (each on GPU i mod the GPUs),
all starting at one moment (a worker process per GPU, started once per mode); GB/s is every process's bytes over the span from the first start to
the last end. Each thread count's first read is not counted: it makes the threads and their
buffers (pinned memory is slow to make, and these VMs' memory grows on first use). Prints a table; JSON and markdown to --out. Dry run on any CPU: --tiny (the GPU
modes are then skipped).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from layerwise import tensorfile  # noqa: E402

GPU_MODES = ("h2d", "register", "register256")
PIECE = 64 << 20
_REGISTER_READ_ONLY = 8  # cudaHostRegisterReadOnly


def write_files(where: Path, count: int, gb: float) -> list[Path]:
    where.mkdir(parents=True, exist_ok=True)
    size = int(gb * 1e9) // PIECE * PIECE or PIECE
    paths = []
    for i in range(count):
        path = where / f"part{i}.safetensors"
        if not path.exists() or path.stat().st_size < size:
            on = "cuda" if torch.cuda.is_available() else "cpu"  # random bytes are made fastest on a GPU
            data = torch.randint(0, 256, (size,), dtype=torch.uint8, device=on).cpu()
            tensorfile.write_file(path, {"x": data}, {})
        paths.append(path)
    return paths


def data_span(path: Path) -> tuple[int, int]:
    with open(path, "rb") as fh:
        start = 8 + int.from_bytes(fh.read(8), "little")
    return start, path.stat().st_size - start


_local = threading.local()


def _pageable_buffer() -> memoryview:
    """This thread's reusable pageable buffer (as layerwise's readers keep their staging buffers)."""
    if getattr(_local, "buffer", None) is None:
        _local.buffer = memoryview(bytearray(PIECE))
    return _local.buffer


_POOLS: dict = {}


def pool_of(threads: int) -> ThreadPoolExecutor:
    """Threads kept from one read to the next (as layerwise's reading pool is)."""
    if threads not in _POOLS:
        _POOLS[threads] = ThreadPoolExecutor(threads)
    return _POOLS[threads]


def mode_pread(path: Path, threads: int, device: str) -> int:
    start, size = data_span(path)
    cuts = [start + size * i // threads for i in range(threads + 1)]

    def part(i: int) -> None:
        view = _pageable_buffer()
        fd = os.open(path, os.O_RDONLY)
        try:
            for offset in range(cuts[i], cuts[i + 1], PIECE):
                os.preadv(fd, [view[:min(PIECE, cuts[i + 1] - offset)]], offset)
        finally:
            os.close(fd)

    list(pool_of(threads).map(part, range(threads)))
    return size


def mode_h2d(path: Path, threads: int, device: str) -> int:
    _, size = data_span(path)
    size = min(size, 4 << 30)
    src = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(size, dtype=torch.uint8, device=device)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    return size, time.perf_counter() - t0


def mode_copy(path: Path, threads: int, device: str) -> int:
    tensorfile.READ_THREADS = threads
    got = tensorfile.read_tensors(path, ["x"], torch.device(device))
    if device != "cpu":
        torch.cuda.synchronize(device)
    LAST["x"] = got["x"]
    return got["x"].numel()


def mode_register(path: Path, threads: int, device: str, piece: int = PIECE) -> int:
    """The file mapped read-only; each thread registers its pieces with CUDA, copies them by DMA
    and unregisters each once its copy is done. Pieces end on page boundaries of the file, so no
    two pieces share a page (a page is registered once at a time)."""
    import numpy as np

    start, size = data_span(path)
    dst = torch.empty(size, dtype=torch.uint8, device=device)
    cudart = torch.cuda.cudart()
    fd = os.open(path, os.O_RDONLY)
    mapped = mmap.mmap(fd, 0, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED)
    whole = np.frombuffer(mapped, dtype=np.uint8)
    base = whole.ctypes.data
    first = -(-start // 4096) * 4096  # the first page boundary of the data
    bounds = [start] + list(range(first if first > start else first + piece, start + size, piece)) + [start + size]
    pieces = list(zip(bounds, bounds[1:]))
    cuts = [len(pieces) * i // threads for i in range(threads + 1)]

    def part(i: int) -> None:
        torch.cuda.set_device(device)
        stream = torch.cuda.Stream(device)
        for lo, hi in pieces[cuts[i]:cuts[i + 1]]:
            page_lo, page_hi = lo // 4096 * 4096, -(-hi // 4096) * 4096  # the mapping ends on a page
            err = cudart.cudaHostRegister(base + page_lo, page_hi - page_lo, _REGISTER_READ_ONLY)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister failed: error {int(err)}")
            try:
                src = torch.from_numpy(whole[lo:hi])
                with torch.cuda.stream(stream):
                    dst[lo - start:hi - start].copy_(src, non_blocking=True)
                stream.synchronize()
            finally:
                cudart.cudaHostUnregister(base + page_lo)

    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.from_numpy of a read-only array
            list(pool_of(threads).map(part, range(threads)))
        torch.cuda.synchronize(device)
    finally:
        del whole  # the mapping closes when the last view of it is gone
        os.close(fd)
    LAST["x"] = dst
    return size


def sampled_equal(path: Path, got: torch.Tensor) -> bool:
    """A byte every 64 KiB + 1 of what a read put on the device against the file (outside the clock)."""
    import numpy as np

    start, size = data_span(path)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        want = np.frombuffer(mapped, dtype=np.uint8)[start::65537].copy()
    return bool(torch.equal(got[::65537].cpu(), torch.from_numpy(want)))


LAST: dict = {}  # the last read's destination, checked by the worker after the clock stops
MODES = {"pread": mode_pread, "h2d": mode_h2d, "copy": mode_copy, "register": mode_register,
         "register256": lambda path, threads, device: mode_register(path, threads, device, 256 << 20)}


def worker(spec: str) -> None:
    """One process: MODE on FILE to DEVICE. Says "ready" once started; then for each line on its
    standard input (a thread count) reads once and prints the span as JSON."""
    mode, path, device = spec.split(",")
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
        torch.empty(1, device=device)  # CUDA started before the clock
    print("ready", flush=True)
    for line in sys.stdin:
        t0 = time.time()
        got = MODES[mode](Path(path), int(line), device)
        end = time.time()
        if isinstance(got, tuple):  # h2d times its copy alone
            got, seconds = got
            t0 = end - seconds
        if "x" in LAST and not sampled_equal(Path(path), LAST.pop("x")):
            raise SystemExit(f"{mode}: the bytes read differ from the file")
        print(json.dumps({"start": t0, "end": end, "bytes": got}), flush=True)


def measure(mode: str, threads: list[int], repeat: int, paths: list[Path], devices: list[str]) -> dict:
    """GB/s of the processes together, by thread count: `repeat` reads each, all processes at once."""
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", f"{mode},{p},{d}"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for p, d in zip(paths, devices)]
    try:
        for proc in procs:  # every process has imported torch and started CUDA
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(f"{mode}: a worker did not start")
        got = {}
        for n in threads:
            for turn in range(repeat + 1):  # the first read of each count is not counted: threads, buffers
                for proc in procs:
                    proc.stdin.write(f"{n}\n")
                    proc.stdin.flush()
                spans = [json.loads(proc.stdout.readline()) for proc in procs]
                seconds = max(s["end"] for s in spans) - min(s["start"] for s in spans)
                if not turn:
                    continue
                got.setdefault(n, []).append(sum(s["bytes"] for s in spans) / seconds / 1e9)
        return got
    finally:
        for proc in procs:
            proc.stdin.close()
            proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=8.0, help="GB per process")
    ap.add_argument("--threads", default="4,8,16")
    ap.add_argument("--modes", default="pread,h2d,copy,register,register256")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dir", default="/tmp/lw-read-paths")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--tiny", action="store_true", help="a CPU dry run on small files")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    gpus = torch.cuda.device_count()
    gb = 0.15 if args.tiny else args.gb
    paths = write_files(Path(args.dir), args.procs, gb)
    for path in paths:  # into the page cache
        mode_pread(path, 4, "cpu")
    modes = [m for m in args.modes.split(",") if gpus or m not in GPU_MODES]
    rows = []
    for mode in modes:
        threads = [1] if mode == "h2d" else [int(t) for t in args.threads.split(",")]
        for procs in sorted({1, args.procs}):
            devices = [f"cuda:{i % gpus}" if gpus else "cpu" for i in range(procs)]
            for n, got in measure(mode, threads, args.repeat, paths[:procs], devices).items():
                rows.append({"mode": mode, "threads": n, "procs": procs, "gbps": got})
                print(f"{mode:9s} threads {n:2d} procs {procs}: " + " / ".join(f"{g:.2f}" for g in got)
                      + " GB/s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name(0) if gpus else "cpu"
    (out / "read_paths.json").write_text(json.dumps({"card": card, "gpus": gpus, "cores": os.cpu_count(),
                                                     "gb_per_process": gb, "rows": rows}, indent=1))
    lines = [f"| mode | threads | processes | GB/s, all together ({card}, {os.cpu_count()} cores) |",
             "| --- | --- | --- | --- |"]
    lines += [f"| {r['mode']} | {r['threads']} | {r['procs']} | " + " / ".join(f"{g:.2f}" for g in r["gbps"]) + " |"
              for r in rows]
    (out / "read_paths.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
