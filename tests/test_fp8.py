"""FP8 checkpoints end to end on the tiny MiniMax-M2 in the release's block-FP8 layout: the
dequantized reference against transformers' own FP8 path and an offline-dequantized checkpoint,
single-layer and streamed loading, the W8A8 candidate, and every bad input."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from layerwise import fp8, loading, open_run, quant, replay
from layerwise.extract import ExtractOptions, extract_model
from layerwise.layer_loading import LayerOptions, open_layers
from layerwise.models import resolve_model
from layerwise.streaming import StreamOptions, stream_extract

from helpers import assert_one_line_error, assert_runs_equal, run_cli

FP8 = "builtin:minimax-m2-tiny-fp8"
PROMPTS = ["The capital of France is", "Hi", "a b c d e f g h i j k l m n o p", "Paris is a city"]
OPTIONS = ExtractOptions(points="embed,residual,attn,mlp,router,norm,logits", batch_size=3)


def all_tensors(directory) -> dict:
    wmap = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for shard in set(wmap.values()):
        tensors.update(load_file(str(directory / shard)))
    return tensors


@pytest.fixture(scope="module")
def fp8_dir():
    return resolve_model(FP8).path


def test_builtin_is_written_in_the_release_layout(fp8_dir):
    config = json.loads((fp8_dir / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "fp8"
    assert config["quantization_config"]["weight_block_size"] == [16, 16]
    assert "rope_parameters" not in config and config["rotary_dim"] == 8  # as MiniMax-M2 ships it
    tensors = all_tensors(fp8_dir)
    assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert tensors["model.layers.0.self_attn.q_proj.weight_scale_inv"].shape == (4, 4)
    assert tensors["model.layers.0.block_sparse_moe.experts.3.w2.weight"].dtype == torch.float8_e4m3fn
    assert tensors["model.layers.0.block_sparse_moe.experts.3.w2.weight_scale_inv"].shape == (4, 2)
    for name in ("model.layers.0.block_sparse_moe.gate.weight", "model.layers.0.block_sparse_moe.e_score_correction_bias"):
        assert tensors[name].dtype == torch.float32, name
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.input_layernorm.weight"):
        assert tensors[name].dtype == torch.bfloat16, name


def test_dequantized_load_is_transformers_own_fp8_path(fp8_dir):
    """Every weight bit-identical to transformers' FineGrainedFP8Config(dequantize=True) load, and
    the router exactly the checkpoint's float32 (transformers 5.2x alone rounds it to bf16)."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    ours = loading.load_model(FP8, loading.LoadOptions(dtype="bf16", device_map="cpu")).model
    theirs = AutoModelForCausalLM.from_pretrained(str(fp8_dir), dtype=torch.bfloat16, device_map="cpu",
                                                  quantization_config=FineGrainedFP8Config(dequantize=True))
    mine, other = ours.state_dict(), theirs.state_dict()
    assert set(mine) == set(other)
    raw = all_tensors(fp8_dir)
    for name in mine:
        if name.endswith(("mlp.gate.weight", "e_score_correction_bias")):
            assert mine[name].dtype == torch.float32
            # transformers 5.2x rounds them to bf16 on this path (5.17 keeps them): never layerwise
            if other[name].dtype == torch.float32:
                assert torch.equal(mine[name], other[name]), name
            if name.startswith("model.layers.0."):
                ckpt = name.replace("mlp.gate", "block_sparse_moe.gate").replace("mlp.e_score", "block_sparse_moe.e_score")
                assert torch.equal(mine[name], raw[ckpt])
        else:
            assert torch.equal(mine[name], other[name]), name


