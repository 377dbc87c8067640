"""Reading a run's mid-size tensors (a layer test's 25 MB activations), by path: what bounds compare there.

compare reads every tensor of two runs on worker threads, verifies each one's blake3 digest, and
hands it to the thread that measures it (on the GPU where there is one). On 25 MB tensors it ran at
1.2-1.7 GB/s on the 32-core GPU host, a third of what it does without verification. This times the
reading alone, warm, by path, with the measuring thread's copy to the GPU or without it:

  mapped  the file opened with safetensors for each tensor and the tensor taken from its memory map
          (what `Run.tensor` did); verifying hashes the mapped pages;
  pread   the header parsed once per file; each tensor read with preadv into a new pageable tensor,
          then hashed;
  pinned  the same into pinned memory from torch's caching host allocator (reused once freed); the
          measuring thread's copy to the GPU is then asynchronous (GPU only);
  pieces  preadv in 4 MiB pieces into a new pageable tensor, each piece hashed right after it is
          read, while it is in the CPU's cache.

Each with --threads worker threads, a window of --window-mb MB read ahead of the measuring thread
(as `readahead.read_units` keeps), verified (every digest checked against the one written) and not.
With --consume the measuring thread copies each tensor to cuda:0 and sums it there (a GPU is
needed; on the CPU it sums it). GB/s = the tensors' bytes / the time from the first read to the
last tensor consumed, best of --repeat. Prints a table; JSON and markdown to --out. --tiny: a dry
run on the CPU in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from layerwise import tensorfile  # noqa: E402
from layerwise.rawbytes import raw_bytes  # noqa: E402

PIECE = 4 << 20


def write_runs(where: Path, gb: float, tokens: int, hidden: int, per_file: int) -> tuple[list, dict]:
    """Files of `per_file` bf16 [tokens, hidden] tensors, about `gb` GB in all; (path, name) list
    and {(path, name): blake3 hex} of what was written."""
    where.mkdir(parents=True, exist_ok=True)
    nbytes = tokens * hidden * 2
    files = max(1, round(gb * 1e9 / nbytes / per_file))
    jobs, digests = [], {}
    gen = torch.Generator().manual_seed(0)
    for f in range(files):
        path = where / f"part{f}.safetensors"
        tensors = {f"t{i}": torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16) for i in range(per_file)}
        if not path.exists():
            tensorfile.write_file(path, tensors, {})
        for name, x in tensors.items():
            jobs.append((path, name))
            digests[(path, name)] = blake3.blake3(raw_bytes(x)).hexdigest()
    return jobs, digests


class Reader:
    """One path's way of reading a tensor (and hashing it when verifying)."""

    def __init__(self, mode: str, verify: bool, digests: dict):
        self.mode, self.verify, self.digests, self.headers = mode, verify, digests, {}

    def _span(self, path: Path, name: str):
        if path not in self.headers:
            with open(path, "rb") as fh:
                start = 8 + int.from_bytes(fh.read(8), "little")
            self.headers[path] = (start, tensorfile.read_header(path))
        start, header = self.headers[path]
        begin, end = header[name]["data_offsets"]
        return start + begin, end - begin, header[name]["shape"]

    def __call__(self, job) -> torch.Tensor:
        path, name = job
        if self.mode == "mapped":
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as fh:
                x = fh.get_tensor(name)
            got = blake3.blake3(raw_bytes(x)).hexdigest() if self.verify else None
        else:
            offset, size, shape = self._span(path, name)
            x = torch.empty(shape, dtype=torch.bfloat16, pin_memory=self.mode == "pinned")
            view, hasher = raw_bytes(x), blake3.blake3() if self.verify else None
            fd = os.open(path, os.O_RDONLY)
            try:
                step = PIECE if self.mode == "pieces" else size
                for at in range(0, size, step):
                    n = min(step, size - at)
                    if os.preadv(fd, [view[at:at + n]], offset + at) != n:
                        raise RuntimeError(f"{path} is short")
                    if hasher is not None and self.mode == "pieces":
                        hasher.update(view[at:at + n])
            finally:
                os.close(fd)
            if hasher is not None and self.mode != "pieces":
                hasher.update(view)
            got = hasher.hexdigest() if hasher is not None else None
        if got is not None and got != self.digests[job]:
            raise RuntimeError(f"{path}:{name} read wrong")
        return x


