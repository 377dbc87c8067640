"""One flush's tensors of a device packed into one buffer and copied to a pinned host buffer.

`Collector` (collector.py) decides what to flush and when; this is how: a handful of launches per
flush (one flattening per dtype, converted there to the stored dtype, one `cat`, one copy on the
device's copy stream, its event), host views cut from the buffer, and for a large copy each float
run's float32 sum copied behind its bytes, so the writer checks for NaN/Inf only what the GPU did
not find finite.
"""

from __future__ import annotations

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .pinned import PinnedPool

# A copy of this many bytes or more has its float tensors' NaN/Inf looked for on the GPU (a float32 sum per
# dtype, beside the copy): the writer then checks only what the GPU did not find finite. Smaller copies
# (short prompts, bound by kernel launches) launch nothing more; the writer checks them on the CPU.
CHECK_BYTES = 64 * 2**20
# Summed in float32 where they lie: a float64 sum of bf16 first made a float64 copy of the whole run (4 x its
# bytes, allocated on the copy stream), which cost 4 x 4096 and 16 x 1024 captures 1-2 points (BENCHMARKS.md).
_SUMMED = (torch.float32, torch.bfloat16, torch.float16)


class HostCopier:
    """Packs and copies a device's tensors into buffers from `pool` (on the CPU: only with
    `copy_host`, the GPU path's bookkeeping made testable anywhere)."""

    def __init__(self, pool: PinnedPool | None, copy_host: bool = False):
        self.pool, self._copy_host = pool, copy_host
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    def pack(self, device: torch.device, pairs: list, buffers: list, keep: list, sum_first: bool = False):
        """The device's tensors as bytes in one buffer, copied to one pinned buffer on the copy
        stream. `pairs` are (tensor, the dtype it is stored in). Tensors of one dtype are flattened
        together (one call, not one view per tensor) and converted there to the stored dtype
        (top-k ids int64 -> int32: one kernel for all of them, none per tensor on the host), the
        runs of bytes joined by one `cat` on the compute stream (after their producers), widest
        dtype first so that every run starts aligned to its elements. A copy of CHECK_BYTES or more
        also copies each float run's float32 sum behind its bytes (`_summed`), summed on the copy
        stream beside the next layers' compute, or (`sum_first`: the batch's last flush) on the
        compute stream first: on the copy stream the sums, and the copy's event, would wait
        for the model's head (one GEMM over every SM; 80 TFLOP at 16 x 4096). Returns the host
        views (of the stored dtypes) and their checks ((host sums, index) or None), in `pairs`
        order, and the copy's event (None on the CPU)."""
        runs: dict[tuple, list[int]] = {}
        for i, (t, dtype) in enumerate(pairs):
            runs.setdefault((t.dtype, dtype), []).append(i)
        order = sorted(runs.items(), key=lambda run: -run[0][1].itemsize)
        items = [t for t, _ in pairs]
        flats = []
        for (source, dtype), indices in order:
            flat = _flatten_dense_tensors([items[i] for i in indices]).view(-1)
            flats.append((flat if dtype == source else flat.to(dtype)).view(torch.uint8))
        packed = torch.cat(flats) if len(flats) > 1 else flats[0]
        total = packed.numel()
        at = -(-total // 8) * 8  # where the sums go: behind the bytes, aligned
        summed = self._summed(device, order, flats, total, at)
        buffer = self.pool.take(at + 4 * len(summed) if summed else total,
                                sum(b.numel() for b in buffers))  # this flush's other devices' buffers
        buffers.append(buffer)
        event = None
        if device.type == "cuda":
            stream = self._streams.get(device)
            if stream is None:
                stream = self._streams[device] = torch.cuda.Stream(device=device)
            sums = _device_sums(packed, summed) if summed and sum_first else None  # on the compute stream
            stream.wait_stream(torch.cuda.current_stream(device))  # after the cat (and those sums)
            with torch.cuda.stream(stream):
                buffer[:total].copy_(packed, non_blocking=True)
                if summed:  # else on the copy stream: beside the next layers' compute, not in their way
                    keep.append(_sums(buffer, at, packed, summed, sums))
                event = torch.cuda.Event(blocking=True)  # the completion thread sleeps, not spins
                event.record(stream)
            keep.append(packed)
        else:
            buffer[:total].copy_(packed)
            if summed:
                _sums(buffer, at, packed, summed)
        checks_of = {}  # run -> (the host's sums, its index)
        if summed:
            sums = buffer[at:at + 4 * len(summed)].view(torch.float32)
            checks_of = {run: (sums, k) for k, (*_, run) in enumerate(summed)}
        views: list = [None] * len(items)
        checks: list = [None] * len(items)
        offset = 0
        for run, (((_, dtype), indices), flat) in enumerate(zip(order, flats)):
            host = buffer[offset:offset + flat.numel()].view(dtype)
            for i, view in zip(indices, _unflatten_dense_tensors(host, [items[i] for i in indices])):
                views[i], checks[i] = view, checks_of.get(run)
            offset += flat.numel()
        return views, checks, event

    def _summed(self, device: torch.device, order: list, flats: list, total: int, at: int) -> list[tuple]:
        """The float runs of a copy of CHECK_BYTES or more, (byte offset, bytes, dtype, run index)
        each, whose float32 sum goes at byte `at` on (none where the buffer has no room for it).
        NaN/Inf carry through any sum, so a finite sum means every element is finite; an infinite
        one (a NaN/Inf, or finite values whose sum overflows a float32, far beyond activations)
        only has the writer check that run's tensors on the CPU, as without it. float64 (and
        fp8) runs are always checked there."""
        if total < CHECK_BYTES or (device.type != "cuda" and not self._copy_host):
            return []
        summed, offset = [], 0
        for run, (((_, dtype), _), flat) in enumerate(zip(order, flats)):
            if dtype in _SUMMED:
                summed.append((offset, flat.numel(), dtype, run))
            offset += flat.numel()
        return summed if self.pool.size_class(at + 4 * len(summed)) == self.pool.size_class(total) else []


def _device_sums(packed: torch.Tensor, summed: list[tuple]) -> torch.Tensor:
    """Each run's float32 sum (accumulated in float32 as it reads the run: no copy of it), where
    `packed` lies, on the current stream."""
    return torch.stack([packed[o:o + n].view(dtype).sum(dtype=torch.float32) for o, n, dtype, _ in summed])


def _sums(buffer: torch.Tensor, at: int, packed: torch.Tensor, summed: list[tuple],
          sums: torch.Tensor | None = None) -> torch.Tensor:
    """The runs' sums (`_device_sums`, made here on the current stream unless given) copied to
    `buffer` from byte `at`; the sums on the device (kept until the copy is done)."""
    sums = _device_sums(packed, summed) if sums is None else sums
    buffer[at:at + sums.nbytes].view(torch.float32).copy_(sums, non_blocking=True)
    return sums
