import json
import time

import pytest
import torch

from layerwise import devicemap, models, placement, planning
from layerwise.errors import UserError
from layerwise.sizes import parse_gpus, parse_max_memory

GB = 10**9


@pytest.fixture(scope="module")
def minimax_meta():
    config = models.load_config(models.resolve_model("builtin:minimax-m2")).config
    return placement.meta_model(config, torch.bfloat16)


@pytest.fixture(scope="module")
def tiny_meta(tiny_minimax):
    return placement.meta_model(models.load_config(tiny_minimax).config, torch.bfloat16)


def test_minimax_fits_on_8x80gb_in_seconds(minimax_meta):
    start = time.perf_counter()
    plan = placement.plan_placement(minimax_meta, parse_gpus("8x80GB"), "auto", cpu_bytes=100 * GB)
    elapsed = time.perf_counter() - start
    assert plan.fits, plan.verdict
    assert plan.layers_on_gpu == 62 and plan.num_layers == 62
    assert {d.device for d in plan.devices} == {f"cuda:{i}" for i in range(8)}
    assert 440 * GB < plan.total_weight_bytes < 470 * GB  # ~426 GiB in bf16 (FACTS.md)
    for d in plan.devices:
        assert d.total_bytes <= d.capacity_bytes, d
    assert elapsed < 10, f"planning took {elapsed:.1f} s"


def test_minimax_does_not_fit_on_4x80gb(minimax_meta):
    plan = placement.plan_placement(minimax_meta, parse_gpus("4x80GB"), "auto", cpu_bytes=100 * GB)
    assert not plan.fits
    assert plan.spilled_bytes > 100 * GB
    # weights 457 GB + reserves vs 320 GB of cards: at least 137 GB short
    assert 137 * GB < plan.shortfall_bytes < 160 * GB, plan.shortfall_bytes
    assert plan.gpus_needed == 6
    assert "does NOT fit" in plan.verdict and "short" in plan.verdict


def test_router_planned_in_fp32(minimax_meta):
    assert minimax_meta.model.layers[0].mlp.gate.weight.dtype == torch.float32
    assert minimax_meta.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16


@pytest.mark.parametrize("strategy", devicemap.STRATEGIES)
def test_every_strategy_places_all_layers(minimax_meta, strategy):
    plan = placement.plan_placement(minimax_meta, parse_gpus("8x80GB"), strategy, cpu_bytes=100 * GB)
    assert plan.fits, (strategy, plan.verdict)


def test_balanced_low_0_spares_gpu0(minimax_meta):
    auto = placement.plan_placement(minimax_meta, parse_gpus("8x80GB"), "auto", cpu_bytes=100 * GB)
    low0 = placement.plan_placement(minimax_meta, parse_gpus("8x80GB"), "balanced_low_0", cpu_bytes=100 * GB)
    gpu0 = {d.device: d.weight_bytes for d in low0.devices}.get("cuda:0", 0)
    assert gpu0 < auto.devices[0].weight_bytes and low0.fits


def test_max_memory_caps_total_use(minimax_meta):
    gpus = parse_gpus("8x80GB")
    plan = placement.plan_placement(minimax_meta, gpus, "sequential", parse_max_memory("70GB", 8), cpu_bytes=100 * GB)
    for d in plan.devices:
        if d.device.startswith("cuda"):
            assert d.total_bytes <= 70 * GB, d


def test_max_memory_leaves_out_unnamed_gpus(minimax_meta):
    plan = placement.plan_placement(minimax_meta, parse_gpus("8x80GB"), "auto", parse_max_memory("0:80GB,1:80GB", 8),
                                    cpu_bytes=100 * GB)
    assert {d.device for d in plan.devices} <= {"cuda:0", "cuda:1", "cpu", "disk"}
    assert not plan.fits


def test_logits_room_on_head_gpu(minimax_meta):
    plan = placement.plan_placement(minimax_meta, parse_gpus("8x80GB"), "auto", cpu_bytes=100 * GB, tokens=4096)
    head = plan.devices[-1]
    assert "lm_head" in head.summary
    # 4096 tokens x 200064 vocab x 2 bytes of logits
    assert head.reserve_bytes - plan.devices[0].reserve_bytes == 4096 * 200064 * 2


