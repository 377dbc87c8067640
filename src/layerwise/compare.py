"""Compare two runs tensor by tensor and name the first one that diverges.

`compare_runs(ref, cand, options, baseline)` aligns the runs (align.py: same prompts and tokens,
same model, same shapes; what only one run holds is skipped and listed), then streams: for each
prompt, for each tensor in model order, it reads the reference and candidate tensors (and the
baseline's) through readahead.read_units, which verifies their digests and reads ahead within a
memory window, measures them and judges them in model order (measuring.py: on a GPU the tensor
metrics of a few hundred MB of units at a time, in batched passes). Rows, verdict and first
divergence come back as a frozen `Report`; report.py renders it. Nothing here prints or writes files.
"""

from __future__ import annotations

import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable


from .align import Alignment, align_runs
from .formatting import plural
from .measuring import Context, PromptResult, judge_unit, metrics_device, stage_unit
from .metrics import LogitsMetrics, pool_logits
from .names import INPUT, OUTPUT, ROUTER_ROLES, Layout, format_ranges, layer_of, split_name, tensor_name
from .routing import RoutingMetrics, pool_routing
from .readahead import read_units
from .runs import Run, open_run
from .tolerances import DEFAULT_TIE, Tolerances, dtype_class

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompareOptions:
    tolerances: Tolerances = field(default_factory=Tolerances)
    prompts: tuple[int, ...] | None = None  # prompt indices to compare; None: all both runs hold
    tie_threshold: float | None = None  # near-tie margin of router scores; None: by dtype (DEFAULT_TIE)
    logits_topk: int = 5  # k of the logits' top-k overlap
    noise_factor: float = 2.0  # with a baseline: rel_l2 within this many noise floors passes
    verify: bool = True  # check every tensor's digest while reading it
    prefetch: bool = True  # read the next tensors while measuring the current ones
    threads: int = 0  # threads measuring one tensor's rows in parallel; 0: one per core, at most 8
    device: str | None = None  # where tensor and logits metrics run; None: cuda:0 when a GPU is present, else cpu


@dataclass(frozen=True)
class Row:
    """One tensor over all compared prompts. Tensor metrics are the worst over prompts (so a
    row fails exactly when a value shown breaks its limit); logits and routing are pooled."""
    name: str
    module: str
    role: str
    layer: int | None
    kind: str  # "tensor", "logits" (the head's output) or "routing" (expert ids)
    dtypes: tuple[str, str]
    tolerance: str
    passed: bool
    failures: tuple[str, ...]
    max_abs: float | None = None
    mean_abs: float | None = None
    rel_l2: float | None = None
    cosine: float | None = None
    sqnr_db: float | None = None
    nan: tuple[int, int] | None = None
    inf: tuple[int, int] | None = None
    nonfinite_mismatch: int | None = None  # positions where one run has NaN/Inf and the other not
    excused: int = 0  # passes only without this many tokens diverted by benign routing flips (max over prompts)
    judged_rel_l2: float | None = None  # rel_l2 without the diverted tokens where they were excused
    worst_token: tuple[int, int] | None = None  # (prompt, token)
    rel_l2_limit: float | None = None  # the rel_l2 limit this tensor is judged by, if any
    growth: float | None = None  # layer outputs: rel_l2 out / rel_l2 in
    noise_floor: float | None = None  # rel_l2 of the baseline against the reference
    x_floor: float | None = None  # rel_l2 / noise_floor
    logits: LogitsMetrics | None = None
    routing: RoutingMetrics | None = None
    per_prompt: tuple[PromptResult, ...] = ()


@dataclass(frozen=True)
class LogitsReport:
    overall: LogitsMetrics
    per_prompt: tuple[tuple[int, LogitsMetrics], ...]
    worst: tuple[int, int] | None  # (prompt, token) with the largest KL


@dataclass(frozen=True)
class Report:
    verdict: str  # "pass" or "fail"
    first_divergence: Row | None
    rows: tuple[Row, ...]  # every compared tensor, in model order
    logits: LogitsReport | None
    routing: tuple[Row, ...]  # the expert-id rows, one per MoE layer
    skipped: tuple[str, ...]  # what was not compared, and why
    reference: str
    candidate: str
    baseline: str | None
    prompts: tuple[int, ...]
    dtypes: tuple[str | None, str | None]  # the runs' compute dtypes
    options: CompareOptions
    tie_threshold: float = 0.0  # the near-tie margin used (options.tie_threshold or the dtype default)
    bytes_read: int = 0
    seconds: float = 0.0
    notes: tuple[str, ...] = ()
    unmatched_rules: tuple[str, ...] = ()  # where each tolerance rule that judged no tensor came from

    @property
    def passed(self) -> bool:
        return self.verdict == "pass"


def compare_paths(reference: str, candidate: str, options: CompareOptions = CompareOptions(),
                  baseline: str | None = None, progress: Callable[[int, int], None] | None = None) -> Report:
    """Open the runs at these paths and compare them (what `layerwise compare` calls)."""
    ref, cand = open_run(reference), open_run(candidate)
    base = open_run(baseline) if baseline else None
    return compare_runs(ref, cand, options, base, progress=progress)


