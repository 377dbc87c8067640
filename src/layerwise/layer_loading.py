"""One decoder layer at a time: read only its tensors from the shards, build it as transformers would.

`open_layers(spec, LayerOptions)` returns a `LayerSource` for one model. Loading a layer is two
steps, so a streaming caller can overlap them with compute:

- `read(K)`: pure I/O. Reads exactly decoder layer K's tensors from the store (weights.py: the
  safetensors shards named by the index, or tensors in memory), straight onto the device, and
  nothing else. An FP8 checkpoint is read as it is stored: e4m3 weights and their scales (half
  the bytes of bf16). Thread-safe: call it from a prefetch thread.
- `build(weights)`: assembles the layer. It calls the model class's own `from_pretrained` with a
  one-layer config (`num_hidden_layers=1`, `vocab_size=1`) and the layer's tensors renamed
  `model.layers.K.` -> `model.layers.0.`, so every checkpoint-key conversion a full load applies
  (MiniMax-M2's per-expert `w1/w2/w3` fused into `gate_up_proj/down_proj`), the fp32-router rule
  and the attention implementation are exactly those of a full load. Layer-index-dependent
  config fields are sliced to the one layer, and the result is checked against layer K of the
  full model built on the meta device (names, shapes, dtypes, attention type). FP8 weights are
  dequantized on the device first (quant.py: e4m3 x scale in float32, cast to the compute dtype,
  transformers' own rule); with `quant="fp8"` the built layer's quantized projections are then
  replaced by FP8 ones that compute as serving engines do (fp8.py).
  `from_pretrained` sets torch's *process-wide* default dtype while it builds modules, so builds
  are serialised by a lock and belong on the compute thread; keep prefetch threads to `read`.
- `load(K)` = `build(read(K))`.

`load_shared(parts)` loads the embedding, the final norm and the head individually (plain
modules: their checkpoint tensors are assigned to a copy of the meta module, on the device).

A `.gguf` file has no per-tensor index: the source loads the whole model on the CPU once (in
the source's dtype, lazily, on the first read) and hands out layer K's converted tensors from
it; `build` is the same. The CPU copy stays until `close()`.

This module knows nothing about runs, prompts or comparisons.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import threading
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from . import checkpoint, fp8, models, quant
from .quant import DEFAULT_FP8_BACKEND
from .anatomy import Anatomy, find_anatomy
from .errors import UserError
from .placement import meta_model
from .quiet import loading_errors, quiet_transformers
from .weights import CheckpointStore, MemoryStore

log = logging.getLogger(__name__)

# from_pretrained flips torch's global default dtype while building: one build at a time.
_BUILD_LOCK = threading.Lock()

# Config fields that are per-layer lists ([num_hidden_layers] long): sliced to [K].
_PER_LAYER_LISTS = ("layer_types", "mlp_layer_types", "no_rope_layers")
SHARED_PARTS = ("embed", "norm", "head")


@dataclass(frozen=True)
class LayerOptions:
    dtype: str = models.DEFAULT_DTYPE
    device: str = "cpu"  # "cuda:0", "cpu"
    attn_implementation: str | None = None  # eager | sdpa | flash_attention_2 (None: transformers' default)
    quant: str | None = None  # FP8 checkpoints: "dequantize" (default) or "fp8" (W8A8 as serving engines)
    fp8_backend: str | None = None  # --quant fp8: quant.FP8_BACKENDS (None: not chosen, DEFAULT_FP8_BACKEND)


@dataclass
class LayerWeights:
    """Decoder layer K's checkpoint tensors, on the device, renamed to layer 0 of a one-layer model."""

    index: int
    tensors: dict[str, torch.Tensor]
    bytes_read: int
    seconds: float


