"""Routing agreement and the cause of every flip, against values worked out by hand."""

import math

import pytest
import torch

from layerwise.routing import AT_TIE, INCONSISTENT, MOVED, SAME, UNJUDGED, routing_flips, routing_metrics

T = torch.tensor


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
