import json

import pytest

from layerwise import checkpoint, tensorfile
from layerwise.errors import UserError

from helpers import copy_checkpoint


def test_tiny_checkpoint_is_consistent(tiny_minimax):
    report = checkpoint.inspect_checkpoint(tiny_minimax.path)
    assert report.ok, report.problems
    assert len(report.shards) >= 2 and report.tensor_count > 50
    assert checkpoint.index_gaps(checkpoint.weight_map(tiny_minimax.path)) == []


def test_missing_shard(tiny_minimax, tmp_path):
    ckpt = copy_checkpoint(tiny_minimax.path, tmp_path / "m")
    shard = checkpoint.inspect_checkpoint(ckpt).shards[1]
    (ckpt / shard).unlink()
    with pytest.raises(UserError, match=f"shard {shard} is listed in the index but missing"):
        checkpoint.require_complete(ckpt)


def test_truncated_shard(tiny_minimax, tmp_path):
    ckpt = copy_checkpoint(tiny_minimax.path, tmp_path / "m")
    shard = ckpt / checkpoint.inspect_checkpoint(ckpt).shards[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    with pytest.raises(UserError, match="is truncated"):
        checkpoint.require_complete(ckpt)
    shard.write_bytes(data[:4])
    with pytest.raises(UserError, match="is truncated"):
        checkpoint.require_complete(ckpt)


def test_index_gap_detection(tiny_minimax):
    wmap = checkpoint.weight_map(tiny_minimax.path)
    dropped = "model.layers.2.self_attn.k_proj.weight"
    gaps = checkpoint.index_gaps({k: v for k, v in wmap.items() if k != dropped})
    assert len(gaps) == 1 and dropped in gaps[0]
    hole = checkpoint.index_gaps({k: v for k, v in wmap.items() if not k.startswith("model.layers.1.")})
    assert any("model.layers.1" in g and "missing" in g for g in hole)


def test_shard_lacking_indexed_tensor(tiny_minimax, tmp_path):
    ckpt = copy_checkpoint(tiny_minimax.path, tmp_path / "m")
    index = json.loads((ckpt / checkpoint.INDEX_NAME).read_text())
    first_shard = next(iter(index["weight_map"].values()))
    index["weight_map"]["model.layers.0.made_up.weight"] = first_shard
    (ckpt / checkpoint.INDEX_NAME).write_text(json.dumps(index))
    report = checkpoint.inspect_checkpoint(ckpt)
    assert any("made_up" in p for p in report.problems)


def test_read_tensors(tiny_minimax):
    names = ["model.layers.3.self_attn.q_proj.weight", "model.norm.weight"]
    tensors = checkpoint.read_tensors(tiny_minimax.path, names)
    assert set(tensors) == set(names) and tensors[names[0]].shape == (64, 64)
    with pytest.raises(UserError, match="not in the checkpoint"):
        checkpoint.read_tensors(tiny_minimax.path, ["nope"])


def test_read_tensors_matches_safetensors_and_reads_only_their_span(tiny_minimax, monkeypatch):
    """Merged sequential reads give exactly what safetensors gives, and never read bytes beyond
    the first and last wanted tensor of a shard (small chunks: the reads go over several threads)."""
    import os

    import torch
    from safetensors import safe_open

    wmap = checkpoint.weight_map(tiny_minimax.path)
    names = [n for n in wmap if n.startswith("model.layers.2.")]
    bytes_read = []
    real_preadv = os.preadv

    def counting(fd, buffers, offset):
        n = real_preadv(fd, buffers, offset)
        bytes_read.append(n)
        return n

    monkeypatch.setattr(tensorfile.os, "preadv", counting)
    monkeypatch.setattr(tensorfile, "_CHUNK", 4096)
    got = checkpoint.read_tensors(tiny_minimax.path, names)
    for name in names:
        with safe_open(str(tiny_minimax.path / wmap[name]), "pt") as fh:
            assert torch.equal(fh.get_tensor(name), got[name]), name
    span = 0
    for shard in {wmap[n] for n in names}:
        header = tensorfile.read_header(tiny_minimax.path / shard)
        offsets = [header[n]["data_offsets"] for n in names if wmap[n] == shard]
        span += max(e for _, e in offsets) - min(b for b, _ in offsets)
    assert len(bytes_read) > 4 and 0 < sum(bytes_read) <= span
