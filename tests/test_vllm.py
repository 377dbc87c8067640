"""vLLM: import of extract_hidden_states files, and vllm_hook driving a plain torch model with vLLM's
(hidden_states, residual) layer convention (tests/vllm_like.py), since vLLM cannot run here."""

import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from layerwise import loading, runs
from layerwise.compare import CompareOptions, compare_runs
from layerwise.engines import vllm_hook
from layerwise.extract import ExtractOptions, extract_model

from helpers import assert_one_line_error, run_cli
import vllm_like

PROMPTS = ["The capital of France is", "Hello there", "a b c d e f g h i j k l m n o p q r"]
POINTS = "embed,residual,attn,mlp,norm,logits"


@pytest.fixture(scope="module")
def llama():
    return loading.load_model("builtin:llama-tiny", loading.LoadOptions(dtype="fp32"))


@pytest.fixture(scope="module")
def reference(llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "run"
    extract_model(llama, path, PROMPTS, ExtractOptions(points=POINTS, batch_size=1))
    return runs.open_run(path)


# -------------------------------------------------------------------- extract_hidden_states files

def write_connector_files(llama, out, layer_ids, names):
    """What ExampleHiddenStatesConnector writes: <request id>.safetensors, hidden_states [tokens,
    layers, hidden] with layer id k = the stream before layer k (k = L: after the last layer, before
    the final norm), token_ids [tokens]."""
    out.mkdir()
    layers = llama.model.model.layers
    for name, text in zip(names, PROMPTS):
        ids = torch.tensor([llama.tokenizer(text)["input_ids"]])
        last = {}
        handle = layers[-1].register_forward_hook(lambda m, a, o: last.update(out=o[0] if isinstance(o, tuple) else o))
        with torch.inference_mode():
            hs = llama.model(ids, output_hidden_states=True).hidden_states
        handle.remove()
        streams = [hs[k][0] if k < len(layers) else last["out"][0] for k in layer_ids]
        save_file({"hidden_states": torch.stack(streams, 1).contiguous(), "token_ids": ids[0]},
                  str(out / f"{name}.safetensors"))
        (out / f"{name}.safetensors.lock").write_text("")


def test_extract_hidden_states_import(tmp_path, llama, reference, capsys):
    write_connector_files(llama, tmp_path / "hs", [0, 2, 4], ["req-9", "req-10", "req-11"])
    code, out, err = run_cli(capsys, "import", tmp_path / "hs", "--out", tmp_path / "run", "--layers", "4,0,2")
    assert code == 0, err
    assert "from vllm (float32): 3 prompts, 9 tensors" in out
    run = runs.open_run(tmp_path / "run")
    assert [p["source_id"] for p in run.prompts] == ["req-9", "req-10", "req-11"]  # natural order
    assert run.names == ["model.layers.0:input", "model.layers.1:output", "model.layers.3:output"]
    for name in run.names:
        for p in range(3):
            assert torch.equal(run.tensor(name, p), reference.tensor(name, p)), (name, p)
    code, _, err = run_cli(capsys, "import", tmp_path / "hs", "--out", tmp_path / "r2")
    assert_one_line_error(code, err, "pass --layers with the eagle_aux_hidden_state_layer_ids")
    code, _, err = run_cli(capsys, "import", tmp_path / "hs", "--out", tmp_path / "r3", "--layers", "1,2")
    assert_one_line_error(code, err, "names 2 distinct layer ids, but")


# ----------------------------------------------------------------------------------- vllm_hook

@pytest.fixture
def fake_vllm(monkeypatch):
    """vLLM's forward context, as the hook reads it: attention metadata with query_start_loc."""
    package = types.ModuleType("vllm")
    context = types.ModuleType("vllm.forward_context")
    context.get_forward_context = lambda: types.SimpleNamespace(
        attn_metadata={"model.layers.0.self_attn.attn": vllm_like.BATCH})
    monkeypatch.setitem(sys.modules, "vllm", package)
    monkeypatch.setitem(sys.modules, "vllm.forward_context", context)
    return package


def serve(model, llama, requests):
    """Run `requests` like vLLM's scheduler: each step a flat batch of (slot, token ids, first position)."""
    for step in requests:
        ids, positions, starts = [], [], [0]
        for _, tokens, first in step:
            ids += tokens
            positions += list(range(first, first + len(tokens)))
            starts.append(len(ids))
        vllm_like.set_batch(starts, [slot for slot, _, _ in step])
        with torch.inference_mode():
            model(torch.tensor(ids), torch.tensor(positions))


def schedule(llama):
    ids = [llama.tokenizer(p)["input_ids"] for p in PROMPTS]
    half = len(ids[2]) // 2
    return ids, [[(0, ids[0], 0), (1, ids[1], 0)],  # two prompts packed
                 [(0, [7], len(ids[0])), (1, [8], len(ids[1]))],  # a decode step each
                 [(2, ids[2][:half], 0)], [(2, ids[2][half:], half)]]  # a chunked prefill


@pytest.mark.parametrize("context", [True, False], ids=["query_start_loc", "positions"])
def test_hook_run_matches_transformers(tmp_path, llama, reference, request, context):
    """The residual stream recorded as hidden_states + residual: the vLLM-style model's run compares
    with transformers' within fp32 rounding at every point, decode tokens skipped."""
    if context:
        request.getfixturevalue("fake_vllm")
    model = vllm_like.from_hf(llama.model)
    hooks = vllm_hook.install(model, str(tmp_path / "run"), points=POINTS, spec="builtin:llama-tiny")
    assert hooks == 2 + 2 + 4 * 4
    ids, requests = schedule(llama)
    serve(model, llama, requests)
    summary = vllm_hook.finish(model)
    assert summary["prompts"] == 3 and summary["tensors"] == 3 * 19
    run = runs.open_run(tmp_path / "run")
    assert [p["token_ids"] for p in run.prompts] == ids
    report = compare_runs(reference, run, CompareOptions())
    assert report.passed and len(report.rows) == 19 and not report.skipped
    worst = max(r.rel_l2 for r in report.rows)
    assert worst < 1e-5, worst
    print(f"vllm_hook vs transformers: worst rel_l2 {worst:.2e}")
    assert report.logits.overall.top1 == 1.0
    assert not any(h for h in model._forward_hooks.values())  # finish removed the hooks


def test_only_the_mlp_output_would_not_be_the_stream(tmp_path, llama, reference, fake_vllm):
    """What the hook is for: vLLM's layer output[0] alone (the MLP's output) is far from the stream."""
    model = vllm_like.from_hf(llama.model)
    vllm_hook.install(model, str(tmp_path / "run"), points="residual", spec="builtin:llama-tiny")
    serve(model, llama, schedule(llama)[1][:1])
    vllm_hook.finish(model)
    run = runs.open_run(tmp_path / "run")
    stream, mlp = run.tensor("model.layers.1:output", 0), reference.tensor("model.layers.1.mlp:output", 0)
    ref = reference.tensor("model.layers.1:output", 0)
    assert (stream - ref).norm() / ref.norm() < 1e-5 < (mlp - ref).norm() / ref.norm()


def test_decode_tokens_included(tmp_path, llama, fake_vllm):
    model = vllm_like.from_hf(llama.model)
    vllm_hook.install(model, str(tmp_path / "run"), points="residual", decode="include")
    ids, requests = schedule(llama)
    serve(model, llama, requests)
    vllm_hook.finish(model)
    run = runs.open_run(tmp_path / "run")
    assert [p["token_ids"] for p in run.prompts] == [ids[0] + [7], ids[1] + [8], ids[2]]
    with torch.inference_mode():
        hs = llama.model(torch.tensor([ids[0] + [7]]), output_hidden_states=True).hidden_states
    torch.testing.assert_close(run.tensor("model.layers.2:output", 0), hs[3][0], rtol=1e-5, atol=1e-5)


def test_other_tp_ranks_record_nothing(tmp_path, llama, monkeypatch):
    distributed = types.ModuleType("vllm.distributed")
    distributed.get_tensor_model_parallel_rank = lambda: 1
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.distributed", distributed)
    model = vllm_like.from_hf(llama.model)
    assert vllm_hook.install(model, str(tmp_path / "run")) == 0
    assert vllm_hook.finish(model) is None and not (tmp_path / "run").exists()


def test_the_decoder_layers_not_a_bigger_list_of_experts(tmp_path):
    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = torch.nn.Module()
            self.mlp.experts = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(8))

    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList(Layer() for _ in range(2))
    assert vllm_hook.install(model, str(tmp_path / "run"), points="output") == 2 + 2
    assert model._layerwise_recorder.layers_path == "model.layers"
    vllm_hook.finish(model)
