"""The sink behind the capture hooks: host copies, per-prompt slicing, whole files to the writer.

A hook only keeps a reference to what it sees; at a decoder layer's input once what it holds
reaches FLUSH_BYTES, and at the end of a batch, the forward thread packs it into one
device-to-host copy per device; the completion thread waits for the copies, cuts the batch into
prompts and hands whole files to the run writer (`RunWriter.put`); it never opens a file itself.
Host memory is bounded by a pinned-buffer budget. `Collector` says why each step is where it is.
"""

from __future__ import annotations

import gc
import logging
import math
import queue
import threading
from dataclasses import dataclass

import torch

from .capture import Target, groups_of
from .errors import UserError
from .names import INPUT, STORED_DTYPES, WHOLE_ROLES, pad_name, split_name
from .hostcopy import HostCopier
from .pinned import PinnedPool, SharedBuffer, bins, slab_for

log = logging.getLogger(__name__)

PINNED_BUDGET_BYTES = 4 * 2**30  # host memory for in-flight device-to-host copies
FLUSH_BYTES = 16 * 2**20  # a flush waits for this much: short prompts flush a few times per batch, not per layer
_STORED = {role: getattr(torch, dtype) for role, dtype in STORED_DTYPES.items()}
_ROWS, _FLAT, _WHOLE = 0, 1, 2  # how a prompt's part of a tensor is cut: row r of [batch, tokens, ...], rows
# r*tokens... of [batch x tokens, ...] (a router's), or not at all (per model, WHOLE_ROLES)


