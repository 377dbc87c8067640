"""The per-token view of a comparison: where along a prompt the error sits, layer by layer.

`token_map(report)` picks one prompt (where the first divergence is worst; when nothing
diverged, where the worst layer is worst) and the rows to show: the first divergent tensor, its
layer's output, and the `worst` layer outputs with the largest error, in model order. For each
row it reads both runs' tensors and measures every token's relative error
`||ref[t] - cand[t]|| / ||ref[t]||` (0 where both are zero, inf where only the reference is, or
where a NaN/Inf stands in one run only). Long prompts are bucketed into at most `max_columns`
columns, each showing the largest error of its tokens, so a single bad token stays visible:
4096 tokens are 512 columns of 8. `heatmap_png` draws the map (tokens across, layers down, log
colour scale); `section_html` is the compare report's block, with the numbers behind the
picture as JSON (a hidden `<pre id='layerwise-token-map'>`) for other tools. Reading the two runs is the only effect here.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import asdict, dataclass

import torch

from .compare import Report, Row
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
    return row.role == "output" and row.layer is not None and row.module.rsplit(".", 1)[-1] == str(row.layer)


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


def _label(name: str, layer: int | None) -> str:
    module, _, role = name.rpartition(":")
    if layer is None:
        return module.rsplit(".", 1)[-1] + ("" if role == "output" else f":{role}")
    sub = module.split(f".{layer}", 1)[1].lstrip(".")
    return f"{layer}" + (f" {sub}" if sub else "") + ("" if role == "output" else f":{role}")


def heatmap_png(tm: TokenMap) -> bytes:
    from .report import _pyplot

    plt = _pyplot()
    import numpy as np
    from matplotlib.colors import LogNorm

    data = np.array(tm.values, dtype=float)
    finite = data[np.isfinite(data) & (data > 0)]
    low = finite.min() if finite.size else 1e-8
    high = max(finite.max() if finite.size else 1.0, low * 10)
    shown = np.where(np.isinf(data), high * 10, np.where(data > 0, data, low / 10))
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.28 * len(tm.rows)))
    cmap = plt.get_cmap("viridis").with_extremes(under="#f2f2f2", over="#d60000")
    edges = [b for b, _ in tm.columns] + [tm.columns[-1][1]]
    image = ax.pcolormesh(edges, np.arange(len(tm.rows) + 1), shown, cmap=cmap, norm=LogNorm(low, high), shading="flat")
    labels = [(">> " if n == tm.first else "") + _label(n, l) for n, l in zip(tm.rows, tm.layers)]
    ax.set_yticks(np.arange(len(tm.rows)) + 0.5, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"token of prompt {tm.prompt} ({tm.tokens} tokens" +
                  (f", {tm.columns[0][1] - tm.columns[0][0]} per column, the largest shown)" if len(tm.columns) < tm.tokens
                   else ")"))
    first = f"; first divergence {tm.first}" if tm.first else ""
    ax.set_title(f"per-token rel_l2 (grey: 0, red: NaN/Inf or x/0){first}", fontsize=9)
    fig.colorbar(image, ax=ax, extend="both", pad=0.01)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _json_number(value: float):
    return value if math.isfinite(value) else "inf"


def section_html(tm: TokenMap) -> str:
    """The HTML report's per-token block: the picture and the numbers behind it."""
    png = base64.b64encode(heatmap_png(tm)).decode("ascii")
    data = {**asdict(tm), "values": [[_json_number(v) for v in row] for row in tm.values]}
    blob = html.escape(json.dumps(data, separators=(",", ":")), quote=False)
    return (f"<h2>Per-token error</h2><p>prompt {tm.prompt}, {tm.tokens} tokens: the first divergent layer and the "
            f"{len(tm.rows)} rows with the largest error ({html.escape(', '.join(tm.rows[:3]))}...)</p>"
            f"<img alt='per-token error by layer' src='data:image/png;base64,{png}'>"
            f"<pre hidden id='layerwise-token-map'>{blob}</pre>")
