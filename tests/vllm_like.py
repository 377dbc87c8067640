"""A plain torch Llama with vLLM's conventions, to drive layerwise.engines.vllm_hook where vLLM cannot run.

What it copies from vLLM's `vllm/model_executor/models/llama.py`:
- module paths (`model.embed_tokens`, `model.layers.N.self_attn.qkv_proj`, `...mlp.gate_up_proj`,
  `model.norm`, `lm_head`) and fused q/k/v and gate/up weights;
- `LlamaForCausalLM.forward(input_ids, positions, intermediate_tensors=None, inputs_embeds=None)`
  over a flat batch: the new tokens of several requests back to back, `[tokens, hidden]`;
- decoder layers `forward(positions, hidden_states, residual) -> (hidden_states, residual)` with
  the residual add fused into RMSNorm: `norm(x, residual)` returns `(norm(x + residual), x + residual)`,
  so the residual stream after layer N is the sum of layer N's two outputs;
- `compute_logits(hidden_states)` apart from `forward`;
- request boundaries in attention metadata (`query_start_loc`) and a KV cache per request slot,
  set here by `set_batch` (vLLM's forward context).
`from_hf(hf_model)` copies a transformers Llama's weights.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

BATCH = types.SimpleNamespace(query_start_loc=None, slots=None)


def set_batch(query_start_loc: list[int], slots: list[int]) -> None:
    BATCH.query_start_loc = torch.tensor(query_start_loc)
    BATCH.slots = slots


class RMSNorm(nn.Module):
    def __init__(self, hidden, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps

    def _norm(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def forward(self, x, residual=None):
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


def _rope(x, positions, theta):
    """x [tokens, heads, dim], neox style (transformers' rotate_half)."""
    dim = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.outer(positions.float(), inv)
    emb = torch.cat([freqs, freqs], -1)[:, None, :]
    half = torch.cat([-x[..., dim // 2:], x[..., : dim // 2]], -1)
    return (x * emb.cos() + half * emb.sin()).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.hq, self.hk, self.hd, self.theta = c.num_attention_heads, c.num_key_value_heads, c.head_dim, \
            c.rope_parameters["rope_theta"]
        self.qkv_proj = nn.Linear(c.hidden_size, (self.hq + 2 * self.hk) * self.hd, bias=False)
        self.o_proj = nn.Linear(self.hq * self.hd, c.hidden_size, bias=False)
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, positions, hidden_states):
        q, k, v = self.qkv_proj(hidden_states).split([self.hq * self.hd, self.hk * self.hd, self.hk * self.hd], -1)
        q = _rope(q.reshape(-1, self.hq, self.hd), positions, self.theta)
        k = _rope(k.reshape(-1, self.hk, self.hd), positions, self.theta)
        v = v.reshape(-1, self.hk, self.hd)
        starts = BATCH.query_start_loc.tolist()
        out = []
        for slot, begin, end in zip(BATCH.slots, starts[:-1], starts[1:]):
            old_k, old_v = self.cache.get(slot, (k[:0], v[:0])) if int(positions[begin]) > 0 else (k[:0], v[:0])
            keys, values = torch.cat([old_k, k[begin:end]]), torch.cat([old_v, v[begin:end]])
            self.cache[slot] = (keys, values)
            rep = self.hq // self.hk
            qs = q[begin:end].transpose(0, 1)  # [heads, new, dim]
            ks, vs = keys.repeat_interleave(rep, 1).transpose(0, 1), values.repeat_interleave(rep, 1).transpose(0, 1)
            past = keys.shape[0] - (end - begin)
            mask = torch.ones(end - begin, keys.shape[0], dtype=torch.bool).tril(past)
            o = F.scaled_dot_product_attention(qs[None], ks[None], vs[None], attn_mask=mask)[0]
            out.append(o.transpose(0, 1).reshape(end - begin, -1))
        return self.o_proj(torch.cat(out))


class MLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate_up_proj = nn.Linear(c.hidden_size, 2 * c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, -1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.self_attn, self.mlp = Attention(c), MLP(c)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, positions, hidden_states, residual):
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions=positions, hidden_states=hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaModel(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, input_ids, positions):
        hidden_states, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states):
        return self.lm_head(hidden_states)


def from_hf(hf) -> LlamaForCausalLM:
    model = LlamaForCausalLM(hf.config).to(next(hf.parameters()).dtype)
    sd = hf.state_dict()
    out = {}
    for key, value in sd.items():
        if ".q_proj." in key:
            p = key.replace(".q_proj.", ".qkv_proj.")
            out[p] = torch.cat([value, sd[key.replace("q_proj", "k_proj")], sd[key.replace("q_proj", "v_proj")]])
        elif ".gate_proj." in key:
            out[key.replace(".gate_proj.", ".gate_up_proj.")] = torch.cat([value, sd[key.replace("gate_proj", "up_proj")]])
        elif not any(s in key for s in (".k_proj.", ".v_proj.", ".up_proj.", "rotary")):
            out[key] = value
    model.load_state_dict(out)
    return model.eval()
