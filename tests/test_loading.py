import json

import pytest
import torch

from layerwise import loading
from layerwise.errors import UserError

from helpers import assert_runs_equal


def test_load_tiny_on_cpu_with_placement_rows():
    loaded = loading.load_model("builtin:minimax-m2-tiny", loading.LoadOptions(device_map="cpu"))
    assert loaded.input_device == torch.device("cpu")
    rows = loading.placement_rows(loaded)
    assert [r.device for r in rows] == ["cpu"]
    assert rows[0].weight_bytes == sum(p.numel() * p.element_size() for p in loaded.model.parameters()) + sum(
        b.numel() * b.element_size() for b in loaded.model.buffers())
    assert loaded.tokenizer is not None
    assert loaded.tokenizer("ab").input_ids == [97, 98]


def test_explicit_cpu_map_file(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"": "cpu"}))
    loaded = loading.load_model("builtin:llama-tiny", loading.LoadOptions(device_map=str(path)), with_tokenizer=False)
    assert loaded.plan.strategy == "cpu"


def test_refuses_to_load_when_plan_spills(monkeypatch):
    # Simulate a GPU too small for the model: the plan spills, --no-spill refuses before any weight is read.
    monkeypatch.setattr(loading, "gpu_capacities", lambda: [1_000])
    with pytest.raises(UserError, match="refusing to load: does NOT fit"):
        loading.load_model("builtin:minimax-m2-tiny", loading.LoadOptions(allow_spill=False))


def test_disk_spill_needs_offload_folder(monkeypatch):
    monkeypatch.setattr(loading, "gpu_capacities", lambda: [1_000])
    monkeypatch.setattr(loading.machine, "host_memory_available", lambda: 1_000)
    with pytest.raises(UserError, match="pass --offload-folder"):
        loading.load_model("builtin:minimax-m2-tiny", loading.LoadOptions())


def test_config_only_builtin_cannot_load():
    with pytest.raises(UserError, match="configuration without weights"):
        loading.load_model("builtin:minimax-m2")


def test_input_device_is_embedding_device():
    from layerwise.anatomy import find_anatomy

    loaded = loading.load_model("builtin:llama-tiny", loading.LoadOptions(device_map="cpu"), with_tokenizer=False)
    model = loaded.model
    model.lm_head.to("meta")  # the last parameter moves; inputs still go where the embedding is
    assert loading.input_device(model, find_anatomy(model)) == torch.device("cpu")


@pytest.mark.gpu
def test_load_over_gpus_balanced():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    loaded = loading.load_model("builtin:minimax-m2-tiny", loading.LoadOptions(device_map="balanced", tokens=64))
    rows = loading.placement_rows(loaded)
    assert all(r.device.startswith("cuda") for r in rows)
    assert loaded.input_device.type == "cuda"


def test_disk_offload_keeps_router_fp32_and_numerics(tmp_path):
    """transformers indexes disk-offloaded weights in the dtype of the parameter they fill; layerwise
    builds the router in fp32, so it is paged in as fp32 and an offloaded run is bit-identical to
    one held in memory."""
    from layerwise import runs
    from layerwise.extract import ExtractOptions, extract_model

    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}
    path = tmp_path / "map.json"
    path.write_text(json.dumps(device_map))
    offloaded = loading.load_model("builtin:minimax-m2-tiny", loading.LoadOptions(
        dtype="bf16", device_map=str(path), offload_folder=str(tmp_path / "offload")))
    gate = offloaded.model.model.layers[1].mlp.gate
    assert gate.weight.device.type == "meta" and gate.weight.dtype == torch.float32
    index = gate._hf_hook.weights_map.dataset.index
    assert index["model.layers.1.mlp.gate.weight"]["dtype"] == "float32", index["model.layers.1.mlp.gate.weight"]
    in_memory = loading.load_model("builtin:minimax-m2-tiny", loading.LoadOptions(dtype="bf16", device_map="cpu"))
    options = ExtractOptions(points="residual,router,logits")
    extract_model(offloaded, tmp_path / "a", ["The capital of France is"], options)
    extract_model(in_memory, tmp_path / "b", ["The capital of France is"], options)
    assert_runs_equal(runs.open_run(tmp_path / "a"), runs.open_run(tmp_path / "b"))
