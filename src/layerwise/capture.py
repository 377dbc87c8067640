"""What to capture during the forward pass, and the hooks that capture it.

`plan_targets` turns capture points ("residual", "router", ...) and layers into `Target`s: which
module, before or after it runs, which tensors it yields (named by names.py), into which file.
`Capture` installs them as torch's own forward hooks (`register_forward_hook`, which work under
accelerate's multi-GPU dispatch: a hook sees each module's output on that module's GPU) for the
duration of a `with` block. A hook hands its tensors to a sink, collector.py's `Collector`, and
returns at once: it never waits for the GPU, issues no copy and never opens a file.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from .anatomy import Anatomy
from .errors import UserError
from .names import INPUT, OUTPUT, ROUTER_ROLES, BadSelection, parse_indices, split_name, tensor_name

# `output` is the residual stream's outputs only (`model.layers.N:output`): half the bytes of
# `residual`, enough to compare, not enough to replay a layer (that needs each layer's input).
POINTS = ("embed", "residual", "output", "attn", "mlp", "router", "norm", "logits")
DEFAULT_POINTS = ("residual", "router", "logits")


@dataclass(frozen=True)
class Target:
    """One hook: which module, before or after it runs, which tensors it yields, into which file."""

    module: str
    when: str  # INPUT (a forward pre-hook sees the input) | OUTPUT (a forward hook sees the output)
    names: tuple[str, ...]
    group: str
    extra: bool = False  # asked for by --modules: its shape is checked, no padding tail is kept


def parse_points(text: str | None) -> tuple[str, ...]:
    if not text:
        return DEFAULT_POINTS
    points = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    unknown = [p for p in points if p not in POINTS]
    if unknown or not points:
        raise UserError(f"unknown capture point {unknown[0] if unknown else text!r}: choose from {', '.join(POINTS)}")
    return points


def parse_layers(text: str | None, num_layers: int) -> tuple[int, ...]:
    """`--layers "0-9,20"` -> (0, ..., 9, 20); None -> every layer."""
    if not text:
        return tuple(range(num_layers))
    try:
        chosen = sorted(parse_indices(text))
    except BadSelection as err:
        if err.reversed_range:
            lo, hi = err.reversed_range
            raise UserError(f"layer range {err.part!r} is reversed: write {hi}-{lo}") from None
        raise UserError(f"--layers part {err.part!r} is not a layer number or range (e.g. 0-9,20)") from None
    outside = [i for i in chosen if i >= num_layers]
    if outside:
        raise UserError(f"--layers names layer {outside[0]}, but the model has layers 0-{num_layers - 1}")
    return tuple(chosen)


def plan_targets(anatomy: Anatomy, points: tuple[str, ...], layers: tuple[int, ...],
                 modules: list[Target] = ()) -> list[Target]:
    """The hooks for these capture points, in model order, then `modules` (module_points.py)."""
    targets = []
    if "embed" in points:
        targets.append(Target(anatomy.embed_path, OUTPUT, (tensor_name(anatomy.embed_path, OUTPUT),),
                              anatomy.embed_path))
    for i in layers:
        layer = anatomy.layer(i)
        if "residual" in points:
            targets.append(Target(layer, INPUT, (tensor_name(layer, INPUT),), layer))
        if "attn" in points and anatomy.attn_name:
            attn = f"{layer}.{anatomy.attn_name}"
            targets.append(Target(attn, OUTPUT, (tensor_name(attn, OUTPUT),), layer))
        router = anatomy.router(i)
        if "router" in points and router:
            targets.append(Target(router, OUTPUT, tuple(tensor_name(router, r) for r in ROUTER_ROLES), layer))
        if "mlp" in points and anatomy.mlp_name:
            mlp = f"{layer}.{anatomy.mlp_name}"
            targets.append(Target(mlp, OUTPUT, (tensor_name(mlp, OUTPUT),), layer))
        if "residual" in points or "output" in points:
            targets.append(Target(layer, OUTPUT, (tensor_name(layer, OUTPUT),), layer))
    if "norm" in points and anatomy.norm_path:
        targets.append(Target(anatomy.norm_path, OUTPUT, (tensor_name(anatomy.norm_path, OUTPUT),),
                              anatomy.norm_path))
    if "logits" in points:
        targets.append(Target(anatomy.head_path, OUTPUT, (tensor_name(anatomy.head_path, OUTPUT),),
                              anatomy.head_path))
    taken = {n for t in targets for n in t.names}
    return targets + [t for t in modules if t.names[0] not in taken]


def groups_of(targets: list[Target]) -> dict[str, list[str]]:
    """{file group: tensor names it holds}."""
    groups: dict[str, list[str]] = OrderedDict()
    for t in targets:
        groups.setdefault(t.group, []).extend(t.names)
    return groups


def router_outputs(args, output) -> list[torch.Tensor | None]:
    """[router_logits, score_bias, topk_weights, topk_ids] from a router call (None where absent)."""
    parts = list(output) if isinstance(output, (tuple, list)) else [output]
    parts += [None] * (3 - len(parts))
    bias = next((a for a in args[1:] if isinstance(a, torch.Tensor) and a.dim() == 1 and a.is_floating_point()), None)
    return [parts[0], bias, parts[1], parts[2]]


def _tensors_of(target: Target, args, kwargs, output) -> list[torch.Tensor | None]:
    if target.when == INPUT:
        x = args[0] if args else kwargs.get("hidden_states")
        return [x]
    if split_name(target.names[0])[1] == ROUTER_ROLES[0]:
        return router_outputs(args, output)
    if isinstance(output, torch.Tensor):
        return [output] if len(target.names) == 1 else [output] + [None] * (len(target.names) - 1)
    if isinstance(output, (tuple, list)):
        items = list(output[:len(target.names)])
        return items + [None] * (len(target.names) - len(items))
    return [getattr(output, "last_hidden_state", None)]


class Capture:
    """Installs the hooks for `targets` on `model` for the duration of a `with` block.

    `resolve(path) -> module` finds each target's module; by default `model.get_submodule`.
    Streaming passes its own, since its modules (one layer, the embedding...) are not one model.
    """

    def __init__(self, model: torch.nn.Module | None, targets: list[Target], collector, resolve=None):
        self.targets, self.collector = targets, collector
        self.resolve = resolve or model.get_submodule
        self._handles = []

    def __enter__(self):
        for target in self.targets:
            self._handles.append(self._register(self.resolve(target.module), target))
        return self

    def _register(self, module, target: Target):
        collector = self.collector
        if target.when == INPUT:
            def pre_hook(mod, args, kwargs):
                collector.take(target, _tensors_of(target, args, kwargs, None))
            return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

        def hook(mod, args, output):
            collector.take(target, _tensors_of(target, args, {}, output))
        return module.register_forward_hook(hook)

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return False
