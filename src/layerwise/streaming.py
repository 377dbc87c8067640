"""Streaming: run a model whose weights do not fit, one decoder layer at a time.

`stream_extract` computes the same run as `extract`, on one device, without ever holding more
than about two layers of weights: the embedding runs for every batch, then layer 0 for every
batch, then layer 1, ... then the final norm and the head. Each layer is read straight from the
safetensors shards onto the device (layer_loading.py); while layer K computes, a background
thread reads layer K+1 (I/O only; building the module stays on this thread), so about two
layers of weights are resident at a time. The hidden states
between layers stay on the device (or in pinned host memory when they would crowd it). Batches,
masks, positions and rotary embeddings are those of the whole-model forward, so the tensors are
bit-identical to `extract` on the same device and dtype (tested).

The decoder loop assumed is transformers' standard one: embedding -> layers -> final norm ->
head, nothing in between. Models that scale or mix between those steps are refused.
Captures go through the same hooks and writer as `extract`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import resource
import time
from dataclasses import asdict, dataclass

import torch

from . import capture, runs
from .errors import UserError
from .extract import ExtractOptions, ExtractResult, Progress, prepare, run_intent
from .layer_loading import LayerOptions, LayerSource, open_layers
from .loading import load_tokenizer

log = logging.getLogger(__name__)

# Architectures whose forward does more than embed -> layers -> norm -> head (scaled embeddings,
# per-layer inputs, ...): streaming them would silently differ from the real model.
_NOT_STREAMABLE = ("gemma", "gemma2", "gemma3", "gemma3_text", "gemma3n", "falcon_h1", "granite", "granitemoe")


@dataclass(frozen=True)
class StreamOptions:
    device: str | None = None  # None: cuda:0 when a GPU is present, else cpu
    dtype: str = "bf16"
    attn_implementation: str | None = None
    quant: str | None = None  # FP8 checkpoints: "dequantize" (default) or "fp8"
    fp8_backend: str = "auto"
    prefetch: bool = True  # read layer K+1 while layer K computes
    activations_on_device_fraction: float = 0.25  # above this share of free device memory, keep them on the host


@dataclass(frozen=True)
class StreamStats:
    weights_read_bytes: int
    read_seconds: float  # time spent in reads (overlapped with compute when prefetching)
    wait_seconds: float  # time the compute thread waited for a layer's weights
    peak_device_bytes: int


def _default_device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def stream_extract(spec: str, out, items, options: ExtractOptions = ExtractOptions(),
                   stream: StreamOptions = StreamOptions(), progress=None,
                   source: LayerSource | None = None) -> tuple[ExtractResult, StreamStats]:
    """`source`: layers from somewhere else than `spec`'s checkpoint (tensors in memory); its
    device and dtype win over `stream`'s."""
    if options.modules:
        raise UserError("--modules is not available with --stream: extract without --stream to capture any module")
    if source is None:
        source = open_layers(spec, LayerOptions(dtype=stream.dtype, device=stream.device or _default_device(),
                                                attn_implementation=stream.attn_implementation, quant=stream.quant,
                                                fp8_backend=stream.fp8_backend))
    device = str(source.device)
    config, anatomy = source.config, source.anatomy
    if config.model_type in _NOT_STREAMABLE:
        raise UserError(f"{config.model_type} models do more than embed -> layers -> norm -> head in their forward: "
                        "streaming would not reproduce them; use extract without --stream")
    tokenizer = load_tokenizer(source.ref)
    points, layers, prompts, batches = prepare(tokenizer, config, anatomy, items, options)
    targets = capture.plan_targets(anatomy, points, layers)
    settings = {"dtype": str(source.dtype).removeprefix("torch."),
                "attn_implementation": source.options.attn_implementation, "device_map": device,
                "quant": source.quant_mode}
    intent = run_intent(source.ref, config, source.architecture, anatomy, prompts, points, layers, options,
                        settings)
    writer = runs.RunWriter(out, intent, options.overwrite, threads=options.writer_threads,
                            queue_depth=options.queue_depth)
    collector = capture.Collector(writer, targets, int(options.pinned_budget_gib * 2**30))
    by_module: dict[str, torch.nn.Module] = {}  # the modules the hooks of the embedding and head go on
    by_stage: dict = {}
    for t in targets:
        by_stage.setdefault(_stage_of(t.module, anatomy), []).append(t)
    start = time.perf_counter()
    if device.startswith("cuda"):
        torch.cuda.init()  # a fresh process: the memory statistics need CUDA initialised
        torch.cuda.reset_peak_memory_stats(torch.device(device))
    read_s = wait_s = 0.0
    bytes_read = 0
    try:
        with torch.inference_mode():
            # embedding
            shared = source.load_shared(("embed",))
            by_module[anatomy.embed_path] = shared["embed"]
            hidden = []
            with capture.Capture(None, by_stage.get("embed", []), collector, resolve=by_module.__getitem__):
                for batch in batches:
                    collector.start_batch(batch)
                    hidden.append(shared["embed"](batch.input_ids.to(device)))
            del shared, by_module[anatomy.embed_path]
            hidden = _park(hidden, device, stream.activations_on_device_fraction)
            # decoder layers, one at a time, the next one read in the background
            with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
                pending = pool.submit(source.read, 0)
                for k in range(anatomy.num_layers):
                    t0 = time.perf_counter()
                    weights = pending.result()
                    wait_s += time.perf_counter() - t0
                    read_s += weights.seconds
                    bytes_read += weights.bytes_read
                    layer = source.build(weights)
                    weights.tensors.clear()  # the raw tensors go now, not at some later garbage collection,
                    del weights  # before the next layer's arrive: ~2 layers resident
                    last = k + 1 == anatomy.num_layers
                    if stream.prefetch and not last:
                        pending = pool.submit(source.read, k + 1)  # overlaps this layer's compute
                    hidden = run_layer(layer, layer.module, anatomy.layer(k), batches, hidden, collector,
                                       by_stage.get(k, []), device)
                    del layer
                    if not stream.prefetch and not last:
                        pending = pool.submit(source.read, k + 1)
                    if progress is not None:
                        progress(Progress(k + 1, anatomy.num_layers, 0, len(prompts), writer.bytes_written,
                                          time.perf_counter() - start))
            # final norm and head
            shared = source.load_shared(("norm", "head"))
            norm, head = shared.get("norm"), shared["head"]
            if norm is not None:
                by_module[anatomy.norm_path] = norm
            by_module[anatomy.head_path] = head
            with capture.Capture(None, by_stage.get("final", []), collector, resolve=by_module.__getitem__):
                for batch, h in zip(batches, hidden):
                    collector.start_batch(batch)
                    h = h.to(device, non_blocking=True)
                    head(norm(h) if norm is not None else h)
        collector.close()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else 0
        manifest = writer.finish({
            "placement": {"": device}, "fixes": [asdict(f) for f in source.fixes],
            "versions": runs.library_versions(),
            "stats": {"seconds": seconds, "bytes": writer.bytes_written, "streamed": True,
                      "weights_read_bytes": bytes_read, "weights_read_seconds": read_s, "weights_wait_seconds": wait_s,
                      "peak_device_bytes": peak},
        })
    except BaseException:
        collector.abort()
        writer.abort()
        raise
    finally:
        source.close()
    result = ExtractResult(
        path=writer.path, prompts=len(prompts), tensors=len(manifest["tensors"]), bytes=writer.bytes_written,
        seconds=seconds, forward_seconds=seconds - wait_s, resumed_batches=0,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        pinned_peak_bytes=collector.pinned_peak_bytes,
    )
    return result, StreamStats(bytes_read, read_s, wait_s, peak)


def _stage_of(module: str, anatomy) -> str | int:
    if module == anatomy.embed_path:
        return "embed"
    prefix = anatomy.layers_path + "."
    if module.startswith(prefix):
        return int(module[len(prefix):].split(".")[0])
    return "final"


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
