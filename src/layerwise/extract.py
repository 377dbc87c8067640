"""`layerwise extract`: every layer's activations for a set of prompts, into a run directory.

Loads the model (loading.py), tokenizes and batches the prompts (prompts.py), installs the
capture hooks (capture.py) and records the tensors into a run (recording.py, runs.py).
Resumable: an interrupted extract leaves whole files and no manifest; rerunning the same command
computes only the batches that are not complete and writes the manifest last. `prepare`,
`extract_intent`, `record` and `todo_batches` are shared with the streamed extract
(streaming.py), which brings only its own way of running the forward pass.

Under torchrun (distributed.py) each rank holds a replica and computes its share of the whole
batches (`todo_batches`: the batches one process would form, never re-batched, so every tensor
is bit-identical to one process's on the same device, dtype and thread count) into the same run;
rank 0 writes the manifest once every rank's files are in place (recording.py). With
`--tp` the ranks instead share one model (transformers' `tp_plan="auto"`), compute every batch
together, and rank 0 records (its hooks see the full tensors).
"""

from __future__ import annotations

import contextlib
import logging
import resource
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from . import capture, distributed, pinned, timings, writerproc
from .collector import PINNED_BUDGET_BYTES
from .distributed import Session
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
    writer_threads: int | None = None  # None: writerproc.process_threads() over the writer processes, 2 to 16
    # (runs.writer_threads(), 2 to 8, in this process where there are none)
    queue_depth: int = QUEUE_DEPTH  # files waiting for the writer threads


def gather_prompts(texts: list[str] | None, files: list[str] | None) -> list[str | list[int]]:
    items: list[str | list[int]] = list(texts or [])
    for f in files or []:
        items.extend(read_prompt_file(f))
    return items


def extract(spec: str, out: str, items: list[str | list[int]], options: ExtractOptions = ExtractOptions(),
            load: LoadOptions = LoadOptions(), progress=None) -> ExtractResult:
    pin_ahead(options)
    loaded = load_model(spec, load)
    timings.mark("model loaded")
    return extract_model(loaded, out, items, options, progress=progress, load=load)


def pin_ahead(options: ExtractOptions) -> threading.Thread | None:
    """Start the run writer's processes (writerproc) and pin the capture's first host buffers in the
    background (a GPU only), while the model loads; the thread pinning them (None: nothing to pin)."""
    writerproc.processes(options.writer_threads)
    return pinned.reserve(int(options.pinned_budget_gib * 2**30))


def pin_head_ahead(options: ExtractOptions, points, batches, vocab_size: int,
                   dtype: torch.dtype) -> threading.Thread | None:
    """Pin the host buffer of the largest batch's logits in the background (a GPU only) while the
    layers run, where logits are captured (pinned.reserve_large); the thread (None: nothing to pin)."""
    if "logits" not in points or not batches:
        return None
    tokens = max(batch.input_ids.numel() for batch in batches)
    return pinned.reserve_large(int(options.pinned_budget_gib * 2**30), tokens * vocab_size * dtype.itemsize)


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


def record(out, intent: Intent, targets, options: ExtractOptions, ranks: Session | None = None) -> Recording:
    """The recording of an extract, sized by its options (`ranks`: every rank records into `out`)."""
    return Recording(out, intent, targets, options.overwrite, writer_threads=options.writer_threads,
                     queue_depth=options.queue_depth, pinned_budget_bytes=int(options.pinned_budget_gib * 2**30),
                     ranks=ranks)


def todo_batches(run: Recording, batches: list, ranks: Session, split: bool = True,
                 resume: bool = True) -> tuple[list, list]:
    """The batches not complete on disk (as rank 0 sees them, for every rank; all of them without
    `resume`) and this rank's share of them (`split`; else all of them): whole batches, balanced
    by their tokens."""
    todo = [i for i, b in enumerate(batches)
            if not resume or not all(run.writer.has(p.index, g) for p in b.prompts for g in run.groups)]
    todo = ranks.broadcast(todo)
    mine = [todo[i] for i in ranks.share([batches[i].input_ids.numel() for i in todo])] if split else todo
    return [batches[i] for i in todo], [batches[i] for i in mine]


