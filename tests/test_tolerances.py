"""Tolerance rules: parsing, precedence, dtype-scaled defaults, files."""

import json
import sys

import pytest

from layerwise.errors import UserError
from layerwise.metrics import tensor_metrics
from layerwise.tolerances import (DEFAULT_REL_L2, Check, build_tolerances, default_tolerance, dtype_class, judge,
                                  load_tolerance_file, parse_rule)


@pytest.mark.parametrize("dtypes, cls", [
    (("float32", "float32"), "fp32"),
    (("float64", "torch.float32"), "fp32"),
    (("float32", "bfloat16"), "bf16"),  # mixed takes the looser
    (("bf16",), "bf16"),
    (("float32", "float16"), "fp16"),
    (("float16", "bfloat16"), "bf16"),
    (("float8_e4m3fn", "bfloat16"), "fp8"),
    (("int32", None, "auto"), "fp32"),  # integers and unknowns do not loosen
    ((), "fp32"),
])
def test_dtype_class(dtypes, cls):
    assert dtype_class(dtypes) == cls


def test_default_table_is_ordered_and_used():
    assert DEFAULT_REL_L2["fp32"] < DEFAULT_REL_L2["fp16"] < DEFAULT_REL_L2["bf16"] < DEFAULT_REL_L2["fp8"]
    assert str(default_tolerance("tensor", ("float32", "float32"))) == f"rel_l2<={DEFAULT_REL_L2['fp32']:g}"
    assert str(default_tolerance("logits", ("float32", "bfloat16"))) == f"rel_l2<={DEFAULT_REL_L2['bf16']:g}"
    assert str(default_tolerance("routing", ("int32",))) == "flips_inconsistent<=0"


@pytest.mark.parametrize("text, pattern, checks", [
    ("model.layers.*:output=rel_l2<3e-2", "model.layers.*:output", "rel_l2<0.03"),
    (" lm_head:output = kl<1e-3 , top1>=0.99 ", "lm_head:output", "kl<0.001,top1>=0.99"),
    ("*=rtol=1e-3,atol=1e-5", "*", "allclose(rtol=0.001,atol=1e-05)"),
    ("*=rtol=1e-3", "*", "allclose(rtol=0.001,atol=0)"),
    ("*.gate:topk_ids=same_set>=0.9,flips_moved<=3", "*.gate:topk_ids", "same_set>=0.9,flips_moved<=3"),
    ("x=cosine>0.999,sqnr_db>=30", "x", "cosine>0.999,sqnr_db>=30"),
])
def test_parse_rule(text, pattern, checks):
    rule = parse_rule(text)
    assert (rule.pattern, str(rule.tolerance)) == (pattern, checks)


@pytest.mark.parametrize("text, fragment", [
    ("model.layers.*:output", "expected PATTERN=CHECK"),
    ("=rel_l2<1", "expected PATTERN=CHECK"),
    ("x=", "expected PATTERN=CHECK"),
    ("rel_l2<=3e-2", "no tensor name pattern"),
    ("x=rel_l2>3e-2", "rel_l2 needs an upper limit: rel_l2<3e-2"),
    ("x=cosine<0.9", "cosine needs a lower limit"),
    ("x=rel_l2=0.1", "rel_l2 needs an upper limit"),
    ("x=foo<1", "unknown metric 'foo'"),
    ("x=rel_l2<abc", "'abc' is not a number"),
    ("x=rel_l2<nan", "cannot be NaN"),
    ("x=rtol<1", "write rtol=1"),
    ("x=atol=-1", "atol cannot be negative"),
    ("x=rel_l2 3e-2", "is not METRIC<LIMIT"),
])
def test_unparseable_rules_name_the_rule(text, fragment):
    with pytest.raises(UserError) as info:
        parse_rule(text)
    message = str(info.value)
    assert fragment in message and repr(text) in message and "\n" not in message


@pytest.mark.parametrize("text", ["x=top1>=1", "x=cosine>=-1", "x=cosine>-1", "x=rel_l2<=0", "x=flips<=0",
                                  "x=jaccard>0", "x=sqnr_db>=-20", "x=rel_l2<inf", "x=same_set>=0"])
def test_limits_at_the_edge_of_a_metric_range_are_accepted(text):
    assert parse_rule(text).tolerance.checks


