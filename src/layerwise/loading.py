"""Loading a causal LM over GPUs: plan first, refuse or warn on spills, load exactly the plan.

`load_model` is the seed's `load_model_gpu` done right: it plans the placement on the meta
device (placement.py) with the GPUs present (`plan_load`), refuses to start when the plan spills and
`allow_spill` is off, loads with transformers' `from_pretrained` using the planned map, then
checks that what was loaded is what was planned and that the numerics fixes held (router in
fp32). `placement_rows` says where every module went and how much each GPU really uses.

FP8 checkpoints (quant.py) load two ways. `quant="dequantize"` (the default, the reference):
transformers' own `FineGrainedFP8Config(dequantize=True)` path, every weight e4m3 x scale cast to
the compute dtype. `quant="fp8"` (what serving engines compute): the model is assembled layer by
layer on the planned devices (layer_loading.py builds each layer, fp8.py swaps in W8A8
projections), so only the FP8 bytes stay resident; the plan sizes it that way.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field

import torch

from . import checkpoint, distributed, machine, models, placement, planning, quant
from .anatomy import Anatomy, find_anatomy
from .devicemap import DEFAULT_DEVICE_MAP, device_name, device_of
from .errors import UserError
from .layer_loading import LayerOptions, open_layers
from .placement import Plan
from .prompts import BrokenTokenizer
from .quiet import loading_errors, quiet_transformers
from .sizes import format_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadOptions:
    device_map: str = DEFAULT_DEVICE_MAP  # strategy, cuda:N, cpu, or a JSON file
    max_memory: str | None = None  # "40GB", "0:60GB,1:40GB,cpu:200GB"
    dtype: str = models.DEFAULT_DTYPE
    offload_folder: str | None = None
    allow_spill: bool = True  # False: refuse to load when any weight would land on cpu/disk
    attn_implementation: str | None = None  # eager | sdpa | flash_attention_2 (None: transformers' default)
    tokens: int = placement.DEFAULT_TOKENS  # forward-pass size (batch x sequence) the placement leaves room for
    quant: str | None = None  # FP8 checkpoints: "dequantize" (default) or "fp8"; plain checkpoints: None
    fp8_backend: str | None = None  # --quant fp8's matmul: quant.FP8_BACKENDS (None: not chosen, DEFAULT_FP8_BACKEND)
    tensor_parallel: bool = False  # under torchrun: the ranks share the model (transformers' tp_plan="auto")

    def plan_settings(self) -> dict:
        """What a placement plan depends on (placement.plan_for's settings)."""
        return {"device_map": self.device_map, "max_memory": self.max_memory, "dtype": self.dtype,
                "tokens": self.tokens, "attn_implementation": self.attn_implementation, "quant": self.quant}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    ref: models.ModelRef
    config_fixes: list[models.Fix]
    plan: Plan
    anatomy: Anatomy
    seconds: float
    tokenizer: object = None
    notes: list[str] = field(default_factory=list)
    quant_mode: str | None = None  # how an FP8 checkpoint runs: "dequantize" or "fp8"
    config: object = None  # the checkpoint's config, fixes applied (model.config may lack its quantization_config)
    tensor_parallel: int = 1  # ranks sharing the model (tp_plan="auto"); 1: a whole model in this process

    @property
    def input_device(self) -> torch.device:
        return input_device(self.model, self.anatomy)


def input_device(model: torch.nn.Module, anatomy: Anatomy | None = None) -> torch.device:
    """Where inputs must go: the embedding's device (accelerate's execution device when the
    embedding is offloaded), never `next(model.parameters()).device`."""
    anatomy = anatomy or find_anatomy(model)
    embed = model.get_submodule(anatomy.embed_path)
    hook = getattr(embed, "_hf_hook", None)
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device if not isinstance(hook.execution_device, int)
                            else f"cuda:{hook.execution_device}")
    return embed.weight.device


def gpu_capacities() -> list[int]:
    """Free bytes of each GPU present (what loading can really use)."""
    return [g.free_bytes for g in machine.gpus()]


def plan_load(ref: models.ModelRef, config, options: LoadOptions, gpu_bytes: list[int] | None = None,
              keep: list | None = None) -> Plan:
    """The placement loading would use, for the GPUs present (or `gpu_bytes`, simulated);
    `keep` as placement.plan_for's."""
    return placement.plan_for(ref.spec, config, gpu_capacities() if gpu_bytes is None else gpu_bytes,
                              machine.host_memory_available(), **options.plan_settings(), keep=keep)


