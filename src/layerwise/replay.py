"""Replaying decoder layers on a reference run's recorded inputs, under candidate settings.

`replay(model, reference, layers, options, isolated=DIR, chained=DIR)` loads one decoder layer at
a time (layer_loading.py, never the whole model) and runs it on the reference's prompts:

- isolated: feeds layer K the reference's recorded `model.layers.K:input`. What comes out
  differs from the reference's `model.layers.K:output` only by layer K's own error.
- chained: feeds layer A the recorded input of A, then each next layer the previous one's
  output. What comes out carries the error accumulated from A on (the propagated error).

The prompts run in the reference's own batches (the same prompts together, the same width, the
padding positions' recorded inputs `model.layers.K:input_padding` put back), through the same
per-layer forward and capture as a streamed extract (streaming.run_layer: transformers' masks,
positions 0..T-1, the model's rotary embedding). On the same device and settings a layer's
replay is therefore the same computation as in the reference, bit for bit: a model tested
against its own reference gives exactly 0, and any error seen is the candidate's. Where a kernel
is nondeterministic, the first layer is run twice on its first batch and the floor reported
(`deterministic=True` asks torch for deterministic kernels).

The layer is the transformers layer, `--quant fp8` (its projections in W8A8 FP8, fp8.py), or
the user's `--candidate package.module:factory`: `factory(config, layer_index, weights) ->
nn.Module`, where `weights` are the layer's tensors by HF name relative to the layer, and the
module has the HF layer's call signature. This module knows nothing about metrics, tolerances
or reports.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import importlib.util
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import capture, models, timings
from .errors import CandidateError, UserError, origin, user_code
from .layer_loading import LayerOptions, LayerSource, LoadedLayer, open_layers
from .machine import usable_device
from .names import INPUT, tensor_name
from .recording import Recording, config_sha256, model_record, nonfinite_notes
from .runs import Intent, Run, library_versions, open_run
from .rebatch import (deterministic, ReadAhead, head_start, input_of, layer_capture_bytes, recorded_points,
                      reference_batches, run_twice)
from .streaming import run_layer
from .timings import Timings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplayOptions:
    dtype: str | None = None  # None: the reference run's dtype
    attn_implementation: str | None = None  # None: the reference run's
    device: str | None = None  # None: cuda:0 when a GPU is present, else cpu
    candidate: str | None = None  # "package.module:factory" or "path/file.py:factory"
    quant: str | None = None  # FP8 checkpoints: "dequantize" or "fp8" (None: the reference's)
    fp8_backend: str | None = None  # None: not chosen (quant.DEFAULT_FP8_BACKEND)
    allow_config_mismatch: bool = False  # the model is a variant of the reference's (quantized, converted)
    overwrite: bool = False
    deterministic: bool = False  # torch.use_deterministic_algorithms for the replay
    check_determinism: bool = True  # run the first layer's first batch twice and compare


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
    deterministic: bool | None = None  # the first layer ran twice bit-identically (None: not checked)
    floor_rel_l2: float = 0.0  # when not: rel_l2 between the two identical runs


# ------------------------------------------------------------------------------ the candidate

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
        where = f" at {origin(err)}" if not isinstance(err, (ImportError, SyntaxError)) else ""
        raise UserError(f"--candidate {spec}: cannot import {module_name} ({type(err).__name__}: {first}{where}); "
                        "check the module path and PYTHONPATH") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise UserError(f"--candidate {spec}: {module_name} has no attribute {attr}")
    if not callable(factory):
        raise UserError(f"--candidate {spec}: {attr} is a {type(factory).__name__}, not callable; "
                        "it must be factory(config, layer_index, weights) -> nn.Module")
    return factory


# ------------------------------------------------------------------------------ checks

def check_reference(run: Run, source: LayerSource, layers: list[int], chained: bool,
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
            name = tensor_name(source.anatomy.layer(index), INPUT)
            if not run.has(name, prompt["index"]):
                points = (run.manifest.get("settings") or {}).get("points") or []
                why = (" (--points output keeps layer outputs only; a layer test needs each layer's input)"
                       if "output" in points and "residual" not in points else "")
                raise UserError(f"{where} has no {name} for prompt {prompt['index']}{why}: re-extract it with "
                                "--points residual (the residual stream of every layer: inputs and outputs)")
    return notes


def config_hashes(source: LayerSource) -> set[str]:
    """config_sha256 of the model's config as layerwise loads it, with and without the numerics
    fixes (a run may have been hashed either way)."""
    hashes = {config_sha256(source.config)}
    raw = copy.deepcopy(source.config)
    params = getattr(raw, "rope_parameters", None)
    if any(f.name == "partial-rope" for f in source.fixes) and isinstance(params, dict):
        params.pop("partial_rotary_factor", None)
        hashes.add(config_sha256(raw))
    return hashes


# ------------------------------------------------------------------------------ running

@dataclass
class _Track:
    """One output run: where its layer inputs come from and where its tensors go."""

    kind: str  # "isolated" | "chained"
    recording: Recording
    carry: list[torch.Tensor] = field(default_factory=list)  # chained: the previous layer's output per batch


def replay(model: str, reference: str | os.PathLike | Run, layers: list[int],
           options: ReplayOptions = ReplayOptions(), isolated: str | os.PathLike | None = None,
           chained: str | os.PathLike | None = None, source: LayerSource | None = None,
           schedule=None) -> ReplayResult:
    """Run `layers` on the reference's recorded inputs and write the isolated and/or chained runs.
    `source`: layers from somewhere else than `model`'s checkpoint (tensors in memory). `schedule`:
    runs the layers instead of `_run_layers` (pipeline.Pipeline: over the ranks of a torchrun job,
    its `ranks` then recording the runs together)."""
    if isolated is None and chained is None:
        raise ValueError("replay needs an isolated and/or a chained output directory")
    layers = list(layers)
    if chained is not None and layers != list(range(layers[0], layers[-1] + 1)):
        raise UserError("chained layers must be a contiguous range A-B")
    run = reference if isinstance(reference, Run) else open_run(reference)
    factory = load_candidate(options.candidate) if options.candidate else None
    if source is None:
        settings = resolve_settings(run.manifest.get("settings") or {}, options)
        source = open_layers(model, LayerOptions(settings["dtype"], settings["device"],
                                                 settings["attn_implementation"], settings["quant"],
                                                 options.fp8_backend))
        timings.mark("layers opened")
    else:
        settings = {"dtype": models.dtype_name(source.dtype), "attn_implementation": source.options.attn_implementation,
                    "device": str(source.device), "candidate": options.candidate, "quant": source.quant_mode}
    try:
        outputs = {kind: path for kind, path in (("isolated", isolated), ("chained", chained)) if path is not None}
        return _replay(run, source, settings, layers, options, factory, outputs, schedule or _run_layers)
    finally:
        source.close()


def _replay(run: Run, source: LayerSource, settings: dict, layers: list[int], options: ReplayOptions,
            factory: Callable | None, outputs: dict, schedule: Callable) -> ReplayResult:
    for index in layers:
        source.check_index(index)
    notes = check_reference(run, source, layers, "chained" in outputs, options.allow_config_mismatch)
    batches, padded = reference_batches(run, source.anatomy.layer(layers[0]))
    timings.mark("reference checked")
    if not padded:
        notes.append("the reference has no padding tails (made before layerwise recorded them, or imported): "
                     "padded positions are replayed as zeros, so MoE layers in padded batches may differ "
                     "from the reference by rounding")
    targets = capture.plan_targets(source.anatomy, recorded_points(run, source, layers), tuple(layers))
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        intent = functools.partial(test_intent, source, settings, layers, reference_of(run), _batch_size(run),
                                   run.prompts)
        tracks = [_Track(kind, stack.enter_context(Recording(path, intent(kind), targets, options.overwrite,
                                                               ranks=getattr(schedule, "ranks", None))))
                  for kind, path in outputs.items()]
        timings.mark("runs started")
        with deterministic(options.deterministic), torch.inference_mode():
            load_seconds, bytes_read, determinism = schedule(run, source, layers, batches, tracks, targets,
                                                                options, factory)
        return finish_tracks(tracks, settings, layers, notes, start, load_seconds, bytes_read, determinism)


def finish_tracks(tracks: list[_Track], settings: dict, layers: list[int], notes: list[str], start: float,
                  load_seconds: float, bytes_read: int, determinism: tuple[bool | None, float],
                  extra: dict | None = None) -> ReplayResult:
    """Every track's tensors out and its manifest written (`extra` beside the intent); the result."""
    found = []  # NaN/Inf the layers produced, per output run
    for track in tracks:
        track.recording.close_capture()
        track.recording.finish({"producer": "layerwise test", "notes": notes, **(extra or {}), "stats": {
                                "seconds": time.perf_counter() - start, "load_seconds": load_seconds,
                                "bytes_read": bytes_read},
                                "determinism": {"checked": determinism[0] is not None,
                                                "bit_identical": determinism[0], "floor_rel_l2": determinism[1]}})
        found += [f"{track.kind} run: {n}" for n in nonfinite_notes(track.recording.manifest)]
    notes = [*notes, *found]
    if determinism[0] is False:
        notes.append(f"nondeterministic kernels: layer {layers[0]} run twice on the same input differs by rel_l2 "
                     f"{determinism[1]:.2e} (the floor below which errors are noise); try --deterministic")
    paths = {t.kind: Path(t.recording.writer.target) for t in tracks}
    return ReplayResult(tuple(layers), paths.get("isolated"), paths.get("chained"), settings,
                        time.perf_counter() - start, load_seconds, bytes_read, tuple(notes), *determinism)


