"""Renderings of a compare Report: terminal text, JSON, a PNG plot and one self-contained HTML page.

`report_text` and `report_json` are pure (Report in, str / dict out). `write_plot` and
`write_html` write one file each, atomically; they need matplotlib (the `plot` extra) and say so
when it is missing. docs/COMPARE.md documents the JSON schema that `report_json` returns.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from dataclasses import asdict

from .align import ranges
from .atomic import write_bytes_atomic, write_text_atomic
from .compare import Report, Row
from .errors import UserError
from .metrics import RoutingMetrics
from .sizes import format_bytes

WIDTH = 100
REPORT_FORMAT, REPORT_VERSION = "layerwise-compare-report", 1
_SHORT_ROLE = {"router_logits": "logits", "topk_ids": "ids", "topk_weights": "weights", "output": ""}


# ----------------------------------------------------------------------------------- helpers

def _sci(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0:
        return "0"
    if math.isinf(value) or math.isnan(value):
        return str(value)
    return f"{value:.1e}"


def _growth(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isinf(value) or math.isnan(value):
        return str(value)
    return f"{value:.2f}" if value < 1000 else f"{value:.0e}"


def _times(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}x" if math.isfinite(value) else str(value)


def _part(row: Row) -> str:
    """A tensor's name inside its layer: "self_attn", "mlp.gate:logits", "input", "output"."""
    match = re.match(rf"^.*?\.{row.layer}(?:\.|$)", row.module) if row.layer is not None else None
    sub = row.module[match.end():] if match else ""
    role = _SHORT_ROLE.get(row.role, row.role)
    return (sub + (":" + role if role else "")) if sub else (role or "output")


def _main_row(rows: list[Row]) -> Row:
    """The row that stands for a layer: its output, else its last tensor."""
    return next((r for r in rows if r.layer is not None and _part(r) == "output"), rows[-1])


def _routing_cell(routing: RoutingMetrics | None) -> str:
    if routing is None:
        return ""
    if not routing.flips:
        return "100%"
    return f"{100 * routing.same_set:.1f}% {routing.flips}f"


def _first_failure(rows: list[Row]) -> str:
    bad = next((r for r in rows if not r.passed), None)
    if bad is None:
        return "ok*" if any(r.excused for r in rows) else "ok"
    metric = bad.failures[0].split(": ", 1)[-1].split(" ")[0] if bad.failures else ""
    if metric.isdigit():
        metric = "NaN/Inf" if "NaN" in bad.failures[0] else "allclose"
    return f"FAIL {_part(bad)} {metric}".rstrip()


# -------------------------------------------------------------------------------------- text

def report_text(report: Report) -> str:
    """The terminal report: one row per decoder layer and per extra point (fits 100 columns),
    the first divergence marked `>>`, then its details, routing, logits and what was skipped."""
    lines = [_header(report), ""]
    baseline = report.baseline is not None
    head = ["", "layer", "rel_l2", "1-cos", "max_abs", "growth"] + (["x floor"] if baseline else []) \
        + ["routing", "check"]
    table = []
    first = report.first_divergence
    routing_by_layer = {r.layer: r.routing for r in report.routing}
    entries: list[tuple[str, list[Row]]] = []  # (label, rows) in model order
    for row in report.rows:
        if row.layer is None:
            entries.append((row.module.rsplit(".", 1)[-1], [row]))
        elif entries and entries[-1][1][0].layer == row.layer:
            entries[-1][1].append(row)
        else:
            entries.append((str(row.layer), [row]))
    for label, rows in entries:
        main = _main_row(rows)
        mark = ">>" if first is not None and first in rows else ""
        rel = "nan/inf" if main.nonfinite_mismatch else _sci(main.rel_l2)
        cells = [mark, label, rel, _sci(None if main.cosine is None else 1 - main.cosine),
                 _sci(main.max_abs), _growth(main.growth)]
        if baseline:
            cells.append(_times(main.x_floor))
        cells += [_routing_cell(routing_by_layer.get(rows[0].layer)) if rows[0].layer is not None else "",
                  _first_failure(rows)]
        table.append(cells)
    lines += [line[:WIDTH] for line in _table(head, table, right={2, 3, 4, 5, 6} | ({7} if baseline else set()))]
    lines.append("rel_l2, 1-cos, max_abs: each layer's output, worst prompt (nan/inf: NaN or Inf in one run only)")
    lines.append("growth: output rel_l2 / input rel_l2; routing: tokens with the same expert set, flips (f)")
    if any(r.excused for r in report.rows):
        lines.append("ok*: passes only without the tokens whose experts flipped at a near-tie or by noise-level scores")
    lines += _divergence_lines(report)
    lines += _routing_lines(report)
    lines += _logits_lines(report)
    lines += [f"skipped: {s}" for s in report.skipped]
    lines += [f"note: {n}" for n in report.notes]
    lines.append(_verdict_line(report))
    return "\n".join(lines)