# ----------------------------------------------------------------------------------- streaming

def _block(prompts: tuple[int, ...], rank: int, world: int) -> tuple[int, ...]:
    """Rank `rank`'s contiguous share of `prompts` (of `world` shares, sizes differing by one at most)."""
    return prompts[rank * len(prompts) // world:(rank + 1) * len(prompts) // world]


def _units(plan: Alignment, prompts: tuple[int, ...]):
    """(prompt, names) in reading order: one tensor at a time, except that a router's logits,
    expert ids and weights travel together (routing needs all three)."""
    for p in prompts:
        unit: list[str] = []
        for name in (n for n in plan.names if n in plan.pairs[p]):
            module, role = split_name(name)
            if unit and role in ROUTER_ROLES and split_name(unit[-1])[1] in ROUTER_ROLES \
                    and split_name(unit[-1])[0] == module:
                unit.append(name)
                continue
            if unit:
                yield p, tuple(unit)
            unit = [name]
        if unit:
            yield p, tuple(unit)


def _compute_dtype(run: Run) -> str | None:
    dtype = (run.manifest.get("settings") or {}).get("dtype")
    return str(dtype) if dtype else None


# ---------------------------------------------------------------------------------- reporting

def compare_runs(ref: Run, cand: Run, options: CompareOptions = CompareOptions(), baseline: Run | None = None,
                 progress: Callable[[int, int], None] | None = None, ranks=None) -> Report | None:
    """Compare `cand` against `ref` (and `baseline` against `ref` for the noise floor).
    Raises UserError when the runs cannot be compared; `progress(bytes_done, bytes_total)`.
    `ranks` (torchrun's ranks, a distributed.Session): each measures its block of the prompts, and
    rank 0 returns the Report from every rank's measurements (None elsewhere), the same Report
    as one process's: a prompt's tensors are measured in order on one rank (routing flips
    excuse later tensors of the same prompt), and the blocks come back in prompt order."""
    started = time.perf_counter()
    plan = align_runs(ref, cand, baseline, options.prompts)
    layout = Layout.of(ref.manifest.get("anatomy"))
    dtypes = (_compute_dtype(ref), _compute_dtype(cand))
    tie = options.tie_threshold if options.tie_threshold is not None else DEFAULT_TIE[dtype_class(dtypes)]
    ctx = Context(ref, cand, baseline, options, layout, dtypes, tie, device=metrics_device(options.device))
    results: dict[str, list[PromptResult]] = {name: [] for name in plan.names}
    done = 0
    threads = options.threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads, thread_name_prefix="layerwise-metrics") as pool:
        ctx.map_fn, ctx.parts = (pool.map, threads) if threads > 1 else (map, 1)
        mine = _block(plan.prompts, ranks.rank, ranks.world) if ranks is not None else plan.prompts
        staged: list[tuple] = []  # units whose tensor metrics ctx.batch measures together (a GPU)
        for p, unit, tensors, arrivals in read_units({"ref": ref, "cand": cand, "base": baseline}, _units(plan, mine),
                                                     options.verify, options.prefetch, device=ctx.device,
                                                     streamable=lambda name: split_name(name)[1] not in ROUTER_ROLES):
            staged.append(stage_unit(ctx, p, unit, tensors, arrivals))
            nbytes = sum(x.numel() * x.element_size() for x in tensors.values())
            if ctx.batch.hold(nbytes):
                _judge(ctx, staged, results)
            done += nbytes
            if progress is not None:
                progress(done, plan.total_bytes)
        _judge(ctx, staged, results)
    if ranks is not None and ranks.world > 1:
        gathered = ranks.gather((results, done))
        if gathered is None:
            return None
        results = {name: [r for part, _ in gathered for r in part[name]] for name in plan.names}
        done = sum(n for _, n in gathered)
    rows = [_row(name, ctx, results[name], baseline is not None) for name in plan.names]
    rows = _with_growth(rows, layout.layers_path, layout.embed)
    first = next((r for r in rows if not r.passed), None)
    unmatched = tuple(r.tolerance.source for r in options.tolerances.unmatched((r.name, r.kind) for r in rows))
    logits_rows = [r for r in rows if r.kind == "logits"]
    seconds = time.perf_counter() - started
    log.info("compared %d tensors over %d prompts: %.2f GB in %.2f s", len(rows), len(plan.prompts), done / 1e9,
             seconds)
    return Report(
        verdict="fail" if first else "pass", first_divergence=first, rows=tuple(rows),
        logits=_logits_report(logits_rows[-1]) if logits_rows else None,
        routing=tuple(r for r in rows if r.kind == "routing"), skipped=plan.skipped,
        reference=str(ref.path), candidate=str(cand.path), baseline=str(baseline.path) if baseline else None,
        prompts=plan.prompts, dtypes=ctx.dtypes, options=options, tie_threshold=tie, bytes_read=done, seconds=seconds,
        notes=_notes(rows, unmatched), unmatched_rules=unmatched,
    )


