"""`tensor_metrics` of many small tensor pairs at once: same-shaped pairs stacked and measured in
one set of kernels, their figures brought back in one list.

On a GPU, `tensor_metrics` of a 512-token residual tensor costs some thirty torch calls for a
fraction of a millisecond of kernels: a compare of such runs was bound by the measuring thread's
calls (and the GIL it takes back after each), with the GPU idle 90 % of the time (BENCHMARKS.md).
Stacked K at a time, the same figures cost about sixteen calls and one host sync per K pairs.

The figures are `tensor_metrics`' own, the sums taken in another order (float64: they agree to
about 1e-15 relative). A pair holding NaN or Inf, an empty pair, or one larger than a batch is
measured alone by `tensor_metrics`, so non-finite values are counted and masked exactly as there.
On a CPU this is slower than `tensor_metrics`' cache-sized blocks (benchmarks/metrics_batch.py):
it is for GPUs.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from .metrics import GPU_CHUNK_ELEMENTS, Sums, TensorMetrics, as_rows, from_sums, tensor_metrics

# Elements of each side stacked into one batched pass (its float64 buffers: 256 MiB each).
BATCH_ELEMENTS = GPU_CHUNK_ELEMENTS

Job = tuple  # (reference, candidate, rtol or None, atol or None), as tensor_metrics takes them


def batch_tensor_metrics(jobs: list[Job], elements: int = BATCH_ELEMENTS) -> list[TensorMetrics]:
    """`tensor_metrics(ref, cand, rtol, atol)` of every job, in order. Pairs of one shape, dtypes
    and devices are measured together, up to `elements` elements a side per pass."""
    out: list[TensorMetrics | None] = [None] * len(jobs)
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, (a, b, rtol, atol) in enumerate(jobs):
        if a.shape != b.shape:
            raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        if a.numel() == 0 or a.numel() > elements // 2:  # nothing to gain stacking it
            out[i] = tensor_metrics(a, b, rtol, atol, chunk_elements=elements)
            continue
        allclose = rtol is not None or atol is not None
        groups[(tuple(a.shape), a.dtype, b.dtype, a.device, b.device, allclose)].append(i)
    for members in groups.values():
        per_pass = max(1, elements // jobs[members[0]][0].numel())
        for start in range(0, len(members), per_pass):
            chunk = members[start:start + per_pass]
            try:
                stacked = _stacked([jobs[i] for i in chunk])
            except torch.OutOfMemoryError:  # no room on the device for the stacked pass: one by one
                stacked = [None] * len(chunk)
            for i, metrics in zip(chunk, stacked):
                # None: a side holds NaN or Inf (measured alone, they are counted and masked), or no room
                out[i] = metrics if metrics is not None else tensor_metrics(*jobs[i], chunk_elements=elements)
    return out  # type: ignore[return-value]


def _stacked(jobs: list[Job]) -> list[TensorMetrics | None]:
    """The metrics of K same-shaped, non-empty pairs in one pass (None for a pair with a
    non-finite value)."""
    k, rows = len(jobs), as_rows(jobs[0][0]).shape  # every pair as [tokens, width], stacked: [K, tokens, width]
    x = torch.stack([a for a, _, _, _ in jobs]).to(torch.float64).view(k, *rows)
    y = torch.stack([b for _, b, _, _ in jobs]).to(device=x.device, dtype=torch.float64).view(k, *rows)
    norm_a = torch.linalg.vector_norm(x.view(k, -1), 2, dim=1)
    norm_b = torch.linalg.vector_norm(y.view(k, -1), 2, dim=1)
    d = y.sub_(x)  # b - a, in y's buffer
    per_token = torch.linalg.vector_norm(d, 2, dim=2).square_()  # [K, tokens] squared error per token
    worst, at = torch.max(per_token, dim=1)  # the first token of the largest error, as tensor_metrics
    flat = d.abs_().view(k, -1)
    columns = [norm_a, norm_b, per_token.sum(dim=1), worst, at.to(torch.float64), flat.amax(dim=1), flat.sum(dim=1)]
    allclose = jobs[0][2] is not None or jobs[0][3] is not None
    if allclose:
        tolerances = torch.tensor([[rtol or 0.0, atol or 0.0] for _, _, rtol, atol in jobs], dtype=torch.float64)
        rtol, atol = tolerances.to(x.device).view(k, 2, 1, 1).unbind(1)
        limit = x.abs_().mul_(rtol).add_(atol)
        columns.append((d > limit).view(k, -1).sum(dim=1).to(torch.float64))
    numel = jobs[0][0].numel()
    out: list[TensorMetrics | None] = []
    for na, nb, sdd, worst_err, token, max_abs, sum_abs, *violations in zip(*torch.stack(columns).tolist()):
        saa, sbb = na * na, nb * nb
        if not (math.isfinite(saa) and math.isfinite(sbb)):
            out.append(None)
            continue
        sums = Sums(count=numel, sum_abs=sum_abs, max_abs=max_abs, saa=saa, sbb=sbb, sdd=sdd, worst_err=worst_err,
                    worst_row=int(token) if worst_err > 0.0 else None,
                    violations=int(violations[0]) if allclose else None)
        out.append(from_sums(numel, sums))
    return out
