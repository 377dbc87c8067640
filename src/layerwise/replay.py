"""Replaying decoder layers on a reference run's recorded inputs, under candidate settings.

`replay(model, reference, layers, options, isolated=DIR, chained=DIR)` loads one decoder layer at
a time (layer_loading.py, never the whole model) and, for every prompt of the reference run:

- isolated: feeds layer K the reference's recorded `model.layers.K:input`. What comes out
  differs from the reference's `model.layers.K:output` only by layer K's own error.
- chained: feeds layer A the recorded input of A, then each next layer the previous one's
  output. What comes out carries the error accumulated from A on (the propagated error).

Each prompt runs alone (batch 1, no padding) with position ids 0..seq-1, the attention mask
transformers' own `masking_utils` builds for the layer's type and attention implementation
(eager: additive float [1, 1, T, T]; sdpa: None, i.e. causal), and the rotary embedding the
model's rotary module computes. The layer's output, and where the reference has them its
attention, MLP and router tensors (caught by forward hooks on the layer's own submodules), are
written with RunWriter as a run that `compare` reads beside the reference.

The layer is the transformers layer, or the user's `--candidate package.module:factory`:
`factory(config, layer_index, weights) -> nn.Module`, where `weights` are the layer's tensors by
HF name relative to the layer, and the module has the HF layer's call signature.
This module knows nothing about metrics, tolerances or reports.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import models, runs
from .errors import UserError
from .layer_loading import LayerOptions, LayerSource, LoadedLayer, open_layers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplayOptions:
    dtype: str | None = None  # None: the reference run's dtype
    attn_implementation: str | None = None  # None: the reference run's
    device: str | None = None  # None: cuda:0 when a GPU is present, else cpu
    candidate: str | None = None  # "package.module:factory" or "path/file.py:factory"
    allow_config_mismatch: bool = False  # the model is a variant of the reference's (quantized, converted)
    overwrite: bool = False


@dataclass(frozen=True)
class ReplayResult:
    layers: tuple[int, ...]
    isolated: Path | None  # the run of each layer on its own recorded input
    chained: Path | None  # the run of the layers chained from the first one's recorded input
    settings: dict  # the candidate settings, as written into the runs
    seconds: float
    load_seconds: float  # of which reading and building layers
    bytes_read: int
    notes: tuple[str, ...] = ()


# ------------------------------------------------------------------------------ arguments

def parse_layer(text: str, num_layers: int) -> list[int]:
    """`--layer K` or `--layer all`."""
    text = str(text).strip().lower()
    if text == "all":
        return list(range(num_layers))
    return [_layer_number(text, num_layers, "--layer")]


def parse_layer_range(text: str, num_layers: int) -> list[int]:
    """`--layers A-B` (inclusive) or a single `K`."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(text))
    if not match:
        raise UserError(f"--layers {text!r} is not a range: write A-B, e.g. 0-3")
    first = _layer_number(match.group(1), num_layers, "--layers")
    last = _layer_number(match.group(2) or match.group(1), num_layers, "--layers")
    if last < first:
        raise UserError(f"--layers {text} is reversed: write the first layer first ({last}-{first})")
    return list(range(first, last + 1))


def _layer_number(text: str, num_layers: int, flag: str) -> int:
    if not re.fullmatch(r"\d+", text.strip()):
        hint = " or all" if flag == "--layer" else ""
        raise UserError(f"{flag} {text!r} is not a layer number: use 0-{num_layers - 1}{hint}")
    index = int(text)
    if index >= num_layers:
        raise UserError(f"layer {index} is out of range: the model has layers 0-{num_layers - 1}")
    return index


def load_candidate(spec: str) -> Callable:
    """Import `package.module:factory` (or `path/to/file.py:factory`); the current directory is
    importable, as for `python -m`."""
    module_name, sep, attr = str(spec).rpartition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"--candidate {spec!r} must be package.module:factory")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UserError(f"--candidate file {module_name} does not exist")
            module_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.append(os.getcwd())
            module = importlib.import_module(module_name)
    except UserError:
        raise
    except Exception as err:  # the user's module: ImportError, SyntaxError, anything it raises
        first = str(err).splitlines()[0] if str(err) else ""
        raise UserError(f"--candidate {spec}: cannot import {module_name} ({type(err).__name__}: {first}); "
                        "check the module path and PYTHONPATH") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise UserError(f"--candidate {spec}: {module_name} has no attribute {attr}")
    if not callable(factory):
        raise UserError(f"--candidate {spec}: {attr} is a {type(factory).__name__}, not callable; "
                        "it must be factory(config, layer_index, weights) -> nn.Module")
    return factory


