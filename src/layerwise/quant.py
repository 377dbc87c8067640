"""Quantized checkpoints: what a `quantization_config` says, and FP8 numbers in and out.

- `scheme_of(config)` reads a checkpoint's quantization (block-wise or per-tensor FP8, as
  DeepSeek-V3 and MiniMax-M2 ship it) into a `QuantScheme`, and refuses, in one line, every
  method layerwise does not run (gptq, awq, bitsandbytes, ...).
- `dequantize(weight, scale, block, dtype)`: each e4m3 value times its block's scale, computed
  in float32 and then cast to the compute dtype: the rule transformers' own
  `FineGrainedFP8Config(dequantize=True)` applies, so the bits agree.
- `quantize_weight(w, block)`: the inverse (absmax / 448 per block), for writing FP8 checkpoints.
- `quantize_activation(x, group)`: what serving engines do to activations before an FP8 matmul:
  per token, per group of `group` values along K, scale = absmax / 448 (vLLM's and SGLang's
  `per_token_group_quant_fp8`).
- `fp8_matmul(...)`: W8A8 block FP8 (fp32 accumulation, bf16 output): torch's own block-scaled
  `scaled_mm` on GPUs that have it, an exact float32 emulation of the same arithmetic elsewhere.

Pure functions of tensors: nothing here knows about files, modules, layers or runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import UserError
from .planflags import QUANT_MODES  # noqa: F401 - --quant's choices, defined where plan parses them

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
AMAX_EPS = 1e-10  # vLLM/SGLang clamp a group's absmax to this before dividing (an all-zero group)
SCALE_NAMES = ("weight_scale_inv", "weight_scale")  # per-block (DeepSeek/MiniMax) or per-tensor; both multiply
SCALED_MM_ROWS = 16  # block-scaled scaled_mm takes activations in whole groups of this many rows (padded)
# --fp8-backend: scaled_mm where it runs else the exact emulation; torch's scaled_mm; the emulation
FP8_BACKENDS = ("auto", "scaled_mm", "emulate")
DEFAULT_FP8_BACKEND = "auto"


@dataclass(frozen=True)
class QuantScheme:
    """An FP8 checkpoint's layout, from its config's `quantization_config`."""

    method: str  # "fp8"
    fmt: str  # "float8_e4m3fn"
    block: tuple[int, int] | None  # (rows, cols) of a weight block; None: one scale per tensor
    activation_scheme: str  # "dynamic"
    not_converted: tuple[str, ...]  # module name patterns stored unquantized (router, lm_head, ...)

    @property
    def group(self) -> int | None:
        """Activation quantization group along K: the weight block's column count."""
        return self.block[1] if self.block else None

    def describe(self) -> str:
        grid = f"{self.block[0]}x{self.block[1]} blocks" if self.block else "one scale per tensor"
        return f"FP8 {self.fmt.removeprefix('float8_')} weights, {grid}, {self.activation_scheme} activations"

    def bytes_per_weight(self, rows: int, cols: int, scale_bytes: int = 4) -> int:
        """Bytes a quantized [rows, cols] weight takes in the checkpoint: e4m3 values and fp32 scales."""
        if self.block is None:
            return rows * cols + scale_bytes
        return rows * cols + math.ceil(rows / self.block[0]) * math.ceil(cols / self.block[1]) * scale_bytes


_UNSUPPORTED = {
    "gptq": "GPTQ", "awq": "AWQ", "bitsandbytes": "bitsandbytes", "bitsandbytes_4bit": "bitsandbytes",
    "bitsandbytes_8bit": "bitsandbytes", "compressed-tensors": "compressed-tensors", "aqlm": "AQLM",
    "quanto": "quanto", "eetq": "EETQ", "hqq": "HQQ", "torchao": "torchao", "mxfp4": "MXFP4",
    "fbgemm_fp8": "FBGEMM FP8 (per-channel)", "bitnet": "BitNet", "vptq": "VPTQ", "spqr": "SpQR",
    "higgs": "HIGGS", "fp_quant": "FP-Quant", "auto-round": "AutoRound", "quark": "Quark",
}


