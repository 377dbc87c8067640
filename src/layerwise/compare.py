"""Compare two runs tensor by tensor and name the first one that diverges.

`compare_runs(ref, cand, options, baseline)` aligns the runs (align.py: same prompts and tokens,
same model, same shapes; what only one run holds is skipped and listed), then streams: for each
prompt, for each tensor in model order, it reads the reference and candidate tensors (and the
baseline's) through readahead.read_units, which verifies their digests and keeps at most two groups in
memory (the one being measured and the next one being read), measures them (metrics.py,
routing.py) and judges them (tolerances.judge). Rows, verdict and first divergence come back as a frozen `Report`;
report.py renders it. Nothing here prints or writes files.
"""

from __future__ import annotations

import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from .align import Alignment, align_runs
from .errors import UserError
from .formatting import plural
from .machine import usable_device
from .metrics import (CHUNK_ELEMENTS, GPU_CHUNK_ELEMENTS, LogitsMetrics, TensorMetrics, logits_metrics, pool_logits,
                      tensor_metrics)
from .names import (INPUT, JUDGING_ORDER, OUTPUT, ROUTER_LOGITS, ROUTER_ROLES, SCORE_BIAS, TOPK_IDS, TOPK_WEIGHTS,
                    Layout, format_ranges, layer_of, split_name, tensor_name)
from .routing import AT_TIE, MOVED, RoutingMetrics, dense_weights, num_experts, pool_routing, routing_flips
from .readahead import read_units, to_device
from .runs import Run, open_run
from .tolerances import DEFAULT_TIE, Tolerance, Tolerances, dtype_class, judge

log = logging.getLogger(__name__)

_JUDGING_RANK = {role: rank for rank, role in enumerate(JUDGING_ORDER)}


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
class PromptResult:
    prompt: int
    tensor: TensorMetrics | None = None
    logits: LogitsMetrics | None = None
    routing: RoutingMetrics | None = None
    floor: TensorMetrics | None = None  # baseline against reference: the noise floor
    failures: tuple[str, ...] = ()
    excused: int = 0  # passes only without this many tokens diverted by benign routing flips
    judged: TensorMetrics | None = None  # when excused: the metrics without the diverted tokens

    @property
    def passed(self) -> bool:
        return not self.failures


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


# ---------------------------------------------------------------------------------- measuring

@dataclass
class _Context:
    ref: Run
    cand: Run
    baseline: Run | None
    options: CompareOptions
    layout: Layout
    dtypes: tuple[str | None, str | None]
    tie_threshold: float
    map_fn: Callable = map  # measures row ranges of one tensor, in parallel when a pool's map
    parts: int = 1
    device: torch.device = torch.device("cpu")  # where tensor and logits metrics run
    tolerances: dict = field(default_factory=dict)  # name -> (kind, Tolerance)
    # prompt -> token positions whose expert set flipped at a near-tie or by noise-level score
    # changes: later tensors that fail only because of them are excused (PromptResult.excused)
    diverted: dict = field(default_factory=dict)

    def judge_for(self, name: str, prompt: int) -> tuple[str, Tolerance]:
        if name not in self.tolerances:
            module, role = split_name(name)
            kind = ("routing" if role == TOPK_IDS else
                    "logits" if (module == self.layout.head and role == OUTPUT) else "tensor")
            dtypes = (*self.dtypes, self.ref.entry(name, prompt).dtype, self.cand.entry(name, prompt).dtype)
            self.tolerances[name] = (kind, self.options.tolerances.resolve(name, kind, dtypes))
        return self.tolerances[name]


def _compute_dtype(run: Run) -> str | None:
    dtype = (run.manifest.get("settings") or {}).get("dtype")
    return str(dtype) if dtype else None


def _measure_unit(ctx: _Context, p: int, unit: tuple[str, ...], t: dict, arrivals: dict) -> dict[str, PromptResult]:
    """Measure one unit; `arrivals`: its tensors streamed to the metrics' GPU, still arriving."""
    module = split_name(unit[0])[0]
    t = {key: x if key in arrivals else x.to(ctx.device) for key, x in t.items()}  # the readers copied most already
    ids = {side: t.get((side, tensor_name(module, TOPK_IDS))) for side in ("ref", "cand", "base")}
    logits = {side: t.get((side, tensor_name(module, ROUTER_LOGITS))) for side in ("ref", "cand", "base")}
    bias = {side: t.get((side, tensor_name(module, SCORE_BIAS))) for side in ("ref", "cand")}
    out = {}
    # scores, then ids (routing decides which tokens are diverted), then weights: whatever the model order
    for name in sorted(unit, key=lambda n: _JUDGING_RANK.get(split_name(n)[1], len(JUDGING_ORDER))):
        kind, tol = ctx.judge_for(name, p)
        a, b, base = t[("ref", name)], t[("cand", name)], t.get(("base", name))
        if kind == "routing":
            _check_expert_ids(name, p, ids, logits)
            rm, classes = routing_flips(a, b, logits["ref"], logits["cand"], ctx.tie_threshold,
                                        ref_bias=bias["ref"], cand_bias=bias["cand"])
            out[name] = PromptResult(p, routing=rm, failures=judge(tol, None, None, rm, None, ctx.options.noise_factor))
            scores = out.get(tensor_name(module, ROUTER_LOGITS))
            if scores is not None and scores.passed:  # flips from noise-level scores divert these tokens
                benign = ((classes == AT_TIE) | (classes == MOVED)).nonzero().squeeze(1).tolist()
                ctx.diverted.setdefault(p, set()).update(benign)
            continue
        if split_name(name)[1] == TOPK_WEIGHTS and ids["ref"] is not None and ids["cand"] is not None:
            # Weights sit in the order of their ids, which need not agree: compare per expert.
            experts = num_experts(ids.values(), logits.values())
            a, b = dense_weights(a, ids["ref"], experts), dense_weights(b, ids["cand"], experts)
            base = dense_weights(base, ids["base"], experts) if base is not None and ids["base"] is not None else None
        arriving = [arrivals.get((side, name)) for side in ("ref", "cand", "base")]
        result = _measure(ctx, p, kind, tol, a, b, base, arriving)
        diverted = sorted(ctx.diverted.get(p, ()))
        if result.failures and diverted and len(diverted) < a.shape[0]:
            keep = torch.tensor(sorted(set(range(a.shape[0])) - set(diverted)), device=a.device)
            without = _measure(ctx, p, kind, tol, a[keep], b[keep], None if base is None else base[keep])
            if without.passed:
                result = replace(result, failures=(), excused=len(diverted), judged=without.tensor)
        out[name] = result
    return out


