"""Metric functions against values computed by hand, edge cases included."""

import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from layerwise.metrics import logits_metrics, tensor_metrics

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


def test_a_token_wider_than_a_block_is_cut_into_the_fewest_equal_pieces():
    from layerwise.metrics import _split

    assert _split(50, 100) == 1 and _split(100, 100) == 1  # it fits
    assert _split(1000, 100) == 10 and _split(1000, 90) == 20  # 12 to 19 do not divide 1000
    assert _split(3 * 67, 3) == 67  # more than 64 pieces (the limit before)
    assert _split((1 << 19) * 1563, 1 << 19) == 1563  # a [4096 x 200,064] row in 512K-element pieces
    assert _split(1009, 100) == 1  # prime: measured whole
