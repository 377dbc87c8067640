"""Planning where a model's weights go, without weights and without GPUs.

The model is built on the meta device (sizes and dtypes, no storage), then transformers' own
device-map routine (`_get_device_map`, what `from_pretrained(device_map="auto")` runs) places it
under per-GPU budgets that leave room for what the forward pass needs beyond the weights
(planning.py: the budgets, the plan and its rows). Loading reuses the very map planned here, so
what is loaded is what was planned. `plan_for` also turns the meta model into plain data
(planning.PlanInputs, with its placetree.PlaceTree), which `layerwise plan` keeps (_fastplan.py).

`plan_for` plans from a config and the command line's settings, `plan_placement` from a meta
model. Pure: takes a config or meta model and numbers, returns a `Plan`. Knows nothing of real
GPUs (the caller passes their capacities: loading.plan_load, readiness) and never touches weights.
"""

from __future__ import annotations

import copy
import logging

import torch

from . import fp8, models
from .anatomy import find_anatomy
from .devicemap import DEFAULT_DEVICE_MAP
from .planning import CUDA_OVERHEAD_BYTES, DEFAULT_TOKENS, Plan, PlanInputs, Reserve, plan_from, plan_parsed, shape_of
from .placetree import Node, PlaceTree
from .quiet import quiet_transformers
from .quant import FP8_DTYPE, resolve_mode, scheme_of

log = logging.getLogger(__name__)


def _dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def forward_reserve(config, tokens: int, dtype: torch.dtype, attn_implementation: str = "sdpa",
                    overhead_bytes: int = CUDA_OVERHEAD_BYTES) -> Reserve:
    """planning.forward_reserve for a config and a torch dtype."""
    from .planning import forward_reserve as reserve

    return reserve(shape_of(config), tokens, _dtype_size(dtype), attn_implementation, overhead_bytes)

def meta_model(config, dtype: torch.dtype, quant_mode: str | None = None):
    """The model built on the meta device with the dtypes loading would give it: the compute
    dtype, the fp32 router where the reference keeps one, and with `quant_mode="fp8"` the
    checkpoint's FP8 projections and scales (as `--quant fp8` holds them)."""
    scheme = scheme_of(config)
    if getattr(config, "quantization_config", None) is not None:  # built dequantized; FP8 modules put in below
        config = copy.deepcopy(config)
        del config.quantization_config
    cls = models.model_class(config)
    with torch.device("meta"), quiet_transformers():
        model = cls._from_config(config, dtype=dtype)
    if quant_mode == "fp8":
        anatomy = find_anatomy(model)
        for i in range(anatomy.num_layers):
            fp8.to_fp8_meta(model.get_submodule(anatomy.layer(i)), scheme)
    return model


def tree_of(model) -> PlaceTree:
    """The model's tree as transformers' placement sees it (placetree.py): every module,
    parameter and buffer in torch's order, with transformers' own byte counts."""
    from transformers.integrations.accelerate import compute_module_sizes

    sizes, _ = compute_module_sizes(model, None, only_modules=False)
    named = {n for n, _ in model.named_parameters()}  # each parameter once, under its first name
    nodes: list = []

    def add(name: str, obj, kind: str) -> int:
        index = len(nodes)
        nodes.append(None)
        if kind != "m":
            nodes[index] = Node(name, kind, "", int(sizes.get(name, 0)))
            return index
        prefix = name + "." if name else ""
        params = tuple(add(prefix + n, p, "p" if prefix + n in named else "r")
                       for n, p in obj.named_parameters(recurse=False))
        children = tuple(add(prefix + n, c, "m") for n, c in obj.named_children())
        buffers = tuple(add(prefix + n, b, "b") for n, b in obj.named_buffers(recurse=False))
        nodes[index] = Node(name, "m", type(obj).__name__, int(sizes.get(name, 0)), params, children, buffers)
        return index

    add("", model, "m")
    no_split = model._no_split_modules
    no_split = () if no_split is None else tuple(no_split) if isinstance(no_split, (list, tuple, set)) else (no_split,)
    tied = tuple((str(k), str(v)) for k, v in (getattr(model, "all_tied_weights_keys", None) or {}).items())
    no_placement = getattr(model, "_no_placement_params", None)
    return PlaceTree(tuple(nodes), tuple(str(c) for c in no_split), tied,
                     None if no_placement is None else tuple(no_placement))


