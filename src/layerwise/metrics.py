"""How far a candidate tensor is from a reference tensor: pure functions, float64, chunked.

Two families here, each a frozen dataclass (docs/COMPARE.md defines every field exactly); the
third, routing agreement, is routing.py's:
- `tensor_metrics`: max/mean absolute error, relative L2, cosine, SQNR, NaN/Inf counts per
  side, the worst token. Any shape; dim 0 is the token axis.
- `logits_metrics`: top-1 agreement, top-k overlap, KL(ref || cand) from log_softmax;
  `pool_logits` pools them over prompts.

Inputs are converted to float64 a block of rows at a time, so memory beyond the two inputs is a
few blocks whatever the tensor size. Nothing here knows about runs, files or tolerances.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

# float64 elements per block on the CPU: 4 MiB per buffer, so a block's passes (conversion, norms,
# difference, abs) stay in the cores' caches; with 32 MiB blocks (1 << 22) they went to memory
# each time: a layer test's tensors compared 1.2-1.4x slower cold, 1.3-1.7x warm, on the 2-core
# machine, the logits about alike (BENCHMARKS.md).
CHUNK_ELEMENTS = 1 << 19
# On a GPU one block of 256 MiB per buffer: each block costs a few host syncs, not cache misses.
GPU_CHUNK_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class TensorMetrics:
    numel: int
    max_abs: float  # max |a - b| over positions where both are finite
    mean_abs: float  # mean |a - b| over the same positions
    rel_l2: float  # ||a - b|| / ||a||   (0/0 = 0, x/0 = inf)
    cosine: float  # <a, b> / (||a|| ||b||)   (both zero = 1, one zero = 0)
    sqnr_db: float  # 10 log10(||a||^2 / ||a - b||^2)   (no error = inf)
    nan: tuple[int, int]  # NaN count in (reference, candidate)
    inf: tuple[int, int]  # +-Inf count in (reference, candidate)
    nonfinite_mismatch: int  # positions where a and b are not the same non-finite value
    worst_token: int | None  # token with the largest error (a mismatch first); None: no error
    violations: int | None = None  # elements with |a - b| > atol + rtol |a|; None unless asked


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """View as [tokens, features]: dim 0 is the token axis; a scalar is one token."""
    if t.dim() == 0:
        return t.reshape(1, 1)
    if t.numel() == 0:
        return t.new_empty((t.shape[0], 0))
    return t.reshape(t.shape[0], -1)


def block_rows(width: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // max(1, width))


def tensor_metrics(ref: torch.Tensor, cand: torch.Tensor, rtol: float | None = None,
                   atol: float | None = None, chunk_elements: int = CHUNK_ELEMENTS,
                   map_fn: Callable = map, parts: int = 1) -> TensorMetrics:
    """Error metrics of `cand` against `ref` (same shape). `rtol`/`atol` also count allclose
    violations. Identical non-finite values (NaN and NaN, +Inf and +Inf) agree; any other
    position holding a NaN or Inf is a `nonfinite_mismatch` and is left out of the error sums.
    The rows are measured in `parts` contiguous ranges through `map_fn` (an executor's `map`
    measures them in parallel threads); the result does not depend on either."""
    if ref.shape != cand.shape:
        raise ValueError(f"shapes differ: {tuple(ref.shape)} vs {tuple(cand.shape)}")
    allclose = rtol is not None or atol is not None
    if ref.numel() == 0:
        return TensorMetrics(0, 0.0, 0.0, 0.0, 1.0, math.inf, (0, 0), (0, 0), 0, None, 0 if allclose else None)
    a2, b2 = as_rows(ref), as_rows(cand)
    rows, width = a2.shape
    split = _split(width, chunk_elements)  # a token wider than a block (logits) is measured in pieces
    a2, b2 = a2.reshape(rows * split, width // split), b2.reshape(rows * split, width // split)
    step = max(1, block_rows(width // split, chunk_elements) // split) * split  # whole tokens per block
    parts = max(1, min(parts, -(-rows * split // step)))  # no range smaller than one block
    bounds = [rows * i // parts * split for i in range(parts + 1)]
    ranges = list(zip(bounds[:-1], bounds[1:]))
    total = Sums(violations=0 if allclose else None)
    for part in map_fn(lambda r: _accumulate(a2, b2, r[0], r[1], step, split, rtol, atol, allclose), ranges):
        total.merge(part)
    return from_sums(ref.numel(), total)


def from_sums(numel: int, t: Sums) -> TensorMetrics:
    """The metrics of a pair from its sums (whoever took them: `tensor_metrics`, metricsbatch.py)."""
    # <a, b> from the three sums of squares: ||a - b||^2 = ||a||^2 + ||b||^2 - 2 <a, b>.
    sab = (t.saa + t.sbb - t.sdd) / 2.0
    return TensorMetrics(
        numel=numel, max_abs=t.max_abs, mean_abs=t.sum_abs / t.count if t.count else 0.0,
        rel_l2=_ratio(math.sqrt(t.sdd), math.sqrt(t.saa)), cosine=_cosine(sab, t.saa, t.sbb, t.sdd),
        sqnr_db=_sqnr_db(t.saa, t.sdd), nan=(t.nan_a, t.nan_b), inf=(t.inf_a, t.inf_b),
        nonfinite_mismatch=t.mismatch, worst_token=t.first_mismatch if t.first_mismatch is not None else t.worst_row,
        violations=t.violations,
    )


@dataclass
class Sums:
    """Running sums over a range of rows; `merge` adds a later range."""
    count: int = 0  # finite pairs
    sum_abs: float = 0.0
    max_abs: float = 0.0
    saa: float = 0.0
    sbb: float = 0.0
    sdd: float = 0.0
    nan_a: int = 0
    nan_b: int = 0
    inf_a: int = 0
    inf_b: int = 0
    mismatch: int = 0
    first_mismatch: int | None = None
    worst_err: float = 0.0  # largest per-token squared error
    worst_row: int | None = None
    violations: int | None = None

    def merge(self, o: Sums) -> None:
        for name in ("count", "sum_abs", "saa", "sbb", "sdd", "nan_a", "nan_b", "inf_a", "inf_b", "mismatch"):
            setattr(self, name, getattr(self, name) + getattr(o, name))
        self.max_abs = max(self.max_abs, o.max_abs)
        if self.first_mismatch is None:
            self.first_mismatch = o.first_mismatch
        if o.worst_err > self.worst_err:
            self.worst_err, self.worst_row = o.worst_err, o.worst_row
        if self.violations is not None:
            self.violations += o.violations


def _split(width: int, chunk_elements: int) -> int:
    """Into how many equal pieces to cut a token wider than a block: the fewest that divide it, each
    piece from a block down to an eighth of one (1: it fits, or no such count divides it, and it
    is measured whole)."""
    fewest = -(-width // max(1, chunk_elements))
    if fewest <= 1:
        return 1
    return next((n for n in range(fewest, min(width, 8 * fewest) + 1) if width % n == 0), 1)


def _accumulate(a2: torch.Tensor, b2: torch.Tensor, begin: int, end: int, step: int, split: int,
                rtol: float | None, atol: float | None, allclose: bool) -> Sums:
    """Sums over rows [begin, end), `split` rows per token, converted to float64 `step` rows at
    a time (whole tokens). Only elementwise
    and reduction kernels on blocks below torch's parallel grain size: each kernel runs serially
    in cache (BLAS dot or OpenMP regions on small blocks cost more than they save, and stall
    badly when other processes share the cores)."""
    s = Sums(violations=0 if allclose else None)
    x_buf = torch.empty((min(step, end - begin), a2.shape[1]), dtype=torch.float64, device=a2.device)
    y_buf = torch.empty_like(x_buf)
    for start in range(begin, end, step):
        n = min(step, end - start)
        x, y = x_buf[:n], y_buf[:n]
        x.copy_(a2[start:start + n])
        y.copy_(b2[start:start + n])
        xa, ya = _sum_squares(x), _sum_squares(y)
        if not (math.isfinite(xa) and math.isfinite(ya)):  # rare: count and mask non-finite values
            counts = _mask_nonfinite(x, y)
            s.nan_a, s.nan_b, s.inf_a, s.inf_b = s.nan_a + counts[0], s.nan_b + counts[1], s.inf_a + counts[2], \
                s.inf_b + counts[3]
            s.mismatch += counts[4]
            if counts[4] and s.first_mismatch is None:
                s.first_mismatch = (start + counts[5]) // split
            s.count += counts[6]
            xa, ya = _sum_squares(x), _sum_squares(y)
        else:
            s.count += x.numel()
        s.saa, s.sbb = s.saa + xa, s.sbb + ya
        d = y.sub_(x)  # b - a, in y's buffer
        per_token = torch.linalg.vector_norm(d, 2, dim=1).square_()  # [n] squared error per row
        if split > 1:
            per_token = per_token.view(-1, split).sum(dim=1)  # per token
        s.sdd += per_token.sum().item()
        value, index = torch.max(per_token, dim=0)
        if value.item() > s.worst_err:
            s.worst_err, s.worst_row = value.item(), start // split + int(index)
        d.abs_()
        s.max_abs = max(s.max_abs, d.amax().item())  # amax: twice as fast as max() on CPU
        s.sum_abs += d.sum().item()
        if allclose:
            limit = x.abs_().mul_(rtol or 0.0).add_(atol or 0.0)
            s.violations += int((d > limit).sum())
    return s


def _sum_squares(x: torch.Tensor) -> float:
    return torch.linalg.vector_norm(x).item() ** 2


def _mask_nonfinite(x: torch.Tensor, y: torch.Tensor) -> tuple[int, ...]:
    """Count NaN/Inf on each side, zero every position that is not a finite pair (in place).
    Returns (nan_a, nan_b, inf_a, inf_b, mismatches, first mismatching row, finite pairs)."""
    nan_x, nan_y, inf_x, inf_y = torch.isnan(x), torch.isnan(y), torch.isinf(x), torch.isinf(y)
    finite = ~(nan_x | inf_x) & ~(nan_y | inf_y)
    same = (nan_x & nan_y) | (inf_x & inf_y & (x == y))
    bad = ~finite & ~same
    bad_rows = bad.any(dim=1).nonzero()
    x.masked_fill_(~finite, 0.0)
    y.masked_fill_(~finite, 0.0)
    return (int(nan_x.sum()), int(nan_y.sum()), int(inf_x.sum()), int(inf_y.sum()), int(bad.sum()),
            int(bad_rows[0]) if len(bad_rows) else 0, int(finite.sum()))


def _ratio(num: float, den: float) -> float:
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _cosine(sab: float, saa: float, sbb: float, sdd: float) -> float:
    if sdd == 0.0:  # identical (both zero included)
        return 1.0
    if saa == 0.0 or sbb == 0.0:
        return 0.0
    return max(-1.0, min(1.0, sab / math.sqrt(saa * sbb)))


def _sqnr_db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


# ------------------------------------------------------------------------------------- logits

@dataclass(frozen=True)
class LogitsMetrics:
    tokens: int
    k: int
    top1: float  # share of tokens whose argmax agrees
    topk: float  # mean |top-k(ref) & top-k(cand)| / k
    kl_mean: float  # mean over tokens of KL(p_ref || p_cand), nats
    kl_max: float
    kl_worst_token: int | None


def logits_metrics(ref: torch.Tensor, cand: torch.Tensor, k: int = 5,
                   chunk_elements: int = CHUNK_ELEMENTS) -> LogitsMetrics:
    """Next-token agreement of two [tokens, vocab] logit tensors. KL(ref || cand) per token is
    sum_v p_ref(v) (log p_ref(v) - log p_cand(v)) in float64; terms with p_ref = 0 count as 0;
    rounding below 0 is reported as 0. No tokens: top1 = topk = 1, KL = 0."""
    if ref.shape != cand.shape:
        raise ValueError(f"shapes differ: {tuple(ref.shape)} vs {tuple(cand.shape)}")
    a2, b2 = as_rows(ref), as_rows(cand)
    rows, vocab = a2.shape
    if rows == 0 or vocab == 0:
        return LogitsMetrics(rows, k, 1.0, 1.0, 0.0, 0.0, None)
    k = max(1, min(k, vocab))
    pieces = _split(vocab, chunk_elements)
    agree = overlap = 0
    kl_sum, kl_max, kl_worst = 0.0, 0.0, None
    step = block_rows(vocab, chunk_elements)
    for start in range(0, rows, step):
        # top-k on float32 (exact for bf16/fp16/fp32 logits, and several times faster than float64)
        (vx, ix), (vy, iy) = (_topk(t[start:start + step].float(), k, pieces) for t in (a2, b2))
        vx, vy = vx.double(), vy.double()
        x = a2[start:start + step].to(torch.float64, copy=True)  # _kl overwrites them
        y = b2[start:start + step].to(torch.float64, copy=True)
        agree += int((ix[:, 0] == iy[:, 0]).sum())
        overlap += int((ix.unsqueeze(2) == iy.unsqueeze(1)).any(dim=2).sum())
        kl = _kl(x, y, vx[:, :1], vy[:, :1])
        if not bool(torch.isfinite(kl).all()):  # -inf logits (masked vocabulary), NaN, Inf: term by term
            kl = _kl_careful(a2[start:start + step].to(torch.float64), b2[start:start + step].to(torch.float64))
        kl_sum += kl.sum().item()
        value, index = torch.max(torch.nan_to_num(kl, nan=math.inf), dim=0)
        if kl_worst is None or value.item() > kl_max:
            kl_max, kl_worst = value.item(), start + int(index)
    return LogitsMetrics(rows, k, agree / rows, overlap / (rows * k), kl_sum / rows, kl_max, kl_worst)


def _topk(x: torch.Tensor, k: int, pieces: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k (values, indices) of each row, largest first, found piece by piece: the k largest of
    a row are among the k largest of its pieces (three times faster on a 200k vocabulary)."""
    n, width = x.shape
    if pieces == 1:
        return x.topk(k, dim=1)
    part = width // pieces
    values, index = x.view(n, pieces, part).topk(min(k, part), dim=2)
    index = index + (torch.arange(pieces, device=x.device) * part).view(1, pieces, 1)
    values, order = values.reshape(n, -1).topk(k, dim=1)
    return values, index.reshape(n, -1).gather(1, order)