def _judge(ctx: Context, staged: list[tuple], results: dict[str, list[PromptResult]]) -> None:
    """Measure the batch, then judge the staged units in order (and forget them)."""
    ctx.batch.measure()
    for unit in staged:
        for name, result in judge_unit(ctx, *unit).items():
            results[name].append(result)
    staged.clear()


def _row(name: str, ctx: Context, results: list[PromptResult], with_baseline: bool) -> Row:
    module, role = split_name(name)
    p0 = results[0].prompt
    kind, tol = ctx.judge_for(name, p0)  # measured on another rank, this one may not have judged it yet
    limit = next((c.limit for c in tol.checks if c.metric == "rel_l2"), None)
    base = dict(name=name, module=module, role=role, kind=kind, tolerance=str(tol), rel_l2_limit=limit,
                layer=layer_of(module, ctx.layout.layers_path),
                dtypes=(ctx.ref.entry(name, p0).dtype, ctx.cand.entry(name, p0).dtype),
                passed=all(r.passed for r in results), per_prompt=tuple(results),
                excused=max(r.excused for r in results),
                failures=tuple(f"prompt {r.prompt}: {f}" for r in results for f in r.failures))
    if kind == "routing":
        return Row(**base, routing=pool_routing([r.routing for r in results]))
    tms = [r.tensor for r in results]
    worst = max(results, key=lambda r: (r.tensor.nonfinite_mismatch > 0, r.tensor.rel_l2))
    floors = [r.floor.rel_l2 for r in results if r.floor is not None]
    rel = max(m.rel_l2 for m in tms)
    floor = max(floors) if with_baseline and floors else None
    x_floor = None if floor is None or (floor == 0 and rel == 0) else (rel / floor if floor else math.inf)
    judged = max((r.judged or r.tensor).rel_l2 for r in results)
    return Row(**base, max_abs=max(m.max_abs for m in tms), mean_abs=max(m.mean_abs for m in tms), rel_l2=rel,
               judged_rel_l2=judged,
               cosine=min(m.cosine for m in tms), sqnr_db=min(m.sqnr_db for m in tms),
               nan=(sum(m.nan[0] for m in tms), sum(m.nan[1] for m in tms)),
               inf=(sum(m.inf[0] for m in tms), sum(m.inf[1] for m in tms)),
               nonfinite_mismatch=sum(m.nonfinite_mismatch for m in tms),
               worst_token=None if worst.tensor.worst_token is None else (worst.prompt, worst.tensor.worst_token),
               noise_floor=floor, x_floor=x_floor,
               logits=pool_logits([(r.prompt, r.logits) for r in results])[0] if kind == "logits" else None)


def _growth(out_err: float | None, in_err: float | None) -> float | None:
    """rel_l2 out / rel_l2 in; None where there is no input error to grow (the first layer, an
    isolated test, an exact input) or no measure."""
    if out_err is None or in_err is None or not in_err:
        return None
    return out_err / in_err


def _with_growth(rows: list[Row], layers_path: str, embed: str) -> list[Row]:
    """Error growth of each decoder layer: rel_l2 of its output over rel_l2 of its input (its
    recorded input, else the previous layer's output, else the embedding's output)."""
    by_name = {r.name: r for r in rows}
    out = []
    for r in rows:
        if r.role == OUTPUT and r.layer is not None and r.module == f"{layers_path}.{r.layer}":
            source = by_name.get(tensor_name(r.module, INPUT)) \
                or by_name.get(tensor_name(f"{layers_path}.{r.layer - 1}", OUTPUT)) \
                or (by_name.get(tensor_name(embed, OUTPUT)) if r.layer == 0 else None)
            r = replace(r, growth=_growth(r.rel_l2, source.rel_l2 if source else None))
        out.append(r)
    return out


def _logits_report(row: Row) -> LogitsReport:
    per_prompt = [(r.prompt, r.logits) for r in row.per_prompt]
    overall, worst = pool_logits(per_prompt)
    return LogitsReport(overall, tuple(per_prompt), worst)


def unmatched_note(rule: str) -> str:
    """What a report says of a tolerance rule (where it came from) that judged no tensor."""
    return (f"no tensor compared matches the tolerance rule {rule}, which judged nothing: check its pattern against "
            "the names in the table")


def _notes(rows: list[Row], unmatched: tuple[str, ...] = ()) -> tuple[str, ...]:
    notes = [unmatched_note(rule) for rule in unmatched]
    biased = [r.layer for r in rows if r.routing is not None and r.routing.selection_not_topk]
    if biased:
        notes.append(f"routers of layers {format_ranges(sorted(x for x in biased if x is not None))} do not choose the "
                     "top-k of their recorded logits (a score bias the run does not hold, as in MiniMax-M2): "
                     "near-ties cannot be counted there; flips are still judged from both runs' logits")
    excused = [r for r in rows if r.excused]
    if excused:
        notes.append(f"{plural(len(excused), 'tensor')} (first {excused[0].name}) pass{'es' if len(excused) == 1 else ''} only without the tokens whose expert "
                     "set flipped at a near-tie or by noise-level router scores (ok* in the table)")
    return tuple(notes)
