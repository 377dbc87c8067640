import threading
import time

import pytest

from layerwise import capture
from layerwise.anatomy import find_anatomy
from layerwise.errors import UserError


def test_pool_overdraws_for_the_open_group_instead_of_deadlocking():
    pool = capture.PinnedPool(budget_bytes=100, pin=False)
    a = pool.take(80)
    b = pool.take(80, open_group_bytes=80)  # same group: waiting would deadlock, so it overdraws
    assert pool.used == 160


def test_pool_waits_for_other_groups_then_reuses_buffers():
    pool = capture.PinnedPool(budget_bytes=100, pin=False)
    first = pool.take(80)
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.take(80, open_group_bytes=0)))
    waiter.start()
    time.sleep(0.2)
    assert not got, "a new group must wait while another group's buffers are out (backpressure)"
    pool.give(first)
    waiter.join(5)
    assert got and got[0] is first, "the returned buffer is reused, not reallocated"
    assert pool.held == 80


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
