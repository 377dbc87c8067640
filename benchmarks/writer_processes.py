"""How fast the run writer's processes write a short extract's files, by how the threads are split
into processes (one GIL each).

A 16 x 256 extract of 8 MiniMax-M2 layers writes 128 files of 3.4 MB (a layer's input and output,
bf16 [256, 3072], router logits fp32 [256, 256], top-k weights and ids [256, 8]) from the shared
host buffers the capture's copies land in. This script lays out --files such files in one shared
buffer, and for each --configs entry PxT (P writer processes of T threads, `writerproc`) hands
them all to one `Handoff` over those processes (each file to the one with the fewest outstanding,
as a run writer does), --batches at a time (1: `Handoff.put`, one message each way a file; 16: a
flush's 16 files by `put_many`, one message to each process and one back), with their manifest
entries made there as a run's are, and waits until every file is written: wall time, GB/s, and this
process's CPU seconds; the buffer's bytes are rewritten before each (fresh from memory, as after a copy;
finite values, or with --nonfinite any bytes: NaN and Inf in every file, which the writer counts),
configurations taking turns for --rounds rounds. Median (min-max). JSON to --out.

    python benchmarks/writer_processes.py --configs 1x8,2x4,4x3,4x4,1x16
    python benchmarks/writer_processes.py --tiny          # a CPU dry run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from layerwise import writerproc  # noqa: E402
from layerwise.runs import group_file  # noqa: E402
from layerwise.pinned import new_buffer  # noqa: E402


def layout(files: int, tokens: int, hidden: int, experts: int):
    """(shared buffer, [{name: tensor}] per file): a layer's input, output, router logits and
    top-k weights in the buffer, top-k ids (int32, converted on the host) beside it."""
    parts = {"input": ((tokens, hidden), torch.bfloat16), "output": ((tokens, hidden), torch.bfloat16),
             "router_logits": ((tokens, experts), torch.float32), "topk_weights": ((tokens, 8), torch.float32)}
    sizes = {k: shape[0] * shape[1] * torch.empty((), dtype=dtype).element_size() for k, (shape, dtype) in parts.items()}
    buffer = new_buffer(sum(sizes.values()) * files, False)
    out, offset = [], 0
    for i in range(files):
        file = {}
        for role, (shape, dtype) in parts.items():
            file[f"model.layers.{i % 8}:{role}"] = buffer[offset:offset + sizes[role]].view(dtype).view(shape)
            offset += sizes[role]
        file[f"model.layers.{i % 8}:topk_ids"] = torch.zeros(tokens, 8, dtype=torch.int32)
        out.append(file)
    return buffer, out


def measure(args) -> dict:
    configs = [(*map(int, c.split("x")), b) for c in args.configs.split(",") if c
               for b in map(int, args.batches.split(","))]
    buffer, files = layout(args.files, args.tokens, args.hidden, args.experts)
    if writerproc.processes(1) is None:
        raise SystemExit("no writer processes here (not Linux, or LAYERWISE_WRITER=threads)")
    procs = {c: [writerproc.WriterProcess(c[1]) for _ in range(c[0])] for c in configs}  # each its own
    for group in procs.values():
        for proc in group:
            assert proc.ready(60), "a writer process did not start"
    spent: dict = {c: [] for c in configs}
    root = Path(tempfile.mkdtemp(prefix="lw-writers-", dir=args.work))
    try:
        for round_ in range(args.rounds):
            for c in configs:
                # bytes under 0x64: every bf16 / fp32 value finite, as a model's are; --nonfinite: any
                # bytes, NaN and Inf in every file (a run gone wrong from some layer on)
                buffer.random_(0, 256 if args.nonfinite else 100)
                handoff = writerproc.Handoff(procs[c], 16 + c[0] * c[1])
                where = root / f"r{round_}-{c[0]}x{c[1]}b{c[2]}"
                for p in range(-(-len(files) // 8)):
                    (where / f"p{p}").mkdir(parents=True)
                jobs = [(os.path.abspath(where / f"p{i // 8}" / f"l{i % 8}.safetensors"), {"prompt": str(i // 8)},
                         file, lambda header, err, _: None if err is None else print(f"failed: {err}"), frozenset(),
                         group_file(i // 8, f"model.layers.{i % 8}")) for i, file in enumerate(files)]
                cpu, start = time.process_time(), time.perf_counter()
                for at in range(0, len(jobs), c[2]):  # a batch of 1 is `Handoff.put`'s own message
                    handoff.put_many(jobs[at:at + c[2]])
                handoff.wait()
                spent[c].append((time.perf_counter() - start, time.process_time() - cpu))
                shutil.rmtree(where)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        for group in procs.values():
            for proc in group:
                proc.stop()
    gb = sum(t.nbytes for f in files for t in f.values()) / 1e9
    rows = []
    for c, values in spent.items():
        walls = [w for w, _ in values]
        rows.append({"processes": c[0], "threads_each": c[1], "batch": c[2], "gb": gb, "files": len(files),
                     "wall_s": {"median": statistics.median(walls), "min": min(walls), "max": max(walls)},
                     "gbps": gb / statistics.median(walls), "parent_cpu_s": statistics.median(u for _, u in values)})
        r = rows[-1]
        print(f"{c[0]} process(es) x {c[1]} threads, files handed {c[2]} at a time: {gb:.2f} GB in {len(files)} files in "
              f"{r['wall_s']['median'] * 1e3:.1f} ms ({r['wall_s']['min'] * 1e3:.1f}-{r['wall_s']['max'] * 1e3:.1f}), "
              f"{r['gbps']:.2f} GB/s; this process's CPU {r['parent_cpu_s'] * 1e3:.1f} ms", flush=True)
    return {"cores": os.cpu_count(), "rounds": args.rounds, "nonfinite": args.nonfinite, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="1x8,2x4,4x3,4x4,1x16", help="processes x threads each, comma list")
    ap.add_argument("--files", type=int, default=128)
    ap.add_argument("--batches", default="1", help="files handed over at a time, comma list (e.g. 1,16: side by side)")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=3072)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--nonfinite", action="store_true", help="any bytes: NaN and Inf in every file, counted")
    ap.add_argument("--work", default=None, help="where the files are written (default: the temp dir)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--tiny", action="store_true", help="a dry run: 8 small files, 2 rounds, 1x2 and 2x1")
    args = ap.parse_args(argv)
    if args.tiny:
        args.configs, args.files, args.tokens, args.hidden, args.experts, args.rounds = "1x2,2x1", 8, 8, 64, 16, 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "writer_processes.json").write_text(json.dumps(measure(args), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
