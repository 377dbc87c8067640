"""`layerwise test`: the seed's single / multi / full / extract-all tests, on a reference run.

- single: each chosen layer alone on the reference's recorded input (replay.py, isolated). With
  `--layer all` also the chain of every layer from layer 0's recorded input: the propagated
  error beside each layer's own.
- multi: the chain of layers A..B from the reference's recorded input of A.
- full: the whole model under the candidate settings (extract.py) on the reference's prompts,
  with the reference's capture points, layers and batch size.
- extract-all: `layerwise extract`, writing a reference.

single and multi with `--record-reference` record the reference in the same read of the
checkpoint as the test (joint.py), instead of replaying a reference made before.

Under torchrun the ranks share the work: single and multi split the layers (pipeline.py: each
rank loads only its own, the chain pipelined from rank to rank), full and extract-all the
batches (extract.py); every rank compares its block of the prompts, and rank 0 reports
(compare.compare_runs gathers the measurements; cli.py).

`run_layer_test` makes the candidate runs; `compare_layer_test` compares each with the
reference (compare.py) and, for `single --layer all`, lines up each layer's isolated error with
its propagated one (`isolation_table`, pure). Rendering is report.py's.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import distributed, models, timings
from .compare import CompareOptions, Report, Row, compare_runs
from .errors import UserError
from .extract import ExtractOptions, extract
from .joint import record_and_test
from .loading import LoadOptions
from .names import OUTPUT, BadSelection, Layout, format_ranges, parse_indices
from .paths import overlaps
from .pipeline import Pipeline
from .recording import ExtractResult
from .replay import ReplayOptions, ReplayResult, replay
from .runs import INTENT, MANIFEST, Run, open_run
from .streaming import StreamOptions, stream_extract

log = logging.getLogger(__name__)

TEST_TYPES = ("single", "multi", "full", "extract-all")
# Which candidate run decides a test's verdict.
_DECIDES = {"single": "isolated", "multi": "chained", "full": "full"}


@dataclass(frozen=True)
class TestOptions:
    test_type: str = "single"
    reference: str | None = None  # the reference run (not needed for extract-all)
    layer: str = "all"  # single: K or all
    layers: str | None = None  # multi: A-B (default: every layer); full / extract-all: which layers to capture
    out: str = "runs/test"  # directory for the candidate run(s)
    stream: bool = False  # full / extract-all: one decoder layer at a time on one device (single and multi always are)
    record_reference: bool = False  # single / multi: record `reference` in the same read as the test (joint.py)
    candidate: ReplayOptions = field(default_factory=ReplayOptions)  # the settings tested (default: the reference's)
    load: LoadOptions = field(default_factory=LoadOptions)  # full / extract-all: loading the whole model
    extract: ExtractOptions = field(default_factory=ExtractOptions)  # extract-all: capture; full: its batch defaults


@dataclass(frozen=True)
class TestResult:
    test_type: str
    reference: Path | None
    candidates: dict[str, Path]  # "isolated" / "chained" / "full" / "extract" -> run directory
    layers: tuple[int, ...] = ()
    replay: ReplayResult | None = None
    extract: ExtractResult | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


def run_layer_test(model: str, options: TestOptions = TestOptions(), prompts: list | None = None,
                   progress=None) -> TestResult:
    """Make the candidate run(s) of one `layerwise test`; `prompts` (prompt items) serve
    extract-all, which otherwise takes the reference's."""
    if options.test_type not in TEST_TYPES:
        raise UserError(f"unknown --test-type {options.test_type!r}: choose from {', '.join(TEST_TYPES)}")
    check_places(options)
    out = Path(options.out)
    if options.test_type == "extract-all":
        return _extract_all(model, options, out, prompts, progress)
    if not options.reference:
        if options.record_reference:
            raise UserError("--record-reference needs --reference DIR: the directory to record the reference run in")
        raise UserError(f"--test-type {options.test_type} needs --reference RUN "
                        "(make one with --test-type extract-all)")
    if options.record_reference and options.test_type not in ("single", "multi"):
        raise UserError(f"--record-reference is for --test-type single or multi ({options.test_type} reads the "
                        "model once already): drop it, or extract the reference first")
    reference = None
    if not options.record_reference:
        reference = open_run(options.reference)
        timings.mark("reference opened")
    if options.test_type == "full":
        return _full(model, reference, options, out, progress)
    num_layers = models.load_config(models.resolve_model(model)).config.num_hidden_layers  # cheap: the config
    if options.test_type == "single":
        layers = parse_layer(options.layer, num_layers)
        runs = {"isolated": out / "isolated", "chained": out / "chained" if len(layers) == num_layers > 1 else None}
    else:
        layers = parse_layer_range(options.layers or f"0-{num_layers - 1}", num_layers)
        runs = {"chained": out / "chained"}
    notes = ()
    if reference is None:
        result, recorded = record_and_test(model, options.reference, layers, list(prompts or []), options.candidate,
                                           options.extract, **runs)
        notes = recorded.notes  # NaN/Inf in the reference
    else:
        result = replay(model, reference, layers, options.candidate, schedule=_schedule(options), **runs)
    candidates = {k: v for k, v in (("isolated", result.isolated), ("chained", result.chained)) if v is not None}
    return TestResult(options.test_type, Path(options.reference), candidates, result.layers, replay=result,
                      notes=(*result.notes, *notes))


