"""The per-token view of a comparison: where along a prompt the error sits, layer by layer.

`token_map(report)` picks one prompt (where the first divergence is worst; when nothing
diverged, where the worst layer is worst) and the rows to show: the first divergent tensor, its
layer's output, and the `worst` layer outputs with the largest error, in model order. For each
row it reads both runs' tensors and measures every token's relative error
`||ref[t] - cand[t]|| / ||ref[t]||` (0 where both are zero, inf where only the reference is, or
where a NaN/Inf stands in one run only). Long prompts are bucketed into at most `max_columns`
columns, each showing the largest error of its tokens, so a single bad token stays visible:
4096 tokens are 512 columns of 8. plot.py draws the map into the HTML page (`heatmap_png`,
`token_section`). Reading the two runs is the only effect here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .compare import Report, Row
from .names import OUTPUT
from .runs import open_run

MAX_COLUMNS = 512
WORST = 16


@dataclass(frozen=True)
class TokenMap:
    reference: str
    candidate: str
    prompt: int
    tokens: int
    rows: tuple[str, ...]  # tensor names, model order
    layers: tuple[int | None, ...]
    columns: tuple[tuple[int, int], ...]  # the tokens [begin, end) of each column
    values: tuple[tuple[float, ...], ...]  # rows x columns: the largest per-token relative error
    first: str | None  # the first divergent tensor, if any


def token_errors(ref: torch.Tensor, cand: torch.Tensor) -> list[float]:
    """Per token (dim 0): ||ref - cand|| / ||ref|| in float64 (0/0 = 0, x/0 = inf); a position
    with NaN or Inf in one run only makes its token inf."""
    a = ref.reshape(ref.shape[0], -1).double()
    b = cand.reshape(cand.shape[0], -1).double()
    finite = torch.isfinite(a) & torch.isfinite(b)
    mismatch = (~finite & ~((a == b) | (a.isnan() & b.isnan()))).any(1)
    diff = torch.where(finite, a - b, torch.zeros_like(a)).norm(dim=1)
    norm = torch.where(finite, a, torch.zeros_like(a)).norm(dim=1)
    out = []
    for d, n, bad in zip(diff.tolist(), norm.tolist(), mismatch.tolist()):
        out.append(math.inf if bad or (d > 0 and n == 0) else (d / n if n else 0.0))
    return out


def bucket(values: list[float], max_columns: int = MAX_COLUMNS) -> tuple[list[tuple[int, int]], list[float]]:
    """At most `max_columns` columns of whole tokens (equal widths but the last), each the largest value."""
    width = max(1, math.ceil(len(values) / max_columns))
    columns = [(b, min(b + width, len(values))) for b in range(0, len(values), width)]
    return columns, [max(values[b:e]) for b, e in columns]


def _is_layer_output(row: Row) -> bool:
    return row.role == OUTPUT and row.layer is not None and row.module.rsplit(".", 1)[-1] == str(row.layer)


def pick_rows(report: Report, worst: int = WORST) -> list[Row]:
    measured = [r for r in report.rows if r.rel_l2 is not None and r.kind != "routing"]
    outputs = [r for r in measured if _is_layer_output(r)] or measured
    chosen = {r.name for r in sorted(outputs, key=lambda r: -(r.rel_l2 if math.isfinite(r.rel_l2) else math.inf))[:worst]}
    first = report.first_divergence
    if first is not None and first.rel_l2 is not None:
        chosen.add(first.name)
        chosen.update(r.name for r in outputs if r.layer is not None and r.layer == first.layer)
    return [r for r in measured if r.name in chosen]


def pick_prompt(report: Report, rows: list[Row]) -> int | None:
    first = report.first_divergence
    if first is not None and first.worst_token is not None:
        return first.worst_token[0]
    ranked = [r for r in rows if r.worst_token is not None]
    if ranked:
        return max(ranked, key=lambda r: r.rel_l2 if math.isfinite(r.rel_l2) else math.inf).worst_token[0]
    return report.prompts[0] if report.prompts else None


def token_map(report: Report, worst: int = WORST, max_columns: int = MAX_COLUMNS) -> TokenMap | None:
    """The per-token map of a comparison (reads the two runs again); None when nothing to show."""
    rows = pick_rows(report, worst)
    prompt = pick_prompt(report, rows)
    if not rows or prompt is None:
        return None
    ref, cand = open_run(report.reference), open_run(report.candidate)
    rows = [r for r in rows if ref.has(r.name, prompt) and cand.has(r.name, prompt)]
    values, columns, tokens = [], [], 0
    for r in rows:
        errors = token_errors(ref.tensor(r.name, prompt, verify=False), cand.tensor(r.name, prompt, verify=False))
        columns, maxima = bucket(errors, max_columns)
        tokens = len(errors)
        values.append(tuple(maxima))
    if not rows:
        return None
    first = report.first_divergence
    return TokenMap(report.reference, report.candidate, prompt, tokens, tuple(r.name for r in rows),
                    tuple(r.layer for r in rows), tuple(columns), tuple(values), first.name if first else None)
