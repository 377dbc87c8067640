"""One run's lifecycle: intent first, files as they come, the manifest last; an error aborts
without a manifest, and the same intent resumes."""

import errno
import json
import threading
from pathlib import Path

import pytest
import torch

from layerwise import manifest as manifest_module
from layerwise import runs, writerproc
from layerwise.errors import UserError
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


@pytest.mark.parametrize("writer_kind", ["process", "threads"])
def test_the_intent_is_written_beside_the_first_forward_pass_and_lands_before_any_tensor_file(
        tmp_path, monkeypatch, writer_kind):
    """One process's Recording writes intent.json from a thread of its own (its text and fsync,
    7 ms for 16 prompts of 4096 token ids, overlap the first forward pass, the GIL handed back
    after each prompt); a tensor file waits until intent.json is whole, and the manifest holds
    the prompts' text made then, not encoded again."""
    if writer_kind == "threads":
        monkeypatch.setenv(writerproc.ENV, "threads")
    begun, gate = threading.Event(), threading.Event()
    write = runs.write_text_atomic

    def held(path, text, fsync=True):
        if Path(path).name == INTENT:
            begun.set()
            assert gate.wait(10)
        write(path, text, fsync)

    calls = []

    def json_text(doc, known=None, between=None):
        calls.append(("prompts" in (known or {}), between is not None))
        return manifest_module.json_text(doc, known, between)

    monkeypatch.setattr(runs, "write_text_atomic", held)
    monkeypatch.setattr(runs, "json_text", json_text)
    path = tmp_path / "run"
    with Recording(path, INTENT_, None) as run:
        assert begun.wait(10) and not (path / INTENT).exists()  # the constructor did not wait for it
        putter = threading.Thread(target=run.writer.put, args=(0, "model.layers.0",
                                                                {"model.layers.0:output": torch.ones(1, 2)}))
        putter.start()
        putter.join(0.5)
        assert not list(path.rglob("*.safetensors")), "a tensor file was written before intent.json"
        gate.set()
        putter.join(10)
        run.close_capture()
        run.finish({"stats": {}})
    assert json.loads((path / INTENT).read_text()) == INTENT_.as_dict()
    assert open_run(path).names == ["model.layers.0:output"]
    assert calls[0] == (False, True), "the intent's text: made in the background, yielding between prompts"
    assert calls[-1] == (True, False) and len(calls) == 2, "the manifest's: the prompts' text made once"


@pytest.mark.parametrize("writer_kind", ["process", "threads"])
def test_an_intent_that_cannot_be_written_stops_the_run_in_one_line_with_no_tensor_file(
        tmp_path, monkeypatch, writer_kind):
    if writer_kind == "threads":
        monkeypatch.setenv(writerproc.ENV, "threads")

    def full(path, text, fsync=True):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs, "write_text_atomic", full)
    path = tmp_path / "run"
    with pytest.raises(UserError) as caught:
        with Recording(path, INTENT_, None) as run:
            run.writer.put(0, "model.layers.0", {"model.layers.0:output": torch.ones(1, 2)})
            run.close_capture()
            run.finish({"stats": {}})
    assert str(caught.value) == (f"cannot write the run {path}: No space left on device ({path / INTENT}); "
                                 "pick a writable --out")
    assert not list(path.rglob("*.safetensors")) and not (path / MANIFEST).exists()
