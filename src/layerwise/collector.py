"""The sink behind the capture hooks: host copies, per-prompt slicing, whole files to the writer.

The forward pass is bound by kernel launches for short prompts, and every microsecond of Python
another thread runs while it launches is taken from it (the GIL): a hook only keeps a reference
to what it sees; once per batch (or when a device's references pass a budget) the forward thread
issues every device-to-host copy on a per-device copy stream after one event, and wakes the
completion thread once; that thread waits for the copies, cuts the batch into prompts (dropping
padding, keeping decoder-layer inputs' padding tails under their own name) and hands whole files
to the run writer. Host memory is bounded by a pinned-buffer budget (backpressure, never an
unbounded pile of tensors). On the CPU the captured tensors themselves are written.

The sink pushes tensors to a writer (`RunWriter.put`) and never opens a file itself.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass

import torch

from .capture import Target, groups_of
from .errors import UserError
from .names import INPUT, STORED_DTYPES, WHOLE_ROLES, pad_name, split_name

log = logging.getLogger(__name__)

PINNED_BUDGET_BYTES = 4 * 2**30  # host memory for in-flight device-to-host copies
_STORED = {role: getattr(torch, dtype) for role, dtype in STORED_DTYPES.items()}


class PinnedPool:
    """Pinned host buffers recycled by size, within a byte budget; `take` waits when the budget
    is spent (that wait is the backpressure that keeps host memory bounded).

    A file is written only once all its tensors have arrived, so buffers held by files still
    waiting for a tensor cannot come back before more copies are issued, nor can the buffers of
    the flush being built: waiting for them would deadlock. `take` therefore waits only while
    more is out than those hold (`blocked` bytes, kept up to date by the collector, and the
    caller's `own`); otherwise it overdraws the budget.
    """

    def __init__(self, budget_bytes: int, pin: bool = True):
        self.budget = budget_bytes
        self.pin = pin
        self.used = 0  # bytes handed out
        self.held = 0  # bytes allocated (handed out + free lists)
        self.peak = 0
        self.blocked = 0  # bytes handed out that wait in files missing a tensor
        self._free: dict[int, list[torch.Tensor]] = {}
        self._cond = threading.Condition()
        self._closed = False

    def take(self, nbytes: int, own: int = 0) -> torch.Tensor:
        """A buffer of at least `nbytes` (sizes round up to a power of two from 64 KiB, so buffers
        are reused across prompt lengths: allocating pinned memory is slow and synchronising).
        `own`: bytes the caller took already for the same flush; they cannot come back first."""
        nbytes = max(1 << 16, 1 << (max(nbytes, 1) - 1).bit_length())
        with self._cond:
            while self.used + nbytes > self.budget and self.used > self.blocked + own:
                if self._closed:
                    raise RuntimeError("capture aborted")
                self._cond.wait()
            self.used += nbytes
            free = self._free.get(nbytes)
            if free:
                return free.pop()
            while self.held + nbytes > self.budget and self._evict_one():
                pass
            self.held += nbytes
            self.peak = max(self.peak, self.held)
        with torch.inference_mode(False):  # a normal tensor: reused later outside inference mode too
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)

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


class _Buffer:
    """A pinned host copy and who still needs it: one reference per file being written from it,
    plus one while records of its flush still wait for their file's other tensors."""

    def __init__(self, buffer: torch.Tensor, pool: PinnedPool, records: int):
        self.buffer, self.pool = buffer, pool
        self.refs, self.records_left = 1, records
        self.lock = threading.Lock()

    def acquire(self, n: int) -> None:
        with self.lock:
            self.refs += n

    def release(self) -> None:
        with self.lock:
            self.refs -= 1
            last = self.refs == 0
        if last:
            self.pool.give(self.buffer)

    def record_done(self) -> None:
        with self.lock:
            self.records_left -= 1
            last = self.records_left == 0
        if last:
            self.release()


@dataclass
class _Flush:
    """What one flush hands the completion thread: host copies of the tensors held so far."""

    batch: object
    records: list  # (group, name, host tensor or None, buffer slot or None) in capture order
    buffers: list  # pinned buffers, one per device copied (empty on the CPU: the tensors themselves)
    done: list  # CUDA events, one per device, recorded after that device's copy
    keep: list  # the device tensors, alive until their copies are done


class Collector:
    """The sink behind the hooks: host copies, per-prompt slicing, whole files to the writer.

    The forward pass is bound by kernel launches for short prompts, and every microsecond of
    Python another thread runs while it launches is taken from it (the GIL). So:
    - a hook (forward thread) only keeps a reference to what it sees: no copy, no event, no
      lock, no wake-up. transformers' own output_hidden_states relies on the same fact: a
      module's output is never modified in place afterwards.
    - when a decoder layer's input arrives (its forward pre-hook), everything held so far is
      flushed: the previous layer's tensors and this input, which is the previous layer's
      output (one tensor, copied once). A flush packs the distinct tensors of each device into
      one buffer with one `cat` on the compute stream (after their producers) and issues one
      device-to-host copy of it on that device's copy stream into a pinned buffer: a handful of
      launches per layer, and the copies overlap the next layers' compute. `end_batch()`
      (`start_batch`, `flush` and `close` call it) flushes the rest.
    - the completion thread waits for a flush's copy (sleeping, GIL released), cuts the batch
      into prompts and hands whole files to `writer.put(prompt, group, {name: tensor}, on_written)`.
    Host memory is bounded by the pinned budget: when the disk is slower than the GPU, the
    writer queue fills, buffers stop coming back and the next flush waits (backpressure).
    On the CPU the captured tensors themselves are written (no copy).
    """

    def __init__(self, writer, targets: list[Target], pinned_budget_bytes: int = PINNED_BUDGET_BYTES,
                 copy_host_tensors: bool = False):
        self.writer = writer
        self.groups = groups_of(targets)
        self._padded = {t.names[0] for t in targets if t.when == INPUT and not t.extra}  # decoder-layer inputs
        self._extra = {t.names[0] for t in targets if t.extra}  # --modules: checked to be token-major
        gpu = torch.cuda.is_available()
        # copy_host_tensors: CPU tensors go through pooled buffers too (the GPU path's bookkeeping, testable anywhere)
        self.pool = PinnedPool(pinned_budget_bytes, pin=gpu) if gpu or copy_host_tensors else None
        self._copy_host = copy_host_tensors
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._batch = None
        self._held: list = []  # (group, name, tensor or None) in capture order
        self._pending: queue.Queue = queue.Queue(maxsize=256)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._complete, name="layerwise-capture", daemon=True)
        self._thread.start()

    # -- called on the forward-pass thread ---------------------------------------------------

    def start_batch(self, batch) -> None:
        self.end_batch()
        if self._error is not None:
            raise self._error
        self._batch = batch

    def take(self, target: Target, tensors: list[torch.Tensor | None]) -> None:
        """Keep one hook's tensors; a decoder layer's input flushes what came before it."""
        before = len(self._held)
        self._held.extend((target.group, name, t) for name, t in zip(target.names, tensors))
        if before and target.when == INPUT and not target.extra:  # a decoder layer's, not a --modules input
            self.end_batch(keep_batch=True)

    def end_batch(self, keep_batch: bool = False) -> None:
        """Issue the host copies of everything held and hand them to the completion thread."""
        if self._held:
            held, self._held = self._held, []
            self._pending.put(self._copy(held))
        if not keep_batch:
            self._batch = None

    def _copy(self, held: list) -> _Flush:
        """One packed host copy per device of the held tensors, each distinct tensor once."""
        slots: dict[tuple, tuple] = {}  # tensor key -> (device, index among that device's tensors)
        by_device: dict[torch.device, list] = {}
        for _, _, t in held:
            if t is not None:
                key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
                if key not in slots:
                    items = by_device.setdefault(t.device, [])
                    slots[key] = (t.device, len(items))
                    items.append(t)
        hosts: dict[tuple, tuple] = {}  # (device, index) -> (host tensor, buffer slot)
        buffers, done, keep = [], [], []
        for device, items in by_device.items():
            if device.type != "cuda" and not self._copy_host:
                hosts.update({(device, i): (t, None) for i, t in enumerate(items)})  # never written to again
                continue
            views, event = self._pack(device, items, buffers, keep)
            hosts.update({(device, i): (v, len(buffers) - 1) for i, v in enumerate(views)})
            if event is not None:
                done.append(event)
        records = []
        for group, name, t in held:
            slot = slots[(t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))] if t is not None else None
            host, buf = hosts[slot] if slot is not None else (None, None)
            records.append((group, name, host, buf))
        return _Flush(self._batch, records, buffers, done, keep)

    def _pack(self, device: torch.device, items: list, buffers: list, keep: list):
        """The device's tensors as bytes in one buffer (a `cat` on the compute stream, after their
        producers), copied to one pinned buffer on the copy stream. Returns the typed host views
        and the copy's event (None on the CPU)."""
        flat = [t.reshape(-1).view(torch.uint8) if t.numel() else t.new_empty(0, dtype=torch.uint8) for t in items]
        packed = torch.cat(flat) if len(flat) > 1 else flat[0]
        total = packed.numel()
        buffer = self.pool.take(total, sum(b.numel() for b in buffers))  # this flush's other devices' buffers
        buffers.append(buffer)
        event = None
        if device.type == "cuda":
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device=device)
            stream.wait_stream(torch.cuda.current_stream(device))  # after the cat
            with torch.cuda.stream(stream):
                buffer[:total].copy_(packed, non_blocking=True)
                event = torch.cuda.Event(blocking=True)  # the completion thread sleeps, not spins
                event.record(stream)
            keep.append(packed)
        else:
            buffer[:total].copy_(packed)
        views, offset = [], 0
        for t, f in zip(items, flat):
            views.append(buffer[offset:offset + f.numel()].view(t.dtype).view(t.shape))
            offset += f.numel()
        return views, event

    # -- the completion thread -----------------------------------------------------------------

    def _complete(self) -> None:
        parts: dict[str, dict] = {}  # group -> {name: (host tensor, _Buffer or None)} until the file is whole
        batch = None  # the batch `parts` belong to
        while True:
            item = self._pending.get()
            try:
                if item is None:
                    if self._error is None:
                        self._emit_unfinished(batch, parts)
                    return
                if isinstance(item, threading.Event):
                    item.set()
                    continue
                if self._error is not None:
                    self._drop(item)
                    continue
                if item.batch is not batch:
                    self._emit_unfinished(batch, parts)
                    batch = item.batch
                for event in item.done:
                    event.synchronize()  # sleeps with the GIL released while the copy engines work
                item.keep.clear()  # the device tensors may go back to the allocator now
                self._assemble(item, parts)
            except BaseException as err:
                self._error = self._error or err
                self._drop(item)

    def _assemble(self, item: _Flush, parts: dict) -> None:
        counts = [0] * len(item.buffers)
        for *_, buf in item.records:
            if buf is not None:
                counts[buf] += 1
        owned = [_Buffer(b, self.pool, n) if n else None for b, n in zip(item.buffers, counts)]
        for b, n in zip(item.buffers, counts):
            if not n:  # cannot happen (a buffer holds the flush's tensors), but never leak one
                self.pool.give(b)
        for group, name, host, buf in item.records:
            got = parts.setdefault(group, {})
            got[name] = (host, owned[buf] if buf is not None else None)
            if len(got) == len(self.groups[group]):
                self._emit(item.batch, group, parts.pop(group))
        if self.pool is not None:  # what waits in unfinished files cannot come back before more copies
            blocked = {id(b): b.buffer.numel() for got in parts.values() for _, b in got.values() if b is not None}
            self.pool.set_blocked(sum(blocked.values()))

    def _emit_unfinished(self, batch, parts: dict) -> None:
        """A batch is over: files whose modules did not all run (a --modules module the forward
        pass skipped, such as an expert no token chose) are written with what did run."""
        for group in list(parts):
            got = parts.pop(group)
            absent = sorted(set(self.groups[group]) - set(got))
            log.warning("%s did not run in this batch: not captured", ", ".join(absent))
            if any(host is not None for host, _ in got.values()):
                self._emit(batch, group, got)

    def _drop(self, item) -> None:
        if isinstance(item, _Flush) and self.pool is not None:
            for buffer in item.buffers:
                self.pool.give(buffer)

    def _emit(self, batch, group: str, parts: dict) -> None:
        shaped: dict[str, torch.Tensor] = {}
        rows, width = batch.input_ids.shape
        for name, (t, _) in parts.items():
            if t is None:
                continue
            role = split_name(name)[1]
            if role in _STORED and t.dtype != _STORED[role]:
                t = t.to(_STORED[role])
            if role not in WHOLE_ROLES and t.dim() >= 1 and t.shape[0] == rows * width \
                    and (t.dim() == 1 or t.shape[:2] != (rows, width)):
                t = t.reshape(rows, width, *t.shape[1:])  # routers see flattened [B*S, ...] tokens
            if name in self._extra and (t.dim() < 2 or t.shape[:2] != (rows, width)):
                raise UserError(f"{name} has shape {list(t.shape)}, not [batch {rows}, tokens {width}, ...] "
                                "(nor [tokens, ...]): it cannot be stored per prompt; capture another module")
            shaped[name] = t
        buffers = list({id(b): b for _, b in parts.values() if b is not None}.values())
        for b in buffers:
            b.acquire(len(batch.prompts))
        for _, b in parts.values():
            if b is not None:
                b.record_done()

        def release():
            for b in buffers:
                b.release()

        for row, prompt in enumerate(batch.prompts):
            n = len(prompt.token_ids)
            tensors = {name: t if split_name(name)[1] in WHOLE_ROLES else t[row, :n] for name, t in shaped.items()}
            if n < width:  # a layer's input at the padding positions: a replay rebuilds the batch bit for bit
                tensors.update({pad_name(name): t[row, n:] for name, t in shaped.items() if name in self._padded})
            self.writer.put(prompt.index, group, tensors, release)

    def flush(self) -> None:
        """Block until everything captured so far has reached the writer."""
        self.end_batch(keep_batch=True)
        done = threading.Event()
        self._pending.put(done)
        while not done.wait(0.5):
            if self._error is not None:
                raise self._error
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Flush, wait until every captured tensor reached the writer; re-raise a capture error."""
        self.end_batch()
        self._pending.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        self._error = self._error or RuntimeError("capture aborted")
        self._held = []
        if self.pool is not None:
            self.pool.close()
        self._pending.put(None)
        self._thread.join(timeout=60)

    @property
    def pinned_peak_bytes(self) -> int:
        return self.pool.peak if self.pool else 0