def extract_model(loaded: LoadedModel, out: str, items: list[str | list[int]],
                  options: ExtractOptions = ExtractOptions(), progress=None,
                  load: LoadOptions = LoadOptions()) -> ExtractResult:
    """Run `items` through an already loaded model and write every captured tensor to `out`.
    Under torchrun the ranks share the batches (each holds a replica), or, tensor-parallel, all
    compute every batch together and rank 0 records."""
    model, anatomy, config = loaded.model, loaded.anatomy, loaded.config or loaded.model.config
    points, layers, prompts, batches = prepare(loaded.tokenizer, config, anatomy, items, options)
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None and head.weight.device.type == "cuda":
        pin_head_ahead(options, points, batches, head.weight.shape[0], head.weight.dtype)
    extra = module_targets([name for name, _ in model.named_modules()], parse_modules(options.modules), anatomy,
                           layers)
    targets = capture.plan_targets(anatomy, points, layers, extra)
    ranks, tp = distributed.session(), loaded.tensor_parallel > 1
    settings = {"dtype": loaded.plan.dtype, "attn_implementation": getattr(model.config, "_attn_implementation", None),
                "device_map": "tp_plan=auto" if tp else load.device_map, "quant": loaded.quant_mode}
    if tp:
        settings["tensor_parallel"] = loaded.tensor_parallel
    intent = extract_intent(loaded.ref, config, type(model).__name__, anatomy, prompts, points, layers, options,
                            settings)
    if tp and not ranks.is_main:  # rank 0 records; this rank computes its part of the same forward passes
        todo = [batches[i] for i in ranks.broadcast(None)]
        return _follower_result(out, prompts, _forward(loaded, todo, None, []))
    with record(out, intent, targets, options, None if tp else ranks) as run:
        todo, mine = todo_batches(run, batches, ranks, split=not tp)
        timings.mark("run started")

        def done(number: int) -> None:
            if progress is not None:
                prompts_done = sum(len(b.prompts) for b in mine[:number])
                progress(Progress(number, len(mine), prompts_done, len(prompts), run.writer.bytes_written,
                                  run.elapsed()))

        forward = _forward(loaded, mine, run.collector, targets, done)
        timings.mark("forward done")
        seconds = run.close_capture()
        run.timings["startup"] = timings.startup()  # this rank's, into its stats
        placement = {"": f"tensor parallel over {loaded.tensor_parallel} ranks"} if tp else \
            dict(getattr(model, "hf_device_map", None) or loaded.plan.device_map)
        run.finish({
            "placement": placement, "fixes": [asdict(f) for f in loaded.config_fixes], "versions": library_versions(),
            "stats": {"seconds": seconds, "forward_seconds": forward,
                      "batches": len(batches), "batches_computed": len(todo)},
        })
    return run.result(len(prompts), forward, resumed_batches=len(batches) - len(todo))


def _forward(loaded: LoadedModel, batches: list, collector, targets, done=None) -> float:
    """The whole model over `batches`, captured into `collector` (None: not captured); the seconds
    spent in forward calls."""
    device, forward = loaded.input_device, 0.0
    hooks = capture.Capture(loaded.model, targets, collector) if collector is not None else contextlib.nullcontext()
    with hooks, torch.inference_mode():
        for number, batch in enumerate(batches, start=1):
            if collector is not None:
                collector.start_batch(batch)
            t0 = time.perf_counter()
            loaded.model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                         use_cache=False)
            forward += time.perf_counter() - t0
            if done is not None:
                done(number)
    return forward


def _follower_result(out, prompts, forward: float) -> ExtractResult:
    """What a tensor-parallel rank other than 0 did: forward passes, nothing written."""
    return ExtractResult(Path(out), len(prompts), 0, 0, forward, forward, 0,
                         resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 0)
