"""Renderings: the compare report's text and JSON, layer-test tables, plans, readiness, pictures;
the number formats they share. Pure functions of dataclasses, pinned here."""

import json
import math

import pytest
from synthetic_runs import toy_run

from layerwise import formatting, plot, report
from layerwise.compare import compare_runs
from layerwise.layer_test import IsolationRow
from layerwise.readiness import Check, Readiness


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return toy_run(root / "ref"), toy_run(root / "same"), toy_run(root / "bad", fault=("scale", 2, 1.5))


@pytest.mark.parametrize("fn, value, text", [
    (formatting.sci, None, "-"), (formatting.sci, 0.0, "0"), (formatting.sci, 1.234e-3, "1.2e-03"),
    (formatting.sci, math.inf, "inf"), (formatting.growth, 1.5, "1.50"), (formatting.growth, 12345.0, "1e+04"),
    (formatting.growth, math.inf, "inf"), (formatting.times, 2.0, "2.0x"), (formatting.times, None, "-"),
])
def test_number_formats(fn, value, text):
    assert fn(value) == text


def test_table_and_json_safe_numbers():
    assert formatting.table(["a", "bb"], [["xyz", "1"]], right={1}) == ["a    bb", "---  --", "xyz   1"]
    assert formatting.json_safe({"x": (math.inf, -math.inf, math.nan, 1.0)}) == {"x": ["inf", "-inf", "nan", 1.0]}


def test_passing_report_text(runs):
    ref, same, _ = runs
    text = report.report_text(compare_runs(ref, same))
    lines = text.splitlines()
    assert lines[0].startswith("REF  ") and lines[1].startswith("CAND ")
    assert any(line.split()[:2] == ["layer", "rel_l2"] for line in lines)
    rows = lines[:next(i for i, line in enumerate(lines) if line.startswith("rel_l2, 1-cos"))]
    assert [line.split()[0] for line in rows if line[:2] == "  " and line.split()[0].isdigit()] == ["0", "1", "2", "3"]
    assert lines[-1] == "PASS: all 31 compared tensors within tolerance" and ">>" not in text
    table = lines[lines.index("") + 1:]
    table = table[:next(i for i, line in enumerate(table) if line.startswith("rel_l2, 1-cos"))]
    assert len(table) == 2 + 4 + 3 and max(len(line) for line in table) <= report.WIDTH  # embed, layers, norm, head


def test_failing_report_text_marks_the_first_divergence(runs):
    ref, _, bad = runs
    result = compare_runs(ref, bad)
    text = report.report_text(result)
    marked = [line for line in text.splitlines() if line.startswith(">>")]
    assert len(marked) == 1 and marked[0].split()[1] == "2" and "FAIL" in marked[0]
    assert "first divergence: model.layers.2.self_attn:output (layer 2)" in text
    assert text.splitlines()[-1].startswith("FAIL: first divergence at model.layers.2.self_attn:output (layer 2); ")


def test_report_json_is_strict_json(runs):
    ref, _, bad = runs
    data = report.report_json(compare_runs(ref, bad))
    text = json.dumps(data, allow_nan=False)
    assert data["format"] == report.REPORT_FORMAT and data["version"] == report.REPORT_VERSION
    assert data["verdict"] == "fail" and data["first_divergence"]["layer"] == 2
    assert len(data["rows"]) == 31 and {"reference", "candidate"} == set(data["dtype"])
    assert '"sqnr_db": "inf"' in text  # an exact tensor: no error, infinite SQNR
    assert '"growth": null' in text  # a layer that adds error to an exact input: no growth to show


def test_isolation_text_names_who_is_wrong():
    rows = (IsolationRow(0, 0.0, 0.0, True, True), IsolationRow(1, 0.2, 0.2, False, False, 3, 3),
            IsolationRow(2, 0.0, 0.3, True, False))
    text = report.isolation_text(rows)
    assert "wrong themselves: layer(s) 1; only inheriting: layer(s) 2" in text
    assert "FAIL 3f" in text and text.splitlines()[2].split() == ["layer", "isolated", "rel_l2", "propagated", "rel_l2",
                                                                  "isolated", "propagated"]
    accumulating = report.isolation_text((IsolationRow(0, 0.0, 0.1, True, False),))
    assert "fail only from what they inherit (accumulation)" in accumulating


def test_readiness_text_and_json():
    result = Readiness((Check("gpus", "PASS", "1 GPU"), Check("disk", "WARN", "low"), Check("fit", "FAIL", "no")))
    text = report.readiness_text(result)
    assert text.splitlines()[0] == "PASS  gpus  1 GPU"
    assert text.splitlines()[-1] == "NOT READY: 1 fail, 1 warn, 1 pass"
    assert report.readiness_json(result) == {"ready": False, "checks": [
        {"name": "gpus", "status": "PASS", "detail": "1 GPU"}, {"name": "disk", "status": "WARN", "detail": "low"},
        {"name": "fit", "status": "FAIL", "detail": "no"}]}


def test_plan_text_and_json(tiny_minimax):
    from layerwise import models, placement

    config = models.load_config(tiny_minimax).config
    plan = placement.plan_for("tiny", config, [2 * 10**9, 2 * 10**9], 10**10, device_map="balanced",
                              max_memory=None, dtype="bf16", tokens=16, attn_implementation=None, quant=None)
    text = report.plan_text(plan)
    assert text.startswith("plan for tiny: bfloat16, device map balanced, room for a forward pass of 16 tokens")
    assert "cuda:0" in text and "cuda:1" in text and text.splitlines()[-1].startswith("verdict: fits")
    data = report.plan_json(plan)
    assert data["fits"] is True and data["verdict"] == plan.verdict and json.dumps(data)


def test_pictures(runs, tmp_path):
    ref, _, bad = runs
    result = compare_runs(ref, bad)
    png = plot.plot_png(result)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    page = plot.report_html(result)
    assert page.startswith("<!DOCTYPE html>") and "data:image/png;base64," in page
    assert "FAIL: first divergence at model.layers.2.self_attn:output" in page
    plot.write_html(result, tmp_path / "r.html")
    assert (tmp_path / "r.html").read_text() == page
