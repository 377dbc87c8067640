"""Pictures of a compare Report: a PNG plot of the metrics by layer and one self-contained HTML page.

`plot_png` and `report_html` render (Report in, bytes / str out); `write_plot` and `write_html`
write one file each, atomically. The page carries the per-token heat map of a tokenmap.TokenMap
when given one (`heatmap_png`, `token_map_html`: the picture and the numbers behind it). They need matplotlib (the `plot` extra), imported only here, and
`require_matplotlib` says how to install it before any work starts. The text of a report is
report.py's; the page embeds it.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import asdict
from typing import TYPE_CHECKING

from .atomic import write_bytes_atomic, write_text_atomic
from .errors import UserError
from .formatting import error_cells, growth, plural, sci, times
from .names import OUTPUT, part_in_layer, split_name
from .report import report_text

if TYPE_CHECKING:
    from .compare import Report, Row
    from .tokenmap import TokenMap


def _part(row: Row) -> str:
    return part_in_layer(row.module, row.role, row.layer)


def require_matplotlib() -> None:
    """Raise the UserError that says how to install the plot extra, if it is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("plots need matplotlib, which is not installed: pip install 'layerwise[plot]'") from None


def _pyplot():
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window; safe before pyplot is imported
    import matplotlib.pyplot as plt

    return plt


def _zero_level(report: Report) -> float:
    """Where an exact zero is drawn on the log axis: a decade below the smallest error."""
    positive = [r.rel_l2 for r in report.rows if r.rel_l2 and math.isfinite(r.rel_l2)]
    return 10.0 ** (math.floor(math.log10(min(positive))) - 1) if positive else 1e-16


def _series(report: Report, part: str, zero: float, judged: bool = False) -> tuple[list[int], list[float]]:
    """rel_l2 by layer of one part (as judged: without the excused diverted tokens, if `judged`);
    NaN/Inf in one run only is a gap (marked apart), an exact zero sits at `zero`."""
    points = [(r.layer, float("nan") if r.nonfinite_mismatch else
               (r.judged_rel_l2 if judged and r.excused else r.rel_l2)) for r in report.rows
              if r.layer is not None and r.rel_l2 is not None and _part(r) == part]
    return [x for x, _ in points], [max(y, zero) if math.isfinite(y) else float("nan") for _, y in points]


def _draw_errors(ax, report: Report, zero: float) -> None:
    """rel_l2 of each layer's output, attention and MLP as judged. Where tokens diverted by
    routing flips were excused, the output line leaves them out (the legend says so) and the
    error over every token is drawn faintly beside it."""
    excused = [r for r in report.rows if r.layer is not None and r.excused and _part(r) == OUTPUT]
    for part, style in ((OUTPUT, "-o"), ("self_attn", "--"), ("mlp", ":")):
        xs, ys = _series(report, part, zero, judged=True)
        if xs:
            label = f"{part} rel_l2"
            if part == OUTPUT and excused:
                label += f" as judged: without tokens diverted by routing flips ({plural(len(excused), 'layer')})"
            elif any(r.excused and _part(r) == part for r in report.rows if r.layer is not None):
                label += " as judged"
            ax.plot(xs, ys, style, markersize=3, label=label)
    if excused:
        xs, ys = _series(report, OUTPUT, zero)
        ax.plot(xs, ys, "-", color="tab:blue", alpha=0.3, linewidth=1, label="output rel_l2 over every token")
    bad = [r.layer for r in report.rows if r.layer is not None and r.nonfinite_mismatch]
    for x in sorted(set(bad)):
        ax.annotate("NaN/Inf", (x, 1.0), xycoords=("data", "axes fraction"), ha="center", va="top", fontsize=8,
                    color="tab:red")


def plot_png(report: Report) -> bytes:
    """Metrics against layer index as PNG bytes: rel_l2 of each layer's output, attention and MLP
    (log scale) with the tolerance and the baseline's noise floor; error growth; routing."""
    plt = _pyplot()
    has_routing = bool(report.routing)
    fig, axes = plt.subplots(3 if has_routing else 2, 1, figsize=(10, 8.5 if has_routing else 6.5), sharex=True,
                             gridspec_kw={"height_ratios": [3, 1.5, 1.2] if has_routing else [3, 1.5]})
    from matplotlib.ticker import MaxNLocator

    ax, zero = axes[0], _zero_level(report)
    _draw_errors(ax, report, zero)
    outputs = [r for r in report.rows if r.layer is not None and _part(r) == OUTPUT]
    limits = [(r.layer, r.rel_l2_limit) for r in outputs if r.rel_l2_limit is not None]
    if limits:
        ax.step([x for x, _ in limits], [y for _, y in limits], "r--", where="mid", linewidth=1, label="tolerance")
    floors = [(r.layer, max(r.noise_floor, zero)) for r in outputs if r.noise_floor is not None]
    if floors:
        ax.plot([x for x, _ in floors], [y for _, y in floors], color="gray", linewidth=2, alpha=0.6,
                label="noise floor (baseline)")
    ax.set_yscale("log")
    ax.set_ylabel(f"rel_l2 (0 drawn at {zero:g})")
    first = report.first_divergence
    title = "PASS" if report.passed else f"FAIL: first divergence {first.name}"
    ax.set_title(f"{title}\nREF {report.reference}  vs  CAND {report.candidate}", fontsize=9)
    growth = [(r.layer, r.growth) for r in outputs if r.growth is not None]
    finite = [g for _, g in growth if math.isfinite(g) and g > 0] + [1.0]
    axes[1].plot([x for x, _ in growth], [g if math.isfinite(g) and g > 0 else float("nan") for _, g in growth], "-o",
                 markersize=3, color="tab:purple")
    axes[1].axhline(1.0, color="gray", linewidth=0.8)
    axes[1].set_yscale("log")
    axes[1].set_ylim(min(finite) / 3, max(finite) * 3)
    axes[1].set_ylabel("error growth")
    if has_routing:
        rows = [r for r in report.routing if r.layer is not None]
        axes[2].plot([r.layer for r in rows], [r.routing.same_set for r in rows], "-o", markersize=3, color="tab:green")
        axes[2].set_ylim(-0.05, 1.05)
        axes[2].set_ylabel("same expert set")
    axes[-1].set_xlabel("layer")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    if first is not None and first.layer is not None:
        for a in axes:
            a.axvline(first.layer, color="tab:red", linewidth=1.2, alpha=0.7)
    ax.legend(fontsize=8, loc="best", framealpha=0.6)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def write_plot(report: Report, path) -> None:
    write_bytes_atomic(path, plot_png(report))


