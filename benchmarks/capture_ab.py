"""The capture of two codes side by side in one process: this checkout's against another commit's.

A change to the capture's bookkeeping moves a short prompt's forward pass by a percent or two,
which two processes (or two machines) cannot tell from their noise. This script loads a second
copy of layerwise from `--base` (a `src/` tree of another commit, e.g. `git archive COMMIT src |
tar x -C /tmp/base`), imported under another package name, builds one MiniMax-M2-shaped model
(8 layers by default, seeded random bf16 weights, fp32 router, as extract_overhead.py) and, for
each batch x tokens, times in interleaved rounds (plain, this code, base code, plain, ...) the
plain forward pass and the forward pass with each code's capture (residual + router, every copy
on the host inside the timed region, the writer dropping the tensors): ratios to the plain
forward per round, median (min-max), and the median per-round difference of the two ratios; the
same for --run-batches batches in a row flushed once at the end (an extract's loop: it never
waits for a batch's files, which are cut while the next batch runs) against as many plain ones.

Then, without any forward pass, each code's bookkeeping alone: the tensors the hooks saw in one
batch handed to a Collector again and again (`take` for every hook, the flush, and the
completion thread's cutting into prompts, on this thread), milliseconds per batch, in turns, and
the median of each stage (STAGES); with --book-profile N, this code's N functions by own time
under cProfile.

    python benchmarks/capture_ab.py --base /tmp/base/src --shapes 1x128,1x512,4x128 --reps 9
    python benchmarks/capture_ab.py --tiny --base src      # a CPU dry run (this code against itself)

Writes capture_ab.json to --out.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import extract_overhead as eo  # noqa: E402
from synthetic import build_on_devices, minimax_config  # noqa: E402

from layerwise import capture, collector, loading, placement  # noqa: E402
from layerwise.anatomy import find_anatomy  # noqa: E402

BASE_NAME = "layerwise_base"
# the bookkeeping's stages: the hooks' `take`s, the flush's packing, copy launch and host views
# (`_copy`), waiting for the device-to-host copy, cutting into prompts and handing the files on
STAGES = ("take", "pack_and_launch", "copy_wait", "cut_and_hand")


def load_base(src: Path, scratch: Path):
    """(capture, collector) modules of the layerwise package under `src`, imported as BASE_NAME."""
    shutil.copytree(src / "layerwise", scratch / BASE_NAME)
    sys.path.insert(0, str(scratch))
    return importlib.import_module(f"{BASE_NAME}.capture"), importlib.import_module(f"{BASE_NAME}.collector")


def unload_base(scratch: Path) -> None:
    """Forget the base copy once its directory goes: no module of this process points at files
    that are gone (a later `layerwise check` in the same process counts them as uncached)."""
    for name in [m for m in sys.modules if m == BASE_NAME or m.startswith(BASE_NAME + ".")]:
        del sys.modules[name]
    if str(scratch) in sys.path:
        sys.path.remove(str(scratch))


def timed_forward(bench, codes: dict, b: int, t: int, reps: int, tiny: bool, run_batches: int) -> dict:
    """Each code's capture of one batch (flushed: every copy on the host in the timed region) and,
    with run_batches > 0, of that many batches in a row flushed once at the end, as an extract's
    loop runs them (a batch's files are cut while the next batch runs), against the plain forward."""
    batch, ids, mask = bench.inputs(b, t)
    model = bench.model

    def plain(count: int = 1):
        for _ in range(count):
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=mask, use_cache=False)

    variants, cols = {"plain": plain}, {}
    if run_batches:
        variants["plain_run"] = lambda: plain(run_batches)
    for name, (cap, col_module) in codes.items():
        col = col_module.Collector(eo.NullWriter(), bench.targets, copy_host_tensors=tiny)
        hooks = cap.Capture(model, bench.targets, col)

        def captured(count: int, col=col):
            for _ in range(count):
                col.start_batch(batch)
                plain()
            col.flush()
        for suffix, count in (("", 1), ("_run", run_batches)):
            if count:
                variants[name + suffix] = (hooks.__enter__, lambda c=count, f=captured: f(c),
                                           lambda _, h=hooks: h.__exit__(None, None, None))
        cols[name] = col
    times = eo.interleaved(variants, reps)
    for col in cols.values():
        col.close()
    row = {"batch": b, "tokens": t, "plain_ms": round(statistics.median(times["plain"]) * 1e3, 3),
           "run_batches": run_batches}
    for suffix, base in (("", "plain"), ("_run", "plain_run")) if run_batches else (("", "plain"),):
        ratios = {n: [v / p for v, p in zip(times[n + suffix], times[base])] for n in codes}
        for n, r in ratios.items():
            row[n + suffix] = {"median": statistics.median(r), "min": min(r), "max": max(r)}
        row[f"new_minus_base{suffix}"] = statistics.median(a - c for a, c in zip(ratios["new"], ratios["base"]))
    return row