def _kl(x: torch.Tensor, y: torch.Tensor, max_x: torch.Tensor, max_y: torch.Tensor) -> torch.Tensor:
    """KL(softmax x || softmax y) per row with two exp passes: with e = exp(x - max x),
    KL = sum(e (x - y)) / sum(e) - (logsumexp x - logsumexp y). Overwrites x and y."""
    d = x - y
    ex = x.sub_(max_x).exp_()
    sx = ex.sum(dim=1)
    sy = y.sub_(max_y).exp_().sum(dim=1)
    lse_diff = (max_x.squeeze(1) + sx.log()) - (max_y.squeeze(1) + sy.log())
    return (ex.mul_(d).sum(dim=1) / sx - lse_diff).clamp_(min=0.0)


def _kl_careful(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    lp, lq = torch.log_softmax(x, dim=1), torch.log_softmax(y, dim=1)
    p = lp.exp()
    return torch.where(p > 0, p * (lp - lq), torch.zeros((), dtype=torch.float64, device=x.device)).sum(dim=1)


def pool_logits(per_prompt: list[tuple[int, LogitsMetrics]]) -> tuple[LogitsMetrics, tuple[int, int] | None]:
    """[(prompt, metrics)] pooled: token-weighted means, the worst KL over all; also (prompt,
    token) of that worst KL."""
    tokens = sum(m.tokens for _, m in per_prompt)
    worst_p, worst_m = max(per_prompt, key=lambda pm: pm[1].kl_max)

    def mean(attr: str, empty: float) -> float:
        return sum(getattr(m, attr) * m.tokens for _, m in per_prompt) / tokens if tokens else empty

    pooled = LogitsMetrics(tokens, per_prompt[0][1].k, mean("top1", 1.0), mean("topk", 1.0), mean("kl_mean", 0.0),
                           worst_m.kl_max, worst_m.kl_worst_token)
    return pooled, None if worst_m.kl_worst_token is None else (worst_p, worst_m.kl_worst_token)
