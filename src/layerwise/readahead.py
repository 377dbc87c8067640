"""Reading several runs side by side, ahead of their use: what compare measures arrives read and
verified while the previous tensors are being measured, within a memory window.

A large tensor (STREAM_BYTES or more) is handed over while it is still being read: a reader thread
fills it front to back with large sequential reads, hashing each piece as it lands (blake3 is a
stream), and publishes how far it got (`Arrival`); the caller may use the bytes already there (a
GPU takes them piece by piece) and the digest is checked once the last piece is in. Reading one
tensor of 1.6 GB (a 4096-token prompt's logits) and then measuring it would add the measuring to
the disk's time instead of hiding it.

Knows runs and their tensors; nothing about metrics or verdicts.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import blake3
import torch

from . import tensorfile
from .errors import UserError
from .rawbytes import raw_bytes
from .runs import Run

READ_AHEAD_BYTES = 1 << 30  # tensors read and verified ahead of the one being measured
READ_WORKERS = 8  # threads reading and hashing them (file reads and digests release the GIL)
STREAM_BYTES = 64 << 20  # a tensor this large is handed over while it is read
STREAM_PIECE = 8 << 20  # bytes read, hashed and published at a time


class Arrival:
    """A tensor being filled front to back by a reader thread. `wait(n)`: until its first n bytes
    are in memory; `result()`: until all are and its digests hold. Either raises the reader's
    error (a corrupt or truncated file: UserError)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self.nbytes = tensor.numel() * tensor.element_size()
        self._arrived = 0
        self._verified = False
        self._error: BaseException | None = None
        self.cancelled = False  # the reader stops at its next piece
        self._cond = threading.Condition()

    def wait(self, upto: int) -> None:
        with self._cond:
            while self._error is None and self._arrived < min(upto, self.nbytes):
                self._cond.wait()
            if self._error is not None:
                raise self._error

    def result(self) -> torch.Tensor:
        with self._cond:
            while self._error is None and not self._verified:
                self._cond.wait()
            if self._error is not None:
                raise self._error
        return self.tensor

    def _publish(self, arrived: int | None = None, verified: bool = False, error: BaseException | None = None):
        with self._cond:
            self._arrived = self._arrived if arrived is None else arrived
            self._verified = self._verified or verified
            self._error = self._error or error
            self._cond.notify_all()


def read_units(runs: dict[str, Run | None], units: Iterator[tuple[int, tuple[str, ...]]], verify: bool = True,
               prefetch: bool = True, ahead_bytes: int | None = None,
               workers: int | None = None) -> Iterator[tuple[int, tuple[str, ...], dict, dict]]:
    """Read several runs unit by unit: for each (prompt, names) of `units`, yield (prompt, names,
    {(side, name): tensor}, {(side, name): Arrival}) with the tensors of every run (by side) that
    holds them, in order. A tensor of STREAM_BYTES or more may still be arriving: it has an
    Arrival, and only the bytes it has waited for may be used; all of them are in and verified
    before the next unit comes (a digest that fails raises then). With `prefetch`, `workers`
    threads read and verify the following units while the caller works on this one, up to
    `ahead_bytes` ahead (at least one unit): the disk stays busy and the hashing spreads over
    cores, while memory stays bounded. A unit is released once yielded. Defaults:
    READ_AHEAD_BYTES, READ_WORKERS and STREAM_BYTES, read at call time."""
    ahead_bytes = READ_AHEAD_BYTES if ahead_bytes is None else ahead_bytes
    workers = READ_WORKERS if workers is None else workers
    pool = ThreadPoolExecutor(max_workers=workers if prefetch else 1, thread_name_prefix="layerwise-read")
    window: deque = deque()  # (prompt, names, futures, bytes)
    streaming = _Streaming()  # every Arrival being read: cancelled if the caller stops early
    ahead = 0

    def submit(p: int, unit: tuple[str, ...]) -> tuple:
        keys = [(side, name) for name in unit for side, run in runs.items() if run is not None and run.has(name, p)]
        futures = {}
        for side, name in keys:
            if runs[side].entry(name, p).nbytes >= STREAM_BYTES:
                futures[(side, name)] = started = Future()
                pool.submit(_stream, runs[side], name, p, verify, started, streaming)
            else:
                futures[(side, name)] = pool.submit(runs[side].tensor, name, p, verify)
        return p, unit, futures, sum(runs[side].entry(name, p).nbytes for side, name in keys)

    try:
        pending = iter(units)
        more = True
        while True:
            while more and (not window or (prefetch and ahead < ahead_bytes)):
                following = next(pending, None)
                if following is None:
                    more = False
                    break
                window.append(submit(*following))
                ahead += window[-1][3]
            if not window:
                return
            p, unit, futures, nbytes = window.popleft()
            got = {key: future.result() for key, future in futures.items()}
            futures.clear()  # the futures hold the tensors too
            arrivals = {key: x for key, x in got.items() if isinstance(x, Arrival)}
            tensors = {key: x.tensor if isinstance(x, Arrival) else x for key, x in got.items()}
            got.clear()
            ahead -= nbytes
            yield p, unit, tensors, arrivals
            for arrival in arrivals.values():  # every byte verified before anything is reported
                arrival.result()
                streaming.discard(arrival)
            tensors.clear()  # release this unit
            arrivals.clear()
    finally:
        streaming.stop()
        pool.shutdown(wait=True, cancel_futures=True)


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