def oracle_dequantized_checkpoint(src, dst):
    """The FP8 checkpoint dequantized offline, element by element (float64 products rounded to
    bf16), written as a plain bf16 checkpoint: an independent reference."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    block = config.pop("quantization_config")["weight_block_size"]
    (dst / "config.json").write_text(json.dumps(config))
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        tensors = load_file(str(dst / shard))
        out = {}
        for name, t in tensors.items():
            if name.endswith("_scale_inv"):
                continue
            if t.dtype == torch.float8_e4m3fn:
                scale = tensors[name + "_scale_inv"].double()
                full = scale.repeat_interleave(block[0], 0)[:t.shape[0]].repeat_interleave(block[1], 1)[:, :t.shape[1]]
                t = (t.double() * full).to(torch.bfloat16)
            out[name] = t
        save_file(out, str(dst / shard), metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.endswith("_scale_inv")}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))


def test_dequantized_extract_equals_an_offline_dequantized_checkpoint(tmp_path, fp8_dir):
    oracle_dequantized_checkpoint(fp8_dir, tmp_path / "plain")
    a = extract_model(loading.load_model(FP8, loading.LoadOptions(dtype="bf16")), tmp_path / "a", PROMPTS, OPTIONS)
    b = extract_model(loading.load_model(str(tmp_path / "plain"), loading.LoadOptions(dtype="bf16")), tmp_path / "b",
                      PROMPTS, OPTIONS)
    assert open_run(a.path).manifest["settings"]["quant"] == "dequantize"
    assert assert_runs_equal(open_run(a.path), open_run(b.path)) > 50


def test_single_layer_and_streamed_dequantize_equal_the_whole_model(tmp_path):
    """Layer by layer, FP8 bytes read and dequantized on the device: the same layer, the same run."""
    whole = loading.load_model(FP8, loading.LoadOptions(dtype="bf16"))
    source = open_layers(FP8, LayerOptions(dtype="bf16"))
    for k in range(4):
        layer = source.load(k)
        mine = layer.module.state_dict()
        theirs = whole.model.model.layers[k].state_dict()
        assert all(torch.equal(mine[n], theirs[n]) for n in theirs), k
        assert layer.bytes_read < sum(t.numel() * t.element_size() for t in mine.values())  # FP8 bytes read
    extract_model(whole, tmp_path / "whole", PROMPTS, OPTIONS)
    stream_extract(FP8, tmp_path / "stream", PROMPTS, OPTIONS, StreamOptions(dtype="bf16"))
    assert_runs_equal(open_run(tmp_path / "whole"), open_run(tmp_path / "stream"))


def test_fp8_candidate_is_the_same_arithmetic_in_every_form(tmp_path):
    """--quant fp8: the whole model assembled in FP8, streamed, and layer-replayed agree exactly."""
    loaded = loading.load_model(FP8, loading.LoadOptions(dtype="bf16", quant="fp8"))
    assert isinstance(loaded.model.model.layers[2].mlp.experts, fp8.Fp8Experts)
    assert isinstance(loaded.model.model.layers[2].self_attn.o_proj, fp8.Fp8Linear)
    assert loaded.model.model.layers[2].mlp.experts.gate_up_proj.dtype == torch.float8_e4m3fn
    assert loaded.model.model.layers[2].mlp.gate.weight.dtype == torch.float32
    extract_model(loaded, tmp_path / "whole", PROMPTS, OPTIONS)
    stream_extract(FP8, tmp_path / "stream", PROMPTS, OPTIONS, StreamOptions(dtype="bf16", quant="fp8"))
    whole, streamed = open_run(tmp_path / "whole"), open_run(tmp_path / "stream")
    assert whole.manifest["settings"]["quant"] == "fp8"
    assert_runs_equal(whole, streamed)
    result = replay.replay(FP8, whole, list(range(4)), isolated=tmp_path / "iso", chained=tmp_path / "chain")
    assert result.settings["quant"] == "fp8"  # the reference's own
    for kind in ("iso", "chain"):
        run = open_run(tmp_path / kind)
        for e in run.entries():
            assert torch.equal(run.tensor(e.name, e.prompt), whole.tensor(e.name, e.prompt)), (kind, e.name)


@pytest.fixture(scope="module")
def dequantized_ref(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8") / "ref"
    extract_model(loading.load_model(FP8, loading.LoadOptions(dtype="bf16")), path, PROMPTS, OPTIONS)
    return open_run(path)


def test_showcase_each_layer_own_fp8_error(capsys, tmp_path, dequantized_ref):
    """`test --quant fp8 --layer all` against the dequantized reference: every layer's own W8A8
    error is reported, isolated and propagated; a dequantize self-test is exactly 0."""
    code, out, err = run_cli(capsys, "test", FP8, "--reference", dequantized_ref.path, "--layer", "all",
                             "--quant", "fp8", "--out", tmp_path / "fp8", "--json", tmp_path / "fp8.json")
    assert code in (0, 1), err
    report = json.loads((tmp_path / "fp8.json").read_text())
    rows = report["isolation"]
    assert [r["layer"] for r in rows] == [0, 1, 2, 3]
    for r in rows:  # e4m3 activations and weights: percents (more where an expert set flips), never zero
        assert 1e-3 < r["isolated_rel_l2"] < 0.3, rows
        assert r["propagated_rel_l2"] >= r["isolated_rel_l2"] * 0.5, rows
    assert sum(r["isolated_flips"] or 0 for r in rows) > 0, rows  # the tiny router's near-ties flip
    assert "isolated" in out and "propagated" in out
    code, out, err = run_cli(capsys, "test", FP8, "--reference", dequantized_ref.path, "--layer", "all",
                             "--out", tmp_path / "self", "--json", tmp_path / "self.json", "--max-rel-l2", "0")
    assert code == 0, out + err
    rows = json.loads((tmp_path / "self.json").read_text())["isolation"]
    assert all(r["isolated_rel_l2"] == 0 and r["propagated_rel_l2"] == 0 for r in rows), rows


def test_fp8_emulation_in_the_layer_matches_a_hand_loop():
    """A replaced projection computes quant.fp8_matmul on the checkpoint's own bytes and scales."""
    source = open_layers(FP8, LayerOptions(dtype="bf16", quant="fp8"))
    layer = source.load(1).module
    raw = source.read(1).tensors
    x = torch.randn(5, 64).to(torch.bfloat16)
    w = raw["model.layers.0.self_attn.q_proj.weight"]
    s = raw["model.layers.0.self_attn.q_proj.weight_scale_inv"]
    assert torch.equal(layer.self_attn.q_proj(x), quant.emulated_fp8_matmul(*quant.quantize_activation(x, 16), w, s,
                                                                            (16, 16), torch.bfloat16))


