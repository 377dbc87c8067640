"""On a Hopper GPU: torch's block-scaled scaled_mm against the exact emulation, and FP8
checkpoints whose dimensions take 128x128 blocks through every path."""

import pytest
import torch

from layerwise import loading, open_run, quant, replay, zoo
from layerwise.extract import ExtractOptions, extract_model
from layerwise.fp8 import Fp8Experts, Fp8Linear
from layerwise.layer_loading import LayerOptions, open_layers
from layerwise.streaming import StreamOptions, stream_extract

from helpers import write_medium_minimax

pytestmark = pytest.mark.gpu


def hopper():
    if not quant.scaled_mm_supported(torch.device("cuda:0"), (128, 128), 256, 256):
        pytest.skip("needs a Hopper GPU (block-scaled scaled_mm)")


@pytest.mark.parametrize("m", [1, 7, 128, 1000, 4096])
@pytest.mark.parametrize("n, k", [(6144, 3072), (3072, 1536), (1024, 3072)])
def test_scaled_mm_matches_the_emulation(m, n, k):
    hopper()
    g = torch.Generator(device="cuda").manual_seed(m + n)
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    w = torch.randn(n, k, device="cuda", generator=g) / k ** 0.5
    wq, scale = quant.quantize_weight(w, (128, 128))
    fast = quant.fp8_matmul(x, wq, scale, (128, 128), backend="scaled_mm")
    slow = quant.fp8_matmul(x, wq, scale, (128, 128), backend="emulate")
    assert fast.dtype == slow.dtype == torch.bfloat16 and fast.shape == (m, n)
    rel = ((fast.double() - slow.double()).norm() / slow.double().norm()).item()
    assert rel < 5e-3, rel  # the same products; only the float32 summation order and the bf16 rounding differ


@pytest.fixture(scope="module")
def medium_fp8(tmp_path_factory):
    """MiniMax-M2 with dimensions that take 128x128 blocks (hidden 1024, 16 experts, 2 layers), FP8."""
    root = tmp_path_factory.mktemp("medium")
    write_medium_minimax(root / "bf16", layers=2, experts=16, top_k=4)
    (root / "fp8").mkdir()
    zoo._write_fp8_checkpoint(root / "bf16", root / "fp8", [128, 128])
    return root / "fp8"


def test_fp8_layer_on_gpu_uses_scaled_mm_and_agrees_with_the_emulation(medium_fp8):
    """The same FP8 projections through scaled_mm and through the emulation: the attention block
    and the experts (fed the same routing, so no near-tie can flip) agree to bf16 rounding."""
    hopper()
    fast = open_layers(str(medium_fp8), LayerOptions(dtype="bf16", device="cuda:0", quant="fp8")).load(1)
    slow = open_layers(str(medium_fp8), LayerOptions(dtype="bf16", device="cuda:0", quant="fp8",
                                                     fp8_backend="emulate")).load(1)
    assert isinstance(fast.module.self_attn.q_proj, Fp8Linear) and isinstance(fast.module.mlp.experts, Fp8Experts)
    g = torch.Generator(device="cuda:0").manual_seed(0)
    x = torch.randn(600, 1024, device="cuda:0", generator=g).to(torch.bfloat16)
    ids = torch.randint(0, 16, (600, 4), device="cuda:0", generator=g)
    weights = torch.rand(600, 4, device="cuda:0", generator=g)
    with torch.inference_mode():
        pairs = [(fast.module.self_attn.q_proj(x), slow.module.self_attn.q_proj(x)),
                 (fast.module.mlp.experts(x, ids, weights), slow.module.mlp.experts(x, ids, weights))]
    # q_proj: the same products, only the float32 summation order and the bf16 rounding differ. The
    # experts re-quantize their intermediate to e4m3: a 1-ulp bf16 difference there can move a
    # value to the next e4m3 step (6 %), so the chain differs by more, still far below FP8's own
    # error against bf16 (2e-2 to 1e-1 on this layer).
    for (a, b), limit in zip(pairs, (5e-3, 1.5e-2)):
        rel = ((a.double() - b.double()).norm() / b.double().norm()).item()
        assert rel < limit, rel


@pytest.mark.parametrize("batch_size", [1, 8])
def test_fp8_checkpoint_every_path_on_gpu(tmp_path, medium_fp8, batch_size):
    """Dequantized: whole model, streamed and replayed are bit-identical; --quant fp8 (scaled_mm):
    whole model and streamed bit-identical, and its replay against its own run exact."""
    hopper()
    prompts = [list(range(3, 3 + n)) for n in (300, 17, 128, 5, 64, 250, 1, 90, 33)]
    options = ExtractOptions(points="residual,attn,mlp,router", batch_size=batch_size)
    from helpers import assert_runs_equal

    for mode in ("dequantize", "fp8"):
        whole = loading.load_model(str(medium_fp8), loading.LoadOptions(dtype="bf16", device_map="cuda:0", quant=mode))
        extract_model(whole, tmp_path / f"{mode}-whole", prompts, options)
        del whole
        stream_extract(str(medium_fp8), tmp_path / f"{mode}-stream", prompts, options,
                       StreamOptions(dtype="bf16", device="cuda:0", quant=mode))
        reference = open_run(tmp_path / f"{mode}-whole")
        assert_runs_equal(reference, open_run(tmp_path / f"{mode}-stream"))
        result = replay.replay(str(medium_fp8), reference, [0, 1], isolated=tmp_path / f"{mode}-iso",
                               chained=tmp_path / f"{mode}-chain")
        assert result.deterministic, result.notes
        for kind in ("iso", "chain"):
            run = open_run(tmp_path / f"{mode}-{kind}")
            for e in run.entries():
                assert torch.equal(run.tensor(e.name, e.prompt), reference.tensor(e.name, e.prompt)), (mode, kind, e.name)
