"""Pinned host buffers for device-to-host copies: recycled by size within a byte budget, and
shared by the files cut from one copy until the last is written.

`PinnedPool.take` hands out slabs (64 MiB; larger tensors get a power of two), from its free
ones, else from slabs `reserve` pinned ahead (while a model loads), else newly pinned. It waits
while the budget is spent (the backpressure that keeps host memory bounded when the disk is
slower than the GPU) but never for buffers that cannot come back first (no deadlock); it counts
the seconds spent waiting and allocating. `SharedBuffer` returns a buffer
to its pool once every file written from it, and every record still waiting for its file, is done.

Knows nothing of captures, runs or models: bytes, a budget, reference counts.
"""

from __future__ import annotations

import threading
import time

import torch

from . import shmbuffers, writerproc


SLAB_BYTES = 64 * 2**20  # the one size class of buffers up to it (a flush packs its tensors into slabs)
MIN_BYTES = shmbuffers.MIN_BYTES
# Pinned ahead by `reserve`. The whole default budget (4 GiB) was tried on 2 H200s: it took the
# 0.2-0.6 s of pinning off the forward thread of a 6 GB recording, but the recordings were no
# faster (the pool then filled its budget and waited for the writer), so 1 GiB it stays.
RESERVE_BYTES = 2**30
_RESERVE: list[torch.Tensor] = []  # slabs pinned ahead, taken by the next pool that needs one
_LARGE: dict[int, list[torch.Tensor]] = {}  # buffers over a slab pinned ahead (reserve_large), by size
_PINNING: set[int] = set()  # sizes reserve_large is pinning now
_RESERVE_LOCK = threading.Lock()


def new_buffer(nbytes: int, pin: bool) -> torch.Tensor:
    """A uint8 host buffer of `nbytes` (page-locked when `pin`): shared memory that the run
    writer's own process reads the files from (writerproc), where it runs; else torch's."""
    buffer = shmbuffers.shared_buffer(nbytes, pin) if writerproc.supported() else None
    if buffer is None:
        with torch.inference_mode(False):  # a normal tensor: reused later outside inference mode too
            buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    return buffer