def test_a_wrong_expert_mapping_cannot_pass(monkeypatch):
    """If the FP8 tensors were fused in another order than transformers fuses them, the
    dequantized FP8 weight would differ from the built parameter: refused, never silent."""
    monkeypatch.setattr(fp8, "_EXPERT_NAMES", (("w3", "w1", "w2"),))
    with pytest.raises(RuntimeError, match="does not dequantize to the parameter"):
        open_layers(FP8, LayerOptions(dtype="bf16", quant="fp8")).load(0)


# ------------------------------------------------------------------------------------ plan and check

def test_plan_sizes_both_forms(capsys):
    code, out, _ = run_cli(capsys, "plan", "builtin:minimax-m2-fp8", "--gpus", "4x80GB", "--quant", "fp8")
    assert code == 0 and "FP8 (e4m3 + scales" in out and "fits: all 62 layers on 4 GPU(s)" in out, out
    code, out, _ = run_cli(capsys, "plan", "builtin:minimax-m2-fp8", "--gpus", "4x80GB", "--quant", "dequantize")
    assert code == 1 and "needs 6 such GPUs" in out, out
    code, out, _ = run_cli(capsys, "plan", "builtin:minimax-m2-fp8", "--gpus", "4x80GB", "--json", "--quant", "fp8")
    plan = json.loads(out)
    # 62 layers of e4m3 projections + fp32 block scales + bf16 embedding/head/norms, fp32 routers
    assert 228e9 < plan["total_weight_bytes"] < 232e9, plan["total_weight_bytes"]


