"""What a model argument names, its config, and the numerics fixes layerwise applies.

A model argument is a local HF checkpoint directory, a `.gguf` file, or `builtin:NAME`
(see zoo.py). `resolve_model` turns it into a `ModelRef` after checking the path; `load_config`
reads the config and applies the fixes that keep MiniMax-M2 numerically right on every
supported transformers version:

- partial RoPE: transformers 5.0-5.17 drop MiniMax-M2's `rotary_dim` and rotate all 128 dims
  (issue #48241, fixed in 5.18). We set `rope_parameters["partial_rotary_factor"]` ourselves.
- router precision: with a bf16/fp16 compute dtype, transformers casts the fp32 router
  (`mlp.gate.weight`, `mlp.e_score_correction_bias`) down, which merges close bias values and
  changes expert choice. `model_class` returns a subclass that builds them in fp32, so every
  loader fills them as fp32: a plain load, the FP8 dequantize path (which casts each tensor to
  the parameter it fills, ignoring `_keep_in_fp32_modules_strict`) and disk offload (which
  indexes offloaded tensors in the parameter's dtype).

This module does not load weights and knows nothing about devices.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import zoo
from .errors import UserError
from .planflags import DEFAULT_DTYPE  # noqa: F401 - the compute dtype unless told (--dtype)
from .quant import QuantScheme, scheme_of
from .paths import hf_cache_root, inside
from .quiet import loading_errors, quiet_transformers
from .schema import is_int

BUILTIN_PREFIX = "builtin:"
GGUF_HINT = "a truncated download or not a GGUF file: re-download it"

# Per model_type: parameter/buffer name patterns the reference keeps in fp32 (the router).
FP32_ROUTER_PATTERNS = {
    "minimax_m2": ("mlp.gate.weight", "mlp.e_score_correction_bias"),
}

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def parse_dtype(text: str) -> torch.dtype:
    try:
        return DTYPES[text.lower()]
    except KeyError:
        raise UserError(f"unknown dtype {text!r}: use one of bf16, fp16, fp32") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class ModelRef:
    """A resolved model argument."""

    spec: str  # as the user wrote it
    kind: str  # "config" (no weights) | "checkpoint" (a directory) | "gguf" (a file)
    path: Path | None  # the checkpoint directory or the .gguf file; None for config-only built-ins
    builtin: str | None = None

    @property
    def has_weights(self) -> bool:
        return self.kind != "config"

    @property
    def directory(self) -> Path | None:
        """The directory handed to from_pretrained."""
        if self.path is None:
            return None
        return self.path.parent if self.kind == "gguf" else self.path


@dataclass(frozen=True)
class Fix:
    """A numerics fix applied to a model, or a known bug that the versions at hand have."""

    name: str
    detail: str
    applied: bool = True


@dataclass
class ModelConfig:
    """A config plus what we did to it."""

    config: object  # transformers.PretrainedConfig
    fixes: list[Fix] = field(default_factory=list)
    quant: QuantScheme | None = None  # the checkpoint's quantization (None: plain weights)


def check_spec(spec: str, flag: str = "model") -> str:
    """A model argument's text, stripped; a blank one or an unknown `builtin:NAME` is a UserError
    (a path is not looked at: resolve_model does that where the model is used)."""
    if spec is None or not str(spec).strip():
        raise UserError(f"no {flag} given: pass a checkpoint directory, a .gguf file or builtin:NAME "
                        f"(built-ins: {', '.join(zoo.BUILTINS)})")
    spec = str(spec).strip()
    if spec.startswith(BUILTIN_PREFIX) and spec[len(BUILTIN_PREFIX):] not in zoo.BUILTINS:
        where = "" if flag == "model" else f"{flag} "
        raise UserError(f"unknown built-in model {where}{spec!r}: choose one of "
                        + ", ".join(BUILTIN_PREFIX + n for n in zoo.BUILTINS))
    return spec


def resolve_model(spec: str) -> ModelRef:
    """Check a model argument and say what it is; bad ones raise UserError."""
    spec = check_spec(spec)
    if spec.startswith(BUILTIN_PREFIX):
        name = spec[len(BUILTIN_PREFIX):]
        builtin = zoo.BUILTINS[name]
        if builtin.kind == "config":
            return ModelRef(spec, "config", None, name)
        if builtin.kind == "gguf":
            return ModelRef(spec, "gguf", zoo.smollm2_gguf(), name)
        return ModelRef(spec, "checkpoint", zoo.tiny_checkpoint(name), name)
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"model path {spec!r} does not exist: pass a checkpoint directory, a .gguf file or builtin:NAME")
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"model file {spec!r} is not a .gguf file: pass a checkpoint directory or a .gguf file")
        if path.stat().st_size == 0:
            raise UserError(f"model file {spec!r} is empty")
        return ModelRef(spec, "gguf", path.resolve())
    if not (path / "config.json").is_file():
        what = "is empty" if not any(path.iterdir()) else "has no config.json"
        raise UserError(f"model directory {spec!r} {what}: point at a Hugging Face checkpoint directory")
    inside(path, "config.json", f"model directory {spec!r}", also=hf_cache_root(path))  # a link out is refused
    return ModelRef(spec, "checkpoint", path.resolve())


def load_config(ref: ModelRef, check_quant: bool = True):
    """The model's config with layerwise's numerics fixes applied. Returns ModelConfig. A
    quantization layerwise cannot run is a UserError unless `check_quant` is off (`check` reports it)."""
    from transformers import AutoConfig

    if ref.kind == "config":
        raw = zoo.BUILTINS[ref.builtin].config()
        model_type = raw.pop("model_type")
        config = AutoConfig.for_model(model_type, **raw)
    elif ref.kind == "gguf":
        _require_gguf()
        with loading_errors(ref.spec, GGUF_HINT), quiet_transformers():
            config = AutoConfig.from_pretrained(ref.directory, gguf_file=ref.path.name)
    else:
        _check_config_json(ref.path / "config.json")
        try:
            with quiet_transformers():
                config = AutoConfig.from_pretrained(ref.path)
        except (ValueError, KeyError, OSError, TypeError) as err:
            raise UserError(f"{ref.path / 'config.json'} cannot be read by transformers: {_first_line(err)}") from None
    return ModelConfig(config, apply_config_fixes(config), scheme_of(config) if check_quant else None)


# Sizes a config must give as whole numbers >= 1 where it gives them (a 0, a string or `true`
# would build a model without layers or fail deep inside transformers).
_SIZES = ("num_hidden_layers", "hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads",
          "intermediate_size", "head_dim", "max_position_embeddings", "num_local_experts", "num_experts_per_tok")


def _check_config_json(path: Path) -> None:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        why = f"{err.msg} at line {err.lineno}" if isinstance(err, json.JSONDecodeError) else "not UTF-8"
        raise UserError(f"{path} is not valid JSON ({why}): fix or re-download it") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str) or not raw["model_type"]:
        raise UserError(f"{path} has no model_type: it is not a transformers config (add e.g. \"model_type\": \"llama\")")
    for key in _SIZES:
        if raw.get(key) is not None and not (is_int(raw[key]) and raw[key] >= 1):
            raise UserError(f"{path}: {key} is {raw[key]!r}, not a whole number >= 1: fix or re-download it")
    _check_config_relations(path, raw)


def _check_config_relations(path: Path, raw: dict) -> None:
    """Sizes that must agree with each other (the forward pass fails deep inside otherwise)."""
    experts = raw.get("num_local_experts") or raw.get("num_experts")
    top_k = raw.get("num_experts_per_tok")
    if is_int(experts) and is_int(top_k) and top_k > experts:
        raise UserError(f"{path}: num_experts_per_tok is {top_k}, more than the {experts} experts: "
                        "fix or re-download it")
    heads, kv_heads = raw.get("num_attention_heads"), raw.get("num_key_value_heads")
    if is_int(heads) and is_int(kv_heads) and heads % kv_heads:
        raise UserError(f"{path}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}: "
                        "fix or re-download it")


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise UserError("reading .gguf files needs the gguf package: pip install 'layerwise[gguf]'") from None


def transformers_version() -> tuple[int, int]:
    import transformers

    major, minor = transformers.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def apply_config_fixes(config) -> list[Fix]:
    """Fix what transformers gets wrong for this config, in place; say what was done."""
    fixes: list[Fix] = []
    rotary_dim = getattr(config, "rotary_dim", None)
    if getattr(config, "model_type", None) == "minimax_m2" and rotary_dim:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        factor = rotary_dim / head_dim
        params = config.rope_parameters
        if params.get("partial_rotary_factor") != factor:
            params["partial_rotary_factor"] = factor
            fixes.append(Fix(
                "partial-rope",
                f"transformers {'.'.join(map(str, transformers_version()))} ignores rotary_dim={rotary_dim} "
                f"(rotates all {head_dim} dims; issue #48241, fixed in 5.18): set partial_rotary_factor={factor}",
            ))
    if getattr(config, "model_type", None) in FP32_ROUTER_PATTERNS:
        fixes.append(Fix("fp32-router", "router weight and e_score_correction_bias kept in float32 "
                                        "whatever the compute dtype (bf16 merges close biases)"))
    return fixes


def model_class(config):
    """The causal-LM class for `config`; for MoE models whose reference keeps the router in fp32,
    a same-named subclass that tells transformers to load those tensors in fp32."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise UserError(f"model_type {config.model_type!r} has no causal-LM class in transformers "
                        f"{transformers.__version__}: layerwise tests decoder-only language models") from None
    patterns = FP32_ROUTER_PATTERNS.get(config.model_type)
    if not patterns:
        return cls
    keep = set(getattr(cls, "_keep_in_fp32_modules_strict", None) or ()) | set(patterns)

    def __init__(self, config, *args, **kwargs):
        cls.__init__(self, config, *args, **kwargs)
        # Built in fp32 from the start, not only loaded so: a quantized checkpoint's loader casts the
        # unquantized tensors it loads to the dtype of the parameter it fills (transformers' FP8
        # dequantize path ignores _keep_in_fp32_modules_strict).
        keep_router_fp32(self)

    return type(cls.__name__, (cls,), {"_keep_in_fp32_modules_strict": sorted(keep), "__module__": cls.__module__,
                                       "__init__": __init__})


