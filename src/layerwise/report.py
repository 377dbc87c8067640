"""Every text and JSON rendering: compare reports, layer tests, plans, readiness, placements.

Pure: dataclasses in, strings and JSON-ready dicts out; the CLI prints them, nothing here prints
or writes. docs/COMPARE.md documents the JSON schema that `report_json` returns. Pictures (PNG,
HTML) are plot.py's; numbers and tables are formatted by formatting.py.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

from .formatting import WIDTH, error_cells, growth, json_safe, plural, sci, table, times, wrap
from .names import OUTPUT, format_ranges, part_in_layer
from .sizes import format_bytes

if TYPE_CHECKING:
    from .compare import Report, Row
    from .layer_test import IsolationRow, LayerTestReport
    from .loading import DeviceRow, LoadedModel
    from .placement import Plan
    from .readiness import Readiness
    from .routing import RoutingMetrics

REPORT_FORMAT, REPORT_VERSION = "layerwise-compare-report", 1


# ----------------------------------------------------------------------------------- helpers

def _part(row: Row) -> str:
    """A tensor's name inside its layer: "self_attn", "mlp.gate:logits", "input", "output"."""
    return part_in_layer(row.module, row.role, row.layer)


def _main_row(rows: list[Row]) -> Row:
    """The row that stands for a layer: its output, else its last tensor."""
    return next((r for r in rows if r.layer is not None and _part(r) == OUTPUT), rows[-1])


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

def report_text(report: Report, per_prompt: bool = False) -> str:
    """The terminal report: one row per decoder layer and per extra point (fits 100 columns),
    the first divergence marked `>>`, then its details, routing, logits (each prompt's line
    with `per_prompt`, else a summary) and what was skipped."""
    lines = [_header(report), ""]
    baseline = report.baseline is not None
    head = ["", "layer", "rel_l2", "1-cos", "max_abs", "growth"] + (["x floor"] if baseline else []) \
        + ["routing", "check"]
    body = []
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
        rel = "nan/inf" if main.nonfinite_mismatch else sci(main.rel_l2)
        one_minus_cos = "nan" if main.nonfinite_mismatch else sci(None if main.cosine is None else 1 - main.cosine)
        cells = [mark, label, rel, one_minus_cos,
                 sci(main.max_abs), growth(main.growth)]
        if baseline:
            cells.append(times(main.x_floor))
        cells += [_routing_cell(routing_by_layer.get(rows[0].layer)) if rows[0].layer is not None else "",
                  _first_failure(rows)]
        body.append(cells)
    lines += [line[:WIDTH] for line in table(head, body, right={2, 3, 4, 5, 6} | ({7} if baseline else set()))]
    lines.append("rel_l2, 1-cos, max_abs: each layer's output, worst prompt (nan/inf: NaN or Inf in one run only)")
    lines.append("growth: output rel_l2 / input rel_l2; routing: tokens with the same expert set, flips (f)")
    if any(r.excused for r in report.rows):
        lines.append("ok*: passes only without the tokens whose experts flipped at a near-tie or by noise-level scores")
    lines += _divergence_lines(report)
    lines += _routing_lines(report)
    lines += _logits_lines(report, per_prompt)
    lines += [f"skipped: {s}" for s in report.skipped]
    lines += [line for n in report.notes for line in wrap(f"note: {n}")]
    lines.append(_verdict_line(report))
    return "\n".join(lines)