@dataclass
class LoadedLayer:
    """Decoder layer K as a module, with what running it needs."""

    index: int
    module: nn.Module  # the HF decoder layer, eval mode, on the device
    rotary: nn.Module | None  # the model's shared rotary embedding, on the device
    config: object  # the one-layer config the module was built with (attention implementation set)
    layer_type: str  # "full_attention", "sliding_attention", ... (picks the attention mask)
    bytes_read: int
    seconds: float  # read + build

    def position_embeddings(self, hidden_states: torch.Tensor, position_ids: torch.Tensor):
        """(cos, sin) as the model computes them for its layers, or None without a rotary module."""
        if self.rotary is None:
            return None
        return self.rotary(hidden_states, position_ids)

    def attention_mask(self, hidden_states: torch.Tensor, position_ids: torch.Tensor,
                       padding_mask: torch.Tensor | None = None):
        """The mask transformers' own model builds for this layer's type and attention
        implementation (no cache; `padding_mask` [batch, seq] marks real tokens when padded)."""
        from transformers import masking_utils

        builders = {"full_attention": "create_causal_mask", "sliding_attention": "create_sliding_window_causal_mask",
                    "chunked_attention": "create_chunked_causal_mask"}
        name = builders.get(self.layer_type)
        if name is None or not hasattr(masking_utils, name):
            raise UserError(f"layer {self.index} is a {self.layer_type!r} layer, which layerwise cannot run on its own "
                            "yet: compare whole-model runs instead")
        # positional: the cache argument is `past_key_values` before transformers 5.2x and `cache` after
        return getattr(masking_utils, name)(self.config, hidden_states, padding_mask, None, position_ids)

    def weights(self) -> dict[str, torch.Tensor]:
        """The layer's parameters and persistent buffers by HF name relative to the layer."""
        return dict(self.module.state_dict())