def bookkeeping(bench, codes: dict, rounds: int, batches: int, profile_top: int = 0) -> dict:
    """Milliseconds per batch of each code's Collector on the tensors one batch's hooks saw; with
    profile_top, this code's `profile_top` functions by own time under cProfile (per batch)."""
    batch, ids, mask = bench.inputs(1, 128)
    seen = []

    class Recorder:
        def take(self, target, tensors):
            seen.append((target, tensors))

    with capture.Capture(bench.model, bench.targets, Recorder()), torch.inference_mode():
        bench.model(input_ids=ids, attention_mask=mask, use_cache=False)
    cols = {}
    for name, (_, col_module) in codes.items():
        col = col_module.Collector(eo.NullWriter(), bench.targets, copy_host_tensors=True)
        col.close()  # its completion thread ends: this thread does that work, timed
        cols[name] = col

    def one(col, stages):
        t0 = time.perf_counter()
        col._batch = batch
        for target, tensors in seen:
            col.take(target, tensors)
        held, col._held, col._held_bytes = col._held, [], 0
        t1 = time.perf_counter()
        item = col._copy(held)
        t2 = time.perf_counter()
        for event in item.done:  # on a GPU: the copies land before the buffers go back to the pool
            event.synchronize()
        t3 = time.perf_counter()
        col._finish(item)  # cut into prompts and handed on (either code's own way)
        t4 = time.perf_counter()
        for stage, seconds in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            stages[stage] += seconds
    spent = {name: [] for name in cols}
    parts = {name: {stage: [] for stage in STAGES} for name in cols}
    for _ in range(rounds):
        for name, col in cols.items():
            stages = dict.fromkeys(STAGES, 0.0)
            start = time.perf_counter()
            for _ in range(batches):
                one(col, stages)
            spent[name].append((time.perf_counter() - start) / batches * 1e3)
            for stage, seconds in stages.items():
                parts[name][stage].append(seconds / batches * 1e3)
    top = profiled(lambda: one(cols["new"], dict.fromkeys(STAGES, 0.0)), batches, profile_top) if profile_top else []
    return {"hooks": len(seen),
            "ms_per_batch": {n: {"median": statistics.median(v), "min": min(v), "max": max(v)} for n, v in spent.items()},
            "stages_ms": {n: {s: statistics.median(v) for s, v in p.items()} for n, p in parts.items()},
            "profile_ms_per_batch": top}


