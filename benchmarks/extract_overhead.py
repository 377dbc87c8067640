"""What capturing every layer costs the forward pass, side by side, in one run.

A MiniMax-M2-shaped model (real hidden/head/expert dimensions, --layers layers, seeded random
bf16 weights, fp32 router) is built straight onto the GPUs with a balanced device map over
--gpus GPUs. For each prompt length it times, median of --reps after warm-up:

  plain       model(ids)                                    the baseline
  hidden      model(ids, output_hidden_states=True)         transformers' own capture (on GPU)
  seed_cpu    a hook doing output.detach().cpu() per layer  what the seed script did
  lw_forward  layerwise capture hooks (residual,router), async copies into pinned buffers,
              writer discarding: the forward-pass cost of capture
and end to end: `layerwise extract` of --prompts prompts to disk (residual,router), against the
floor max(plain forward time, bytes / disk write bandwidth measured in the same run).

Prints one table; with --bench-md appends it to BENCHMARKS.md. Dry run on a CPU: --tiny.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from synthetic import build_on_devices, minimax_config  # noqa: E402

from layerwise import capture, loading, models, placement, recording, runs  # noqa: E402
from layerwise.anatomy import find_anatomy  # noqa: E402
from layerwise.collector import Collector  # noqa: E402
from layerwise.extract import ExtractOptions, extract_model  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved(variants: dict, reps: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per variant, timed in interleaved rounds (A B C A B C ...) so that drift
    (clocks, caches, allocator state) hits every variant alike. A variant is a callable, or a
    (setup, call, teardown) triple for hooks that must be off while the others run."""
    def parts(v):
        return v if isinstance(v, tuple) else (None, v, None)

    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(warmup + reps):
        for name, variant in variants.items():
            setup, call, teardown = parts(variant)
            state = setup() if setup else None
            sync()
            t0 = time.perf_counter()
            call()
            sync()
            elapsed = time.perf_counter() - t0
            if teardown:
                teardown(state)
            if round_ >= warmup:
                times[name].append(elapsed)
    return {name: statistics.median(values) for name, values in times.items()}


class NullRunWriter:
    """RunWriter's interface, writing nothing: extract's cost without the disk."""

    def __init__(self, path, intent, overwrite=False, threads=None, queue_depth=runs.QUEUE_DEPTH):
        self.path, self.bytes_written = Path(path), 0

    def has(self, prompt, group):
        return False

    def put(self, prompt, group, tensors, on_written=None):
        self.bytes_written += sum(t.numel() * t.element_size() for t in tensors.values())
        if on_written:
            on_written()

    def finish(self, extra=None):
        return {"tensors": []}

    def abort(self):
        pass


class NullWriter:
    """A sink that drops tensors at once (their pinned buffers go straight back to the pool)."""

    def __init__(self):
        self.bytes = 0

    def put(self, prompt, group, tensors, on_written=None):
        self.bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        if on_written:
            on_written()