@dataclass
class LayerSource:
    """One model's decoder layers, loadable one at a time. Make it with `open_layers`."""

    ref: models.ModelRef
    config: object  # the full config, numerics fixes applied
    fixes: list
    options: LayerOptions
    anatomy: Anatomy  # of the full model (meta)
    architecture: str  # the causal-LM class name
    scheme: quant.QuantScheme | None  # the checkpoint's quantization (None: plain)
    quant_mode: str | None  # None, "dequantize" or "fp8"
    _meta: nn.Module = field(repr=False)
    store: CheckpointStore | MemoryStore | None = field(default=None, repr=False)  # None: a .gguf file
    _cpu_model: nn.Module | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def num_layers(self) -> int:
        return self.anatomy.num_layers

    @property
    def dtype(self) -> torch.dtype:
        return models.parse_dtype(self.options.dtype)

    @property
    def device(self) -> torch.device:
        return torch.device(self.options.device)

    def on(self, device: str) -> "LayerSource":
        """The same source, building on another device (shares the store and the meta model)."""
        return self.variant(device=str(device))

    def variant(self, **changes) -> "LayerSource":
        """The same checkpoint built under other LayerOptions (device, dtype, attention, quant):
        shares the store (and the meta model, in the same dtype); `build` takes what `read` gives."""
        options = dataclasses.replace(self.options, **changes)
        dtype = models.parse_dtype(options.dtype)  # the meta model `build` checks a layer against, in its dtype
        meta = self._meta if dtype == self.dtype else meta_model(copy.deepcopy(self.config), dtype)
        mode = quant.resolve_mode(self.scheme, options.quant)
        quant.check_backend(mode, options.fp8_backend)
        return dataclasses.replace(self, options=options, quant_mode=mode, _meta=meta)

    def check_index(self, index: int) -> None:
        if not 0 <= index < self.num_layers:
            raise UserError(f"layer {index} is out of range: {self.ref.spec} has layers 0-{self.num_layers - 1}")

    def layer_type(self, index: int) -> str:
        types = getattr(self.config, "layer_types", None)
        return types[index] if types else "full_attention"

    # ---------------------------------------------------------------------------- reading
    def read(self, index: int) -> LayerWeights:
        """Layer `index`'s tensors only, straight to the device. Thread-safe."""
        self.check_index(index)
        start = time.perf_counter()
        if self.ref.kind == "gguf":
            tensors = self._from_cpu_model(index)
        else:
            names = self.checkpoint_names(index)
            raw = self.store.read(names, str(self.device))
            prefix, zero = self._checkpoint_prefix(index), self._checkpoint_prefix(0)
            tensors = {zero + name[len(prefix):]: t for name, t in raw.items()}
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        return LayerWeights(index, tensors, size, time.perf_counter() - start)

    def checkpoint_names(self, index: int) -> list[str]:
        """The checkpoint tensors of decoder layer `index`, from the index alone."""
        prefix = self._checkpoint_prefix(index)
        names = [n for n in self._names if n.startswith(prefix)]
        if not names:
            raise UserError(f"the checkpoint at {self.store.describe()} has no tensor of layer {index} "
                            f"(none named {prefix}*): re-download its index")
        return names

    @functools.cached_property
    def _names(self) -> list[str]:
        return self.store.names() if self.store is not None else []

    def _checkpoint_prefix(self, index: int) -> str:
        """`model.layers.K.`, or the checkpoint's own spelling when it was saved without the base prefix."""
        full = f"{self.anatomy.layers_path}.{index}."
        if self.store is None or any(n.startswith(f"{self.anatomy.layers_path}.") for n in self._names):
            return full
        return full.split(".", 1)[1] if "." in self.anatomy.layers_path else full

    def _from_cpu_model(self, index: int) -> dict[str, torch.Tensor]:
        with self._lock:
            if self._cpu_model is None:
                log.info("%s has no per-tensor index: loading it on the CPU once", self.ref.spec)
                self._cpu_model = load_whole_on_cpu(self.ref, self.dtype)
        layer = self._cpu_model.get_submodule(self.anatomy.layer(index))
        zero = f"{self.anatomy.layers_path}.0."
        return {zero + n: t.detach().to(self.device, copy=True) for n, t in layer.state_dict().items()}

    # ---------------------------------------------------------------------------- building
    def build(self, weights: LayerWeights) -> LoadedLayer:
        """Assemble a layer from `read`'s tensors with transformers' own loading code."""
        start = time.perf_counter()
        index = weights.index
        config = one_layer_config(self.config, index)
        tensors = weights.tensors
        if self.scheme is not None:
            try:
                tensors = fp8.dequantize_tensors(tensors, self.scheme, self.dtype)
            except UserError as err:  # name the tensor as the checkpoint does, not as renamed to layer 0
                raise UserError(str(err).replace(self._checkpoint_prefix(0), self._checkpoint_prefix(index))) from None
        kwargs = dict(config=config, state_dict=tensors, dtype=self.dtype,
                      device_map={"": str(self.device)}, output_loading_info=True)
        if self.options.attn_implementation:
            kwargs["attn_implementation"] = self.options.attn_implementation
        cls = models.model_class(config)
        with _BUILD_LOCK, loading_errors(self.ref.spec), quiet_transformers():
            model, info = cls.from_pretrained(None, **kwargs)
        model.eval()
        layer_path = f"{self.anatomy.layers_path}.0"
        layer = model.get_submodule(layer_path)
        self._verify(index, layer)  # first: a wrong structure also shows up as missing tensors
        missing = sorted(k for k in info.get("missing_keys", ()) if k.startswith(layer_path + "."))
        if missing:
            raise UserError(f"the checkpoint lacks {len(missing)} tensor(s) of layer {index} "
                            f"(first: {missing[0].replace(layer_path, self.anatomy.layer(index), 1)}): "
                            "re-download it")
        unexpected = sorted(info.get("unexpected_keys", ()))
        if unexpected:
            log.warning("layer %d: %d checkpoint tensor(s) unused by transformers (first: %s)",
                        index, len(unexpected), unexpected[0])
        del tensors
        if self.quant_mode == "fp8":
            fp8.to_fp8(layer, weights.tensors, layer_path + ".", self.scheme,
                       self.options.fp8_backend or DEFAULT_FP8_BACKEND)
        rotary = model.get_submodule(self.anatomy.rotary_path) if self.anatomy.rotary_path else None
        seconds = weights.seconds + time.perf_counter() - start
        # model.config, not `config`: from_pretrained works on its own copy (attention implementation set there)
        return LoadedLayer(index, layer, rotary, model.config, self.layer_type(index), weights.bytes_read, seconds)

    def load(self, index: int) -> LoadedLayer:
        return self.build(self.read(index))

    def _verify(self, index: int, layer: nn.Module) -> None:
        """The isolated layer must be layer K of the full model: same class, tensors, attention type."""
        expected = self._meta.get_submodule(self.anatomy.layer(index))
        want = {n: (tuple(t.shape), t.dtype) for n, t in expected.state_dict().items()}
        got = {n: (tuple(t.shape), t.dtype) for n, t in layer.state_dict().items()}
        problems = []
        if type(expected).__name__ != type(layer).__name__:
            problems.append(f"class {type(layer).__name__} instead of {type(expected).__name__}")
        for name in sorted(set(want) | set(got)):
            if want.get(name) != got.get(name):
                problems.append(f"{name}: {got.get(name)} instead of {want.get(name)}")
        for attr in ("attention_type", "layer_type", "sliding_window"):
            for a, b in ((expected, layer), (getattr(expected, "self_attn", None), getattr(layer, "self_attn", None))):
                if a is not None and getattr(a, attr, None) != getattr(b, attr, None):
                    problems.append(f"{attr} {getattr(b, attr, None)!r} instead of {getattr(a, attr, None)!r}")
        if problems:
            raise UserError(f"layer {index} of {self.ref.spec} cannot be loaded on its own: its isolated build "
                            f"differs from the full model ({problems[0]}; {len(problems)} difference(s)); "
                            "this model type needs a config slicing rule in layer_loading.py, load the whole model")

    # ---------------------------------------------------------------------------- shared parts
    def load_shared(self, parts: tuple[str, ...] = SHARED_PARTS) -> dict[str, nn.Module]:
        """The embedding, final norm and/or head ("embed", "norm", "head"), each on its own, on the
        device in the source's dtype. Thread-safe (no transformers loading code involved)."""
        paths = {"embed": self.anatomy.embed_path, "norm": self.anatomy.norm_path, "head": self.anatomy.head_path}
        unknown = [p for p in parts if p not in paths]
        if unknown:
            raise ValueError(f"unknown shared part(s) {unknown}: choose from {SHARED_PARTS}")
        out = {}
        for part in parts:
            path = paths[part]
            if path is None:
                continue
            if self.ref.kind == "gguf":
                self._from_cpu_model(0)  # ensures the CPU model
                module = copy.deepcopy(self._cpu_model.get_submodule(path)).to(self.device)
            else:
                module = self._shared_from_checkpoint(path)
            out[part] = module.eval()
        return out

    def _shared_from_checkpoint(self, path: str) -> nn.Module:
        module = copy.deepcopy(self._meta.get_submodule(path))  # meta tensors: costs nothing
        names = {f"{path}.{n}": n for n in module.state_dict()}
        tied = getattr(self.config, "tie_word_embeddings", False)
        sources = {}
        for full, rel in names.items():
            if full not in self.store and tied and path == self.anatomy.head_path:
                full = f"{self.anatomy.embed_path}.{rel}"
            if full not in self.store:
                raise UserError(f"the checkpoint at {self.store.describe()} has no tensor {full}: "
                                "load the whole model instead")
            sources[full] = rel
        wanted = list(sources) + [f"{n.removesuffix('.weight')}.{s}" for n in sources for s in quant.SCALE_NAMES
                                  if f"{n.removesuffix('.weight')}.{s}" in self.store]
        tensors = self.store.read(wanted, str(self.device))
        if self.scheme is not None:  # a quantized head or embedding is dequantized (transformers' rule)
            tensors = fp8.dequantize_tensors(tensors, self.scheme, self.dtype)
        state = {rel: tensors[full].to(self.dtype) if tensors[full].is_floating_point() else tensors[full]
                 for full, rel in sources.items()}
        module.load_state_dict(state, assign=True)
        return module

    def close(self) -> None:
        """Drop the CPU copy of a .gguf model."""
        with self._lock:
            self._cpu_model = None


