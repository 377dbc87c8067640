"""The FP8 candidate: a decoder layer whose projections compute as serving engines compute them.

vLLM and SGLang run a block-FP8 checkpoint (DeepSeek-V3, MiniMax-M2) as W8A8: the weights stay
e4m3 with their per-block scales, the activations are quantized per token and group of 128 on
the fly, the matmul accumulates in float32 and rounds to bf16. `to_fp8(layer, raw, scheme)`
takes a decoder layer that transformers built from the dequantized checkpoint and replaces each
of its quantized projections with a module that does exactly that (quant.fp8_matmul):

- `Fp8Linear` for an `nn.Linear` (attention projections, dense MLPs);
- `Fp8Experts` for transformers' fused MoE experts (`gate_up_proj` [E, 2I, H], `down_proj`
  [E, H, I]), looping over the experts the tokens chose as transformers' own loop does.

Which checkpoint tensors feed which module is found by name (the module's own path, or the
checkpoint's older spelling such as `block_sparse_moe.experts.E.w1`/`w3`/`w2`), and every
replacement is checked: its FP8 weight dequantized must equal, bit for bit, the parameter
transformers built, so a wrong mapping cannot pass silently. Everything else in the layer
(norms, router, attention kernel, residual adds) stays transformers' own.

This module knows nothing about files or runs: it gets the layer's checkpoint tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from . import quant
from .errors import UserError

# Checkpoint spellings of a module path's parent, beside its transformers name.
_PARENT_ALIASES = {"mlp": ("mlp", "block_sparse_moe", "feed_forward", "moe")}
ALIGN = quant.SCALED_MM_ROWS  # rows of each expert's segment are a multiple of this
# Per expert: the checkpoint's names of the gate, up and down projections.
_EXPERT_NAMES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))


class Fp8Linear(nn.Module):
    """y = x @ W.T (+ b) with W kept in e4m3 and the product computed in W8A8 FP8."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None,
                 bias: torch.Tensor | None = None, backend: str = quant.DEFAULT_FP8_BACKEND):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)  # e4m3 [N, K]
        self.weight_scale_inv = nn.Parameter(scale, requires_grad=False)  # float32 [N/bn, K/bk] or []
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.block, self.backend = block, backend
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = quant.fp8_matmul(x.reshape(-1, shape[-1]), self.weight, self.weight_scale_inv, self.block, self.backend)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], y.shape[-1])

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, block={self.block}, backend={self.backend}"


