"""`layerwise test --record-reference`: a reference run and a layer test from one read of the
checkpoint.

A layer test replays layers on a reference run's recorded inputs, and that reference is made by
an extract: two commands, each reading the whole checkpoint. For a model that does not fit, those
reads are most of a study's time. When the candidate is made of the same checkpoint's weights
under other settings (--dtype, --attn-implementation, --quant fp8, a --candidate factory, or
none: the model against itself), one read serves both:

- the reference streams through the model one layer at a time (streaming.py), recording REF as
  `layerwise extract MODEL --stream` does with the same prompts and capture options;
- each layer, once it has run, is built again from the same tensors under the candidate settings
  (`LayerSource.variant`) and run as a replay runs it (replay.test_layer): isolated on the
  reference's input to it, chained on the candidate's own previous outputs.

REF and the test's runs are those the two commands make, tensor for tensor (tested). The
reference is recorded with extract's defaults (bf16, transformers' default attention, FP8 weights
dequantized) on the test's --device. Under torchrun the ranks share the batches, as a streamed
extract does: each streams every layer over its own share and records it into the same three
runs, whose manifests rank 0 writes once every rank's files are in place. Every batch is computed
(nothing is resumed): a rerun of an interrupted test records both again, and no run has a
manifest until its end.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import capture, distributed, models
from .errors import UserError
from .extract import ExtractOptions
from .formatting import plural
from .layer_loading import LayerOptions, LayerSource, open_layers
from .machine import usable_device
from .rebatch import deterministic
from .recording import ExtractResult, Recording
from .replay import (ReplayOptions, ReplayResult, _Track, finish_tracks, load_candidate, reference_of,
                     resolve_settings, test_intent, test_layer)
from .runs import open_run
from .streaming import StreamOptions, rehearse, stream_extract

_LAYER_POINTS = ("residual", "attn", "mlp", "router")  # what a replayed layer records of the reference's points


def record_and_test(model: str, reference: str | Path, layers: list[int], items: list,
                    options: ReplayOptions = ReplayOptions(), extract: ExtractOptions = ExtractOptions(),
                    isolated: str | Path | None = None,
                    chained: str | Path | None = None) -> tuple[ReplayResult, ExtractResult]:
    """Record the reference run `reference` of `model` over `items` (prompts) and, in the same
    read, make the test's isolated and/or chained runs of `layers` under the candidate settings."""
    if not items:
        raise UserError("--record-reference needs the prompts to record: --prompt TEXT or --prompts FILE")
    points = capture.parse_points(extract.points)
    if "residual" not in points:
        raise UserError(f"--points {extract.points} has no residual: the test compares each layer's output "
                        "with the reference's, so the reference it records needs residual")
    if chained is not None and layers != list(range(layers[0], layers[-1] + 1)):
        raise UserError("chained layers must be a contiguous range A-B")
    factory = load_candidate(options.candidate) if options.candidate else None
    device = usable_device(options.device)
    source = open_layers(model, LayerOptions(models.DEFAULT_DTYPE, device))  # the reference's: the default backend
    settings = resolve_settings({"dtype": models.DEFAULT_DTYPE, "quant": source.quant_mode}, options)
    candidate = source.variant(dtype=settings["dtype"], attn_implementation=settings["attn_implementation"],
                               quant=settings["quant"], fp8_backend=options.fp8_backend)
    for index in layers:
        candidate.check_index(index)
    outputs = {kind: Path(path) for kind, path in (("isolated", isolated), ("chained", chained)) if path is not None}
    own_kernels = (candidate.dtype, candidate.options.attn_implementation, candidate.quant_mode) != \
        (source.dtype, source.options.attn_implementation, source.quant_mode)
    alongside = Alongside(candidate, layers, outputs, options, factory, settings, Path(reference), own_kernels)
    extracted, _ = stream_extract(model, reference, items, extract, StreamOptions(device=device), source=source,
                                  alongside=alongside)
    return alongside.result, extracted


@dataclass
class Alongside:
    """The layer test a streamed extract feeds (streaming._stream calls `recording`, `rehearse`
    and `layer`): the candidate's runs, open while the reference is recorded, finished after it."""

    source: LayerSource  # the reference's checkpoint under the candidate settings
    layers: list[int]
    outputs: dict[str, Path]  # "isolated" / "chained" -> run directory
    options: ReplayOptions
    factory: Callable | None
    settings: dict
    reference: Path
    own_kernels: bool  # the candidate layers run under other settings than the reference's
    tracks: list[_Track] = field(default_factory=list)
    batches: list = field(default_factory=list)
    targets: list = field(default_factory=list)
    determinism: tuple[bool | None, float] = (None, 0.0)
    load_seconds: float = 0.0
    bytes_read: int = 0
    result: ReplayResult | None = None

    @contextlib.contextmanager
    def recording(self, intent, batches: list, points: tuple[str, ...]):
        """The candidate runs, over the reference's own batches (this rank's share of them under
        torchrun, every rank recording into the same runs) and the layer points it records."""
        intent = intent.as_dict()
        self.batches = batches
        self.targets = capture.plan_targets(self.source.anatomy, tuple(p for p in _LAYER_POINTS if p in points),
                                            tuple(self.layers))
        make = functools.partial(test_intent, self.source, self.settings, self.layers,
                                 {"path": str(self.reference), "created": None}, intent["settings"]["batch_size"],
                                 intent["prompts"])
        start = time.perf_counter()
        with contextlib.ExitStack() as stack:
            self.tracks = [_Track(kind, stack.enter_context(Recording(path, make(kind), self.targets,
                                                                       self.options.overwrite,
                                                                       ranks=distributed.session())))
                           for kind, path in self.outputs.items()]
            yield self
            # the reference's manifest is written by now: the test's runs name it, as a replay's do
            reference = open_run(self.reference)
            note = (f"the reference {self.reference} ({plural(len(reference.prompts), 'prompt')}, "
                    f"{plural(len(reference.entries()), 'tensor')}) was recorded in the same read of the checkpoint")
            self.result = finish_tracks(self.tracks, self.settings, self.layers, [note], start, self.load_seconds,
                                        self.bytes_read, self.determinism, {"reference": reference_of(reference)})

    def rehearse(self, shape: tuple[int, int]) -> None:
        """The candidate's first forward pass paid ahead too, where its settings run other kernels."""
        if self.own_kernels:
            rehearse(self.source, self.layers[0], shape)

    def layer(self, index: int, weights, inputs: list) -> None:
        """Layer `index`, whose weights were just read and which the reference just ran on `inputs`
        (one per batch): built under the candidate settings and run on every track."""
        if index not in self.layers:
            return
        loaded = self.source.build(weights)
        self.load_seconds += loaded.seconds
        self.bytes_read += loaded.bytes_read
        by_batch = {id(b): x for b, x in zip(self.batches, inputs)}
        dtype, device = self.source.dtype, self.source.device

        def fed(batch):  # the reference's input to this layer, as the candidate takes it
            return by_batch[id(batch)].to(device=device, dtype=dtype)

        check = index == self.layers[0] and self.options.check_determinism
        with deterministic(self.options.deterministic):
            checked = test_layer(self.source, loaded, check, self.batches, self.tracks, self.targets, self.options,
                                 self.factory, fed)
        self.determinism = checked or self.determinism
        if index == self.layers[-1]:
            for track in self.tracks:
                track.carry = []