def _table(head: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [line(head), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _header(report: Report) -> str:
    ref_dtype, cand_dtype = (d or "?" for d in report.dtypes)
    rate = report.bytes_read / report.seconds if report.seconds else 0.0
    lines = [f"REF  {report.reference} ({ref_dtype})", f"CAND {report.candidate} ({cand_dtype})"]
    if report.baseline:
        lines.append(f"BASE {report.baseline} (noise floor, {report.options.noise_factor:g}x allowed)")
    verified = " and verified" if report.options.verify else ""
    lines.append(f"{len(report.rows)} tensors x {len(report.prompts)} prompts: {format_bytes(report.bytes_read)} read"
                 f"{verified} in {report.seconds:.2f} s ({format_bytes(rate)}/s)")
    return "\n".join(lines)


def _divergence_lines(report: Report) -> list[str]:
    first = report.first_divergence
    if first is None:
        return []
    where = f" (layer {first.layer})" if first.layer is not None else ""
    out = ["", f"first divergence: {first.name}{where}, judged by {first.tolerance}"]
    out += [f"  {f}" for f in first.failures[:4]]
    if len(first.failures) > 4:
        out.append(f"  ... and {len(first.failures) - 4} more prompts")
    if first.worst_token is not None:
        out.append(f"  worst token: prompt {first.worst_token[0]}, position {first.worst_token[1]}")
    rows = [r for r in report.rows if first.layer is not None and r.layer == first.layer] or [first]
    detail = [[r.name, _sci(r.rel_l2), "-" if r.cosine is None else f"{r.cosine:.6f}", _sci(r.max_abs),
               _sci(r.mean_abs), "-" if r.nan is None else f"{r.nan[0]}/{r.nan[1]}",
               ("ok*" if r.excused else "ok") if r.passed else "FAIL"] for r in rows]
    out += ["  " + line for line in _table(["tensor", "rel_l2", "cosine", "max_abs", "mean_abs", "nan r/c", "check"],
                                           detail, right={1, 2, 3, 4, 5})]
    return out


def _routing_lines(report: Report) -> list[str]:
    """A table of the MoE layers whose expert choice changed, and why (near-tie or not)."""
    flipped = [r for r in report.routing if r.routing.flips]
    if not flipped:
        return []
    rows = [[str(r.layer if r.layer is not None else r.module), f"{100 * r.routing.same_set:.1f}%",
             f"{r.routing.jaccard:.3f}", f"{r.routing.flips}/{r.routing.tokens}", _none(r.routing.flips_at_ties),
             _none(r.routing.flips_moved), _none(r.routing.flips_inconsistent), _none(r.routing.near_ties)]
            for r in flipped]
    m = [r.routing for r in flipped]
    total = (f"  {sum(x.flips for x in m)} flips in {len(m)} layers: {_total(m, 'flips_at_ties')} at near-ties, "
             f"{_total(m, 'flips_moved')} where the scores moved, {_total(m, 'flips_inconsistent')} inconsistent")
    return ["", f"routing flips (near-tie: margin of sigmoid(router logit) + score_bias < {m[0].tie_threshold:g}; inconsistent:",
            "another selection rule, bias or expert numbering; ?: cannot be judged from what the runs hold):"] + \
        ["  " + line for line in _table(["layer", "same set", "jaccard", "flips", "at ties", "moved", "inconsistent",
                                          "REF near-ties"], rows, right=set(range(1, 8)))] + [total]


def _total(metrics: list[RoutingMetrics], attr: str) -> str:
    values = [getattr(m, attr) for m in metrics]
    return "?" if any(v is None for v in values) else str(sum(values))


def _none(value) -> str:
    return "?" if value is None else str(value)


def _logits_lines(report: Report) -> list[str]:
    if report.logits is None:
        return []
    m = report.logits.overall
    worst = f" (prompt {report.logits.worst[0]}, token {report.logits.worst[1]})" if report.logits.worst else ""
    return [f"\nlogits: top-1 agreement {100 * m.top1:.1f}%, top-{m.k} overlap {100 * m.topk:.1f}%,",
            f"  KL(ref||cand) mean {_sci(m.kl_mean)}, max {_sci(m.kl_max)} nats{worst}"] + \
        ([f"  prompt {p}: top-1 {100 * x.top1:.1f}%, top-{x.k} {100 * x.topk:.1f}%, KL mean {_sci(x.kl_mean)}"
          for p, x in report.logits.per_prompt] if len(report.logits.per_prompt) > 1 else [])


def _verdict_line(report: Report) -> str:
    if report.passed:
        return f"\nPASS: all {len(report.rows)} compared tensors within tolerance"
    first = report.first_divergence
    failing = sum(not r.passed for r in report.rows)
    layer = f" (layer {first.layer})" if first.layer is not None else ""
    return f"\nFAIL: first divergence at {first.name}{layer}; {failing} of {len(report.rows)} tensors fail"


# -------------------------------------------------------------------------------------- JSON

def _num(value):
    """JSON has no Inf or NaN: they become the strings "inf", "-inf", "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _clean(data):
    if isinstance(data, dict):
        return {k: _clean(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_clean(v) for v in data]
    return _num(data)


def _pair(value: tuple | None) -> dict | None:
    return None if value is None else {"reference": value[0], "candidate": value[1]}


def _row_json(row: Row) -> dict:
    return {
        "module": row.module, "role": row.role, "name": row.name, "layer": row.layer, "kind": row.kind,
        "dtype": _pair(row.dtypes), "max_abs": row.max_abs, "mean_abs": row.mean_abs, "rel_l2": row.rel_l2,
        "cosine": row.cosine, "sqnr_db": row.sqnr_db, "nan": _pair(row.nan), "inf": _pair(row.inf),
        "nonfinite_mismatch": row.nonfinite_mismatch, "excused_tokens": row.excused,
        "judged_rel_l2": row.judged_rel_l2,
        "worst_token": None if row.worst_token is None else {"prompt": row.worst_token[0], "token": row.worst_token[1]},
        "pass": row.passed, "tolerance": row.tolerance, "failures": list(row.failures),
        "growth": row.growth, "noise_floor": row.noise_floor, "x_floor": row.x_floor,
        "logits": None if row.logits is None else asdict(row.logits),
        "routing": None if row.routing is None else asdict(row.routing),
        "per_prompt": [{"prompt": r.prompt, "pass": r.passed, "failures": list(r.failures), "excused_tokens": r.excused,
                        "metrics": None if r.tensor is None else asdict(r.tensor),
                        "noise_floor": None if r.floor is None else r.floor.rel_l2,
                        "judged_rel_l2": None if r.judged is None else r.judged.rel_l2,
                        "logits": None if r.logits is None else asdict(r.logits),
                        "routing": None if r.routing is None else asdict(r.routing)} for r in row.per_prompt],
    }


def report_json(report: Report) -> dict:
    """The report as JSON-ready data (schema: docs/COMPARE.md; pinned by tests)."""
    first = report.first_divergence
    logits = report.logits
    data = {
        "format": REPORT_FORMAT, "version": REPORT_VERSION, "verdict": report.verdict,
        "first_divergence": None if first is None else {"module": first.module, "role": first.role,
                                                         "name": first.name, "layer": first.layer},
        "reference": report.reference, "candidate": report.candidate, "baseline": report.baseline,
        "prompts": list(report.prompts), "dtype": _pair(report.dtypes),
        "options": {"tie_threshold": report.tie_threshold, "logits_topk": report.options.logits_topk,
                    "noise_factor": report.options.noise_factor, "verify": report.options.verify},
        "rows": [_row_json(r) for r in report.rows],
        "logits": None if logits is None else {
            "name": next(r.name for r in report.rows if r.kind == "logits"), **asdict(logits.overall),
            "worst": None if logits.worst is None else {"prompt": logits.worst[0], "token": logits.worst[1]},
            "per_prompt": [{"prompt": p, **asdict(m)} for p, m in logits.per_prompt]},
        "routing": [{"module": r.module, "layer": r.layer, "pass": r.passed, **asdict(r.routing)}
                    for r in report.routing],
        "skipped": list(report.skipped), "notes": list(report.notes),
        "stats": {"bytes_read": report.bytes_read, "seconds": report.seconds,
                  "gb_per_s": report.bytes_read / report.seconds / 1e9 if report.seconds else None},
    }
    return _clean(data)


# ------------------------------------------------------------------------------- layer tests

def isolation_text(rows) -> str:
    """`layerwise test --layer all`: each layer's own error beside its propagated error
    (rows: layer_test.IsolationRow), and which layers are wrong themselves."""
    def check(passed, flips):
        if passed is None:
            return "-"
        return ("ok" if passed else "FAIL") + (f" {flips}f" if flips else "")

    table = [[str(r.layer), _sci(r.isolated_rel_l2), _sci(r.propagated_rel_l2),
              check(r.isolated_passed, r.isolated_flips), check(r.propagated_passed, r.propagated_flips)]
             for r in rows]
    lines = ["isolated: each layer fed the reference's recorded input; propagated: the layers chained from "
             "layer 0's", ""]
    lines += _table(["layer", "isolated rel_l2", "propagated rel_l2", "isolated", "propagated"], table, right={1, 2})
    own = [r.layer for r in rows if not r.isolated_passed]
    inherit = [r.layer for r in rows if r.isolated_passed and r.propagated_passed is False]
    lines.append("rel_l2 of each layer's output, worst prompt; Nf: tokens whose expert set flipped")
    if own:
        lines.append(f"wrong themselves: layer(s) {ranges(own)}" +
                     (f"; only inheriting: layer(s) {ranges(inherit)}" if inherit else ""))
    elif inherit:
        lines.append(f"every layer is right on its own input; layer(s) {ranges(inherit)} fail only from what "
                     "they inherit (accumulation)")
    return "\n".join(lines)


def layer_test_json(ltr) -> dict:
    """`layerwise test --json`: the runs made, each comparison's report and the isolation table."""
    result = ltr.result
    return _clean({
        "test_type": result.test_type, "verdict": "pass" if ltr.passed else "fail", "decided_by": ltr.decides,
        "reference": None if result.reference is None else str(result.reference),
        "runs": {k: str(v) for k, v in result.candidates.items()}, "layers": list(result.layers),
        "reports": {k: report_json(r) for k, r in ltr.reports.items()},
        "isolation": [asdict(r) for r in ltr.isolation], "notes": list(result.notes),
    })


# ---------------------------------------------------------------------------------- plot, HTML

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


def _series(report: Report, part: str, zero: float) -> tuple[list[int], list[float]]:
    points = [(r.layer, r.rel_l2) for r in report.rows
              if r.layer is not None and r.rel_l2 is not None and _part(r) == part]
    return [x for x, _ in points], [max(y, zero) if math.isfinite(y) else float("nan") for _, y in points]


def plot_png(report: Report) -> bytes:
    """Metrics against layer index as PNG bytes: rel_l2 of each layer's output, attention and MLP
    (log scale) with the tolerance and the baseline's noise floor; error growth; routing."""
    plt = _pyplot()
    has_routing = bool(report.routing)
    fig, axes = plt.subplots(3 if has_routing else 2, 1, figsize=(10, 8.5 if has_routing else 6.5), sharex=True,
                             gridspec_kw={"height_ratios": [3, 1.5, 1.2] if has_routing else [3, 1.5]})
    from matplotlib.ticker import MaxNLocator

    ax, zero = axes[0], _zero_level(report)
    for part, style in (("output", "-o"), ("self_attn", "--"), ("mlp", ":")):
        xs, ys = _series(report, part, zero)
        if xs:
            ax.plot(xs, ys, style, markersize=3, label=f"{part} rel_l2")
    excused = [(r.layer, max(r.judged_rel_l2, zero)) for r in report.rows
               if r.layer is not None and r.excused and _part(r) == "output"]
    if excused:
        ax.plot([x for x, _ in excused], [y for _, y in excused], "s", color="tab:blue", fillstyle="none",
                label="output rel_l2 without tokens diverted by routing flips")
    outputs = [r for r in report.rows if r.layer is not None and _part(r) == "output"]
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
    for x, g in growth:
        if math.isinf(g):  # no error in, error out: where an error starts
            axes[1].annotate("inf", (x, 1.0), ha="center", va="bottom", fontsize=9, color="tab:red")
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


def report_html(report: Report, token_map=None) -> str:
    """One self-contained page: verdict, plot (inline PNG), the per-token map (tokenmap.py, when
    given), the text report and every tensor."""
    png = base64.b64encode(plot_png(report)).decode("ascii")
    first = report.first_divergence
    verdict = ("<p class='pass'>PASS</p>" if report.passed else
               f"<p class='fail-v'>FAIL: first divergence at {html.escape(first.name)}</p>")
    head = ["tensor", "rel_l2", "cosine", "max_abs", "mean_abs", "sqnr_db", "nan r/c", "growth", "x floor", "check"]
    body = []
    for r in report.rows:
        cls = "first" if r is first else ("fail" if not r.passed else "")
        cells = [r.name, _sci(r.rel_l2), "-" if r.cosine is None else f"{r.cosine:.6f}", _sci(r.max_abs),
                 _sci(r.mean_abs), "-" if r.sqnr_db is None else f"{r.sqnr_db:.1f}",
                 "-" if r.nan is None else f"{r.nan[0]}/{r.nan[1]}", _growth(r.growth),
                 _times(r.x_floor),
                 (f"ok* (without {r.excused} diverted tokens)" if r.excused else "ok") if r.passed
                 else "FAIL: " + "; ".join(r.failures[:2])]
        body.append(f"<tr class='{cls}'>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>layerwise compare</title>"
            f"<style>{_CSS}</style></head><body><h1>layerwise compare</h1>{verdict}"
            f"<img alt='metrics by layer' src='data:image/png;base64,{png}'>"
            f"{_token_section(token_map)}<pre>{html.escape(report_text(report))}</pre><h2>Every tensor</h2><table><tr>"
            + "".join(f"<th>{h}</th>" for h in head) + "</tr>" + "".join(body) + "</table></body></html>\n")


def _token_section(token_map) -> str:
    if token_map is None:
        return ""
    from .tokenmap import section_html

    return section_html(token_map)


def write_html(report: Report, path, token_map=None) -> None:
    write_text_atomic(path, report_html(report, token_map))