class Fp8Experts(nn.Module):
    """transformers' fused experts (same call: hidden [N, H], top-k ids [N, k], weights [N, k])
    with e4m3 weights, as serving engines' fused MoE computes them: the tokens sorted by expert,
    activations quantized once per projection (per token and group of 128), per expert gate_up ->
    act(gate) * up -> down in W8A8 FP8 (one scaled_mm each), the k expert outputs weighted and
    summed per token in float32."""

    def __init__(self, gate_up: torch.Tensor, gate_up_scale: torch.Tensor, down: torch.Tensor,
                 down_scale: torch.Tensor, block: tuple[int, int] | None, act_fn,
                 backend: str = quant.DEFAULT_FP8_BACKEND):
        super().__init__()
        self.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)  # e4m3 [E, 2I, H]
        self.gate_up_proj_scale_inv = nn.Parameter(gate_up_scale, requires_grad=False)
        self.down_proj = nn.Parameter(down, requires_grad=False)  # e4m3 [E, H, I]
        self.down_proj_scale_inv = nn.Parameter(down_scale, requires_grad=False)
        self.block, self.act_fn, self.backend = block, act_fn, backend
        self.num_experts = gate_up.shape[0]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        n, k = top_k_index.shape
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)  # the (token, slot) pairs grouped by expert, in token order
        counts_t = torch.bincount(flat, minlength=self.num_experts)
        counts = counts_t.tolist()  # the loop's bounds: one host sync per MoE block
        # each expert's rows start at a multiple of 16 (scaled_mm's row granularity): no per-expert padding copies
        padded_t = (counts_t + ALIGN - 1) // ALIGN * ALIGN
        first = torch.cumsum(counts_t, 0) - counts_t
        start = torch.cumsum(padded_t, 0) - padded_t
        expert = flat[order]
        dest = start[expert] + torch.arange(n * k, device=flat.device) - first[expert]
        rows = sum(-(-c // ALIGN) * ALIGN for c in counts)
        x = hidden_states.new_zeros(rows, hidden_states.shape[1])
        x[dest] = hidden_states[order // k]
        gate, up = self._per_expert(x, counts, self.gate_up_proj, self.gate_up_proj_scale_inv).chunk(2, dim=-1)
        y = self._per_expert(self.act_fn(gate) * up, counts, self.down_proj, self.down_proj_scale_inv)
        # weighted by the router and summed over the k experts of each token in float32, rounded once
        contrib = y[dest].float() * top_k_weights.reshape(-1)[order, None].float()
        out = torch.empty(n * k, y.shape[1], dtype=torch.float32, device=y.device)
        out[order] = contrib
        return out.view(n, k, -1).sum(dim=1).to(hidden_states.dtype)

    def _per_expert(self, x: torch.Tensor, counts: list[int], weight: torch.Tensor, scale: torch.Tensor):
        """Rows of each expert's aligned segment times that expert's FP8 weight; the activations
        are quantized once for all rows (per row and group: the same as expert by expert)."""
        xq, xs = quant.quantize_activation(x, self.block[1] if self.block else None)
        out = x.new_empty(x.shape[0], weight.shape[1])
        begin = 0
        for e, c in enumerate(counts):
            if c:
                end = begin + -(-c // ALIGN) * ALIGN
                out[begin:end] = quant.quantized_matmul(xq[begin:end], xs[begin:end] if xs.dim() else xs, weight[e],
                                                        scale[e], self.block, x.dtype, self.backend)
                begin = end
        return out


def quantized_names(raw: dict[str, torch.Tensor]) -> dict[str, str]:
    """{weight name: its scale's name} for the e4m3 tensors among a layer's checkpoint tensors."""
    found = {}
    for name, t in raw.items():
        if t.dtype == quant.FP8_DTYPE:
            base = name.removesuffix(".weight")
            scale = next((f"{base}.{s}" for s in quant.SCALE_NAMES if f"{base}.{s}" in raw), None)
            if scale is None:
                raise UserError(f"checkpoint tensor {name} is FP8 but has no {base}.weight_scale_inv beside it: "
                                "the checkpoint is incomplete, re-download it")
            found[name] = scale
    return found


def dequantize_tensors(raw: dict[str, torch.Tensor], scheme: quant.QuantScheme, dtype: torch.dtype) -> dict:
    """The layer's checkpoint tensors with every FP8 weight dequantized to `dtype` and the scales
    dropped: what transformers builds a plain layer from. A scale of the wrong shape names its tensor."""
    pairs = quantized_names(raw)
    scales = set(pairs.values())
    out = {}
    for name, t in raw.items():
        if name in scales:
            continue
        if name in pairs:
            try:
                out[name] = quant.dequantize(t, raw[pairs[name]], scheme.block, dtype)
            except ValueError as err:
                raise UserError(f"checkpoint tensor {pairs[name]}: {err}; the checkpoint does not match its "
                                "quantization_config, re-download it") from None
        else:
            out[name] = t
    return out


def to_fp8(layer: nn.Module, raw: dict[str, torch.Tensor], prefix: str, scheme: quant.QuantScheme,
           backend: str = quant.DEFAULT_FP8_BACKEND) -> list[str]:
    """Replace `layer`'s quantized projections with FP8 ones built from `raw` (the layer's
    checkpoint tensors, names starting with `prefix`, e.g. "model.layers.0."). Returns the module
    paths replaced. Every FP8 tensor of `raw` must find its module; each replacement must
    dequantize to exactly the parameter it replaces."""
    pairs = {n.removeprefix(prefix): s.removeprefix(prefix) for n, s in quantized_names(raw).items()}
    rel = {n.removeprefix(prefix): t for n, t in raw.items()}
    used: set[str] = set()
    replaced = []
    for path, module in list(layer.named_modules()):
        if isinstance(module, nn.Linear):
            key = _find(pairs, [f"{p}.weight" for p in _spellings(path)])
            if key is None:
                continue
            new = Fp8Linear(rel[key], rel[pairs[key]], scheme.block,
                            module.bias.detach() if module.bias is not None else None, backend)
            _check_same(new.weight, new.weight_scale_inv, module.weight, scheme, path)
            used.add(key)
        elif _is_fused_experts(module):
            new, keys = _experts(path, module, pairs, rel, scheme, backend)
            used.update(keys)
        else:
            continue
        _replace(layer, path, new)
        replaced.append(path)
    left = sorted(set(pairs) - used)
    if left:
        raise UserError(f"--quant fp8: the checkpoint's FP8 tensor {prefix}{left[0]} matches no projection of "
                        f"{type(layer).__name__} ({len(left)} unmatched): layerwise cannot run this layout in FP8 "
                        "yet; use --quant dequantize")
    return replaced


def _spellings(path: str) -> list[str]:
    """`mlp.experts` -> [mlp.experts, block_sparse_moe.experts, ...]: the names a checkpoint may use."""
    head, _, rest = path.partition(".")
    return [f"{alias}.{rest}" if rest else alias for alias in _PARENT_ALIASES.get(head, (head,))]


def _find(pairs: dict, candidates: list[str]) -> str | None:
    return next((c for c in candidates if c in pairs), None)


def _is_fused_experts(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor) and gate_up.dim() == 3


def _experts(path, module, pairs, rel, scheme, backend) -> tuple[Fp8Experts, list[str]]:
    count = module.gate_up_proj.shape[0]
    for spelling in _spellings(path):
        for gate_n, up_n, down_n in _EXPERT_NAMES:
            names = [[f"{spelling}.{e}.{n}.weight" for e in range(count)] for n in (gate_n, up_n, down_n)]
            if all(n in pairs for group in names for n in group):
                gate, up, down = names
                gate_up = torch.stack([torch.cat([rel[g], rel[u]]) for g, u in zip(gate, up)])
                gate_up_scale = torch.stack([torch.cat([rel[pairs[g]], rel[pairs[u]]]) for g, u in zip(gate, up)])
                down_w = torch.stack([rel[d] for d in down])
                down_scale = torch.stack([rel[pairs[d]] for d in down])
                _check_fusable(rel[gate[0]], rel[pairs[gate[0]]], scheme, path)
                new = Fp8Experts(gate_up, gate_up_scale, down_w, down_scale, scheme.block, module.act_fn, backend)
                _check_same(new.gate_up_proj, new.gate_up_proj_scale_inv, module.gate_up_proj, scheme,
                            f"{path}.gate_up_proj")
                _check_same(new.down_proj, new.down_proj_scale_inv, module.down_proj, scheme, f"{path}.down_proj")
                return new, [n for group in names for n in group]
    raise UserError(f"--quant fp8: no per-expert FP8 tensors found for {path} (looked for "
                    f"{_spellings(path)[-1]}.0.w1.weight and {path}.0.gate_proj.weight): use --quant dequantize")


def _check_fusable(weight: torch.Tensor, scale: torch.Tensor, scheme: quant.QuantScheme, path: str) -> None:
    """Gate and up are stacked along rows: their blocks stay whole only if rows fill whole blocks."""
    if scheme.block and weight.shape[0] % scheme.block[0]:
        raise UserError(f"--quant fp8: {path}'s expert projections have {weight.shape[0]} rows, not a multiple of "
                        f"the {scheme.block[0]}-row block, so gate and up cannot be fused: use --quant dequantize")


def _check_same(weight, scale, built: torch.Tensor, scheme: quant.QuantScheme, path: str) -> None:
    """The FP8 weight, dequantized, must be exactly the parameter transformers built from it."""
    block = scheme.block
    if weight.dim() == 3 and block is not None:
        again = torch.stack([quant.dequantize(w, s, block, built.dtype) for w, s in zip(weight, scale)])
    else:
        again = quant.dequantize(weight, scale, block, built.dtype)
    if again.shape != built.shape or not torch.equal(again, built.to(again.device)):
        raise RuntimeError(f"--quant fp8: the FP8 weight assembled for {path} does not dequantize to the parameter "
                           "transformers built from the same checkpoint (a wrong name mapping in fp8.py)")


def _replace(layer: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = layer.get_submodule(parent_path) if parent_path else layer
    setattr(parent, leaf, new)


def to_fp8_meta(layer: nn.Module, scheme: quant.QuantScheme) -> None:
    """What `to_fp8` would make of `layer`, on the meta device (sizes for planning): every
    projection not in the checkpoint's unquantized list becomes FP8 with its scales."""
    skip = set(scheme.not_converted)
    for path, module in list(layer.named_modules()):
        if skip & set(path.split(".")):
            continue
        if isinstance(module, nn.Linear):
            out_f, in_f = module.weight.shape
            new = Fp8Linear(torch.empty(out_f, in_f, dtype=quant.FP8_DTYPE, device="meta"),
                            torch.empty(_grid(out_f, in_f, scheme), dtype=torch.float32, device="meta"),
                            scheme.block, module.bias)
        elif _is_fused_experts(module):
            e, two_i, h = module.gate_up_proj.shape
            _, _, i = module.down_proj.shape
            new = Fp8Experts(torch.empty(e, two_i, h, dtype=quant.FP8_DTYPE, device="meta"),
                             torch.empty(e, *_grid(two_i, h, scheme), dtype=torch.float32, device="meta"),
                             torch.empty(e, h, i, dtype=quant.FP8_DTYPE, device="meta"),
                             torch.empty(e, *_grid(h, i, scheme), dtype=torch.float32, device="meta"),
                             scheme.block, module.act_fn)
        else:
            continue
        _replace(layer, path, new)


def _grid(rows: int, cols: int, scheme: quant.QuantScheme) -> tuple[int, ...]:
    if scheme.block is None:
        return ()
    return (-(-rows // scheme.block[0]), -(-cols // scheme.block[1]))
