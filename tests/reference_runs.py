"""Reference runs for the replay tests, made WITHOUT layerwise's capture code: transformers' own
`output_hidden_states` (an independent oracle: `hidden_states[K]` is layer K's input and, but for
the last layer, `hidden_states[K+1]` its output) plus plain forward hooks for what it does not
return (the last layer's output, which transformers gives only after the final norm; attention,
MLP and router outputs). Written with RunWriter, one prompt at a time, no padding.
"""

from __future__ import annotations

import torch

from layerwise import loading, models, recording, runs

PROMPTS = [
    {"index": 0, "text": "The capital of France is", "token_ids": [84, 104, 101, 32, 99, 97, 112, 105, 116, 97, 108]},
    {"index": 1, "text": "abc", "token_ids": [97, 98, 99, 100, 101, 102, 103]},
]


def make_reference_run(spec: str, path, dtype: str = "fp32", attn: str = "sdpa", prompts=PROMPTS,
                       internals: bool = True, loaded=None) -> runs.Run:
    loaded = loaded or loading.load_model(spec, loading.LoadOptions(device_map="cpu", dtype=dtype,
                                                                   attn_implementation=attn), with_tokenizer=False)
    model, anatomy = loaded.model, loaded.anatomy
    n = anatomy.num_layers
    intent = {
        "producer": "test oracle",
        "model": {"spec": spec, "model_type": model.config.model_type, "num_layers": n,
                  "hidden_size": model.config.hidden_size,
                  "config_sha256": recording.config_sha256(models.load_config(loaded.ref).config)},
        "settings": {"dtype": dtype, "attn_implementation": attn},
        "anatomy": {"layers_path": anatomy.layers_path, "embed": anatomy.embed_path, "norm": anatomy.norm_path,
                    "head": anatomy.head_path},
        "prompts": prompts,
    }
    writer = runs.RunWriter(path, intent)
    for prompt in prompts:
        caught: dict[str, torch.Tensor] = {}
        handles = _hooks(model, anatomy, caught) if internals else []
        last = model.get_submodule(anatomy.layer(n - 1))
        handles.append(last.register_forward_hook(
            lambda _m, _i, out: caught.__setitem__("last", out[0] if isinstance(out, tuple) else out)))
        with torch.inference_mode():
            out = model(torch.tensor([prompt["token_ids"]]), output_hidden_states=True)
        for h in handles:
            h.remove()
        hidden = out.hidden_states
        for k in range(n):
            group = anatomy.layer(k)
            output = hidden[k + 1] if k < n - 1 else caught.pop("last")
            tensors = {f"{group}:input": hidden[k][0], f"{group}:output": output[0]}
            tensors.update({name: t for name, t in caught.items() if name.startswith(group + ".")})
            writer.put(prompt["index"], group, {k2: v.detach().clone() for k2, v in tensors.items()})
        writer.put(prompt["index"], "model.norm", {"model.norm:output": hidden[n][0].clone()})
    writer.finish()
    return runs.open_run(path)


def _hooks(model, anatomy, caught):
    handles = []
    for k in range(anatomy.num_layers):
        layer = anatomy.layer(k)
        for rel in (anatomy.attn_name, anatomy.mlp_name):
            name = f"{layer}.{rel}"
            handles.append(model.get_submodule(name).register_forward_hook(
                lambda _m, _i, out, name=name: caught.__setitem__(
                    f"{name}:output", (out[0] if isinstance(out, tuple) else out)[0])))
        router = anatomy.router(k)
        if router:
            handles.append(model.get_submodule(router).register_forward_hook(
                lambda _m, _i, out, router=router: caught.update(_router(router, out))))
    return handles


def _router(router: str, out) -> dict:
    logits, weights, ids = out  # transformers' top-k routers: (logits, normalised top-k weights, ids)
    return {f"{router}:router_logits": logits, f"{router}:topk_weights": weights.float(),
            f"{router}:topk_ids": ids.to(torch.int32)}
