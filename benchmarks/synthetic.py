"""Synthetic models for benchmarks: real MiniMax-M2 dimensions, seeded random weights.

`minimax_config(layers, ...)` is the real MiniMax-M2 configuration with fewer layers (or shrunk
for a dry run on a CPU). `build_on_devices` materialises it straight onto its planned devices
(weights generated on the GPU, never on the host, never twice) and dispatches it with
accelerate, exactly as `from_pretrained(device_map=...)` would leave it. `write_checkpoint`
saves a model as a real sharded safetensors checkpoint in the hub layout.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

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