def module_sizes(model) -> dict[str, int]:
    from transformers.integrations.accelerate import compute_module_sizes

    sizes, _ = compute_module_sizes(model, None)
    return dict(sizes)


def _inputs(model, config, dtype: torch.dtype, quant_mode: str | None, load_working_bytes: int) -> PlanInputs:
    return PlanInputs(tree_of(model), find_anatomy(model), shape_of(config), models.dtype_name(dtype),
                      _dtype_size(dtype), quant_mode, load_working_bytes)


def plan_for(model_name: str, config, gpu_bytes: list[int], cpu_bytes: int, *, device_map: str,
             max_memory: str | None, dtype: str, tokens: int, attn_implementation: str | None,
             quant: str | None, keep: list | None = None) -> Plan:
    """The placement of a model of `config` on GPUs of `gpu_bytes` free bytes each (present or
    simulated) and `cpu_bytes` of host RAM, for these settings as the command line gives them
    (`--device-map`, `--max-memory`, `--dtype`, `--tokens`, `--attn-implementation`, `--quant`).
    `keep`: a list (the plan's inputs, plan_from's settings) is appended to (`layerwise plan`
    keeps them: _fastplan.py)."""
    torch_dtype = models.parse_dtype(dtype)
    mode = resolve_mode(scheme_of(config), quant)
    meta = meta_model(config, torch_dtype, mode)
    inputs = _inputs(meta, config, torch_dtype, mode, _fp8_build_bytes(meta, torch_dtype) if mode == "fp8" else 0)
    settings = {"gpu_bytes": gpu_bytes, "cpu_bytes": cpu_bytes, "device_map": device_map, "max_memory": max_memory,
                "tokens": tokens, "attn_implementation": attn_implementation, "model_name": model_name}
    if keep is not None:
        keep.append((inputs, settings))
    return plan_from(inputs, **settings, place=_transformers_placer(meta))


def _transformers_placer(model):
    """transformers' own placement of the meta `model` (its `_get_device_map`)."""
    from transformers.integrations.accelerate import _get_device_map

    def place(strategy: str, max_memory: dict) -> dict:
        with quiet_transformers():
            return dict(_get_device_map(model, strategy, max_memory, None))
    return place


def _fp8_build_bytes(meta, dtype: torch.dtype) -> int:
    """Memory an FP8 layer needs while it is built (`--quant fp8`): its FP8 bytes read, and the
    same weights dequantized to the compute dtype, before the FP8 projections replace them."""
    anatomy = find_anatomy(meta)
    size = _dtype_size(dtype)
    worst = 0
    for i in range(anatomy.num_layers):
        layer = meta.get_submodule(anatomy.layer(i))
        fp8_elements = sum(t.numel() for t in layer.parameters() if t.dtype == FP8_DTYPE)
        worst = max(worst, fp8_elements * (1 + size))
    return worst


def plan_placement(
    model,
    gpu_bytes: list[int],
    device_map=DEFAULT_DEVICE_MAP,
    max_memory: dict | None = None,
    cpu_bytes: int | None = None,
    tokens: int = DEFAULT_TOKENS,
    dtype: torch.dtype = models.DTYPES[models.DEFAULT_DTYPE],
    model_name: str = "",
    attn_implementation: str = "sdpa",
    overhead_bytes: int = CUDA_OVERHEAD_BYTES,
    quant_mode: str | None = None,
    load_working_bytes: int = 0,
) -> Plan:
    """Place a meta `model` on GPUs of `gpu_bytes` capacity (then cpu, then disk) with
    transformers' own routine: planning.plan_parsed (`device_map` and `max_memory` parsed)."""
    inputs = _inputs(model, model.config, dtype, quant_mode, load_working_bytes)
    return plan_parsed(inputs, gpu_bytes, device_map, max_memory, cpu_bytes, tokens=tokens, model_name=model_name,
                       attn_implementation=attn_implementation, overhead_bytes=overhead_bytes,
                       place=_transformers_placer(model))