def _stream(run: Run, name: str, prompt: int, verify: bool, started: Future, streaming: _Streaming) -> None:
    """Read one large tensor into memory piece by piece, publishing its progress: `started`
    gets its Arrival as soon as the tensor is allocated (or the whole tensor, read as usual, when
    its dtype is not one torch has; or the error). Sequential reads of STREAM_PIECE bytes with
    the kernel told to read ahead; each piece hashed as it lands."""
    file = None
    try:
        entry = run.entry(name, prompt)
        file = run.file(entry.file)
        metadata: dict = {}
        info = tensorfile.read_header(file, metadata).get(name)
        dtype = getattr(torch, tensorfile.dtype_name(info["dtype"]), None) if info else None
        claims = entry.digests + tuple(tensorfile.stored_digests(metadata, name).items())
        if not isinstance(dtype, torch.dtype) or (verify and not claims):
            started.set_result(run.tensor(name, prompt, verify))  # Run.tensor reads it, or says what is wrong
            return
        arrival = Arrival(torch.empty(info["shape"], dtype=dtype))
    except BaseException as err:  # noqa: BLE001 - the caller gets it
        started.set_exception(err if isinstance(err, UserError) or file is None else
                              UserError(f"cannot read {name} from {file}: {err} (the run is corrupt; re-extract it)"))
        return
    streaming.add(arrival)
    started.set_result(arrival)
    try:
        view = raw_bytes(arrival.tensor)
        if view.nbytes != info["data_offsets"][1] - info["data_offsets"][0]:
            raise UserError(f"cannot read {name} from {file}: its size disagrees with its shape (the run is corrupt; "
                            "re-extract it)")
        hasher = blake3.blake3() if verify and any(a == "blake3" for a, _ in claims) else None
        with open(file, "rb", buffering=0) as fh:
            start = 8 + int.from_bytes(fh.read(8), "little") + info["data_offsets"][0]
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fh.fileno(), start, view.nbytes, os.POSIX_FADV_SEQUENTIAL)
            done = 0
            while done < view.nbytes and not arrival.cancelled:
                got = os.preadv(fh.fileno(), [view[done:done + STREAM_PIECE]], start + done)
                if got <= 0:
                    raise UserError(f"{file} is truncated: re-extract the run")
                if hasher is not None:
                    hasher.update(view[done:done + got])
                done += got
                arrival._publish(arrived=done)
        if arrival.cancelled:
            raise UserError(f"reading {name} from {file} was cancelled")
        if verify and not _claims_hold(arrival.tensor, claims, hasher):
            raise tensorfile.digest_failure(name, file)
        arrival._publish(verified=True)
    except BaseException as err:  # noqa: BLE001 - the caller gets it from the Arrival
        arrival._publish(error=err if isinstance(err, UserError) else
                         UserError(f"cannot read {name} from {file}: {err} (the run is corrupt; re-extract it)"))


def _claims_hold(tensor: torch.Tensor, claims: tuple, hasher) -> bool:
    """Every claimed digest holds: blake3 from the hash taken while reading, any other
    algorithm (a run of an earlier format version) computed now."""
    blake = {digest for algorithm, digest in claims if algorithm == "blake3"}
    if blake and (len(blake) > 1 or hasher is None or hasher.hexdigest() not in blake):
        return False
    others = [(algorithm, digest) for algorithm, digest in claims if algorithm != "blake3"]
    return not others or tensorfile.digests_hold(tensor, others)


def to_device(tensor: torch.Tensor, arrival: Arrival | None, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; one still arriving is copied piece by piece as its bytes land, so
    the copy overlaps the disk's reading, and comes back once verified."""
    if arrival is None:
        return tensor.to(device)
    out = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
    src, dst = tensor.reshape(-1), out.reshape(-1)
    step = max(1, STREAM_PIECE * 8 // max(1, tensor.element_size()))  # elements per copy
    for begin in range(0, src.numel(), step):
        end = min(src.numel(), begin + step)
        arrival.wait(end * tensor.element_size())
        dst[begin:end].copy_(src[begin:end])
    arrival.result()
    return out
