"""How fast does `compare` read two runs, against a raw read of the same files?

Writes two MiniMax-M2-shaped runs with RunWriter (bf16 residual stream [tokens, 3072] in and out
of each layer, fp32 router logits [tokens, 256], top-8 ids and weights, bf16 logits
[tokens, 200064]), the candidate a bf16-noisy copy of the reference, then times, on the same files:
  raw read     every file read once with large buffered reads (what the disk or page cache gives)
  read+blake3  the same, hashing every byte (what verification costs on one core)
  compare      compare_runs with verification of every digest (the default) and without it
Each timing runs cold (the runs' pages evicted from the page cache with posix_fadvise, so the
disk is read; only these files are touched) and warm (from the page cache, best of two). Prints
one table and updates this machine's row in the "compare throughput" section of BENCHMARKS.md,
with the load average at the start (other work slows every CPU-bound figure).

    python benchmarks/compare_throughput.py --gb 2          # two runs of ~2 GB each

--stream-mb 64,16 also times compare warm with readahead.STREAM_BYTES at each size (tensors that
large or larger streamed to the metrics' GPU through pinned buffers, the others read whole and
copied), taking turns for --stream-rounds rounds: which tensors are worth streaming.
--readers 1,8 also times readahead.read_units alone (compare's reading, nothing measured) warm,
with and without verification, with each number of reading threads: what verifying costs.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import blake3
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from layerwise import readahead  # noqa: E402
from layerwise.compare import CompareOptions, compare_runs  # noqa: E402
from layerwise.runs import RunWriter, open_run  # noqa: E402
from synthetic import drop_page_cache  # noqa: E402

HIDDEN, EXPERTS, TOP_K = 3072, 256, 8
SECTION = "## compare throughput"
HEADER = ("| machine | run size | raw read cold | raw read warm | read+blake3 warm | compare cold | compare warm "
          "| compare warm, no verify | compare / raw (cold) | load avg | commit |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def write_runs(root: Path, gb_per_run: float, tokens: int, vocab: int) -> tuple[tuple[Path, Path], str]:
    layer_bytes = 2 * tokens * HIDDEN * 2 + tokens * EXPERTS * 4 + 2 * tokens * TOP_K * 4
    layers = max(1, round((gb_per_run * 1e9 - tokens * vocab * 2) / layer_bytes))
    g = torch.Generator().manual_seed(0)
    intent = {"model": {"spec": "benchmark", "model_type": "minimax_m2", "num_layers": layers, "hidden_size": HIDDEN},
              "settings": {"dtype": "bfloat16"}, "anatomy": {"layers_path": "model.layers"},
              "prompts": [{"index": 0, "text": "benchmark", "token_ids": list(range(tokens))}]}
    paths = (root / "ref", root / "cand")
    writers = [RunWriter(p, intent) for p in paths]
    x = torch.randn(tokens, HIDDEN, generator=g)
    for i in range(layers):
        out = x + 0.1 * torch.randn(tokens, HIDDEN, generator=g)
        logits = torch.randn(tokens, EXPERTS, generator=g)
        weights, ids = torch.softmax(logits, -1).topk(TOP_K, -1)
        noise = 1 + 2 ** -8 * torch.randn(tokens, HIDDEN, generator=g)
        for writer, scale in zip(writers, (1.0, noise)):
            name = f"model.layers.{i}"
            writer.put(0, name, {f"{name}:input": (x * scale).to(torch.bfloat16),
                                 f"{name}:output": (out * scale).to(torch.bfloat16),
                                 f"{name}.mlp.gate:router_logits": logits, f"{name}.mlp.gate:topk_ids": ids.int(),
                                 f"{name}.mlp.gate:topk_weights": weights})
        x = out
    if vocab:  # the head's logits: the widest tensor of a run, and the slowest to measure (softmax, top-k)
        logits = torch.randn(tokens, vocab, generator=g) * 3
        noise = 1 + 2 ** -8 * torch.randn(tokens, vocab, generator=g)
        for writer, scale in zip(writers, (1.0, noise)):
            writer.put(0, "lm_head", {"lm_head:output": (logits * scale).to(torch.bfloat16)})
    for writer in writers:
        writer.finish()
    return paths, f"{layers} layers x {tokens} tokens" + (" + logits" if vocab else "")


def run_files(paths) -> list[Path]:
    return sorted(f for p in paths for f in (p / "tensors").rglob("*.safetensors"))


def raw_read(files, hash_it: bool = False) -> float:
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    start = time.perf_counter()
    for f in files:
        digest = blake3.blake3() if hash_it else None
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                if digest:
                    digest.update(view[:n])
    return time.perf_counter() - start


def raw_read_side_by_side(paths) -> float:
    """Each run's files read by a thread of its own, the two at once: what the disk gives two
    streams, as compare reads the two runs."""
    with ThreadPoolExecutor(2) as pool:
        start = time.perf_counter()
        list(pool.map(raw_read, [run_files([p]) for p in paths]))
    return time.perf_counter() - start


def timed_compare(paths, verify: bool, trace: dict | None = None) -> float:
    """compare_runs's seconds; `trace` gets when the last streamed tensor was in and verified
    (seconds from the start), where this code streams tensors."""
    ref, cand = open_run(paths[0]), open_run(paths[1])
    publish = readahead.Arrival._publish
    start = time.perf_counter()

    def traced(self, arrived=None, verified=False, error=None):
        publish(self, arrived, verified, error)
        if verified and trace is not None:
            trace["last tensor in and verified"] = time.perf_counter() - start

    readahead.Arrival._publish = traced
    try:
        report = compare_runs(ref, cand, CompareOptions(verify=verify))
    finally:
        readahead.Arrival._publish = publish
    seconds = time.perf_counter() - start
    assert report.rows, "nothing compared"
    return seconds


def stream_sizes(paths, sizes_mib: list[int], rounds: int) -> dict[int, list[float]]:
    """compare warm's seconds with readahead.STREAM_BYTES at each size, taking turns."""
    saved, out = readahead.STREAM_BYTES, {mib: [] for mib in sizes_mib}
    try:
        for _ in range(rounds if sizes_mib else 0):
            for mib in sizes_mib:
                readahead.STREAM_BYTES = mib << 20
                out[mib].append(timed_compare(paths, verify=True))
    finally:
        readahead.STREAM_BYTES = saved
    return out