@dataclass
class _Flush:
    """What one flush hands the completion thread: host copies of the tensors held so far."""

    batch: object
    records: list  # (group, name, host tensor or None, buffer slot or None, its check or None) in capture order
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
    - when a decoder layer's input arrives (its forward pre-hook) and what is held has reached
      `flush_bytes`, everything held so far is flushed: the previous layers' tensors and this
      input, which is the previous layer's output (one tensor, copied once). With long prompts
      that is every layer or two, so the copies overlap the next layers; short prompts' copies
      are small and wait for a few layers (fewer launches and wake-ups while the forward pass
      is bound by launches). A flush packs each tensor object of a device once into one
      buffer (one `cat` per dtype, converted there to the dtype it is stored in, and one joining
      them, on the compute stream, after their producers) and issues one device-to-host copy of
      it on that device's copy stream into a pinned buffer: a handful of launches per flush, and
      the copies overlap the next layers' compute. The batch's last hook (every hook fired:
      the last layer's output, unless the norm or the logits are captured) flushes at once, so
      that copy and its files overlap what the model computes after it: the final norm and the
      head (2 x tokens x hidden x vocabulary FLOPs: 80 TFLOP at 16 x 4096 tokens of MiniMax-M2,
      a decoder layer's 3 or so). `end_batch()` (`start_batch`, `flush` and `close` call it)
      flushes the rest (what a hook that fired twice, or a batch whose hooks did not all fire,
      left held).
    - the completion thread waits for a flush's copy (sleeping, GIL released), cuts the batch
      into prompts and hands whole files to `writer.put(prompt, group, {name: tensor}, on_written)`,
      a flush's files at once where the writer takes them so (`put_many`).
      `flush()` does that work itself when the completion thread has nothing queued: a caller
      waiting for the host copies is not also waiting for two threads to wake in turn.
    - each tensor name's facts (stored dtype, whole or per token, padding tail) are worked out
      once; a prompt's part of a tensor is one view (a router's [batch x tokens, ...] outputs
      are cut by rows, not reshaped first).
    - no garbage collection while a batch's layers are launched (`gc.disable` from `start_batch`
      to its last hook, unless it was off): a collection holds the GIL 0.1 ms or more, taken from
      the launches, and the bookkeeping allocates enough for several a batch. It may run after the
      last hook, while the GPU finishes. Batches not firing every hook (streaming) leave it on.
    Host memory is bounded by the pinned budget: when the disk is slower than the GPU, the
    writer queue fills, buffers stop coming back and the next flush waits (backpressure).
    On the CPU the captured tensors themselves are written (no copy).
    """

    def __init__(self, writer, targets: list[Target], pinned_budget_bytes: int = PINNED_BUDGET_BYTES,
                 copy_host_tensors: bool = False, flush_bytes: int = FLUSH_BYTES):
        self.writer = writer
        self.groups = groups_of(targets)
        padded = {t.names[0] for t in targets if t.when == INPUT and not t.extra}  # decoder-layer inputs
        extra = {t.names[0] for t in targets if t.extra}  # --modules: checked to be token-major
        # each name's facts, worked out once: (stored dtype or None, whole, padding tail's name or None, extra)
        self._facts = {n: (_STORED.get(split_name(n)[1]), split_name(n)[1] in WHOLE_ROLES,
                           pad_name(n) if n in padded else None, n in extra) for t in targets for n in t.names}
        gpu = torch.cuda.is_available()
        # copy_host_tensors: CPU tensors go through pooled buffers too (the GPU path's bookkeeping, testable anywhere)
        self.pool = PinnedPool(pinned_budget_bytes, pin=gpu, slab_bytes=slab_for(pinned_budget_bytes)) \
            if gpu or copy_host_tensors else None
        self._copy_host = copy_host_tensors
        self.copier = HostCopier(self.pool, copy_host_tensors)
        self._batch = None
        self._hooks, self._fired = len(targets), 0  # the hooks a forward pass fires; how many did in this batch
        self._held: list = []  # (group, name, tensor or None) in capture order
        self._held_bytes = 0  # their bytes (a tensor seen twice counts twice)
        self.flush_bytes = flush_bytes
        self._pending: queue.Queue = queue.Queue(maxsize=256)
        self._state = threading.Lock()  # whoever completes a flush (the completion thread, or `flush`) holds it
        self._queued = 0  # items put on `_pending` and not yet completed (under `_state`)
        self._parts: dict[str, dict] = {}  # group -> {name: (host tensor, SharedBuffer or None)} until whole
        self._parts_batch = None  # the batch `_parts` belong to
        self._error: BaseException | None = None
        # whether this collector turned the garbage collector off (start_batch) and owes it back; whether it may
        self._gc_held, self._gc_pause = False, True  # (until a batch ends without its last hook: the class says why)
        self._thread = threading.Thread(target=self._complete, name="layerwise-capture", daemon=True)
        self._thread.start()

    # -- called on the forward-pass thread ---------------------------------------------------

    def start_batch(self, batch) -> None:
        if self._batch is not None and self._fired < self._hooks:  # a batch not fired whole (streaming: a
            self._gc_pause = False  # layer at a time) never turns the collector off again: no batch would end it
        self.end_batch()
        if self._error is not None:
            raise self._error
        self._batch, self._fired = batch, 0
        if self._gc_pause and gc.isenabled():  # on again at the batch's last hook, its end, or the capture's
            gc.disable()
            self._gc_held = True

    def _release_gc(self) -> None:
        if self._gc_held:
            self._gc_held = False
            gc.enable()

    def take(self, target: Target, tensors: list[torch.Tensor | None]) -> None:
        """Keep one hook's tensors; a decoder layer's input flushes what came before it once that
        is `flush_bytes` or more, and the batch's last hook flushes at once (the class says why)."""
        held, group = self._held, target.group
        before = len(held)
        for name, t in zip(target.names, tensors):
            held.append((group, name, t))
            if t is not None:
                self._held_bytes += t.nbytes
        self._fired += 1
        if self._fired == self._hooks:  # every hook of the batch fired: nothing more comes before its end
            self.end_batch(keep_batch=True, last=True)
        elif before and target.when == INPUT and not target.extra and self._held_bytes >= self.flush_bytes:
            self.end_batch(keep_batch=True)  # at a decoder layer's input, not a --modules input

    def end_batch(self, keep_batch: bool = False, last: bool = False) -> None:
        """Issue the host copies of everything held and hand them to the completion thread
        (`last`: at the batch's last hook, the model's own work still to be launched)."""
        item = self._copy_held(last)
        if item is not None:
            self._put(item)
        if last or not keep_batch:
            self._release_gc()  # after the last copy is launched
        if not keep_batch:
            self._batch = None

    def _copy_held(self, last: bool = False) -> _Flush | None:
        """The host copies of everything held (None: nothing is), which is then held no more."""
        if not self._held:
            return None
        held, self._held, self._held_bytes = self._held, [], 0
        return self._copy(held, last)

    def _put(self, item) -> None:
        with self._state:
            self._queued += 1
        self._pending.put(item)

    def _copy(self, held: list, last: bool = False) -> _Flush:
        """One packed host copy per device (per slab) of the held tensors, each tensor object once
        (a layer's output is the next layer's input: the same object, seen twice)."""
        stored: dict[int, list] = {}  # id(tensor) -> [it, the dtype every name of it is stored in (None: they differ)]
        facts = self._facts
        for _, name, t in held:  # `held` keeps every tensor alive: no id is reused meanwhile
            if t is not None:
                want = facts[name][0] or t.dtype
                seen = stored.get(id(t))
                if seen is None:
                    stored[id(t)] = [t, want]
                elif seen[1] != want:
                    seen[1] = None  # names that disagree: each converts its own on the host
        by_device: dict[torch.device, list] = {}
        for t, want in stored.values():
            by_device.setdefault(t.device, []).append((t, want or t.dtype))
        hosts: dict[int, tuple] = {}  # id(tensor) -> (host tensor, buffer slot or None)
        buffers, done, keep = [], [], []
        for device, pairs in by_device.items():
            if device.type != "cuda" and not self._copy_host:
                hosts.update((id(t), (t, None, None)) for t, _ in pairs)  # never written to again
                continue
            slab = self.pool.slab if self.pool is not None else 0
            for indices in bins([t.nbytes for t, _ in pairs], slab):  # slabs: buffers the pool reuses (and pins ahead)
                chosen = [pairs[i] for i in indices]
                views, checks, event = self.copier.pack(device, chosen, buffers, keep, sum_first=last)
                hosts.update((id(t), (v, len(buffers) - 1, c)) for (t, _), v, c in zip(chosen, views, checks))
                if event is not None:
                    done.append(event)
        records = [(group, name, *(hosts[id(t)] if t is not None else (None, None, None))) for group, name, t in held]
        return _Flush(self._batch, records, buffers, done, keep)

    # -- the completion thread -----------------------------------------------------------------

    def _complete(self) -> None:
        while True:
            item = self._pending.get()
            with self._state:
                self._queued -= 1
                if item is None:
                    self._end()
                    return
                if isinstance(item, threading.Event):
                    item.set()
                else:
                    self._finish(item)

    def _end(self) -> None:
        """The capture is over: files whose modules did not all run are written with what ran."""
        try:
            if self._error is None:
                self._emit_unfinished(self._parts_batch, self._parts)
        except BaseException as err:  # such a file could not be handed over
            self._error = self._error or err

    def _finish(self, item: _Flush) -> None:
        """Wait for a flush's copies, cut it into prompts, hand whole files on (under `_state`)."""
        try:
            if self._error is not None:
                self._drop(item)
                return
            if item.batch is not self._parts_batch:
                self._emit_unfinished(self._parts_batch, self._parts)
                self._parts_batch = item.batch
            for event in item.done:
                event.synchronize()  # sleeps with the GIL released while the copy engines work
            item.keep.clear()  # the device tensors may go back to the allocator now
            files: list = []
            self._assemble(item, self._parts, files)
            self._hand(files)
        except BaseException as err:
            self._error = self._error or err
            self._drop(item)

    def _hand(self, files: list) -> None:
        """A flush's files to the writer at once (`put_many`: one message to each writer process
        and one back, not one per file), or one by one to a writer that takes them so."""
        put_many = getattr(self.writer, "put_many", None)
        if put_many is None:
            for prompt, group, tensors, release, finite in files:
                self.writer.put(prompt, group, tensors, release, finite=finite)
        elif files:
            put_many(files)

    def _assemble(self, item: _Flush, parts: dict, files: list) -> None:
        counts = [0] * len(item.buffers)
        for *_, buf, _ in item.records:
            if buf is not None:
                counts[buf] += 1
        owned = [SharedBuffer(b, self.pool, n) if n else None for b, n in zip(item.buffers, counts)]
        for b, n in zip(item.buffers, counts):
            if not n:  # cannot happen (a buffer holds the flush's tensors), but never leak one
                self.pool.give(b)
        finite: dict = {}  # id(host sums) -> whether each is finite (read once the copy is done)
        for group, name, host, buf, check in item.records:
            if check is not None and id(check[0]) not in finite:
                finite[id(check[0])] = [math.isfinite(x) for x in check[0].tolist()]
            got = parts.setdefault(group, {})
            got[name] = (host, owned[buf] if buf is not None else None,
                         check is not None and finite[id(check[0])][check[1]])
            if len(got) == len(self.groups[group]):
                self._emit(item.batch, group, parts.pop(group), files)
        if self.pool is not None:  # what waits in unfinished files cannot come back before more copies
            blocked = {id(b): b.buffer.numel() for got in parts.values() for _, b, _ in got.values() if b is not None}
            self.pool.set_blocked(sum(blocked.values()))

    def _emit_unfinished(self, batch, parts: dict) -> None:
        """A batch is over: files whose modules did not all run (a --modules module the forward
        pass skipped, such as an expert no token chose) are written with what did run."""
        files: list = []
        for group in list(parts):
            got = parts.pop(group)
            absent = sorted(set(self.groups[group]) - set(got))
            log.warning("%s did not run in this batch: not captured", ", ".join(absent))
            if any(host is not None for host, *_ in got.values()):
                self._emit(batch, group, got, files)
        self._hand(files)

    def _drop(self, item) -> None:
        if isinstance(item, _Flush) and self.pool is not None:
            for buffer in item.buffers:
                self.pool.give(buffer)

    def _emit(self, batch, group: str, parts: dict, files: list) -> None:
        """One file per prompt into `files`, (prompt, group, tensors, release, finite) each, for
        the writer: each tensor's rows of that prompt (padding dropped, a decoder-layer input's
        padding tail under its own name), a whole one as is."""
        rows, width = batch.input_ids.shape
        items = []  # (name, tensor, how): _ROWS [batch, tokens, ...], _FLAT [batch x tokens, ...], _WHOLE
        tails = []  # (tensor, how, its padding tail's name)
        counts: dict = {}  # SharedBuffer -> how many of this file's records it holds
        finite, finite_tails = set(), set()  # names the GPU found finite (the writer does not check them again)
        for name, (t, b, ok) in parts.items():
            if b is not None:
                counts[b] = counts.get(b, 0) + 1
            if t is None:
                continue
            if ok:
                finite.add(name)
            stored, is_whole, tail, extra = self._facts[name]
            if stored is not None and t.dtype != stored:  # the CPU's own tensors (a copy is converted on the device)
                t = t.to(stored)
            shape = t.shape
            how = _WHOLE if is_whole else _FLAT if (
                shape and shape[0] == rows * width and (len(shape) == 1 or shape[0] != rows or shape[1] != width)) \
                else _ROWS  # routers see flattened [B*S, ...] tokens: prompt r is rows r*S... of them
            if extra and how != _FLAT and (len(shape) < 2 or shape[0] != rows or shape[1] != width):
                raise UserError(f"{name} has shape {list(shape)}, not [batch {rows}, tokens {width}, ...] "
                                "(nor [tokens, ...]): it cannot be stored per prompt; capture another module")
            items.append((name, t, how))
            if tail is not None:
                tails.append((t, how, tail))
                if ok:
                    finite_tails.add(tail)
        padded_finite = finite | finite_tails  # a padded prompt's file also holds the tails
        for b, n in counts.items():
            b.hand_out(len(batch.prompts), n)
        buffers = list(counts)

        def release():
            for b in buffers:
                b.release()

        for row, prompt in enumerate(batch.prompts):
            n = len(prompt.token_ids)
            first = row * width
            if n == width:  # no padding: a view of its rows (none at all for one prompt's flattened rows)
                tensors = {name: t if how == _WHOLE or (how == _FLAT and rows == 1) else
                           t[first:first + n] if how == _FLAT else t[row] for name, t, how in items}
            else:
                tensors = {name: t if how == _WHOLE else t[first:first + n] if how == _FLAT else t[row, :n]
                           for name, t, how in items}
                # a layer's input at the padding positions: a replay rebuilds the batch bit for bit
                tensors.update((tail, t[first + n:first + width] if how == _FLAT else t[row, n:])
                               for t, how, tail in tails)
            files.append((prompt.index, group, tensors, release, finite if n == width else padded_finite))

    def flush(self) -> None:
        """Block until everything captured so far has reached the writer. When the completion
        thread has nothing left to do, this thread completes the last flush itself: no hand-over
        to a thread that must first wake, then wake this one."""
        self._release_gc()
        item = self._copy_held()
        with self._state:
            idle = self._queued == 0
            if idle and item is not None:
                self._finish(item)
        if not idle:
            if item is not None:
                self._put(item)
            done = threading.Event()
            self._put(done)
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
        self._release_gc()
        self._error = self._error or RuntimeError("capture aborted")
        self._held, self._held_bytes = [], 0
        if self.pool is not None:
            self.pool.close()
        self._pending.put(None)
        self._thread.join(timeout=60)

    @property
    def pinned_peak_bytes(self) -> int:
        return self.pool.peak if self.pool else 0

    def stats(self) -> dict:
        """What the capture cost the forward thread: seconds allocating pinned host memory and
        seconds waiting for the writer (backpressure), and the pinned peak."""
        if self.pool is None:
            return {}
        return {"pinned_alloc_seconds": round(self.pool.alloc_seconds, 4),
                "capture_wait_seconds": round(self.pool.wait_seconds, 4), "pinned_peak_bytes": self.pool.peak}
