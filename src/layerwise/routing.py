"""Do two runs route tokens to the same experts, and when not, why: pure functions of tensors.

`routing_flips` compares recorded top-k expert ids token by token (identical sets, Jaccard
overlap) and judges every flip from the router logits: at a near-tie (a noise-level score
difference decided it), moved (the scores really moved), or inconsistent (no selection rule both
runs share explains it: a routing bug). `pool_routing` pools the metrics over prompts. Nothing
here knows about runs, files or tolerances.

Scores are s = sigmoid(router logit) + bias: the selection score of sigmoid routers when their
correction bias was recorded (`score_bias`, MiniMax-M2, DeepSeek-V3), else sigmoid alone, which
for softmax routers is a monotone map of the logits, so top-k by s is top-k by logit.

- margin (reference, exact when its ids are the top-k of its logits): weakest chosen s minus
  strongest rejected s; a near-tie is 0 <= margin < tie_threshold.
- a flip with both runs' logits is judged without knowing any bias: if both runs choose by
  s + b with the same per-expert b, the reference margin is at most
  bound = min over dropped a of (s_a - s'_a) - max over added c of (s_c - s'_c).
  bound < tie_threshold with bound > 0: at a tie; bound >= tie_threshold: the scores moved;
  bound <= 0: inconsistent (different bias, rule or expert numbering).
- with only the reference's logits, flips are judged by its exact margin when its ids are the
  top-k of its logits (at a tie or moved), otherwise not judged (None).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .metrics import as_rows, block_rows

# Elements per block of a router's scores: 16,384 tokens of 256 experts, so a prompt's router is
# one block wherever it is judged (on a GPU each block costs several host syncs).
ROUTING_BLOCK_ELEMENTS = 1 << 22


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


# What happened to each token's expert set (routing_flips): unchanged, or a flip at a near-tie,
# where the scores moved by at least the tie threshold, that no shared rule explains, or unjudged.
SAME, AT_TIE, MOVED, INCONSISTENT, UNJUDGED = 0, 1, 2, 3, 4


def routing_metrics(ref_ids: torch.Tensor, cand_ids: torch.Tensor, ref_logits: torch.Tensor | None = None,
                    cand_logits: torch.Tensor | None = None, tie_threshold: float = 1e-3,
                    chunk_elements: int = ROUTING_BLOCK_ELEMENTS, ref_bias: torch.Tensor | None = None,
                    cand_bias: torch.Tensor | None = None) -> RoutingMetrics:
    """Compare the expert choice of two runs (see `routing_flips`)."""
    return routing_flips(ref_ids, cand_ids, ref_logits, cand_logits, tie_threshold, chunk_elements,
                         ref_bias, cand_bias)[0]


def routing_flips(ref_ids: torch.Tensor, cand_ids: torch.Tensor, ref_logits: torch.Tensor | None = None,
                  cand_logits: torch.Tensor | None = None, tie_threshold: float = 1e-3,
                  chunk_elements: int = ROUTING_BLOCK_ELEMENTS, ref_bias: torch.Tensor | None = None,
                  cand_bias: torch.Tensor | None = None) -> tuple[RoutingMetrics, torch.Tensor]:
    """Compare the expert choice of two runs; also returns each token's class [tokens] int8:
    SAME, AT_TIE, MOVED, INCONSISTENT or UNJUDGED (how: the module docstring)."""
    if ref_ids.shape != cand_ids.shape:
        raise ValueError(f"shapes differ: {tuple(ref_ids.shape)} vs {tuple(cand_ids.shape)}")
    ids_a, ids_b = as_rows(ref_ids).long(), as_rows(cand_ids).long()
    tokens, k = ids_a.shape
    classes = torch.zeros(tokens, dtype=torch.int8, device=ids_a.device)
    if tokens == 0 or k == 0:
        return RoutingMetrics(tokens, k, 1.0, 1.0, 0, 0, 0, 0, 0, 0, tie_threshold), classes
    z_a = as_rows(ref_logits) if ref_logits is not None else None
    z_b = as_rows(cand_logits) if cand_logits is not None and z_a is not None else None
    width = max(k * k, z_a.shape[1] if z_a is not None else 1)
    c = dict(same=0, flips=0, not_topk=0, near=0, ref_ties=0, bound_ties=0, inconsistent=0)
    jaccard = 0.0
    step = block_rows(width, chunk_elements)
    for start in range(0, tokens, step):  # blocks keep every kernel small and serial
        a, b = ids_a[start:start + step], ids_b[start:start + step]
        inter = (a.unsqueeze(2) == b.unsqueeze(1)).any(dim=2).sum(dim=1)  # [n]
        flips = inter != k
        block = classes[start:start + step]
        block[flips] = UNJUDGED
        c["same"] += int((~flips).sum())
        c["flips"] += int(flips.sum())
        jaccard += (inter.double() / (2 * k - inter).double()).sum().item()
        if z_a is None:
            continue
        margin = _margin(z_a[start:start + step], a, ref_bias)
        near = margin < tie_threshold
        c["not_topk"] += int((margin < 0).sum())
        c["near"] += int(near.sum())
        c["ref_ties"] += int((flips & near).sum())
        if z_b is None:  # the reference's own margin decides, if it is exact (checked after the loop)
            block[flips & near] = AT_TIE
            block[flips & ~near] = MOVED
        elif bool(flips.any()):  # judge each flip from both runs' scores, flipped tokens only
            local = flips.nonzero().squeeze(1)
            rows = local + start
            kind = _judge_flips(_scores(z_a[rows], ref_bias), _scores(z_b[rows], cand_bias), ids_a[rows],
                                ids_b[rows], tie_threshold)
            block[local] = kind
            c["inconsistent"] += int((kind == INCONSISTENT).sum())
            c["bound_ties"] += int((kind == AT_TIE).sum())
    not_topk, near, at_ties, moved, inconsistent = _flip_counts(c, z_a is not None, z_b is not None)
    if z_a is not None and z_b is None and not_topk:  # the reference's margins are not exact
        classes[classes != SAME] = UNJUDGED
    return RoutingMetrics(tokens, k, c["same"] / tokens, jaccard / tokens, c["flips"], not_topk, near, at_ties,
                          moved, inconsistent, tie_threshold), classes


def _judge_flips(s_a: torch.Tensor, s_b: torch.Tensor, ids_a: torch.Tensor, ids_b: torch.Tensor,
                 tie_threshold: float) -> torch.Tensor:
    """The class of each flipped token [n] from both runs' selection scores [n, experts]."""
    chosen_a = torch.zeros_like(s_a, dtype=torch.bool).scatter_(1, ids_a, True)
    chosen_b = torch.zeros_like(s_b, dtype=torch.bool).scatter_(1, ids_b, True)
    bound = _flip_bound(s_a - s_b, chosen_a & ~chosen_b, chosen_b & ~chosen_a)
    kind = torch.full(bound.shape, MOVED, dtype=torch.int8, device=bound.device)
    kind[(bound > 0) & (bound < tie_threshold)] = AT_TIE
    kind[~(bound > 0)] = INCONSISTENT  # bound <= 0, or NaN scores
    return kind