# ------------------------------------------------------------------------------ checks

def check_reference(run: runs.Run, source: LayerSource, layers: list[int], chained: bool,
                    allow_config_mismatch: bool = False) -> list[str]:
    """Refuse a reference run from another model or without the inputs the replay needs.
    Returns notes (e.g. a config hash that differs only because transformers versions differ)."""
    notes = []
    model = run.manifest.get("model", {}) or {}
    config = source.config
    where = f"reference run {run.path}"
    if model.get("model_type") and model["model_type"] != config.model_type:
        raise UserError(f"{where} was made from a {model['model_type']} model, not {config.model_type} "
                        f"({source.ref.spec}): pass the model the reference was extracted from")
    for key, mine in (("num_layers", source.num_layers), ("hidden_size", config.hidden_size)):
        if model.get(key) is not None and model[key] != mine:
            raise UserError(f"{where} has {key}={model[key]}, {source.ref.spec} has {mine}: "
                            "pass the model the reference was extracted from")
    recorded = model.get("config_sha256")
    if recorded and recorded not in config_hashes(source):
        theirs = (run.manifest.get("versions") or {}).get("transformers")
        import transformers

        if allow_config_mismatch:
            notes.append(f"config differs from the reference's (config_sha256 {recorded[:12]}), allowed")
        elif theirs and theirs != transformers.__version__:
            notes.append(f"config hash differs from the reference's, which was made with transformers {theirs} "
                         f"(this is {transformers.__version__}); model type and sizes match")
        else:
            raise UserError(f"{where} was made from another model config (config_sha256 {recorded[:12]}...): "
                            "pass the model it was extracted from, or --allow-config-mismatch for a variant "
                            "of it (quantized, converted)")
    if not run.prompts:
        raise UserError(f"{where} has no prompts")
    needed = [layers[0]] if chained else layers
    for index in needed:
        for prompt in run.prompts:
            name = f"{source.anatomy.layer(index)}:input"
            if not run.has(name, prompt["index"]):
                raise UserError(f"{where} has no {name} for prompt {prompt['index']}: re-extract it with the "
                                "residual stream of every layer")
    return notes


def config_hashes(source: LayerSource) -> set[str]:
    """config_sha256 of the model's config as layerwise loads it, with and without the numerics
    fixes (a run may have been hashed either way)."""
    import copy

    hashes = {runs.config_sha256(source.config)}
    raw = copy.deepcopy(source.config)
    params = getattr(raw, "rope_parameters", None)
    if any(f.name == "partial-rope" for f in source.fixes) and isinstance(params, dict):
        params.pop("partial_rotary_factor", None)
        hashes.add(runs.config_sha256(raw))
    return hashes


# ------------------------------------------------------------------------------ running

@dataclass
class _Track:
    """One output run: where its layer inputs come from and where its tensors go."""

    kind: str  # "isolated" | "chained"
    writer: runs.RunWriter
    carry: dict[int, torch.Tensor] = field(default_factory=dict)  # chained: prompt -> [1, T, H]