def open_layers(spec: str, options: LayerOptions = LayerOptions(), store: MemoryStore | None = None) -> LayerSource:
    """A source of model `spec`'s decoder layers; reads only headers and the config. `store`:
    tensors already in memory, by checkpoint name (then `spec` only gives the config)."""
    ref = models.resolve_model(spec)
    if store is None and not ref.has_weights:
        raise UserError(f"{spec} is a configuration without weights: layer tests need a checkpoint "
                        "(e.g. builtin:minimax-m2-tiny)")
    dtype = models.parse_dtype(options.dtype)
    mc = models.load_config(ref)
    mode = quant.resolve_mode(mc.quant, options.quant)
    quant.check_backend(mode, options.fp8_backend)
    if ref.kind == "gguf" and store is None:
        source_store = None
    else:
        if store is None:
            checkpoint.require_complete(ref.path, mc.quant)  # headers only: a broken file fails here, in one line
        source_store = store if store is not None else CheckpointStore(ref.path)
    meta = meta_model(copy.deepcopy(mc.config), dtype)  # building sets dtype etc. on the config it gets
    anatomy = find_anatomy(meta)
    return LayerSource(ref, mc.config, mc.fixes, options, anatomy, type(meta).__name__, mc.quant, mode, meta,
                       source_store)


