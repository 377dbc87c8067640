"""Runs of a toy MoE transformer: real propagation of errors, written with the real RunWriter.

`toy_run(path, ...)` computes every capture point of a toy model (embedding; per layer input,
attention, router logits, top-k ids and weights, MLP, output; final norm; logits) for a few
prompts and writes a run. Faults change the model, not the tensors, so an error made at layer k
propagates to every later tensor the way it does in a real model:
  ("scale", k, f)   scale layer k's attention weight by f
  ("nan", k)        NaN in one element of layer k's MLP output
  ("router", k)     swap two columns of layer k's router weight (experts renumbered)
  ("tie", k)        the token with the closest call at layer k's router picks the runner-up
                    (its (k+1)-th logit lifted just past the k-th): a near-tie flip
`dtype=torch.bfloat16` runs the whole model in bf16 (router in fp32); `stored_as` stores the
result in another dtype and labels the run with it. `write_toy_run` writes any tensors as a run of the toy model,
`corrupt_tensor` flips a bit inside one stored tensor, `as_version_1` rewrites a run as format
version 1 wrote it (plain sha256 digests).
"""

from __future__ import annotations

import hashlib
import json
import struct

import torch

import helpers
from layerwise.runs import Run, open_run

LAYERS, HIDDEN, EXPERTS, TOP_K, VOCAB = 4, 32, 8, 2, 64
PROMPTS = [[5, 9, 2, 7, 1, 3, 8, 4], [11, 12, 13, 14, 15, 16]]


def _weights(seed: int = 0, layers: int = LAYERS) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = {"embed": torch.randn(VOCAB, HIDDEN, generator=g),
         "head": torch.randn(HIDDEN, VOCAB, generator=g) / HIDDEN ** 0.5}
    for i in range(layers):
        w[f"attn{i}"] = torch.randn(HIDDEN, HIDDEN, generator=g) / HIDDEN ** 0.5
        w[f"router{i}"] = torch.randn(HIDDEN, EXPERTS, generator=g) * 3 / HIDDEN ** 0.5
        w[f"experts{i}"] = torch.randn(EXPERTS, HIDDEN, HIDDEN, generator=g) / HIDDEN ** 0.5
    return w