def written_runs(options: TestOptions) -> dict[str, Path]:
    """The run directories a test may write, by kind (single writes "chained" only with every layer)."""
    out = Path(options.out)
    kinds = {"single": ("isolated", "chained"), "multi": ("chained",), "full": ("full",)}.get(options.test_type)
    return {"extract-all": out} if kinds is None else {kind: out / kind for kind in kinds}


def check_places(options: TestOptions) -> None:
    """Before any work: no run the test writes is its reference, lies inside it or holds it; runs
    written into --out's subdirectories are not written into a run."""
    out = Path(options.out)
    if options.test_type != "extract-all" and ((out / MANIFEST).is_file() or (out / INTENT).is_file()):
        raise UserError(f"--out {out} is a run directory, and a {options.test_type} test writes its runs into "
                        "subdirectories of --out: give a directory that is not a run")
    if not options.reference:
        return
    for kind, path in written_runs(options).items():
        if overlaps(path, options.reference):
            raise UserError(f"--out {options.out} puts the {kind} run in {path}, which is, holds or lies inside "
                            f"the reference {options.reference}: the test would write into its own reference; "
                            "give --out a directory apart from the reference's")


def _schedule(options: TestOptions) -> Pipeline | None:
    """Under torchrun, the layers split over the ranks (pipeline.py); else replay's own loop."""
    ranks = distributed.session()
    return Pipeline(ranks) if ranks.world > 1 else None


def parse_layer(text: str, num_layers: int) -> list[int]:
    """`--layer K` or `--layer all`."""
    text = str(text).strip().lower()
    if text == "all":
        return list(range(num_layers))
    try:
        chosen = parse_indices(text)
    except BadSelection:
        chosen = ()
    if len(chosen) != 1 or not text.isdigit():
        raise UserError(f"--layer {text!r} is not a layer number: use 0-{num_layers - 1} or all")
    return [_in_range(chosen[0], num_layers)]


def parse_layer_range(text: str, num_layers: int) -> list[int]:
    """`--layers A-B` (inclusive) or a single `K`."""
    bounds = None
    try:
        chosen = parse_indices(text) if "," not in str(text) else ()
        bounds = (chosen[0], chosen[-1]) if chosen else None
    except BadSelection as err:
        bounds = err.reversed_range
    if bounds is None:
        raise UserError(f"--layers {text!r} is not a range: write A-B, e.g. 0-3")
    first, last = (_in_range(i, num_layers) for i in bounds)
    if last < first:
        raise UserError(f"--layers {text} is reversed: write the first layer first ({last}-{first})")
    return list(range(first, last + 1))


def _in_range(index: int, num_layers: int) -> int:
    if index >= num_layers:
        raise UserError(f"layer {index} is out of range: the model has layers 0-{num_layers - 1}")
    return index


def _extract_all(model, options: TestOptions, out: Path, prompts, progress) -> TestResult:
    items = list(prompts or [])
    if not items and options.reference:
        items = [p["token_ids"] for p in open_run(options.reference).prompts]
    extract_options = replace(options.extract, layers=options.layers) if options.layers else options.extract
    result = _run_extract(model, out, items, extract_options, options.load, options.stream, None, progress)
    return TestResult("extract-all", None, {"extract": result.path}, extract=result, notes=result.notes)


def _run_extract(model, out: Path, items, extract_options: ExtractOptions, load: LoadOptions, stream: bool,
                 candidate: ReplayOptions | None, progress) -> ExtractResult:
    """The whole model over the prompts: loaded over the GPUs, or streamed one layer at a time
    (on the candidate's device and FP8 backend, if given)."""
    if not stream:
        return extract(model, str(out), items, extract_options, load, progress=progress)
    where = {} if candidate is None else {"device": candidate.device, "fp8_backend": candidate.fp8_backend}
    result, _ = stream_extract(model, out, items, extract_options, StreamOptions(
        dtype=load.dtype, attn_implementation=load.attn_implementation, quant=load.quant, **where))
    return result


