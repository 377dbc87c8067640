"""_prefetch.py: a command's layers read from disk, in its order, while it imports. Oracle for the byte
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
    """{file: [(first byte, end), ...]} of the tensors `names` as the loader reads them, touching
    spans joined."""
    wmap = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    pieces = {}
    for name in names:
        path = directory / wmap[name]
        with open(path, "rb") as fh:
            start = 8 + int.from_bytes(fh.read(8), "little")
        lo, hi = tensorfile.read_header(path)[name]["data_offsets"]
        pieces.setdefault(path, []).append((start + lo, start + hi))
    return {path: joined(spans) for path, spans in pieces.items()}


def joined(spans) -> list:
    out = []
    for lo, hi in sorted(spans):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def as_spans(reads) -> dict:
    pieces = {}
    for path, offset, length in reads:
        pieces.setdefault(path, []).append((offset, offset + length))
    return {path: joined(spans) for path, spans in pieces.items()}


@pytest.mark.parametrize("args, env, layers", [
    (["test", "{ckpt}", "--reference", "ref", "--layer", "all"], {}, [0, 1, 2, 3]),
    (["test", "{ckpt}", "--reference", "ref", "--test-type", "single", "--layer", "2"], {}, [2]),
    (["test", "{ckpt}", "--reference", "ref", "--layer", "all"], {"RANK": "1", "WORLD_SIZE": "2"}, [1, 3]),
    (["test", "--reference", "ref", "{ckpt}", "--test-type", "multi", "--layers", "1-3"],
     {"RANK": "1", "WORLD_SIZE": "2"}, [2]),  # dealt round-robin
], ids=["all", "one-layer", "rank-1-of-2", "multi-rank-1"])
def test_a_layer_test_reads_its_layers_in_order(sharded, monkeypatch, args, env, layers):
    """Exactly each layer's tensors, a layer after the other, though every shard interleaves
    tensors of several layers (holes between them not read through here: _GAP 0)."""
    monkeypatch.setattr(_prefetch, "_GAP", 0)
    argv = [a.format(ckpt=sharded) for a in args]
    source = open_layers(str(sharded), LayerOptions())
    groups = list(_prefetch._planned(argv, env))
    assert [as_spans(g) for g in groups] == [spans_of(sharded, source.checkpoint_names(k)) for k in layers]
    assert _prefetch.first_reads(argv, env) == [read for g in groups for read in g]


@pytest.mark.parametrize("args", [["extract", "{ckpt}", "--stream", "--prompt", "hi"],
                                  ["test", "{ckpt}", "--record-reference", "--reference", "r", "--layer", "2"]],
                         ids=["extract-stream", "record-reference"])
def test_a_streamed_extract_reads_the_embedding_the_layers_then_the_rest(sharded, monkeypatch, args):
    """Also a test that records its reference as it goes: it streams the model from its start,
    on every rank."""
    monkeypatch.setattr(_prefetch, "_GAP", 0)
    groups = list(_prefetch._planned([a.format(ckpt=sharded) for a in args], {"RANK": "1", "WORLD_SIZE": "2"}))
    source = open_layers(str(sharded), LayerOptions())
    wanted = [["model.embed_tokens.weight"]] + [source.checkpoint_names(k) for k in range(4)]
    wmap = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    wanted.append([n for n in wmap if not any(n in names for names in wanted)])  # the final norm, the head
    assert "model.norm.weight" in wanted[-1]
    assert [as_spans(g) for g in groups] == [spans_of(sharded, names) for names in wanted]


def test_holes_up_to_the_gap_are_read_through(tmp_path, monkeypatch):
    wmap = {"a": "f", "b": "f", "c": "f"}
    header = {"a": {"data_offsets": [0, 100]}, "c": {"data_offsets": [150, 200]}, "b": {"data_offsets": [5000, 6000]}}
    monkeypatch.setattr(_prefetch, "_GAP", 1000)
    assert _prefetch._ranges(tmp_path, wmap, ["b", "a", "c"], {"f": (8, header)}) == \
        [(tmp_path / "f", 8, 200), (tmp_path / "f", 5008, 1000)]


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
    groups = [[(tmp_path / "f", 1000, 200_000), (tmp_path / "missing", 0, 10)], [(tmp_path / "f", 500_000, 400_000)]]
    assert _prefetch._read(groups, 10 << 20, threads=1) == 600_010  # the bytes asked for
    assert seen[0] == (1000, 64 << 10) and seen[-1][0] + seen[-1][1] == 900_000
    assert [off for off, _ in seen] == sorted(off for off, _ in seen)  # one thread: in order
    seen.clear()
    assert _prefetch._read(groups, 100_000, threads=1) == 131072  # stops at the first chunk past the budget
    assert all(off < 201_000 for off, _ in seen)
    seen.clear()
    assert _prefetch._read(iter(groups), 10 << 20, threads=3) == 600_010  # several threads: every chunk once
    assert sorted(seen) == sorted(set(seen)) and sum(n for _, n in seen) == 600_000


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


def test_the_budget_is_a_quarter_of_the_memory_available_shared_by_the_machine_s_ranks():
    gib = 1 << 30
    assert _prefetch.prefetch_budget(120 * gib, {}) == 30 * gib
    assert _prefetch.prefetch_budget(1024 * gib, {}) == _prefetch.PREFETCH_BYTES == 32 * gib
    assert _prefetch.prefetch_budget(120 * gib, {"LOCAL_WORLD_SIZE": "8"}) == 120 * gib // 32
    assert _prefetch.prefetch_budget(0, {"LOCAL_WORLD_SIZE": "2"}) == 16 * gib  # unknown memory: the cap, shared



@pytest.mark.parametrize("value, threads", [("6", 6), ("1", 1), ("lots", _prefetch._THREADS), (None, None)])
def test_the_prefetch_reads_on_as_many_threads_as_the_command(sharded, monkeypatch, value, threads):
    """LAYERWISE_READ_THREADS sets both; a value that is no thread count leaves the prefetch at its
    default (the command itself then stops with one line, exit 2); unset: _boot.read_threads()."""
    if value is None:
        monkeypatch.delenv("LAYERWISE_READ_THREADS", raising=False)
        threads = _prefetch.read_threads()
    else:
        monkeypatch.setenv("LAYERWISE_READ_THREADS", value)
    used = []
    monkeypatch.setattr(_prefetch, "_read", lambda groups, budget, count=None: used.append(count) or 0)
    thread = _prefetch.prefetch(["test", str(sharded), "--reference", "ref", "--layer", "all"])
    thread.join(30)
    assert used == [threads]