def _header(report: Report) -> str:
    ref_dtype, cand_dtype = (d or "?" for d in report.dtypes)
    rate = report.bytes_read / report.seconds if report.seconds else 0.0
    lines = [f"REF  {report.reference} ({ref_dtype})", f"CAND {report.candidate} ({cand_dtype})"]
    if report.baseline:
        lines.append(f"BASE {report.baseline} (noise floor, {report.options.noise_factor:g}x allowed)")
    verified = " and verified" if report.options.verify else ""
    lines.append(f"{plural(len(report.rows), 'tensor')} x {plural(len(report.prompts), 'prompt')}: "
                 f"{format_bytes(report.bytes_read)} read"
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
        out.append(f"  ... and {plural(len(first.failures) - 4, 'more failure')}")
    if first.worst_token is not None:
        out.append(f"  worst token: prompt {first.worst_token[0]}, position {first.worst_token[1]}")
    rows = [r for r in report.rows if first.layer is not None and r.layer == first.layer] or [first]
    detail = [[r.name, *error_cells(r.rel_l2, r.cosine, r.nonfinite_mismatch), sci(r.max_abs),
               sci(r.mean_abs), "-" if r.nan is None else f"{r.nan[0]}/{r.nan[1]}",
               ("ok*" if r.excused else "ok") if r.passed else "FAIL"] for r in rows]
    out += ["  " + line for line in table(["tensor", "rel_l2", "cosine", "max_abs", "mean_abs", "nan r/c", "check"],
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
    total = (f"  {plural(sum(x.flips for x in m), 'flip')} in {plural(len(m), 'layer')}: "
             f"{_total(m, 'flips_at_ties')} at near-ties, "
             f"{_total(m, 'flips_moved')} where the scores moved, {_total(m, 'flips_inconsistent')} inconsistent")
    return ["", f"routing flips (near-tie: margin of sigmoid(router logit) + score_bias < {m[0].tie_threshold:g}; inconsistent:",
            "another selection rule, bias or expert numbering; ?: cannot be judged from what the runs hold):"] + \
        ["  " + line for line in table(["layer", "same set", "jaccard", "flips", "at ties", "moved", "inconsistent",
                                          "REF near-ties"], rows, right=set(range(1, 8)))] + [total]


def _total(metrics: list[RoutingMetrics], attr: str) -> str:
    values = [getattr(m, attr) for m in metrics]
    return "?" if any(v is None for v in values) else str(sum(values))


def _none(value) -> str:
    return "?" if value is None else str(value)


def _logits_lines(report: Report, per_prompt: bool = False) -> list[str]:
    if report.logits is None:
        return []
    m = report.logits.overall
    worst = f" (prompt {report.logits.worst[0]}, token {report.logits.worst[1]})" if report.logits.worst else ""
    lines = [f"\nlogits: top-1 agreement {100 * m.top1:.1f}%, top-{m.k} overlap {100 * m.topk:.1f}%,",
             f"  KL(ref||cand) mean {sci(m.kl_mean)}, max {sci(m.kl_max)} nats{worst}"]
    prompts = report.logits.per_prompt
    if len(prompts) < 2:
        return lines
    if per_prompt:
        return lines + [f"  prompt {p}: top-1 {100 * x.top1:.1f}%, top-{x.k} {100 * x.topk:.1f}%, "
                        f"KL mean {sci(x.kl_mean)}" for p, x in prompts]
    low, high = min(prompts, key=lambda px: px[1].top1), max(prompts, key=lambda px: px[1].kl_mean)
    return lines + [f"  {len(prompts)} prompts: lowest top-1 {100 * low[1].top1:.1f}% (prompt {low[0]}), "
                    f"highest KL mean {sci(high[1].kl_mean)} (prompt {high[0]}); each: --per-prompt"]


def _verdict_line(report: Report) -> str:
    if report.passed:
        return f"\nPASS: all {plural(len(report.rows), 'compared tensor')} within tolerance"
    first = report.first_divergence
    failing = sum(not r.passed for r in report.rows)
    layer = f" (layer {first.layer})" if first.layer is not None else ""
    return (f"\nFAIL: first divergence at {first.name}{layer}; {failing} of {plural(len(report.rows), 'tensor')} "
            f"fail{'s' if failing == 1 else ''}")


# -------------------------------------------------------------------------------------- JSON

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
    return json_safe(data)


# ------------------------------------------------------------------------------- layer tests

def isolation_text(rows: tuple[IsolationRow, ...]) -> str:
    """`layerwise test --layer all`: each layer's own error beside its propagated error
    (rows: layer_test.IsolationRow), and which layers are wrong themselves."""
    def check(passed, flips):
        if passed is None:
            return "-"
        return ("ok" if passed else "FAIL") + (f" {flips}f" if flips else "")

    body = [[str(r.layer), sci(r.isolated_rel_l2), sci(r.propagated_rel_l2),
              check(r.isolated_passed, r.isolated_flips), check(r.propagated_passed, r.propagated_flips)]
             for r in rows]
    lines = ["isolated: each layer fed the reference's recorded input; propagated: the layers chained from "
             "layer 0's", ""]
    lines += table(["layer", "isolated rel_l2", "propagated rel_l2", "isolated", "propagated"], body, right={1, 2})
    own = [r.layer for r in rows if not r.isolated_passed]
    inherit = [r.layer for r in rows if r.isolated_passed and r.propagated_passed is False]
    lines.append("rel_l2 of each layer's output, worst prompt; Nf: tokens whose expert set flipped")
    if own:
        lines.append(f"wrong themselves: layer(s) {format_ranges(own)}" +
                     (f"; only inheriting: layer(s) {format_ranges(inherit)}" if inherit else ""))
    elif inherit:
        lines.append(f"every layer is right on its own input; layer(s) {format_ranges(inherit)} fail only from what "
                     "they inherit (accumulation)")
    return "\n".join(lines)


def layer_test_text(tested: LayerTestReport, per_prompt: bool = False) -> str:
    """What was run, then the comparison that decides the verdict (and for --layer all, the
    isolated vs propagated table)."""
    result = tested.result
    lines = []
    if result.replay is not None:
        r = result.replay
        s = r.settings
        span = f"{r.layers[0]}-{r.layers[-1]}" if len(r.layers) > 1 else f"{r.layers[0]}"
        what = f"candidate {s['candidate']}" if s.get("candidate") else "transformers layers"
        lines.append(f"{result.test_type}: layer{'s' if len(r.layers) > 1 else ''} {span} ({what}, {s['dtype']}, "
                     f"{s.get('attn_implementation') or 'default attention'}, {s['device']}) "
                     f"on reference {result.reference}")
        lines.append(f"  read {format_bytes(r.bytes_read)} of layer weights in {r.load_seconds:.2f} s; "
                     f"total {r.seconds:.2f} s")
    elif result.extract is not None:
        x = result.extract
        lines.append(f"{result.test_type}: {plural(x.prompts, 'prompt')}, {plural(x.tensors, 'tensor')}, "
                     f"{format_bytes(x.bytes)} in {x.seconds:.2f} s")
    for kind, path in result.candidates.items():
        lines.append(f"  {kind} run: {path}")
    lines.extend(f"  note: {n}" for n in result.notes)
    if tested.decides:
        lines += ["", report_text(tested.reports[tested.decides], per_prompt)]
    if tested.isolation:
        lines += ["", isolation_text(tested.isolation)]
        verdict = "PASS: every layer within tolerance on its own input" if tested.passed else \
            "FAIL: layer(s) " + ",".join(str(r.layer) for r in tested.isolation if not r.isolated_passed) + \
            " outside tolerance on their own input"
        lines += ["", verdict]
    return "\n".join(lines)


def layer_test_json(ltr: LayerTestReport) -> dict:
    """`layerwise test --json`: the runs made, each comparison's report and the isolation table."""
    result = ltr.result
    return json_safe({
        "test_type": result.test_type, "verdict": "pass" if ltr.passed else "fail", "decided_by": ltr.decides,
        "reference": None if result.reference is None else str(result.reference),
        "runs": {k: str(v) for k, v in result.candidates.items()}, "layers": list(result.layers),
        "reports": {k: report_json(r) for k, r in ltr.reports.items()},
        "isolation": [asdict(r) for r in ltr.isolation], "notes": list(result.notes),
    })


# ------------------------------------------------------------------ plans, readiness, placement

def _gb(num: int | None) -> str:
    return "-" if num is None else format_bytes(num)


def _weights(plan: Plan) -> str:
    if plan.quant == "dequantize":
        return f"{plan.dtype} (FP8 checkpoint dequantized)"
    return plan.weights_label


def plan_text(plan: Plan) -> str:
    head = (f"plan for {plan.model}: {_weights(plan)}, device map {plan.strategy}, "
            f"room for a forward pass of {plan.tokens} tokens")
    rows = [[d.device, _gb(d.weight_bytes), _gb(d.reserve_bytes) if d.device.startswith("cuda") else "-",
             f"{_gb(d.total_bytes)} / {_gb(d.capacity_bytes)}" if d.capacity_bytes else _gb(d.total_bytes),
             d.summary] for d in plan.devices]
    lines = [*wrap(head), *table(["device", "weights", "forward", "used / capacity", "modules"], rows, right={1, 2, 3})]
    spill = [d for d in plan.devices if d.device in ("cpu", "disk")]
    if spill and plan.gpu_count:
        lines += wrap("SPILL: " + "; ".join(f"{format_bytes(d.weight_bytes)} to {d.device} ({d.summary})"
                                            for d in spill))
    for note in plan.notes:
        lines += wrap("NOTE: " + note)
    lines += wrap("verdict: " + plan.verdict)
    return "\n".join(lines)


def plan_json(plan: Plan) -> dict:
    data = asdict(plan)
    data["fits"] = plan.fits
    data["verdict"] = plan.verdict
    data["device_map"] = {k: v for k, v in plan.device_map.items()}
    return data


def readiness_text(result: Readiness) -> str:
    width = max((len(c.name) for c in result.checks), default=0)
    lines = [line for c in result.checks
             for line in wrap(f"{c.status}  {c.name.ljust(width)}  {c.detail}", " " * (width + 8))]
    fails = sum(c.status == "FAIL" for c in result.checks)
    warns = sum(c.status == "WARN" for c in result.checks)
    lines.append(f"{'READY' if result.ready else 'NOT READY'}: {fails} fail, {warns} warn, "
                 f"{len(result.checks) - fails - warns} pass")
    return "\n".join(lines)


def readiness_json(result: Readiness) -> dict:
    return {"ready": result.ready, "checks": [asdict(c) for c in result.checks]}


def placement_text(loaded: LoadedModel, rows: list[DeviceRow]) -> str:
    lines = [f"loaded {loaded.ref.spec} in {loaded.seconds:.1f} s ({_weights(loaded.plan)}, device map "
             f"{loaded.plan.strategy}); inputs go to {loaded.input_device}"]
    for fix in loaded.config_fixes:
        lines.append(f"fix: {fix.detail}")
    for row in rows:
        where = f"{row.device} ({row.name})"
        mem = ""
        if row.total_bytes:
            mem = (f"   [allocated {_gb(row.allocated_bytes)} / reserved {_gb(row.reserved_bytes)} / "
                   f"total {_gb(row.total_bytes)}]")
        lines.append(f"{where}: {format_bytes(row.weight_bytes)}  {row.summary}{mem}")
    spill = [r for r in rows if r.device in ("cpu", "disk")]
    if spill and any(r.device.startswith("cuda") for r in rows):
        lines.append("WARNING: weights spilled to " + " and ".join(r.device for r in spill)
                     + ": those layers run at host/disk speed (see docs/MULTI_GPU_GUIDE.md)")
    lines.extend(loaded.notes)
    return "\n".join(lines)


def placement_json(loaded: LoadedModel, rows: list[DeviceRow]) -> dict:
    return {
        "model": loaded.ref.spec, "seconds": loaded.seconds, "input_device": str(loaded.input_device),
        "fixes": [asdict(f) for f in loaded.config_fixes], "devices": [asdict(r) for r in rows],
        "device_map": {k: v for k, v in (getattr(loaded.model, "hf_device_map", None) or loaded.plan.device_map).items()},
    }