def test_reserve_grows_with_tokens_and_eager():
    config = models.load_config(models.resolve_model("builtin:minimax-m2")).config
    small = placement.forward_reserve(config, 1024, torch.bfloat16)
    big = placement.forward_reserve(config, 4096, torch.bfloat16)
    eager = placement.forward_reserve(config, 4096, torch.bfloat16, "eager")
    assert small.per_gpu_bytes < big.per_gpu_bytes < eager.per_gpu_bytes
    assert eager.per_gpu_bytes - big.per_gpu_bytes >= 48 * 4096 * 4096 * 2


def test_explicit_map_overfilling_a_gpu_does_not_fit(tiny_meta):
    plan = placement.plan_placement(tiny_meta, [400_000], {"": 0}, cpu_bytes=GB, tokens=16, overhead_bytes=0)
    assert not plan.fits and plan.overflow_bytes > 0 and plan.spilled_bytes == 0


def test_tiny_split_over_two_gpus(tiny_meta):
    plan = placement.plan_placement(tiny_meta, [600_000, 600_000], "sequential", cpu_bytes=GB, tokens=16,
                                    overhead_bytes=0)
    assert plan.fits, plan.verdict
    assert [d.device for d in plan.devices] == ["cuda:0", "cuda:1"]


@pytest.mark.parametrize("names, expected", [
    (["model.embed_tokens", "model.layers.0", "model.layers.1", "model.layers.2"], "embed_tokens + layers 0-2"),
    (["model.layers.3", "model.norm", "lm_head"], "layers 3 + norm + lm_head"),
    (["model.layers.1", "model.layers.2", "model.layers.3.self_attn", "model.layers.5"],
     "layers 1-2 + layers.3.self_attn + layers 5"),
    ([""], "whole model"),
    (["model.norm", "model.rotary_emb", "lm_head", "model.layers"], "layers 0-3 + norm + rotary_emb + lm_head"),
    ([], "(nothing)"),
])
def test_summarize_modules(tiny_meta, names, expected):
    from layerwise.anatomy import find_anatomy

    assert planning.summarize_modules(names, find_anatomy(tiny_meta)) == expected


def test_device_map_file(tmp_path, tiny_meta):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"model.embed_tokens": 0, "model.layers": "cuda:1", "model.norm": 1,
                                "model.rotary_emb": 1, "lm_head": "cpu"}))
    parsed = devicemap.parse_device_map(str(path))
    plan = placement.plan_placement(tiny_meta, [GB, GB], parsed, cpu_bytes=GB, tokens=16, overhead_bytes=0)
    assert [d.device for d in plan.devices] == ["cuda:0", "cuda:1", "cpu"]
    assert plan.devices[2].summary == "lm_head"


def test_device_map_file_must_cover_model(tmp_path, tiny_meta):
    with pytest.raises(UserError, match="leaves .* parameters unplaced"):
        placement.plan_placement(tiny_meta, [GB], {"model.layers": 0}, cpu_bytes=GB)


@pytest.mark.parametrize("device_map, fragment", [
    ({"model.nope": "cpu", "": 0}, "device map names 'model.nope', which is not a module of this model (beside it: "
                                   "model.embed_tokens, model.layers, model.norm, model.rotary_emb)"),
    ({"model.layers.9": "cpu", "": 0}, "names 'model.layers.9', which is not a module of this model (beside it: "
                                       "model.layers.0, model.layers.1"),
    ({"model": 0, "lm_head": 0, "model.bogus": "cpu"}, "names 'model.bogus'"),
])
def test_device_map_naming_no_module_is_refused(tiny_meta, device_map, fragment):
    """A misspelt module in a --device-map file placed nothing and was accepted in silence."""
    with pytest.raises(UserError) as info:
        placement.plan_placement(tiny_meta, [GB], device_map, cpu_bytes=GB)
    assert fragment in str(info.value)


def test_device_map_may_name_a_submodule_or_a_weight(tiny_meta):
    plan = placement.plan_placement(tiny_meta, [GB], {"model.layers.0.mlp.gate": "cpu", "lm_head.weight": "cpu",
                                                      "": 0}, cpu_bytes=GB, overhead_bytes=0)
    assert [d.device for d in plan.devices] == ["cuda:0", "cpu"]


def test_device_map_on_missing_gpu(tiny_meta):
    with pytest.raises(UserError, match="GPU 3, which is not present"):
        placement.plan_placement(tiny_meta, [GB], {"": 3}, cpu_bytes=GB)
