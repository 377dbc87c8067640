"""The built-in models: real checkpoints written once, in the layout the real releases use."""

import json

import pytest
import torch
from safetensors import safe_open

from layerwise import checkpoint, models, zoo


def test_every_builtin_resolves_to_its_kind():
    assert zoo.DEFAULT_MODEL.removeprefix("builtin:") in zoo.BUILTINS
    for name, builtin in zoo.BUILTINS.items():
        if builtin.kind == "config":
            ref = models.resolve_model(f"builtin:{name}")
            assert ref.kind == "config" and ref.path is None and not ref.has_weights
    assert zoo.smollm2_gguf().stat().st_size > 50 * 2**20


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path))
    assert zoo.cache_dir() == tmp_path


def _tensors(path):
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for shard in sorted(set(index.values())):
        with safe_open(str(path / shard), "pt") as fh:
            out.update({name: fh.get_tensor(name) for name in fh.keys()})
    return index, out


def test_tiny_checkpoint_is_sharded_bf16_with_an_fp32_router(tiny_minimax):
    path = tiny_minimax.path
    assert path == zoo.tiny_checkpoint("minimax-m2-tiny")  # written once, then reused
    index, tensors = _tensors(path)
    assert len(set(index.values())) >= 2 and checkpoint.inspect_checkpoint(path).ok
    routers = {n for n in tensors if n.endswith((".gate.weight", "e_score_correction_bias"))}  # release spelling
    assert routers and all(tensors[n].dtype == torch.float32 for n in routers)
    assert {t.dtype for n, t in tensors.items() if n not in routers} == {torch.bfloat16}
    assert json.loads((path / "layerwise_builtin.json").read_text())["seed"] == zoo.SEED


def test_tiny_weights_are_seeded(tmp_path, monkeypatch):
    """Written again elsewhere, a tiny checkpoint has the same bits."""
    original = models.resolve_model("builtin:llama-tiny").path
    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path))
    again = zoo.tiny_checkpoint("llama-tiny")
    assert again.parent == tmp_path and original.parent != tmp_path
    _, a = _tensors(again)
    _, b = _tensors(original)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_byte_tokenizer(tiny_minimax):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_minimax.path))
    assert tokenizer("The é")["input_ids"] == list("The é".encode())
    assert tokenizer.pad_token_id == 258 and tokenizer.decode(list(b"abc")) == "abc"


def test_fp8_checkpoint_in_the_release_layout():
    path = models.resolve_model("builtin:minimax-m2-tiny-fp8").path
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == zoo.TINY_FP8_BLOCK
    assert "rope_parameters" not in config and config["rotary_dim"] == 8
    _, tensors = _tensors(path)
    q = tensors["model.layers.0.self_attn.q_proj.weight"]
    scale = tensors["model.layers.0.self_attn.q_proj.weight_scale_inv"]
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert list(scale.shape) == [-(-q.shape[0] // 16), -(-q.shape[1] // 16)]
    for unquantized in ("model.layers.0.block_sparse_moe.gate.weight", "lm_head.weight", "model.embed_tokens.weight"):
        assert tensors[unquantized].dtype != torch.float8_e4m3fn and f"{unquantized}_scale_inv" not in tensors


@pytest.mark.parametrize("name, shape, quantized", [
    ("model.layers.0.self_attn.q_proj.weight", (64, 64), True),
    ("model.layers.0.mlp.gate.weight", (8, 64), False),
    ("model.layers.0.input_layernorm.weight", (64,), False),
    ("model.norm.weight", (64,), False),
    ("lm_head.weight", (512, 64), False),
    ("model.embed_tokens.weight", (512, 64), False),
])
def test_which_tensors_the_release_stores_in_fp8(name, shape, quantized):
    assert zoo._fp8_quantizable(name, torch.empty(shape)) is quantized
