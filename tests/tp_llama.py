"""A Llama forward pass written out by hand, tensor-parallel the way SGLang shards it.

`tp_forward(w, config, ids, tp)` runs one sequence on `tp` simulated ranks: q/k/v and gate/up
are column-parallel (each rank holds a slice of the heads and of the intermediate features),
o_proj and down_proj row-parallel (each rank multiplies its slice and holds a partial sum,
added over the ranks as the all-reduce does, in rank order). Returns, per rank, what a user's
`dumper.dump` calls would see: the layer's input and output, attention and MLP outputs
(replicated after the all-reduce), q (a column shard), o_proj's and down_proj's partial sums and
act(gate) * up (a column shard). fp32 throughout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().float() for k, v in model.state_dict().items()}


def _rms(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x, theta):
    """x [heads, seq, dim] rotated as transformers' Llama does (rotate_half)."""
    dim, seq = x.shape[-1], x.shape[-2]
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    freqs = torch.outer(torch.arange(seq, dtype=torch.float32), inv)
    emb = torch.cat([freqs, freqs], -1)
    half = torch.cat([-x[..., dim // 2:], x[..., : dim // 2]], -1)
    return x * emb.cos() + half * emb.sin()


def _attention(q, k, v):
    """q [hq, s, d], k/v [hk, s, d] (grouped): causal softmax attention -> [s, hq * d]."""
    k = k.repeat_interleave(q.shape[0] // k.shape[0], 0)
    v = v.repeat_interleave(q.shape[0] // v.shape[0], 0)
    scores = q @ k.transpose(1, 2) / q.shape[-1] ** 0.5
    mask = torch.ones(q.shape[1], q.shape[1], dtype=torch.bool).tril()
    out = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
    return out.transpose(0, 1).reshape(q.shape[1], -1)


def tp_forward(w: dict, config, ids: list[int], tp: int) -> list[dict[tuple[str, int], torch.Tensor]]:
    hd, hq, hk = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    inter, eps, theta = config.intermediate_size, config.rms_norm_eps, config.rope_parameters["rope_theta"]
    per_q, per_k, per_i = hq // tp, hk // tp, inter // tp
    out: list[dict] = [{} for _ in range(tp)]
    x = w["model.embed_tokens.weight"][torch.tensor(ids)]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        xn = _rms(x, w[p + "input_layernorm.weight"], eps)
        partial_o, partial_d = [], []
        for r in range(tp):
            q = F.linear(xn, w[p + "self_attn.q_proj.weight"][r * per_q * hd:(r + 1) * per_q * hd])
            k = F.linear(xn, w[p + "self_attn.k_proj.weight"][r * per_k * hd:(r + 1) * per_k * hd])
            v = F.linear(xn, w[p + "self_attn.v_proj.weight"][r * per_k * hd:(r + 1) * per_k * hd])
            heads = [t.reshape(len(ids), -1, hd).transpose(0, 1) for t in (q, k, v)]
            a = _attention(_rope(heads[0], theta), _rope(heads[1], theta), heads[2])
            partial_o.append(F.linear(a, w[p + "self_attn.o_proj.weight"][:, r * per_q * hd:(r + 1) * per_q * hd]))
            out[r][("q", i)] = q
            out[r][("o_partial", i)] = partial_o[-1]
        attn = torch.stack(partial_o).sum(0)  # the all-reduce
        h = x + attn
        hn = _rms(h, w[p + "post_attention_layernorm.weight"], eps)
        for r in range(tp):
            rows = slice(r * per_i, (r + 1) * per_i)
            act = F.silu(F.linear(hn, w[p + "mlp.gate_proj.weight"][rows])) * F.linear(hn, w[p + "mlp.up_proj.weight"][rows])
            partial_d.append(F.linear(act, w[p + "mlp.down_proj.weight"][:, rows]))
            out[r][("act", i)] = act
            out[r][("down_partial", i)] = partial_d[-1]
        mlp = torch.stack(partial_d).sum(0)
        for r in range(tp):
            out[r].update({("layer_input", i): x, ("attn_output", i): attn, ("mlp_output", i): mlp,
                           ("layer_output", i): h + mlp})
        x = h + mlp
    return out
