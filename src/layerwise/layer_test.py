"""`layerwise test`: the seed's single / multi / full / extract-all tests, on a reference run.

- single: each chosen layer alone on the reference's recorded input (replay.py, isolated). With
  `--layer all` also the chain of every layer from layer 0's recorded input: the propagated
  error beside each layer's own.
- multi: the chain of layers A..B from the reference's recorded input of A.
- full: the whole model under the candidate settings (extract.py) on the reference's prompts,
  with the reference's capture points, layers and batch size.
- extract-all: `layerwise extract`, writing a reference.

This module plans which runs to make and makes them; comparing them with the reference is
compare.py's job.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from . import runs
from .errors import UserError
from .replay import ReplayOptions, ReplayResult, parse_layer, parse_layer_range, replay

log = logging.getLogger(__name__)

TEST_TYPES = ("single", "multi", "full", "extract-all")


@dataclass(frozen=True)
class TestOptions:
    test_type: str = "single"
    reference: str | None = None  # the reference run (not needed for extract-all)
    layer: str = "all"  # single: K or all
    layers: str | None = None  # multi: A-B (default: every layer); full / extract-all: which layers to capture
    out: str = "runs/test"  # directory for the candidate run(s)


@dataclass(frozen=True)
class TestResult:
    test_type: str
    reference: Path | None
    candidates: dict[str, Path]  # "isolated" / "chained" / "full" / "extract" -> run directory
    layers: tuple[int, ...] = ()
    replay: ReplayResult | None = None
    extract: object | None = None  # extract.ExtractResult
    notes: tuple[str, ...] = field(default_factory=tuple)


def run_layer_test(model: str, options: TestOptions, candidate: ReplayOptions = ReplayOptions(),
                   load=None, extract_options=None, prompts: list | None = None, progress=None) -> TestResult:
    """Make the candidate run(s) of one `layerwise test`. `load` / `extract_options` /
    `prompts` serve full and extract-all (loading.LoadOptions, extract.ExtractOptions, prompt items)."""
    if options.test_type not in TEST_TYPES:
        raise UserError(f"unknown --test-type {options.test_type!r}: choose from {', '.join(TEST_TYPES)}")
    out = Path(options.out)
    if options.test_type == "extract-all":
        return _extract_all(model, options, out, load, extract_options, prompts, progress)
    if not options.reference:
        raise UserError(f"--test-type {options.test_type} needs --reference RUN (make one with --test-type extract-all)")
    reference = runs.open_run(options.reference)
    if options.test_type == "full":
        return _full(model, reference, options, candidate, out, load, extract_options, progress)
    num_layers = _num_layers(model)
    if options.test_type == "single":
        layers = parse_layer(options.layer, num_layers)
        every = len(layers) == num_layers and num_layers > 1
        result = replay(model, reference, layers, candidate, isolated=out / "isolated",
                        chained=out / "chained" if every else None)
    else:
        layers = parse_layer_range(options.layers or f"0-{num_layers - 1}", num_layers)
        result = replay(model, reference, layers, candidate, chained=out / "chained")
    candidates = {k: v for k, v in (("isolated", result.isolated), ("chained", result.chained)) if v is not None}
    return TestResult(options.test_type, reference.path, candidates, result.layers, replay=result, notes=result.notes)


def _num_layers(model: str) -> int:
    """The model's layer count, from its config (cheap), for parsing --layer before any loading."""
    from . import models

    ref = models.resolve_model(model)
    return models.load_config(ref).config.num_hidden_layers


def _extract_all(model, options: TestOptions, out: Path, load, extract_options, prompts, progress) -> TestResult:
    from dataclasses import replace

    from .extract import ExtractOptions, extract
    from .loading import LoadOptions

    items = list(prompts or [])
    if not items and options.reference:
        items = [p["token_ids"] for p in runs.open_run(options.reference).prompts]
    extract_options = extract_options or ExtractOptions()
    if options.layers:
        extract_options = replace(extract_options, layers=options.layers)
    result = extract(model, str(out), items, extract_options, load or LoadOptions(), progress=progress)
    return TestResult("extract-all", None, {"extract": result.path}, extract=result, notes=result.notes)


def _full(model, reference: runs.Run, options: TestOptions, candidate: ReplayOptions, out: Path, load,
          extract_options, progress) -> TestResult:
    """The whole model under the candidate settings, captured like the reference was."""
    from dataclasses import replace

    from .extract import ExtractOptions, extract
    from .loading import LoadOptions

    if candidate.candidate:
        raise UserError("--candidate replaces one decoder layer: use it with --test-type single or multi")
    settings = reference.manifest.get("settings", {}) or {}
    load = load or LoadOptions()
    load = replace(load, dtype=candidate.dtype or settings.get("dtype") or load.dtype,
                   attn_implementation=candidate.attn_implementation or settings.get("attn_implementation"))
    d = extract_options or ExtractOptions()
    points = ",".join(settings.get("points") or []) or d.points
    layers = options.layers or _ranges(settings.get("layers") or [])
    extract_options = replace(d, points=points, layers=layers or d.layers,
                              batch_size=settings.get("batch_size") or d.batch_size, overwrite=candidate.overwrite)
    items = [p["token_ids"] for p in reference.prompts]
    result = extract(model, str(out / "full"), items, extract_options, load, progress=progress)
    return TestResult("full", reference.path, {"full": result.path}, extract=result, notes=result.notes)


def _ranges(layers: list[int]) -> str | None:
    """[0, 1, 2, 5] -> "0-2,5" (extract's --layers syntax)."""
    if not layers:
        return None
    parts, start, prev = [], layers[0], layers[0]
    for i in list(layers[1:]) + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
        if i is not None:
            start = prev = i
    return ",".join(parts)
