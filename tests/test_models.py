import json

import pytest
import torch

from layerwise import models
from layerwise.errors import UserError
from layerwise.loading import LoadOptions, load_model
from layerwise.quiet import quiet_transformers

from reference_minimax import ReferenceLayer


def layer_weights(layer) -> dict:
    return {**dict(layer.named_parameters()), **dict(layer.named_buffers())}


def test_resolve_builtins(tiny_minimax):
    assert tiny_minimax.kind == "checkpoint"
    files = {p.name for p in tiny_minimax.path.iterdir()}
    assert "config.json" in files and "model.safetensors.index.json" in files
    assert len([f for f in files if f.endswith(".safetensors")]) >= 2, files
    assert models.resolve_model("builtin:minimax-m2").kind == "config"


@pytest.mark.parametrize("spec, fragment", [
    ("", "no model given"),
    ("builtin:gpt-17", "unknown built-in model 'builtin:gpt-17'"),
    ("/nonexistent/model", "does not exist"),
])
def test_resolve_errors(spec, fragment):
    with pytest.raises(UserError, match=fragment):
        models.resolve_model(spec)


def test_resolve_empty_dir_and_bad_files(tmp_path):
    with pytest.raises(UserError, match="is empty"):
        models.resolve_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="has no config.json"):
        models.resolve_model(str(tmp_path))
    with pytest.raises(UserError, match="not a .gguf file"):
        models.resolve_model(str(tmp_path / "weights.bin"))
    empty = tmp_path / "m.gguf"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="is empty"):
        models.resolve_model(str(empty))


def test_config_without_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    ref = models.resolve_model(str(tmp_path))
    with pytest.raises(UserError, match="has no model_type"):
        models.load_config(ref)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        models.load_config(ref)


def test_partial_rope_fix_sets_factor():
    from transformers import MiniMaxM2Config

    config = MiniMaxM2Config(hidden_size=64, head_dim=16, num_attention_heads=4, num_key_value_heads=2,
                             num_hidden_layers=1, rotary_dim=8, vocab_size=16)
    config.rope_parameters.pop("partial_rotary_factor", None)  # what transformers < 5.18 leaves
    fixes = models.apply_config_fixes(config)
    assert config.rope_parameters["partial_rotary_factor"] == 0.5
    assert [f.name for f in fixes] == ["partial-rope", "fp32-router"]
    assert [f.name for f in models.apply_config_fixes(config)] == ["fp32-router"]  # idempotent


def _attention_inputs(model, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, seq, model.config.hidden_size, generator=g)
    pos = torch.arange(seq)[None]
    return x, pos


def test_tiny_minimax_rope_matches_independent_reference(tiny_minimax):
    """The loaded model rotates rotary_dim=8 of 16 head dims, as the reference computes it."""
    loaded = load_model("builtin:minimax-m2-tiny", LoadOptions(dtype="fp32", attn_implementation="eager"),
                        with_tokenizer=False)
    model = loaded.model
    layer = model.model.layers[0]
    x, pos = _attention_inputs(model)
    cos_sin = model.model.rotary_emb(x, pos)
    seq = x.shape[1]
    causal = torch.full((seq, seq), torch.finfo(x.dtype).min).triu(1)[None, None]  # eager's additive mask
    with torch.no_grad():
        got = layer(x, position_embeddings=cos_sin, attention_mask=causal, position_ids=pos)
        weights = layer_weights(layer)
        right = ReferenceLayer(model.config, 0, weights)(x, position_ids=pos)
        wrong = ReferenceLayer(model.config, 0, weights, partial_rope=False)(x, position_ids=pos)
    err_right = ((got - right).norm() / right.norm()).item()
    err_wrong = ((got - wrong).norm() / wrong.norm()).item()
    assert err_right < 1e-5, f"partial-RoPE reference rel_l2 {err_right:.2e}"
    assert err_wrong > 1e-3, f"full-RoPE reference should differ, rel_l2 {err_wrong:.2e}"
    assert model.model.rotary_emb.inv_freq.numel() == 4  # rotary_dim / 2


def test_router_kept_fp32_in_bf16(tiny_minimax):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from layerwise.checkpoint import weight_map

    loaded = load_model("builtin:minimax-m2-tiny", LoadOptions(dtype="bf16"), with_tokenizer=False)
    mlp = loaded.model.model.layers[1].mlp
    assert mlp.gate.weight.dtype == torch.float32
    assert mlp.e_score_correction_bias.dtype == torch.float32
    assert mlp.experts.gate_up_proj.dtype == torch.bfloat16
    name = "model.layers.1.block_sparse_moe.e_score_correction_bias"
    with safe_open(str(tiny_minimax.path / weight_map(tiny_minimax.path)[name]), "pt") as fh:
        stored = fh.get_tensor(name)
    assert stored.dtype == torch.float32
    assert torch.equal(mlp.e_score_correction_bias, stored), "bias values must be bit-exact"
    # The oracle: plain transformers casts them down, which is what the fix prevents.
    with quiet_transformers():
        plain = AutoModelForCausalLM.from_pretrained(tiny_minimax.path, dtype=torch.bfloat16)
    assert plain.model.layers[1].mlp.e_score_correction_bias.dtype == torch.bfloat16
    assert not torch.equal(plain.model.layers[1].mlp.e_score_correction_bias.float(), stored)


def test_model_class_keeps_name():
    from transformers import MiniMaxM2ForCausalLM

    config = models.load_config(models.resolve_model("builtin:minimax-m2")).config
    cls = models.model_class(config)
    assert cls.__name__ == "MiniMaxM2ForCausalLM" and issubclass(cls, MiniMaxM2ForCausalLM)


@pytest.mark.skipif(models.transformers_version() >= (5, 18), reason="the RoPE bug exists only before 5.18")
def test_plain_transformers_has_the_rope_bug(tiny_minimax):
    """On 5.0-5.17 a plain load rotates all 16 dims (8 frequencies); layerwise's load rotates 8 (4)."""
    from transformers import AutoModelForCausalLM

    with quiet_transformers():
        plain = AutoModelForCausalLM.from_pretrained(tiny_minimax.path, dtype=torch.float32)
    assert plain.model.rotary_emb.inv_freq.numel() == 8
