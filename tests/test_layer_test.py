"""`layerwise test` through main(argv): the runs it makes, and every bad input as one line + exit 2."""

import json
import time

import pytest
import torch

from layerwise import arguments, combinations, layer_test, open_run
from layerwise.errors import UserError

from helpers import assert_one_line_error, assert_runs_equal, copy_checkpoint, run_cli

MINIMAX = "builtin:minimax-m2-tiny"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A reference made by the real extract (batch 1: no padding, so replays can be bit-exact)."""
    from layerwise.cli import main

    path = tmp_path_factory.mktemp("ref") / "run"
    code = main(["test", MINIMAX, "--test-type", "extract-all", "--out", str(path),
                 "--prompt", "The capital of France is", "--prompt", "abc def", "--dtype", "fp32",
                 "--device-map", "cpu", "--batch-size", "1",
                 "--points", "residual,attn,mlp,router,norm,logits"])
    assert code == 0
    return open_run(path)


def test_a_tolerance_rule_no_test_run_matches_is_a_warning(capsys, tmp_path, reference):
    """A single test compares decoder layers only: a rule for the head judged nothing in either run,
    and says so on stderr (once); a rule the isolated run matches is not named."""
    code, out, err = run_cli(capsys, "test", MINIMAX, "--reference", reference.path, "--out", tmp_path / "t",
                             "--layer", "1", "--tolerance", "lm_head:output=kl<1",
                             "--tolerance", "model.layers.*:output=rel_l2<1")
    assert code == 0, err
    assert err.splitlines() == ["layerwise: warning: no tensor compared matches the tolerance rule --tolerance "
                                "'lm_head:output=kl<1', which judged nothing: check its pattern against the names "
                                "in the table"], err


def test_the_capture_s_host_buffers_are_pinned_ahead_for_one_layer_not_a_whole_reserve(capsys, tmp_path, reference,
                                                                                      monkeypatch):
    """The GPU warm-up pins the capture's first host buffers while layer 0 is read: as many as
    one layer's tensors take in the reference, for each output run, twice over (a few MB for
    these prompts), not the extract's 1 GiB, which the process would then tear down."""
    from layerwise import rebatch

    asked = []
    monkeypatch.setattr(rebatch, "warm_device", lambda device, dtype, capture_bytes=None: asked.append(capture_bytes))
    code, _, err = run_cli(capsys, "test", MINIMAX, "--reference", reference.path, "--out", tmp_path / "t",
                           "--layer", "1")
    assert code == 0, err
    one = sum(e.nbytes for e in reference.entries() if e.module.startswith("model.layers.1.") or
              e.module == "model.layers.1")
    tracks = len(list((tmp_path / "t").glob("*/manifest.json")))
    assert 0 < one < 1 << 20 and tracks and asked == [2 * tracks * one], (asked, one, tracks)
    assert rebatch.layer_capture_bytes(reference, "model.layers.1", 1) == 2 * one
    assert rebatch.layer_capture_bytes(reference, "model.layers.9", 1) == 0  # no such layer: nothing


def _max_output_error(reference, candidate) -> float:
    worst = 0.0
    for name in candidate.names:
        for p in candidate.prompts:
            if reference.has(name, p["index"]):
                a, b = candidate.tensor(name, p["index"]).double(), reference.tensor(name, p["index"]).double()
                worst = max(worst, ((a - b).norm() / b.norm().clamp_min(1e-30)).item())
    return worst