def test_check_reports_the_quantization(capsys):
    code, out, _ = run_cli(capsys, "check", "--cpu", FP8)
    assert code == 0, out
    lines = {line.split()[1]: line for line in out.splitlines() if line[:4] in ("PASS", "WARN", "FAIL")}
    assert lines["quantization"].startswith("PASS") and "16x16 blocks" in lines["quantization"]
    assert lines["quant-dequantize"].startswith("PASS")
    assert lines["quant-fp8"].startswith("WARN") and "emulation" in lines["quant-fp8"]  # no Hopper GPU here
    assert lines["router-precision"].startswith("PASS")


# ------------------------------------------------------------------------------------ bad input

def broken_copy(tmp_path, fp8_dir, edit):
    dst = tmp_path / "ckpt"
    shutil.copytree(fp8_dir, dst)
    edit(dst)
    return dst


def edit_config(change):
    def edit(dst):
        config = json.loads((dst / "config.json").read_text())
        change(config)
        (dst / "config.json").write_text(json.dumps(config))
    return edit


def edit_tensor(name, change):
    def edit(dst):
        index = json.loads((dst / "model.safetensors.index.json").read_text())
        shard = dst / index["weight_map"][name]
        tensors = load_file(str(shard))
        new = change(tensors.pop(name))
        if new is not None:
            tensors[name] = new
        else:
            del index["weight_map"][name]
            (dst / "model.safetensors.index.json").write_text(json.dumps(index))
        save_file(tensors, str(shard), metadata={"format": "pt"})
    return edit


SCALE = "model.layers.1.self_attn.k_proj.weight_scale_inv"


@pytest.mark.parametrize("edit, fragment", [
    (edit_config(lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4})), "GPTQ"),
    (edit_config(lambda c: c.update(quantization_config={"quant_method": "bitsandbytes"})), "bitsandbytes"),
    (edit_config(lambda c: c.update(quantization_config={"quant_method": "awq"})), "AWQ"),
    (edit_tensor(SCALE, lambda t: None), SCALE.removesuffix("_scale_inv")),
    (edit_tensor(SCALE, lambda t: t[:1]), SCALE),
])
@pytest.mark.parametrize("command", ["load", "extract", "single"])
def test_bad_fp8_checkpoints_are_one_line(capsys, tmp_path, fp8_dir, dequantized_ref, edit, fragment, command):
    ckpt = broken_copy(tmp_path, fp8_dir, edit)
    if command == "load":
        argv = ["load", ckpt]
    elif command == "extract":
        argv = ["extract", ckpt, "--out", tmp_path / "run", "--prompt", "hi", "--stream"]
    else:
        argv = ["test", ckpt, "--reference", dequantized_ref.path, "--layer", "1", "--out", tmp_path / "run"]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "run" / "manifest.json").exists()


def test_check_fails_on_a_bad_scale(capsys, tmp_path, fp8_dir):
    ckpt = broken_copy(tmp_path, fp8_dir, edit_tensor(SCALE, lambda t: t[:1]))
    code, out, _ = run_cli(capsys, "check", "--cpu", ckpt)
    assert code == 1 and f"FP8 scale {SCALE}" in out, out


def test_quant_fp8_on_a_plain_checkpoint_is_a_usage_error(capsys, tmp_path):
    for argv in (["load", "builtin:minimax-m2-tiny", "--quant", "fp8"],
                 ["plan", "builtin:minimax-m2", "--gpus", "8x80GB", "--quant", "fp8"],
                 ["extract", "builtin:minimax-m2-tiny", "--out", tmp_path / "r", "--prompt", "x", "--quant", "fp8"]):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, "needs an FP8 checkpoint")