def scheme_of(config) -> QuantScheme | None:
    """The checkpoint's quantization, None for a plain checkpoint. Methods layerwise cannot run
    raise UserError naming the method."""
    raw = getattr(config, "quantization_config", None)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raw = raw.to_dict() if hasattr(raw, "to_dict") else dict(vars(raw))
    method = str(raw.get("quant_method", "")).lower()
    if method != "fp8":
        name = _UNSUPPORTED.get(method, method or "an unnamed method")
        raise UserError(f"the checkpoint is quantized with {name} (quant_method {method!r}): layerwise runs "
                        "block-wise or per-tensor FP8 checkpoints only; use an unquantized (bf16) checkpoint")
    fmt = str(raw.get("fmt") or "float8_e4m3fn")
    if fmt not in ("e4m3", "float8_e4m3fn"):
        raise UserError(f"the checkpoint's FP8 format is {fmt!r}: layerwise reads float8_e4m3fn weights only")
    if str(raw.get("scale_fmt") or "float") != "float":
        raise UserError(f"the checkpoint's FP8 scales are {raw['scale_fmt']!r}: layerwise reads float32 scales only")
    block = raw.get("weight_block_size")
    if block is not None:
        if not (isinstance(block, (list, tuple)) and len(block) == 2
                and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            raise UserError(f"quantization_config.weight_block_size {block!r} must be two positive integers, "
                            "e.g. [128, 128]")
        block = (int(block[0]), int(block[1]))
    scheme = str(raw.get("activation_scheme") or "dynamic").lower()
    if scheme != "dynamic":
        raise UserError(f"the checkpoint's activation_scheme is {scheme!r}: layerwise runs dynamic FP8 activations only")
    skip = raw.get("modules_to_not_convert") or raw.get("ignored_layers") or ()
    return QuantScheme("fp8", "float8_e4m3fn", block, scheme, tuple(str(s) for s in skip))


def resolve_mode(scheme: QuantScheme | None, mode: str | None) -> str | None:
    """`--quant` against the checkpoint: None for a plain checkpoint, "dequantize" by default for FP8."""
    if mode is not None and mode not in QUANT_MODES:
        raise UserError(f"unknown --quant {mode!r}: choose from {', '.join(QUANT_MODES)}")
    if scheme is None:
        if mode is not None:
            raise UserError(f"--quant {mode} needs an FP8 checkpoint, and this one is not quantized: "
                            "drop --quant")
        return None
    return mode or "dequantize"


def gpu_present() -> bool:
    return torch.cuda.is_available()


def check_backend(mode: str | None, backend: str | None) -> None:
    """`--fp8-backend` is the arithmetic of `--quant fp8`: a backend chosen (None: not chosen, the
    default) where the model computes otherwise (`mode`, resolve_mode's) would change nothing, so
    it is refused, the default's name too."""
    if backend is None:
        return
    if backend not in FP8_BACKENDS:
        raise UserError(f"unknown --fp8-backend {backend!r}: choose from {', '.join(FP8_BACKENDS)}")
    if backend == "scaled_mm" and not gpu_present():  # said before any weight is read
        raise UserError("--fp8-backend scaled_mm runs on a Hopper GPU and this machine has none: "
                        "use --fp8-backend emulate (or auto)")
    if mode != "fp8":
        why = "the model computes with dequantized weights: add --quant fp8" if mode else "this checkpoint is not FP8"
        raise UserError(f"--fp8-backend {backend} is the arithmetic of --quant fp8, and {why}, or drop --fp8-backend")


# ------------------------------------------------------------------------------ weights

def _scale_grid(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int] | None) -> tuple[int, int]:
    """Block size for `scale` over a [rows, cols] weight; checks the scale's shape."""
    rows, cols = shape
    if block is None or scale.numel() == 1:
        return rows, cols
    want = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    if tuple(scale.shape) != want:
        raise ValueError(f"scale of shape {tuple(scale.shape)} for a [{rows}, {cols}] weight in "
                         f"{block[0]}x{block[1]} blocks: expected {list(want)}")
    return block


