"""Which part of the capture costs what, with the model over one GPU or several.

Builds the MiniMax-M2-shaped model of extract_overhead.py (8 layers by default, seeded random bf16
weights, fp32 router) over --gpus GPUs ("balanced", as `layerwise extract` places it) and times,
in interleaved rounds, the plain forward pass and the forward pass captured (residual + router,
the writer dropping the tensors, every copy on the host inside the timed region) by variants of
the capture, each taking one piece away or changing it:

  full        the capture as it is
  hooks       the hooks alone, into a sink that keeps nothing (the modules' hooked call path)
  hold        the hooks keep every tensor until the end of the batch, then drop them: no packing,
              no copy, no event, no completion thread work
  samestream  the copies on each device's compute stream instead of a copy stream of their own
  spin        the copies' events made without blocking synchronization (the completion thread
              spins in the driver instead of sleeping)
  nowait      nobody waits for the copies' events (the files are cut from buffers still being
              written: timing only)
  torchpinned the host buffers torch's pinned memory (cudaHostAlloc) instead of shared memory
              registered with CUDA (LAYERWISE_WRITER=threads while it runs)
  spinflush   the forward thread, completing a batch's last flush itself, polls its copies'
              events instead of sleeping on them (the completion thread still sleeps)

Ratios to the plain forward per round, median (min-max), and the CUDA device current on the
forward thread after each variant's rounds (the capture must leave it as it found it).

    python benchmarks/capture_variants.py --gpus 2 --shapes 4x128,1x512 --reps 7
    python benchmarks/capture_variants.py --tiny    # a CPU dry run

Writes capture_variants.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import extract_overhead as eo  # noqa: E402
from synthetic import build_on_devices, minimax_config  # noqa: E402

from layerwise import capture, loading, placement, writerproc  # noqa: E402
from layerwise.anatomy import find_anatomy  # noqa: E402
from layerwise.collector import Collector  # noqa: E402

VARIANTS = ("full", "hooks", "hold", "samestream", "spin", "nowait", "torchpinned", "spinflush")


class Hooks:
    """A sink that keeps nothing: what the hooks cost on their own."""

    def start_batch(self, batch) -> None:
        pass

    def take(self, target, tensors) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class Hold(Collector):
    """Keeps what the hooks saw until the end of the batch, then drops it: no copies."""

    def _copy(self, held, last=False):
        return None


class NoWait(Collector):
    """Cuts the files without waiting for the copies' events."""

    def _finish(self, item):
        item.done.clear()
        super()._finish(item)


class SpinFlush(Collector):
    """Polls the copies' events on the flushing thread (the completion thread sleeps on them)."""

    def _finish(self, item):
        if threading.current_thread() is not self._thread:
            for event in item.done:
                while not event.query():
                    pass
        super()._finish(item)


class SpinEvent(torch.cuda.Event):
    def __new__(cls, enable_timing=False, blocking=False, interprocess=False):
        return super().__new__(cls, enable_timing=enable_timing, blocking=False, interprocess=interprocess)


def sink_for(name: str, targets, tiny: bool):
    if name == "hooks":
        return Hooks()
    col = {"hold": Hold, "nowait": NoWait, "spinflush": SpinFlush}.get(name, Collector)(eo.NullWriter(), targets, copy_host_tensors=tiny)
    if name == "samestream" and torch.cuda.is_available():
        col.copier._streams = {torch.device("cuda", i): torch.cuda.current_stream(i) for i in range(torch.cuda.device_count())}
    return col


def timed(bench, names: list[str], b: int, t: int, reps: int, tiny: bool) -> dict:
    batch, ids, mask = bench.inputs(b, t)
    model = bench.model
    devices: dict[str, set] = {n: set() for n in names}

    def plain():
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask, use_cache=False)

    variants, sinks, kept, writer_env = {"plain": plain}, {}, torch.cuda.Event, os.environ.get(writerproc.ENV)
    for name in names:
        sink = sinks[name] = sink_for(name, bench.targets, tiny)
        hooks = capture.Capture(model, bench.targets, sink)

        def on(hooks=hooks, name=name):
            if name == "spin":
                torch.cuda.Event = SpinEvent
            if name == "torchpinned":
                os.environ[writerproc.ENV] = "threads"
            hooks.__enter__()

        def off(_, hooks=hooks, name=name):
            hooks.__exit__(None, None, None)
            torch.cuda.Event = kept
            if name == "torchpinned" and writer_env is None:
                os.environ.pop(writerproc.ENV, None)
            elif name == "torchpinned":
                os.environ[writerproc.ENV] = writer_env
            if torch.cuda.is_available():
                devices[name].add(torch.cuda.current_device())

        def captured(sink=sink):
            sink.start_batch(batch)
            plain()
            sink.flush()
        variants[name] = (on, captured, off)
    times = eo.interleaved(variants, reps)
    for sink in sinks.values():
        sink.close()
    row = {"batch": b, "tokens": t, "plain_ms": round(statistics.median(times["plain"]) * 1e3, 3)}
    for name in names:
        ratios = [v / p for v, p in zip(times[name], times["plain"])]
        row[name] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                     "current_device_after": sorted(devices[name])}
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--shapes", default="4x128,1x512,1x1024", help="batch x tokens, comma list")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--tiny", action="store_true", help="shrunk dimensions, for a dry run on a CPU")
    args = ap.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {', '.join(unknown)} (choose from {', '.join(VARIANTS)})")
    config = minimax_config(args.layers, tiny=args.tiny)
    gpu = torch.cuda.is_available() and not args.tiny
    device_map = {"": "cpu"}
    if gpu:
        meta = placement.meta_model(config, torch.bfloat16)
        free = [torch.cuda.mem_get_info(i)[0] for i in range(min(args.gpus, torch.cuda.device_count()))]
        device_map = placement.plan_placement(meta, free, "balanced", cpu_bytes=0, tokens=16384,
                                              dtype=torch.bfloat16).device_map
    model = build_on_devices(config, device_map, torch.bfloat16)
    anatomy = find_anatomy(model)
    bench = eo.Bench(model, anatomy, config, loading.input_device(model, anatomy))
    card = f"{torch.cuda.get_device_name(0)} x{len(free)}" if gpu else "cpu"
    print(f"model over {sorted({str(p.device) for p in model.parameters()})}; {card}", flush=True)
    rows = []
    for spec in filter(None, args.shapes.split(",")):
        b, t = map(int, spec.split("x"))
        r = timed(bench, names, b, t, args.reps, args.tiny)
        rows.append(r)
        print(f"{b:>3} x {t:<5} plain {r['plain_ms']:8.2f} ms: " + ", ".join(
            f"{n} {r[n]['median']:.3f}x ({r[n]['min']:.3f}-{r[n]['max']:.3f})" for n in names), flush=True)
    print("current device after each variant: " + ", ".join(
        f"{n} {sorted({d for r in rows for d in r[n]['current_device_after']})}" for n in names), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "capture_variants.json").write_text(json.dumps({"card": card, "reps": args.reps, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
