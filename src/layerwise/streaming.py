"""Streaming: run a model whose weights do not fit, one decoder layer at a time.

`stream_extract` computes the same run as `extract`, on one device, without ever holding more
than about two layers of weights: the embedding runs for every batch, then layer 0 for every
batch, then layer 1, ... then the final norm and the head. Each layer is read straight from the
safetensors shards onto the device (layer_loading.py); while layer K computes, a background
thread reads layer K+1 (I/O only; building the module stays on this thread), so about two
layers of weights are resident at a time. The hidden states
between layers stay on the device (or in pinned host memory when they would crowd it). Batches,
masks, positions and rotary embeddings are those of the whole-model forward, so the tensors are
bit-identical to `extract` on the same device and dtype (tested). Like `extract`, a rerun
computes only the batches not complete on disk, and under torchrun each rank streams the whole
model over its share of the batches (extract.todo_batches).

The decoder loop assumed is transformers' standard one: embedding -> layers -> final norm ->
head, nothing in between. Models that scale or mix between those steps are refused.
Captures go through the same hooks and writer as `extract`.

`rehearse` runs a miniature of a layer (its class and dimensions, as many experts as a token
routes to, random weights) once while the real layer is read: a process's first forward pass on a
GPU loads every kernel it uses, about half a second for a MiniMax-M2 layer on an H200, and that
is then paid off the path (the layer tests use it too).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field

import torch

from . import capture, distributed, models, timings
from .errors import UserError
from .extract import ExtractOptions, extract_intent, pin_ahead, pin_head_ahead, prepare, record, todo_batches
from .layer_loading import LayerOptions, LayerSource, LoadedLayer, one_layer_config, open_layers
from .loading import load_tokenizer
from .machine import usable_device
from .names import stage_of
from .quiet import quiet_transformers
from .recording import ExtractResult, Progress
from .runs import library_versions
from .timings import Timings

log = logging.getLogger(__name__)

# Architectures whose forward does more than embed -> layers -> norm -> head (scaled embeddings,
# per-layer inputs, ...): streaming them would silently differ from the real model.
_NOT_STREAMABLE = ("gemma", "gemma2", "gemma3", "gemma3_text", "gemma3n", "falcon_h1", "granite", "granitemoe")


@dataclass(frozen=True)
class StreamOptions:
    device: str | None = None  # None: cuda:0 when a GPU is present, else cpu
    dtype: str = models.DEFAULT_DTYPE
    attn_implementation: str | None = None
    quant: str | None = None  # FP8 checkpoints: "dequantize" (default) or "fp8"
    fp8_backend: str | None = None  # None: not chosen (quant.DEFAULT_FP8_BACKEND)
    prefetch: bool = True  # read layer K+1 while layer K computes
    activations_on_device_fraction: float = 0.25  # above this share of free device memory, keep them on the host


@dataclass(frozen=True)
class StreamStats:
    weights_read_bytes: int
    read_seconds: float  # time spent in reads (overlapped with compute when prefetching)
    wait_seconds: float  # time the compute thread waited for a layer's weights
    peak_device_bytes: int


def stream_extract(spec: str, out, items, options: ExtractOptions = ExtractOptions(),
                   stream: StreamOptions = StreamOptions(), progress=None,
                   source: LayerSource | None = None, alongside=None) -> tuple[ExtractResult, StreamStats]:
    """`source`: layers from somewhere else than `spec`'s checkpoint (tensors in memory); its
    device and dtype win over `stream`'s. `alongside` (joint.Alongside): a layer test fed by this
    stream, each layer's weights and inputs handed to it (every batch computed: no resume)."""
    if options.modules:
        raise UserError("--modules is not available with --stream: extract without --stream to capture any module")
    if source is None:
        source = open_layers(spec, LayerOptions(dtype=stream.dtype, device=usable_device(stream.device),
                                                attn_implementation=stream.attn_implementation, quant=stream.quant,
                                                fp8_backend=stream.fp8_backend))
        timings.mark("layers opened")
    if source.device.type == "cuda":
        pin_ahead(options)
    try:
        return _stream(source, out, items, options, stream, progress, alongside)
    finally:
        source.close()


@dataclass
class _Reads:
    """The weights read so far, how long the compute thread waited for them, and the clock of each
    layer's read, build and compute (its GPU work done), the norm and head's as layer N (the number
    of layers): the run's stats `timeline`, as a layer test's."""

    bytes: int = 0
    seconds: float = 0.0
    wait_seconds: float = 0.0
    clock: Timings = field(default_factory=Timings)


