import pytest

from layerwise import capture
from layerwise.anatomy import find_anatomy
from layerwise.errors import UserError


@pytest.mark.parametrize("text, expected", [(None, capture.DEFAULT_POINTS), ("embed, logits", ("embed", "logits")),
                                            ("residual,residual", ("residual",))])
def test_parse_points(text, expected):
    assert capture.parse_points(text) == expected


def test_parse_layers():
    assert capture.parse_layers("0-2,5", 8) == (0, 1, 2, 5)
    assert capture.parse_layers(None, 3) == (0, 1, 2)
    for bad, fragment in [("9", "names layer 9"), ("2-1", "reversed"), ("a", "not a layer number"), ("-1", "not a layer")]:
        with pytest.raises(UserError, match=fragment):
            capture.parse_layers(bad, 8)


def test_targets_in_model_order():
    from layerwise import models, placement
    from layerwise.names import model_order_key

    meta = placement.meta_model(models.load_config(models.resolve_model("builtin:minimax-m2")).config, __import__("torch").bfloat16)
    anatomy = find_anatomy(meta)
    targets = capture.plan_targets(anatomy, capture.POINTS, (0, 61))
    names = [n for t in targets for n in t.names]
    assert names[:3] == ["model.embed_tokens:output", "model.layers.0:input", "model.layers.0.self_attn:output"]
    assert names[-2:] == ["model.norm:output", "lm_head:output"]
    assert names == sorted(names, key=model_order_key)
    assert capture.groups_of(targets)["model.layers.61"][-1] == "model.layers.61:output"
