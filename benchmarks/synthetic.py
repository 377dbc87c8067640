"""Synthetic models for benchmarks: real MiniMax-M2 dimensions, seeded random weights.

`minimax_config(layers, ...)` is the real MiniMax-M2 configuration with fewer layers (or shrunk
for a dry run on a CPU). `build_on_devices` materialises it straight onto its planned devices
(weights generated on the GPU, never on the host, never twice) and dispatches it with
accelerate, exactly as `from_pretrained(device_map=...)` would leave it. `write_checkpoint`
saves a model as a real sharded safetensors checkpoint in the hub layout. `layerwise_env` is the
environment a benchmark runs layerwise commands in, `drop_page_cache` evicts files before a cold read.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))

from layerwise import devicemap, models, placement, zoo  # noqa: E402
from layerwise.quiet import quiet_transformers  # noqa: E402


def minimax_config(layers: int, tiny: bool = False, experts: int | None = None):
    raw = zoo.BUILTINS["minimax-m2-tiny" if tiny else "minimax-m2"].config()
    raw["num_hidden_layers"] = layers
    if experts:
        raw["num_local_experts"] = experts
    model_type = raw.pop("model_type")
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, **raw)
    models.apply_config_fixes(config)
    return config


def _fill(name: str, tensor: torch.Tensor, generator: torch.Generator) -> None:
    if "e_score_correction_bias" in name:
        tensor.normal_(0.0, 0.05, generator=generator)
    elif tensor.dim() == 1:
        tensor.fill_(1.0)
    elif "embed_tokens" in name:
        tensor.normal_(0.0, 1.0, generator=generator)
    else:
        tensor.normal_(0.0, 1.0 / math.sqrt(tensor.shape[-1]), generator=generator)


def build_on_devices(config, device_map: dict, dtype=torch.bfloat16, seed: int = 0):
    """The model with seeded random weights created directly on the devices of `device_map`."""
    from accelerate import dispatch_model

    model = placement.meta_model(config, dtype)
    generators: dict[str, torch.Generator] = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        device = devicemap.device_of(device_map, name)
        device = f"cuda:{device}" if isinstance(device, int) else (device or "cpu")
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        value = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
        if "rotary_emb" in module_name:
            continue  # rebuilt below from the config
        generator = generators.setdefault(device, torch.Generator(device=device).manual_seed(seed))
        with torch.no_grad():
            _fill(name, value, generator)
        if leaf in module._parameters:
            module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
        else:
            module._buffers[leaf] = value
    rotary_path = [n for n, _ in model.named_modules() if n.endswith("rotary_emb")][0]
    rotary_device = devicemap.device_of(device_map, rotary_path)
    rotary_device = f"cuda:{rotary_device}" if isinstance(rotary_device, int) else rotary_device
    parent, _, leaf = rotary_path.rpartition(".")
    rotary_cls = type(model.get_submodule(rotary_path))
    setattr(model.get_submodule(parent), leaf, rotary_cls(config).to(rotary_device))
    model.eval()
    if len({v for v in device_map.values()}) > 1:
        model = dispatch_model(model, device_map=device_map)
    return model


def write_checkpoint(model, directory: Path, shard: str = "5GB") -> None:
    with quiet_transformers():
        model.save_pretrained(directory, max_shard_size=shard)


# ------------------------------------------------------------------------------ FP8, by checkpoint name

def minimax_layer_shapes(config, index: int) -> dict[str, tuple[tuple[int, ...], str]]:
    """Decoder layer `index` of a MiniMax-M2 checkpoint as the release stores it: {name: (shape,
    kind)}, kind "fp8" (an e4m3 projection, with a `_scale_inv` beside it), "fp32" (router) or
    "bf16" (norms)."""
    h, i, e = config.hidden_size, config.intermediate_size, config.num_local_experts
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    p = f"model.layers.{index}."
    shapes = {
        p + "input_layernorm.weight": ((h,), "bf16"), p + "post_attention_layernorm.weight": ((h,), "bf16"),
        p + "self_attn.q_proj.weight": ((q, h), "fp8"), p + "self_attn.k_proj.weight": ((kv, h), "fp8"),
        p + "self_attn.v_proj.weight": ((kv, h), "fp8"), p + "self_attn.o_proj.weight": ((h, q), "fp8"),
        p + "self_attn.q_norm.weight": ((q,), "bf16"), p + "self_attn.k_norm.weight": ((kv,), "bf16"),
        p + "block_sparse_moe.gate.weight": ((e, h), "fp32"),
        p + "block_sparse_moe.e_score_correction_bias": ((e,), "fp32"),
    }
    for x in range(e):
        shapes[f"{p}block_sparse_moe.experts.{x}.w1.weight"] = ((i, h), "fp8")
        shapes[f"{p}block_sparse_moe.experts.{x}.w3.weight"] = ((i, h), "fp8")
        shapes[f"{p}block_sparse_moe.experts.{x}.w2.weight"] = ((h, i), "fp8")
    return shapes


def shared_shapes(config) -> dict[str, tuple[tuple[int, ...], str]]:
    h, v = config.hidden_size, config.vocab_size
    return {"model.embed_tokens.weight": ((v, h), "bf16"), "model.norm.weight": ((h,), "bf16"),
            "lm_head.weight": ((v, h), "bf16")}


def fp8_tensors(shapes: dict, device: str, block: tuple[int, int], generator: torch.Generator) -> dict:
    """Seeded random tensors of `shapes`, made on `device`; "fp8" ones quantized there in `block`s
    (absmax / 448 per block, as the release's quantizer), with their `weight_scale_inv`."""
    from layerwise.quant import quantize_weight

    out = {}
    for name, (shape, kind) in shapes.items():
        if "e_score_correction_bias" in name:
            value = torch.randn(shape, device=device, generator=generator) * 0.05
        elif len(shape) == 1:
            value = 1.0 + 0.1 * torch.randn(shape, device=device, generator=generator)
        elif "embed_tokens" in name:
            value = torch.randn(shape, device=device, generator=generator, dtype=torch.bfloat16)
        elif name.endswith("gate.weight"):
            value = torch.randn(shape, device=device, generator=generator) * (3.0 / math.sqrt(shape[-1]))
        else:
            value = torch.randn(shape, device=device, generator=generator, dtype=torch.bfloat16) / math.sqrt(shape[-1])
        if kind == "fp8":
            q, scale = quantize_weight(value, block)
            out[name], out[name.removesuffix(".weight") + ".weight_scale_inv"] = q, scale
        else:
            out[name] = value.to(torch.float32 if kind == "fp32" else torch.bfloat16)
        del value
    return out


def write_fp8_checkpoint(config, directory: Path, device: str, block=(128, 128), seed: int = 0) -> int:
    """A MiniMax-M2 block-FP8 checkpoint in the release's layout (config.json with its
    quantization_config, one shard per layer plus one for the rest, the index), generated layer by
    layer on `device`. Returns its bytes."""
    import json

    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=device).manual_seed(seed)
    parts = [("shared", shared_shapes(config))] + [(f"layer{k:03d}", minimax_layer_shapes(config, k))
                                                  for k in range(config.num_hidden_layers)]
    weight_map, total = {}, 0
    for number, (label, shapes) in enumerate(parts):
        tensors = fp8_tensors(shapes, device, block, generator)
        shard = f"model-{number + 1:05d}-of-{len(parts):05d}.safetensors"
        save_file({n: t.contiguous().cpu() for n, t in tensors.items()}, str(directory / shard),
                  metadata={"format": "pt"})
        for n, t in tensors.items():
            weight_map[n] = shard
            total += t.numel() * t.element_size()
        del tensors
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    raw = {k: v for k, v in zoo.MINIMAX_M2_CONFIG.items()}
    raw.update(num_hidden_layers=config.num_hidden_layers, hidden_size=config.hidden_size,
               intermediate_size=config.intermediate_size, num_attention_heads=config.num_attention_heads,
               num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, rotary_dim=config.rotary_dim,
               num_local_experts=config.num_local_experts, num_experts_per_tok=config.num_experts_per_tok,
               vocab_size=config.vocab_size, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
               quantization_config={**zoo.MINIMAX_M2_FP8, "weight_block_size": list(block)})
    (directory / "config.json").write_text(json.dumps(raw, indent=1))
    return total


def proc_read_bytes(pid: int | str = "self") -> int | None:
    """Bytes process `pid` has read from storage so far (/proc/PID/io `read_bytes`: the page-cache
    misses it caused, its threads together); None where /proc cannot say (not started, gone)."""
    try:
        with open(f"/proc/{pid}/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("read_bytes"))
    except (OSError, StopIteration, ValueError):
        return None


def drop_page_cache(files) -> None:
    """Drop these files from the page cache (fsync, then POSIX_FADV_DONTNEED): the next read comes
    from the disk. Needs no root, unlike /proc/sys/vm/drop_caches."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def layerwise_env(src: str | os.PathLike = SRC, **extra: str) -> dict:
    """This process's environment with `src` (a layerwise checkout's src/, default this one's)
    first on PYTHONPATH, and `extra` variables: what a benchmark's child commands run in."""
    path = os.pathsep.join(filter(None, [str(Path(src).resolve()), os.environ.get("PYTHONPATH")]))
    return {**os.environ, **extra, "PYTHONPATH": path}


def write_json(out: str | os.PathLike, name: str, data: dict) -> Path:
    """`data` as `name` (indented JSON) in the directory `out`, made if missing; its path."""
    path = Path(out) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1))
    return path