def test_single_all_makes_isolated_and_chained_runs(capsys, tmp_path, reference):
    code, out, err = run_cli(capsys, "test", MINIMAX, "--reference", reference.path, "--out", tmp_path / "t")
    assert code == 0, err
    assert "single: layers 0-3 (transformers layers, float32, sdpa, cpu)" in out
    assert "PASS: every layer within tolerance on its own input" in out
    isolated, chained = open_run(tmp_path / "t" / "isolated"), open_run(tmp_path / "t" / "chained")
    assert _max_output_error(reference, isolated) == 0.0
    assert _max_output_error(reference, chained) == 0.0
    assert "model.layers.3.mlp.gate:topk_ids" in isolated.names
    # what came before the replay, stage by stage, in seconds since the process began
    stats = isolated.manifest["stats"]
    startup = stats["startup"]
    stages = [stage for stage, _ in startup["stages"]]
    assert stages[-8:] == ["imported", "reference opened", "layers opened", "reference checked", "runs started",
                           "layers computed", "capture closed", "files written"], startup
    seconds = [at for _, at in startup["stages"]]
    assert 0 < seconds[-8] and seconds == sorted(seconds), startup
    replay_began = stats["timeline_origin_unix"] - startup["process_start_unix"]
    assert seconds[-4] <= replay_began + 0.02 < seconds[-3], startup  # the start-up before the replay, its end after
    assert replay_began < time.time() - startup["process_start_unix"], startup


def test_multi_and_full(capsys, tmp_path, reference):
    code, out, err = run_cli(capsys, "test", MINIMAX, "--reference", reference.path, "--out", tmp_path / "m",
                             "--test-type", "multi", "--layers", "1-2")
    assert code == 0, err
    assert "chained run" in out and _max_output_error(reference, open_run(tmp_path / "m" / "chained")) == 0.0
    code, out, err = run_cli(capsys, "test", MINIMAX, "--reference", reference.path, "--out", tmp_path / "f",
                             "--test-type", "full", "--device-map", "cpu")
    assert code == 0, err
    full = open_run(tmp_path / "f" / "full")
    assert "lm_head:output" in full.names
    assert [p["token_ids"] for p in full.prompts] == [p["token_ids"] for p in reference.prompts]
    assert _max_output_error(reference, full) == 0.0


def test_full_streamed(capsys, tmp_path, reference):
    """--stream runs the whole model one layer at a time and gives the very same run."""
    code, out, err = run_cli(capsys, "test", MINIMAX, "--reference", reference.path, "--out", tmp_path / "s",
                             "--test-type", "full", "--stream", "--device", "cpu")
    assert code == 0, err
    streamed = open_run(tmp_path / "s" / "full")
    assert streamed.manifest["stats"]["streamed"] is True
    assert _max_output_error(reference, streamed) == 0.0


def test_candidate_changes_settings(capsys, tmp_path, reference):
    code, out, err = run_cli(capsys, "test", MINIMAX, "--reference", reference.path, "--out", tmp_path / "c",
                             "--layer", "1", "--dtype", "bf16", "--attn-implementation", "eager")
    assert code == 0, err
    run = open_run(tmp_path / "c" / "isolated")
    settings = run.manifest["settings"]
    assert settings["dtype"] == "bfloat16" and settings["attn_implementation"] == "eager"
    assert run.tensor("model.layers.1:output", 0).dtype == torch.bfloat16
    assert 1e-4 < _max_output_error(reference, run) < 5e-2


def test_perturbed_layer_fails_alone_isolated_and_onward_propagated(capsys, tmp_path, tiny_minimax, reference):
    from test_replay import _perturb

    broken = _perturb(tiny_minimax.path, tmp_path / "broken", "model.layers.2.self_attn.o_proj.weight", 1.05)
    code, out, err = run_cli(capsys, "test", broken, "--reference", reference.path, "--out", tmp_path / "t",
                             "--json", tmp_path / "report.json")
    assert code == 1, err
    assert "FAIL: first divergence at model.layers.2.self_attn:output (layer 2)" in out
    assert "wrong themselves: layer(s) 2; only inheriting: layer(s) 3" in out
    assert "FAIL: layer(s) 2 outside tolerance on their own input" in out
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["verdict"] == "fail" and data["decided_by"] == "isolated"
    table = {r["layer"]: r for r in data["isolation"]}
    assert [k for k in range(4) if not table[k]["isolated_passed"]] == [2], table
    assert [k for k in range(4) if not table[k]["propagated_passed"]] == [2, 3], table
    assert table[1]["isolated_rel_l2"] == 0 and table[3]["isolated_rel_l2"] == 0 and table[3]["propagated_rel_l2"] > 0
    assert set(data["reports"]) == {"isolated", "chained"}


