"""Metric functions against values computed by hand, edge cases included."""

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from layerwise.metrics import (AT_TIE, INCONSISTENT, MOVED, SAME, UNJUDGED, logits_metrics, routing_flips,
                               routing_metrics, tensor_metrics)

nan, inf = float("nan"), float("inf")
T = torch.tensor


# (reference, candidate, expected fields). Every value below is worked out by hand.
TENSOR_CASES = {
    "hand": (T([[3., 4.], [0., 0.]]), T([[3., 0.], [0., 0.]]),
             dict(max_abs=4.0, mean_abs=1.0, rel_l2=0.8, cosine=0.6, sqnr_db=10 * math.log10(25 / 16), worst_token=0)),
    "identical": (T([[1., -2.], [3., 4.]]), T([[1., -2.], [3., 4.]]),
                  dict(max_abs=0.0, mean_abs=0.0, rel_l2=0.0, cosine=1.0, sqnr_db=inf, worst_token=None)),
    "both zero": (torch.zeros(2, 3), torch.zeros(2, 3),
                  dict(max_abs=0.0, rel_l2=0.0, cosine=1.0, sqnr_db=inf, worst_token=None)),
    "zero reference": (T([0., 0.]), T([1., 0.]),
                       dict(max_abs=1.0, mean_abs=0.5, rel_l2=inf, cosine=0.0, sqnr_db=-inf, worst_token=0)),
    "zero candidate": (T([1., 0.]), T([0., 0.]), dict(max_abs=1.0, rel_l2=1.0, cosine=0.0, sqnr_db=0.0)),
    "opposite": (T([[1., 2.]]), T([[-1., -2.]]),
                 dict(max_abs=4.0, mean_abs=3.0, rel_l2=2.0, cosine=-1.0, sqnr_db=10 * math.log10(5 / 20))),
    "worst token is the largest error norm": (T([[1., 1.], [1., 1.], [1., 1.]]), T([[1., 1.], [1.5, 1.5], [1., 1.625]]),
                                              dict(max_abs=0.625, worst_token=1)),  # norms .71 vs .625
    "same NaN": (T([1., nan, 2.]), T([1., nan, 2.]),
                 dict(rel_l2=0.0, nan=(1, 1), nonfinite_mismatch=0, worst_token=None)),
    "NaN in candidate only": (T([1., 2., 3.]), T([1., nan, 3.]),
                              dict(rel_l2=0.0, max_abs=0.0, nan=(0, 1), nonfinite_mismatch=1, worst_token=1)),
    "NaN and finite error": (T([[1., 2.], [3., 4.]]), T([[nan, 2.], [3., 2.]]),
                             dict(max_abs=2.0, mean_abs=2 / 3, rel_l2=2 / math.sqrt(29), nonfinite_mismatch=1,
                                  worst_token=0)),
    "same Inf": (T([inf, 1.]), T([inf, 1.]), dict(rel_l2=0.0, inf=(1, 1), nonfinite_mismatch=0)),
    "opposite Inf": (T([inf, 1.]), T([-inf, 1.]), dict(inf=(1, 1), nonfinite_mismatch=1, worst_token=0)),
    "Inf against NaN": (T([inf]), T([nan]), dict(nan=(0, 1), inf=(1, 0), nonfinite_mismatch=1)),
    "empty": (torch.zeros(0, 4), torch.zeros(0, 4),
              dict(numel=0, max_abs=0.0, rel_l2=0.0, cosine=1.0, sqnr_db=inf, worst_token=None)),
    "scalar": (T(2.), T(1.), dict(max_abs=1.0, rel_l2=0.5, cosine=1.0, worst_token=0)),
    "bfloat16 exactly": (T([1., 2.], dtype=torch.bfloat16), T([1., 3.], dtype=torch.bfloat16),
                         dict(max_abs=1.0, rel_l2=1 / math.sqrt(5), cosine=7 / math.sqrt(50))),
    "int": (T([[1, 2]], dtype=torch.int32), T([[1, 4]], dtype=torch.int32), dict(max_abs=2.0, rel_l2=2 / math.sqrt(5))),
}


@pytest.mark.parametrize("case", TENSOR_CASES)
def test_tensor_metrics_hand_values(case):
    ref, cand, expected = TENSOR_CASES[case]
    got = tensor_metrics(ref, cand)
    for field, want in expected.items():
        value = getattr(got, field)
        if isinstance(want, float):
            assert value == pytest.approx(want, rel=1e-12, abs=1e-15), f"{case}: {field} = {value}, want {want}"
        else:
            assert value == want, f"{case}: {field} = {value}, want {want}"


