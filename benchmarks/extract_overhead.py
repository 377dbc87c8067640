"""What capturing every layer costs the forward pass, and what extract costs end to end, in one run.

A MiniMax-M2-shaped model (real hidden/head/expert dimensions, --layers layers, seeded random
bf16 weights, fp32 router) is built straight onto --gpus GPUs (balanced device map). For every
batch size (--batches) and prompt length (--tokens) it times, in interleaved rounds (A B C D A B
C D ...; --reps rounds after two warm-up rounds), the median and the spread:

  plain    model(ids, attention_mask)                        the baseline
  hidden   the same with output_hidden_states=True           transformers' own capture (stays on GPU)
  seed     a forward hook doing output.detach().cpu()         what the seed script did
  lw       layerwise capture (residual + router) with every   the forward-pass cost of capture
           copy on the host, writer discarding

Ratios are per round (lw_i / plain_i), reported as median (min-max). Where the time goes: for
--profile BxT, cProfile of the forward thread (seconds per forward in layerwise code), the CPU
seconds per forward of the capture's completion thread (from /proc), and a torch.profiler trace
(chrome JSON, gzipped) of one plain and one captured forward with the GPU's idle share.

End to end (--e2e, e.g. 16x256,16x4096; --e2e-repeat rounds): the wall time of the whole
`extract_model` call to disk (residual + router; opening the run, the forward pass, every file
written, the manifest) against the floor max(bare forward loop, bytes / page-cache write
bandwidth), both measured in the same round, and the same extract with a writer that drops
everything. Each round's trace says where the time went after the forward pass (every file's
write, the seconds in NaN/Inf checks and digests, when the capture closed, the manifest).
--writer-threads 4,8,16, --switch-interval 5,0.5 (the GIL's, ms), --writer process,threads (the
run writer's own processes reading shared buffers, or only this process's threads) and
--process-threads 8,3 (the most threads a writer process runs) run them side by side.

Prints tables; JSON and markdown to --out. Dry run on a CPU: --tiny.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import gzip
import json
import os
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from synthetic import build_on_devices, minimax_config  # noqa: E402

from layerwise import capture, loading, models, pinned, placement, runs, writerproc  # noqa: E402
from layerwise.collector import Collector  # noqa: E402
from layerwise import collector as collector_module  # noqa: E402
from layerwise import extract as extract_module  # noqa: E402
from layerwise.anatomy import find_anatomy  # noqa: E402
from layerwise.extract import ExtractOptions, extract_model, pin_ahead  # noqa: E402
from layerwise.prompts import Prompt, make_batches  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def interleaved(variants: dict, reps: int, warmup: int = 2, passes: int = 1) -> dict[str, list[float]]:
    """Seconds per round of each variant, rounds interleaved (A B C A B C ...) so that drift hits
    every variant alike. A variant is a callable or a (setup, call, teardown) triple. A round times
    `passes` calls of the variant back to back (each a whole forward pass, a capture's copies on the
    host before the next starts) and counts their mean: a short pass's jitter (a 128-token forward
    pass takes 18 ms) is then averaged over several before the rounds are paired."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(warmup + reps):
        for name, variant in variants.items():
            setup, call, teardown = variant if isinstance(variant, tuple) else (None, variant, None)
            state = setup() if setup else None
            sync()
            t0 = time.perf_counter()
            for _ in range(passes):
                call()
            sync()
            elapsed = (time.perf_counter() - t0) / passes
            if teardown:
                teardown(state)
            if round_ >= warmup:
                times[name].append(elapsed)
    return times


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt_spread(s: dict, unit: str) -> str:
    """median (min-max)"""
    return f"{s['median']:.3f}{unit} ({s['min']:.3f}-{s['max']:.3f})"


class NullWriter:
    """A sink that drops tensors at once (their pinned buffers go straight back to the pool)."""

    def __init__(self):
        self.bytes = 0

    def put(self, prompt, group, tensors, on_written=None, finite=frozenset()):
        self.bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        if on_written:
            on_written()


class NullRunWriter(NullWriter):
    """RunWriter's interface, writing nothing: extract's cost without the disk."""

    def __init__(self, path, intent, overwrite=False, threads=None, queue_depth=16, intent_later=False):
        super().__init__()
        self.path = self.target = Path(path)

    bytes_written = property(lambda self: self.bytes)

    def has(self, prompt, group):
        return False

    def finish(self, extra=None, entries=None, late=None):
        return {"tensors": []}

    def abort(self):
        pass


