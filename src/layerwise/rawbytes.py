"""A tensor's raw bytes, viewed where they lie.

The run writer's threads take a view of every tensor they write, beside a forward pass that needs
the GIL to launch its kernels: `raw_bytes` views a contiguous CPU tensor without any torch call
(each would release and retake the GIL). `filebits` then finds NaN/Inf from the bits with numpy
(no temporary, no intra-op thread pool; torch's reductions have no CPU kernels for FP8). Pure: a
tensor in, a view out.
"""

from __future__ import annotations

import ctypes

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