def toy_forward(tokens: list[int], dtype: torch.dtype = torch.float32, fault: tuple | None = None,
                seed: int = 0, layers: int = LAYERS) -> dict[str, torch.Tensor]:
    w = _weights(seed, layers)
    kind, layer = (fault[0], fault[1]) if fault else (None, None)
    if kind == "scale":
        w[f"attn{layer}"] = w[f"attn{layer}"] * fault[2]
    if kind == "router":
        w[f"router{layer}"] = w[f"router{layer}"][:, [1, 0, *range(2, EXPERTS)]]
    out: dict[str, torch.Tensor] = {}
    x = w["embed"][torch.tensor(tokens)].to(dtype)  # [seq, hidden]
    out["model.embed_tokens:output"] = x
    for i in range(layers):
        p = f"model.layers.{i}"
        out[f"{p}:input"] = x
        attn = torch.tanh(x @ w[f"attn{i}"].to(dtype))
        out[f"{p}.self_attn:output"] = attn
        h = x + attn
        logits = h.float() @ w[f"router{i}"]  # router in fp32, like MiniMax-M2
        if kind == "tie" and layer == i:  # the closest call flips: runner-up lifted just past the k-th
            top = logits.topk(TOP_K + 1, dim=-1)
            gaps = top.values[:, TOP_K - 1] - top.values[:, TOP_K]
            t = int(gaps.argmin())
            logits = logits.clone()
            logits[t, top.indices[t, TOP_K]] = top.values[t, TOP_K - 1] + 1e-4
        weights, ids = torch.softmax(logits, dim=-1).topk(TOP_K, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        out[f"{p}.mlp.gate:router_logits"] = logits
        out[f"{p}.mlp.gate:topk_ids"] = ids.to(torch.int32)
        out[f"{p}.mlp.gate:topk_weights"] = weights
        mlp = torch.zeros_like(h)
        for slot in range(TOP_K):
            expert = w[f"experts{i}"][ids[:, slot]].to(dtype)  # [seq, hidden, hidden]
            mlp = mlp + weights[:, slot:slot + 1].to(dtype) * torch.tanh(torch.einsum("sh,sho->so", h, expert))
        if kind == "nan" and layer == i:
            mlp = mlp.clone()
            mlp[len(tokens) // 2, 3] = float("nan")
        out[f"{p}.mlp:output"] = mlp
        x = h + mlp
        out[f"{p}:output"] = x
    normed = x / x.float().pow(2).mean(-1, keepdim=True).add(1e-6).sqrt().to(dtype)
    out["model.norm:output"] = normed
    out["lm_head:output"] = normed @ w["head"].to(dtype)
    return out


def write_toy_run(path, tensors_by_prompt: dict[int, dict[str, torch.Tensor]], dtype: str = "float32",
              prompts: list[list[int]] | None = None, model: dict | None = None, layers: int = LAYERS):
    """Write any tensors as a run (grouped by layer like extract does); returns the opened Run."""
    prompts = prompts if prompts is not None else PROMPTS[:len(tensors_by_prompt)]
    intent = {
        "producer": "tests", "model": model or {"spec": "toy", "model_type": "toy_moe", "num_layers": layers,
                                                "hidden_size": HIDDEN},
        "settings": {"dtype": dtype, "points": ["residual", "attn", "mlp", "router", "norm", "logits"]},
        "anatomy": {"layers_path": "model.layers", "embed": "model.embed_tokens", "norm": "model.norm",
                    "head": "lm_head"},
        "prompts": [{"index": i, "text": f"prompt {i}", "token_ids": list(t)} for i, t in enumerate(prompts)],
    }
    helpers.write_run(path, intent, tensors_by_prompt)
    return open_run(path)


def toy_tensors(dtype: torch.dtype = torch.float32, fault: tuple | None = None, prompts=PROMPTS,
                drop: tuple[str, ...] = (), seed: int = 0, layers: int = LAYERS,
                stored_as: torch.dtype | None = None) -> dict[int, dict[str, torch.Tensor]]:
    """Every prompt's tensors; names containing any of `drop` are left out; `stored_as` casts
    the floating tensors computed in `dtype` (router tensors stay fp32)."""
    out = {}
    for i, tokens in enumerate(prompts):
        tensors = toy_forward(tokens, dtype, fault, seed, layers)
        if stored_as is not None:
            tensors = {k: v.to(stored_as) if v.is_floating_point() and ".gate:" not in k else v
                       for k, v in tensors.items()}
        out[i] = {k: v for k, v in tensors.items() if not any(d in k for d in drop)}
    return out


def toy_run(path, dtype: torch.dtype = torch.float32, fault: tuple | None = None, prompts=PROMPTS,
            drop: tuple[str, ...] = (), model: dict | None = None, seed: int = 0, layers: int = LAYERS,
            stored_as: torch.dtype | None = None):
    """Write a run of the toy model to `path` and open it. The run says it was computed in
    `stored_as` (if given) else `dtype`."""
    tensors = toy_tensors(dtype, fault, prompts, drop, seed, layers, stored_as)
    label = str(stored_as or dtype).removeprefix("torch.")
    return write_toy_run(path, tensors, label, prompts, model, layers)


def corrupt_tensor(run, name: str, prompt: int = 0):
    """Flip one bit inside one tensor's bytes (its file header and sha256 untouched); returns the file."""
    path = run.path / run.entry(name, prompt).file
    data = bytearray(path.read_bytes())
    (header_size,) = struct.unpack("<Q", data[:8])
    start, _ = json.loads(data[8:8 + header_size])[name]["data_offsets"]
    data[8 + header_size + start + 1] ^= 0x40
    path.write_bytes(bytes(data))
    return path


def as_version_1(run) -> Run:
    """Rewrite a run as format version 1 wrote it, by hand: every file's header and every manifest
    entry carry the plain sha256 of the tensor's bytes ("sha256:<name>", "sha256"), whatever its size."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    plain = {}
    for path in sorted(run.path.glob("tensors/*/*.safetensors")):
        with safe_open(str(path), "pt") as fh:
            tensors = {name: fh.get_tensor(name) for name in fh.keys()}
            metadata = {k: v for k, v in fh.metadata().items() if not k.startswith(("blake3:", "sha256_tree:"))}
        for name, t in tensors.items():
            plain[(str(path.relative_to(run.path)), name)] = digest = hashlib.sha256(
                t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            metadata[f"sha256:{name}"] = digest
        save_file(tensors, str(path), metadata=metadata)
    manifest = json.loads((run.path / "manifest.json").read_text())
    manifest["format_version"] = 1
    for e in manifest["tensors"]:
        e.pop("blake3", None), e.pop("sha256_tree", None)
        e["sha256"] = plain[(e["file"], e["name"])]
    (run.path / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return open_run(run.path)