def replay(model: str, reference: str | os.PathLike | runs.Run, layers: list[int],
           options: ReplayOptions = ReplayOptions(), isolated: str | os.PathLike | None = None,
           chained: str | os.PathLike | None = None) -> ReplayResult:
    """Run `layers` on the reference's recorded inputs and write the isolated and/or chained runs."""
    if isolated is None and chained is None:
        raise ValueError("replay needs an isolated and/or a chained output directory")
    layers = list(layers)
    if chained is not None and layers != list(range(layers[0], layers[-1] + 1)):
        raise UserError("chained layers must be a contiguous range A-B")
    run = reference if isinstance(reference, runs.Run) else runs.open_run(reference)
    settings = resolve_settings(run, options)
    factory = load_candidate(options.candidate) if options.candidate else None
    source = open_layers(model, LayerOptions(settings["dtype"], settings["device"], settings["attn_implementation"]))
    for index in layers:
        source.check_index(index)
    notes = check_reference(run, source, layers, chained is not None, options.allow_config_mismatch)
    tracks = [_Track(kind, runs.RunWriter(path, _intent(run, source, settings, layers, kind), options.overwrite))
              for kind, path in (("isolated", isolated), ("chained", chained)) if path is not None]
    start = time.perf_counter()
    load_seconds, bytes_read = 0.0, 0
    try:
        with torch.inference_mode():
            for index in layers:
                loaded = source.load(index)
                load_seconds += loaded.seconds
                bytes_read += loaded.bytes_read
                module = _candidate(factory, options.candidate, source, loaded) if factory else loaded.module
                who = f"--candidate {options.candidate}: layer {index}" if factory else f"layer {index}"
                for track in tracks:
                    _run_layer(run, source, loaded, module, track, index == layers[0], who)
                del loaded, module
        for track in tracks:
            track.writer.finish({"producer": "layerwise test", "notes": notes})
    except BaseException:
        for track in tracks:
            track.writer.abort()
        raise
    finally:
        source.close()
    return ReplayResult(tuple(layers), Path(isolated) if isolated else None, Path(chained) if chained else None,
                        settings, time.perf_counter() - start, load_seconds, bytes_read, tuple(notes))


def resolve_settings(run: runs.Run, options: ReplayOptions) -> dict:
    """The candidate settings: what the user gave, else the reference's own."""
    ref = run.manifest.get("settings", {}) or {}
    dtype = options.dtype or ref.get("dtype") or "bf16"
    models.parse_dtype(dtype)
    device = options.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        raise UserError(f"--device {device} is not usable here ({str(err).splitlines()[0]})") from None
    return {"dtype": models.dtype_name(models.parse_dtype(dtype)),
            "attn_implementation": options.attn_implementation or ref.get("attn_implementation"),
            "device": device, "candidate": options.candidate}


def _intent(run: runs.Run, source: LayerSource, settings: dict, layers: list[int], kind: str) -> dict:
    anatomy = source.anatomy
    return {
        "producer": "layerwise test",
        "model": {"spec": source.ref.spec, "path": str(source.ref.path), "model_type": source.config.model_type,
                  "architecture": (getattr(source.config, "architectures", None) or [None])[0],
                  "config_sha256": runs.config_sha256(source.config), "num_layers": anatomy.num_layers,
                  "hidden_size": source.config.hidden_size},
        "settings": {**settings, "replay": kind, "layers": layers},
        "reference": {"path": str(run.path), "created": run.manifest.get("created")},
        "anatomy": {"layers_path": anatomy.layers_path, "embed": anatomy.embed_path,
                    "norm": anatomy.norm_path or "model.norm", "head": anatomy.head_path},
        "prompts": run.prompts,
        "fixes": [vars(f) for f in source.fixes],
        "versions": runs.library_versions(),
    }


def _candidate(factory: Callable, spec: str, source: LayerSource, loaded: LoadedLayer) -> nn.Module:
    import copy

    # The full config, with the attention implementation the candidate settings chose (a factory
    # building transformers' own modules must not fall back to another one, whose mask differs).
    config = copy.deepcopy(source.config)
    config._attn_implementation = loaded.config._attn_implementation
    module = factory(config, loaded.index, loaded.weights())
    if not isinstance(module, nn.Module):
        raise UserError(f"--candidate {spec} returned {type(module).__name__} for layer {loaded.index}, "
                        "not a torch.nn.Module")
    return module.eval()