@pytest.mark.parametrize("text, fragment", [
    ("lm_head:output=top1>=2", "top1 lies from 0 to 1, so top1>=2 can never hold"),
    ("x=cosine>1.5", "cosine lies from -1 to 1, so cosine>1.5 can never hold"),
    ("x=jaccard>=3", "jaccard lies from 0 to 1, so jaccard>=3 can never hold"),
    ("x=same_set>1", "same_set>1 can never hold"),
    ("x=cosine>1", "cosine>1 can never hold"),
    ("x=topk>=inf", "topk>=inf can never hold"),
    ("x=rel_l2<0", "rel_l2 lies from 0 up, so rel_l2<0 can never hold"),
    ("x=kl<-1", "kl<-1 can never hold"),
    ("x=flips_moved<0", "flips_moved<0 can never hold"),
    ("x=sqnr_db>inf", "sqnr_db>inf can never hold"),
    ("x=top1>=-0.5", "top1 lies from 0 to 1, so top1>=-0.5 always holds"),
    ("x=cosine>=-2", "cosine>=-2 always holds"),
])
def test_limits_outside_a_metric_range_are_refused(text, fragment):
    """A limit a metric cannot reach fails every run (or passes every one): one line naming the
    rule and the range, from the command line and from a file alike."""
    with pytest.raises(UserError) as info:
        parse_rule(text)
    message = str(info.value)
    assert fragment in message and repr(text) in message and "\n" not in message, message


@pytest.mark.parametrize("name, content", [("t.json", '{"rules": {"x": "cosine>2"}}'),
                                           ("t.toml", '[rules]\n"x" = "cosine>2"\n')])
def test_tolerance_file_rules_are_range_checked(tmp_path, name, content):
    pytest.importorskip("tomllib")
    file = tmp_path / name
    file.write_text(content)
    with pytest.raises(UserError, match=f"tolerance rule 'x=cosine>2' \\({file}\\): cosine lies from -1 to 1"):
        load_tolerance_file(file)


@pytest.mark.parametrize("content, fragment", [
    ('{"min_cosine": 2}', "min_cosine = 2: cosine lies from -1 to 1, so cosine>=2 can never hold"),
    ('{"max_kl": -1}', "max_kl = -1: kl lies from 0 up, so kl<=-1 can never hold"),
    ('{"rtol": -1}', "rtol = -1 cannot be negative"),
])
def test_tolerance_file_limits_are_range_checked(tmp_path, content, fragment):
    file = tmp_path / "t.json"
    file.write_text(content)
    with pytest.raises(UserError, match=fragment):
        load_tolerance_file(file)


@pytest.mark.parametrize("name, content", [("t.toml", ""), ("t.toml", "[rules]\n"), ("t.json", "{}"),
                                           ("t.json", '{"rules": {}}')])
def test_an_empty_tolerance_file_is_refused(tmp_path, name, content):
    pytest.importorskip("tomllib")
    file = tmp_path / name
    file.write_text(content)
    with pytest.raises(UserError, match="holds no limits and no rules"):
        load_tolerance_file(file)


def test_check_semantics():
    assert Check("rel_l2", "<", 1.0).holds(0.5) and not Check("rel_l2", "<", 1.0).holds(1.0)
    assert Check("rel_l2", "<=", 1.0).holds(1.0)
    assert not Check("rel_l2", "<=", 1.0).holds(float("nan"))  # NaN never passes
    assert Check("cosine", ">", 0.9).holds(0.95) and not Check("cosine", ">=", 0.9).holds(float("nan"))


def test_precedence_rule_over_file_over_global_over_default(tmp_path):
    file = tmp_path / "tol.json"
    file.write_text(json.dumps({"max_rel_l2": 0.5, "rules": {"model.layers.*:output": "rel_l2<0.2",
                                                             "model.layers.1:output": "rel_l2<0.3"}}))
    tol = build_tolerances(["model.layers.*=rel_l2<0.01", "model.layers.2*=cosine>0.9"], file, max_rel_l2=0.05)
    dt = ("float32",)
    # the last matching command-line rule wins
    assert str(tol.resolve("model.layers.2:output", "tensor", dt)) == "cosine>0.9"
    assert str(tol.resolve("model.layers.1:output", "tensor", dt)) == "rel_l2<0.01"
    # no command-line rule matches: the file's last matching rule
    only_file = build_tolerances([], file)
    assert str(only_file.resolve("model.layers.1:output", "tensor", dt)) == "rel_l2<0.3"
    assert str(only_file.resolve("model.layers.7:output", "tensor", dt)) == "rel_l2<0.2"
    # no rule matches: the global limits (flags override the file's)
    assert str(tol.resolve("lm_head:output", "logits", dt)) == "rel_l2<=0.05"
    assert str(only_file.resolve("model.norm:output", "tensor", dt)) == "rel_l2<=0.5"
    # nothing given: the dtype default
    assert build_tolerances().resolve("model.norm:output", "tensor", ("bfloat16",)).source == "bf16 default"