def test_sqnr_is_minus_20_log10_rel_l2():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, 7, generator=g)
    m = tensor_metrics(a, a + 0.01 * torch.randn(50, 7, generator=g))
    assert m.sqnr_db == pytest.approx(-20 * math.log10(m.rel_l2), rel=1e-12)


@pytest.mark.parametrize("chunk, parts", [(1, 1), (7, 1), (64, 1), (1 << 20, 1), (5, 3), (7, 40)])
def test_blocks_and_threads_do_not_change_the_result(chunk, parts):
    """Block size and parallel row ranges are implementation details: tiny blocks (one row, odd
    sizes) measured by several threads agree with one block."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(33, 5, generator=g)
    b = a + 0.1 * torch.randn(33, 5, generator=g)
    b[20, 1] = nan
    with ThreadPoolExecutor(3) as pool:
        blocked = tensor_metrics(a, b, chunk_elements=chunk, map_fn=pool.map, parts=parts)
    whole = tensor_metrics(a, b, chunk_elements=1 << 20)
    for field in ("max_abs", "mean_abs", "rel_l2", "cosine", "sqnr_db"):
        assert getattr(blocked, field) == pytest.approx(getattr(whole, field), rel=1e-12), field
    assert (blocked.nan, blocked.nonfinite_mismatch, blocked.worst_token) == ((0, 1), 1, 20)


@pytest.mark.parametrize("chunk", [4, 6, 25, 7])
def test_tokens_wider_than_a_block(chunk):
    """Logits rows (200k wide) are cut into equal pieces; the result is the same."""
    g = torch.Generator().manual_seed(4)
    a = torch.randn(9, 24, generator=g)
    b = a + 0.1 * torch.randn(9, 24, generator=g)
    b[6, 20] += 5.0  # token 6 is the worst
    b[3, 17] = nan
    whole, cut = tensor_metrics(a, b, chunk_elements=1 << 20), tensor_metrics(a, b, chunk_elements=chunk)
    for field in ("max_abs", "mean_abs", "rel_l2", "cosine", "sqnr_db"):
        assert getattr(cut, field) == pytest.approx(getattr(whole, field), rel=1e-12), field
    assert (cut.worst_token, cut.nonfinite_mismatch) == (3, 1)
    b[3, 17] = a[3, 17]
    assert tensor_metrics(a, b, chunk_elements=chunk).worst_token == 6


def test_worst_token_without_nonfinite_across_blocks():
    a = torch.zeros(10, 3)
    b = a.clone()
    b[7] = 0.5
    b[2, 0] = 0.6  # larger single element, smaller token norm (0.6 < 0.87)
    assert tensor_metrics(a, b, chunk_elements=3).worst_token == 7


def test_allclose_violations():
    # |d| = (0.1, 0.05); limits atol + rtol |ref| = (0.01, 0.1): one element breaks it.
    m = tensor_metrics(T([1., 10.]), T([1.1, 10.05]), rtol=0.01, atol=0.0)
    assert m.violations == 1
    assert tensor_metrics(T([1., 10.]), T([1.1, 10.05]), rtol=0.0, atol=0.2).violations == 0
    assert tensor_metrics(T([1.]), T([2.])).violations is None


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="shapes differ"):
        tensor_metrics(torch.zeros(2, 3), torch.zeros(3, 2))


# ------------------------------------------------------------------------------------ logits

def test_logits_kl_by_hand():
    # p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3)
    m = logits_metrics(T([[0., 0.]]), T([[0., math.log(3)]], dtype=torch.float64), k=1)
    assert m.kl_mean == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel=1e-12)
    assert (m.tokens, m.top1, m.topk, m.kl_worst_token) == (1, 0.0, 0.0, 0)


def test_logits_topk_overlap_and_top1():
    ref = T([[4., 3., 2., 1.], [1., 2., 3., 4.]])
    cand = T([[4., 1., 3., 2.], [1., 2., 4., 3.]])
    m = logits_metrics(ref, cand, k=2)
    # token 0: argmax 0 = 0, top-2 {0,1} vs {0,2}: 1 of 2; token 1: argmax 3 vs 2, {3,2} vs {2,3}: 2 of 2
    assert (m.top1, m.topk, m.k) == (0.5, 0.75, 2)
    assert m.kl_max == pytest.approx(max(logits_metrics(ref[i:i + 1], cand[i:i + 1]).kl_mean for i in range(2)))


def test_logits_identical_and_masked_vocabulary():
    ref = T([[0., -inf, 1.]])
    same = logits_metrics(ref, ref.clone())
    assert (same.kl_mean, same.top1, same.topk) == (0.0, 1.0, 1.0)
    # p = (1, 0) against q = (1/2, 1/2): the p = 0 term counts 0, KL = ln 2
    assert logits_metrics(T([[0., -inf]]), T([[0., 0.]])).kl_mean == pytest.approx(math.log(2))
    # the candidate gives 0 probability where the reference does not: KL is infinite
    assert logits_metrics(T([[0., 0.]]), T([[0., -inf]])).kl_mean == inf


@pytest.mark.parametrize("chunk", [5, 7, 12])
def test_logits_wide_vocabulary_in_pieces(chunk):
    """Top-k found piece by piece and the two-pass KL agree with whole rows and log_softmax."""
    g = torch.Generator().manual_seed(5)
    a = torch.randn(6, 24, generator=g, dtype=torch.float64)
    b = a + 0.3 * torch.randn(6, 24, generator=g, dtype=torch.float64)
    a_before = a.clone()
    whole, cut = logits_metrics(a, b, k=3, chunk_elements=1 << 20), logits_metrics(a, b, k=3, chunk_elements=chunk)
    assert (cut.top1, cut.topk, cut.kl_worst_token) == (whole.top1, whole.topk, whole.kl_worst_token)
    assert cut.kl_mean == pytest.approx(whole.kl_mean, rel=1e-12)
    lp, lq = torch.log_softmax(a, 1), torch.log_softmax(b, 1)
    assert whole.kl_mean == pytest.approx((lp.exp() * (lp - lq)).sum(1).mean().item(), rel=1e-12)
    assert torch.equal(a, a_before), "the inputs are not modified"


def test_logits_empty_and_blocked():
    assert logits_metrics(torch.zeros(0, 5), torch.zeros(0, 5)).top1 == 1.0
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(9, 11, generator=g), torch.randn(9, 11, generator=g)
    one, many = logits_metrics(a, b, chunk_elements=1 << 20), logits_metrics(a, b, chunk_elements=11)
    assert (one.top1, one.topk, one.kl_worst_token) == (many.top1, many.topk, many.kl_worst_token)
    assert one.kl_mean == pytest.approx(many.kl_mean, rel=1e-12)


# ----------------------------------------------------------------------------------- routing

def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_routing_identical():
    ids = T([[0, 1], [2, 3]])
    logits = T([[5., 4., 0., 0.], [0., 0., 3., 2.]])
    m = routing_metrics(ids, ids.clone(), logits, logits.clone())
    assert (m.same_set, m.jaccard, m.flips, m.flips_inconsistent, m.selection_not_topk) == (1.0, 1.0, 0, 0, 0)


def test_routing_order_inside_the_set_does_not_matter_and_jaccard_by_hand():
    m = routing_metrics(T([[0, 1], [0, 1]]), T([[1, 0], [0, 2]]))
    # token 0: same set; token 1: {0,1} vs {0,2} = 1/3
    assert (m.same_set, m.flips) == (0.5, 1)
    assert m.jaccard == pytest.approx((1 + 1 / 3) / 2)
    assert (m.near_ties, m.flips_at_ties, m.flips_inconsistent) == (None, None, None)  # no logits: not judged


def test_routing_swapped_expert_ids_are_inconsistent():
    """The same scores but experts 0 and 1 renumbered: every token that chose one of them flips,
    and no shared selection rule explains it."""
    logits = T([[3., 0., 2., -1.], [0., 3., -1., 2.], [-1., -2., 3., 2.]])
    ref_ids = T([[0, 2], [1, 3], [2, 3]])
    swapped = ref_ids.clone().apply_(lambda e: {0: 1, 1: 0}.get(e, e))
    m = routing_metrics(ref_ids, swapped, logits, logits.clone())
    assert (m.flips, m.flips_inconsistent, m.flips_at_ties, m.flips_moved) == (2, 2, 0, 0)


def test_near_ties_counted_on_constructed_logits():
    delta = 1e-3
    logits = T([[2.0, 2.0 + delta, -1., -1.],  # k=1 margin sigmoid(2.001) - sigmoid(2) ~ 1.05e-4: tie
                [0.0, 0.0 + delta, -3., -3.],  # margin ~ 2.5e-4: tie
                [3.0, 0.0, -1., -1.],  # margin sigmoid(3) - sigmoid(0) = 0.45: clear
                [1.0, 0.5, 0.2, -1.]])  # margin sigmoid(1) - sigmoid(0.5) = 0.109: clear at 1e-3, a tie at 0.2
    ids = T([[1], [1], [0], [0]])
    m = routing_metrics(ids, ids.clone(), logits, tie_threshold=1e-3)
    assert _sig(1.0) - _sig(0.5) > 1e-3
    assert (m.near_ties, m.selection_not_topk, m.flips) == (2, 0, 0)
    assert routing_metrics(ids, ids.clone(), logits, tie_threshold=0.2).near_ties == 3


def test_flip_causes():
    ref_logits = T([[2.0, 2.001, -5.], [3.0, 0.0, -5.], [2.0, 1.0, -5.]])
    cand_logits = T([[2.002, 2.001, -5.],  # the near-tie reorders: at a tie
                     [0.0, 3.0, -5.],  # the scores moved a lot: moved
                     [2.5, 0.5, -5.]])  # expert 0 gained, 1 lost, yet 1 was chosen: inconsistent
    ref_ids, cand_ids = T([[1], [0], [0]]), T([[0], [1], [1]])
    m, classes = routing_flips(ref_ids, cand_ids, ref_logits, cand_logits, tie_threshold=1e-3)
    assert (m.flips, m.flips_at_ties, m.flips_moved, m.flips_inconsistent) == (3, 1, 1, 1)
    assert m.near_ties == 1
    assert classes.tolist() == [AT_TIE, MOVED, INCONSISTENT]
    # with the reference's logits only, its exact margins decide
    _, alone = routing_flips(ref_ids, cand_ids, ref_logits, tie_threshold=1e-3)
    assert alone.tolist() == [AT_TIE, MOVED, MOVED]
    _, unjudged = routing_flips(ref_ids, cand_ids)
    assert unjudged.tolist() == [UNJUDGED] * 3
    assert routing_flips(ref_ids, ref_ids.clone(), ref_logits, ref_logits)[1].tolist() == [SAME] * 3


def test_selection_not_topk_of_logits_means_a_hidden_bias():
    # expert 0 chosen although expert 1 has the larger logit: a score bias decided
    m = routing_metrics(T([[0]]), T([[0]]), T([[1.0, 2.0]]), T([[1.0, 2.0]]))
    assert (m.selection_not_topk, m.near_ties) == (1, None)
    assert m.flips_inconsistent == 0  # flips are still judged from both runs' logits


def test_routing_blocks_do_not_change_the_result():
    g = torch.Generator().manual_seed(3)
    ref_logits = torch.randn(50, 6, generator=g)
    cand_logits = ref_logits + 0.3 * torch.randn(50, 6, generator=g)
    ref_ids, cand_ids = ref_logits.topk(2, dim=1).indices, cand_logits.topk(2, dim=1).indices
    whole = routing_metrics(ref_ids, cand_ids, ref_logits, cand_logits, tie_threshold=0.05)
    blocked = routing_metrics(ref_ids, cand_ids, ref_logits, cand_logits, tie_threshold=0.05, chunk_elements=7)
    assert whole.flips > 3 and whole.flips_at_ties and whole.flips_moved and whole.near_ties
    assert whole.flips_inconsistent == 0  # both chose the top-k of their own logits
    assert blocked == whole


def test_routing_empty():
    m = routing_metrics(torch.zeros(0, 2, dtype=torch.int32), torch.zeros(0, 2, dtype=torch.int32))
    assert (m.tokens, m.same_set, m.flips) == (0, 1.0, 0)


def test_routing_with_recorded_bias_has_exact_near_ties():
    """A sigmoid router choosing by sigmoid(logit) + bias: without the bias the choice is not the
    top-k of the logits (near-ties unknowable); with it, margins are exact."""
    from layerwise.metrics import routing_metrics

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.1, 3.0, 2.0], [1.0, 1.02, -9.0, -9.0]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.9])
    s = torch.sigmoid(logits.double()) + bias.double()
    ids = s.topk(2, dim=1).indices  # row 0 picks experts 3 and 0, not the top-2 logits (0, 1)
    blind = routing_metrics(ids, ids, logits, logits, tie_threshold=0.05)
    assert blind.selection_not_topk >= 1 and blind.near_ties is None
    exact = routing_metrics(ids, ids, logits, logits, tie_threshold=0.05, ref_bias=bias, cand_bias=bias)
    assert exact.selection_not_topk == 0
    # margins: row 0: min(s3, s0) - s1 = 0.8808 - 0.7311 = 0.15; row 1: s3 + .9 vs s2: both chosen, s1 rejected
    # margins: 0.15, 0.43 and 0.004 (row 2: experts 3 (0.9 bias) and 1 chosen, 0 rejected by 0.004)
    margins = [(s[r, ids[r]].min() - s[r][[i for i in range(4) if i not in ids[r].tolist()]].max()).item()
               for r in range(3)]
    assert [m < 0.05 for m in margins] == [False, False, True]
    assert exact.near_ties == 1
