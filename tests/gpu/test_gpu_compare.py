"""compare's metrics on the GPU agree with the CPU's (both float64), verdicts identical."""

import math
from dataclasses import replace

import pytest

from layerwise import loading
from layerwise.compare import CompareOptions, compare_runs
from layerwise.extract import ExtractOptions, extract_model
from layerwise.runs import open_run

pytestmark = pytest.mark.gpu
PROMPTS = ["The capital of France is", "Hi", "a b c d e f g h i j k l m n o p q r s t u v w x y z " * 8]


def _fp32_and_bf16_runs(tmp_path):
    options = ExtractOptions(points="embed,residual,attn,mlp,router,norm,logits", batch_size=2)
    for dtype in ("fp32", "bf16"):
        loaded = loading.load_model("builtin:minimax-m2-tiny", loading.LoadOptions(dtype=dtype, device_map="cpu"))
        extract_model(loaded, tmp_path / dtype, PROMPTS, options)
    return open_run(tmp_path / "fp32"), open_run(tmp_path / "bf16")


def _assert_same_rows(cpu, gpu):
    assert cpu.verdict == gpu.verdict
    for a, b in zip(cpu.rows, gpu.rows):
        assert a.name == b.name and a.passed == b.passed
        if a.rel_l2 is not None:
            assert math.isclose(a.rel_l2, b.rel_l2, rel_tol=1e-9, abs_tol=1e-15), (a.name, a.rel_l2, b.rel_l2)
            assert math.isclose(a.max_abs, b.max_abs, rel_tol=1e-12), a.name
    assert math.isclose(cpu.logits.overall.kl_mean, gpu.logits.overall.kl_mean, rel_tol=1e-9)


@pytest.mark.parametrize("batch_bytes", [256 << 20, 64 << 10, 0])
def test_metrics_on_gpu_equal_metrics_on_cpu(tmp_path, monkeypatch, batch_bytes):
    """The GPU's rows are the CPU's with its tensor metrics batched over the whole run (the
    default, on these small runs), over a few units at a time, and not batched (0)."""
    from layerwise import measuring

    monkeypatch.setattr(measuring, "BATCH_BYTES", batch_bytes)
    ref, cand = _fp32_and_bf16_runs(tmp_path)
    _assert_same_rows(compare_runs(ref, cand, CompareOptions(device="cpu")),
                      compare_runs(ref, cand, CompareOptions(device="cuda:0")))


def test_tensors_streamed_to_the_gpu_measure_as_read_whole(tmp_path, monkeypatch):
    """Every tensor handed over while it is read and copied to the GPU piece by piece as it lands
    (readahead.to_device): the same rows as the CPU measuring whole tensors."""
    from layerwise import readahead

    ref, cand = _fp32_and_bf16_runs(tmp_path)
    cpu = compare_runs(ref, cand, CompareOptions(device="cpu"))
    monkeypatch.setattr(readahead, "STREAM_BYTES", 1)
    monkeypatch.setattr(readahead, "STREAM_PIECE", 256)
    _assert_same_rows(cpu, compare_runs(ref, cand, CompareOptions(device="cuda:0")))


def test_routing_judged_on_the_gpu_as_on_the_cpu(tmp_path):
    """Router tensors are copied to the metrics' GPU by the readers and their flips judged there:
    the same flips, classes and excused tokens as on the CPU (a near-tie flip at layer 1, as in
    test_compare), and every row alike."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from synthetic_runs import toy_run

    from layerwise.tolerances import build_tolerances

    ref, cand = toy_run(tmp_path / "ref"), toy_run(tmp_path / "tie", fault=("tie", 1))
    reports = [compare_runs(ref, cand, CompareOptions(tolerances=build_tolerances(max_rel_l2=5e-2), device=device))
               for device in ("cpu", "cuda:0")]
    for a, b in zip(reports[0].routing, reports[1].routing, strict=True):  # the counts exact, the mean to 1e-12
        assert replace(a.routing, jaccard=0) == replace(b.routing, jaccard=0), a.name
        assert math.isclose(a.routing.jaccard, b.routing.jaccard, rel_tol=1e-12), a.name
    assert any(r.routing.flips for r in reports[1].routing), "the fault flips a token"
    for a, b in zip(reports[0].rows, reports[1].rows):
        assert (a.name, a.passed, a.excused) == (b.name, b.passed, b.excused)
        if a.rel_l2 is not None:
            assert math.isclose(a.rel_l2, b.rel_l2, rel_tol=1e-9, abs_tol=1e-15), a.name
    assert reports[0].verdict == reports[1].verdict == "pass"


def test_tensor_and_logits_metrics_on_gpu_as_on_cpu_nonfinite_included():
    """The GPU's float64 blocks give the CPU's figures, NaN/Inf, the worst token, allclose
    violations and masked logits included."""
    import torch

    from layerwise.metrics import GPU_CHUNK_ELEMENTS, logits_metrics, tensor_metrics
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 512, generator=g)
    b = a + 1e-3 * torch.randn(300, 512, generator=g)
    b[7, 3], a[11, 5], a[12, 0], b[12, 0] = float("nan"), float("inf"), float("nan"), float("nan")
    for ref, cand in ((a[20:], b[20:]), (a, b)):  # finite, then with NaN/Inf
        cpu = tensor_metrics(ref, cand, rtol=1e-3, atol=1e-4)
        gpu = tensor_metrics(ref.cuda(), cand.cuda(), rtol=1e-3, atol=1e-4, chunk_elements=GPU_CHUNK_ELEMENTS)
        for field in ("numel", "nan", "inf", "nonfinite_mismatch", "worst_token", "violations", "max_abs"):
            assert getattr(cpu, field) == getattr(gpu, field), field
        for field in ("mean_abs", "rel_l2", "cosine", "sqnr_db"):
            assert math.isclose(getattr(cpu, field), getattr(gpu, field), rel_tol=1e-9), field
    logits = torch.randn(64, 1000, generator=g)
    other = logits + 0.1 * torch.randn(64, 1000, generator=g)
    masked = logits.clone()
    masked[5, :10] = other[5, :10] = float("-inf")  # a masked vocabulary on both sides: the careful KL
    for ref, cand in ((logits, other), (masked, other)):
        cpu, gpu = logits_metrics(ref, cand, 5), logits_metrics(ref.cuda(), cand.cuda(), 5, GPU_CHUNK_ELEMENTS)
        assert (cpu.top1, cpu.topk, cpu.kl_worst_token) == (gpu.top1, gpu.topk, gpu.kl_worst_token)
        assert math.isclose(cpu.kl_mean, gpu.kl_mean, rel_tol=1e-9, abs_tol=1e-15)
        assert math.isclose(cpu.kl_max, gpu.kl_max, rel_tol=1e-9, abs_tol=1e-15)


def test_batched_metrics_on_gpu_equal_tensor_metrics_on_cpu():
    """metricsbatch on the GPU: every field of every pair as tensor_metrics gives it on the CPU
    (NaN/Inf pairs measured alone, allclose violations, the worst token, mixed dtypes)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from test_metricsbatch import _pairs, _same

    from layerwise.metrics import tensor_metrics
    from layerwise.metricsbatch import batch_tensor_metrics

    jobs = _pairs(3)
    on_gpu = [(a.to("cuda:0"), b.to("cuda:0"), rtol, atol) for a, b, rtol, atol in jobs]
    for elements in (1 << 25, 64):
        for (a, b, rtol, atol), got in zip(jobs, batch_tensor_metrics(on_gpu, elements), strict=True):
            _same(tensor_metrics(a, b, rtol, atol), got)