def keep_router_fp32(model) -> None:
    """Make the fp32-router tensors of `model` float32, wherever they are (meta included)."""
    patterns = FP32_ROUTER_PATTERNS.get(getattr(model.config, "model_type", None), ())
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if any(name.endswith(p) for p in patterns) and tensor.dtype != torch.float32:
            tensor.data = tensor.data.to(torch.float32)


def fp32_router_tensors(model) -> dict[str, torch.dtype]:
    """Router tensors that must be fp32, with the dtype they actually have."""
    patterns = FP32_ROUTER_PATTERNS.get(getattr(model.config, "model_type", None), ())
    found = {}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if any(name.endswith(p) for p in patterns):
            found[name] = t.dtype
    return found


_ATTENTION_NEEDS = {  # attn_implementation -> (transformers' check, what it needs)
    "flash_attention_2": ("is_flash_attn_2_available", "the flash-attn package (and a GPU it supports)"),
    "flash_attention_3": ("is_flash_attn_3_available", "flash-attn 3 (and a Hopper GPU)"),
    "flash_attention_4": ("is_flash_attn_4_available", "flash-attn 4 (and a GPU it supports)"),
    "flex_attention": ("is_torch_flex_attn_available", "a torch with flex attention"),
}


def reference_attention(options_attn: str | None, recorded: str | None) -> str | None:
    """The attention a test runs: `--attn-implementation`, else the reference's (`recorded`). One
    the reference ran with that this machine cannot load is refused up front, naming where it
    came from (transformers would say only that a package is missing, at the first layer)."""
    if options_attn is not None or recorded is None:
        return options_attn or recorded
    import transformers.utils as available

    check, needs = _ATTENTION_NEEDS.get(recorded, ("is_kernels_available", "the kernels package")
                                        if "/" in recorded else (None, None))
    way = "give --attn-implementation sdpa (the test then also measures how the attention kernels differ)"
    if check is not None and not getattr(available, check, lambda: True)():
        raise UserError(f"the reference ran with attn_implementation {recorded}, which needs {needs}, not found "
                        f"here: install it, or {way}")
    known = _known_attention()
    if known and "/" not in recorded and recorded.split("|")[-1] not in known:
        raise UserError(f"the reference ran with attn_implementation {recorded}, which this transformers does not "
                        f"know (it knows {', '.join(sorted(known))}): {way}")
    return recorded


def _known_attention() -> set[str]:
    """The attention implementations this transformers registers (empty where it cannot say)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    keys = getattr(ALL_ATTENTION_FUNCTIONS, "valid_keys", None)
    return {"eager", *(k.split("|")[-1] for k in keys())} if keys is not None else set()
