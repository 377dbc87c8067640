"""_prefetch.py: a command's first layer read from disk while it imports. Oracle for the byte
ranges: layerwise's own loader, which names the tensors a layer test reads for a layer
(LayerSource.checkpoint_names) and the header offsets it reads them at (tensorfile)."""

import json
import shutil
import threading

import pytest
import torch
from safetensors.torch import save_file

from layerwise import _prefetch, tensorfile, zoo
from layerwise.layer_loading import LayerOptions, open_layers


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """minimax-m2-tiny rewritten in three shards with an index (as Hugging Face saves large models)."""
    src = zoo.tiny_checkpoint("minimax-m2-tiny")
    out = tmp_path_factory.mktemp("sharded")
    shutil.copy(src / "config.json", out / "config.json")
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        from safetensors.torch import load_file
        tensors.update(load_file(f))
    names = sorted(tensors)
    wmap = {}
    for i in range(3):
        part = {n: tensors[n].contiguous() for n in names[i::3]}
        file = f"model-{i + 1:05d}-of-00003.safetensors"
        save_file(part, out / file)
        wmap.update({n: file for n in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    return out


def spans_of(directory, names) -> dict:
    """{file: (first byte, end)} of the tensors `names` as the loader reads them."""
    wmap = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for name in names:
        path = directory / wmap[name]
        with open(path, "rb") as fh:
            start = 8 + int.from_bytes(fh.read(8), "little")
        lo, hi = tensorfile.read_header(path)[name]["data_offsets"]
        a, b = out.get(path, (start + lo, start + hi))
        out[path] = (min(a, start + lo), max(b, start + hi))
    return out


def as_spans(reads) -> dict:
    return {path: (offset, offset + length) for path, offset, length in reads}


@pytest.mark.parametrize("args, env, layer", [
    (["test", "{ckpt}", "--reference", "ref", "--layer", "all"], {}, 0),
    (["test", "{ckpt}", "--reference", "ref", "--test-type", "single", "--layer", "2"], {}, 2),
    (["test", "{ckpt}", "--reference", "ref", "--layer", "all"], {"RANK": "3"}, 3),  # dealt round-robin
    (["test", "--reference", "ref", "{ckpt}", "--test-type", "multi", "--layers", "1-3"], {"RANK": "1"}, 2),
], ids=["all", "one-layer", "rank-3", "multi-rank-1"])
def test_a_layer_test_reads_its_first_layer(sharded, args, env, layer):
    argv = [a.format(ckpt=sharded) for a in args]
    names = open_layers(str(sharded), LayerOptions()).checkpoint_names(layer)
    assert as_spans(_prefetch.first_reads(argv, env)) == spans_of(sharded, names)


@pytest.mark.parametrize("args", [["extract", "{ckpt}", "--stream", "--prompt", "hi"],
                                  ["test", "{ckpt}", "--record-reference", "--reference", "r", "--layer", "2"]],
                         ids=["extract-stream", "record-reference"])
def test_a_streamed_extract_reads_the_embedding_then_layer_0(sharded, args):
    """Also a test that records its reference as it goes: it streams the model from its start,
    on every rank."""
    reads = _prefetch.first_reads([a.format(ckpt=sharded) for a in args], {"RANK": "1"})
    source = open_layers(str(sharded), LayerOptions())
    wanted = ["model.embed_tokens.weight", *source.checkpoint_names(0)]
    assert as_spans(reads) == spans_of(sharded, wanted)
    embed_file = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"][wanted[0]]
    assert reads[0][0].name == embed_file  # the embedding's file first: it is read first


@pytest.mark.parametrize("args", [
    ["extract", "{ckpt}", "--prompt", "hi"],  # the whole model loads: no layer-by-layer order to follow
    ["test", "{ckpt}", "--reference", "ref", "--test-type", "full"],
    ["compare", "a", "b"], ["plan", "{ckpt}"], [],
    ["test", "builtin:minimax-m2-tiny", "--reference", "ref"],  # no checkpoint directory among the arguments
    ["test", "{run}", "--reference", "{run}"],  # a run directory is not a checkpoint
])
def test_commands_that_read_no_layer_first_prefetch_nothing(sharded, tmp_path, args):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text("{}")
    save_file({"x": torch.zeros(4)}, tmp_path / "run" / "p0.safetensors")
    assert _prefetch.first_reads([a.format(ckpt=sharded, run=tmp_path / "run") for a in args], {}) == []


def test_the_reader_reads_the_ranges_in_order_up_to_its_budget(tmp_path, monkeypatch):
    data = bytes(range(256)) * 4096  # 1 MiB
    (tmp_path / "f").write_bytes(data)
    seen = []
    real = _prefetch.os.preadv
    monkeypatch.setattr(_prefetch, "_CHUNK", 64 << 10)
    monkeypatch.setattr(_prefetch.os, "preadv", lambda fd, bufs, off: seen.append((off, len(bufs[0]))) or
                        real(fd, bufs, off))
    reads = [(tmp_path / "f", 1000, 200_000), (tmp_path / "missing", 0, 10), (tmp_path / "f", 500_000, 400_000)]
    assert _prefetch._read(reads, 10 << 20) == 600_000
    assert seen[0] == (1000, 64 << 10) and seen[-1][0] + seen[-1][1] == 900_000
    seen.clear()
    assert _prefetch._read(reads, 100_000) == 131072  # stops at the first chunk past the budget
    assert all(off < 201_000 for off, _ in seen)


def test_only_a_command_prefetches_and_it_can_be_turned_off(sharded, monkeypatch):
    argv = ["layerwise", "test", str(sharded), "--reference", "ref", "--layer", "all"]
    monkeypatch.setattr(_prefetch.sys, "argv", argv)
    monkeypatch.setattr(_prefetch, "is_command", lambda: False)
    assert _prefetch.prefetch_command() is None  # a program importing layerwise: nothing
    monkeypatch.setattr(_prefetch, "is_command", lambda: True)
    thread = _prefetch.prefetch_command()
    assert isinstance(thread, threading.Thread) and thread.daemon and thread.name == "layerwise-prefetch"
    thread.join(30)
    assert not thread.is_alive()
    monkeypatch.setenv(_prefetch.OFF, "0")
    assert _prefetch.prefetch_command() is None