def load_model(spec: str, options: LoadOptions = LoadOptions(), with_tokenizer: bool = True,
               progress: bool = False) -> LoadedModel:
    """Plan, then load exactly the plan. `progress` shows transformers' weight-loading bar."""
    ref = models.resolve_model(spec)
    if not ref.has_weights:
        raise UserError(f"{spec} is a configuration without weights: use it with plan/check, "
                        "or load builtin:minimax-m2-tiny")
    mc = models.load_config(ref)
    mode = quant.resolve_mode(mc.quant, options.quant)
    quant.check_backend(mode, options.fp8_backend)
    if ref.kind == "checkpoint":
        checkpoint.require_complete(ref.path, mc.quant)
    plan = plan_load(ref, mc.config, options)
    if plan.cpu_over_limit is not None:
        raise UserError(f"refusing to load: {plan.verdict}")
    spill = [d for d in plan.devices if d.device in ("cpu", "disk")]
    notes = []
    if spill and plan.gpu_count:
        if not options.allow_spill:
            raise UserError(f"refusing to load: {plan.verdict} (add GPUs, raise --max-memory, or allow spilling)")
        if mode == "fp8":
            raise UserError(f"--quant fp8 keeps every layer on a GPU, and {plan.verdict}: add GPUs, or run it "
                            "one layer at a time (extract --stream, test)")
        notes.append("WARNING: " + plan.verdict)
    if any(d.device == "disk" for d in plan.devices) and not options.offload_folder:
        raise UserError(f"{format_bytes(sum(d.weight_bytes for d in spill if d.device == 'disk'))} of weights would be "
                        "offloaded to disk: pass --offload-folder DIR (or more --max-memory)")
    tp = check_tensor_parallel(mc.config, mode) if options.tensor_parallel else 1
    start = time.perf_counter()
    if mode == "fp8":
        model = _assemble_fp8(ref, mc, plan, options)
    else:
        model = _from_pretrained(ref, mc, plan, options, mode, progress)
    model.eval()
    seconds = time.perf_counter() - start
    _verify_router_dtypes(model)
    anatomy = find_anatomy(model)
    tokenizer = load_tokenizer(ref) if with_tokenizer else None
    log.info("loaded %s in %.1f s", spec, seconds)
    return LoadedModel(model, ref, mc.fixes, plan, anatomy, seconds, tokenizer, notes, mode, mc.config, tp)


def check_tensor_parallel(config, mode: str | None) -> int:
    """The ranks that will share a model of `config` under --tp; a model or a job they cannot
    split is a UserError."""
    ranks = distributed.session().world
    if ranks < 2:
        raise UserError("--tp splits the model over the ranks of a torchrun job: launch it with torchrun "
                        "--nproc-per-node N (N >= 2) -m layerwise extract ... --tp")
    if not getattr(config, "base_model_tp_plan", None):
        raise UserError(f"transformers {'.'.join(map(str, models.transformers_version()))} has no tensor-parallel "
                        f"plan for {config.model_type} models: --tp cannot split them; run without --tp (each rank "
                        "then holds a whole model and computes its share of the batches)")
    if mode == "fp8":
        raise UserError("--tp with --quant fp8: the FP8 candidate assembles its own layers, which transformers' "
                        "tensor-parallel plan does not split; use --quant dequantize, or --quant fp8 without --tp")
    heads = {"query": config.num_attention_heads, "key/value": getattr(config, "num_key_value_heads", None)}
    uneven = {k: v for k, v in heads.items() if v and v % ranks}
    if uneven:
        raise UserError(f"--tp over {ranks} ranks: the attention heads ({', '.join(f'{v} {k}' for k, v in heads.items() if v)}"
                        ") do not split evenly over them: start a number of ranks that divides them")
    return ranks