def _run_layers(run: Run, source: LayerSource, layers: list[int], batches, tracks: list[_Track], targets,
                options: ReplayOptions, factory: Callable | None) -> tuple[float, int, tuple[bool | None, float]]:
    """Each layer once, loaded alone, over every batch of every track; layer K+1 is read while
    layer K is built and computes. Returns the seconds spent reading and building layers
    (overlapped with compute), the bytes read and (bit-identical, floor rel_l2) of the
    determinism check; the phases' seconds go into the tracks' stats (Timings)."""
    load_seconds, bytes_read = 0.0, 0
    determinism: tuple[bool | None, float] = (None, 0.0)
    clock = Timings()
    inputs = any(t.kind == "isolated" for t in tracks)  # else the chain needs its first layer's alone
    with ReadAhead(clock, source, run, batches) as reader:
        pending = reader.submit(layers[0], True)
        with ThreadPoolExecutor(1, thread_name_prefix="layerwise-warm") as warmer, clock("warm_wait", layers[0]):
            warmer.submit(head_start, clock, source, layers[0], tuple(batches[0].attention_mask.shape),
                          layer_capture_bytes(run, source.anatomy.layer(layers[0]), len(tracks))).result()
        for i, index in enumerate(layers):
            with clock("read_wait", index):
                weights, stacked = reader.result(pending)
            if i + 1 < len(layers):  # layer K+1 is read while K is built and run: at most ~3 layers resident
                pending = reader.submit(layers[i + 1], inputs)
            with clock("build", index):
                loaded = source.build(weights)
            weights.tensors.clear()  # the raw tensors go now (built K, raw K+1 being read)
            del weights
            load_seconds += loaded.seconds
            bytes_read += loaded.bytes_read
            with clock("compute", index):
                path = source.anatomy.layer(index)
                checked = test_layer(source, loaded, i == 0 and options.check_determinism, batches, tracks, targets,
                                     options, factory, lambda b: input_of(stacked, run, path, b, source.dtype,
                                                                          source.device))
            determinism = checked or determinism
            del loaded, stacked
    timings.mark("layers computed")
    clock.into(tracks)
    return load_seconds, bytes_read, determinism


