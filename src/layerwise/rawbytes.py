"""A tensor's raw bytes, viewed where they lie, and whether any of them are NaN or Inf.

The run writer's threads call both for every tensor they write, beside a forward pass that needs
the GIL to launch its kernels: `raw_bytes` views a contiguous CPU tensor without any torch call
(each would release and retake the GIL), and `nonfinite_counts` finds NaN/Inf from the bits with
two numpy maxima (no temporary, no intra-op thread pool). Pure: a tensor in, a view or counts out.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch


def raw_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's bytes in C order, without a copy when it is already contiguous on the CPU.

    Such a tensor's memory is viewed where it lies, with no torch call that would release and
    retake the GIL (the run writer's threads take many views beside a forward pass that needs the
    GIL to launch its kernels); the view keeps the tensor alive."""
    if tensor.device.type == "cpu" and tensor.is_contiguous() and not (tensor.is_conj() or tensor.is_neg()):
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes == 0:
            return memoryview(b"")
        memory = (ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())
        memory.owner = tensor
        return memoryview(memory).cast("B")
    t = tensor.detach().resolve_conj().resolve_neg()  # a lazy conjugate or negation, applied
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


# floating dtype -> (its width's signed and unsigned integers, the least positive NaN-or-Inf bit
# pattern E): a value is NaN or +-Inf exactly when its bits read as signed are >= E (positive) or
# as unsigned are >= the sign bit | E (negative); e4m3fn has no Inf, its NaN is S.1111.111
_NONFINITE_BITS = {torch.float64: (np.int64, np.uint64, 0x7FF0000000000000),
                   torch.float32: (np.int32, np.uint32, 0x7F800000),
                   torch.bfloat16: (np.int16, np.uint16, 0x7F80), torch.float16: (np.int16, np.uint16, 0x7C00),
                   torch.float8_e5m2: (np.int8, np.uint8, 0x7C), torch.float8_e4m3fn: (np.int8, np.uint8, 0x7F)}


def _any_nonfinite(raw: memoryview, signed, unsigned, least: int) -> bool:
    """Whether any element is NaN or +-Inf, from its bits: two whole-tensor maxima with numpy on
    the calling thread (two calls that each release the GIL once, no temporary, no intra-op pool)."""
    sign = 1 << (8 * np.dtype(unsigned).itemsize - 1)
    return int(np.frombuffer(raw, dtype=signed).max()) >= least or \
        int(np.frombuffer(raw, dtype=unsigned).max()) >= (sign | least)


def nonfinite_counts(tensor: torch.Tensor, raw: memoryview | None = None) -> tuple[int, int] | None:
    """(NaN count, +-Inf count) of a floating tensor holding any; None when all is finite.

    It runs on the run writer's threads, beside the forward pass, for every tensor written: the
    common case (all finite) is two maxima of the raw bits on the calling thread (`_any_nonfinite`).
    torch's own reductions would each wake the intra-op pool, from several writer threads at once,
    beside the cores the forward pass launches from, and have no CPU kernels for FP8 (end to end
    on the H200 machine the two measured alike; BENCHMARKS.md). Only a tensor that has any is
    counted exactly, with torch. Other floating dtypes: a sum (a NaN or Inf survives it; one that
    overflowed is counted, finding none). An FP8 tensor is counted in float32 (exact: torch has no
    NaN/Inf reductions of its own for FP8). `raw`: the tensor's `raw_bytes`, if taken already."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    bits = _NONFINITE_BITS.get(tensor.dtype)
    if bits is not None and not _any_nonfinite(raw_bytes(tensor) if raw is None else raw, *bits):
        return None
    wide = tensor if tensor.element_size() > 1 else tensor.float()
    if bits is None and bool(torch.isfinite(wide.sum())):
        return None
    nan, inf = int(torch.isnan(wide).sum()), int(torch.isinf(wide).sum())
    return (nan, inf) if nan or inf else None
