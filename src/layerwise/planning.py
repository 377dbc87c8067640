"""A placement plan from plain data: what `layerwise plan` prints, with or without torch.

`PlanInputs` is everything a plan needs of a model, as plain data: its placement tree
(placetree.py), its anatomy, the config's sizes the forward pass's working memory depends on,
the dtype and the FP8 mode. placement.py makes it from a model built on the meta device;
_fastplan.py keeps it, so that the next plan of the same model needs neither torch nor
transformers. `plan_from` places it on GPUs of given capacities (present or simulated) for the
command line's settings, with transformers' own routine (`place`, on the meta model) or its
equal worked out on the tree alone (placetree.device_map), and returns a `Plan`. Pure: numbers
in, numbers out; the budgets leave room for what the forward pass needs beyond the weights
(`forward_reserve`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable

from . import placetree
from .anatomy import Anatomy
from .devicemap import SPILL_DEVICES, describe_map, device_of, parse_device_map
from .errors import UserError
from .names import stage_of
from .placetree import PlaceTree
from .sizes import format_bytes, parse_max_memory

DEFAULT_TOKENS = 4096  # the forward-pass size (batch x sequence) a plan leaves room for, unless told
# Per GPU, what CUDA and the caching allocator take beyond tensors (context, fragmentation).
CUDA_OVERHEAD_BYTES = 1_000_000_000
# The config's sizes forward_reserve reads (absent ones stay absent).
SHAPE_KEYS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts",
              "num_experts", "moe_intermediate_size", "intermediate_size", "num_experts_per_tok", "vocab_size")


@dataclass(frozen=True)
class DevicePlan:
    device: str  # "cuda:0", "cpu", "disk"
    capacity_bytes: int | None  # what the device offers (None: unbounded, disk)
    weight_bytes: int
    reserve_bytes: int  # forward-pass working memory layerwise keeps free on this device
    modules: tuple[str, ...]  # device-map keys placed here, in model order
    summary: str  # "embed_tokens + layers 0-7"

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.reserve_bytes


@dataclass(frozen=True)
class Plan:
    model: str
    dtype: str
    strategy: str
    tokens: int
    devices: tuple[DevicePlan, ...]
    device_map: dict  # module path -> int GPU index | "cpu" | "disk", in model order
    total_weight_bytes: int
    spilled_bytes: int  # weights placed on cpu or disk
    overflow_bytes: int  # what GPUs would need beyond their capacity (an explicit map can overfill)
    num_layers: int
    layers_on_gpu: int
    gpu_count: int
    gpus_needed: int | None  # GPUs of the first GPU's size that the whole model needs
    shortfall_bytes: int  # weights + forward reserves beyond the GPUs' total capacity (0 if enough)
    notes: tuple[str, ...] = field(default_factory=tuple)
    quant: str | None = None  # an FP8 checkpoint held as "fp8" (e4m3 + scales) or "dequantize" (the dtype)

    @property
    def weights_label(self) -> str:
        """What the weights are held as: "bfloat16", "FP8 (e4m3 + scales, rest bfloat16)"."""
        return f"FP8 (e4m3 + scales, rest {self.dtype})" if self.quant == "fp8" else self.dtype

    @property
    def fits(self) -> bool:
        return self.gpu_count > 0 and self.spilled_bytes == 0 and self.overflow_bytes == 0

    @property
    def cpu_over_limit(self) -> "DevicePlan | None":
        """With no GPU: the CPU's row when its weights exceed what the CPU may hold, else None."""
        return next((d for d in self.devices if self.gpu_count == 0 and d.device == "cpu"
                     and d.capacity_bytes is not None and d.weight_bytes > d.capacity_bytes), None)

    @property
    def verdict(self) -> str:
        if self.fits:
            return (f"fits: all {self.num_layers} layers on {self.gpu_count} GPU(s), "
                    f"{format_bytes(self.total_weight_bytes)} of {self.weights_label} weights")
        if self.gpu_count == 0:
            cpu = self.cpu_over_limit
            if cpu is not None:
                return (f"no GPU present or simulated, so the whole model runs on the CPU, and its "
                        f"{format_bytes(cpu.weight_bytes)} of weights exceed the {format_bytes(cpu.capacity_bytes or 0)} "
                        "the CPU may hold (host memory available, or --max-memory cpu:...): raise that, "
                        "or pass --gpus to simulate a machine")
            return "no GPU present or simulated: everything would run from cpu/disk (pass --gpus to simulate a machine)"
        need = f"; needs {self.gpus_needed} such GPUs" if self.gpus_needed else ""
        if self.spilled_bytes == 0:
            return (f"does NOT fit: the GPUs would need {format_bytes(self.overflow_bytes)} more than they have "
                    f"(weights plus the forward pass of {self.tokens} tokens){need}")
        short = (f"{format_bytes(self.shortfall_bytes)} short of what the model needs on GPUs; "
                 if self.shortfall_bytes else "")
        return (f"does NOT fit on the GPUs in {self.weights_label}: {short}this placement spills {format_bytes(self.spilled_bytes)} "
                f"of weights ({self.num_layers - self.layers_on_gpu} of {self.num_layers} layers) to cpu/disk{need}")