def dequantize(weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None,
               dtype: torch.dtype) -> torch.Tensor:
    """A [rows, cols] (or [..., rows, cols]) e4m3 weight times its per-block scales, in float32,
    cast to `dtype`. Blocks at the right and bottom edges may be partial (ceil grid)."""
    rows, cols = weight.shape[-2:]
    lead = weight.shape[:-2]
    scale = scale.to(torch.float32)
    q = weight.to(torch.float32)
    if block is None or scale.numel() == 1:
        return (q * scale.reshape(())).to(dtype)
    br, bc = _scale_grid(scale.reshape(-1, *scale.shape[-2:])[0], (rows, cols), block)
    gr, gc = scale.shape[-2:]
    if rows % br == 0 and cols % bc == 0:  # broadcast per block: no full-size scale tensor
        out = q.reshape(*lead, gr, br, gc, bc) * scale.reshape(*lead, gr, 1, gc, 1)
        return out.reshape(weight.shape).to(dtype)
    full = scale.repeat_interleave(br, dim=-2)[..., :rows, :].repeat_interleave(bc, dim=-1)[..., :cols]
    return (q * full).to(dtype)


def quantize_weight(weight: torch.Tensor, block: tuple[int, int] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, float32 scale) with scale = absmax / 448 per block (per tensor when `block` is None)."""
    w = weight.to(torch.float32)
    rows, cols = w.shape
    if block is None:
        scale = (w.abs().amax().clamp(min=AMAX_EPS) / FP8_MAX).reshape(())
        return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale
    br, bc = block
    gr, gc = math.ceil(rows / br), math.ceil(cols / bc)
    padded = F.pad(w, (0, gc * bc - cols, 0, gr * br - rows))
    blocks = padded.reshape(gr, br, gc, bc)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=AMAX_EPS) / FP8_MAX  # [gr, gc]
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).reshape(gr * br, gc * bc)[:rows, :cols]
    return q.contiguous().to(FP8_DTYPE), scale


# ------------------------------------------------------------------------------ activations and matmul

def quantize_activation(x: torch.Tensor, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] activations -> (e4m3 [M, K], float32 scales [M, K/group]): per token, per group of
    `group` values along K, scale = max(absmax, 1e-10) / 448, values clamped to +-448.
    `group` None: one scale for the whole tensor (the per-tensor scheme), shape []."""
    m, k = x.shape
    xf = x.to(torch.float32)
    if group is None:
        scale = xf.abs().amax().clamp(min=AMAX_EPS) / FP8_MAX
        return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale
    if k % group:
        raise ValueError(f"activation width {k} is not a multiple of the quantization group {group}")
    xg = xf.reshape(m, k // group, group)
    scale = xg.abs().amax(dim=-1).clamp(min=AMAX_EPS) / FP8_MAX  # [M, K/group]
    q = (xg / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.reshape(m, k), scale


def emulated_fp8_matmul(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                        block: tuple[int, int] | None, out_dtype: torch.dtype) -> torch.Tensor:
    """x @ w.T in W8A8 FP8, as a block-scaled kernel computes it: for each block of K the e4m3
    products summed in float32 (exact: 4-bit significands), scaled by the two blocks' scales and
    accumulated in float32; the output rounded once to `out_dtype`. Per-tensor (`block` None):
    one float32 sum over K, times both scales."""
    m, k = xq.shape
    n = wq.shape[0]
    a = xq.to(torch.float32)
    b = wq.to(torch.float32)
    if block is None:
        return ((a @ b.t()) * (x_scale.reshape(()) * w_scale.to(torch.float32).reshape(()))).to(out_dtype)
    br, bc = block
    kb = math.ceil(k / bc)
    if tuple(x_scale.shape) != (m, kb):
        raise ValueError(f"activation scales {tuple(x_scale.shape)} do not match [{m}, {k}] in groups of {bc}")
    pad_k = kb * bc - k
    a = F.pad(a, (0, pad_k)).reshape(m, kb, bc)
    b = F.pad(b, (0, pad_k)).reshape(n, kb, bc)
    ws = w_scale.to(torch.float32).repeat_interleave(br, dim=0)[:n]  # [ceil(N/br), kb] -> [N, kb]
    out = torch.zeros(m, n, dtype=torch.float32, device=xq.device)
    for g in range(kb):  # the kernel's order: block by block along K
        out += (a[:, g] @ b[:, g].t()) * x_scale[:, g, None] * ws[None, :, g]
    return out.to(out_dtype)


def scaled_mm_supported(device: torch.device, block: tuple[int, int] | None, k: int, n: int) -> bool:
    """Whether torch's block-scaled FP8 matmul runs this shape here: a CUDA GPU of compute
    capability 9.0 (Hopper), 1x128 activation groups and 128x128 weight blocks, K and N multiples
    of 128. (Other shapes and GPUs run the emulation.)"""
    if device.type != "cuda" or block != (128, 128) or k % 128 or n % 128:
        return False
    if not hasattr(F, "scaled_mm") or not hasattr(F, "ScalingType"):
        return False
    return torch.cuda.get_device_capability(device) == (9, 0)


def scaled_mm_fp8(xq: torch.Tensor, x_scale: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """torch's block-scaled FP8 GEMM (cuBLAS, Hopper): activation scales [M, K/128] column-major in
    1x128 groups; the weight's [N/128, K/128] scales passed transposed, [K/128, N/128] with strides
    (1, K/128), in 128x128 blocks."""
    scaling = F.ScalingType
    m = xq.shape[0]
    pad = -m % SCALED_MM_ROWS
    if pad:  # cuBLAS finds no algorithm for other row counts: zero rows (scale eps/448) cost nothing
        xq = torch.cat([xq, xq.new_zeros(pad, xq.shape[1])])
        x_scale = torch.cat([x_scale, x_scale.new_full((pad, x_scale.shape[1]), AMAX_EPS / FP8_MAX)])
    a_scale = x_scale.t().contiguous().t()
    out = F.scaled_mm(xq, wq.t(), a_scale, scaling.BlockWise1x128, w_scale.t(), scaling.BlockWise128x128,
                      output_dtype=out_dtype)
    return out[:m] if pad else out


def fp8_matmul(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor, block: tuple[int, int] | None,
               backend: str = DEFAULT_FP8_BACKEND) -> torch.Tensor:
    """x [M, K] @ dequant(w)[N, K].T as serving engines compute it: x quantized dynamically (per
    token and group of block[1] along K; per tensor for per-tensor weights), then a W8A8 FP8
    matmul with float32 accumulation; output in x's dtype. `backend`: "auto" (scaled_mm where it
    runs, else the emulation), "scaled_mm" or "emulate"."""
    xq, xs = quantize_activation(x, block[1] if block else None)
    return quantized_matmul(xq, xs, wq, w_scale, block, x.dtype, backend)


def quantized_matmul(xq: torch.Tensor, xs: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                     block: tuple[int, int] | None, out_dtype: torch.dtype,
                     backend: str = DEFAULT_FP8_BACKEND) -> torch.Tensor:
    """The W8A8 matmul of already quantized activations (`quantize_activation`'s output): torch's
    block-scaled scaled_mm where it runs (or `backend` says), else the exact emulation."""
    m, k = xq.shape
    n = wq.shape[0]
    runs_mm = scaled_mm_supported(xq.device, block, k, n)
    if backend == "scaled_mm" and not runs_mm:
        raise UserError(f"--fp8-backend scaled_mm cannot run a [{m}, {k}] x [{n}, {k}] matmul with blocks {block} on "
                        f"{xq.device} (it needs a Hopper GPU and 128x128 blocks): use --fp8-backend emulate or auto")
    if backend != "emulate" and runs_mm:
        return scaled_mm_fp8(xq, xs, wq, w_scale, out_dtype)
    return emulated_fp8_matmul(xq, xs, wq, w_scale, block, out_dtype)