def _flip_counts(c: dict, ref_logits: bool, cand_logits: bool) -> tuple:
    """(selection_not_topk, near_ties, flips_at_ties, flips_moved, flips_inconsistent): None
    where what the runs recorded cannot tell."""
    not_topk = near = at_ties = moved = inconsistent = None
    if ref_logits:
        not_topk = c["not_topk"]
        if not_topk == 0:  # the reference chose the top-k of its logits: its margins are exact
            near, at_ties = c["near"], c["ref_ties"]
        if cand_logits:
            at_ties, inconsistent = c["bound_ties"], c["inconsistent"]
        if at_ties is not None:
            moved = c["flips"] - at_ties - (inconsistent or 0)
    return not_topk, near, at_ties, moved, inconsistent


def _scores(logits: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Selection scores in float64: sigmoid(logit), plus the router's correction bias if known."""
    s = torch.sigmoid(logits.double())
    return s + bias.double().reshape(1, -1) if bias is not None else s


def _margin(logits: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Per token: weakest chosen score minus strongest rejected score (inf when every expert is
    chosen). Without a bias, s = sigmoid(logit) is monotone in the logit and the strongest
    rejected expert is among the k+1 largest logits (at most k of them chosen), so one top-k
    of the logits suffices; with a bias the top-k runs on the selection scores."""
    k, experts = ids.shape[1], logits.shape[1]
    if bias is not None:
        scores = _scores(logits, bias)
        weakest = scores.gather(1, ids).min(dim=1).values
        if experts <= k:
            return torch.full_like(weakest, math.inf)
        values, index = scores.topk(k + 1, dim=1)
    else:
        weakest = torch.sigmoid(logits.gather(1, ids).double()).min(dim=1).values
        if experts <= k:
            return torch.full_like(weakest, math.inf)
        values, index = logits.topk(k + 1, dim=1)
        values = torch.sigmoid(values.double())
    rejected = ~(index.unsqueeze(2) == ids.unsqueeze(1)).any(dim=2)  # [n, k+1]
    strongest = torch.where(rejected, values, -math.inf).max(dim=1).values
    return weakest - strongest


def _flip_bound(delta: torch.Tensor, dropped: torch.Tensor, added: torch.Tensor) -> torch.Tensor:
    """Upper bound on the reference margin of a flipped token (inf where nothing flipped)."""
    low = torch.where(dropped, delta, math.inf).min(dim=1).values
    high = torch.where(added, delta, -math.inf).max(dim=1).values
    return low - high


def pool_routing(ms: list[RoutingMetrics]) -> RoutingMetrics:
    """One prompt's metrics after another, pooled: token-weighted shares, summed counts (None
    when any prompt's count is unknown)."""
    tokens = sum(m.tokens for m in ms)

    def total(attr: str) -> int | None:
        values = [getattr(m, attr) for m in ms]
        return None if any(v is None for v in values) else sum(values)

    same = sum(round(m.same_set * m.tokens) for m in ms) / tokens if tokens else 1.0
    jaccard = sum(m.jaccard * m.tokens for m in ms) / tokens if tokens else 1.0
    return RoutingMetrics(tokens, ms[0].k, same, jaccard, total("flips"), total("selection_not_topk"),
                          total("near_ties"), total("flips_at_ties"), total("flips_moved"),
                          total("flips_inconsistent"), ms[0].tie_threshold)


def num_experts(ids, logits) -> int:
    """The experts of a router, from its [tokens, experts] logits (any side) or else the largest
    expert id (`ids`, `logits`: tensors or None, one per run)."""
    widths = [x.shape[-1] for x in logits if x is not None]
    widths += [int(x.max()) + 1 for x in ids if x is not None and x.numel()]
    return max(widths, default=1)


def dense_weights(weights: torch.Tensor, ids: torch.Tensor, experts: int) -> torch.Tensor:
    """[tokens, k] weights of [tokens, k] expert ids -> [tokens, experts] (zero where unchosen)."""
    out = torch.zeros((ids.shape[0], experts), dtype=torch.float64, device=ids.device)
    return out.scatter_(1, ids.long().reshape(ids.shape[0], -1), weights.double().reshape(ids.shape[0], -1))
