"""How far a candidate tensor is from a reference tensor: pure functions, float64, chunked.

Three families, each a frozen dataclass (docs/COMPARE.md defines every field exactly):
- `tensor_metrics`: max/mean absolute error, relative L2, cosine, SQNR, NaN/Inf counts per
  side, the worst token. Any shape; dim 0 is the token axis.
- `logits_metrics`: top-1 agreement, top-k overlap, KL(ref || cand) from log_softmax.
- `routing_metrics`: identical expert sets, Jaccard overlap, near-ties and the cause of every
  routing flip, from recorded top-k ids and router logits.

Inputs are converted to float64 a block of rows at a time, so memory beyond the two inputs is a
few blocks whatever the tensor size. Nothing here knows about runs, files or tolerances.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# float64 elements per block: 256 KiB per buffer, in cache, and below torch's parallel grain
# size (32768), so kernels run serially: OpenMP regions on tiny blocks cost more than they save.
CHUNK_ELEMENTS = 32767


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


def _rows(t: torch.Tensor) -> torch.Tensor:
    """View as [tokens, features]: dim 0 is the token axis; a scalar is one token."""
    if t.dim() == 0:
        return t.reshape(1, 1)
    if t.numel() == 0:
        return t.new_empty((t.shape[0], 0))
    return t.reshape(t.shape[0], -1)


def _block_rows(width: int, chunk_elements: int) -> int:
    return max(1, chunk_elements // max(1, width))


def tensor_metrics(ref: torch.Tensor, cand: torch.Tensor, rtol: float | None = None,
                   atol: float | None = None, chunk_elements: int = CHUNK_ELEMENTS) -> TensorMetrics:
    """Error metrics of `cand` against `ref` (same shape). `rtol`/`atol` also count allclose
    violations. Identical non-finite values (NaN and NaN, +Inf and +Inf) agree; any other
    position holding a NaN or Inf is a `nonfinite_mismatch` and is left out of the error sums."""
    if ref.shape != cand.shape:
        raise ValueError(f"shapes differ: {tuple(ref.shape)} vs {tuple(cand.shape)}")
    if ref.numel() == 0:
        return TensorMetrics(0, 0.0, 0.0, 0.0, 1.0, math.inf, (0, 0), (0, 0), 0, None,
                             0 if (rtol is not None or atol is not None) else None)
    a2, b2 = _rows(ref), _rows(cand)
    rows, width = a2.shape
    step = _block_rows(width, chunk_elements)
    buf = torch.empty((min(step, rows), width), dtype=torch.float64)
    x_buf, y_buf = buf, torch.empty_like(buf)
    count = sum_abs = max_abs = saa = sbb = sdd = 0.0
    nan_a = nan_b = inf_a = inf_b = mismatch = 0
    violations = 0 if (rtol is not None or atol is not None) else None
    first_mismatch: int | None = None
    worst_err, worst_row = 0.0, None
    # Only elementwise and reduction kernels: BLAS calls (dot) on small blocks are slow when
    # BLAS threads compete with other processes, and blocks below torch's parallel grain size
    # keep every kernel single-threaded and in cache.
    for start in range(0, rows, step):
        n = min(step, rows - start)
        x, y = x_buf[:n], y_buf[:n]
        x.copy_(a2[start:start + n])
        y.copy_(b2[start:start + n])
        xa, ya = _sum_squares(x), _sum_squares(y)
        if not (math.isfinite(xa) and math.isfinite(ya)):  # rare: count and mask non-finite values
            counts = _mask_nonfinite(x, y)
            nan_a, nan_b, inf_a, inf_b = nan_a + counts[0], nan_b + counts[1], inf_a + counts[2], inf_b + counts[3]
            mismatch += counts[4]
            if counts[4] and first_mismatch is None:
                first_mismatch = start + counts[5]
            count += counts[6]
            xa, ya = _sum_squares(x), _sum_squares(y)
        else:
            count += x.numel()
        saa, sbb = saa + xa, sbb + ya
        d = y.sub_(x)  # b - a, in y's buffer
        per_token = torch.linalg.vector_norm(d, 2, dim=1)  # [n] error norm per token
        sdd += per_token.square().sum().item()
        value, index = torch.max(per_token, dim=0)
        if value.item() > worst_err:
            worst_err, worst_row = value.item(), start + int(index)
        d.abs_()
        max_abs = max(max_abs, d.max().item())
        sum_abs += d.sum().item()
        if violations is not None:
            limit = x.abs_().mul_(rtol or 0.0).add_(atol or 0.0)
            violations += int((d > limit).sum())
    # <a, b> from the three sums of squares: ||a - b||^2 = ||a||^2 + ||b||^2 - 2 <a, b>.
    sab = (saa + sbb - sdd) / 2.0
    return TensorMetrics(
        numel=ref.numel(), max_abs=max_abs, mean_abs=sum_abs / count if count else 0.0,
        rel_l2=_ratio(math.sqrt(sdd), math.sqrt(saa)), cosine=_cosine(sab, saa, sbb, sdd),
        sqnr_db=_sqnr_db(saa, sdd), nan=(nan_a, nan_b), inf=(inf_a, inf_b), nonfinite_mismatch=mismatch,
        worst_token=first_mismatch if first_mismatch is not None else worst_row, violations=violations,
    )


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
    sum_v p_ref(v) (log p_ref(v) - log p_cand(v)) with log_softmax in float64; terms with
    p_ref = 0 count as 0. No tokens: top1 = topk = 1, KL = 0."""
    if ref.shape != cand.shape:
        raise ValueError(f"shapes differ: {tuple(ref.shape)} vs {tuple(cand.shape)}")
    a2, b2 = _rows(ref), _rows(cand)
    rows, vocab = a2.shape
    if rows == 0 or vocab == 0:
        return LogitsMetrics(rows, k, 1.0, 1.0, 0.0, 0.0, None)
    k = max(1, min(k, vocab))
    agree = overlap = 0
    kl_sum, kl_max, kl_worst = 0.0, 0.0, None
    step = _block_rows(vocab, chunk_elements)
    for start in range(0, rows, step):
        x = a2[start:start + step].to(torch.float64)
        y = b2[start:start + step].to(torch.float64)
        agree += int((x.argmax(dim=1) == y.argmax(dim=1)).sum())
        tx, ty = x.topk(k, dim=1).indices, y.topk(k, dim=1).indices
        overlap += int((tx.unsqueeze(2) == ty.unsqueeze(1)).any(dim=2).sum())
        lp, lq = torch.log_softmax(x, dim=1), torch.log_softmax(y, dim=1)
        p = lp.exp()
        terms = torch.where(p > 0, p * (lp - lq), torch.zeros((), dtype=torch.float64))
        kl = terms.sum(dim=1)  # [n]
        kl_sum += kl.sum().item()
        value, index = torch.max(torch.nan_to_num(kl, nan=math.inf), dim=0)
        if kl_worst is None or value.item() > kl_max:
            kl_max, kl_worst = value.item(), start + int(index)
    return LogitsMetrics(rows, k, agree / rows, overlap / (rows * k), kl_sum / rows, kl_max, kl_worst)