@pytest.mark.parametrize("factory, code, fragment", [
    ("factory", 0, "PASS: every layer within tolerance on its own input"),
    ("full_rope_factory", 1, "FAIL: first divergence at model.layers.0:output (layer 0)"),
    ("bf16_router_factory", 1, "FAIL: first divergence at model.layers.0:output (layer 0)"),
])
def test_candidate_factories_judged_with_the_layer_named(capsys, tmp_path, reference, factory, code, fragment):
    got, out, err = run_cli(capsys, "test", MINIMAX, "--reference", reference.path, "--out", tmp_path / "t",
                            "--candidate", f"reference_minimax:{factory}")
    assert got == code, err + out
    assert fragment in out


def test_report_files_and_json_to_stdout(capsys, tmp_path, reference):
    pytest.importorskip("matplotlib")
    code, out, err = run_cli(capsys, "test", MINIMAX, "--reference", reference.path, "--out", tmp_path / "t",
                             "--test-type", "multi", "--layers", "0-3", "--json", "-", "--plot", tmp_path / "p.png",
                             "--html", tmp_path / "r.html")
    assert code == 0, err
    data = json.loads(out)
    assert data["verdict"] == "pass" and data["decided_by"] == "chained" and data["isolation"] == []
    assert data["reports"]["chained"]["verdict"] == "pass"
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG" and "<html" in (tmp_path / "r.html").read_text()


def test_seed_wrapper_translates_flags():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "test_layer_by_layer_gpu.py"
    spec = importlib.util.spec_from_file_location("seed_wrapper", path)
    wrapper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wrapper)
    assert wrapper.translate(["--test-type", "extract-all"])[:8] == [
        "test", MINIMAX, "--test-type", "extract-all", "--device-map", "auto", "--out", "runs/reference"]
    args = wrapper.translate(["--test-type", "single", "--layer", "3", "--device-map", "cuda:1"])
    assert args == ["test", MINIMAX, "--test-type", "single", "--device-map", "cuda:1", "--reference", "runs/reference",
                    "--out", "runs/test-single", "--layer", "3"]
    args = wrapper.translate(["--test-type", "multi", "--layers", "0-7"])  # the seed's auto map places no layer
    assert args == ["test", MINIMAX, "--test-type", "multi", "--reference", "runs/reference", "--out",
                    "runs/test-multi", "--layers", "0-7"]
    args = wrapper.translate(["--test-type", "full", "--max-memory", "40GB"])
    assert args[:6] == ["test", MINIMAX, "--test-type", "full", "--device-map", "auto"]
    for argv in (["--test-type", "single", "--layer", "all"], ["--test-type", "multi"], ["--test-type", "full"],
                 ["--test-type", "extract-all"], ["--test-type", "full", "--max-memory", "0:60GB,1:40GB"]):
        combinations.refuse_idle(arguments.build_parser().parse_args(wrapper.translate(argv)))  # none is refused


def _bad_layer_module(tmp_path, monkeypatch):
    (tmp_path / "wide_layer.py").write_text(
        "import torch\n"
        "class Wide(torch.nn.Module):\n"
        "    def forward(self, hidden_states, **kw):\n"
        "        return torch.cat([hidden_states, hidden_states], -1)\n"
        "def make(config, layer_index, weights):\n    return Wide()\n")
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.mark.parametrize("extra, fragment", [
    (["--layer", "4"], "layer 4 is out of range: the model has layers 0-3"),
    (["--layer", "x"], "--layer 'x' is not a layer number"),
    (["--test-type", "multi", "--layers", "3-1"], "--layers 3-1 is reversed"),
    (["--test-type", "multi", "--layers", "0-7"], "layer 7 is out of range"),
    (["--test-type", "triple"], "invalid choice: 'triple'"),
    (["--candidate", "no_such_pkg.layer:make"], "cannot import no_such_pkg.layer"),
    (["--candidate", "wide_layer:make", "--layer", "0"],
     "--candidate wide_layer:make: layer 0 returned (1, 24, 128) for an input of shape (1, 24, 64)"),
    (["--test-type", "full", "--candidate", "wide_layer:make"], "use it with --test-type single or multi"),
    (["--dtype", "fp4"], "unknown dtype 'fp4'"),
    (["--device", "tpu:9"], "--device tpu:9 is not usable here"),
])
def test_bad_input_is_one_line(capsys, tmp_path, monkeypatch, reference, extra, fragment):
    _bad_layer_module(tmp_path, monkeypatch)
    code, _, err = run_cli(capsys, "test", MINIMAX, "--reference", reference.path, "--out", tmp_path / "t", *extra)
    assert_one_line_error(code, err, fragment)


