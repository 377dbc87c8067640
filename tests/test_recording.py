"""One run's lifecycle: intent first, files as they come, the manifest last; an error aborts
without a manifest, and the same intent resumes."""

import json

import pytest
import torch

from layerwise.recording import Recording, config_sha256, model_record
from layerwise.runs import INTENT, MANIFEST, Intent, open_run

INTENT_ = Intent(producer="test", model={"spec": "m", "model_type": "llama"}, settings={"dtype": "float32"},
                 prompts=[{"index": 0, "text": "a", "token_ids": [1]}], anatomy={"layers_path": "model.layers"})


def test_intent_keys_in_format_order_and_absent_parts_left_out():
    data = Intent("p", {"spec": "m"}, {}, [], reference={"path": "r"}, anatomy={}, fixes=[], versions=None).as_dict()
    assert list(data) == ["producer", "model", "settings", "reference", "anatomy", "prompts", "fixes"]
    assert list(INTENT_.as_dict()) == ["producer", "model", "settings", "anatomy", "prompts"]


def test_an_error_leaves_whole_files_and_no_manifest_then_the_run_resumes(tmp_path):
    path = tmp_path / "run"
    with pytest.raises(RuntimeError, match="boom"):
        with Recording(path, INTENT_, None) as run:
            run.writer.put(0, "model.layers.0", {"model.layers.0:output": torch.ones(1, 2)})
            run.writer.wait()
            raise RuntimeError("boom")
    assert json.loads((path / INTENT).read_text()) == INTENT_.as_dict()
    assert not (path / MANIFEST).exists() and list(path.glob("tensors/p00000/*.safetensors"))
    with Recording(path, INTENT_, None) as run:
        assert run.writer.has(0, "model.layers.0")  # resumed: the file is already there
        run.close_capture()
        manifest = run.finish({"stats": {}})
    assert open_run(path).names == ["model.layers.0:output"] and manifest["producer"] == "test"
    result = run.result(prompts=1, forward_seconds=0.0)
    assert result.tensors == 1 and result.bytes == 0 and result.path == path


def test_model_record_ignores_where_the_files_are(tiny_minimax):
    from layerwise import models

    config = models.load_config(tiny_minimax).config
    record = model_record(tiny_minimax, config, "MiniMaxM2ForCausalLM", 4)
    assert record["path"] == str(tiny_minimax.path) and record["config_sha256"] == config_sha256(config)
    assert list(record) == ["spec", "path", "model_type", "architecture", "config_sha256", "num_layers", "hidden_size"]
    config.dtype = "float32"  # volatile fields do not change the hash
    assert config_sha256(config) == record["config_sha256"]
