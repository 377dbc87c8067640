"""metricsbatch.batch_tensor_metrics gives tensor_metrics' figures, in far fewer torch calls."""

import math
import sys
from pathlib import Path

import pytest
import torch

from layerwise.metrics import tensor_metrics
from layerwise.metricsbatch import batch_tensor_metrics

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from metrics_batch import Calls  # noqa: E402  (the benchmark's counter of aten calls)


def _pairs(seed: int = 0) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    jobs = []
    for shape in [(16, 64), (16, 64), (7,), (), (3, 4, 5), (0, 8), (16, 64), (2, 3000)]:
        a = torch.randn(shape, generator=g).to(torch.bfloat16)
        b = (a.float() + 0.01 * torch.randn(shape, generator=g)).to(torch.bfloat16)
        jobs += [(a, b, None, None), (a, b, 1e-2, 1e-3), (a, b, 0.0, 5e-3), (a, a.clone(), None, None)]
        jobs.append((a.float(), b, None, None))  # another dtype: a group of its own
    a = torch.randn(16, 64, generator=g)
    nan = a.clone()
    nan[3, 5] = float("nan")
    inf_a, inf_b = a.clone(), a.clone()
    inf_a[2, 1] = inf_b[2, 1] = float("inf")
    inf_b[9, 0] = -float("inf")
    jobs += [(a, nan, None, None), (inf_a, inf_b, 0.1, None), (nan, nan.clone(), None, None)]
    return jobs


def _same(expected, got) -> None:
    for name in expected.__dataclass_fields__:
        x, y = getattr(expected, name), getattr(got, name)
        if isinstance(x, float):
            assert x == y or math.isclose(x, y, rel_tol=1e-12, abs_tol=1e-300), (name, x, y)
        else:
            assert x == y, (name, x, y)


@pytest.mark.parametrize("elements", [1 << 19, 4096, 64])
def test_batched_figures_equal_tensor_metrics(elements):
    """Every field, NaN/Inf counted and masked, allclose violations by each pair's own
    tolerances, the worst token, empty and 0-d tensors, dtypes mixed, several passes a group
    (`elements` small) and pairs too large to stack."""
    jobs = _pairs()
    for (a, b, rtol, atol), got in zip(jobs, batch_tensor_metrics(jobs, elements), strict=True):
        _same(tensor_metrics(a, b, rtol, atol), got)


def test_the_first_worst_token_and_no_error():
    a = torch.zeros(6, 4)
    b = a.clone()
    b[2, 0] = b[4, 1] = 1.0  # two tokens tie for the largest error: the first is named
    same, tied = batch_tensor_metrics([(a, a.clone(), None, None), (a, b, None, None)])
    assert same.worst_token is None and same.rel_l2 == 0 and same.cosine == 1.0
    assert tied.worst_token == 2 == tensor_metrics(a, b).worst_token


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="shapes differ"):
        batch_tensor_metrics([(torch.zeros(2, 3), torch.zeros(3, 2), None, None)])


def test_a_batch_costs_a_few_torch_calls_not_a_few_per_pair():
    """What batching is for: 32 pairs of 512-token rows in well under 2 aten calls a pair,
    against over 20 a pair one by one (in one block each, as on a GPU)."""
    g = torch.Generator().manual_seed(1)
    jobs = [(torch.randn(512, 64, generator=g), torch.randn(512, 64, generator=g), 1e-2, 1e-3) for _ in range(32)]
    with Calls() as batched:
        batch_tensor_metrics(jobs, 1 << 25)
    with Calls() as each:
        for a, b, rtol, atol in jobs:
            tensor_metrics(a, b, rtol, atol, chunk_elements=1 << 25)
    assert batched.count / len(jobs) < 2 and each.count / len(jobs) > 20, (batched.count, each.count)