@dataclass(frozen=True)
class Reserve:
    per_gpu_bytes: int  # activations of one layer's forward + CUDA overhead, on every GPU
    head_bytes: int  # logits, on the GPU that holds the output head


@dataclass(frozen=True)
class PlanInputs:
    """What a plan needs of a model, as plain data (the module's docstring)."""

    tree: PlaceTree
    anatomy: Anatomy
    shape: dict  # SHAPE_KEYS -> the config's value, where it has one
    dtype: str  # "bfloat16"
    dtype_size: int  # bytes per element
    quant_mode: str | None  # "fp8", "dequantize" or None
    load_working_bytes: int = 0  # what building an FP8 layer needs on a GPU at a time

    def to_json(self) -> dict:
        return {"tree": self.tree.to_json(), "anatomy": asdict(self.anatomy), "shape": self.shape,
                "dtype": self.dtype, "dtype_size": self.dtype_size, "quant_mode": self.quant_mode,
                "load_working_bytes": self.load_working_bytes}

    @classmethod
    def from_json(cls, data: dict) -> "PlanInputs":
        anatomy = dict(data["anatomy"])
        anatomy["routers"] = tuple(anatomy["routers"])
        return cls(PlaceTree.from_json(data["tree"]), Anatomy(**anatomy), dict(data["shape"]), str(data["dtype"]),
                   int(data["dtype_size"]), data["quant_mode"], int(data["load_working_bytes"]))


def shape_of(config) -> dict:
    return {k: getattr(config, k) for k in SHAPE_KEYS if getattr(config, k, None) is not None}


def forward_reserve(shape: dict, tokens: int, size: int, attn_implementation: str = "sdpa",
                    overhead_bytes: int = CUDA_OVERHEAD_BYTES) -> Reserve:
    """Bytes the forward pass of `tokens` tokens needs beyond the weights (an estimate), for a
    model of `shape` (shape_of: the config's sizes) computing in a dtype of `size` bytes.

    One decoder layer runs at a time per GPU, so the working set is the largest of:
    attention (q, k, v, output, plus the [heads, T, T] scores when attention is eager) and the
    MLP (gate and up projections; for MoE the router logits and the expert mask too), plus a few
    copies of the residual stream. The head's GPU also holds the logits [T, vocab].
    """
    hidden = shape["hidden_size"]
    heads = shape["num_attention_heads"]
    kv_heads = shape.get("num_key_value_heads") or heads
    head_dim = shape.get("head_dim") or hidden // heads
    residual = 4 * tokens * hidden * size  # input, normed, block output, sum
    attn = tokens * (2 * heads + 2 * kv_heads) * head_dim * size
    if attn_implementation == "eager":
        attn += heads * tokens * tokens * (size + 4)  # scores, fp32 softmax
    experts = shape.get("num_local_experts") or shape.get("num_experts") or 0
    if experts:
        inter = shape.get("moe_intermediate_size") or shape["intermediate_size"]
        top_k = shape.get("num_experts_per_tok", 1)
        mlp = tokens * experts * 4 * 2  # fp32 router logits and scores
        mlp += tokens * top_k * (experts + 1) * 8  # one-hot expert mask (int64)
        mlp += tokens * top_k * 3 * inter * size  # gate/up/act of the routed tokens
    else:
        mlp = tokens * 3 * shape["intermediate_size"] * size
    per_gpu = residual + max(attn, mlp) + overhead_bytes
    head = tokens * shape["vocab_size"] * size
    return Reserve(per_gpu_bytes=int(per_gpu), head_bytes=int(head))


Placer = Callable[[str, dict], dict]  # (strategy word, {GPU: bytes, "cpu": bytes}) -> device map


def plan_from(inputs: PlanInputs, gpu_bytes: list[int], cpu_bytes: int | None, *, device_map: str,
              max_memory: str | None, tokens: int, attn_implementation: str | None = None, model_name: str = "",
              place: Placer | None = None) -> Plan:
    """The plan of `inputs` on GPUs of `gpu_bytes` free bytes each and `cpu_bytes` of host RAM
    for these settings as the command line gives them (`--device-map`, `--max-memory`,
    `--tokens`); `place` places a strategy word (default: placetree.device_map on the tree)."""
    parsed = parse_device_map(device_map)
    limits = parse_max_memory(max_memory, len(gpu_bytes)) if max_memory else None
    if isinstance(parsed, str) and not gpu_bytes:
        parsed = {"": "cpu"}  # no GPU: a strategy word means "run on the CPU"
    return plan_parsed(inputs, gpu_bytes, parsed, limits, cpu_bytes, tokens=tokens, model_name=model_name,
                       attn_implementation=attn_implementation or "sdpa", place=place)