def timed(jobs, reader: Reader, threads: int, window: int, consume: bool) -> float:
    """Seconds from the first read to the last tensor consumed, reads `window` tensors ahead."""
    device = torch.device("cuda:0") if consume and torch.cuda.is_available() else None
    pool = ThreadPoolExecutor(threads)
    try:
        start, pending, queue = time.perf_counter(), iter(jobs), deque()
        total = torch.zeros((), device=device or "cpu")
        while True:
            while len(queue) < window and (job := next(pending, None)) is not None:
                queue.append(pool.submit(reader, job))
            if not queue:
                break
            x = queue.popleft().result()
            if consume:
                y = x.to(device, non_blocking=x.is_pinned()) if device is not None else x
                total += y.view(-1)[::4099].float().sum()
            else:
                x.view(-1)[::2048].sum()  # a mapped tensor not verified is not read: touch each page
            del x
        if device is not None:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start
    finally:
        pool.shutdown()


def table(rows: list[dict]) -> str:
    lines = ["| mode | verified | threads | consumed on | GB/s (best) | GB/s (each) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {'yes' if r['verify'] else 'no'} | {r['threads']} | {r['consumer']} | "
                     f"**{max(r['gbps']):.2f}** | {' / '.join(f'{g:.2f}' for g in r['gbps'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="bytes of tensors, in GB")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=3072)
    parser.add_argument("--per-file", type=int, default=8, help="tensors a file")
    parser.add_argument("--modes", default="mapped,pread,pinned,pieces")
    parser.add_argument("--threads", default="1,8,16")
    parser.add_argument("--window-mb", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--consume", default="none,gpu", help="none and/or gpu: what the measuring thread does")
    parser.add_argument("--dir", default="/tmp/lw-tensor-reads")
    parser.add_argument("--out", default="")
    parser.add_argument("--tiny", action="store_true", help="a CPU dry run: small tensors, 1 round")
    args = parser.parse_args(argv)
    if args.tiny:
        args.gb, args.tokens, args.hidden, args.per_file, args.repeat = 0.02, 64, 256, 4, 1
    gpu = torch.cuda.is_available()
    modes = [m for m in args.modes.split(",") if m and (gpu or m != "pinned")]
    jobs, digests = write_runs(Path(args.dir), args.gb, args.tokens, args.hidden, args.per_file)
    nbytes = args.tokens * args.hidden * 2
    window = max(1, (args.window_mb << 20) // nbytes)
    total = nbytes * len(jobs)
    for path in {path for path, _ in jobs}:  # warm: every file in the page cache
        path.read_bytes()
    rows = []
    for consume in [c for c in args.consume.split(",") if c in ("none", "gpu")]:
        for threads in [int(t) for t in args.threads.split(",")]:
            for verify in (True, False):
                for mode in modes:
                    reader = Reader(mode, verify, digests)
                    timed(jobs[:threads * 2], reader, threads, window, consume == "gpu")  # threads and buffers made
                    seconds = [timed(jobs, reader, threads, window, consume == "gpu") for _ in range(args.repeat)]
                    rows.append({"mode": mode, "verify": verify, "threads": threads,
                                 "consumer": ("cuda:0" if gpu else "cpu") if consume == "gpu" else "-",
                                 "gbps": [total / s / 1e9 for s in seconds]})
                    print(f"{mode:7s} verify={verify!s:5s} threads={threads:2d} consume={consume:4s} "
                          f"{max(rows[-1]['gbps']):6.2f} GB/s", flush=True)
    text = table(rows)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tensor_reads.json").write_text(json.dumps({"bytes": total, "tensor_bytes": nbytes, "rows": rows,
                                                           "cpus": os.cpu_count()}, indent=1))
        (out / "tensor_reads.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
