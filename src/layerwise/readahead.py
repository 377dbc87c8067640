"""Reading several runs side by side, ahead of their use: what compare measures arrives read and
verified while the previous tensors are being measured, within a memory window.

A large tensor (STREAM_BYTES or more) bound for a GPU is streamed there while it is read: a reader
thread reads it in STREAM_PIECE pieces into a few pinned staging buffers, back to back, while
another hashes each piece as it lands (blake3 is a stream) and copies it to the GPU
asynchronously. Reading a 4096-token prompt's logits (1.6 GB) whole, then hashing, then copying,
then measuring would add each step to the disk's time; streamed, what follows the last byte is
the measuring. `Arrival` says how far it got.

Knows runs and their tensors; nothing about metrics or verdicts.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import blake3
import torch

from . import shmbuffers, tensorfile
from .errors import UserError
from .runs import Run

READ_AHEAD_BYTES = 1 << 30  # tensors read and verified ahead of the one being measured
READ_WORKERS = 8  # threads streaming tensors (file reads, digests and copies release the GIL)
# threads reading tensors whole. Each was one more thread the measuring thread, which gives the GIL
# up at every torch op, waited behind, while tensors were read through safetensors' memory map
# (which holds the GIL as it faults pages in): 2 beat 8, 4 or 3 at 289b2d4 (BENCHMARKS.md). With
# plain reads (tensorfile.PLAIN_READS) and the GPU's metrics batched (measuring.py) the measuring
# thread makes a few calls a layer and the readers wait for the disk, not the GIL: on runs of
# 512-token tensors with 200,064-token logits (one H200) compare cold 0.92-1.18 of the raw cold read
# with 4 against 0.75-1.06 with 2, in turns, 4 rounds. Streams keep READ_WORKERS: 4096-token
# tensors 1.06-1.18 with 8 against 0.90-0.97 with 2.
WHOLE_READERS = 4
# ... and when the metrics run on the CPU, the value before: there the measuring thread computes
# rather than waits (on 2 cores, 1024-token tensors: 0.34-0.42 of the raw cold read with 2 against
# 0.32-0.47 with 4, in turns, 3 rounds: no difference).
WHOLE_READERS_CPU = 2
# A tensor this large is handed over while it is read. 16 MiB: a layer test's 4096-token residual
# tensors (25 MB) streamed, compare cold 0.82-1.22 of the raw cold read (median 1.04, 9 rounds)
# against 0.84-1.10 (0.98) read whole through the memory map, warm 4.8-6.4 GB/s against 3.6-4.5
# (64 MiB before; BENCHMARKS.md); 1024-token ones (6 MB) gained nothing streamed and lost warm.
STREAM_BYTES = 16 << 20
STREAM_PIECE = 32 << 20  # bytes read, hashed and copied at a time
STREAM_BUFFERS = 4  # staging buffers of STREAM_PIECE bytes per tensor streamed
STREAM_DEVICES = ("cuda",)  # where tensors are streamed to (on the CPU they are read whole, from a memory map)
# Python's GIL switch interval while runs are read ahead (its default: 5 ms). The measuring thread
# gives the GIL up at every torch op and device sync; with eight readers wanting it, it waited up
# to an interval each time to get it back. 0.5 ms, with tensorfile.PAGE_IN_HEAD: compare cold on
# 1024-token tensors went from 0.51-0.72 of the raw cold read to 0.67-0.82 (two machines); 0.2 ms
# was faster than 0.5 ms in 6 of 9 rounds over three calls, by 0.07 s of about 4 s at the median,
# 0.1 ms no better (BENCHMARKS.md).
SWITCH_INTERVAL = 2e-4


class Arrival:
    """A tensor being filled front to back by a reader thread. `result()` waits until all its
    bytes are in and its digests hold, and raises the reader's error (a corrupt or truncated
    file: UserError)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.arrived = 0  # bytes in place so far
        self._verified = False
        self._error: BaseException | None = None
        self.cancelled = False  # the reader stops at its next piece
        self._cond = threading.Condition()

    def result(self) -> torch.Tensor:
        with self._cond:
            while self._error is None and not self._verified:
                self._cond.wait()
            if self._error is not None:
                raise self._error
        return self.tensor

    def _publish(self, arrived: int | None = None, verified: bool = False, error: BaseException | None = None):
        with self._cond:
            self.arrived = self.arrived if arrived is None else arrived
            self._verified = self._verified or verified
            self._error = self._error or error
            self._cond.notify_all()


