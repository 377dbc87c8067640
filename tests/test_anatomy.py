"""Where a model's parts live, found from its module tree alone (meta models: no weights)."""

import pytest
import torch

from layerwise import models, placement
from layerwise.anatomy import find_anatomy
from layerwise.names import Layout


def _meta(spec_or_config):
    config = spec_or_config if not isinstance(spec_or_config, str) else \
        models.load_config(models.resolve_model(spec_or_config)).config
    return placement.meta_model(config, torch.bfloat16)


@pytest.mark.parametrize("spec, routers", [
    ("builtin:minimax-m2-tiny", "mlp.gate"), ("builtin:qwen3-moe-tiny", "mlp.gate"), ("builtin:llama-tiny", None),
])
def test_builtin_models(spec, routers):
    anatomy = find_anatomy(_meta(spec))
    assert (anatomy.layers_path, anatomy.num_layers, anatomy.embed_path, anatomy.head_path) == \
        ("model.layers", 4, "model.embed_tokens", "lm_head")
    assert (anatomy.norm_path, anatomy.rotary_path, anatomy.attn_name, anatomy.mlp_name) == \
        ("model.norm", "model.rotary_emb", "self_attn", "mlp")
    assert anatomy.routers == (routers,) * 4 and anatomy.is_moe is (routers is not None)
    assert anatomy.layer(2) == "model.layers.2" and anatomy.base_path == "model"
    assert anatomy.router(3) == (f"model.layers.3.{routers}" if routers else None)
    assert anatomy.layout == Layout()


def test_the_real_minimax_m2():
    anatomy = find_anatomy(_meta("builtin:minimax-m2"))
    assert anatomy.num_layers == 62 and anatomy.router(61) == "model.layers.61.mlp.gate"


def test_other_spellings_are_found_by_structure():
    """GPT-2 names everything differently (transformer.h, wte, ln_f, attn): found all the same."""
    from transformers import GPT2Config

    anatomy = find_anatomy(_meta(GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64)))
    assert (anatomy.layers_path, anatomy.num_layers, anatomy.embed_path, anatomy.head_path) == \
        ("transformer.h", 3, "transformer.wte", "lm_head")
    assert (anatomy.norm_path, anatomy.attn_name, anatomy.mlp_name, anatomy.is_moe) == \
        ("transformer.ln_f", "attn", "mlp", False)
    assert anatomy.layout == Layout("transformer.h", "transformer.wte", "transformer.ln_f", "lm_head")
