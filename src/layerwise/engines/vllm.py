"""vLLM's `extract_hidden_states` output, into a run.

vLLM has no general tensor dumper. What it offers for per-layer activations (vLLM >= 0.18) is
the `extract_hidden_states` speculative method with the `ExampleHiddenStatesConnector`: one
safetensors file per request, `<shared_storage_path>/<request id>.safetensors`, holding
`hidden_states` [tokens, len(layer ids), hidden] (the model's dtype) and `token_ids` [tokens]
(the prompt). Layer id k is the residual stream *before* decoder layer k (`hidden_states +
residual` of vLLM's fused layers): k = 0 is the embedding, k = L the stream after the last layer,
before the final norm. In layerwise names: k = 0 is `model.layers.0:input`, k >= 1 is
`model.layers.{k-1}:output`. The file does not say which layer ids it holds: `--layers` gives
them (the `eagle_aux_hidden_state_layer_ids` of the run; vLLM stores them in ascending order).
Requests become prompts in the natural order of their ids ("2" before "10"); each prompt
records its request id. For more than the residual stream, vllm_hook.py writes a run directly.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import UserError
from .namemap import NameMap, combine_into
from .source import ImportSource

KEYS = {"hidden_states", "token_ids"}


def _files(src: Path) -> list[Path]:
    from safetensors import safe_open

    out = []
    for f in src.glob("*.safetensors"):
        try:
            with safe_open(str(f), framework="pt") as fh:
                keys = set(fh.keys())
        except Exception:  # safetensors raises its own error type
            continue
        if KEYS <= keys:
            out.append(f)
    return out


def looks_like_vllm(src: Path) -> bool:
    return bool(_files(src))


def _natural(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.stem)]


def layer_name(k: int) -> str:
    """vLLM's aux layer id -> the layerwise tensor holding the same residual stream."""
    return "model.layers.0:input" if k == 0 else f"model.layers.{k - 1}:output"


def parse_layer_ids(text: str | None, width: int, where: str) -> list[int]:
    if not text:
        raise UserError(f"{where} holds hidden states of {width} layers but not which: pass --layers with the "
                        "eagle_aux_hidden_state_layer_ids the run used, e.g. --layers 2,16,32")
    try:
        ids = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--layers {text!r}: expected layer ids like 2,16,32") from None
    if len(ids) != width or ids[0] < 0:
        raise UserError(f"--layers {text!r} names {len(ids)} distinct layer ids, but {where} holds {width} per token")
    return ids


def read_hidden_states(src: Path, layer_ids: str | None, name_map: NameMap, rename) -> ImportSource:
    from safetensors import safe_open

    files = sorted(_files(src), key=_natural)
    if not files:
        raise UserError(f"{src} holds no vLLM hidden-states files (<request id>.safetensors with hidden_states and "
                        "token_ids)")
    prompts, shapes = [], []
    for index, f in enumerate(files):
        with safe_open(str(f), framework="pt") as fh:
            tokens = fh.get_tensor("token_ids")
            shape = fh.get_slice("hidden_states").get_shape()
        if len(shape) != 3 or shape[0] != tokens.numel():
            raise UserError(f"{f}: hidden_states has shape {shape}, expected [{tokens.numel()} tokens, layers, hidden]")
        shapes.append(shape)
        prompts.append({"index": index, "text": None, "token_ids": [int(t) for t in tokens.reshape(-1).tolist()],
                        "source_id": f.stem})
    if len({s[1] for s in shapes}) != 1:
        raise UserError(f"{src}: the requests hold hidden states of different numbers of layers")
    ids = parse_layer_ids(layer_ids, shapes[0][1], str(src))

    def units():
        for index, f in enumerate(files):
            with safe_open(str(f), framework="pt") as fh:
                hidden = fh.get_tensor("hidden_states")  # [tokens, layers, hidden]
            tensors = {}
            for slot, k in enumerate(ids):
                raw = layer_name(k)
                hit = name_map.lookup(raw)
                name, rule = hit if hit else (raw, None)
                combine_into(tensors, rename(name), hidden[:, slot].contiguous(), rule, f"request {f.stem}")
            yield {index: tensors}

    return ImportSource("vllm", prompts, units, {"layer_ids": ids})