def disk_write_bandwidth(directory: Path, total_bytes: int, file_bytes: int, threads: int = 4) -> tuple[float, float]:
    """GB/s writing `total_bytes` in files of `file_bytes` from `threads` threads: (page cache, fsync'd)."""
    payload = os.urandom(min(file_bytes, 64 << 20))
    count = max(1, total_bytes // file_bytes)

    def run(fsync: bool) -> float:
        target = directory / ("fsync" if fsync else "cache")
        target.mkdir(parents=True, exist_ok=True)
        todo = list(range(count))
        lock = threading.Lock()

        def work():
            while True:
                with lock:
                    if not todo:
                        return
                    i = todo.pop()
                with open(target / f"f{i}", "wb") as fh:
                    left = file_bytes
                    while left > 0:
                        chunk = payload[: min(left, len(payload))]
                        fh.write(chunk)
                        left -= len(chunk)
                    if fsync:
                        fh.flush()
                        os.fsync(fh.fileno())

        t0 = time.perf_counter()
        pool = [threading.Thread(target=work) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        seconds = time.perf_counter() - t0
        shutil.rmtree(target)
        return count * file_bytes / seconds / 1e9

    return run(False), run(True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--tokens", default="1024,4096")
    ap.add_argument("--prompts", type=int, default=8, help="prompts in the end-to-end extract")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--work", default=None, help="where the end-to-end run is written (default: a temp dir)")
    ap.add_argument("--tiny", action="store_true", help="shrunk dimensions, for a dry run on a CPU")
    ap.add_argument("--bench-md", default=None, help="append the table to this BENCHMARKS.md")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    config = minimax_config(args.layers, tiny=args.tiny)
    dtype = torch.bfloat16
    meta = placement.meta_model(config, dtype)
    if torch.cuda.is_available():
        gpus = [torch.cuda.mem_get_info(i)[0] for i in range(min(args.gpus, torch.cuda.device_count()))]
        plan = placement.plan_placement(meta, gpus, "balanced", cpu_bytes=0, tokens=max(map(int, args.tokens.split(","))),
                                        dtype=dtype)
        device_map = plan.device_map
        card = torch.cuda.get_device_name(0)
    else:
        plan = placement.plan_placement(meta, [], {"": "cpu"}, cpu_bytes=10**12, dtype=dtype)
        device_map = {"": "cpu"}
        card = platform.processor() or "cpu"
    t0 = time.perf_counter()
    model = build_on_devices(config, device_map, dtype)
    build_s = time.perf_counter() - t0
    anatomy = find_anatomy(model)
    input_device = loading.input_device(model, anatomy)
    weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    devices = sorted({str(p.device) for p in model.parameters()})
    log = {"card": card, "gpus": len(devices), "devices": devices, "layers": args.layers, "weights_gb": weights_gb,
           "build_s": build_s, "versions": runs.library_versions(),
           "experts_implementation": getattr(config, "_experts_implementation", None),
           "placement": {k: str(v) for k, v in device_map.items()}, "rows": []}
    print(f"model: {args.layers} layers, {weights_gb:.1f} GB bf16 on {devices}; built in {build_s:.1f} s; card {card}",
          flush=True)

    layers_list = list(range(anatomy.num_layers))
    rows = []
    for tokens in map(int, args.tokens.split(",")):
        ids = torch.randint(0, config.vocab_size, (1, tokens), device=input_device)

        def plain():
            with torch.inference_mode():
                model(input_ids=ids, use_cache=False)

        def hidden():
            with torch.inference_mode():
                model(input_ids=ids, use_cache=False, output_hidden_states=True)

        seed_store = {}

        def seed_hook(name):
            def hook(module, inputs, output):
                hs = output[0] if isinstance(output, tuple) else output
                seed_store[name] = hs.detach().cpu()
            return hook

        def seed_on():
            return [model.get_submodule(anatomy.layer(i)).register_forward_hook(seed_hook(i)) for i in layers_list]

        def hooks_off(handles):
            for h in handles:
                h.remove()

        from layerwise.prompts import Prompt, make_batches

        targets = capture.plan_targets(anatomy, ("residual", "router"), tuple(layers_list))
        sink = NullWriter()
        collector = Collector(sink, targets)
        batch = make_batches([Prompt(0, None, tuple(ids[0].tolist()))], 1, 0)[0]
        hooks = capture.Capture(model, targets, collector)

        def lw_on():
            hooks.__enter__()
            collector.start_batch(batch)

        def lw_off(_):
            hooks.__exit__(None, None, None)

        def captured():
            plain()
            collector.flush()  # every copy landed on the host: inside the timed region

        t = interleaved({"plain": plain, "hidden": hidden, "seed": (seed_on, plain, hooks_off),
                         "lw": (lw_on, captured, lw_off), "plain_again": plain}, args.reps)
        collector.close()
        seed_bytes = sum(v.numel() * v.element_size() for v in seed_store.values())
        lw_bytes = sink.bytes // (args.reps + 2)
        row = {"tokens": tokens, "plain_ms": t["plain"] * 1e3, "plain_again_ms": t["plain_again"] * 1e3,
               "hidden_ms": t["hidden"] * 1e3, "seed_cpu_ms": t["seed"] * 1e3, "lw_forward_ms": t["lw"] * 1e3,
               "seed_bytes": seed_bytes, "lw_bytes": lw_bytes}
        rows.append(row)
        print(json.dumps(row), flush=True)

    # End to end: extract --prompts prompts of the longest length to disk, residual + router.
    tokens = max(map(int, args.tokens.split(",")))
    work = Path(args.work or tempfile.mkdtemp(prefix="lw-bench-"))
    items = [torch.randint(0, config.vocab_size, (tokens,)).tolist() for _ in range(args.prompts)]
    loaded = loading.LoadedModel(model, models.ModelRef("synthetic:minimax-m2", "checkpoint", None), [], plan,
                                 anatomy, build_s)
    e2e_options = ExtractOptions(points="residual,router", batch_size=1, overwrite=True)
    # where the end-to-end time goes: the bare forward loop extract runs (with its attention masks),
    # then extract with a writer that drops everything, then the real extract to disk
    ids_list = [torch.tensor([x], device=input_device) for x in items]
    mask = torch.ones_like(ids_list[0])

    def forward_loop():
        with torch.inference_mode():
            for ids in ids_list:
                model(input_ids=ids, attention_mask=mask, use_cache=False)

    forward_loop()
    sync()
    t0 = time.perf_counter()
    forward_loop()
    sync()
    loop_s = time.perf_counter() - t0
    real_writer = recording.RunWriter  # what every producer's Recording writes through
    recording.RunWriter = NullRunWriter
    try:
        null_e2e = extract_model(loaded, work / "null", items, e2e_options)
    finally:
        recording.RunWriter = real_writer
    e2e = extract_model(loaded, work / "run", items, e2e_options)
    per_file = max(1, e2e.bytes // max(1, args.prompts * args.layers))
    cache_bw, fsync_bw = disk_write_bandwidth(work / "disk", e2e.bytes, per_file)
    shutil.rmtree(work / "run", ignore_errors=True)
    floor_cache = max(loop_s, e2e.bytes / (cache_bw * 1e9))
    floor_fsync = max(loop_s, e2e.bytes / (fsync_bw * 1e9))
    end = {"prompts": args.prompts, "tokens": tokens, "bytes": e2e.bytes, "seconds": e2e.seconds,
           "forward_loop_s": loop_s, "null_writer_s": null_e2e.seconds, "null_writer_forward_s": null_e2e.forward_seconds,
           "forward_seconds": e2e.forward_seconds, "gb_per_s": e2e.gb_per_s, "disk_cache_gb_s": cache_bw,
           "disk_fsync_gb_s": fsync_bw, "floor_cache_s": floor_cache, "floor_fsync_s": floor_fsync,
           "ratio_vs_cache_floor": e2e.seconds / floor_cache, "ratio_vs_fsync_floor": e2e.seconds / floor_fsync,
           "peak_rss_gb": e2e.peak_rss_bytes / 1e9, "pinned_peak_gb": e2e.pinned_peak_bytes / 1e9}
    print(json.dumps(end), flush=True)
    log["rows"], log["end_to_end"] = rows, end
    (out / "extract_overhead.json").write_text(json.dumps(log, indent=1))

    v = log["versions"]
    lines = [f"### extract overhead: {card} x{len(devices)}, MiniMax-M2 dims, {args.layers} layers "
             f"({weights_gb:.1f} GB bf16), torch {v['torch']}, transformers {v['transformers']}",
             "", "| tokens | plain ms | plain again ms | output_hidden_states | seed .cpu() hook | layerwise capture "
             "(residual+router) | bytes seed / layerwise |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["plain_ms"]
        lines.append(f"| {r['tokens']} | {p:.1f} | {r['plain_again_ms']:.1f} | {r['hidden_ms']:.1f} ({r['hidden_ms'] / p:.3f}x) "
                     f"| {r['seed_cpu_ms']:.1f} ({r['seed_cpu_ms'] / p:.2f}x) | {r['lw_forward_ms']:.1f} "
                     f"({r['lw_forward_ms'] / p:.3f}x) | {r['seed_bytes'] / 1e6:.0f} MB / {r['lw_bytes'] / 1e6:.0f} MB |")
    lines += ["", f"Where end-to-end time goes ({args.prompts} x {tokens} tokens): bare forward loop {loop_s:.2f} s, "
              f"extract with a writer that drops everything {null_e2e.seconds:.2f} s, to disk {e2e.seconds:.2f} s."]
    lines += ["", f"End to end, `extract` of {args.prompts} x {tokens} tokens (residual+router) to local disk: "
              f"{end['bytes'] / 1e9:.2f} GB in {end['seconds']:.2f} s ({end['gb_per_s']:.2f} GB/s); disk write "
              f"measured in the same run {cache_bw:.2f} GB/s to page cache, {fsync_bw:.2f} GB/s fsync'd; "
              f"floor max(forward loop {loop_s:.2f} s, bytes/disk) = {floor_cache:.2f} s (cache) / "
              f"{floor_fsync:.2f} s (fsync): ratio {end['ratio_vs_cache_floor']:.2f}x / {end['ratio_vs_fsync_floor']:.2f}x; "
              f"peak host RSS {end['peak_rss_gb']:.1f} GB, pinned {end['pinned_peak_gb']:.1f} GB.", ""]
    table = "\n".join(lines)
    print(table)
    (out / "extract_overhead.md").write_text(table + "\n")
    if args.bench_md:
        with open(args.bench_md, "a") as fh:
            fh.write("\n" + table + "\n")


if __name__ == "__main__":
    main()