def _from_pretrained(ref, mc, plan, options: LoadOptions, mode: str | None, progress: bool):
    """transformers' own loading of exactly the planned map; FP8 weights dequantized by transformers."""
    config = mc.config
    if mode == "dequantize":
        config = copy.deepcopy(config)
        raw = config.quantization_config
        raw = raw.to_dict() if hasattr(raw, "to_dict") else dict(raw)
        config.quantization_config = {**raw, "dequantize": True}
    kwargs = dict(config=config, dtype=models.parse_dtype(options.dtype), device_map=plan.device_map)
    if options.tensor_parallel:  # transformers' own split over the ranks, instead of a device map
        del kwargs["device_map"]
        try:
            from transformers import DistributedConfig

            kwargs["distributed_config"] = DistributedConfig(tp_plan="auto")
        except ImportError:  # transformers before DistributedConfig
            kwargs["tp_plan"] = "auto"
    if options.offload_folder:
        kwargs["offload_folder"] = options.offload_folder
    if options.attn_implementation:
        kwargs["attn_implementation"] = options.attn_implementation
    if ref.kind == "gguf":
        kwargs["gguf_file"] = ref.path.name
    cls = models.model_class(config)
    with loading_errors(ref.spec, models.GGUF_HINT if ref.kind == "gguf" else None), quiet_transformers(progress):
        model, info = cls.from_pretrained(str(ref.directory), output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys") or ())
    if missing:  # transformers would fill them with fresh random values, and say so only in a silenced log
        raise UserError(f"{ref.spec} lacks {len(missing)} tensor(s) the model needs (first: {missing[0]}): "
                        "re-download it, or fix its index")
    return model


def _assemble_fp8(ref, mc, plan, options: LoadOptions):
    """`--quant fp8`: the FP8 meta model of the plan, filled layer by layer on the planned devices
    (each layer read as FP8, built by transformers from its dequantized weights, its projections
    swapped for FP8 ones, the dequantized copy dropped), then dispatched like from_pretrained does."""
    dtype = models.parse_dtype(options.dtype)
    source = open_layers(ref.spec, LayerOptions(dtype=options.dtype, device="cpu",
                                                attn_implementation=options.attn_implementation, quant="fp8",
                                                fp8_backend=options.fp8_backend))
    model = placement.meta_model(mc.config, dtype, "fp8")
    anatomy = find_anatomy(model)
    layers = model.get_submodule(anatomy.layers_path)
    rotary = None
    for i in range(anatomy.num_layers):
        built = source.on(device_name(device_of(plan.device_map, anatomy.layer(i)))).load(i)
        for module in built.module.modules():  # built as layer 0 of a one-layer model: the KV cache indexes by it
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = i
        layers[i] = built.module
        rotary = rotary or built.rotary
        model.config._attn_implementation = built.config._attn_implementation
    for part, path in (("embed", anatomy.embed_path), ("norm", anatomy.norm_path), ("head", anatomy.head_path)):
        if path:
            device = device_name(device_of(plan.device_map, path))
            _set_submodule(model, path, source.on(device).load_shared((part,))[part])
    if anatomy.rotary_path and rotary is not None:
        device = device_name(device_of(plan.device_map, anatomy.rotary_path))
        _set_submodule(model, anatomy.rotary_path, rotary.to(device))
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise UserError(f"--quant fp8 cannot assemble {type(model).__name__} ({left[0]} has no weights after every "
                        "layer, the embedding, the norm and the head were loaded): use extract --stream")
    devices = {device_name(d) for d in plan.device_map.values()}
    if len(devices) > 1:
        from accelerate import dispatch_model

        model = dispatch_model(model, device_map=plan.device_map)
    model.hf_device_map = dict(plan.device_map)
    return model


def _set_submodule(model, path: str, module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


# Files whose presence says the model has a tokenizer of its own.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(ref: models.ModelRef):
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            if ref.kind == "gguf":
                return AutoTokenizer.from_pretrained(str(ref.directory), gguf_file=ref.path.name)
            return AutoTokenizer.from_pretrained(str(ref.path))
    except Exception as err:  # the tokenizers library raises plain Exception on a malformed tokenizer.json
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        present = [name for name in TOKENIZER_FILES if ref.kind != "gguf" and (ref.path / name).is_file()]
        if present:  # files that should load and do not: say so when text prompts need them
            return BrokenTokenizer(f"{', '.join(present)} in {ref.path}: {reason[:200]}")
        # not a warning: prompts given as token ids need none, and text prompts fail saying so
        log.info("no tokenizer for %s (%s): prompts must be given as token ids", ref.spec, reason)
        return None


def _verify_router_dtypes(model) -> None:
    wrong = {n: d for n, d in models.fp32_router_tensors(model).items() if d != torch.float32}
    if wrong:  # the subclass trick did not take on this transformers version: a bug, not bad input
        name, dtype = next(iter(wrong.items()))
        raise RuntimeError(f"router tensor {name} loaded as {dtype}, not float32: "
                           "routing would differ from the reference")


@dataclass(frozen=True)
class DeviceRow:
    device: str  # "cuda:0", "cpu", "disk"
    name: str  # GPU name, or "host RAM" / "offload folder"
    weight_bytes: int  # bytes of parameters and buffers the loaded model keeps there
    summary: str  # "embed_tokens + layers 0-7"
    allocated_bytes: int | None = None
    reserved_bytes: int | None = None
    total_bytes: int | None = None


def placement_rows(loaded: LoadedModel) -> list[DeviceRow]:
    """Where the loaded model's modules went, with live per-GPU memory."""
    model = loaded.model
    device_map = getattr(model, "hf_device_map", None) or loaded.plan.device_map
    sizes = placement.module_sizes(model)  # numel x element size: right for offloaded (meta) weights too
    gpus = {g.index: g for g in machine.gpus()}
    live = {m.index: m for m in machine.gpu_memory()}
    by_device: dict = {}
    for name, device in device_map.items():
        key = f"cuda:{device}" if isinstance(device, int) else str(device)
        if key.isdigit():
            key = f"cuda:{key}"
        by_device.setdefault(key, []).append(name)
    rows = []
    for key in sorted(by_device, key=_device_order):
        names = by_device[key]
        weight = sum(sizes.get(n, 0) for n in names)
        summary = planning.summarize_modules([n for n in names if sizes.get(n, 0) > 0], loaded.anatomy)
        if key.startswith("cuda:"):
            index = int(key[5:])
            mem = live.get(index)
            rows.append(DeviceRow(key, gpus[index].name if index in gpus else "?", weight, summary,
                                  mem and mem.allocated_bytes, mem and mem.reserved_bytes, mem and mem.total_bytes))
        else:
            rows.append(DeviceRow(key, "host RAM" if key == "cpu" else "offload folder", weight, summary))
    return rows


def _device_order(key: str):
    if key.startswith("cuda:"):
        return (0, int(key[5:]))
    return (1, {"cpu": 0, "disk": 1}.get(key, 2))

