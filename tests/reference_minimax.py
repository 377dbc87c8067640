"""A MiniMax-M2 decoder layer written from scratch in plain torch, from the published
architecture (FACTS.md), not from transformers' code: the independent oracle for RoPE,
routing and the `--candidate` layer tests.

`ReferenceLayer(config, layer_index, weights)` takes the layer's weights by their HF module
names (`self_attn.q_proj.weight`, `mlp.experts.gate_up_proj`, ...) and has the HF layer's call
signature; `factory` is the `package.module:factory` entry point. Knobs reproduce known bugs:
`partial_rope=False` rotates all head dims (transformers < 5.18), `router_dtype=torch.bfloat16`
routes in bf16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rope_cos_sin(position_ids: torch.Tensor, rotary_dim: int, theta: float, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=position_ids.device) / rotary_dim))
    freqs = position_ids[..., None].float() * inv_freq  # [B, T, rotary_dim/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, head_dim]; rotate the first cos.shape[-1] dims, pass the rest."""
    d = cos.shape[-1]
    rot, rest = x[..., :d], x[..., d:]
    half = d // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    cos, sin = cos[:, None], sin[:, None]
    return torch.cat([rot * cos + rotated * sin, rest], dim=-1)


class ReferenceLayer(nn.Module):
    def __init__(self, config, layer_index: int, weights: dict[str, torch.Tensor],
                 partial_rope: bool = True, router_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.config = config
        self.layer_index = layer_index
        self.w = {k: v for k, v in weights.items()}
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.rotary_dim = getattr(config, "rotary_dim", None) if partial_rope else self.head_dim
        self.rotary_dim = self.rotary_dim or self.head_dim
        self.theta = config.rope_parameters["rope_theta"]
        self.eps = config.rms_norm_eps
        self.top_k = config.num_experts_per_tok
        self.router_dtype = router_dtype

    def attention(self, x, position_ids, attention_mask):
        w, B, T = self.w, x.shape[0], x.shape[1]
        q = rms_norm(x @ w["self_attn.q_proj.weight"].T, w["self_attn.q_norm.weight"], self.eps)
        k = rms_norm(x @ w["self_attn.k_proj.weight"].T, w["self_attn.k_norm.weight"], self.eps)
        v = x @ w["self_attn.v_proj.weight"].T
        q = q.view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope_cos_sin(position_ids, self.rotary_dim, self.theta, x.dtype)
        q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        groups = self.heads // self.kv_heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        allowed = causal[None, None]
        if attention_mask is not None and attention_mask.dtype == torch.bool:
            allowed = allowed & attention_mask
        elif attention_mask is not None:  # additive float mask from transformers
            allowed = allowed & (attention_mask > torch.finfo(attention_mask.dtype).min / 2)
        scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(q.dtype)
        out = (probs @ v).transpose(1, 2).reshape(B, T, -1)
        return out @ w["self_attn.o_proj.weight"].T

    def route(self, x):
        """x [N, H] -> (logits [N, E], topk ids [N, k], normalized weights [N, k])."""
        w = self.w
        logits = x.to(self.router_dtype) @ w["mlp.gate.weight"].to(self.router_dtype).T
        scores = torch.sigmoid(logits.float())
        choice = scores + w["mlp.e_score_correction_bias"].to(self.router_dtype).float()
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        return logits, ids, weights / weights.sum(-1, keepdim=True)

    def moe(self, x):
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        _, ids, weights = self.route(flat)
        gate_up, down = self.w["mlp.experts.gate_up_proj"], self.w["mlp.experts.down_proj"]
        out = torch.zeros_like(flat)
        for e in range(gate_up.shape[0]):
            token, slot = torch.where(ids == e)
            if token.numel() == 0:
                continue
            gate, up = (flat[token] @ gate_up[e].T).chunk(2, dim=-1)
            y = (F.silu(gate) * up) @ down[e].T
            out.index_add_(0, token, (y * weights[token, slot, None]).to(out.dtype))
        return out.view(B, T, H)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, position_ids=None, **kwargs):
        if position_ids is None:
            position_ids = torch.arange(hidden_states.shape[1], device=hidden_states.device)[None]
        x = hidden_states
        h = x + self.attention(rms_norm(x, self.w["input_layernorm.weight"], self.eps), position_ids, attention_mask)
        return h + self.moe(rms_norm(h, self.w["post_attention_layernorm.weight"], self.eps))


def factory(config, layer_index, weights):
    return ReferenceLayer(config, layer_index, weights)


def full_rope_factory(config, layer_index, weights):
    """The transformers < 5.18 bug: RoPE over all head dims."""
    return ReferenceLayer(config, layer_index, weights, partial_rope=False)


def bf16_router_factory(config, layer_index, weights):
    """Routing computed in bf16, as when the router is cast down at load."""
    return ReferenceLayer(config, layer_index, weights, router_dtype=torch.bfloat16)