def test_reference_problems_are_one_line(capsys, tmp_path, tiny_minimax, reference):
    code, _, err = run_cli(capsys, "test", MINIMAX, "--out", tmp_path / "t")
    assert_one_line_error(code, err, "needs --reference RUN")
    code, _, err = run_cli(capsys, "test", MINIMAX, "--reference", tmp_path / "nothing", "--out", tmp_path / "t")
    assert_one_line_error(code, err, "is not a run directory")
    code, _, err = run_cli(capsys, "test", "builtin:llama-tiny", "--reference", reference.path, "--out", tmp_path / "t")
    assert_one_line_error(code, err, "was made from a minimax_m2 model, not llama")
    other = copy_checkpoint(tiny_minimax.path, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (other / "config.json").write_text(json.dumps(config))
    code, _, err = run_cli(capsys, "test", other, "--reference", reference.path, "--out", tmp_path / "t")
    assert_one_line_error(code, err, "made from another model config")
    partial = tmp_path / "partial"
    code = run_cli(capsys, "test", MINIMAX, "--test-type", "extract-all", "--out", partial, "--prompt", "abc",
                   "--dtype", "fp32", "--device-map", "cpu", "--layers", "0-1")[0]
    assert code == 0
    code, _, err = run_cli(capsys, "test", MINIMAX, "--reference", partial, "--out", tmp_path / "t", "--layer", "2")
    assert_one_line_error(code, err, "has no model.layers.2:input for prompt 0")


def test_replayed_router_tensors_match_extract(tmp_path, reference):
    """The replay's hooks record what extract's capture records, score_bias included, bit for bit."""
    from layerwise import replay

    result = replay.replay(MINIMAX, reference.path, [1], isolated=tmp_path / "iso")
    run = open_run(result.isolated)
    names = {n for n in run.names if n.startswith("model.layers.1.mlp.gate:")}
    roles = ("router_logits", "score_bias", "topk_weights", "topk_ids")
    assert names == {f"model.layers.1.mlp.gate:{r}" for r in roles}
    assert assert_runs_equal(run, reference, names=names) == len(names) * 2


@pytest.mark.parametrize("text, expected", [("all", [0, 1, 2, 3]), ("0", [0]), (" 3 ", [3])])
def test_parse_layer(text, expected):
    assert layer_test.parse_layer(text, 4) == expected


@pytest.mark.parametrize("text, expected", [("0-3", [0, 1, 2, 3]), ("2-2", [2]), ("1", [1]), (" 1 - 2 ", [1, 2])])
def test_parse_layer_range(text, expected):
    assert layer_test.parse_layer_range(text, 4) == expected


@pytest.mark.parametrize("call, fragment", [
    (lambda: layer_test.parse_layer("4", 4), "layer 4 is out of range: the model has layers 0-3"),
    (lambda: layer_test.parse_layer("-1", 4), "'-1' is not a layer number: use 0-3 or all"),
    (lambda: layer_test.parse_layer_range("3-1", 4), "--layers 3-1 is reversed"),
    (lambda: layer_test.parse_layer_range("0-9", 4), "layer 9 is out of range"),
    (lambda: layer_test.parse_layer_range("a-b", 4), "is not a range"),
    (lambda: layer_test.parse_layer_range("9-1", 4), "layer 9 is out of range"),
    (lambda: layer_test.parse_layer_range("0-1,3", 4), "is not a range"),
    (lambda: layer_test.parse_layer("1,2", 4), "is not a layer number"),
])
def test_bad_layer_arguments(call, fragment):
    with pytest.raises(UserError, match=fragment):
        call()
