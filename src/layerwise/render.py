"""Text and JSON renderings of plans, readiness checks, placement reports and layer tests.

Pure: dataclasses in, strings and dicts out. The CLI prints them; nothing here prints.
"""

from __future__ import annotations

from dataclasses import asdict

from .loading import DeviceRow, LoadedModel
from .placement import Plan
from .readiness import Readiness
from .sizes import format_bytes


def table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    """A plain aligned table; columns in `right` are right-aligned (numbers)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


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
    body = table(["device", "weights", "forward", "used / capacity", "modules"], rows, right={1, 2, 3})
    lines = [head, body]
    spill = [d for d in plan.devices if d.device in ("cpu", "disk")]
    if spill and plan.gpu_count:
        lines.append("SPILL: " + "; ".join(f"{format_bytes(d.weight_bytes)} to {d.device} ({d.summary})" for d in spill))
    lines.extend("NOTE: " + n for n in plan.notes)
    lines.append("verdict: " + plan.verdict)
    return "\n".join(lines)


def plan_json(plan: Plan) -> dict:
    data = asdict(plan)
    data["fits"] = plan.fits
    data["verdict"] = plan.verdict
    data["device_map"] = {k: v for k, v in plan.device_map.items()}
    return data


def readiness_text(result: Readiness) -> str:
    width = max((len(c.name) for c in result.checks), default=0)
    lines = [f"{c.status}  {c.name.ljust(width)}  {c.detail}" for c in result.checks]
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


def layer_test_text(tested) -> str:
    """What was run, then the comparison that decides the verdict (and for --layer all, the
    isolated vs propagated table)."""
    from . import report

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
        lines.append(f"{result.test_type}: {x.prompts} prompt(s), {x.tensors} tensors, "
                     f"{format_bytes(x.bytes)} in {x.seconds:.2f} s")
    for kind, path in result.candidates.items():
        lines.append(f"  {kind} run: {path}")
    lines.extend(f"  note: {n}" for n in result.notes)
    if tested.decides:
        lines += ["", report.report_text(tested.reports[tested.decides])]
    if tested.isolation:
        lines += ["", report.isolation_text(tested.isolation)]
        verdict = "PASS: every layer within tolerance on its own input" if tested.passed else \
            "FAIL: layer(s) " + ",".join(str(r.layer) for r in tested.isolation if not r.isolated_passed) + \
            " outside tolerance on their own input"
        lines += ["", verdict]
    return "\n".join(lines)