def read_units(runs: dict[str, Run | None], units: Iterator[tuple[int, tuple[str, ...]]], verify: bool = True,
               prefetch: bool = True, ahead_bytes: int | None = None, workers: int | None = None,
               device: torch.device | None = None,
               streamable: Callable[[str], bool] = lambda name: True) -> Iterator[tuple[int, tuple, dict, dict]]:
    """Read several runs unit by unit: for each (prompt, names) of `units`, yield (prompt, names,
    {(side, name): tensor}, {(side, name): Arrival}) with the tensors of every run (by side) that
    holds them, in order. A tensor of STREAM_BYTES or more that `streamable` accepts, bound for a
    `device` of a type in STREAM_DEVICES, is streamed there, still arriving, with an Arrival to
    await before use; all are in and verified before the next unit comes. Other tensors come read
    and verified, on that device (`_read_whole`) or else on the CPU. With `prefetch`, reader
    threads read and verify the following units while the caller works on this one, up to
    `ahead_bytes` ahead (at least one unit): the disk stays busy, the hashing spreads over cores,
    memory stays bounded. `workers` threads stream; tensors read whole go to WHOLE_READERS threads
    of their own (WHOLE_READERS_CPU without a GPU; at most `workers`). A unit is released once
    yielded. SWITCH_INTERVAL holds meanwhile.
    Defaults: READ_AHEAD_BYTES, READ_WORKERS, WHOLE_READERS*, STREAM_*, read at call time."""
    ahead_bytes = READ_AHEAD_BYTES if ahead_bytes is None else ahead_bytes
    streams = (READ_WORKERS if workers is None else workers) if prefetch else 1
    gpu = device if device is not None and device.type in STREAM_DEVICES else None
    pool = _Pools(streams, min(WHOLE_READERS if gpu else WHOLE_READERS_CPU, streams))
    window: deque = deque()  # (prompt, names, futures, bytes)
    streaming = _Streaming()  # every Arrival being read: cancelled if the caller stops early
    ahead = 0

    _handoff.enter()
    try:
        pending = iter(units)
        more = True
        while True:
            while more and (not window or (prefetch and ahead < ahead_bytes)):
                following = next(pending, None)
                if following is None:
                    more = False
                    break
                window.append(_submit(pool, runs, *following, verify, gpu, streaming, streamable))
                ahead += window[-1][3]
            if not window:
                return
            p, unit, futures, nbytes = window.popleft()
            got = {key: future.result() for key, future in futures.items()}
            futures.clear()  # the futures hold the tensors too
            arrivals = {key: x for key, x in got.items() if isinstance(x, Arrival)}
            tensors = {key: x.tensor if isinstance(x, Arrival) else x for key, x in got.items()}
            ahead -= nbytes
            yield p, unit, tensors, arrivals
            for arrival in arrivals.values():  # every byte verified before anything is reported
                arrival.result()
                streaming.discard(arrival)
            for held in (got, tensors, arrivals):  # release this unit (the caller holds these dicts too)
                held.clear()
    finally:
        streaming.stop()
        pool.shutdown()
        _handoff.exit()


def _submit(pool, runs: dict[str, Run | None], p: int, unit: tuple[str, ...], verify: bool, gpu, streaming,
            streamable) -> tuple:
    """A unit's tensors handed to the readers: (prompt, names, {(side, name): future}, bytes)."""
    keys = [(side, name) for name in unit for side, run in runs.items() if run is not None and run.has(name, p)]
    futures = {}
    for side, name in keys:
        if gpu and runs[side].entry(name, p).nbytes >= STREAM_BYTES and streamable(name):
            started = futures.setdefault((side, name), Future())
            pool.streams.submit(_stream, runs[side], name, p, verify, started, streaming, gpu)
        else:
            futures[(side, name)] = pool.whole.submit(_read_whole, runs[side], name, p, verify, gpu)
    return p, unit, futures, sum(runs[side].entry(name, p).nbytes for side, name in keys)