def slab_for(budget_bytes: int) -> int:
    """The slab size of a pool of `budget_bytes`: a sixteenth of it, at most SLAB_BYTES (64 MiB of
    the default 4 GiB); 0 (powers of two only) when that is under MIN_BYTES."""
    slab = min(SLAB_BYTES, budget_bytes // 16)
    return slab if slab >= MIN_BYTES else 0


def reserve(budget_bytes: int, wanted: int | None = None) -> threading.Thread | None:
    """Pin SLAB_BYTES slabs in the background, for the pool of a capture of `budget_bytes`, until
    the process holds min(RESERVE_BYTES, budget, `wanted` rounded up to slabs) of them. None:
    nothing to pin (no GPU, or a budget whose pool would not use slabs of that size). Pinning
    costs about a second per GB, which a capture would otherwise pay on the forward thread at its
    first flushes; started before a model loads, it is paid while the loading waits for the disk.
    `wanted`: what the capture is expected to hold in flight (a layer test's few layer outputs),
    where the process should not pin, then tear down, a whole RESERVE_BYTES."""
    if not torch.cuda.is_available() or slab_for(budget_bytes) != SLAB_BYTES:
        return None
    ahead = RESERVE_BYTES if wanted is None else -(-max(wanted, 1) // SLAB_BYTES) * SLAB_BYTES
    with _RESERVE_LOCK:
        missing = min(ahead, RESERVE_BYTES, budget_bytes) // SLAB_BYTES - len(_RESERVE)
    if missing <= 0:
        return None

    def work():  # a fixed count: slabs taken meanwhile by a pool are not pinned again
        with torch.inference_mode(False):
            for _ in range(missing):
                slab = new_buffer(SLAB_BYTES, True)
                with _RESERVE_LOCK:
                    _RESERVE.append(slab)

    thread = threading.Thread(target=work, name="layerwise-pin", daemon=True)
    thread.start()
    return thread


def reserve_large(budget_bytes: int, nbytes: int) -> threading.Thread | None:
    """Pin, in the background, the buffer a pool of `budget_bytes` will take for one flush of
    `nbytes` over a slab (an extract's logits of its largest batch: 0.8 GB for 2 x 1024 tokens of
    MiniMax-M2's vocabulary), unless the process holds one, or it would not fit the budget beside
    the slabs. Pinned on the forward thread when the head's output is copied, it held the end of a
    run up by about a second per GB. None: nothing to pin."""
    size = shmbuffers.size_class(nbytes)  # PinnedPool.size_class over a slab
    if not torch.cuda.is_available() or slab_for(budget_bytes) != SLAB_BYTES or nbytes <= SLAB_BYTES or \
            size + min(RESERVE_BYTES, budget_bytes) > budget_bytes:
        return None
    with _RESERVE_LOCK:
        if _LARGE.get(size) or size in _PINNING:
            return None
        _PINNING.add(size)

    def work():
        try:
            with torch.inference_mode(False):
                buffer = new_buffer(size, True)
            with _RESERVE_LOCK:
                _LARGE.setdefault(size, []).append(buffer)
        finally:
            _PINNING.discard(size)

    thread = threading.Thread(target=work, name="layerwise-pin-large", daemon=True)
    thread.start()
    return thread


def bins(sizes: list[int], slab: int) -> list[list[int]]:
    """Items (by index, of these byte sizes) in groups of at most `slab` bytes, first fit, largest
    first; an item larger than a slab alone (`slab` 0: all in one group)."""
    if not slab or sum(sizes) <= slab:  # one group (what first fit gives when all fit)
        return [list(range(len(sizes)))]
    groups: list[tuple[int, list[int]]] = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        at = next((g for g, (used, _) in enumerate(groups) if used + sizes[i] <= slab), None)
        if at is None:
            groups.append((sizes[i], [i]))
        else:
            groups[at] = (groups[at][0] + sizes[i], groups[at][1] + [i])
    return [sorted(indices) for _, indices in groups]


class PinnedPool:
    """Pinned host buffers recycled by size, within a byte budget; `take` waits when the budget
    is spent (that wait is the backpressure that keeps host memory bounded).

    A file is written only once all its tensors have arrived, so buffers held by files still
    waiting for a tensor cannot come back before more copies are issued, nor can the buffers of
    the flush being built: waiting for them would deadlock. `take` therefore waits only while
    more is out than those hold (`blocked` bytes, kept up to date by the collector, and the
    caller's `own`); otherwise it overdraws the budget.
    """

    def __init__(self, budget_bytes: int, pin: bool = True, slab_bytes: int = 0):
        self.budget = budget_bytes
        self.pin = pin
        self.slab = slab_bytes  # the one size class of everything up to it (0: powers of two only)
        self.used = 0  # bytes handed out
        self.held = 0  # bytes allocated (handed out + free lists)
        self.peak = 0
        self.blocked = 0  # bytes handed out that wait in files missing a tensor
        self.wait_seconds = 0.0  # spent waiting for buffers to come back (the writer is behind)
        self.alloc_seconds = 0.0  # spent allocating pinned memory (slow: it maps and locks pages)
        self._free: dict[int, list[torch.Tensor]] = {}
        self._cond = threading.Condition()
        self._closed = False

    def size_class(self, nbytes: int) -> int:
        """What `take(nbytes)` hands out: one slab up to its size, else a power of two from 64 KiB,
        so buffers are reused across prompt lengths (allocating pinned memory is slow)."""
        return self.slab if nbytes <= self.slab else shmbuffers.size_class(nbytes)

    def take(self, nbytes: int, own: int = 0) -> torch.Tensor:
        """A buffer of at least `nbytes` (`size_class`), from the free ones, else from the
        process's reserve (pinned ahead by `reserve`), else newly pinned. `own`: bytes the caller
        took already for the same flush; they cannot come back first."""
        nbytes = self.size_class(nbytes)
        with self._cond:
            waited = None
            while self.used + nbytes > self.budget and self.used > self.blocked + own:
                if self._closed:
                    raise RuntimeError("capture aborted")
                waited = waited or time.perf_counter()
                self._cond.wait()
            if waited is not None:
                self.wait_seconds += time.perf_counter() - waited
            self.used += nbytes
            free = self._free.get(nbytes)
            if free:
                return free.pop()
            while self.held + nbytes > self.budget and self._evict_one():
                pass
            self.held += nbytes
            self.peak = max(self.peak, self.held)
        if self.pin:
            with _RESERVE_LOCK:
                ahead = _RESERVE if nbytes == SLAB_BYTES else _LARGE.get(nbytes)
                if ahead:
                    return ahead.pop()
        start = time.perf_counter()
        buffer = new_buffer(nbytes, self.pin)
        self.alloc_seconds += time.perf_counter() - start  # the forward thread's only caller: no lock needed
        return buffer

    def _evict_one(self) -> bool:
        for size, buffers in self._free.items():
            if buffers:
                buffers.pop()
                self.held -= size
                return True
        return False

    def set_blocked(self, nbytes: int) -> None:
        with self._cond:
            self.blocked = nbytes
            self._cond.notify_all()

    def close(self) -> None:
        """Wake and fail every waiting `take` (the capture is being aborted)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def give(self, buffer: torch.Tensor) -> None:
        with self._cond:
            self.used -= buffer.numel()
            self._free.setdefault(buffer.numel(), []).append(buffer)
            self._cond.notify_all()


class SharedBuffer:
    """A pinned host copy and who still needs it: one reference per file being written from it,
    plus one while records of its flush still wait for their file's other tensors."""

    def __init__(self, buffer: torch.Tensor, pool: PinnedPool, records: int):
        self.buffer, self.pool = buffer, pool
        self.refs, self.records_left = 1, records
        self.lock = threading.Lock()

    def release(self) -> None:
        with self.lock:
            self.refs -= 1
            last = self.refs == 0
        if last:
            self.pool.give(self.buffer)

    def hand_out(self, files: int, records: int) -> None:
        """`files` more files are written from it, which hold `records` of its flush's records."""
        with self.lock:
            self.refs += files
            self.records_left -= records
            last = self.records_left == 0
        if last:
            self.release()
