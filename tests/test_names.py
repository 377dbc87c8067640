"""The `<module path>:<role>` contract and index selections: table-driven, pure."""

import pytest

from layerwise import names
from layerwise.names import Layout


@pytest.mark.parametrize("name, key", [
    ("model.embed_tokens:output", (0, 0, 0)),
    ("model.layers.3:input", (1, 3, 0)),
    ("model.layers.3.self_attn:output", (1, 3, 2)),
    ("model.layers.3.mlp.gate:router_logits", (1, 3, 4)),
    ("model.layers.3.mlp:output", (1, 3, 6)),
    ("model.layers.3:output", (1, 3, 9)),
    ("model.norm:output", (2, 0, 0)),
    ("lm_head:output", (3, 0, 0)),
])
def test_model_order_key(name, key):
    assert names.model_order_key(name)[:3] == key


def test_model_order_key_orders_roles_and_follows_the_layout():
    router = [names.tensor_name("model.layers.0.mlp.gate", r) for r in names.ROUTER_ROLES]
    # a layer's padding tail sorts with the layer's own tensors, before its output
    layer = ["model.layers.0:input", *router, "model.layers.0:input_padding", "model.layers.0:output"]
    assert sorted(reversed(layer), key=names.model_order_key) == layer
    gpt = dict(layers_path="transformer.h", embed="transformer.wte", norm="transformer.ln_f", head="lm_head")
    order = ["transformer.wte:output", "transformer.h.0:input", "transformer.h.0.attn:output", "transformer.h.0:output",
             "transformer.h.10:output", "transformer.ln_f:output", "lm_head:output", "other:output"]
    assert sorted(reversed(order), key=lambda n: names.model_order_key(n, **gpt)) == order


def test_model_order_inside_a_layer():
    """A module's input, then its submodules' tensors, then its output: the order they are computed in."""
    found = ["model.layers.1.input_layernorm:output", "model.layers.1:input", "model.layers.1:output",
             "model.layers.1.mlp:output", "model.layers.1.self_attn:output", "model.layers.1.self_attn.q_proj:output",
             "model.layers.1.mlp.down_proj:input", "model.layers.1.post_attention_layernorm:output",
             "model.layers.1.mlp.down_proj:output", "model.layers.1.self_attn:input",
             "model.layers.1.mlp.gate:topk_ids", "model.layers.1.mlp.gate:router_logits"]
    assert sorted(found, key=names.model_order_key) == [
        "model.layers.1:input", "model.layers.1.input_layernorm:output", "model.layers.1.self_attn:input",
        "model.layers.1.self_attn.q_proj:output", "model.layers.1.self_attn:output",
        "model.layers.1.post_attention_layernorm:output", "model.layers.1.mlp.gate:router_logits",
        "model.layers.1.mlp.gate:topk_ids", "model.layers.1.mlp.down_proj:input",
        "model.layers.1.mlp.down_proj:output", "model.layers.1.mlp:output", "model.layers.1:output"]


@pytest.mark.parametrize("name, module, role", [
    ("model.layers.7:input", "model.layers.7", "input"),
    ("model.layers.7.mlp.gate:topk_ids", "model.layers.7.mlp.gate", "topk_ids"),
    ("a:b:c", "a:b", "c"),
])
def test_tensor_names_round_trip(name, module, role):
    assert names.split_name(name) == (module, role)
    assert names.tensor_name(module, role) == name


def test_roles():
    assert names.pad_name("model.layers.7:input") == "model.layers.7:input_padding"
    assert names.PAD_ROLE in names.ROLES and set(names.ROUTER_ROLES) == set(names.JUDGING_ORDER)
    assert set(names.STORED_DTYPES) | set(names.WHOLE_ROLES) <= set(names.ROUTER_ROLES)


@pytest.mark.parametrize("record, layout", [
    (None, Layout()),
    ({"layers_path": "transformer.h", "norm": None}, Layout(layers_path="transformer.h")),
    ({"layers_path": "m.l", "embed": "m.e", "norm": "m.n", "head": "h"}, Layout("m.l", "m.e", "m.n", "h")),
])
def test_layout_of_a_run_record(record, layout):
    assert Layout.of(record) == layout


@pytest.mark.parametrize("module, layer, stage", [
    ("model.embed_tokens", None, "embed"),
    ("model.layers.7", 7, 7),
    ("model.layers.12.mlp.gate", 12, 12),
    ("model.layers", None, "final"),
    ("model.layers_extra.1", None, "final"),
    ("model.norm", None, "final"),
    ("lm_head", None, "final"),
])
def test_layer_and_stage_of(module, layer, stage):
    assert names.layer_of(module) == layer
    assert names.stage_of(module) == stage


@pytest.mark.parametrize("path, parts, group", [
    ("model.layers.7.mlp.gate", ("model.layers", 7, "mlp.gate"), "model.layers.7"),
    ("model.layers.7", ("model.layers", 7, ""), "model.layers.7"),
    ("decoder.layers.0.self_attn.q_proj.weight", ("decoder.layers", 0, "self_attn.q_proj.weight"), "decoder.layers.0"),
    ("model.layers.3x", None, "model.layers.3x"),
    ("lm_head", None, "lm_head"),
])
def test_layer_parts_and_file_group(path, parts, group):
    assert names.layer_parts(path) == parts
    assert names.file_group(path) == group


@pytest.mark.parametrize("module, role, layer, part", [
    ("model.layers.3", "output", 3, "output"),
    ("model.layers.3", "input", 3, "input"),
    ("model.layers.3.self_attn", "output", 3, "self_attn"),
    ("model.layers.3.mlp.gate", "router_logits", 3, "mlp.gate:logits"),
    ("model.layers.3.mlp.gate", "topk_ids", 3, "mlp.gate:ids"),
    ("model.norm", "output", None, "output"),
])
def test_part_in_layer(module, role, layer, part):
    assert names.part_in_layer(module, role, layer) == part


@pytest.mark.parametrize("text, indices", [
    ("0", (0,)), ("0-3,7", (0, 1, 2, 3, 7)), (" 1 - 2 ", (1, 2)), ("2,0,2", (2, 0)), ("5-5", (5,)),
])
def test_parse_indices(text, indices):
    assert names.parse_indices(text) == indices


@pytest.mark.parametrize("text, part, reversed_range", [
    ("a", "a", None), ("-1", "-1", None), ("0,,1", "", None), ("1-2-3", "1-2-3", None), ("0,3-1", "3-1", (3, 1)),
])
def test_parse_indices_refuses(text, part, reversed_range):
    with pytest.raises(names.BadSelection) as err:
        names.parse_indices(text)
    assert err.value.part == part and err.value.reversed_range == reversed_range


@pytest.mark.parametrize("values, text", [([], "none"), ([4], "4"), ([0, 1, 2, 3, 7], "0-3,7"), ([1, 3, 4], "1,3-4")])
def test_format_ranges(values, text):
    assert names.format_ranges(values) == text
    if values:
        assert names.parse_indices(text) == tuple(values)