def plan_parsed(inputs: PlanInputs, gpu_bytes: list[int], device_map, max_memory: dict | None, cpu_bytes: int | None,
                *, tokens: int = DEFAULT_TOKENS, model_name: str = "", attn_implementation: str = "sdpa",
                overhead_bytes: int = CUDA_OVERHEAD_BYTES, place: Placer | None = None) -> Plan:
    """`plan_from` with the device map and limits parsed. `max_memory` (parse_max_memory) caps
    what each device may use in total, weights and forward-pass reserve together; GPUs it does not
    name are left out. Each GPU keeps free the larger of the forward pass's working set and what
    loading needs at a time (`inputs.load_working_bytes`: an FP8 layer being built)."""
    tree, anatomy = inputs.tree, inputs.anatomy
    reserve = forward_reserve(inputs.shape, tokens, inputs.dtype_size, attn_implementation, overhead_bytes)
    if inputs.load_working_bytes + overhead_bytes > reserve.per_gpu_bytes:
        reserve = Reserve(inputs.load_working_bytes + overhead_bytes, reserve.head_bytes)
    sizes = tree.sizes()
    capacity = {i: b for i, b in enumerate(gpu_bytes)}
    if max_memory:
        named_gpus = [k for k in max_memory if isinstance(k, int)]
        if named_gpus:
            capacity = {i: min(capacity[i], max_memory[i]) for i in named_gpus}
        if "cpu" in max_memory:
            cpu_bytes = max_memory["cpu"]
    if isinstance(device_map, dict):
        for key, dev in device_map.items():
            if isinstance(dev, int) and dev not in capacity:
                raise UserError(f"device map puts {key or 'the model'!r} on GPU {dev}, "
                                f"which is not present or simulated (GPUs: {sorted(capacity) or 'none'})")
        final_map = _check_map_covers(device_map, tree)
    else:
        placer = place or (lambda strategy, budgets: placetree.device_map(tree, strategy, budgets))
        final_map = _plan_strategy(placer, device_map, capacity, cpu_bytes, reserve, sizes, anatomy)
    order = tree.order()
    final_map = dict(sorted(final_map.items(), key=lambda item: order.get(item[0], len(order))))
    devices = _device_rows(final_map, sizes, capacity, cpu_bytes, reserve, anatomy)
    overfull = [r for r in devices if r.device.startswith("cuda:") and r.total_bytes > (r.capacity_bytes or 0)]
    notes = [f"{r.device} needs {format_bytes(r.total_bytes)} but has {format_bytes(r.capacity_bytes or 0)}" for r in overfull]
    total = tree.total
    spilled = sum(r.weight_bytes for r in devices if r.device in SPILL_DEVICES)
    layers_on_gpu = sum(1 for i in range(anatomy.num_layers)
                        if device_of(final_map, anatomy.layer(i)) not in SPILL_DEVICES)
    return Plan(
        model=model_name, dtype=inputs.dtype, strategy=device_map if isinstance(device_map, str) else describe_map(device_map),
        tokens=tokens, devices=tuple(devices), device_map=final_map, total_weight_bytes=total,
        spilled_bytes=spilled, overflow_bytes=sum(r.total_bytes - (r.capacity_bytes or 0) for r in overfull),
        num_layers=anatomy.num_layers, layers_on_gpu=layers_on_gpu,
        gpu_count=len(capacity), gpus_needed=_gpus_needed(total, gpu_bytes, reserve) if (spilled or overfull) else None,
        shortfall_bytes=max(0, total + reserve.head_bytes + reserve.per_gpu_bytes * len(capacity) - sum(capacity.values())),
        notes=tuple(notes), quant=inputs.quant_mode,
    )


