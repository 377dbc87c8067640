"""`layerwise extract`: every layer's activations for a set of prompts, into a run directory.

Loads the model (loading.py), tokenizes and batches the prompts (prompts.py), installs the
capture hooks (capture.py) and streams the tensors into a run (runs.py). Resumable: an
interrupted extract leaves whole files and no manifest; rerunning the same command computes
only the batches that are not complete and writes the manifest last.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import capture, runs
from .loading import LoadedModel, LoadOptions, load_model
from .module_points import module_targets, parse_modules
from .prompts import make_batches, read_prompt_file, tokenize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractOptions:
    points: str | None = None  # comma list; None = capture.DEFAULT_POINTS
    layers: str | None = None  # "0-9,20"; None = every layer
    modules: tuple[str, ...] = ()  # --modules REGEX[:ROLE]: any named module, besides the points
    batch_size: int = 8
    max_tokens: int | None = None
    chat_template: bool = False
    overwrite: bool = False
    pinned_budget_gib: float = 4.0  # host memory for in-flight device-to-host copies
    writer_threads: int | None = None  # None: one per core, 2 to 8
    queue_depth: int = 16  # files waiting for the writer threads


@dataclass(frozen=True)
class Progress:
    batch: int
    batches: int
    prompts_done: int
    prompts: int
    bytes_written: int
    seconds: float


@dataclass(frozen=True)
class ExtractResult:
    path: Path
    prompts: int
    tensors: int
    bytes: int  # written by this call (a resumed run skips what was already on disk)
    seconds: float
    forward_seconds: float  # time inside model forward calls (hooks included)
    resumed_batches: int  # batches found complete on disk and skipped
    peak_rss_bytes: int
    pinned_peak_bytes: int
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds else 0.0


def gather_prompts(texts: list[str] | None, files: list[str] | None) -> list[str | list[int]]:
    items: list[str | list[int]] = list(texts or [])
    for f in files or []:
        items.extend(read_prompt_file(f))
    return items


def extract(spec: str, out: str, items: list[str | list[int]], options: ExtractOptions = ExtractOptions(),
            load: LoadOptions = LoadOptions(), progress=None) -> ExtractResult:
    loaded = load_model(spec, load)
    return extract_model(loaded, out, items, options, progress=progress, load=load)


def run_intent(ref, config, architecture: str, anatomy, prompts, points, layers, options: ExtractOptions,
               settings: dict, producer: str = "layerwise extract") -> dict:
    """What an extracted run is: the model, the settings that shape its numbers, the prompts."""
    return {
        "producer": producer,
        "model": {
            "spec": ref.spec, "path": str(ref.path) if ref.path else None,
            "model_type": config.model_type, "architecture": architecture,
            "config_sha256": runs.config_sha256(config), "num_layers": anatomy.num_layers,
            "hidden_size": config.hidden_size,
        },
        "settings": {
            "points": list(points), "layers": list(layers), "chat_template": options.chat_template,
            "max_tokens": options.max_tokens, "batch_size": options.batch_size, **settings,
            **({"modules": list(options.modules)} if options.modules else {}),
        },
        "anatomy": {"layers_path": anatomy.layers_path, "embed": anatomy.embed_path,
                    "norm": anatomy.norm_path or "model.norm", "head": anatomy.head_path},
        "prompts": [{"index": p.index, "text": p.text, "token_ids": list(p.token_ids)} for p in prompts],
    }


def prepare(tokenizer, config, anatomy, items, options: ExtractOptions):
    """Capture points, layers, tokenized prompts and their batches (the same for every way of running)."""
    points = capture.parse_points(options.points)
    layers = capture.parse_layers(options.layers, anatomy.num_layers)
    context = getattr(config, "max_position_embeddings", None)
    prompts = tokenize(items, tokenizer, chat_template=options.chat_template, max_tokens=options.max_tokens,
                       context_length=context, vocab_size=config.vocab_size)
    pad_id = getattr(tokenizer, "pad_token_id", None) or getattr(config, "pad_token_id", None) or 0
    return points, layers, prompts, make_batches(prompts, options.batch_size, pad_id)


def extract_model(loaded: LoadedModel, out: str, items: list[str | list[int]],
                  options: ExtractOptions = ExtractOptions(), progress=None,
                  load: LoadOptions = LoadOptions()) -> ExtractResult:
    """Run `items` through an already loaded model and write every captured tensor to `out`."""
    model, anatomy, config = loaded.model, loaded.anatomy, loaded.config or loaded.model.config
    points, layers, prompts, batches = prepare(loaded.tokenizer, config, anatomy, items, options)
    extra = module_targets([name for name, _ in model.named_modules()], parse_modules(options.modules), anatomy,
                           layers)
    targets = capture.plan_targets(anatomy, points, layers, extra)
    groups = capture.groups_of(targets)
    settings = {"dtype": loaded.plan.dtype, "attn_implementation": getattr(model.config, "_attn_implementation", None),
                "device_map": load.device_map, "quant": loaded.quant_mode}
    intent = run_intent(loaded.ref, config, type(model).__name__, anatomy, prompts, points, layers, options, settings)
    writer = runs.RunWriter(out, intent, options.overwrite, threads=options.writer_threads,
                            queue_depth=options.queue_depth)
    todo = [b for b in batches if not all(writer.has(p.index, g) for p in b.prompts for g in groups)]
    collector = capture.Collector(writer, targets, int(options.pinned_budget_gib * 2**30))
    device = loaded.input_device
    start = time.perf_counter()
    forward = 0.0
    try:
        with capture.Capture(model, targets, collector), torch.inference_mode():
            for number, batch in enumerate(todo, start=1):
                collector.start_batch(batch)
                t0 = time.perf_counter()
                model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                      use_cache=False)
                forward += time.perf_counter() - t0
                if progress is not None:
                    done = sum(len(b.prompts) for b in todo[:number])
                    progress(Progress(number, len(todo), done, len(prompts), writer.bytes_written,
                                      time.perf_counter() - start))
        collector.close()
        seconds = time.perf_counter() - start
        manifest = writer.finish({
            "placement": dict(getattr(model, "hf_device_map", None) or loaded.plan.device_map),
            "fixes": [asdict(f) for f in loaded.config_fixes],
            "versions": runs.library_versions(),
            "stats": {"seconds": seconds, "forward_seconds": forward, "bytes": writer.bytes_written,
                      "batches": len(batches), "batches_computed": len(todo)},
        })
    except BaseException:
        collector.abort()
        writer.abort()
        raise
    return ExtractResult(
        path=Path(out), prompts=len(prompts), tensors=len(manifest["tensors"]), bytes=writer.bytes_written,
        seconds=seconds, forward_seconds=forward, resumed_batches=len(batches) - len(todo),
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        pinned_peak_bytes=collector.pinned_peak_bytes,
    )