def page_cache_write_gbps(directory: Path, total_bytes: int, file_bytes: int, threads: int = 4) -> float:
    """GB/s writing `total_bytes` in files of `file_bytes` from `threads` threads (page cache)."""
    payload = os.urandom(min(file_bytes, 64 << 20))
    count = max(1, total_bytes // file_bytes)
    directory.mkdir(parents=True, exist_ok=True)
    todo, lock = list(range(count)), threading.Lock()

    def work():
        while True:
            with lock:
                if not todo:
                    return
                i = todo.pop()
            with open(directory / f"f{i}", "wb") as fh:
                left = file_bytes
                while left > 0:
                    fh.write(payload[:min(left, len(payload))])
                    left -= min(left, len(payload))

    t0 = time.perf_counter()
    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    seconds = time.perf_counter() - t0
    shutil.rmtree(directory)
    return count * file_bytes / seconds / 1e9


def thread_cpu_seconds(native_id: int) -> float:
    """CPU seconds (user + system) a thread of this process has used, from /proc."""
    try:
        fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


class Bench:
    def __init__(self, model, anatomy, config, input_device):
        self.model, self.anatomy, self.config, self.device = model, anatomy, config, input_device
        self.layers = list(range(anatomy.num_layers))
        self.targets = capture.plan_targets(anatomy, ("residual", "router"), tuple(self.layers))

    def inputs(self, batch: int, tokens: int):
        g = torch.Generator().manual_seed(batch * 100003 + tokens)
        prompts = [Prompt(i, None, tuple(torch.randint(0, self.config.vocab_size, (tokens,), generator=g).tolist()))
                   for i in range(batch)]
        b = make_batches(prompts, batch, 0)[0]
        return b, b.input_ids.to(self.device), b.attention_mask.to(self.device)

    def variants(self, batch, ids, mask, sink):
        model, anatomy = self.model, self.anatomy

        def plain():
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=mask, use_cache=False)

        def hidden():
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)

        store = {}

        def seed_on():
            def hook(name):
                def run(module, inputs, output):
                    store[name] = (output[0] if isinstance(output, tuple) else output).detach().cpu()
                return run
            return [model.get_submodule(anatomy.layer(i)).register_forward_hook(hook(i)) for i in self.layers]

        def off(handles):
            for h in handles:
                h.remove()

        collector = Collector(sink, self.targets)
        hooks = capture.Capture(model, self.targets, collector)

        def lw_on():
            hooks.__enter__()

        def captured():
            collector.start_batch(batch)
            plain()
            collector.flush()  # every copy landed on the host: inside the timed region

        # the same capture with a flush at every layer (flush_bytes=0, the design before FLUSH_BYTES), side by side
        each = Collector(NullWriter(), self.targets, flush_bytes=0)
        each_hooks = capture.Capture(model, self.targets, each)

        def each_captured():
            each.start_batch(batch)
            plain()
            each.flush()

        variants = {"plain": plain, "hidden": hidden, "seed": (seed_on, plain, off),
                    "lw": (lw_on, captured, lambda _: hooks.__exit__(None, None, None)),
                    "lw_each": (each_hooks.__enter__, each_captured, lambda _: each_hooks.__exit__(None, None, None))}
        self._each = each
        return variants, collector, store, captured, hooks

    def overhead(self, batch_size: int, tokens: int, reps: int, passes: int = 1) -> dict:
        batch, ids, mask = self.inputs(batch_size, tokens)
        sink = NullWriter()
        variants, collector, store, _, _ = self.variants(batch, ids, mask, sink)
        times = interleaved(variants, reps, passes=passes)
        collector.close()
        self._each.close()
        row = {"batch": batch_size, "tokens": tokens, "passes": passes}
        for name, values in times.items():
            row[f"{name}_ms"] = spread([v * 1e3 for v in values])
            if name != "plain":
                row[f"{name}_x"] = spread([v / p for v, p in zip(values, times["plain"])])
        row["lw_bytes"] = sink.bytes // ((reps + 2) * passes)
        row["seed_bytes"] = sum(v.numel() * v.element_size() for v in store.values())
        return row

    def where_time_goes(self, batch_size: int, tokens: int, out: Path, forwards: int = 20) -> dict:
        """cProfile of the forward thread, the completion thread's CPU, a torch.profiler trace."""
        batch, ids, mask = self.inputs(batch_size, tokens)
        sink = NullWriter()
        variants, collector, _, captured, hooks = self.variants(batch, ids, mask, sink)
        plain = variants["plain"]
        hooks.__enter__()
        for _ in range(3):
            captured()
        cpu0 = thread_cpu_seconds(collector._thread.native_id)
        profiler = cProfile.Profile()
        sync()
        t0 = time.perf_counter()
        profiler.enable()
        for _ in range(forwards):
            captured()
        profiler.disable()
        wall = (time.perf_counter() - t0) / forwards
        completion_cpu = (thread_cpu_seconds(collector._thread.native_id) - cpu0) / forwards
        stats = pstats.Stats(profiler)
        ours = {}
        for (file, line, func), (_, _, tottime, cumtime, _) in stats.stats.items():
            if "layerwise" in file and func in ("hook", "pre_hook", "take", "end_batch", "_copy", "start_batch",
                                                 "flush", "_tensors_of"):
                ours[f"{Path(file).name}:{func}"] = {"tottime_ms_per_forward": tottime / forwards * 1e3,
                                                      "cumtime_ms_per_forward": cumtime / forwards * 1e3}
        hooks.__exit__(None, None, None)
        traces = {}
        if torch.cuda.is_available():
            from torch.profiler import ProfilerActivity, profile

            for name, call in (("plain", plain), ("lw", captured)):
                if name == "lw":
                    hooks.__enter__()
                call()
                sync()
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    call()
                    sync()
                if name == "lw":
                    hooks.__exit__(None, None, None)
                path = out / f"trace_{name}_b{batch_size}_t{tokens}.json"
                prof.export_chrome_trace(str(path))
                traces[name] = gpu_idle(json.loads(path.read_text()))
                with open(path, "rb") as src, gzip.open(str(path) + ".gz", "wb") as dst:
                    shutil.copyfileobj(src, dst)
                path.unlink()
        collector.close()
        return {"batch": batch_size, "tokens": tokens, "forward_wall_ms": wall * 1e3, "layerwise_functions": ours,
                "completion_thread_cpu_ms_per_forward": completion_cpu * 1e3, "gpu_timeline": traces}

    def end_to_end(self, loaded, prompts: int, tokens: int, work: Path, repeat: int = 3,
                   writer_threads: int | None = None) -> dict:
        """`repeat` rounds of: the bare forward loop, the extract with a writer that drops everything,
        the real extract (wall time of the whole call, the manifest included, and its trace), the
        page cache's write bandwidth. Before each extract the process's pinned reserve is refilled
        and waited for, as `extract` pins it while the model loads."""
        g = torch.Generator().manual_seed(prompts * 7 + tokens)
        items = [torch.randint(0, self.config.vocab_size, (tokens,), generator=g).tolist() for _ in range(prompts)]
        options = ExtractOptions(points="residual,router", batch_size=prompts, overwrite=True,
                                 writer_threads=writer_threads)
        batch = make_batches([Prompt(i, None, tuple(x)) for i, x in enumerate(items)], prompts, 0)[0]
        ids, mask = batch.input_ids.to(self.device), batch.attention_mask.to(self.device)

        def loop():
            with torch.inference_mode():
                self.model(input_ids=ids, attention_mask=mask, use_cache=False)

        def refill():
            thread = pin_ahead(options)  # and starts the writer's process, as while a model loads
            if thread is not None:
                thread.join()
            for proc in writerproc.processes(options.writer_threads) or []:
                proc.ready()

        from layerwise import recording

        loop()
        sync()
        rounds = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            loop()
            sync()
            loop_s = time.perf_counter() - t0
            real = recording.RunWriter  # the writer a Recording opens
            recording.RunWriter = NullRunWriter
            try:
                refill()
                t0 = time.perf_counter()
                extract_model(loaded, work / "null", items, options)
                null_s = time.perf_counter() - t0
            finally:
                recording.RunWriter = real
            refill()
            with WriteTrace() as trace:
                e2e = extract_model(loaded, work / "run", items, options, progress=trace.progress)
            manifest = json.loads((work / "run" / "manifest.json").read_text())
            per_file = max(1, e2e.bytes // max(1, len(trace.files)))
            cache_gbps = page_cache_write_gbps(work / "disk", e2e.bytes, per_file)
            shutil.rmtree(work / "run", ignore_errors=True)
            floor = max(loop_s, e2e.bytes / (cache_gbps * 1e9))
            rounds.append({"wall_s": trace.wall, "recording_s": e2e.seconds, "forward_loop_s": loop_s,
                           "null_writer_s": null_s, "page_cache_gbps": cache_gbps, "floor_s": floor,
                           "ratio": trace.wall / floor, "trace": trace.summary(),
                           "capture": {k: v for k, v in manifest["stats"].items()
                                       if k in ("pinned_alloc_seconds", "capture_wait_seconds", "pinned_peak_bytes")}})
        mid = sorted(rounds, key=lambda r: r["ratio"])[len(rounds) // 2]
        return {"prompts": prompts, "tokens": tokens, "bytes": e2e.bytes, "files": len(trace.files),
                "writer_threads": writer_threads or (writerproc.process_threads() if writerproc.supported()
                                                     else runs.writer_threads()),
                "ratio": spread([r["ratio"] for r in rounds]), "wall_s": spread([r["wall_s"] for r in rounds]),
                "floor_s": spread([r["floor_s"] for r in rounds]),
                "null_writer_s": spread([r["null_writer_s"] for r in rounds]),
                "median_round": mid, "rounds": rounds, "peak_rss_gb": e2e.peak_rss_bytes / 1e9}


class WriteTrace:
    """Where an extract's time goes after its forward pass: every file the run writer writes
    (start, end, thread), the seconds its threads spend on NaN/Inf checks, digests and the writes
    themselves, when the forward call returned, when the capture closed, when the call ended."""

    def __init__(self):
        self.files: list[tuple] = []
        self.parts = {"nonfinite": 0.0, "digest": 0.0, "writer_close": 0.0, "writer_wait": 0.0, "entries": 0.0,
                      "manifest_draft": 0.0, "manifest_build": 0.0, "manifest_text": 0.0, "manifest_write": 0.0,
                      "completion_cpu": 0.0, "replies_cpu": 0.0}  # CPU of this process's threads beside the forward
        self.lock = threading.Lock()
        self.ends: dict[str, float] = {}
        self.origin = self.forward_start = self.forward_end = self.capture_end = self.wall = 0.0

    def progress(self, _):
        self.forward_end = time.perf_counter() - self.origin

    def _timed(self, owner, name: str, part: str | None = None):
        original = getattr(owner, name, None)
        if original is None:  # the code of a commit before it (a side-by-side run)
            return
        trace = self

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                end = time.perf_counter()
                with trace.lock:
                    if part is None:
                        trace.files.append((start - trace.origin, end - trace.origin, threading.get_ident()))
                    else:  # intent.json's text and write, on the thread that writes it beside the forward: apart
                        key = f"intent_{part}" if threading.current_thread().name == "layerwise-intent" else part
                        trace.parts[key] = trace.parts.get(key, 0.0) + end - start
                        trace.ends[key] = round(end - trace.origin, 6)  # when its last call returned
        setattr(owner, name, timed)
        self._undo.append((owner, name, original))

    def __enter__(self):
        from layerwise import recording, tensorfile

        self._undo = []
        trace = self
        self._timed(runs.RunWriter, "_write")
        write_file = tensorfile.write_file

        def counted(*args, **kwargs):  # a file this process's writer threads write: its checks' and digests' seconds
            spent: dict = {}
            try:
                return write_file(*args, spent=spent, **kwargs)
            finally:
                with trace.lock:
                    trace.parts["nonfinite"] += spent.get("nonfinite", 0.0)
                    trace.parts["digest"] += spent.get("digest", 0.0)
        tensorfile.write_file = counted
        self._undo.append((tensorfile, "write_file", write_file))
        self._timed(runs.RunWriter, "close", "writer_close")  # after the capture: the files still queued
        self._timed(runs.RunWriter, "wait", "writer_wait")  # inside close: the last files' replies
        self._timed(runs.RunWriter, "entries", "entries")
        self._timed(runs, "build_manifest", "manifest_build")  # a base's code (before 2 below)
        self._timed(runs.RunWriter, "_draft", "manifest_draft")  # the files written so far: beside the last ones
        self._timed(runs.RunWriter, "_drafted", "manifest_build")  # the rest, once every file is written
        if hasattr(runs, "ManifestDraft"):
            self._timed(runs.ManifestDraft, "text", "manifest_text")
        self._timed(runs, "json_text", "manifest_text")  # and intent.json's at the start (apart: intent_*)
        self._timed(runs, "write_text_atomic", "manifest_write")  # fsynced
        close = recording.Recording.close_capture

        self._timed(runs.RunWriter, "_handed", "handed")  # a reply taken in: its header kept (indexed)

        def in_process(start, end, checking, hashing, thread):  # a file the writer's own process wrote
            received = time.perf_counter() - trace.origin  # on the thread reading that process's replies
            with trace.lock:
                trace.files.append((start - trace.origin, end - trace.origin, f"process:{thread}"))
                trace.replies.append((end - trace.origin, received))
                trace.parts["nonfinite"] += checking
                trace.parts["digest"] += hashing
        writerproc.TRACE = in_process
        self._undo.append((writerproc, "TRACE", None))

        def close_capture(rec):
            seconds = close(rec)
            trace.capture_end = time.perf_counter() - trace.origin
            return seconds
        recording.Recording.close_capture = close_capture
        self._undo.append((recording.Recording, "close_capture", close))
        forward = extract_module._forward

        def forward_loop(*args, **kwargs):  # after the run is open (intent.json under way, the sink started)
            trace.forward_start = time.perf_counter() - trace.origin
            return forward(*args, **kwargs)
        extract_module._forward = forward_loop
        self._undo.append((extract_module, "_forward", forward))
        complete = collector_module.Collector._complete

        def completion(col):  # the completion thread: the capture's copies waited for, files handed over
            start = time.thread_time()
            try:
                return complete(col)
            finally:
                with trace.lock:
                    trace.parts["completion_cpu"] += time.thread_time() - start
        collector_module.Collector._complete = completion
        self._undo.append((collector_module.Collector, "_complete", complete))
        self._replies = replies_cpu()
        self.replies: list = []  # (a file's end in its writer process, its reply received here)
        self.collections: list = []  # (generation, seconds) of each garbage collection in the extract
        self._gc_start = 0.0

        def collected(phase, info):
            if phase == "start":
                trace._gc_start = time.perf_counter()
            else:
                trace.collections.append((info["generation"], time.perf_counter() - trace._gc_start))
        gc.callbacks.append(collected)
        self._collected = collected
        self.origin = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.origin
        self.parts["replies_cpu"] = replies_cpu() - self._replies
        gc.callbacks.remove(self._collected)
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        return False

    def summary(self) -> dict:
        files = sorted(self.files)
        busy = sum(end - start for start, end, _ in files)
        last = max((end for _, end, _ in files), default=0.0)
        r = lambda x: round(x, 6)  # noqa: E731 (a tiny file's digest takes microseconds)
        return {"forward_called_s": r(self.forward_start), "forward_returned_s": r(self.forward_end), "capture_closed_s": r(self.capture_end),
                "first_file_start_s": r(files[0][0]) if files else None, "last_file_end_s": r(last),
                "files_after_forward": sum(1 for _, end, _ in files if end > self.forward_end),
                "files_after_capture": sum(1 for _, end, _ in files if end > self.capture_end),
                "last_file_start_s": r(max((start for start, _, _ in files), default=0.0)),
                "writer_busy_s": r(busy), "writer_threads": len({t for *_, t in files}),
                "files_in_writer_process": sum(1 for *_, t in files if str(t).startswith("process:")),
                **{f"{part}_s": r(seconds) for part, seconds in self.parts.items()},
                "collections": [sum(1 for g, _ in self.collections if g == gen) for gen in range(3)],
                "collections_s": r(sum(seconds for _, seconds in self.collections)), "ends_s": dict(self.ends),
                "last_reply_s": r(max((got for _, got in self.replies), default=0.0)),
                "reply_lag_max_s": r(max((got - end for end, got in self.replies), default=0.0)),
                "after_last_file_s": r(self.wall - last), "wall_s": r(self.wall)}


def replies_cpu() -> float:
    """CPU seconds so far of this process's threads reading the writer processes' replies."""
    total = 0.0
    for thread in threading.enumerate():
        if thread.name == "layerwise-writer-replies" and thread.ident is not None:
            try:
                total += time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
            except (OSError, AttributeError):  # it ended meanwhile, or no such clock here
                pass
    return total


def gpu_idle(trace: dict) -> dict:
    """From a chrome trace: the span of GPU kernels and the share of it no kernel ran."""
    spans = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in trace.get("traceEvents", [])
                   if e.get("cat") in ("kernel", "gpu_memcpy") and "ts" in e)
    if not spans:
        return {}
    busy, end = 0.0, spans[0][0]
    for a, b in spans:
        if b > end:
            busy += b - max(a, end)
            end = b
    total = spans[-1][1] - spans[0][0] if spans else 0
    total = max(end - spans[0][0], total)
    return {"kernels": len(spans), "span_ms": total / 1e3, "gpu_idle_share": 1 - busy / total if total else 0.0}


def table(rows: list[dict], card: str, gpus: int) -> str:
    lines = [f"capture overhead, {card} x{gpus}: median (min-max) of paired rounds",
             "batch  tokens  passes   plain ms   output_hidden_states   seed .cpu() hook      layerwise (residual+router)"
             "   flush at every layer"]
    for r in rows:
        def x(name):
            s = r[f"{name}_x"]
            return f"{s['median']:.3f}x ({s['min']:.3f}-{s['max']:.3f})"
        lines.append(f"{r['batch']:>5}  {r['tokens']:>6}  {r['passes']:>6}  {r['plain_ms']['median']:>9.2f}   "
                     f"{x('hidden'):>20}  "
                     f"{x('seed'):>20}  {x('lw'):>26}  {x('lw_each'):>22}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--tokens", default="128,256,512,1024,2048,4096")
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--max-batch-tokens", type=int, default=65536, help="skip batch x tokens above this")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--passes", default="1", help="forward passes timed back to back in each round of each "
                    "variant, their mean counted (e.g. 1,8: each shape measured both ways, side by side)")
    ap.add_argument("--profile", default="1x512", help="BxT for the where-the-time-goes part ('' to skip)")
    ap.add_argument("--e2e", default="16x256,16x4096", help="end-to-end extracts, PxT ('' to skip)")
    ap.add_argument("--writer-threads", default="", help="the end-to-end extracts' writer threads, e.g. 4,8,16 "
                    "(each side by side; default: the run writer's own)")
    ap.add_argument("--process-threads", default="", help="the most threads a writer process runs "
                    "(writerproc.PROCESS_THREADS), e.g. 8,3 (each side by side; default: as set)")
    ap.add_argument("--switch-interval", default="", help="the interpreter's GIL switch intervals (ms) to run "
                    "the end-to-end extracts under, e.g. 5,0.5 (each side by side; default: as set)")
    ap.add_argument("--writer", default="", help="where the end-to-end extracts' files are written: process "
                    "(the writer's own process), threads (this process's), side by side: process,threads")
    ap.add_argument("--e2e-repeat", type=int, default=3, help="rounds of each end-to-end extract")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--work", default=None, help="where end-to-end runs are written (default: a temp dir)")
    ap.add_argument("--tiny", action="store_true", help="shrunk dimensions, for a dry run on a CPU")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = minimax_config(args.layers, tiny=args.tiny)
    dtype = torch.bfloat16
    meta = placement.meta_model(config, dtype)
    if torch.cuda.is_available() and not args.tiny:
        free = [torch.cuda.mem_get_info(i)[0] for i in range(min(args.gpus, torch.cuda.device_count()))]
        plan = placement.plan_placement(meta, free, "balanced", cpu_bytes=0, tokens=args.max_batch_tokens, dtype=dtype)
        device_map, card = plan.device_map, torch.cuda.get_device_name(0)
    else:
        plan = placement.plan_placement(meta, [], {"": "cpu"}, cpu_bytes=10**12, dtype=dtype)
        device_map, card = {"": "cpu"}, platform.processor() or "cpu"
    t0 = time.perf_counter()
    model = build_on_devices(config, device_map, dtype)
    build_s = time.perf_counter() - t0
    anatomy = find_anatomy(model)
    device = loading.input_device(model, anatomy)
    devices = sorted({str(p.device) for p in model.parameters()})
    weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    print(f"model: {args.layers} layers, {weights_gb:.1f} GB bf16 on {devices}; card {card}", flush=True)
    bench = Bench(model, anatomy, config, device)
    rows = []
    for b in map(int, args.batches.split(",")):
        for t in map(int, args.tokens.split(",")):
            if b * t > args.max_batch_tokens:
                continue
            for passes in map(int, args.passes.split(",")):
                rows.append(bench.overhead(b, t, args.reps, passes))
                print(json.dumps({k: v for k, v in rows[-1].items()
                                  if k.endswith("_x") or k in ("batch", "tokens", "passes")}), flush=True)
    profile = None
    if args.profile:
        b, t = map(int, args.profile.split("x"))
        profile = bench.where_time_goes(b, t, out)
        print(json.dumps(profile), flush=True)
    loaded = loading.LoadedModel(model, models.ModelRef("synthetic:minimax-m2", "checkpoint", None), [], plan,
                                 anatomy, build_s)
    work = Path(args.work or tempfile.mkdtemp(prefix="lw-bench-"))
    ends = []
    for spec in filter(None, args.e2e.split(",")):
        p, t = map(int, spec.split("x"))
        settings = [(w, n, i, k) for w in [x for x in args.writer.split(",") if x] or [None]
                    for n in [int(x) for x in args.writer_threads.split(",") if x] or [None]
                    for i in [float(x) for x in args.switch_interval.split(",") if x] or [None]
                    for k in [int(x) for x in args.process_threads.split(",") if x] or [writerproc.PROCESS_THREADS]]
        for where, threads, interval, per_process in settings:
            default, mode = sys.getswitchinterval(), os.environ.get(writerproc.ENV)
            kept, writerproc.PROCESS_THREADS = writerproc.PROCESS_THREADS, per_process
            if interval is not None:
                sys.setswitchinterval(interval / 1e3)
            if where is not None:
                os.environ[writerproc.ENV] = where
                pinned._RESERVE.clear()  # the reserve is refilled with buffers of this kind
            try:
                ends.append(bench.end_to_end(loaded, p, t, work, args.e2e_repeat, threads))
                ends[-1]["writer"] = "process" if writerproc.supported() else "threads"
            finally:  # the settings put back even when the extract fails (the next caller runs with them)
                sys.setswitchinterval(default)
                writerproc.PROCESS_THREADS = kept
                if mode is None:
                    os.environ.pop(writerproc.ENV, None)
                else:
                    os.environ[writerproc.ENV] = mode
                if where is not None:
                    pinned._RESERVE.clear()  # buffers of the kind the setting put back
            ends[-1]["switch_interval_ms"] = (interval if interval is not None else default * 1e3)
            ends[-1]["process_threads"] = per_process
            print(json.dumps(ends[-1]), flush=True)
    text = table(rows, card, len(devices))
    for e in ends:
        m = e["median_round"]
        text += (f"\nextract {e['prompts']} x {e['tokens']} (residual+router) to disk, {e['bytes'] / 1e9:.2f} GB in "
                 f"{e['files']} files, writer {e['writer']}, {e['writer_threads']} writer threads (at most "
                 f"{e['process_threads']} a process), switch interval {e['switch_interval_ms']:g} ms, "
                 f"{len(e['rounds'])} rounds: {fmt_spread(e['wall_s'], 's')} against the floor "
                 f"max(forward loop, bytes / page cache) {fmt_spread(e['floor_s'], 's')}: {fmt_spread(e['ratio'], 'x')}; "
                 f"writer dropping everything {fmt_spread(e['null_writer_s'], 's')}; median round: forward "
                 f"{m['forward_loop_s']:.3f} s, page cache {m['page_cache_gbps']:.1f} GB/s, trace {m['trace']}, "
                 f"capture {m['capture']}")
    print(text)
    log = {"card": card, "gpus": len(devices), "devices": devices, "layers": args.layers, "weights_gb": weights_gb,
           "versions": runs.library_versions(), "rows": rows, "profile": profile, "end_to_end": ends}
    name = f"extract_overhead_{len(devices)}gpu"
    (out / f"{name}.json").write_text(json.dumps(log, indent=1))
    (out / f"{name}.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
