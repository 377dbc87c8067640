"""Where a layer test's or a streamed extract's time goes, and what a process pays once on a
GPU, paid early.

`Timings` is their clock (replay._run_layers, pipeline._Stage, streaming._decoder_layers):
seconds per phase, and per layer a timeline, into the runs' manifest stats; a phase whose work is
on a GPU can end when the GPU has done it (an event, read at the end). `warm_device` makes what
the first forward pass on a GPU would otherwise make on the test's path (cuBLAS's handle and
workspace, the capture's first pinned host buffers) while the first layer is still being read (and
streaming.rehearse the kernels of the layer's own first forward pass). `mark` notes the stages a
process reaches, from its start-up (imports, joining a torchrun job, opening runs and models) to
its work's end (capture closed, files written), `startup` lists them in seconds since the process
began, into the same stats: where the time before and after the work went.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch

from . import pinned
from .collector import PINNED_BUDGET_BYTES


class Timings:
    """Seconds the schedule spent per phase (`with clock("build", layer): ...`), written into every
    track's manifest stats as `<phase>_seconds`: where a layer test's time went. With the layer,
    each interval also goes into the stats' `timeline` as [phase, layer, start, end] (seconds
    since the schedule began, at `timeline_origin_unix`): which layer waited on what, and when.
    `timed` runs a call on another thread (the layer reader) into the timeline only; `until_done`
    ends a phase when the GPU has done its work (`settle` reads when, at the end)."""

    def __init__(self):
        self.origin, self.origin_unix = time.perf_counter(), time.time()  # the unix time lines up ranks
        self.seconds: dict[str, float] = {}
        self.timeline: list[list] = []
        self._open: list[tuple] = []  # (phase, layer, start, event, device) until settled

    @contextlib.contextmanager
    def __call__(self, phase: str, layer: int | None = None):
        start = time.perf_counter()
        try:
            yield
        finally:
            self._close(phase, layer, start, time.perf_counter())

    def timed(self, phase: str, layer: int, call, *args):
        start = time.perf_counter()
        try:
            return call(*args)
        finally:
            self._mark(phase, layer, start, time.perf_counter())

    def until_done(self, phase: str, layer: int, start: float, device: torch.device) -> None:
        """Phase `phase` of `layer`, begun at `start` (this clock) on this thread, ends when the GPU
        has done what this thread queued on `device` so far: an event, read by `settle`, no wait
        here. On a CPU it ends now."""
        if device.type != "cuda":
            return self._close(phase, layer, start, time.perf_counter())
        done = torch.cuda.Event(enable_timing=True)
        done.record(torch.cuda.current_stream(device))
        self._open.append((phase, layer, start, done, device))

    def settle(self) -> None:
        """End the phases `until_done` left open when their GPU work was done. Waits for the GPU;
        called when its work is over, so an event recorded now completes at once and ties the GPU's
        clock to this one (no wait on the way)."""
        anchors: dict = {}
        for phase, layer, start, done, device in self._open:
            if device not in anchors:
                now = torch.cuda.Event(enable_timing=True)
                now.record(torch.cuda.current_stream(device))
                now.synchronize()
                anchors[device] = (now, time.perf_counter())
            now, at = anchors[device]
            self._close(phase, layer, start, max(start, at - done.elapsed_time(now) / 1000))
        self._open.clear()

    def _close(self, phase: str, layer: int | None, start: float, end: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + end - start
        self._mark(phase, layer, start, end)

    def _mark(self, phase: str, layer: int | None, start: float, end: float) -> None:
        if layer is not None:  # list.append: one call under the GIL, safe from the reader thread
            self.timeline.append([phase, layer, round(start - self.origin, 4), round(end - self.origin, 4)])

    def stats(self) -> dict:
        """`<phase>_seconds`, `timeline` and `timeline_origin_unix`, as the manifest's stats hold them."""
        return {**{f"{k}_seconds": round(v, 4) for k, v in self.seconds.items()},
                "timeline": sorted(self.timeline, key=lambda e: e[2]),
                "timeline_origin_unix": round(self.origin_unix, 4)}

    def into(self, tracks) -> None:
        for track in tracks:
            track.recording.timings.update(self.stats())
            track.recording.timings["startup"] = startup()


_MARKS: dict[str, float] = {}  # stage -> unix time this process last reached it


def mark(stage: str) -> None:
    """This process's start-up has reached `stage` (listed by `startup`; a stage reached again, by
    a second command in one process, keeps its last time)."""
    _MARKS[stage] = time.time()


def startup() -> dict:
    """When this process began (unix time; None where /proc cannot say) and the stages it reached
    (`mark`), in the order of their times, each in seconds since it began (since the first stage
    without /proc)."""
    began = process_start_unix()
    stages = sorted(_MARKS.items(), key=lambda item: item[1])
    origin = began if began is not None else (stages[0][1] if stages else 0.0)
    return {"process_start_unix": None if began is None else round(began, 3),
            "stages": [[stage, round(at - origin, 3)] for stage, at in stages]}


def process_start_unix() -> float | None:
    """When this process began, from /proc (Linux; to the kernel's clock tick), else None."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time in ticks since boot
        since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)  # /proc/stat's btime is whole seconds: too coarse
        return time.time() - since_boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def warm_device(device: torch.device, dtype: torch.dtype, capture_bytes: int | None = None) -> None:
    """On a GPU: pin the capture's first host buffers in the background (pinned.reserve: the
    first RESERVE_BYTES of the pool's budget, or the `capture_bytes` expected in flight where
    fewer; with them, tests of 8 MiniMax-M2 layers on 2 H200s pinned at most 0.07 s on their
    forward threads) and run one small matrix product (cuBLAS's handle and workspace are made on
    the first one)."""
    if device.type != "cuda":
        return
    pinned.reserve(PINNED_BUDGET_BYTES, capture_bytes)
    square = torch.ones(256, 256, device=device, dtype=dtype)
    torch.matmul(square, square).sum().item()
