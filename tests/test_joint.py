"""`layerwise test --record-reference` (joint.py): the reference and the layer test from one read.
Oracle: the two commands it replaces, `extract --stream` then `test --reference`, run separately
on the same prompts; every tensor of every run must be bit-identical to theirs."""

import json

import pytest

from helpers import PROMPTS, assert_runs_equal
from layerwise import cli, replay
from layerwise.extract import ExtractOptions
from layerwise.layer_test import TestOptions as LayerTest, compare_layer_test, run_layer_test
from layerwise.replay import ReplayOptions
from layerwise.runs import MANIFEST, open_run
from layerwise.streaming import StreamOptions, stream_extract

MINIMAX = "builtin:minimax-m2-tiny"
FP8 = "builtin:minimax-m2-tiny-fp8"


def two_commands(tmp_path, model, candidate: ReplayOptions, layers, batch_size=2, chained=True):
    """What the user ran before: a streamed extract, then the layer test against it."""
    ref = tmp_path / "two" / "ref"
    stream_extract(model, ref, PROMPTS, ExtractOptions(batch_size=batch_size), StreamOptions(device="cpu"))
    result = replay.replay(model, ref, layers, candidate, isolated=tmp_path / "two" / "iso",
                           chained=tmp_path / "two" / "chain" if chained else None)
    return open_run(ref), result


def one_read(tmp_path, model, candidate: ReplayOptions, test_type="single", layer="all", layers=None, batch_size=2):
    options = LayerTest(test_type=test_type, reference=str(tmp_path / "one" / "ref"), layer=layer, layers=layers,
                          out=str(tmp_path / "one" / "test"), record_reference=True, candidate=candidate,
                          extract=ExtractOptions(batch_size=batch_size))
    return run_layer_test(model, options, PROMPTS)


@pytest.mark.parametrize("candidate", [ReplayOptions(device="cpu"), ReplayOptions(device="cpu", dtype="fp32",
                                                                                    attn_implementation="eager")],
                         ids=["itself", "fp32-eager"])
def test_one_read_makes_the_runs_of_the_two_commands(tmp_path, candidate):
    """Prompts of different lengths in batches of two (padded rows): the reference equals the
    streamed extract, the isolated and chained runs equal the test's replay, tensor for tensor."""
    result = one_read(tmp_path, MINIMAX, candidate)
    reference, separate = two_commands(tmp_path, MINIMAX, candidate, list(range(4)))
    assert assert_runs_equal(open_run(result.reference), reference) >= len(PROMPTS) * 4 * 2
    assert assert_runs_equal(open_run(result.candidates["isolated"]), open_run(separate.isolated)) > 0
    assert assert_runs_equal(open_run(result.candidates["chained"]), open_run(separate.chained)) > 0
    iso = open_run(result.candidates["isolated"])
    assert iso.manifest["reference"] == {"path": str(result.reference),
                                         "created": open_run(result.reference).manifest["created"]}
    assert iso.manifest["settings"]["dtype"] == ("float32" if candidate.dtype else "bfloat16")
    assert any("recorded in the same read" in n for n in iso.manifest["notes"])
    # the weights were read once: what the test counts is what the reference's stream read
    assert result.replay.bytes_read == open_run(result.reference).manifest["stats"]["weights_read_bytes"]
    tested = compare_layer_test(result)
    if candidate.dtype is None:  # the model against itself: exactly 0 on every layer
        assert tested.passed and all(r.isolated_rel_l2 == 0 for r in tested.isolation), tested.isolation


def test_one_layer_and_a_chain_of_layers(tmp_path):
    """single --layer K: only layer K's isolated run; multi --layers A-B: the chain from A."""
    candidate = ReplayOptions(device="cpu", dtype="fp32")
    single = one_read(tmp_path / "s", MINIMAX, candidate, layer="2")
    assert set(single.candidates) == {"isolated"}
    assert {n.split(":")[0].split(".")[2] for n in open_run(single.candidates["isolated"]).names} == {"2"}
    multi = one_read(tmp_path / "m", MINIMAX, candidate, test_type="multi", layers="1-2")
    _, separate = two_commands(tmp_path / "m", MINIMAX, candidate, [1, 2], chained=False)
    chain = open_run(multi.candidates["chained"])
    separate_chain = replay.replay(MINIMAX, tmp_path / "m" / "two" / "ref", [1, 2], candidate,
                                   chained=tmp_path / "m" / "two" / "chain")
    assert assert_runs_equal(chain, open_run(separate_chain.chained)) > 0
    assert_runs_equal(open_run(single.reference), open_run(multi.reference))


