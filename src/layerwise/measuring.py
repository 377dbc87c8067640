"""Measuring and judging compare's units (a tensor, or a router's logits, ids and weights), in two
steps: `stage_unit` takes what can be taken as the unit arrives (routing, logits, the copies) and
asks its `Batch` for the tensor metrics; `judge_unit` judges the unit once they are in, in model
order, since routing flips judged in one unit excuse tokens of later ones.

On a GPU the `Batch` holds the asks of several units and measures same-shaped tensors together
(metricsbatch.py): a compare of small tensors was bound by the measuring thread's torch calls,
about thirty a tensor (BENCHMARKS.md). On the CPU it measures each tensor as it is asked, in
cache-sized blocks, over a pool's threads. The figures are the same either way (float64; sums in
another order agree to about 1e-15 relative).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from .errors import UserError
from .machine import usable_device
from .metrics import CHUNK_ELEMENTS, GPU_CHUNK_ELEMENTS, LogitsMetrics, TensorMetrics, logits_metrics, tensor_metrics
from .metricsbatch import batch_tensor_metrics
from .names import JUDGING_ORDER, OUTPUT, ROUTER_LOGITS, SCORE_BIAS, TOPK_IDS, TOPK_WEIGHTS, Layout, split_name, \
    tensor_name
from .readahead import to_device
from .routing import AT_TIE, MOVED, RoutingMetrics, dense_weights, num_experts, routing_flips
from .runs import Run
from .tolerances import Tolerance, judge

_JUDGING_RANK = {role: rank for rank, role in enumerate(JUDGING_ORDER)}
# Bytes of tensors (all sides) a GPU batch holds before it is measured: about twenty layers of a
# 512-token MiniMax-M2 run, whose residual tensors then take two stacked passes. 0: every tensor
# measured as it comes, by `tensor_metrics` (the path before batching).
BATCH_BYTES = 256 << 20
BATCH_DEVICES = ("cuda",)  # where tensor metrics are batched (on a CPU, cache-sized blocks are faster)
_SIDES = ("ref", "cand", "base")


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


class Batch:
    """Tensor metrics asked for, measured when `measure` is called (a GPU) or at once (`eager`)."""

    def __init__(self, eager: bool, sizing: Callable[[], dict]):
        self.eager, self.sizing = eager, sizing  # sizing(): tensor_metrics' block arguments
        self.jobs: list[tuple] = []
        self.results: list[TensorMetrics] = []
        self.nbytes = 0

    def ask(self, a: torch.Tensor, b: torch.Tensor, rtol: float | None = None, atol: float | None = None):
        """The metrics, or (eager off) the index its metrics will have in `results` once measured."""
        if self.eager:
            return tensor_metrics(a, b, rtol, atol, **self.sizing())
        self.jobs.append((a, b, rtol, atol))
        return len(self.jobs) - 1

    def hold(self, nbytes: int) -> bool:
        """Count a staged unit's bytes; True when the batch should be measured now."""
        self.nbytes += nbytes
        return self.eager or self.nbytes >= BATCH_BYTES

    def measure(self) -> None:
        """Measure what was asked since the last time; `get` answers for it until the next."""
        self.results = batch_tensor_metrics(self.jobs, self.sizing()["chunk_elements"])
        self.jobs = []
        self.nbytes = 0

    def get(self, asked) -> TensorMetrics | None:
        return self.results[asked] if isinstance(asked, int) else asked


@dataclass
class Context:
    ref: Run
    cand: Run
    baseline: Run | None
    options: Any  # compare.CompareOptions
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
    batch: Batch | None = None

    def __post_init__(self):
        if self.batch is None:
            self.batch = Batch(self.device.type not in BATCH_DEVICES or BATCH_BYTES <= 0, self.sizing)

    def sizing(self) -> dict:
        if self.device.type == "cuda":  # the GPU measures in float64 at HBM speed; the bytes pass by anyway
            return dict(chunk_elements=GPU_CHUNK_ELEMENTS)
        return dict(map_fn=self.map_fn, parts=self.parts, chunk_elements=CHUNK_ELEMENTS)

    def judge_for(self, name: str, prompt: int) -> tuple[str, Tolerance]:
        if name not in self.tolerances:
            module, role = split_name(name)
            kind = ("routing" if role == TOPK_IDS else
                    "logits" if (module == self.layout.head and role == OUTPUT) else "tensor")
            dtypes = (*self.dtypes, self.ref.entry(name, prompt).dtype, self.cand.entry(name, prompt).dtype)
            self.tolerances[name] = (kind, self.options.tolerances.resolve(name, kind, dtypes))
        return self.tolerances[name]


@dataclass
class Staged:
    """One tensor of a staged unit: what its judging needs."""
    name: str
    kind: str
    tol: Tolerance
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    base: torch.Tensor | None = None
    tensor: Any = None  # Batch.ask's answer
    floor: Any = None
    logits: LogitsMetrics | None = None
    routing: tuple | None = None  # (RoutingMetrics, per-token classes)


