"""`layerwise compare` through main(argv): exit codes, report files, every input error."""

import json
import re
import sys

import pytest
import torch
from helpers import assert_one_line_error, run_cli
from synthetic_runs import PROMPTS, corrupt_tensor, toy_run

from layerwise.runs import INTENT, MANIFEST

ROW_KEYS = {"module", "role", "name", "layer", "kind", "dtype", "max_abs", "mean_abs", "rel_l2", "cosine", "sqnr_db",
            "excused_tokens", "nan", "inf", "nonfinite_mismatch", "worst_token", "pass", "tolerance", "failures",
            "growth", "judged_rel_l2",
            "noise_floor", "x_floor", "logits", "routing", "per_prompt"}
TOP_KEYS = {"format", "version", "verdict", "first_divergence", "reference", "candidate", "baseline", "prompts",
            "dtype", "options", "rows", "logits", "routing", "skipped", "notes", "stats"}
ROUTING_KEYS = {"tokens", "k", "same_set", "jaccard", "flips", "selection_not_topk", "near_ties", "flips_at_ties",
                "flips_moved", "flips_inconsistent", "tie_threshold"}
LOGITS_KEYS = {"tokens", "k", "top1", "topk", "kl_mean", "kl_max", "kl_worst_token"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    return {"ref": toy_run(d / "ref").path, "same": toy_run(d / "same").path,
            "fault": toy_run(d / "fault", fault=("scale", 2, 1.001)).path,
            "bf16": toy_run(d / "bf16", dtype=torch.bfloat16).path}


def test_pass_exit_0(capsys, runs):
    code, out, _ = run_cli(capsys, "compare", runs["ref"], runs["same"])
    assert code == 0, out
    assert "PASS: all 31 compared tensors within tolerance" in out and ">>" not in out


def test_divergence_exit_1_marks_the_layer(capsys, runs):
    code, out, _ = run_cli(capsys, "compare", runs["ref"], runs["fault"])
    assert code == 1
    marked = [line for line in out.splitlines() if line.startswith(">>")]
    assert len(marked) == 1 and marked[0].split()[1] == "2" and "FAIL self_attn rel_l2" in marked[0]
    assert "FAIL: first divergence at model.layers.2.self_attn:output (layer 2)" in out


def test_json_report_schema(capsys, runs, tmp_path):
    target = tmp_path / "report.json"
    code, out, _ = run_cli(capsys, "compare", runs["ref"], runs["fault"], "--json", target)
    assert code == 1 and "first divergence" in out  # the table is still printed
    data = json.loads(target.read_text())
    assert set(data) == TOP_KEYS
    assert (data["format"], data["version"], data["verdict"]) == ("layerwise-compare-report", 1, "fail")
    assert data["first_divergence"] == {"module": "model.layers.2.self_attn", "role": "output",
                                        "name": "model.layers.2.self_attn:output", "layer": 2}
    assert all(set(row) == ROW_KEYS for row in data["rows"])
    names = [row["name"] for row in data["rows"]]
    assert names[:3] == ["model.embed_tokens:output", "model.layers.0:input", "model.layers.0.self_attn:output"]
    assert names[-2:] == ["model.norm:output", "lm_head:output"]
    first = next(row for row in data["rows"] if row["name"] == "model.layers.2.self_attn:output")
    assert first["pass"] is False and first["rel_l2"] > 1e-4 and first["nan"] == {"reference": 0, "candidate": 0}
    assert first["worst_token"]["prompt"] in (0, 1) and first["tolerance"] == "rel_l2<=0.0001"
    embed = data["rows"][0]
    assert embed["sqnr_db"] == "inf" and embed["rel_l2"] == 0.0  # JSON has no Infinity
    ids = next(row for row in data["rows"] if row["role"] == "topk_ids")
    assert set(ids["routing"]) == ROUTING_KEYS and ids["rel_l2"] is None
    assert set(data["routing"][0]) == ROUTING_KEYS | {"module", "layer", "pass"}
    assert set(data["logits"]) == LOGITS_KEYS | {"name", "worst", "per_prompt"}
    assert data["rows"][-1]["logits"]["top1"] == 1.0
    assert json.loads(json.dumps(data, allow_nan=False)) == data  # strict JSON


def test_json_to_stdout(capsys, runs):
    code, out, _ = run_cli(capsys, "compare", runs["ref"], runs["same"], "--json", "-")
    assert code == 0 and json.loads(out)["verdict"] == "pass"


def test_plot_and_html(capsys, runs, tmp_path):
    pytest.importorskip("matplotlib")
    png, page = tmp_path / "m.png", tmp_path / "r.html"
    code, _, _ = run_cli(capsys, "compare", runs["ref"], runs["fault"], "--plot", png, "--html", page,
                         "--baseline", runs["bf16"], "--noise-factor", "0.01")
    assert code == 1
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and "data:image/png;base64," in text
    assert not re.search(r"""(src|href)\s*=\s*['"](?!data:)""", text), "the page must not load anything"
    assert "<link" not in text and "<script" not in text
    assert "class='first'" in text and "model.layers.2.self_attn:output" in text


def test_table_fits_100_columns_for_62_layers(capsys, tmp_path):
    ref = toy_run(tmp_path / "r", layers=62, prompts=PROMPTS[:1], drop=("self_attn", "topk_weights", ":input"))
    cand = toy_run(tmp_path / "c", layers=62, prompts=PROMPTS[:1], drop=("self_attn", "topk_weights", ":input"),
                   fault=("scale", 40, 1.5))
    code, out, _ = run_cli(capsys, "compare", ref.path, cand.path, "--baseline", ref.path)  # zero noise floor
    assert code == 1
    lines = [line for line in out.splitlines() if not line.startswith(("REF ", "CAND ", "BASE "))]  # paths
    assert max(len(line) for line in lines) <= 100, max(lines, key=len)
    layer_rows = [line for line in lines if re.match(r"^(>>|  )\s+\d+\s", line)]
    assert len(layer_rows) == 62


@pytest.mark.parametrize("fragment_args", [
    ("does not exist", ["/no/such/run"]),
    ("is not a layerwise run (no manifest.json)", ["EMPTY"]),
    ("is incomplete (no manifest.json)", ["INCOMPLETE"]),
])
def test_not_a_run(capsys, runs, tmp_path, fragment_args):
    fragment, (which,) = fragment_args
    path = which
    if which == "EMPTY":
        path = tmp_path / "empty"
        path.mkdir()
    elif which == "INCOMPLETE":
        path = toy_run(tmp_path / "inc").path
        (path / MANIFEST).unlink()
        assert (path / INTENT).is_file()
    code, _, err = run_cli(capsys, "compare", runs["ref"], path)
    assert_one_line_error(code, err, fragment)


def test_different_prompts(capsys, runs, tmp_path):
    other = toy_run(tmp_path / "o", prompts=[[1, 2, 3], [4, 5]]).path
    code, _, err = run_cli(capsys, "compare", runs["ref"], other)
    assert_one_line_error(code, err, "prompt 0 differs between REF and CAND")


def test_corrupt_tensor_names_the_file(capsys, tmp_path, runs):
    cand = toy_run(tmp_path / "c")
    path = corrupt_tensor(cand, "model.layers.1.mlp:output", 0)
    code, _, err = run_cli(capsys, "compare", runs["ref"], cand.path)
    assert_one_line_error(code, err, f"tensor model.layers.1.mlp:output in {path} fails its digest check")


def test_corrupt_expert_ids_without_verify(capsys, tmp_path, runs):
    cand = toy_run(tmp_path / "c")
    corrupt_tensor(cand, "model.layers.1.mlp.gate:topk_ids", 0)
    code, _, err = run_cli(capsys, "compare", runs["ref"], cand.path, "--no-verify")
    assert_one_line_error(code, err, "model.layers.1.mlp.gate:topk_ids (prompt 0) in CAND holds expert ids outside 0-7")


@pytest.mark.parametrize("args, fragment", [
    (["--tolerance", "model.layers.*:output=rel_l2>>1"],
     "cannot parse tolerance rule 'model.layers.*:output=rel_l2>>1'"),
    (["--tolerance", "rel_l2<0.1"], "cannot parse tolerance rule 'rel_l2<0.1'"),
    (["--rtol", "tiny"], "argument --rtol: 'tiny' is not a number"),
    (["--prompt-index", "0,x"], "--prompt-index '0,x': expected prompt indices"),
    (["--prompt-index", "3-1"], "'3-1' is not a valid index or range"),
    (["--prompt-index", "7"], "has no prompt 7"),
    (["--prompts", "0"], "--prompts is now --prompt-index"),
    (["--tolerance-file", "/no/such.toml"], "cannot read tolerance file"),
    (["--max-rel-l2", "-1"], "argument --max-rel-l2: -1 is negative"),
    (["--tolerance", "lm_head:output=top1>=2"], "'lm_head:output=top1>=2' (--tolerance): top1 lies from 0 to 1"),
    (["--tolerance", "*=cosine>1.5"], "cosine lies from -1 to 1, so cosine>1.5 can never hold"),
    (["--tolerance", "*.gate:topk_ids=jaccard>=3"], "jaccard lies from 0 to 1, so jaccard>=3 can never hold"),
])
def test_bad_options(capsys, runs, args, fragment):
    code, _, err = run_cli(capsys, "compare", runs["ref"], runs["same"], *args)
    assert_one_line_error(code, err, fragment)


def test_missing_plot_dependency(capsys, runs, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    for flag, name in (("--plot", "p.png"), ("--html", "r.html")):
        code, out, err = run_cli(capsys, "compare", runs["ref"], runs["same"], flag, tmp_path / name)
        assert_one_line_error(code, err, "pip install 'layerwise[plot]'")
        assert out == "" and not (tmp_path / name).exists()  # refused before any work


def test_tolerance_rule_and_file_through_cli(capsys, runs, tmp_path):
    code, _, _ = run_cli(capsys, "compare", runs["ref"], runs["fault"], "--tolerance", "*=rel_l2<0.1")
    assert code == 0
    file = tmp_path / "t.json"
    file.write_text(json.dumps({"rules": {"*": "rel_l2<0.1"}}))
    code, _, _ = run_cli(capsys, "compare", runs["ref"], runs["fault"], "--tolerance-file", file)
    assert code == 0
    code, out, _ = run_cli(capsys, "compare", runs["ref"], runs["bf16"], "--max-rel-l2", "1e-4")
    assert code == 1 and "model.embed_tokens:output" in out


@pytest.mark.parametrize("name, text, fragment", [
    ("t.toml", '[rules]\n"model.layers.*:output" = "cosine>2"\n', "cosine lies from -1 to 1, so cosine>2 can never hold"),
    ("t.json", '{"rules": {"model.layers.*:output": "cosine>2"}}', "cosine lies from -1 to 1, so cosine>2 can never hold"),
    ("t.json", '{"min_cosine": 2}', "min_cosine = 2: cosine lies from -1 to 1"),
    ("t.toml", "", "holds no limits and no rules"),
    ("t.json", "{}", "holds no limits and no rules"),
])
def test_tolerance_files_are_checked_like_flags(capsys, runs, tmp_path, name, text, fragment):
    """A limit no run can meet, or a file that judges nothing, is refused before any tensor is read."""
    pytest.importorskip("tomllib")
    file = tmp_path / name
    file.write_text(text)
    code, out, err = run_cli(capsys, "compare", runs["ref"], runs["same"], "--tolerance-file", file)
    assert_one_line_error(code, err, fragment)
    assert out == ""


def test_a_rule_that_matches_no_tensor_is_a_warning_and_a_note(capsys, runs, tmp_path):
    """A shared tolerance file may hold rules for tensors these runs lack, so a rule that judged
    nothing passes with a warning on stderr and a note in the report, not an error."""
    file = tmp_path / "t.json"
    file.write_text(json.dumps({"rules": {"model.layers.*:output": "rel_l2<0.1", "model.layrs.*": "rel_l2<1"}}))
    report = tmp_path / "r.json"
    code, out, err = run_cli(capsys, "compare", runs["ref"], runs["same"], "--tolerance", "lm_hed:output=kl<1",
                             "--tolerance", "model.layers.*:output=top1>=0.9", "--tolerance-file", file,
                             "--json", report)
    assert code == 0, err
    warned = [line for line in err.splitlines() if line]
    assert warned == [f"layerwise: warning: no tensor compared matches the tolerance rule {rule}, which judged "
                      "nothing: check its pattern against the names in the table" for rule in (
                          "--tolerance 'lm_hed:output=kl<1'", "--tolerance 'model.layers.*:output=top1>=0.9'",
                          f"{file} 'model.layrs.*=rel_l2<1'")], err
    assert "matches the tolerance rule --tolerance 'lm_hed:output=kl<1'" in out.replace("\n", " ")
    assert sum("judged nothing" in note for note in json.loads(report.read_text())["notes"]) == 3
