"""A tensor's raw bytes, viewed where they lie, and whether any of them are NaN or Inf.

The run writer's threads call both for every tensor they write, beside a forward pass that needs
the GIL to launch its kernels: `raw_bytes` views a contiguous CPU tensor without any torch call
(each would release and retake the GIL), and `nonfinite_counts` finds NaN/Inf from the bits with
two numpy maxima (no temporary, no intra-op thread pool; `filebits`). Pure: a tensor in, a view or counts out.
"""

from __future__ import annotations

import ctypes

import torch

from . import filebits


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


# the floating dtypes whose NaN/Inf are found from their bits (filebits.NONFINITE_BITS), by dtype
BIT_CODES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
             torch.float8_e5m2: "F8_E5M2", torch.float8_e4m3fn: "F8_E4M3"}


def nonfinite_counts(tensor: torch.Tensor, raw: memoryview | None = None) -> tuple[int, int] | None:
    """(NaN count, +-Inf count) of a floating tensor holding any; None when all is finite.

    It runs on the run writer's threads, beside the forward pass, for every tensor written: the
    common case (all finite) is two maxima of the raw bits on the calling thread, and a tensor
    holding any is counted from its bits too (`filebits.nonfinite`, the same code the writer's own
    process runs). torch's own reductions would each wake the intra-op pool, from several writer
    threads at once, beside the cores the forward pass launches from, and have no CPU kernels for
    FP8 (end to end on the H200 machine the two measured alike; BENCHMARKS.md). Other floating
    dtypes: a sum (a NaN or Inf survives it; one that overflowed is counted, finding none), then
    exact counts with torch. `raw`: the tensor's `raw_bytes`, if taken already."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return None
    code = BIT_CODES.get(tensor.dtype)
    if code is not None:
        return filebits.nonfinite(raw_bytes(tensor) if raw is None else raw, code)
    wide = tensor if tensor.element_size() > 1 else tensor.float()
    if bool(torch.isfinite(wide.sum())):
        return None
    nan, inf = int(torch.isnan(wide).sum()), int(torch.isinf(wide).sum())
    return (nan, inf) if nan or inf else None