def test_rules_only_touch_metrics_a_tensor_has():
    tol = build_tolerances(["*=rel_l2<0.1"])
    # expert ids have no rel_l2: the rule does not match them, the routing default applies
    assert str(tol.resolve("model.layers.0.mlp.gate:topk_ids", "routing", ())) == "flips_inconsistent<=0"
    mixed = build_tolerances(["*=rel_l2<0.1,same_set>=0.9,kl<1"])
    assert str(mixed.resolve("model.layers.0.mlp.gate:topk_ids", "routing", ())) == "same_set>=0.9"
    assert str(mixed.resolve("model.layers.0:output", "tensor", ())) == "rel_l2<0.1"
    assert str(mixed.resolve("lm_head:output", "logits", ())) == "rel_l2<0.1,kl<1"
    # global allclose limits apply to tensors, not to expert ids
    assert str(build_tolerances(rtol=1e-3).resolve("x:output", "tensor", ())) == "allclose(rtol=0.001,atol=0)"
    assert str(build_tolerances(rtol=1e-3).resolve("x:topk_ids", "routing", ())) == "flips_inconsistent<=0"


def test_toml_file(tmp_path):
    pytest.importorskip("tomllib")
    file = tmp_path / "tol.toml"
    file.write_text('rtol = 1e-3\natol = 1e-5\n[rules]\n"lm_head:output" = "kl<1e-3, top1>=0.99"\n')
    limits, rules = load_tolerance_file(file)
    assert limits == {"rtol": 1e-3, "atol": 1e-5}
    assert [(r.pattern, str(r.tolerance)) for r in rules] == [("lm_head:output", "kl<0.001,top1>=0.99")]


def test_toml_needs_python_311(tmp_path, monkeypatch):
    file = tmp_path / "tol.toml"
    file.write_text("rtol = 1e-3\n")
    monkeypatch.setitem(sys.modules, "tomllib", None)  # as on Python 3.10
    with pytest.raises(UserError, match="needs Python 3.11 or newer; write the same keys as JSON"):
        load_tolerance_file(file)


@pytest.mark.parametrize("content, name, fragment", [
    ("{not json", "t.json", "is not valid JSON"),
    ('rtol = [', "t.toml", "is not valid TOML"),
    ('{"max_rel": 1}', "t.json", "unknown key 'max_rel'"),
    ('{"rtol": "big"}', "t.json", "rtol must be a finite number"),
    ('{"rules": {"x": 3}}', "t.json", "rules must map a pattern to a string"),
    ('{"rules": {"x": "rel_l2>1"}}', "t.json", "rel_l2 needs an upper limit"),
    ("[1, 2]", "t.json", "expected a table"),
])
def test_bad_tolerance_files(tmp_path, content, name, fragment):
    file = tmp_path / name
    file.write_text(content)
    with pytest.raises(UserError, match=fragment):
        load_tolerance_file(file)


def test_missing_file_and_negative_limit(tmp_path):
    with pytest.raises(UserError, match="cannot read tolerance file"):
        load_tolerance_file(tmp_path / "nope.json")
    with pytest.raises(UserError, match="--max-rel-l2 -1: rel_l2 lies from 0 up, so rel_l2<=-1 can never hold"):
        build_tolerances(max_rel_l2=-1.0)
    with pytest.raises(UserError, match="--min-cosine 1.5: cosine lies from -1 to 1"):
        build_tolerances(min_cosine=1.5)


def _tm(ref, cand, **kw):
    import torch

    return tensor_metrics(torch.tensor(ref), torch.tensor(cand), **kw)


@pytest.mark.parametrize("rule, ref, cand, floor, reasons", [
    ("x=rel_l2<0.5", [[3.0, 4.0]], [[3.0, 4.0]], None, []),
    ("x=rel_l2<0.5", [[3.0, 4.0]], [[3.0, 0.0]], None, ["rel_l2 0.8 breaks rel_l2<0.5"]),
    ("x=rel_l2<0.5", [[3.0, 4.0]], [[3.0, 0.0]], ([[3.0, 4.0]], [[3.0, 1.0]]), []),  # 0.8 <= 2 x floor 0.6
    ("x=rel_l2<0.5", [[3.0, 4.0]], [[3.0, 0.0]], ([[3.0, 4.0]], [[3.0, 3.9]]), ["rel_l2 0.8 breaks rel_l2<0.5"]),
    ("x=atol=0.5", [[3.0, 4.0]], [[3.0, 3.0]], None, ["1 elements break allclose(rtol=0,atol=0.5)"]),
    ("x=cosine>0.9,max_abs<1", [[3.0, 4.0]], [[3.0, 0.0]], None,
     ["cosine 0.6 breaks cosine>0.9", "max_abs 4 breaks max_abs<1"]),
    ("x=rel_l2<10", [[3.0, 4.0]], [[3.0, float("nan")]], ([[3.0, 4.0]], [[3.0, 0.0]]),
     ["1 NaN/Inf where the other run differs"]),  # never forgiven, not even by the noise floor
])
def test_judge_gives_every_reason(rule, ref, cand, floor, reasons):
    tol = parse_rule(rule).tolerance
    tm = _tm(ref, cand, rtol=tol.rtol, atol=tol.atol)
    assert list(judge(tol, tm, None, None, None if floor is None else _tm(*floor), 2.0)) == reasons