def test_layer(source: LayerSource, loaded: LoadedLayer, check: bool, batches, tracks: list[_Track], targets,
               options: ReplayOptions, factory: Callable | None, inputs: Callable) -> tuple[bool, float] | None:
    """One built layer (or the candidate made of it) on every track: the isolated one (and a chain
    at its first layer) fed `inputs(batch)`, the batch's input as the reference computed it, on the
    device in the candidate's dtype; a chain after its first layer its own last outputs. With
    `check`, run twice on the first batch first and return (bit-identical, floor rel_l2)."""
    index = loaded.index
    module = _candidate(factory, options.candidate, source, loaded) if factory else loaded.module
    who = f"--candidate {options.candidate}: layer {index}" if factory else f"layer {index}"
    path = source.anatomy.layer(index)
    mine = [t for t in targets if t.group == path]
    # what a candidate's forward raises fails the test (exit 1) in one line naming its own code
    with user_code(f"{who} raised", CandidateError) if factory else contextlib.nullcontext():
        twice = run_twice(loaded, module, inputs(batches[0]), batches[0], who) if check else None
        for track in tracks:
            if track.kind == "isolated" or not track.carry:
                hidden = [inputs(b) for b in batches]
            else:
                hidden = track.carry
            out = run_layer(loaded, module, path, batches, hidden, track.recording.collector, mine,
                            str(source.device), who)
            if track.kind == "chained":
                track.carry = out
    return twice


