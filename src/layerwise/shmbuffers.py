"""Shared host memory for the capture's copies, and where a file's tensors lie in it.

The capture's pinned host buffers are shared memory (a memfd, mapped here and, registered with
CUDA, the target of the device-to-host copies), so that the run writer's own processes
(`writerproc`, `writerchild`) read the tensors where the copies put them. `shared_buffer` makes
such buffers (a process-wide cache, like torch's pinned-memory cache: a buffer whose tensor is gone
is reused, never unmapped); `sources` says where a file's tensors lie (in a shared buffer, or
small enough to send with the file's message). The readers' staging buffers for host-to-device
copies are such regions too (`locked_buffer`), so that when a command's work has ended
`unpin_all` can make every page-locked byte of the process pageable again, which the kernel's
teardown of the process frees faster than torch's pinned memory (BENCHMARKS.md).
"""

from __future__ import annotations

import bisect
import ctypes
import itertools
import logging
import mmap
import os
import threading
import weakref

import torch

from . import filebits
from .rawbytes import raw_bytes

log = logging.getLogger(__name__)

INLINE_BYTES = 1 << 20  # a tensor outside shared memory up to this size is sent with its file's message


class _Region:
    __slots__ = ("id", "fd", "size", "memory", "base", "pinned")


_REGIONS: dict[int, _Region] = {}  # base address -> region (every region made: none is unmapped)
_BASES: list[int] = []  # sorted
_CACHE: dict[tuple[int, bool], list[_Region]] = {}  # (size, pinned) -> regions whose tensor is gone
_LOCK = threading.Lock()
_IDS = itertools.count()


def _new_region(nbytes: int, pin: bool) -> _Region:
    fd = os.memfd_create("layerwise-host-buffer", os.MFD_CLOEXEC)
    memory = None
    try:
        os.ftruncate(fd, nbytes)
        memory = mmap.mmap(fd, nbytes)
        base = ctypes.addressof(ctypes.c_char.from_buffer(memory))
        if pin:  # page-locked for the copy engines, as torch's pin_memory (about a second per GB)
            torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(base, nbytes, 1))  # 1: portable (every GPU)
    except BaseException:
        if memory is not None:
            memory.close()
        os.close(fd)
        raise
    region = _Region()
    region.id, region.fd, region.size, region.memory, region.pinned, region.base = \
        next(_IDS), fd, nbytes, memory, pin, base
    with _LOCK:
        _REGIONS[region.base] = region
        bisect.insort(_BASES, region.base)
    return region


def shared_buffer(nbytes: int, pin: bool) -> torch.Tensor | None:
    """A uint8 CPU tensor of `nbytes` in shared memory (page-locked and registered with CUDA when
    `pin`), the writer process's to read; None where that cannot be made (the caller allocates
    as before)."""
    with _LOCK:
        cached = _CACHE.get((nbytes, pin))
        region = cached.pop() if cached else None
    if region is None:
        try:
            region = _new_region(nbytes, pin)
        except (OSError, RuntimeError) as err:
            log.debug("no shared host buffer of %d bytes (%s): the writer's threads write its files", nbytes, err)
            return None
    memory = memoryview(region.memory)  # the tensor's storage holds it until the last view is gone
    with torch.inference_mode(False):  # a normal tensor: reused later outside inference mode too
        tensor = torch.frombuffer(memory, dtype=torch.uint8)
    weakref.finalize(memory, _came_back, region)  # then, and not before, the region may be handed out again
    return tensor


MIN_BYTES = 1 << 16  # the smallest size class


def size_class(nbytes: int) -> int:
    """The power of two from MIN_BYTES that holds `nbytes`: buffers of one class are reused across
    sizes (making page-locked memory is slow)."""
    return max(MIN_BYTES, 1 << (max(nbytes, 1) - 1).bit_length())


def locked_buffer(nbytes: int) -> torch.Tensor:
    """A page-locked uint8 CPU tensor of at least `nbytes` (its `size_class`), for staging
    host-to-device copies: a registered shared region (`unpin_all` makes it pageable at the end);
    where that cannot be made, torch's pinned memory."""
    size = size_class(nbytes)
    buffer = shared_buffer(size, True)
    if buffer is None:
        with torch.inference_mode(False):
            buffer = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    return buffer


def unpin_all() -> int:
    """Make every registered region pageable again (cudaHostUnregister, about 15 ms per GB), once
    nothing will copy from or into them: a process's teardown frees page-locked memory at about
    0.1 s per GB more than pageable memory (BENCHMARKS.md), after the work is done. The GPUs
    holding memory are synchronized first (no copy may be in flight). Returns the bytes unpinned."""
    with _LOCK:
        pinned = [region for region in _REGIONS.values() if region.pinned]
    if not pinned:
        return 0
    for index in range(torch.cuda.device_count()):
        if torch.cuda.memory_reserved(index):
            torch.cuda.synchronize(index)
    unregister, unpinned = torch.cuda.cudart().cudaHostUnregister, 0
    with _LOCK:
        for region in pinned:
            if int(unregister(region.base)) == 0:  # else it stays page-locked: the teardown frees it
                region.pinned, unpinned = False, unpinned + region.size
        for key in [key for key in _CACHE if key[1]]:  # a region unpinned is never handed out as page-locked
            for region in _CACHE.pop(key):
                _CACHE.setdefault((region.size, region.pinned), []).append(region)
    return unpinned


def _came_back(region: _Region) -> None:
    with _LOCK:
        _CACHE.setdefault((region.size, region.pinned), []).append(region)


def _region_of(tensor: torch.Tensor, nbytes: int) -> tuple[_Region, int] | None:
    ptr = tensor.data_ptr()
    with _LOCK:
        at = bisect.bisect_right(_BASES, ptr) - 1
        region = _REGIONS[_BASES[at]] if at >= 0 else None
    if region is None or ptr + nbytes > region.base + region.size:
        return None
    return region, ptr - region.base


def sources(tensors: dict[str, torch.Tensor]) -> list[tuple] | None:
    """Where the writer process finds a file's tensors: (name, dtype code, shape, bytes, source,
    region or None) each, the source ("r", region id, offset) in a shared buffer or ("b", bytes);
    None when a tensor is neither there nor small (this process writes that file)."""
    specs = []
    for name, t in tensors.items():
        code = filebits.CODES.get(str(t.dtype).removeprefix("torch."))
        if code is None or t.device.type != "cpu":  # this process says why it cannot write it
            return None
        nbytes = t.numel() * t.element_size()
        found = _region_of(t, nbytes) if _BASES and nbytes and t.is_contiguous() else None
        if found is not None:
            specs.append((name, code, tuple(t.shape), nbytes, ("r", found[0].id, found[1]), found[0]))
        elif nbytes <= INLINE_BYTES:
            specs.append((name, code, tuple(t.shape), nbytes, ("b", bytes(raw_bytes(t))), None))
        else:
            return None
    return specs


def _forget_in_child() -> None:
    """In a forked child: a lock the parent's threads may have held is not its own."""
    global _LOCK
    _LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_in_child)