def stage_unit(ctx: Context, p: int, unit: tuple[str, ...], t: dict, arrivals: dict) -> tuple[int, str, list]:
    """Measure what one unit's judging needs, its tensor metrics asked of `ctx.batch`; `arrivals`:
    its tensors streamed to the metrics' GPU, still arriving. Returns (prompt, module, [Staged])."""
    module = split_name(unit[0])[0]
    t = {key: x if key in arrivals else x.to(ctx.device) for key, x in t.items()}  # the readers copied most already
    ids = {side: t.get((side, tensor_name(module, TOPK_IDS))) for side in _SIDES}
    logits = {side: t.get((side, tensor_name(module, ROUTER_LOGITS))) for side in _SIDES}
    bias = {side: t.get((side, tensor_name(module, SCORE_BIAS))) for side in ("ref", "cand")}
    staged = []
    # scores, then ids (routing decides which tokens are diverted), then weights: whatever the model order
    for name in sorted(unit, key=lambda n: _JUDGING_RANK.get(split_name(n)[1], len(JUDGING_ORDER))):
        kind, tol = ctx.judge_for(name, p)
        a, b, base = t[("ref", name)], t[("cand", name)], t.get(("base", name))
        if kind == "routing":
            check_expert_ids(name, p, ids, logits)
            staged.append(Staged(name, kind, tol, routing=routing_flips(
                a, b, logits["ref"], logits["cand"], ctx.tie_threshold, ref_bias=bias["ref"], cand_bias=bias["cand"])))
            continue
        if split_name(name)[1] == TOPK_WEIGHTS and ids["ref"] is not None and ids["cand"] is not None:
            # Weights sit in the order of their ids, which need not agree: compare per expert.
            experts = num_experts(ids.values(), logits.values())
            a, b = dense_weights(a, ids["ref"], experts), dense_weights(b, ids["cand"], experts)
            base = dense_weights(base, ids["base"], experts) if base is not None and ids["base"] is not None else None
        a, b, base = (to_device(x, arrivals.get((side, name)), ctx.device) if x is not None else None
                      for side, x in zip(_SIDES, (a, b, base)))
        staged.append(Staged(name, kind, tol, a, b, base, ctx.batch.ask(a, b, tol.rtol, tol.atol),
                             ctx.batch.ask(a, base) if base is not None else None,
                             logits_metrics(a, b, ctx.options.logits_topk, ctx.sizing()["chunk_elements"])
                             if kind == "logits" else None))
    return p, module, staged


def judge_unit(ctx: Context, p: int, module: str, staged: list[Staged]) -> dict[str, PromptResult]:
    """Judge one staged unit whose tensor metrics `ctx.batch` has measured (in model order)."""
    out: dict[str, PromptResult] = {}
    noise = ctx.options.noise_factor
    for s in staged:
        if s.kind == "routing":
            rm, classes = s.routing
            out[s.name] = PromptResult(p, routing=rm, failures=judge(s.tol, None, None, rm, None, noise))
            scores = out.get(tensor_name(module, ROUTER_LOGITS))
            if scores is not None and scores.passed:  # flips from noise-level scores divert these tokens
                benign = ((classes == AT_TIE) | (classes == MOVED)).nonzero().squeeze(1).tolist()
                ctx.diverted.setdefault(p, set()).update(benign)
            continue
        tm, floor = ctx.batch.get(s.tensor), ctx.batch.get(s.floor)
        result = PromptResult(p, tm, s.logits, None, floor, judge(s.tol, tm, s.logits, None, floor, noise))
        diverted = sorted(ctx.diverted.get(p, ()))
        if result.failures and diverted and len(diverted) < s.a.shape[0]:
            keep = torch.tensor(sorted(set(range(s.a.shape[0])) - set(diverted)), device=s.a.device)
            without = measure(ctx, p, s.kind, s.tol, s.a[keep], s.b[keep], None if s.base is None else s.base[keep])
            if without.passed:
                result = replace(result, failures=(), excused=len(diverted), judged=without.tensor)
        out[s.name] = result
    return out


def measure(ctx: Context, p: int, kind: str, tol: Tolerance, a: torch.Tensor, b: torch.Tensor,
            base: torch.Tensor | None) -> PromptResult:
    """One tensor measured and judged at once (the tokens left when diverted ones are excused)."""
    sizing = ctx.sizing()
    tm = tensor_metrics(a, b, tol.rtol, tol.atol, **sizing)
    lm = logits_metrics(a, b, ctx.options.logits_topk, chunk_elements=sizing["chunk_elements"]) \
        if kind == "logits" else None
    floor = tensor_metrics(a, base, **sizing) if base is not None else None
    return PromptResult(p, tm, lm, None, floor, judge(tol, tm, lm, None, floor, ctx.options.noise_factor))


def check_expert_ids(name: str, prompt: int, ids: dict, logits: dict) -> None:
    for side, x in ids.items():
        if x is None or not x.numel():
            continue
        experts = logits[side].shape[-1] if logits[side] is not None else None
        low, high = torch.stack([x.min(), x.max()]).tolist()  # one sync
        if low < 0 or (experts is not None and high >= experts):
            label = {"ref": "REF", "cand": "CAND", "base": "the baseline"}[side]
            raise UserError(f"{name} (prompt {prompt}) in {label} holds expert ids outside 0-{(experts or 1) - 1}: "
                            "the run is corrupt (compare without --no-verify to check every file)")


def metrics_device(device: str | None) -> torch.device:
    """Where metrics run: the device asked for, else cuda:0 when a GPU is present, else the CPU."""
    if device is None:
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    return torch.device(usable_device(device, "--metrics-device"))