def profiled(call, batches: int, top: int) -> list:
    """[function, calls per batch, own ms per batch, cumulative ms per batch] of the `top`
    functions by own time over `batches` calls of `call` under cProfile (which inflates each)."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(batches):
        call()
    prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, function): (calls, primitive, own s, cumulative s, callers)}
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return [[f"{Path(f).name}:{line}({fn})", calls / batches, own / batches * 1e3, cum / batches * 1e3]
            for (f, line, fn), (_, calls, own, cum, _) in rows]


def measure(args, base) -> tuple[list, dict | None, str]:
    """The timed rounds of every shape, then the bookkeeping part; prints as it goes."""
    codes = {"new": (capture, collector), "base": base}
    config = minimax_config(args.layers, tiny=args.tiny)
    device_map = {"": "cpu"}
    if torch.cuda.is_available() and not args.tiny:
        meta = placement.meta_model(config, torch.bfloat16)
        free = [torch.cuda.mem_get_info(i)[0] for i in range(min(args.gpus, torch.cuda.device_count()))]
        device_map = placement.plan_placement(meta, free, "balanced", cpu_bytes=0,
                                              tokens=16384, dtype=torch.bfloat16).device_map
    model = build_on_devices(config, device_map, torch.bfloat16)
    anatomy = find_anatomy(model)
    bench = eo.Bench(model, anatomy, config, loading.input_device(model, anatomy))
    card = (torch.cuda.get_device_name(0) + (f" x{args.gpus}" if args.gpus > 1 else "")) \
        if torch.cuda.is_available() and not args.tiny else "cpu"
    rows = []
    for spec in filter(None, args.shapes.split(",")):
        b, t = map(int, spec.split("x"))
        rows.append(timed_forward(bench, codes, b, t, args.reps, args.tiny, args.run_batches))
        r = rows[-1]
        for suffix, what in (("", "one batch"), ("_run", f"{args.run_batches} in a row"))[:2 if args.run_batches else 1]:
            print(f"{b:>3} x {t:<5} plain {r['plain_ms']:8.2f} ms, {what:>11}: this code "
                  + "   base ".join(f"{r[n + suffix]['median']:.3f}x ({r[n + suffix]['min']:.3f}-"
                                    f"{r[n + suffix]['max']:.3f})" for n in codes)
                  + f"   difference {r['new_minus_base' + suffix]:+.4f}", flush=True)
    book = bookkeeping(bench, codes, args.book_rounds, 50 if args.tiny else 300,
                       args.book_profile) if args.book_rounds else None
    if book:
        print(f"bookkeeping of one batch ({book['hooks']} hooks, 1 x 128 tokens, hidden {config.hidden_size}, "
              "on this thread): "
              + ", ".join(f"{n} {v['median']:.3f} ms ({v['min']:.3f}-{v['max']:.3f})"
                          for n, v in book["ms_per_batch"].items()))
        for n, stages in book["stages_ms"].items():
            print(f"  {n}: " + ", ".join(f"{s} {v:.3f} ms" for s, v in stages.items()))
        for fn, calls, own, cum in book["profile_ms_per_batch"]:
            print(f"  profile (this code, under cProfile): {own:.4f} ms own, {cum:.4f} ms with callees, "
                  f"{calls:g} calls per batch: {fn}")
    return rows, book, card


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="a src/ tree of another commit (holding layerwise/)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--gpus", type=int, default=1, help="GPUs the model is placed over (balanced)")
    ap.add_argument("--shapes", default="1x128,1x512,4x128,16x128,1x1024", help="batch x tokens, comma list")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--run-batches", type=int, default=8,
                    help="also time this many batches in a row, flushed once (0: skip)")
    ap.add_argument("--book-rounds", type=int, default=5, help="rounds of the bookkeeping part (0: skip)")
    ap.add_argument("--book-profile", type=int, default=0, metavar="N",
                    help="also list this code's N functions by own time in the bookkeeping, under cProfile")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--tiny", action="store_true", help="shrunk dimensions, for a dry run on a CPU")
    args = ap.parse_args(argv)
    if not (Path(args.base) / "layerwise" / "collector.py").is_file():
        ap.error(f"--base {args.base}: no layerwise/collector.py under it (give a src/ tree of another commit)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="layerwise-ab-") as scratch:
        try:
            rows, book, card = measure(args, load_base(Path(args.base).resolve(), Path(scratch)))
        finally:
            unload_base(Path(scratch))
    (out / "capture_ab.json").write_text(json.dumps({"card": card, "base": args.base, "reps": args.reps,
                                                     "rows": rows, "bookkeeping": book}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
