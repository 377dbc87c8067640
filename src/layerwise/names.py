"""Tensor names, the `<module path>:<role>` contract of docs/FORMAT.md, and index selections.

A captured tensor is named by the module that produced it, spelled as `model.named_modules()`
spells it, and its role there: `model.layers.7:input`, `model.layers.7.mlp.gate:topk_ids`. This
module forms and splits those names, lists the roles, says where a name sits in the forward pass
(embedding, decoder layer K, the final norm and head) and parses and prints index selections
("0-3,7"). The module paths of a model come from its `Layout` (recorded in every run); the
defaults are transformers' own spellings, the fallbacks for what a run does not record.

Pure: strings and numbers in, strings and numbers out. Knows no tensors, files or devices.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

# ------------------------------------------------------------------------------------- roles

INPUT, OUTPUT = "input", "output"
ROUTER_LOGITS, SCORE_BIAS, TOPK_WEIGHTS, TOPK_IDS = "router_logits", "score_bias", "topk_weights", "topk_ids"
PAD_ROLE = "input_padding"  # a decoder layer's input at its batch row's padding positions [width - seq, hidden]
ROLES = (INPUT, OUTPUT, ROUTER_LOGITS, SCORE_BIAS, TOPK_IDS, TOPK_WEIGHTS, PAD_ROLE)
# What a router call yields, in the order a hook sees it: a transformers 5 router returns
# (router_logits, topk_weights, topk_ids); sigmoid routers with a selection bias (MiniMax-M2) get
# it as a forward argument, captured as `score_bias` [experts].
ROUTER_ROLES = (ROUTER_LOGITS, SCORE_BIAS, TOPK_WEIGHTS, TOPK_IDS)
# The order a router's tensors are judged in: scores, then ids (routing decides which tokens are
# diverted), then weights, whatever the model order.
JUDGING_ORDER = (ROUTER_LOGITS, SCORE_BIAS, TOPK_IDS, TOPK_WEIGHTS)
# Roles stored in a fixed dtype whatever the model computes them in (torch dtype names).
STORED_DTYPES = {TOPK_IDS: "int32", TOPK_WEIGHTS: "float32", SCORE_BIAS: "float32"}
WHOLE_ROLES = (SCORE_BIAS,)  # per model, not per token: stored whole for every prompt
# Roles in the order they happen inside a module; sorts tensors into model order.
_ROLE_ORDER = {INPUT: 0, PAD_ROLE: 0.5, ROUTER_LOGITS: 1, SCORE_BIAS: 2, TOPK_WEIGHTS: 3, TOPK_IDS: 4, OUTPUT: 5}
_SHORT_ROLE = {ROUTER_LOGITS: "logits", TOPK_IDS: "ids", TOPK_WEIGHTS: "weights", OUTPUT: ""}


def tensor_name(module: str, role: str) -> str:
    return f"{module}:{role}"


def split_name(name: str) -> tuple[str, str]:
    """`model.layers.7.mlp.gate:topk_ids` -> ("model.layers.7.mlp.gate", "topk_ids")."""
    module, _, role = name.rpartition(":")
    return module, role


def pad_name(input_name: str) -> str:
    """`model.layers.7:input` -> `model.layers.7:input_padding`."""
    return tensor_name(split_name(input_name)[0], PAD_ROLE)


# ------------------------------------------------------------------------------------ layout

@dataclass(frozen=True)
class Layout:
    """Where a model keeps its parts (anatomy.py finds them; runs record them as "anatomy")."""

    layers_path: str = "model.layers"
    embed: str = "model.embed_tokens"
    norm: str = "model.norm"
    head: str = "lm_head"

    @classmethod
    def of(cls, record: dict | None) -> "Layout":
        """From a run's "anatomy" record; what it lacks takes transformers' spelling."""
        record = record or {}
        return cls(**{k: record[k] for k in ("layers_path", "embed", "norm", "head") if record.get(k)})


def layer_of(module: str, layers_path: str = Layout.layers_path) -> int | None:
    """`model.layers.7.mlp` -> 7; None outside the decoder layers."""
    match = re.match(rf"^{re.escape(layers_path)}\.(\d+)(?:\.|$)", module)
    return int(match.group(1)) if match else None


def stage_of(module: str, layout: Layout = Layout()) -> str | int:
    """Which step of the forward pass runs `module`: "embed", a decoder layer's index, or "final"."""
    if module == layout.embed:
        return "embed"
    layer = layer_of(module, layout.layers_path)
    return "final" if layer is None else layer


_IN_LAYER = re.compile(r"^(.*?layers)\.(\d+)(?:\.(.+))?$")


