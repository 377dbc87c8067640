"""placetree.py places a model from its tree alone as transformers' own routine places the model:
checked against `_get_device_map` (the oracle) on every built-in architecture, a tied one and an
FP8 one, every strategy, and GPU counts and budgets drawn at random (spills to cpu and disk
among them)."""

import json
import random

import pytest
import torch
from transformers import AutoConfig

from layerwise import models, placement, placetree, zoo
from layerwise.quiet import quiet_transformers

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def _meta(spec: str, mode: str | None = None):
    config = models.load_config(models.resolve_model(spec)).config
    return placement.meta_model(config, torch.bfloat16, mode)


def _tied_llama():
    raw = zoo.BUILTINS["llama-tiny"].config()
    raw["tie_word_embeddings"] = True
    return placement.meta_model(AutoConfig.for_model(raw.pop("model_type"), **raw), torch.bfloat16)


MODELS = {
    "minimax-m2": lambda: _meta("builtin:minimax-m2"),
    "minimax-m2-fp8 as fp8": lambda: _meta("builtin:minimax-m2-fp8", "fp8"),
    "minimax-m2-tiny": lambda: _meta("builtin:minimax-m2-tiny"),
    "qwen3-moe-tiny": lambda: _meta("builtin:qwen3-moe-tiny"),
    "llama-tiny, tied embeddings": _tied_llama,
}


def _transformers(model, strategy: str, budgets: dict):
    from transformers.integrations.accelerate import _get_device_map

    try:
        with quiet_transformers():
            return dict(_get_device_map(model, strategy, dict(budgets), None))
    except Exception as err:  # noqa: BLE001 - the oracle's own failures must be the tree's too
        return type(err).__name__


def _tree(tree, strategy: str, budgets: dict):
    try:
        return placetree.device_map(tree, strategy, dict(budgets))
    except placetree.NotHandled:
        return "NotHandled"
    except Exception as err:  # noqa: BLE001
        return type(err).__name__


@pytest.mark.parametrize("name", MODELS)
def test_the_tree_places_as_transformers_does(name):
    model = MODELS[name]()
    tree = placement.tree_of(model)
    if name.startswith("llama-tiny"):
        assert tree.tied == (("lm_head.weight", "model.embed_tokens.weight"),)
    rng = random.Random(name)
    spilled = checked = 0
    for _ in range(12):
        gpus = rng.randint(1, 5)
        budgets = {i: int(tree.total * rng.uniform(0.02, 1.3) / gpus) for i in range(gpus)}
        budgets["cpu"] = int(tree.total * rng.choice([0, 0.1, 0.5, 2]))
        for strategy in STRATEGIES:
            want = _transformers(model, strategy, budgets)
            got = _tree(tree, strategy, budgets)
            if isinstance(want, str):  # transformers failed: the tree declines (the model is built then)
                assert isinstance(got, str), (strategy, budgets, want, got)
                continue
            assert got == want, (strategy, budgets)
            assert list(got) == sorted(got, key=tree.order().__getitem__), "in model order"
            spilled += any(d in ("cpu", "disk") for d in got.values())
            checked += 1
    assert checked >= 40 and spilled >= 4, (checked, spilled)


def test_a_tree_reads_back_from_json_as_it_was():
    tree = placement.tree_of(_tied_llama())
    again = placetree.PlaceTree.from_json(json.loads(json.dumps(tree.to_json())))
    assert again == tree
    assert again.param_names() == [n for n, _ in _tied_llama().named_parameters()]
    with pytest.raises(ValueError, match="format"):
        placetree.PlaceTree.from_json({**tree.to_json(), "format": 99})


def test_a_model_with_parameters_kept_off_the_devices_is_not_placed_from_the_tree():
    tree = placement.tree_of(_meta("builtin:llama-tiny"))
    odd = placetree.PlaceTree(tree.nodes, tree.no_split, tree.tied, ("model.embed_tokens.weight",))
    with pytest.raises(placetree.NotHandled, match="_no_placement_params"):
        placetree.device_map(odd, "auto", {0: 10**9, "cpu": 0})


def test_modules_on_one_device_are_merged_into_their_parent():
    placed = {"a.x": 0, "a.y": 0, "b.x": 0, "b.y": 1, "c": "cpu"}
    assert placetree._clean(dict(placed)) == {"a": 0, "b.x": 0, "b.y": 1, "c": "cpu"}
    assert placetree._clean({"a.x": 1, "a.y": 1, "b": 1}) == {"": 1}