def _run_layer(run: runs.Run, source: LayerSource, loaded: LoadedLayer, module: nn.Module, track: _Track,
               first: bool, who: str) -> None:
    layer_path = source.anatomy.layer(loaded.index)
    dtype, device = source.dtype, source.device
    for prompt in run.prompts:
        p = prompt["index"]
        if track.kind == "isolated" or first:
            x = run.tensor(f"{layer_path}:input", p).to(device=device, dtype=dtype)[None]  # [1, T, H]
        else:
            x = track.carry[p]
        wanted = [n for n in _hooked_names(source, loaded.index) if run.has(n, p)]
        y, caught = _forward(loaded, module, x, source, wanted, who)
        if track.kind == "chained":
            track.carry[p] = y
        tensors = {f"{layer_path}:input": x[0], f"{layer_path}:output": y[0], **caught}
        track.writer.put(p, layer_path, {n: t.detach().to("cpu") for n, t in tensors.items()})


def _hooked_names(source: LayerSource, index: int) -> list[str]:
    anatomy, layer = source.anatomy, source.anatomy.layer(index)
    names = []
    if anatomy.attn_name:
        names.append(f"{layer}.{anatomy.attn_name}:output")
    if anatomy.mlp_name:
        names.append(f"{layer}.{anatomy.mlp_name}:output")
    router = anatomy.router(index)
    if router:
        from .capture import ROUTER_ROLES

        names += [f"{router}:{role}" for role in ROUTER_ROLES]
    return names


def _forward(loaded: LoadedLayer, module: nn.Module, x: torch.Tensor, source: LayerSource,
             wanted: list[str], who: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One layer on one prompt [1, T, H]: output [1, T, H] and the hooked tensors by name."""
    seq = x.shape[1]
    position_ids = torch.arange(seq, device=x.device)[None]  # [1, T]
    mask = loaded.attention_mask(x, position_ids)
    position_embeddings = loaded.position_embeddings(x, position_ids)
    caught: dict[str, torch.Tensor] = {}
    handles = _hooks(module, source, loaded.index, wanted, caught)
    try:
        out = module(x, attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings)
    finally:
        for h in handles:
            h.remove()
    y = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != tuple(x.shape):
        what = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise UserError(f"{who} returned {what} for an input of shape {tuple(x.shape)}: "
                        "a decoder layer must return its hidden states in the input's shape [batch, seq, hidden]")
    return y, caught


def _hooks(module: nn.Module, source: LayerSource, index: int, wanted: list[str], caught: dict) -> list:
    """Forward hooks on the layer's attention, MLP and router, where the module has them."""
    anatomy = source.anatomy
    layer = anatomy.layer(index)
    handles = []

    def first(out):
        return out[0] if isinstance(out, (tuple, list)) else out

    def add(rel: str | None, fn) -> None:
        if not rel:
            return
        try:
            target = module.get_submodule(rel)
        except AttributeError:
            return  # a candidate without this submodule: only its output is compared
        handles.append(target.register_forward_hook(lambda _m, args, out: fn(args, out)))

    if f"{layer}.{anatomy.attn_name}:output" in wanted:
        add(anatomy.attn_name, lambda _a, out: caught.__setitem__(f"{layer}.{anatomy.attn_name}:output", first(out)[0]))
    if f"{layer}.{anatomy.mlp_name}:output" in wanted:
        add(anatomy.mlp_name, lambda _a, out: caught.__setitem__(f"{layer}.{anatomy.mlp_name}:output", first(out)[0]))
    router = anatomy.routers[index]
    if router and any(n.startswith(f"{layer}.{router}:") for n in wanted):
        path = f"{layer}.{router}"
        add(router, lambda args, out: caught.update(
            {k: v for k, v in router_tensors(path, args, out).items() if k in wanted}))
    return handles


def router_tensors(router_path: str, args, out) -> dict[str, torch.Tensor]:
    """A router call as FORMAT.md names it, the way capture.py reads it: `router_logits` [seq,
    experts], `score_bias` [experts] (float32, where the router is given a selection bias),
    `topk_weights` [seq, k] (float32) and `topk_ids` [seq, k] (int32), for one prompt."""
    from .capture import ROUTER_ROLES, STORE_DTYPES, router_outputs

    found = {}
    for role, t in zip(ROUTER_ROLES, router_outputs(args, out)):
        if not isinstance(t, torch.Tensor):
            continue
        t = t.to(STORE_DTYPES[role]) if role in STORE_DTYPES else t
        found[f"{router_path}:{role}"] = t if role == "score_bias" else t.reshape(-1, t.shape[-1])
    return found