def layer_parts(path: str) -> tuple[str, int, str] | None:
    """A dotted path inside a numbered layer list, judged by its spelling alone (no layout known,
    as for foreign tensors and checkpoint keys): `model.layers.7.mlp.gate` -> ("model.layers", 7,
    "mlp.gate"), `model.layers.7` -> ("model.layers", 7, ""); None outside."""
    match = _IN_LAYER.match(path)
    return (match.group(1), int(match.group(2)), match.group(3) or "") if match else None


def file_group(module: str) -> str:
    """The run file a module's tensors go to: its decoder layer's (`model.layers.7`), else its own."""
    parts = layer_parts(module)
    return f"{parts[0]}.{parts[1]}" if parts else module


def part_in_layer(module: str, role: str, layer: int | None) -> str:
    """A tensor's name inside its layer: "self_attn", "mlp.gate:logits", "input", "output"."""
    match = re.match(rf"^.*?\.{layer}(?:\.|$)", module) if layer is not None else None
    sub = module[match.end():] if match else ""
    short = _SHORT_ROLE.get(role, role)
    return (sub + (":" + short if short else "")) if sub else (short or "output")


@lru_cache(maxsize=1 << 16)  # a run's few hundred names, asked for again by every manifest, compare and report
def model_order_key(name: str, layers_path: str = Layout.layers_path, embed: str = Layout.embed,
                    norm: str = Layout.norm, head: str = Layout.head) -> tuple:
    """Sort key placing tensors in the order the forward pass produces them: embedding, each
    layer (input, attention, router, MLP, output; a module's submodules between its input and
    its output), final norm, head. Modules a model spells differently fall back on their last
    name (`embed_tokens`, `norm`/`ln_f`, `lm_head`)."""
    module, role = split_name(name)
    match = re.match(rf"^{re.escape(layers_path)}\.(\d+)(?:\.(.+))?$", module)
    if module == embed or module.endswith("embed_tokens"):
        stage = (0, 0, 0)
    elif match:
        stage = (1, int(match.group(1)), _part_rank(match.group(2) or "", role))
    elif module == norm or module.endswith(("norm", "ln_f")):
        stage = (2, 0, 0)
    elif module == head or module.endswith("lm_head"):
        stage = (3, 0, 0)
    else:
        stage = (4, 0, 0)
    # Inside a part, a module's input comes before its submodules' tensors, its output after them
    # (`self_attn.q_proj:output` before `self_attn:output`); siblings in name order.
    terminal = (-1, 0) if role in (INPUT, PAD_ROLE) else (1, _ROLE_ORDER.get(role, 6))
    return (*stage, *((0, c) for c in module.split(".")), terminal, role)


def _part_rank(sub: str, role: str) -> int:
    """Inside a decoder layer: its input, the input norm, attention, the post-attention norm,
    router, MLP, its output."""
    if not sub:
        return 0 if role == INPUT else 9
    if sub.startswith("input_layernorm"):
        return 1
    if sub.startswith("post_attention"):
        return 3
    if "attn" in sub or "attention" in sub:
        return 2
    if sub.endswith(("gate", "router")):
        return 4
    return 6


# ---------------------------------------------------------------------------- index selections

class BadSelection(ValueError):
    """A part of an index selection that is not an index or an ascending range."""

    def __init__(self, part: str, reversed_range: tuple[int, int] | None = None):
        super().__init__(part)
        self.part = part
        self.reversed_range = reversed_range  # (first, last) of a range written backwards


MAX_SPAN = 1_000_000  # a range wider than this is a typo, not a selection (it would fill memory)


def parse_indices(text: str) -> tuple[int, ...]:
    """`"0-3,7"` -> (0, 1, 2, 3, 7): non-negative indices and inclusive ranges, comma separated,
    in the order written, each once. A part that is neither raises BadSelection, whose
    `reversed_range` holds the bounds of a range written backwards (`3-1`: (3, 1)); the caller
    words the error for its flag and checks the bounds it knows."""
    out: list[int] = []
    for raw in str(text).split(","):
        part = raw.strip()
        first, sep, last = part.partition("-")
        try:
            lo, hi = int(first), int(last) if sep else int(first)
        except ValueError:
            raise BadSelection(part) from None
        if lo < 0 or hi - lo > MAX_SPAN or not (first.strip().isdigit() and (not sep or last.strip().isdigit())):
            raise BadSelection(part)
        if hi < lo:
            raise BadSelection(part, reversed_range=(lo, hi))
        out.extend(range(lo, hi + 1))
    return tuple(dict.fromkeys(out))


def format_ranges(values: list[int]) -> str:
    """[0, 1, 2, 3, 7] -> "0-3,7" (sorted input); [] -> "none"."""
    out, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(out) or "none"