def _stream(source: LayerSource, out, items, options: ExtractOptions, stream: StreamOptions,
            progress, alongside=None) -> tuple[ExtractResult, StreamStats]:
    device = str(source.device)
    config, anatomy = source.config, source.anatomy
    if config.model_type in _NOT_STREAMABLE:
        raise UserError(f"{config.model_type} models do more than embed -> layers -> norm -> head in their forward: "
                        "streaming would not reproduce them; use extract without --stream")
    points, layers, prompts, batches = prepare(load_tokenizer(source.ref), config, anatomy, items, options)
    if source.device.type == "cuda":
        pin_head_ahead(options, points, batches, config.vocab_size, source.dtype)
    targets = capture.plan_targets(anatomy, points, layers)
    settings = {"dtype": str(source.dtype).removeprefix("torch."),
                "attn_implementation": source.options.attn_implementation, "device_map": device,
                "quant": source.quant_mode}
    intent = extract_intent(source.ref, config, source.architecture, anatomy, prompts, points, layers, options,
                            settings)
    by_stage: dict = {}
    for t in targets:
        by_stage.setdefault(stage_of(t.module, anatomy.layout), []).append(t)
    reads = _Reads()

    def layer_done(k: int) -> None:
        if progress is not None:
            progress(Progress(k + 1, anatomy.num_layers, 0, len(prompts), run.writer.bytes_written, run.elapsed()))

    with record(out, intent, targets, options, distributed.session()) as run, contextlib.ExitStack() as stack:
        # under torchrun: this rank's share; a test alongside needs every batch's inputs (no resume)
        todo, mine = todo_batches(run, batches, distributed.session(), resume=alongside is None)
        timings.mark("run started")
        if alongside is not None:  # its runs finish after this one's manifest (the stack exits first)
            stack.enter_context(alongside.recording(intent, mine, points))
        if device.startswith("cuda"):
            torch.cuda.init()  # a fresh process: the memory statistics need CUDA initialised
            torch.cuda.reset_peak_memory_stats(torch.device(device))
        with torch.inference_mode():
            if mine:
                hidden = _embed(source, mine, run.collector, by_stage.get("embed", []), stream)
                final = by_stage.get("final", [])  # nothing captured after the layers: no norm, no head
                hidden, shared = _decoder_layers(source, mine, hidden, run, by_stage, stream, reads, layer_done,
                                                 alongside, tail=bool(final))
                timings.mark("layers computed")
                if final:
                    start = time.perf_counter()
                    _norm_and_head(source, mine, hidden, run.collector, final, shared)
                    reads.clock.until_done("compute", anatomy.num_layers, start, source.device)
                    timings.mark("head computed")
        seconds = run.close_capture()
        reads.clock.settle()
        run.timings.update({**reads.clock.stats(), "startup": timings.startup()})  # this rank's, into its stats
        peak = torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else 0
        run.finish({
            "placement": {"": device}, "fixes": [asdict(f) for f in source.fixes], "versions": library_versions(),
            "stats": {"seconds": seconds, "streamed": True,
                      "batches": len(batches), "batches_computed": len(todo),
                      "weights_read_bytes": reads.bytes, "weights_read_seconds": reads.seconds,
                      "weights_wait_seconds": reads.wait_seconds, "peak_device_bytes": peak},
        })
    return (run.result(len(prompts), seconds - reads.wait_seconds, resumed_batches=len(batches) - len(todo)),
            StreamStats(reads.bytes, reads.seconds, reads.wait_seconds, peak))


def _embed(source: LayerSource, batches, collector, targets, stream: StreamOptions) -> list[torch.Tensor]:
    """The embedding of every batch, captured; parked where the decoder layers will read it."""
    device = str(source.device)
    embed = source.load_shared(("embed",))["embed"]
    hidden = []
    with capture.Capture(None, targets, collector, resolve={source.anatomy.embed_path: embed}.__getitem__):
        for batch in batches:
            collector.start_batch(batch)
            hidden.append(embed(batch.input_ids.to(device)))
    return _park(hidden, device, stream.activations_on_device_fraction)