def _full(model, reference: Run, options: TestOptions, out: Path, progress) -> TestResult:
    """The whole model under the candidate settings, captured like the reference was."""
    candidate = options.candidate
    if candidate.candidate:
        raise UserError("--candidate replaces one decoder layer: use it with --test-type single or multi")
    settings = reference.manifest.get("settings", {}) or {}
    load = replace(options.load, dtype=candidate.dtype or settings.get("dtype") or options.load.dtype,
                   attn_implementation=models.reference_attention(candidate.attn_implementation,
                                                                  settings.get("attn_implementation")),
                   quant=candidate.quant or settings.get("quant"), fp8_backend=candidate.fp8_backend)
    d = options.extract
    points = ",".join(settings.get("points") or []) or d.points
    layers = options.layers or (format_ranges(list(settings["layers"])) if settings.get("layers") else None)
    extract_options = replace(d, points=points, layers=layers or d.layers,
                              batch_size=settings.get("batch_size") or d.batch_size, overwrite=candidate.overwrite)
    items = [p["token_ids"] for p in reference.prompts]
    result = _run_extract(model, out / "full", items, extract_options, load, options.stream, candidate, progress)
    return TestResult("full", reference.path, {"full": result.path}, extract=result, notes=result.notes)


# ------------------------------------------------------------------------------ comparing

@dataclass(frozen=True)
class IsolationRow:
    """One decoder layer: its own error (fed the reference's input) beside the error it has
    when fed the candidate's previous layers (chained from layer 0's recorded input)."""

    layer: int
    isolated_rel_l2: float | None  # of the layer's output, worst prompt
    propagated_rel_l2: float | None
    isolated_passed: bool  # every tensor of the layer within tolerance
    propagated_passed: bool | None
    isolated_flips: int | None = None  # tokens whose expert set differs (MoE layers)
    propagated_flips: int | None = None


@dataclass(frozen=True)
class LayerTestReport:
    result: TestResult
    reports: dict[str, Report]  # candidate kind -> its comparison with the reference
    decides: str | None  # which report gives the verdict (None: extract-all, nothing compared)
    isolation: tuple[IsolationRow, ...] = ()

    @property
    def passed(self) -> bool:
        return self.decides is None or self.reports[self.decides].passed


def compare_layer_test(result: TestResult, options: CompareOptions = CompareOptions(),
                       progress=None, ranks=None) -> LayerTestReport | None:
    """Compare each candidate run of `result` with its reference. `ranks` (torchrun's, a
    distributed.Session): every rank measures its share of the prompts, and rank 0 returns the
    report (None elsewhere; compare_runs)."""
    decides = _DECIDES.get(result.test_type)
    if decides is None or result.reference is None:
        return LayerTestReport(result, {}, None) if ranks is None or ranks.is_main else None
    reference = open_run(result.reference)
    reports = {kind: compare_runs(reference, open_run(path), options, progress=progress, ranks=ranks)
               for kind, path in result.candidates.items()}
    if ranks is not None and not ranks.is_main:
        return None
    table = ()
    if "isolated" in reports and "chained" in reports:
        layers_path = Layout.of(reference.manifest.get("anatomy")).layers_path
        table = isolation_table(reports["isolated"], reports["chained"], result.layers, layers_path)
    return LayerTestReport(result, reports, decides, table)


def isolation_table(isolated: Report, propagated: Report | None, layers: tuple[int, ...],
                    layers_path: str = "model.layers") -> tuple[IsolationRow, ...]:
    def by_layer(report: Report | None) -> dict[int, list[Row]]:
        rows: dict[int, list[Row]] = {}
        for row in report.rows if report else ():
            if row.layer is not None:
                rows.setdefault(row.layer, []).append(row)
        return rows

    def output(rows: list[Row], k: int) -> float | None:
        return next((r.rel_l2 for r in rows if r.module == f"{layers_path}.{k}" and r.role == OUTPUT), None)

    def flips(report: Report | None, k: int) -> int | None:
        return next((r.routing.flips for r in (report.routing if report else ()) if r.layer == k and r.routing), None)

    iso, prop = by_layer(isolated), by_layer(propagated)
    return tuple(IsolationRow(
        k, output(iso.get(k, []), k), output(prop.get(k, []), k), all(r.passed for r in iso.get(k, [])),
        all(r.passed for r in prop[k]) if k in prop else None, flips(isolated, k), flips(propagated, k))
        for k in layers)