def test_fp8_checkpoint_candidate_in_fp8_from_the_dequantized_read(tmp_path):
    """A block-FP8 checkpoint: the reference dequantized, the candidate W8A8 (emulated on the CPU),
    from the same raw FP8 tensors."""
    candidate = ReplayOptions(device="cpu", quant="fp8", fp8_backend="emulate")
    result = one_read(tmp_path, FP8, candidate)
    reference, separate = two_commands(tmp_path, FP8, candidate, list(range(4)))
    assert reference.manifest["settings"]["quant"] == "dequantize"
    assert open_run(result.candidates["isolated"]).manifest["settings"]["quant"] == "fp8"
    assert_runs_equal(open_run(result.reference), reference)
    assert assert_runs_equal(open_run(result.candidates["isolated"]), open_run(separate.isolated)) > 0
    errors = [r.isolated_rel_l2 for r in compare_layer_test(result).isolation]
    assert all(0 < e < 0.2 for e in errors), errors  # FP8 arithmetic: an error, and a small one


def test_a_candidate_failing_midway_leaves_no_complete_run(tmp_path, monkeypatch, capsys):
    """The candidate raises at layer 2: exit 1 in one line, and neither the reference nor the
    test's runs have a manifest (nothing looks complete)."""
    (tmp_path / "fails.py").write_text(
        "import torch\n"
        "class Layer(torch.nn.Module):\n"
        "    def __init__(self, index):\n"
        "        super().__init__()\n"
        "        self.index = index\n"
        "    def forward(self, x, **kwargs):\n"
        "        if self.index == 2:\n"
        "            raise RuntimeError('no kernel for this layer')\n"
        "        return x\n"
        "def factory(config, index, weights):\n"
        "    return Layer(index)\n")
    monkeypatch.chdir(tmp_path)
    code = cli.main(["test", MINIMAX, "--record-reference", "--reference", "ref", "--out", "t", "--device", "cpu",
                     "--candidate", "fails.py:factory", "--prompt", "hello there", "--prompt", "a b c"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "no kernel for this layer" in err[0], err
    assert not (tmp_path / "ref" / MANIFEST).exists()
    assert not (tmp_path / "t" / "isolated" / MANIFEST).exists()
    assert not (tmp_path / "t" / "chained" / MANIFEST).exists()


@pytest.mark.parametrize("argv, words", [
    (["--reference", "ref", "--test-type", "full"], "--record-reference is for --test-type single or multi"),
    (["--reference", "ref"], "needs the prompts to record"),
    (["--reference", "ref", "--prompt", "hi", "--points", "router,logits"], "has no residual"),
    (["--prompt", "hi"], "--record-reference needs --reference DIR"),
], ids=["full", "no-prompts", "no-residual", "no-reference"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, argv, words):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["test", MINIMAX, "--record-reference", "--device", "cpu", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and words in err[0], err
    assert not (tmp_path / "ref").exists()


def test_cli_prints_the_report_and_the_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["test", MINIMAX, "--record-reference", "--reference", "ref", "--out", "t", "--device", "cpu",
                     "--prompt", "hello there", "--prompt", "the quick brown fox", "--json", "report.json"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "recorded in the same read of the checkpoint" in out and "PASS: every layer" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report and (tmp_path / "ref" / MANIFEST).is_file()
    assert open_run(tmp_path / "ref").manifest["producer"] == "layerwise extract"


def test_a_rerun_after_an_interruption_records_both_again(tmp_path, monkeypatch, capsys):
    """Killed at layer 2 the first time, the same command run again completes: the reference
    equals a streamed extract of the same prompts, the test's runs carry every layer."""
    (tmp_path / "once.py").write_text(
        "import pathlib\n"
        "from transformers.models.minimax_m2 import modeling_minimax_m2 as m\n"
        "def factory(config, index, weights):\n"
        "    flag = pathlib.Path('fail-once')\n"
        "    if index == 2 and flag.exists():\n"
        "        flag.unlink()\n"
        "        raise KeyboardInterrupt\n"
        "    layer = m.MiniMaxM2DecoderLayer(config, index).to(next(iter(weights.values())).dtype)\n"
        "    layer.load_state_dict(weights)\n"
        "    return layer.eval()\n")
    (tmp_path / "fail-once").write_text("")
    monkeypatch.chdir(tmp_path)
    argv = ["test", MINIMAX, "--record-reference", "--reference", "ref", "--out", "t", "--device", "cpu",
            "--candidate", "once.py:factory", "--prompt", "hello there", "--prompt", "a b c d e f"]
    assert cli.main(argv) == 130  # interrupted
    assert not (tmp_path / "ref" / MANIFEST).exists() and not (tmp_path / "t" / "isolated" / MANIFEST).exists()
    assert cli.main(argv) == 0, capsys.readouterr()
    stream_extract(MINIMAX, tmp_path / "again", ["hello there", "a b c d e f"], ExtractOptions(),
                   StreamOptions(device="cpu"))
    assert_runs_equal(open_run(tmp_path / "ref"), open_run(tmp_path / "again"))
    isolated = open_run(tmp_path / "t" / "isolated")
    assert {n.split(":")[0] for n in isolated.names if n.endswith(":output") and n.count(".") == 2} == \
        {f"model.layers.{k}" for k in range(4)}