def _decoder_layers(source: LayerSource, batches, hidden, run, by_stage: dict, stream: StreamOptions,
                    reads: _Reads, done, alongside=None, tail: bool = False) -> tuple[list[torch.Tensor], dict | None]:
    """Every decoder layer over every batch, one layer at a time; the next one is read in the
    background while this one computes (with `stream.prefetch`), and after the last one the final
    norm and head (with `tail`: returned beside the hidden states, else None). `done(k)` after
    layer k; `alongside.layer(k, weights, inputs)` after layer k ran, before its raw weights go."""
    anatomy, device, clock = source.anatomy, str(source.device), reads.clock
    n = anatomy.num_layers
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(clock.timed, "read", 0, source.read, 0)
        if batches:  # the first forward pass's one-off costs, paid while layer 0 is read
            with clock("rehearse", 0):
                rehearse(source, 0, tuple(batches[0].attention_mask.shape))
            if alongside is not None:
                alongside.rehearse(tuple(batches[0].attention_mask.shape))
        for k in range(n):
            t0 = time.perf_counter()
            with clock("read_wait", k):
                weights = pending.result()
            reads.wait_seconds += time.perf_counter() - t0
            reads.seconds += weights.seconds
            reads.bytes += weights.bytes_read
            with clock("build", k):
                layer = source.build(weights)
            if alongside is None:
                weights.tensors.clear()  # the raw tensors go now, not at some later garbage collection,
                del weights  # before the next layer's arrive: ~2 layers resident
            last = k + 1 == n
            if stream.prefetch and not last:
                pending = pool.submit(clock.timed, "read", k + 1, source.read, k + 1)  # overlaps this layer's compute
            elif stream.prefetch and tail:  # the head (1.2 GB for MiniMax-M2) read while the last layer runs
                pending = pool.submit(clock.timed, "read", n, source.load_shared, ("norm", "head"))
            start = time.perf_counter()
            inputs, hidden = hidden, run_layer(layer, layer.module, anatomy.layer(k), batches, hidden,
                                               run.collector, by_stage.get(k, []), device)
            clock.until_done("compute", k, start, source.device)
            del layer
            if alongside is not None:
                alongside.layer(k, weights, inputs)  # the candidate, built from the same tensors
                weights.tensors.clear()
                del weights
            del inputs
            if not stream.prefetch and not last:
                pending = pool.submit(clock.timed, "read", k + 1, source.read, k + 1)
            done(k)
        shared = None
        if tail and stream.prefetch:
            with clock("read_wait", n):
                shared = pending.result()
        elif tail:  # after the layers, here
            shared = clock.timed("read", n, source.load_shared, ("norm", "head"))
    return hidden, shared


def _norm_and_head(source: LayerSource, batches, hidden, collector, targets, shared: dict) -> None:
    """The final norm (if the model has one) and the head (`shared`, from load_shared) over every
    batch, captured."""
    norm, head = shared.get("norm"), shared["head"]
    by_module = {source.anatomy.head_path: head}
    if norm is not None:
        by_module[source.anatomy.norm_path] = norm
    with capture.Capture(None, targets, collector, resolve=by_module.__getitem__):
        for batch, h in zip(batches, hidden):
            collector.start_batch(batch)
            h = h.to(source.device, non_blocking=True)
            head(norm(h) if norm is not None else h)


def _park(hidden: list[torch.Tensor], device: str, fraction: float) -> list[torch.Tensor]:
    """Keep the between-layer activations on the device unless they would take more than
    `fraction` of its free memory; then in pinned host memory, moved per batch."""
    if not device.startswith("cuda"):
        return hidden
    total = sum(h.numel() * h.element_size() for h in hidden)
    free, _ = torch.cuda.mem_get_info(device)
    if total <= fraction * free:
        return hidden
    log.info("activations (%.1f GB) kept in host memory", total / 1e9)
    return [h.to("cpu").pin_memory() for h in hidden]


def run_layer(layer, module, path: str, batches, hidden, collector, targets, device: str,
              who: str | None = None) -> list[torch.Tensor]:
    """Decoder layer `layer` (run as `module`: its own module or a candidate built from it) over
    every batch, with the masks, positions and rotary embeddings transformers' own model gives it;
    `targets` (under module path `path`) are captured into `collector`, those a candidate lacks are
    recorded as absent. Returns the outputs, where the inputs were (device or pinned host)."""
    by_module, present, absent = {}, [], []
    for t in targets:
        rel = t.module[len(path) + 1:]
        try:
            by_module[t.module] = module if t.module == path else module.get_submodule(rel)
            present.append(t)
        except AttributeError:
            absent.append(t)  # a candidate without this submodule: only its output is compared
    out = []
    with capture.Capture(None, present, collector, resolve=by_module.__getitem__):
        for batch, h in zip(batches, hidden):
            collector.start_batch(batch)
            on_host = h.device.type == "cpu" and device != "cpu"
            x = h.to(device, non_blocking=True)
            y = forward_layer(layer, module, x, batch.attention_mask, who or path)
            for t in absent:
                collector.take(t, [None] * len(t.names))
            out.append(y.to("cpu", non_blocking=True) if on_host else y)
    by_module.clear()  # no reference to this layer may outlive it: the next one is built next
    return out


