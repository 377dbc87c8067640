"""`layerwise extract`: every layer's activations for a set of prompts, into a run directory.

Loads the model (loading.py), tokenizes and batches the prompts (prompts.py), installs the
capture hooks (capture.py) and records the tensors into a run (recording.py, runs.py).
Resumable: an interrupted extract leaves whole files and no manifest; rerunning the same command
computes only the batches that are not complete and writes the manifest last. `prepare`,
`extract_intent` and `record` are shared with the streamed extract (streaming.py), which brings
only its own way of running the forward pass.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass

import torch

from . import capture
from .collector import PINNED_BUDGET_BYTES
from .loading import LoadedModel, LoadOptions, load_model
from .module_points import module_targets, parse_modules
from .prompts import make_batches, read_prompt_file, tokenize
from .recording import ExtractResult, Progress, Recording, model_record
from .runs import QUEUE_DEPTH, Intent, library_versions

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
    pinned_budget_gib: float = PINNED_BUDGET_BYTES / 2**30  # host memory for in-flight device-to-host copies
    writer_threads: int | None = None  # None: one per core, 2 to 8
    queue_depth: int = QUEUE_DEPTH  # files waiting for the writer threads


def gather_prompts(texts: list[str] | None, files: list[str] | None) -> list[str | list[int]]:
    items: list[str | list[int]] = list(texts or [])
    for f in files or []:
        items.extend(read_prompt_file(f))
    return items


def extract(spec: str, out: str, items: list[str | list[int]], options: ExtractOptions = ExtractOptions(),
            load: LoadOptions = LoadOptions(), progress=None) -> ExtractResult:
    loaded = load_model(spec, load)
    return extract_model(loaded, out, items, options, progress=progress, load=load)


def prepare(tokenizer, config, anatomy, items, options: ExtractOptions):
    """Capture points, layers, tokenized prompts and their batches (the same for every way of running)."""
    points = capture.parse_points(options.points)
    layers = capture.parse_layers(options.layers, anatomy.num_layers)
    context = getattr(config, "max_position_embeddings", None)
    prompts = tokenize(items, tokenizer, chat_template=options.chat_template, max_tokens=options.max_tokens,
                       context_length=context, vocab_size=config.vocab_size)
    pad_id = getattr(tokenizer, "pad_token_id", None) or getattr(config, "pad_token_id", None) or 0
    return points, layers, prompts, make_batches(prompts, options.batch_size, pad_id)


def extract_intent(ref, config, architecture: str, anatomy, prompts, points, layers, options: ExtractOptions,
                   settings: dict) -> Intent:
    """What an extracted run is: the model, the settings that shape its numbers, the prompts."""
    return Intent(
        producer="layerwise extract",
        model=model_record(ref, config, architecture, anatomy.num_layers),
        settings={"points": list(points), "layers": list(layers), "chat_template": options.chat_template,
                  "max_tokens": options.max_tokens, "batch_size": options.batch_size, **settings,
                  **({"modules": list(options.modules)} if options.modules else {})},
        anatomy=asdict(anatomy.layout),
        prompts=[{"index": p.index, "text": p.text, "token_ids": list(p.token_ids)} for p in prompts],
    )


def record(out, intent: Intent, targets, options: ExtractOptions) -> Recording:
    """The recording of an extract, sized by its options."""
    return Recording(out, intent, targets, options.overwrite, writer_threads=options.writer_threads,
                     queue_depth=options.queue_depth, pinned_budget_bytes=int(options.pinned_budget_gib * 2**30))


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
    intent = extract_intent(loaded.ref, config, type(model).__name__, anatomy, prompts, points, layers, options,
                            settings)
    with record(out, intent, targets, options) as run:
        todo = [b for b in batches if not all(run.writer.has(p.index, g) for p in b.prompts for g in groups)]
        device = loaded.input_device
        forward = 0.0
        with capture.Capture(model, targets, run.collector), torch.inference_mode():
            for number, batch in enumerate(todo, start=1):
                run.collector.start_batch(batch)
                t0 = time.perf_counter()
                model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                      use_cache=False)
                forward += time.perf_counter() - t0
                if progress is not None:
                    done = sum(len(b.prompts) for b in todo[:number])
                    progress(Progress(number, len(todo), done, len(prompts), run.writer.bytes_written, run.elapsed()))
        seconds = run.close_capture()
        run.finish({
            "placement": dict(getattr(model, "hf_device_map", None) or loaded.plan.device_map),
            "fixes": [asdict(f) for f in loaded.config_fixes],
            "versions": library_versions(),
            "stats": {"seconds": seconds, "forward_seconds": forward, "bytes": run.writer.bytes_written,
                      "batches": len(batches), "batches_computed": len(todo)},
        })
    return run.result(len(prompts), forward, resumed_batches=len(batches) - len(todo))