def reading_only(paths, verify: bool, workers: int) -> float:
    """Seconds of compare's reading alone (read_units over the aligned units, every tensor's bytes
    touched, nothing measured), warm: best of two."""
    from layerwise.align import align_runs
    from layerwise.compare import _units

    ref, cand = open_run(paths[0]), open_run(paths[1])
    plan = align_runs(ref, cand)
    best = float("inf")
    for _ in range(2):
        start = time.perf_counter()
        for _p, _unit, tensors, _ in readahead.read_units({"ref": ref, "cand": cand}, _units(plan, plan.prompts),
                                                          verify, workers=workers):
            for x in tensors.values():  # a tensor not verified is mapped, not read: touch its pages
                x.view(-1)[::1024].sum()
        best = min(best, time.perf_counter() - start)
    return best


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    except (ValueError, OSError):
        mem = 0
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, torch {torch.__version__}"


def _commit() -> str:
    """The code measured: the short commit hash, or the date outside a git checkout."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return time.strftime("%Y-%m-%d")


def update_benchmarks_md(path: Path, row: str, key: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if not any(line.startswith(SECTION) for line in text.splitlines()):
        text = text.rstrip() + (f"\n\n{SECTION}\n\nWritten by `benchmarks/compare_throughput.py`: compare of two bf16 "
                                "runs (MiniMax-M2 shapes) against a raw read of the same files. Cold = the files' "
                                "pages evicted first.\n\n" + HEADER + "\n")
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(SECTION))  # the heading may name the script
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    rows = [i for i in range(start, end) if lines[i].startswith(f"| {key} |")]
    if rows:
        lines[rows[0]] = row
    else:
        last = max(i for i in range(start, end) if lines[i].startswith("|"))
        lines.insert(last + 1, row)
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.0, help="size of each run in GB (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of the one prompt (default: %(default)s)")
    parser.add_argument("--vocab", type=int, default=200064,
                        help="width of the lm_head logits in each run, 0 for none (default: MiniMax-M2's %(default)s)")
    parser.add_argument("--dir", help="where to write the runs (default: a temporary directory, deleted)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "BENCHMARKS.md"))
    parser.add_argument("--stream-mb", default="", help="comma list of MiB: compare warm with STREAM_BYTES at each")
    parser.add_argument("--stream-rounds", type=int, default=3)
    parser.add_argument("--readers", default="", help="comma list: read_units alone warm with that many threads")
    args = parser.parse_args(argv)
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="layerwise-bench-"))
    load = os.getloadavg()[0]  # other work on the machine slows every CPU-bound figure
    try:
        t = time.perf_counter()
        paths, shape = write_runs(root, args.gb, args.tokens, args.vocab)
        files = run_files(paths)
        size = sum(f.stat().st_size for f in files)
        print(f"wrote 2 runs, {size / 1e9:.2f} GB in {len(files)} files, in {time.perf_counter() - t:.0f} s",
              file=sys.stderr)
        results = {}
        drop_page_cache(files)
        results["raw read cold"] = raw_read(files)
        results["raw read warm"] = min(raw_read(files) for _ in range(2))
        results["read+blake3 warm"] = raw_read(files, hash_it=True)
        drop_page_cache(files)
        side_by_side = raw_read_side_by_side(paths)
        drop_page_cache(files)
        trace: dict = {}
        results["compare cold"] = timed_compare(paths, verify=True, trace=trace)
        results["compare warm"] = min(timed_compare(paths, verify=True) for _ in range(2))
        results["compare warm, no verify"] = min(timed_compare(paths, verify=False) for _ in range(2))
        by_size = stream_sizes(paths, [int(v) for v in args.stream_mb.split(",") if v.strip()], args.stream_rounds)
        readers = {(w, verify): reading_only(paths, verify, w) for w in [int(v) for v in args.readers.split(",")
                                                                          if v.strip()] for verify in (True, False)}
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    rate = {k: size / v / 1e9 for k, v in results.items()}
    width = max(map(len, rate))
    print(f"{'what':{width}}  GB/s   seconds   ({size / 1e9:.2f} GB, {machine()})")
    for k, v in rate.items():
        print(f"{k:{width}}  {v:5.2f}  {results[k]:8.2f}")
    ratio = rate["compare cold"] / rate["raw read cold"]
    print(f"compare cold / raw read cold = {ratio:.2f}")
    print(f"raw read cold, the two runs side by side: {size / side_by_side / 1e9:.2f} GB/s ({side_by_side:.2f} s)")
    for what, at in trace.items():
        print(f"compare cold: {what} at {at:.2f} s of {results['compare cold']:.2f} s")
    for mib, seconds in by_size.items():
        print(f"compare warm, tensors of {mib} MiB or more streamed: "
              + " / ".join(f"{size / x / 1e9:.2f}" for x in seconds) + " GB/s")
    for (workers, verify), seconds in readers.items():
        print(f"reading alone (read_units), {workers} thread(s), {'verified' if verify else 'not verified'}: "
              f"{size / seconds / 1e9:.2f} GB/s")
    key = f"{machine()} | {size / 1e9:.1f} GB ({shape})"  # one row per machine and kind of run
    row = (f"| {key} | " + " | ".join(f"{rate[k]:.2f} GB/s" for k in rate)
           + f" | {ratio:.2f} | {load:.1f} | {_commit()} |")
    update_benchmarks_md(Path(args.out), row, key)
    return 0


if __name__ == "__main__":
    sys.exit(main())
