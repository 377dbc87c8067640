"""--modules REGEX[:ROLE] captures any named module; --points output keeps layer outputs only."""

import pytest
import torch

from layerwise import capture, loading, runs
from layerwise.collector import Collector
from layerwise.compare import CompareOptions, compare_runs
from layerwise.extract import ExtractOptions, extract_model
from layerwise.module_points import module_targets, parse_modules
from layerwise.prompts import Prompt, make_batches

from helpers import assert_one_line_error, run_cli

PROMPTS = ["The capital of France is", "Hi there", "a b c d e f g"]


@pytest.fixture(scope="module")
def llama():
    return loading.load_model("builtin:llama-tiny", loading.LoadOptions(dtype="fp32"))


@pytest.mark.parametrize("text, regex, roles", [
    (r"model\.layers\.\d+\.self_attn\.q_proj", r"model\.layers\.\d+\.self_attn\.q_proj", ("output",)),
    (r"model\.layers\.0\.mlp\.down_proj:input", r"model\.layers\.0\.mlp\.down_proj", ("input",)),
    ("lm_head:input,output", "lm_head", ("input", "output")),
    (r"model\.layers\.1\.self_attn\.(?:q|k)_proj", r"model\.layers\.1\.self_attn\.(?:q|k)_proj", ("output",)),
    ("a:b", "a:b", ("output",)),  # not a role: the colon belongs to the regex
])
def test_parse_modules(text, regex, roles):
    (spec,) = parse_modules([text])
    assert (spec.pattern.pattern, spec.roles) == (regex, roles)


def test_targets_follow_layers_and_files(llama):
    paths = [n for n, _ in llama.model.named_modules()]
    specs = parse_modules([r"model\.layers\.\d+\.self_attn\.[qk]_proj", "model.rotary_emb:input"])
    targets = module_targets(paths, specs, llama.anatomy, (1, 3))
    assert [(t.names[0], t.group) for t in targets] == [
        ("model.layers.1.self_attn.q_proj:output", "model.layers.1"),
        ("model.layers.1.self_attn.k_proj:output", "model.layers.1"),
        ("model.layers.3.self_attn.q_proj:output", "model.layers.3"),
        ("model.layers.3.self_attn.k_proj:output", "model.layers.3"),
        ("model.rotary_emb:input", "model.rotary_emb")]
    with pytest.raises(Exception, match="matches no module"):
        module_targets(paths, parse_modules([r"layers\.0\.q_proj"]), llama.anatomy, (0,))


def test_module_outputs_and_inputs_are_what_the_modules_saw(tmp_path, llama):
    """q_proj's output is the q projection of the layer's normed input; down_proj's input is
    act(gate) * up of the normed stream after attention; the MLP's output is down_proj of it."""
    extract_model(llama, tmp_path / "run", PROMPTS, ExtractOptions(
        points="residual,attn,mlp", batch_size=2,
        modules=(r"model\.layers\.\d+\.self_attn\.q_proj", r"model\.layers\.\d+\.mlp\.down_proj:input")))
    run = runs.open_run(tmp_path / "run")
    assert run.names[:6] == ["model.layers.0:input", "model.layers.0.self_attn.q_proj:output",
                             "model.layers.0.self_attn:output", "model.layers.0.mlp.down_proj:input",
                             "model.layers.0.mlp:output", "model.layers.0:output"]
    assert run.manifest["settings"]["modules"][0].endswith("q_proj")
    layer = llama.model.model.layers[2]
    close = dict(rtol=1e-5, atol=1e-6)
    for p, text in enumerate(PROMPTS):
        x = run.tensor("model.layers.2:input", p)
        assert x.shape[0] == len(llama.tokenizer(text)["input_ids"])
        with torch.inference_mode():
            torch.testing.assert_close(run.tensor("model.layers.2.self_attn.q_proj:output", p),
                                       layer.self_attn.q_proj(layer.input_layernorm(x)), **close)
            n = layer.post_attention_layernorm(x + run.tensor("model.layers.2.self_attn:output", p))
            down_in = run.tensor("model.layers.2.mlp.down_proj:input", p)
            torch.testing.assert_close(down_in, layer.mlp.act_fn(layer.mlp.gate_proj(n)) * layer.mlp.up_proj(n), **close)
            torch.testing.assert_close(run.tensor("model.layers.2.mlp:output", p), layer.mlp.down_proj(down_in),
                                       **close)


def test_module_errors_are_one_line(tmp_path, capsys):
    code, _, err = run_cli(capsys, "extract", "builtin:llama-tiny", "--out", tmp_path / "a", "--prompt", "hi",
                           "--modules", r"layers\.0\.q_proj")
    assert_one_line_error(code, err, "matches no module")
    code, _, err = run_cli(capsys, "extract", "builtin:llama-tiny", "--out", tmp_path / "b", "--prompt", "hi",
                           "--modules", "([", "--dtype", "fp32")
    assert_one_line_error(code, err, "bad regular expression")
    code, _, err = run_cli(capsys, "extract", "builtin:llama-tiny", "--out", tmp_path / "c", "--prompt", "hi",
                           "--modules", "lm_head", "--stream")
    assert_one_line_error(code, err, "not available with --stream")


