"""The safetensors format: exact bytes, every dtype of the one table, headers checked before data."""

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from layerwise import tensorfile
from layerwise.errors import UserError


def test_written_bytes_are_pinned(tmp_path):
    """Header length, compact JSON header padded to 8 bytes, data in C order, sha256 in the metadata."""
    t = torch.arange(3, dtype=torch.int32)
    path = tmp_path / "a.safetensors"
    assert tensorfile.write_file(path, {"x:output": t}, {"prompt": "0"}) == 12
    data = path.read_bytes()
    digest = hashlib.sha256(t.numpy().tobytes()).hexdigest()
    header = (f'{{"__metadata__":{{"prompt":"0","sha256:x:output":"{digest}"}},'
              '"x:output":{"dtype":"I32","shape":[3],"data_offsets":[0,12]}}').encode()
    header += b" " * (-len(header) % 8)
    assert data == len(header).to_bytes(8, "little") + header + t.numpy().tobytes()
    assert tensorfile.sha256_of(t) == digest


@pytest.mark.parametrize("code", sorted(tensorfile.DTYPES))
def test_every_dtype_round_trips_through_safetensors(tmp_path, code):
    name, itemsize = tensorfile.DTYPES[code]
    dtype = getattr(torch, name)
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3).to(dtype)
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "theirs.safetensors"
    tensorfile.write_file(ours, {"t": t}, {})
    save_file({"t": t}, str(theirs))
    with safe_open(str(ours), "pt") as fh:
        assert fh.get_tensor("t").dtype == dtype and torch.equal(fh.get_tensor("t").view(torch.uint8),
                                                                 t.view(torch.uint8))
    assert tensorfile.read_header(theirs)["t"]["dtype"] == code
    assert tensorfile.dtype_name(code) == name and tensorfile.nbytes((2, 3), name) == 6 * itemsize
    got = tensorfile.read_tensors(theirs, ["t"], torch.device("cpu"))["t"]
    assert got.dtype == dtype and torch.equal(got.view(torch.uint8), t.view(torch.uint8))
    assert torch.equal(tensorfile.read_tensor(ours, "t").view(torch.uint8), t.view(torch.uint8))


def test_read_index_gives_shapes_dtypes_and_digests(tmp_path):
    path = tmp_path / "a.safetensors"
    tensorfile.write_file(path, {"a": torch.zeros(2, 4), "b": torch.ones(1, dtype=torch.bfloat16)}, {})
    index = tensorfile.read_index(path)
    assert index["a"] == ([2, 4], "F32", tensorfile.sha256_of(torch.zeros(2, 4)))
    assert index["b"][:2] == ([1], "BF16")


def test_read_tensors_merges_and_skips_gaps(tmp_path, monkeypatch):
    """Tensors far apart are read in separate passes, near ones in one; either way the bytes agree."""
    monkeypatch.setattr(tensorfile, "_MERGE_GAP", 16)
    monkeypatch.setattr(tensorfile, "_CHUNK", 64)
    tensors = {f"t{i}": torch.randn(10 + i, generator=torch.Generator().manual_seed(i)) for i in range(5)}
    path = tmp_path / "a.safetensors"
    save_file(tensors, str(path))
    got = tensorfile.read_tensors(path, ["t4", "t0", "t2"], torch.device("cpu"))
    assert all(torch.equal(got[n], tensors[n]) for n in ("t0", "t2", "t4"))


@pytest.mark.parametrize("damage, fragment", [
    (lambda b: b[:5], "truncated"),
    (lambda b: b[:-1], "truncated"),
    (lambda b: (200).to_bytes(8, "little") + b[8:], "truncated or not a safetensors file"),
    (lambda b: b[:8] + b"[" + b[9:], "corrupt header"),
])
def test_bad_files_are_refused_from_the_header(tmp_path, damage, fragment):
    path = tmp_path / "a.safetensors"
    tensorfile.write_file(path, {"a": torch.zeros(4)}, {})
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(UserError, match=fragment):
        tensorfile.read_header(path)


def test_metadata_is_returned_on_request(tmp_path):
    path = tmp_path / "a.safetensors"
    tensorfile.write_file(path, {"a": torch.zeros(1)}, {"prompt": "3"})
    metadata: dict = {}
    header = tensorfile.read_header(path, metadata)
    assert set(header) == {"a"} and metadata["prompt"] == "3" and json.dumps(metadata)
