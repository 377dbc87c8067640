"""What every byte an extract writes costs the CPU: NaN/Inf check, digest, page-cache write.

The run writer checks each tensor for NaN/Inf (`filebits.nonfinite`), hashes it (sha256, and
blake3 where the package is installed, for comparison) and writes it. This measures each of those
per core and with 1..N threads side by side on --mib MiB buffers (--files of them per thread),
in GB/s, and the machine's CPU layout (logical CPUs, threads per core), so that an extract's
writer throughput can be set against the forward pass it must keep up with.

Prints a table; JSON and markdown to --out. Dry run on any CPU: --tiny.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from layerwise import filebits  # noqa: E402


def cpu_layout() -> dict:
    cores = set()
    cpus = os.sched_getaffinity(0)
    for cpu in cpus:
        try:
            package = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/physical_package_id").read_text().strip()
            core = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/core_id").read_text().strip()
            cores.add((package, core))
        except OSError:
            pass
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?") if Path("/proc/cpuinfo").exists() else "?"
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {"logical_cpus": len(cpus), "physical_cores": len(cores) or None, "model": model,
            "sha_ni": " sha_ni" in flags, "avx512f": " avx512f" in flags}


def operations(work: Path) -> dict:
    ops = {"nonfinite (bf16)": lambda view, i: filebits.nonfinite(view, "BF16"),
           "sha256": lambda view, i: hashlib.sha256(view).digest()}
    try:
        import blake3
        ops["blake3"] = lambda view, i: blake3.blake3(view).digest()
    except ImportError:
        pass

    fresh = iter(range(1 << 30))

    def write(view, i):  # a new file each time, as an extract writes them (overwriting one frees its pages first)
        path = work / f"f{next(fresh)}"
        with open(path, "wb") as fh:
            fh.write(view)
    ops["page-cache write (new files)"] = write
    return ops


def throughput(op, buffers: list, threads: int, files: int) -> float:
    """GB/s of `threads` threads each running `op` over `files` buffers."""
    def one(t):
        for k in range(files):
            op(buffers[t % len(buffers)], t * files + k)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(threads)))  # warm
        start = time.perf_counter()
        list(pool.map(one, range(threads)))
        seconds = time.perf_counter() - start
    return threads * files * buffers[0].nbytes / seconds / 1e9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=4, help="bytes per buffer (a 16 x 256 extract's files are 3.4 MB)")
    ap.add_argument("--files", type=int, default=16, help="buffers per thread per measurement")
    ap.add_argument("--threads", default="1,8,16")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--tiny", action="store_true", help="small buffers, for a dry run")
    args = ap.parse_args(argv)
    if args.tiny:
        args.mib, args.files, args.threads = 1, 2, "1,2"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    counts = [int(x) for x in args.threads.split(",") if x]
    size = args.mib << 20
    rng = __import__("random").Random(0)
    buffers = [memoryview(bytes(rng.getrandbits(8) & 0x3F for _ in range(4096)) * (size // 4096))
               for _ in range(2)]  # finite bf16 bit patterns
    layout = cpu_layout()
    rows = []
    with tempfile.TemporaryDirectory(prefix="lw-digest-") as work:
        for name, op in operations(Path(work)).items():
            for old in Path(work).iterdir():  # the page cache holds no earlier measurement's files
                old.unlink()
            rows.append({"operation": name, **{f"{n}_threads_gbps": round(throughput(op, buffers, n, args.files), 3)
                                               for n in counts}})
            print(json.dumps(rows[-1]), flush=True)
    head = "| operation | " + " | ".join(f"{n} thread{'s' if n > 1 else ''} (GB/s)" for n in counts) + " |"
    text = (f"CPU: {layout['model']}, {layout['logical_cpus']} logical CPUs, {layout['physical_cores']} cores, "
            f"sha_ni {layout['sha_ni']}, avx512f {layout['avx512f']}; {args.mib} MiB buffers\n\n{head}\n"
            + "|---" * (len(counts) + 1) + "|\n"
            + "\n".join(f"| {r['operation']} | " + " | ".join(str(r[f'{n}_threads_gbps']) for n in counts) + " |"
                        for r in rows))
    print(text)
    (out / "digest_speed.json").write_text(json.dumps({"cpu": layout, "mib": args.mib, "rows": rows}, indent=1))
    (out / "digest_speed.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