def _measure(ctx: _Context, p: int, kind: str, tol: Tolerance, a: torch.Tensor, b: torch.Tensor,
             base: torch.Tensor | None, arriving: list | None = None) -> PromptResult:
    arriving = arriving or [None] * 3
    a, b = to_device(a, arriving[0], ctx.device), to_device(b, arriving[1], ctx.device)
    base = to_device(base, arriving[2], ctx.device) if base is not None else None
    if ctx.device.type == "cuda":  # the GPU measures in float64 at HBM speed; the bytes pass by anyway
        sizing = dict(chunk_elements=GPU_CHUNK_ELEMENTS)
    else:
        sizing = dict(map_fn=ctx.map_fn, parts=ctx.parts, chunk_elements=CHUNK_ELEMENTS)
    tm = tensor_metrics(a, b, tol.rtol, tol.atol, **sizing)
    lm = logits_metrics(a, b, ctx.options.logits_topk, chunk_elements=sizing["chunk_elements"]) \
        if kind == "logits" else None
    floor = tensor_metrics(a, base, **sizing) if base is not None else None
    return PromptResult(p, tm, lm, None, floor, judge(tol, tm, lm, None, floor, ctx.options.noise_factor))


def _check_expert_ids(name: str, prompt: int, ids: dict, logits: dict) -> None:
    for side, x in ids.items():
        if x is None or not x.numel():
            continue
        experts = logits[side].shape[-1] if logits[side] is not None else None
        if int(x.min()) < 0 or (experts is not None and int(x.max()) >= experts):
            label = {"ref": "REF", "cand": "CAND", "base": "the baseline"}[side]
            raise UserError(f"{name} (prompt {prompt}) in {label} holds expert ids outside 0-{(experts or 1) - 1}: "
                            "the run is corrupt (compare without --no-verify to check every file)")


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
    ctx = _Context(ref, cand, baseline, options, layout, dtypes, tie, device=metrics_device(options.device))
    results: dict[str, list[PromptResult]] = {name: [] for name in plan.names}
    done = 0
    threads = options.threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads, thread_name_prefix="layerwise-metrics") as pool:
        ctx.map_fn, ctx.parts = (pool.map, threads) if threads > 1 else (map, 1)
        mine = _block(plan.prompts, ranks.rank, ranks.world) if ranks is not None else plan.prompts
        for p, unit, tensors, arrivals in read_units({"ref": ref, "cand": cand, "base": baseline}, _units(plan, mine),
                                                     options.verify, options.prefetch, device=ctx.device,
                                                     streamable=lambda name: split_name(name)[1] not in ROUTER_ROLES):
            for name, result in _measure_unit(ctx, p, unit, tensors, arrivals).items():
                results[name].append(result)
            done += sum(x.numel() * x.element_size() for x in tensors.values())
            if progress is not None:
                progress(done, plan.total_bytes)
    if ranks is not None and ranks.world > 1:
        gathered = ranks.gather((results, done))
        if gathered is None:
            return None
        results = {name: [r for part, _ in gathered for r in part[name]] for name in plan.names}
        done = sum(n for _, n in gathered)
    rows = [_row(name, ctx, results[name], baseline is not None) for name in plan.names]
    rows = _with_growth(rows, layout.layers_path, layout.embed)
    first = next((r for r in rows if not r.passed), None)
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
        notes=_notes(rows),
    )


def metrics_device(device: str | None) -> torch.device:
    """Where metrics run: the device asked for, else cuda:0 when a GPU is present, else the CPU."""
    if device is None:
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(usable_device(device, "--metrics-device"))


def _row(name: str, ctx: _Context, results: list[PromptResult], with_baseline: bool) -> Row:
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


def _notes(rows: list[Row]) -> tuple[str, ...]:
    notes = []
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