class _Sink:
    def __init__(self):
        self.files = {}

    def put(self, prompt, group, tensors, on_written=None, finite=frozenset()):
        self.files[(prompt, group)] = dict(tensors)
        if on_written:
            on_written()


def _batch():
    return make_batches([Prompt(0, None, (1, 2, 3, 4)), Prompt(1, None, (5, 6))], 2, 0)[0]


def test_a_module_that_is_not_token_major_is_refused():
    target = capture.Target("m.attn_map", "output", ("m.attn_map:output",), "m.attn_map", extra=True)
    collector = Collector(_Sink(), [target])
    collector.start_batch(_batch())
    collector.take(target, [torch.zeros(2, 3, 4, 4)])  # [batch, heads, tokens, tokens]
    with pytest.raises(Exception, match=r"m.attn_map:output has shape \[2, 3, 4, 4\].*cannot be stored per prompt"):
        collector.close()


def test_a_module_that_did_not_run_leaves_the_rest_of_its_file():
    """An expert no token chose never runs: the layer's file is still written, without it."""
    layer = capture.Target("model.layers.0", "output", ("model.layers.0:output",), "model.layers.0")
    expert = capture.Target("model.layers.0.mlp.experts.3", "output", ("model.layers.0.mlp.experts.3:output",),
                            "model.layers.0", extra=True)
    sink = _Sink()
    collector = Collector(sink, [layer, expert])
    collector.start_batch(_batch())
    collector.take(layer, [torch.arange(16.0).reshape(2, 4, 2)])
    collector.close()
    assert set(sink.files) == {(0, "model.layers.0"), (1, "model.layers.0")}
    assert list(sink.files[(1, "model.layers.0")]) == ["model.layers.0:output"]
    assert sink.files[(1, "model.layers.0")]["model.layers.0:output"].shape == (2, 2)


def test_outputs_only_point(tmp_path, llama, capsys):
    """--points output: each layer's output and nothing else (half the bytes of residual); it compares
    with a full run on what both hold, and a layer test refuses it, saying why."""
    extract_model(llama, tmp_path / "out", PROMPTS, ExtractOptions(points="output,logits", batch_size=1))
    extract_model(llama, tmp_path / "full", PROMPTS, ExtractOptions(points="residual,logits", batch_size=1))
    out, full = runs.open_run(tmp_path / "out"), runs.open_run(tmp_path / "full")
    layers = llama.anatomy.num_layers
    assert [n for n in out.names if n != "lm_head:output"] == [f"model.layers.{k}:output" for k in range(layers)]

    def layer_bytes(run):
        return sum(e.shape[0] * e.shape[1] * 4 for e in run.entries() if e.name.startswith("model.layers."))

    assert 2 * layer_bytes(out) == layer_bytes(full)
    report = compare_runs(full, out, CompareOptions())
    assert report.passed and len(report.rows) == layers + 1
    assert report.skipped == ("model.layers.{0-3}:input: only in REF",)
    code, _, err = run_cli(capsys, "test", "builtin:llama-tiny", "--reference", tmp_path / "out", "--test-type",
                           "single", "--layer", "1", "--out", tmp_path / "t")
    assert_one_line_error(code, err, "--points output keeps layer outputs only")


def test_a_modules_input_neither_flushes_nor_keeps_a_padding_tail():
    """Only a decoder layer's input flushes what came before it (one packed copy per layer); a
    --modules input inside the layer waits for the layer's flush and is cut like an output."""
    layer_in = capture.Target("model.layers.0", "input", ("model.layers.0:input",), "model.layers.0")
    down_in = capture.Target("model.layers.0.mlp.down_proj", "input", ("model.layers.0.mlp.down_proj:input",),
                             "model.layers.0", extra=True)
    layer_out = capture.Target("model.layers.0", "output", ("model.layers.0:output",), "model.layers.0")
    sink = _Sink()
    collector = Collector(sink, [layer_in, down_in, layer_out], pinned_budget_bytes=1 << 20, copy_host_tensors=True)
    requested = []
    take = collector.pool.take
    collector.pool.take = lambda n, own=0: requested.append(n) or take(n, own)
    collector.start_batch(_batch())
    x, h, y = (torch.randn(2, 4, 3) for _ in range(3))
    for target, t in ((layer_in, x), (down_in, h), (layer_out, y)):
        collector.take(target, [t])
    collector.close()
    assert requested == [3 * 2 * 4 * 3 * 4], requested  # one packed copy of the three tensors
    short = sink.files[(1, "model.layers.0")]
    assert set(short) == {"model.layers.0:input", "model.layers.0:input_padding", "model.layers.0.mlp.down_proj:input",
                          "model.layers.0:output"}
    assert torch.equal(short["model.layers.0.mlp.down_proj:input"], h[1, :2])