_CSS = ("body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;font-size:13px}"
        "td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}td:first-child,th:first-child"
        "{text-align:left}tr.fail{background:#fff3f3}tr.first{background:#ffd6d6;font-weight:bold}"
        ".pass{color:#176917}.fail-v{color:#b00020}pre{background:#f6f6f6;padding:1em;overflow-x:auto}")


def report_html(report: Report, token_map: TokenMap | None = None) -> str:
    """One self-contained page: verdict, plot (inline PNG), the per-token map (when given), the
    text report and every tensor."""
    png = base64.b64encode(plot_png(report)).decode("ascii")
    first = report.first_divergence
    verdict = ("<p class='pass'>PASS</p>" if report.passed else
               f"<p class='fail-v'>FAIL: first divergence at {html.escape(first.name)}</p>")
    head = ["tensor", "rel_l2", "cosine", "max_abs", "mean_abs", "sqnr_db", "nan r/c", "growth", "x floor", "check"]
    body = []
    for r in report.rows:
        cls = "first" if r is first else ("fail" if not r.passed else "")
        cells = [r.name, *error_cells(r.rel_l2, r.cosine, r.nonfinite_mismatch), sci(r.max_abs),
                 sci(r.mean_abs), "-" if r.sqnr_db is None else f"{r.sqnr_db:.1f}",
                 "-" if r.nan is None else f"{r.nan[0]}/{r.nan[1]}", growth(r.growth),
                 times(r.x_floor),
                 (f"ok* (without {plural(r.excused, 'diverted token')})" if r.excused else "ok") if r.passed
                 else "FAIL: " + "; ".join(r.failures[:2])]
        body.append(f"<tr class='{cls}'>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>layerwise compare</title>"
            f"<style>{_CSS}</style></head><body><h1>layerwise compare</h1>{verdict}"
            f"<img alt='metrics by layer' src='data:image/png;base64,{png}'>"
            f"{token_map_html(token_map) if token_map is not None else ''}<pre>{html.escape(report_text(report))}</pre><h2>Every tensor</h2><table><tr>"
            + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(body) + "</table></body></html>\n")


def write_html(report: Report, path, token_map: TokenMap | None = None) -> None:
    write_text_atomic(path, report_html(report, token_map))


# ------------------------------------------------------------------------------ per-token map

def _label(name: str, layer: int | None) -> str:
    """A row's label: `3 self_attn`, `3` (a layer's output), `norm`; other roles than output named."""
    module, role = split_name(name)
    suffix = "" if role == OUTPUT else f":{role}"
    if layer is None:
        return module.rsplit(".", 1)[-1] + suffix
    sub = module.split(f".{layer}", 1)[1].lstrip(".")
    return f"{layer}" + (f" {sub}" if sub else "") + suffix


def heatmap_png(tm: TokenMap) -> bytes:
    """The map as PNG bytes: tokens across, rows down, log colour scale (grey 0, red NaN/Inf or x/0)."""
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


def token_map_html(tm: TokenMap) -> str:
    """The HTML report's per-token block: the picture and the numbers behind it."""
    png = base64.b64encode(heatmap_png(tm)).decode("ascii")
    data = {**asdict(tm), "values": [[_json_number(v) for v in row] for row in tm.values]}
    blob = html.escape(json.dumps(data, separators=(",", ":")), quote=False)
    return (f"<h2>Per-token error</h2><p>prompt {tm.prompt}, {tm.tokens} tokens: the first divergent layer and the "
            f"{len(tm.rows)} rows with the largest error ({html.escape(', '.join(tm.rows[:3]))}...)</p>"
            f"<img alt='per-token error by layer' src='data:image/png;base64,{png}'>"
            f"<pre hidden id='layerwise-token-map'>{blob}</pre>")