class _Pools:
    """read_units' reader threads: `streams` for tensors streamed, `whole` for tensors read whole."""

    def __init__(self, streams: int, whole: int):
        self.streams = ThreadPoolExecutor(max_workers=streams, thread_name_prefix="layerwise-stream")
        self.whole = ThreadPoolExecutor(max_workers=max(1, whole), thread_name_prefix="layerwise-read")

    def shutdown(self) -> None:
        for pool in (self.whole, self.streams):
            pool.shutdown(wait=True, cancel_futures=True)


class _Handoff:
    """SWITCH_INTERVAL in force while any read_units runs (several may, on threads of their own);
    the interval found before the first is put back after the last."""

    def __init__(self):
        self._lock, self._users, self._saved = threading.Lock(), 0, None

    def enter(self) -> None:
        with self._lock:
            if self._users == 0:
                self._saved = sys.getswitchinterval()
                sys.setswitchinterval(min(self._saved, SWITCH_INTERVAL))
            self._users += 1

    def exit(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                sys.setswitchinterval(self._saved)


_handoff = _Handoff()


def _read_whole(run: Run, name: str, prompt: int, verify: bool, device: torch.device | None) -> torch.Tensor:
    """A tensor read whole and verified (Run.tensor), then copied to `device` (a GPU) on this
    reader's thread. The copy from pageable memory runs at about 5 GB/s a thread: left to the
    measuring thread it bounded compare on a layer test's 25 MB tensors (BENCHMARKS.md); spread
    over the readers it overlaps the measuring. It stays on the CPU when the GPU has no room now."""
    tensor = run.tensor(name, prompt, verify)
    if device is None:
        return tensor
    try:
        return tensor.to(device)
    except torch.OutOfMemoryError:
        return tensor


class _Streaming:
    """The Arrivals of one read_units call still being read; `stop` cancels them, and any added later."""

    def __init__(self):
        self._live: set[Arrival] = set()
        self._stopped = False
        self._lock = threading.Lock()

    def add(self, arrival: Arrival) -> None:
        with self._lock:
            self._live.add(arrival)
            arrival.cancelled = self._stopped

    def discard(self, arrival: Arrival) -> None:
        with self._lock:
            self._live.discard(arrival)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            for arrival in self._live:
                arrival.cancelled = True


def _stream(run: Run, name: str, prompt: int, verify: bool, started: Future, streaming: _Streaming,
            device: torch.device) -> None:
    """Stream one large tensor to `device`, publishing its progress: `started` gets its Arrival as
    soon as the destination is allocated (or the whole tensor read as usual, on the CPU, when it
    has no blake3 digest to check as it goes; or the error)."""
    file = None
    try:
        entry = run.entry(name, prompt)
        file = run.file(entry.file)
        metadata: dict = {}
        info = tensorfile.read_header(file, metadata, run.file_kind).get(name)
        stored = tensorfile.dtype_name(info["dtype"]) if info else None
        if info is not None:
            run.check_stored(entry, stored, tuple(info["shape"]), file)
        dtype = getattr(torch, stored, None) if info else None
        claims = entry.digests + tuple(tensorfile.stored_digests(metadata, name).items())
        begin, end = info["data_offsets"] if info else (0, 0)
        if not (isinstance(dtype, torch.dtype) and any(a == "blake3" for a, _ in claims) and end > begin):
            started.set_result(run.tensor(name, prompt, verify))  # Run.tensor reads it, or says what is wrong
            return
        if end - begin != math.prod(info["shape"]) * dtype.itemsize:
            raise run.read_failure(name, file, "its size disagrees with its shape")
        try:
            arrival = Arrival(torch.empty(info["shape"], dtype=dtype, device=device))
        except torch.OutOfMemoryError:  # no room on the device now: read whole, copied when it is measured
            started.set_result(run.tensor(name, prompt, verify))
            return
    except BaseException as err:  # noqa: BLE001 - the caller gets it
        started.set_exception(err if isinstance(err, UserError) or file is None else
                              run.read_failure(name, file, err))
        return
    streaming.add(arrival)
    started.set_result(arrival)
    try:
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO) if verify else None
        _pour(file, begin, end, arrival, hasher)
        if arrival.cancelled:
            raise UserError(f"reading {name} from {file} was cancelled")
        if verify and not tensorfile.digests_hold(arrival.tensor, claims, {"blake3": hasher.hexdigest()}):
            raise run.digest_failure(name, file)
        arrival._publish(verified=True)
    except BaseException as err:  # noqa: BLE001 - the caller gets it from the Arrival
        arrival._publish(error=err if isinstance(err, UserError) else run.read_failure(name, file, err))