def _plan_strategy(place: Placer, strategy: str, capacity: dict[int, int], cpu_bytes: int | None, reserve: Reserve,
                   sizes: dict[str, int], anatomy: Anatomy) -> dict:
    """Place with budgets shrunk by the reserve; shrink again where the head's logits or a split
    layer overflow a GPU, until every GPU holds."""
    budgets = {i: max(0, c - reserve.per_gpu_bytes) for i, c in capacity.items()}
    device_map: dict = {}
    for _ in range(8):
        max_memory: dict = dict(budgets)
        max_memory["cpu"] = cpu_bytes if cpu_bytes is not None else 0
        device_map = dict(place(strategy, max_memory))
        used = _weights_per_device(device_map, sizes)
        head_device = device_of(device_map, anatomy.head_path)
        over = False
        for gpu, cap in capacity.items():
            need = used.get(gpu, 0) + reserve.per_gpu_bytes + (reserve.head_bytes if gpu == head_device else 0)
            if need > cap and budgets[gpu] > 0:
                budgets[gpu] = max(0, budgets[gpu] - (need - cap))
                over = True
        if not over:
            break
    return device_map


def _check_map_covers(device_map: dict, tree: PlaceTree) -> dict:
    names = tree.sizes()  # every module and tensor with weights
    for key in device_map:  # a misspelt module would place nothing, silently
        if key and key not in names and not any(n.startswith(key + ".") for n in names):
            parent = key.rpartition(".")[0]
            near = sorted(n for n in names if n.rpartition(".")[0] == parent and n.count(".") == key.count("."))
            hint = f" (beside it: {', '.join(near[:4])})" if near else ""
            raise UserError(f"device map names {key!r}, which is not a module of this model{hint}: fix the name, "
                            "or drop the entry")
    if "" in device_map:
        return dict(device_map)
    uncovered = [n for n in tree.param_names() if device_of(device_map, n) is None]
    if uncovered:
        raise UserError(f"device map leaves {len(uncovered)} parameters unplaced (first: {uncovered[0]}): "
                        "map every module, or add an entry for \"\"")
    return dict(device_map)


def _weights_per_device(device_map: dict, sizes: dict[str, int]) -> dict:
    used: dict = {}
    for name, device in device_map.items():
        used[device] = used.get(device, 0) + sizes.get(name, 0)
    return used


def _device_rows(device_map, sizes, capacity, cpu_bytes, reserve: Reserve, anatomy: Anatomy) -> list[DevicePlan]:
    by_device: dict = {}
    for name, device in device_map.items():
        by_device.setdefault(device, []).append(name)
    head_device = device_of(device_map, anatomy.head_path)
    order = sorted(by_device, key=lambda d: (not isinstance(d, int), d if isinstance(d, int) else SPILL_DEVICES.index(d)))
    rows = []
    for device in order:
        names = by_device[device]
        weight = sum(sizes.get(n, 0) for n in names)
        if isinstance(device, int):
            res = reserve.per_gpu_bytes + (reserve.head_bytes if device == head_device else 0)
            label, cap = f"cuda:{device}", capacity.get(device)
        else:
            res, label, cap = 0, device, (cpu_bytes if device == "cpu" else None)
        shown = [n for n in names if sizes.get(n, 0) > 0]
        rows.append(DevicePlan(label, cap, weight, res, tuple(names), summarize_modules(shown, anatomy)))
    return rows


def summarize_modules(names: list[str], anatomy: Anatomy) -> str:
    """["model.embed_tokens", "model.layers.0", ..., "model.layers.7"] -> "embed_tokens + layers 0-7"."""
    base = anatomy.base_path + "." if anatomy.base_path else ""
    layer_prefix = anatomy.layers_path + "."
    parts: list[str] = []
    run: list[int] = []

    def flush():
        if run:
            parts.append(f"layers {run[0]}" if len(run) == 1 else f"layers {run[0]}-{run[-1]}")
            run.clear()

    expanded = []
    for name in names:  # a whole layer list on one device reads as its layer range
        expanded.extend([f"{layer_prefix}{i}" for i in range(anatomy.num_layers)] if name == anatomy.layers_path else [name])
    layout = anatomy.layout
    for name in sorted(expanded, key=lambda n: _summary_rank(stage_of(n, layout))):
        if name == "":
            parts.append("whole model")
            continue
        rest = name[len(layer_prefix):] if name.startswith(layer_prefix) else None
        if rest is not None and rest.isdigit():
            index = int(rest)
            if run and index != run[-1] + 1:
                flush()
            run.append(index)
            continue
        flush()
        parts.append(name[len(base):] if base and name.startswith(base) else name)
    flush()
    return " + ".join(parts) if parts else "(nothing)"


def _summary_rank(stage: str | int) -> tuple[int, int]:
    """Model order for a device's module list: embedding, layers by index, the rest as given."""
    return (0, 0) if stage == "embed" else (2, 0) if stage == "final" else (1, stage)


def _gpus_needed(total_weight: int, gpu_bytes: list[int], reserve: Reserve) -> int | None:
    if not gpu_bytes:
        return None
    usable = gpu_bytes[0] - reserve.per_gpu_bytes
    if usable <= 0:
        return None
    return math.ceil((total_weight + reserve.head_bytes) / usable)