def resolve_settings(ref: dict, options: ReplayOptions) -> dict:
    """The candidate settings: what the user gave, else the reference's own (its run's settings)."""
    dtype = options.dtype or ref.get("dtype") or models.DEFAULT_DTYPE
    models.parse_dtype(dtype)
    device = usable_device(options.device)
    return {"dtype": models.dtype_name(models.parse_dtype(dtype)),
            "attn_implementation": models.reference_attention(options.attn_implementation,
                                                              ref.get("attn_implementation")),
            "device": device, "candidate": options.candidate, "quant": options.quant or ref.get("quant")}


def reference_of(run: Run) -> dict:
    """A test run's "reference": the run it replays."""
    return {"path": str(run.path), "created": run.manifest.get("created")}


def _batch_size(run: Run) -> int:
    return (run.manifest.get("settings") or {}).get("batch_size") or 1


def test_intent(source: LayerSource, settings: dict, layers: list[int], reference: dict, batch_size: int,
                prompts: list[dict], kind: str) -> Intent:
    """What a test's `kind` ("isolated", "chained") run is: `layers` of the model under the
    candidate `settings`, on `reference`'s prompts in its batches of `batch_size`."""
    return Intent(
        producer="layerwise test",
        model=model_record(source.ref, source.config, source.architecture, source.anatomy.num_layers),
        settings={**settings, "replay": kind, "layers": layers, "batch_size": batch_size},
        reference=reference,
        anatomy=asdict(source.anatomy.layout),
        prompts=prompts,
        fixes=[vars(f) for f in source.fixes],
        versions=library_versions(),
    )


def _candidate(factory: Callable, spec: str, source: LayerSource, loaded: LoadedLayer) -> nn.Module:
    # The full config, with the attention implementation the candidate settings chose (a factory
    # building transformers' own modules must not fall back to another one, whose mask differs).
    config = copy.deepcopy(source.config)
    config._attn_implementation = loaded.config._attn_implementation
    if hasattr(loaded.config, "_experts_implementation"):  # transformers >= 5.2x picks a fused MoE kernel
        config._experts_implementation = loaded.config._experts_implementation
    with user_code(f"--candidate {spec}: the factory raised building layer {loaded.index}"):
        module = factory(config, loaded.index, loaded.weights())
    if not isinstance(module, nn.Module):
        raise UserError(f"--candidate {spec} returned {type(module).__name__} for layer {loaded.index}, "
                        "not a torch.nn.Module")
    return module.eval()