def _pour(file, begin: int, end: int, arrival: Arrival, hasher) -> None:
    """Bytes [begin, end) of the file's data into `arrival.tensor`, piece by piece through
    STREAM_BUFFERS staging buffers (pinned for a GPU): a thread of its own reads the pieces back
    to back, so the disk never waits for the hashing; this thread hashes each piece while it is in
    cache and copies it on a stream of its own; a buffer is read into again once its copy is
    done. `arrived` counts only bytes whose copy is complete."""
    cuda = arrival.tensor.device.type == "cuda"
    total = end - begin
    buffers = [shmbuffers.locked_buffer(min(STREAM_PIECE, total)) if cuda else
               torch.empty(min(STREAM_PIECE, total), dtype=torch.uint8) for _ in range(STREAM_BUFFERS)]
    free: queue.Queue = queue.Queue()
    full: queue.Queue = queue.Queue()
    for k in range(len(buffers)):
        free.put(k)
    stream = torch.cuda.Stream(arrival.tensor.device) if cuda else None
    if cuda:  # the destination may be memory just freed by the measuring thread, whose kernels still read it
        stream.wait_stream(torch.cuda.current_stream(arrival.tensor.device))
    with open(file, "rb", buffering=0) as fh, torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
        start = 8 + int.from_bytes(fh.read(8), "little") + begin
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fh.fileno(), start, total, os.POSIX_FADV_SEQUENTIAL)
        reader = threading.Thread(target=_read_pieces, args=(fh, start, total, buffers, free, full),
                                  name="layerwise-read-pieces", daemon=True)
        reader.start()
        try:
            _take_pieces(arrival, hasher, buffers, free, full, stream, total)
        finally:
            free.put(None)  # the reader stops at its next piece, if it has not
            reader.join()
            if cuda:  # nothing in flight from the staging buffers once this returns
                stream.synchronize()


def _read_pieces(fh, start: int, total: int, buffers: list, free: queue.Queue, full: queue.Queue) -> None:
    """_pour's reader: each piece into a free buffer, handed on as (buffer, offset, bytes); an
    error is handed on instead. Stops at None."""
    try:
        for done in range(0, total, STREAM_PIECE):
            k = free.get()
            if k is None:
                return
            n = min(STREAM_PIECE, total - done)
            if os.preadv(fh.fileno(), [memoryview(buffers[k].numpy())[:n]], start + done) != n:
                full.put(UserError(f"{fh.name} is truncated: re-extract the run"))
                return
            full.put((k, done, n))
    except BaseException as err:  # noqa: BLE001 - the taker raises it
        full.put(err)


def _take_pieces(arrival: Arrival, hasher, buffers: list, free: queue.Queue, full: queue.Queue, stream,
                 total: int) -> None:
    """_pour's taker: hash each piece, copy it (on `stream`; None: the CPU, at once), give its
    buffer back once the copy is done, keeping the reader at least one buffer ahead."""
    dest = arrival.tensor.reshape(-1).view(torch.uint8)
    copying: deque = deque()  # (event, buffer, bytes in place once it completes)
    for _ in range(-(-total // STREAM_PIECE)):
        if arrival.cancelled:
            return
        item = full.get()
        if isinstance(item, BaseException):
            raise item
        k, done, n = item
        if hasher is not None:
            hasher.update(memoryview(buffers[k].numpy())[:n])
        dest[done:done + n].copy_(buffers[k][:n], non_blocking=stream is not None)
        if stream is None:
            free.put(k)
            arrival._publish(arrived=done + n)
            continue
        copying.append((torch.cuda.Event(), k, done + n))
        copying[-1][0].record(stream)
        while copying and (copying[0][0].query() or len(copying) >= len(buffers) - 1):
            event, k, arrived = copying.popleft()
            event.synchronize()
            free.put(k)
            arrival._publish(arrived=arrived)
    if stream is not None:
        stream.synchronize()
        arrival._publish(arrived=total)


def to_device(tensor: torch.Tensor, arrival: Arrival | None, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`: one streamed there once all of it is in and verified, another copied."""
    if arrival is not None:
        return arrival.result()
    return tensor.to(device)
