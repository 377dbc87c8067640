"""quant.py against hand-written oracles: block dequantization, weight and activation
quantization, the W8A8 emulation, and the quantization_config contract."""

import math

import pytest
import torch

from layerwise import quant
from layerwise.errors import UserError

E4M3 = torch.float8_e4m3fn


def random_fp8(shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 100).clamp(-448, 448).to(E4M3)


def oracle_dequantize(w: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    """Element by element: value times the scale of the block it falls in, in float64."""
    rows, cols = w.shape
    out = torch.empty(rows, cols, dtype=torch.float64)
    for r in range(rows):
        for c in range(cols):
            s = scale.reshape(()) if block is None else scale[r // block[0], c // block[1]]
            out[r, c] = float(w[r, c].to(torch.float32)) * float(s)
    return out


@pytest.mark.parametrize("shape, block", [((32, 48), (16, 16)), ((37, 50), (16, 16)), ((8, 8), (128, 128)),
                                          ((20, 12), None)])
def test_dequantize_matches_the_block_oracle(shape, block):
    w = random_fp8(shape)
    grid = () if block is None else (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    scale = torch.rand(grid, generator=torch.Generator().manual_seed(1)) + 0.01
    want = oracle_dequantize(w, scale, block)
    got = quant.dequantize(w, scale, block, torch.float32)
    # the product of a 4-bit and a 24-bit significand, rounded once to float32
    assert torch.equal(got, want.to(torch.float32)), (got.double() - want).abs().max()
    assert torch.equal(quant.dequantize(w, scale, block, torch.bfloat16), want.to(torch.float32).to(torch.bfloat16))


def test_dequantize_refuses_a_scale_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"expected \[2, 3\]"):
        quant.dequantize(random_fp8((32, 48)), torch.ones(2, 2), (16, 16), torch.float32)


def test_dequantize_stacked_experts():
    w = random_fp8((3, 32, 16))
    scale = torch.rand(3, 2, 1) + 0.5
    got = quant.dequantize(w, scale, (16, 16), torch.float32)
    for e in range(3):
        assert torch.equal(got[e], oracle_dequantize(w[e], scale[e], (16, 16)).to(torch.float32))


@pytest.mark.parametrize("shape, block", [((64, 48), (16, 16)), ((37, 50), (16, 16)), ((10, 9), None)])
def test_quantize_weight_is_absmax_over_448_per_block(shape, block):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    q, scale = quant.quantize_weight(w, block)
    assert q.dtype == E4M3 and scale.dtype == torch.float32
    if block is None:
        assert scale.shape == () and math.isclose(float(scale), float(w.abs().max()) / 448, rel_tol=1e-6)
    else:
        for i in range(scale.shape[0]):
            for j in range(scale.shape[1]):
                part = w[i * block[0]:(i + 1) * block[0], j * block[1]:(j + 1) * block[1]]
                assert math.isclose(float(scale[i, j]), float(part.abs().max()) / 448, rel_tol=1e-6)
    back = quant.dequantize(q, scale, block, torch.float32)
    # e4m3 keeps 3 mantissa bits: each value within half a step (2^-4 relative) of the original,
    # or below the block's smallest normal step
    step = (scale if block is None else scale.repeat_interleave(block[0], 0)[:shape[0]]
            .repeat_interleave(block[1], 1)[:, :shape[1]]) * 2 ** -6
    assert ((back - w).abs() <= w.abs() * 2 ** -4 + step).all()
    assert q.to(torch.float32).abs().max() <= 448


def test_quantize_activation_per_token_group():
    x = torch.tensor([[1.0, -2.0, 0.5, 4.0, 0.0, 0.0, 0.0, 0.0],
                      [448.0, 1.0, 1.0, 1.0, -896.0, 3.0, 2.0, 1.0]])
    q, scale = quant.quantize_activation(x, 4)
    assert scale.shape == (2, 2)
    assert scale[0, 0] == pytest.approx(4.0 / 448) and scale[0, 1] == pytest.approx(1e-10 / 448)  # all-zero group
    assert scale[1, 0] == pytest.approx(1.0) and scale[1, 1] == pytest.approx(2.0)
    assert q[0, 3].to(torch.float32) == 448 and q[1, 4].to(torch.float32) == -448
    assert (q[0, 4:].to(torch.float32) == 0).all()
    qt, st = quant.quantize_activation(x, None)  # per tensor
    assert st.shape == () and float(st) == pytest.approx(896.0 / 448)


def oracle_w8a8(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, block) -> torch.Tensor:
    """Quantize x per token and group of block[1] by hand, then sum in float64 block by block."""
    m, k = x.shape
    n = wq.shape[0]
    group = block[1]
    out = torch.zeros(m, n, dtype=torch.float64)
    for row in range(m):
        for g in range(math.ceil(k / group)):
            part = x[row, g * group:(g + 1) * group].double()
            s_a = max(part.abs().max().item(), 1e-10) / 448
            a = (part / s_a).clamp(-448, 448).float().to(E4M3).double()
            for col in range(n):
                b = wq[col, g * group:(g + 1) * group].double()
                out[row, col] += (a * b).sum().item() * s_a * float(w_scale[col // block[0], g])
    return out


@pytest.mark.parametrize("m, k, n, block", [(5, 32, 48, (16, 16)), (1, 64, 16, (16, 16)), (3, 48, 40, (16, 16))])
def test_emulated_w8a8_matches_the_hand_oracle(m, k, n, block):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(m, k, generator=g)
    wq = random_fp8((n, k), seed=4)
    scale = torch.rand(math.ceil(n / block[0]), math.ceil(k / block[1]), generator=g) * 0.01 + 1e-3
    want = oracle_w8a8(x, wq, scale, block)
    got = quant.fp8_matmul(x, wq, scale, block, backend="emulate")
    assert got.dtype == torch.float32
    rel = ((got.double() - want).norm() / want.norm()).item()
    assert rel < 1e-6, rel  # float32 accumulation of exact block sums


def test_activation_width_must_fill_whole_groups():
    with pytest.raises(ValueError, match="not a multiple"):
        quant.quantize_activation(torch.randn(2, 40), 16)


def test_w8a8_error_is_that_of_fp8_not_more():
    """Against the unquantized product, W8A8 block FP8 errs by a few e4m3 steps, no more."""
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(64, 128, generator=g), torch.randn(96, 128, generator=g)
    wq, scale = quant.quantize_weight(w, (16, 16))
    exact = x.double() @ w.double().t()
    got = quant.fp8_matmul(x.to(torch.bfloat16), wq, scale, (16, 16), backend="emulate")
    rel = ((got.double() - exact).norm() / exact.norm()).item()
    assert 1e-3 < rel < 5e-2, rel


def test_scaled_mm_is_refused_where_it_cannot_run():
    with pytest.raises(UserError, match="scaled_mm cannot run"):
        quant.fp8_matmul(torch.randn(2, 16), random_fp8((16, 16)), torch.ones(1, 1), (16, 16), backend="scaled_mm")
    assert not quant.scaled_mm_supported(torch.device("cpu"), (128, 128), 256, 256)


class Config:
    def __init__(self, q):
        self.quantization_config = q


RELEASE = {"quant_method": "fp8", "fmt": "float8_e4m3fn", "activation_scheme": "dynamic",
           "weight_block_size": [128, 128], "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"]}


@pytest.mark.parametrize("raw, block", [(RELEASE, (128, 128)), ({**RELEASE, "weight_block_size": None}, None),
                                        ({"quant_method": "fp8"}, None),
                                        ({"quant_method": "fp8", "ignored_layers": ["gate"],
                                          "weight_block_size": [64, 32]}, (64, 32))])
def test_scheme_of_reads_fp8_configs(raw, block):
    scheme = quant.scheme_of(Config(raw))
    assert scheme.method == "fp8" and scheme.block == block and scheme.group == (block[1] if block else None)


@pytest.mark.parametrize("raw, fragment", [
    ({"quant_method": "gptq", "bits": 4}, "GPTQ"), ({"quant_method": "awq"}, "AWQ"),
    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "bitsandbytes"),
    ({"quant_method": "compressed-tensors"}, "compressed-tensors"), ({"quant_method": "mystery"}, "mystery"),
    ({**RELEASE, "fmt": "e5m2"}, "e5m2"), ({**RELEASE, "activation_scheme": "static"}, "static"),
    ({**RELEASE, "weight_block_size": [128]}, "two positive integers"),
    ({**RELEASE, "weight_block_size": [0, 128]}, "two positive integers"),
    ({**RELEASE, "scale_fmt": "ue8m0"}, "ue8m0")])
def test_scheme_of_refuses_what_layerwise_cannot_run(raw, fragment):
    with pytest.raises(UserError, match=fragment):
        quant.scheme_of(Config(raw))


def test_plain_checkpoints_have_no_scheme_and_refuse_quant():
    assert quant.scheme_of(Config(None)) is None
    assert quant.resolve_mode(None, None) is None
    with pytest.raises(UserError, match="needs an FP8 checkpoint"):
        quant.resolve_mode(None, "fp8")
    scheme = quant.scheme_of(Config(RELEASE))
    assert quant.resolve_mode(scheme, None) == "dequantize"
    assert quant.resolve_mode(scheme, "fp8") == "fp8"
    with pytest.raises(UserError, match="unknown --quant"):
        quant.resolve_mode(scheme, "int4")


def test_checkpoint_bytes_of_a_quantized_weight():
    scheme = quant.scheme_of(Config(RELEASE))
    # MiniMax-M2 q_proj: 6144 x 3072 e4m3 plus a 48 x 24 grid of fp32 scales
    assert scheme.bytes_per_weight(6144, 3072) == 6144 * 3072 + 48 * 24 * 4