def load_whole_on_cpu(ref: models.ModelRef, dtype: torch.dtype) -> nn.Module:
    """A model without a per-tensor index (a .gguf file), loaded whole on the CPU by transformers."""
    config = models.load_config(ref).config
    with loading_errors(ref.spec, models.GGUF_HINT), quiet_transformers():
        model = models.model_class(config).from_pretrained(str(ref.directory), config=config, dtype=dtype,
                                                           device_map={"": "cpu"}, gguf_file=ref.path.name)
    return model.eval()


def one_layer_config(config, index: int):
    """A copy of `config` describing a model whose only decoder layer is layer `index`, with a
    one-token vocabulary (embedding and head then cost nothing)."""
    n = config.num_hidden_layers
    cfg = copy.deepcopy(config)
    for key in _PER_LAYER_LISTS:
        value = getattr(cfg, key, None)
        if isinstance(value, (list, tuple)) and len(value) == n:
            setattr(cfg, key, type(value)(value[index:index + 1]))
    if isinstance(getattr(cfg, "mlp_only_layers", None), (list, tuple)):
        cfg.mlp_only_layers = [0] if index in config.mlp_only_layers else []
    if isinstance(getattr(cfg, "first_k_dense_replace", None), int):
        cfg.first_k_dense_replace = 1 if index < config.first_k_dense_replace else 0
    step = getattr(cfg, "decoder_sparse_step", None)
    if isinstance(step, int) and step > 0:  # Qwen-MoE: sparse when (idx + 1) % step == 0
        cfg.decoder_sparse_step = 1 if (index + 1) % step == 0 else 2
    if isinstance(getattr(cfg, "max_window_layers", None), int):  # sliding from this layer on
        cfg.max_window_layers = 0 if index >= config.max_window_layers else 1
    cfg.num_hidden_layers = 1
    cfg.vocab_size = 1
    if hasattr(cfg, "quantization_config"):  # the layer is built from dequantized tensors
        del cfg.quantization_config
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if isinstance(getattr(cfg, key, None), int):
            setattr(cfg, key, None)
    return cfg