# ------------------------------------------------------------------------------------ routing

@dataclass(frozen=True)
class RoutingMetrics:
    tokens: int
    k: int
    same_set: float  # share of tokens whose top-k expert SET is identical
    jaccard: float  # mean |A & B| / |A | B|
    flips: int  # tokens whose set differs
    selection_not_topk: int | None  # reference tokens whose ids are not the top-k of its logits
    near_ties: int | None  # reference tokens with margin < tie_threshold (None: cannot be known)
    flips_at_ties: int | None  # flips whose reference margin is provably < tie_threshold
    flips_moved: int | None  # flips where the router scores moved by at least tie_threshold
    flips_inconsistent: int | None  # flips that no shared selection rule explains (a routing bug)
    tie_threshold: float


def routing_metrics(ref_ids: torch.Tensor, cand_ids: torch.Tensor, ref_logits: torch.Tensor | None = None,
                    cand_logits: torch.Tensor | None = None, tie_threshold: float = 1e-3) -> RoutingMetrics:
    """Compare the expert choice of two runs. Scores are s = sigmoid(router logit): the
    selection score of sigmoid routers before their (unrecorded) correction bias, and a
    monotone map of softmax routers' logits, so top-k by s is top-k by logit.

    - margin (reference, exact when its ids are the top-k of its logits): weakest chosen s
      minus strongest rejected s; a near-tie is 0 <= margin < tie_threshold.
    - a flip with both runs' logits is judged without knowing any bias: if both runs choose by
      s + b with the same per-expert b, the reference margin is at most
      bound = min over dropped a of (s_a - s'_a) - max over added c of (s_c - s'_c).
      bound < tie_threshold with bound > 0: at a tie; bound >= tie_threshold: the scores moved;
      bound <= 0: inconsistent (different bias, rule or expert numbering).
    - with only the reference's logits, flips are judged by its exact margin when its ids are
      the top-k of its logits (at a tie or moved), otherwise not judged (None).
    """
    if ref_ids.shape != cand_ids.shape:
        raise ValueError(f"shapes differ: {tuple(ref_ids.shape)} vs {tuple(cand_ids.shape)}")
    ids_a, ids_b = _rows(ref_ids).long(), _rows(cand_ids).long()
    tokens, k = ids_a.shape
    if tokens == 0 or k == 0:
        return RoutingMetrics(tokens, k, 1.0, 1.0, 0, 0, 0, 0, 0, 0, tie_threshold)
    inter = (ids_a.unsqueeze(2) == ids_b.unsqueeze(1)).any(dim=2).sum(dim=1)  # [n]
    same = inter == k
    flips = ~same
    n_flips = int(flips.sum())
    jaccard = (inter.double() / (2 * k - inter).double()).mean().item()
    not_topk = near = at_ties = moved = inconsistent = None
    if ref_logits is not None:
        s = torch.sigmoid(_rows(ref_logits).double())
        chosen = torch.zeros_like(s, dtype=torch.bool).scatter_(1, ids_a, True)
        margin = _margin(s, chosen)
        not_topk = int((margin < 0).sum())
        if not_topk == 0:
            near = int((margin < tie_threshold).sum())
            at_ties = int((flips & (margin < tie_threshold)).sum())
            moved = n_flips - at_ties
        if cand_logits is not None:
            s_b = torch.sigmoid(_rows(cand_logits).double())
            chosen_b = torch.zeros_like(s_b, dtype=torch.bool).scatter_(1, ids_b, True)
            bound = _flip_bound(s - s_b, chosen & ~chosen_b, chosen_b & ~chosen)
            inconsistent = int((flips & (bound <= 0)).sum())
            at_ties = int((flips & (bound > 0) & (bound < tie_threshold)).sum())
            moved = n_flips - at_ties - inconsistent
    return RoutingMetrics(tokens, k, float(same.double().mean()), jaccard, n_flips, not_topk,
                          near, at_ties, moved, inconsistent, tie_threshold)


def _margin(s: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Per token: weakest chosen score minus strongest rejected score (inf if all are chosen)."""
    weakest = torch.where(chosen, s, math.inf).min(dim=1).values
    strongest = torch.where(chosen, -math.inf, s).max(dim=1).values
    return weakest - strongest


def _flip_bound(delta: torch.Tensor, dropped: torch.Tensor, added: torch.Tensor) -> torch.Tensor:
    """Upper bound on the reference margin of a flipped token (inf where nothing flipped)."""
    low = torch.where(dropped, delta, math.inf).min(dim=1).values
    high = torch.where(added, delta, -math.inf).max(dim=1).values
    return low - high