def forward_layer(layer, module, x: torch.Tensor, padding_mask: torch.Tensor, who: str) -> torch.Tensor:
    """One batch [B, T, H] through a decoder layer as the whole model runs it: positions 0..T-1,
    the mask transformers builds for the layer's type from the padding mask, the model's rotary
    embedding. A candidate returning anything but [B, T, H] is a UserError naming `who`."""
    position_ids = torch.arange(x.shape[1], device=x.device)[None]
    mask = layer.attention_mask(x, position_ids, padding_mask.to(x.device))
    y = module(x, attention_mask=mask, position_ids=position_ids,
               position_embeddings=layer.position_embeddings(x, position_ids))
    y = y[0] if isinstance(y, (tuple, list)) else y
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != tuple(x.shape):
        what = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise UserError(f"{who} returned {what} for an input of shape {tuple(x.shape)}: a decoder layer "
                        "must return its hidden states in the input's shape [batch, seq, hidden]")
    return y


REHEARSE_ON = ("cuda",)  # device types whose first forward pass is worth rehearsing (tests add "cpu")
# a miniature's experts: enough for every routed slot of a token (top-k) to find a different one
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def rehearse(source, index: int, shape: tuple[int, int]) -> bool:
    """On a GPU: `miniature_pass` of layer `index` over a batch of `shape` (batch, tokens). The first
    forward pass of a process loads every kernel it uses (CUDA loads modules lazily) and makes
    cuBLAS's and the attention's first choices; paid here, while the first real layer is still being
    read, it stays off the test's path. Returns False, logging why, where it did not run: it is only
    a head start, and the real layer reports its own errors."""
    if source.device.type not in REHEARSE_ON:
        return False
    try:
        miniature_pass(source, index, shape)
        if source.device.type == "cuda":
            torch.cuda.synchronize(source.device)
        return True
    except Exception as err:  # noqa: BLE001 - see above
        log.debug("no rehearsal of layer %d: %s", index, err)
        return False


def miniature_pass(source, index: int, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.nn.Module]:
    """Layer `index`'s class, built on the source's device from its one-layer config with as many
    experts as a token routes to (random weights; under 0.3 GB for MiniMax-M2), run once over
    random hidden states of `shape` as the test runs a layer (transformers' mask and rotary
    embedding), then dropped. Its own module and its own random generator: the test's numerics
    and the process's random state are untouched. Returns the output and the miniature layer."""
    config = one_layer_config(source.config, index)
    top_k = getattr(config, "num_experts_per_tok", None)
    for key in _EXPERT_COUNT_KEYS:
        count = getattr(config, key, None)
        if isinstance(top_k, int) and isinstance(count, int) and count > top_k:
            setattr(config, key, top_k)
    for key in ("n_group", "topk_group"):  # grouped routing (DeepSeek): one group of them all
        if isinstance(getattr(config, key, None), int):
            setattr(config, key, 1)
    kwargs = {"dtype": source.dtype}
    if source.options.attn_implementation:
        kwargs["attn_implementation"] = source.options.attn_implementation
    devices = [source.device] if source.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), quiet_transformers(), torch.device(source.device):
        torch.manual_seed(0)
        model = models.model_class(config)._from_config(config, **kwargs).eval()
        rotary = model.get_submodule(source.anatomy.rotary_path) if source.anatomy.rotary_path else None
        layer = LoadedLayer(index, model.get_submodule(f"{source.anatomy.layers_path}.0"), rotary, model.config,
                            source.layer_type(index), 0, 0.0)
        x = torch.randn(*shape, config.hidden_size, dtype=source.dtype)
        with torch.inference_mode():
            y = forward_layer(layer, layer.module, x, torch.ones(shape, dtype=torch.long), f"layer {index}")
    return y, layer.module
