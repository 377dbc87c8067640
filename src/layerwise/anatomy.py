"""Where the parts of a decoder-only model live, found generically from its module tree.

Every HF causal LM has an input embedding, a list of decoder layers, usually a final norm and
rotary embedding beside them, and an output head. Inside a layer there is an attention block,
an MLP (or MoE) block and, for MoE models, a router. `find_anatomy` names them by their real
`named_modules()` paths (`model.layers`, `model.layers.7.mlp.gate`), which is how layerwise
names every tensor it captures. Works on meta, CPU and dispatched models alike; loads nothing.
`Anatomy` itself is plain data: torch is imported where a module tree is walked, so that a plan
kept as data (planning.PlanInputs) is read without it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import UserError
from .names import Layout

if TYPE_CHECKING:
    from torch import nn

_ATTN_NAMES = ("self_attn", "attention", "attn", "self_attention")
_MLP_NAMES = ("mlp", "block_sparse_moe", "feed_forward", "moe", "ffn")
_ROUTER_NAMES = ("gate", "router")


@dataclass(frozen=True)
class Anatomy:
    layers_path: str  # "model.layers"
    num_layers: int
    embed_path: str  # "model.embed_tokens"
    head_path: str  # "lm_head"
    norm_path: str | None  # "model.norm"
    rotary_path: str | None  # "model.rotary_emb" (shared rotary embedding, if the model has one)
    attn_name: str | None  # inside a layer: "self_attn"
    mlp_name: str | None  # inside a layer: "mlp"
    routers: tuple[str | None, ...]  # per layer, relative path of the router ("mlp.gate") or None

    def layer(self, index: int) -> str:
        return f"{self.layers_path}.{index}"

    def router(self, index: int) -> str | None:
        rel = self.routers[index]
        return f"{self.layer(index)}.{rel}" if rel else None

    @property
    def is_moe(self) -> bool:
        return any(self.routers)

    @property
    def layout(self) -> Layout:
        """The paths a run records ("anatomy" in its manifest); a model without a final norm
        records transformers' usual spelling."""
        return Layout(self.layers_path, self.embed_path, self.norm_path or Layout.norm, self.head_path)

    @property
    def base_path(self) -> str:
        """The path holding layers, embedding and norm ("model")."""
        return self.layers_path.rpartition(".")[0]


def _path_of(model: nn.Module, target: nn.Module | None) -> str | None:
    if target is None:
        return None
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


def _find_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    from torch import nn

    no_split = set(getattr(model, "_no_split_modules", None) or ())
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        score = len(module) + (10_000 if type(module[0]).__name__ in no_split else 0)
        if best is None or score > best[0]:
            best = (score, name, module)
    if best is None:
        raise UserError(f"{type(model).__name__} has no list of decoder layers (num_hidden_layers "
                        f"{getattr(getattr(model, 'config', None), 'num_hidden_layers', '?')}): layerwise tests "
                        "decoder-only language models")
    return best[1], best[2]


def _child_named(module: nn.Module, candidates: tuple[str, ...]) -> str | None:
    children = dict(module.named_children())
    for name in candidates:
        if name in children:
            return name
    return None


def router_class_name(model: nn.Module) -> str | None:
    """The router class transformers itself records router logits from, if it says."""
    recorder = (getattr(model, "_can_record_outputs", None) or {}).get("router_logits")  # transformers' own key
    target = getattr(recorder, "target_class", None)
    return getattr(target, "__name__", None)


def _find_router(layer: nn.Module, mlp_name: str | None, router_class: str | None, num_experts: int | None) -> str | None:
    import torch
    from torch import nn

    for name, module in layer.named_modules():
        if router_class and type(module).__name__ == router_class:
            return name
    if mlp_name is None:
        return None
    mlp = layer.get_submodule(mlp_name)
    for child in _ROUTER_NAMES:
        module = getattr(mlp, child, None)
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Module) and isinstance(weight, torch.Tensor) and weight.dim() == 2 \
                and num_experts and weight.shape[0] == num_experts:
            return f"{mlp_name}.{child}"
    return None


def find_anatomy(model: nn.Module) -> Anatomy:
    layers_path, layers = _find_layers(model)
    base = model.get_submodule(layers_path.rpartition(".")[0]) if "." in layers_path else model
    base_prefix = layers_path.rpartition(".")[0]
    prefix = f"{base_prefix}." if base_prefix else ""
    embed_path = _path_of(model, model.get_input_embeddings())
    head_path = _path_of(model, model.get_output_embeddings())
    norm_path = rotary_path = None
    for name, child in base.named_children():
        lowered = name.lower()
        if "rotary" in lowered:
            rotary_path = prefix + name
        elif "norm" in lowered or "ln_f" in lowered:
            norm_path = prefix + name
    first = layers[0]
    attn_name = _child_named(first, _ATTN_NAMES)
    mlp_name = _child_named(first, _MLP_NAMES)
    config = getattr(model, "config", None)
    num_experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    router_class = router_class_name(model)
    routers = tuple(
        _find_router(layer, _child_named(layer, _MLP_NAMES), router_class, num_experts) for layer in layers
    )
    return Anatomy(
        layers_path=layers_path, num_layers=len(layers), embed_path=embed_path or f"{prefix}embed_tokens",
        head_path=head_path or "lm_head", norm_path=norm_path, rotary_path=rotary_path,
        attn_name=attn_name, mlp_name=mlp_name, routers=routers,
    )
