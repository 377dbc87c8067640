"""The safetensors format: exact bytes, every dtype of the one table, headers checked before data."""

import hashlib
import json

import blake3
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from layerwise import filebits, tensorfile
from layerwise.errors import UserError


def test_written_bytes_are_pinned(tmp_path):
    """Header length, compact JSON header padded to 8 bytes, data in C order, the digest in the
    metadata (one chunk: the sha256_tree is the plain sha256)."""
    t = torch.arange(3, dtype=torch.int32)
    path = tmp_path / "a.safetensors"
    assert tensorfile.write_file(path, {"x:output": t}, {"prompt": "0"}) == 12
    data = path.read_bytes()
    digest = blake3.blake3(t.numpy().tobytes()).hexdigest()
    header = (f'{{"__metadata__":{{"prompt":"0","blake3:x:output":"{digest}"}},'
              '"x:output":{"dtype":"I32","shape":[3],"data_offsets":[0,12]}}').encode()
    header += b" " * (-len(header) % 8)
    assert data == len(header).to_bytes(8, "little") + header + t.numpy().tobytes()
    assert tensorfile.digest(t) == tensorfile.digest(t, "blake3") == digest
    assert tensorfile.digest(t, "sha256") == tensorfile.digest(t, "sha256_tree") == hashlib.sha256(t.numpy()).hexdigest()


def _tree(data: bytes, chunk: int) -> str:
    """The sha256_tree of FORMAT.md, written out: the sha256 of the chunks' raw sha256 digests."""
    leaves = b"".join(hashlib.sha256(data[i:i + chunk]).digest() for i in range(0, len(data), chunk))
    return hashlib.sha256(leaves).hexdigest()


@pytest.mark.parametrize("size, chunks", [(0, 0), (1, 1), (16, 1), (17, 2), (32, 2), (40, 3), (1000, 63)])
def test_sha256_tree_hashes_the_chunks_digests(monkeypatch, size, chunks):
    """Bytes of one chunk or less: their plain sha256; more: the sha256 of the chunks' digests, the
    last chunk shorter. Plain "sha256" (format version 1) is one stream, whatever the size."""
    monkeypatch.setattr(tensorfile, "HASH_CHUNK", 16)
    t = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(size))
    data = t.numpy().tobytes()
    plain = hashlib.sha256(data).hexdigest()
    assert tensorfile.digest(t, "sha256") == plain
    assert tensorfile.digest(t, "sha256_tree") == (plain if chunks <= 1 else _tree(data, 16)), f"{chunks} chunks"
    assert tensorfile.digest(t) == blake3.blake3(data).hexdigest()  # blake3: no chunks of ours
    assert -(-size // 16) == chunks


def test_digests_are_of_the_bytes_in_c_order(monkeypatch):
    monkeypatch.setattr(tensorfile, "HASH_CHUNK", 8)
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    for algorithm, oracle in (("sha256_tree", lambda b: _tree(b, 8)), ("blake3", lambda b: blake3.blake3(b).hexdigest())):
        assert tensorfile.digest(t.t(), algorithm) == oracle(t.t().contiguous().numpy().tobytes()) \
            != tensorfile.digest(t, algorithm)
        bf16 = t.to(torch.bfloat16)
        assert tensorfile.digest(bf16, algorithm) == oracle(bf16.view(torch.int16).numpy().tobytes())


def test_write_file_stores_the_tree_digest_and_claims_are_checked(tmp_path, monkeypatch):
    """As version 2 wrote it (sha256_tree); claims of every algorithm are checked."""
    monkeypatch.setattr(tensorfile, "HASH_CHUNK", 64)
    monkeypatch.setattr(tensorfile, "DIGEST", "sha256_tree")
    t = torch.randn(100, generator=torch.Generator().manual_seed(0))  # 400 bytes: 7 chunks
    path = tmp_path / "a.safetensors"
    tensorfile.write_file(path, {"t": t}, {})
    read, stored = tensorfile.read_tensor_and_digests(path, "t")
    assert stored == {"sha256_tree": _tree(t.numpy().tobytes(), 64)}
    assert tensorfile.digests_hold(read, stored.items())
    plain = ("sha256", hashlib.sha256(t.numpy().tobytes()).hexdigest())
    assert tensorfile.digests_hold(read, [plain, *stored.items()])
    assert not tensorfile.digests_hold(read, [("sha256_tree", plain[1])])
    assert not tensorfile.digests_hold(read, [*stored.items(), ("sha256_tree", "0" * 64)])
    assert tensorfile.digests_hold(read, [*stored.items(), ("blake3", blake3.blake3(t.numpy().tobytes()).hexdigest())])
    assert not tensorfile.digests_hold(read, [*stored.items(), ("blake3", plain[1])])
    read[99] += 1  # a changed byte in the last, shorter chunk
    assert not tensorfile.digests_hold(read, stored.items())
    # a digest already taken of the bytes (hashed as they were read) stands for them, not computed again
    right = blake3.blake3(t.numpy().tobytes()).hexdigest()
    assert tensorfile.digests_hold(read, [("blake3", right)], known={"blake3": right})
    assert not tensorfile.digests_hold(t, [("blake3", right)], known={"blake3": "0" * 64})


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
    assert index["a"] == ([2, 4], "F32", {"blake3": tensorfile.digest(torch.zeros(2, 4))})
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


def test_a_forked_child_reads_with_pools_of_its_own(tmp_path, monkeypatch):
    """The reading and hashing pools' threads are not in a forked child: it makes its own."""
    import os

    monkeypatch.setattr(tensorfile, "_CHUNK", 64)
    tensors = {"t": torch.arange(1000, dtype=torch.float32)}
    path = tmp_path / "a.safetensors"
    tensorfile.write_file(path, tensors, {})
    assert torch.equal(tensorfile.read_tensors(path, ["t"], torch.device("cpu"))["t"], tensors["t"])  # pools made
    pid = os.fork()
    if pid == 0:
        ok = torch.equal(tensorfile.read_tensors(path, ["t"], torch.device("cpu"))["t"], tensors["t"])
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("inference", [True, False])
def test_parallel_reads_fill_tensors_made_in_inference_mode_or_not(tmp_path, monkeypatch, inference):
    """Inference mode is per thread: the reading threads copy under the caller's mode, or copying
    into a tensor made under torch.inference_mode raises (as streaming's layers are read)."""
    monkeypatch.setattr(tensorfile, "_CHUNK", 64)
    tensors = {f"t{i}": torch.randn(100 + i, generator=torch.Generator().manual_seed(i)) for i in range(3)}
    path = tmp_path / "a.safetensors"
    tensorfile.write_file(path, tensors, {})
    with torch.inference_mode(inference):
        got = tensorfile.read_tensors(path, list(tensors), torch.device("cpu"))
    assert all(torch.equal(got[n], t) for n, t in tensors.items()) and got["t0"].is_inference() == inference


def test_a_changed_read_threads_reads_with_a_pool_of_that_size(tmp_path, monkeypatch):
    """READ_THREADS is read at every read: set it, and the parts go to a pool of that many threads."""
    monkeypatch.setattr(tensorfile, "_CHUNK", 64)
    monkeypatch.setattr(tensorfile, "READ_THREADS", 3)
    t = torch.arange(2000, dtype=torch.float32)
    path = tmp_path / "a.safetensors"
    tensorfile.write_file(path, {"t": t}, {})
    assert torch.equal(tensorfile.read_tensors(path, ["t"], torch.device("cpu"))["t"], t)
    assert tensorfile._POOLS[("read", 3)]._max_workers == 3


def test_raw_bytes_are_the_tensors_bytes_in_c_order_and_outlive_it():
    """The bytes numpy sees (the oracle) for a contiguous tensor, a slice with a storage offset,
    a transposed view, a lazy conjugate and an empty tensor; a view of a tensor's own memory keeps
    that memory alive once the caller drops the tensor."""
    from layerwise import rawbytes

    base = torch.arange(24, dtype=torch.bfloat16).reshape(4, 6)
    cases = [base, base[1:3], base.t(), torch.tensor([1 + 2j, 3 - 4j]).conj(), torch.empty(0, 3)]
    for t in cases:
        want = t.resolve_conj().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert bytes(rawbytes.raw_bytes(t)) == want
    t = torch.arange(1000, dtype=torch.float32)
    view = rawbytes.raw_bytes(t)
    want = t.numpy().tobytes()
    del t
    torch.zeros(100_000)  # memory that a freed tensor's would be reused for
    assert bytes(view) == want


@pytest.mark.parametrize("poison", [None, "first piece", "last piece", "spread"])
def test_pieces_checked_hashed_and_written_make_the_plain_file(tmp_path, monkeypatch, poison):
    """A tensor read once in pieces (each checked, hashed and written while in cache, the header
    written last) gives the file written the plain way: header, then data, digests and NaN/Inf
    counts computed over whole tensors (the oracle: blake3 of the bytes, torch's isnan/isinf);
    a NaN found in any piece has the file written again with its counts ("spread": NaN and Inf
    in several pieces of two tensors, and in several of the counting's runs of 7 elements)."""
    g = torch.Generator().manual_seed(1)
    tensors = {"a:output": torch.randn(50, 7, generator=g).to(torch.bfloat16),  # 700 bytes: 11 pieces of 64
               "a:ids": torch.randint(0, 9, (13,), generator=g), "a:empty": torch.zeros(0),
               "a:router_logits": torch.randn(40, generator=g)}  # fp32: 160 bytes, 3 pieces of 64
    if poison == "spread":
        tensors["a:output"].view(-1)[[0, 1, 20, 100, 166, 349]] = float("nan")
        tensors["a:output"].view(-1)[[21, 250]] = float("-inf")
        tensors["a:router_logits"][[3, 39]] = float("inf")
    elif poison:
        tensors["a:output"].view(-1)[0 if poison == "first piece" else -1] = float("nan")
    written = {}
    for piece, counted in ((64, 7), (4 << 20, 1 << 16)):  # NaN/Inf counted 7 elements at a time, and whole
        monkeypatch.setattr(filebits, "PIECE", piece)
        monkeypatch.setattr(filebits, "COUNT_ELEMENTS", counted)
        tensorfile.write_file(tmp_path / f"{piece}.safetensors", tensors, {"prompt": "0"}, nonfinite=True)
        written[piece] = (tmp_path / f"{piece}.safetensors").read_bytes()
    assert written[64] == written[4 << 20]
    head, _, meta = filebits.file_head({"prompt": "0"}, [
        (name, tensorfile.code(t.dtype), t.shape, t.numel() * t.element_size(),
         (int(torch.isnan(t).sum()), int(torch.isinf(t).sum())) if t.is_floating_point() and
         not torch.isfinite(t).all() else None,
         blake3.blake3(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest())
        for name, t in tensors.items()])
    data = b"".join(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() for t in tensors.values())
    assert written[64] == head + data
    assert ("nonfinite:a:output" in meta) == bool(poison)
    assert meta.get("nonfinite:a:router_logits") == ("0,2" if poison == "spread" else None)
    if poison == "spread":
        assert meta["nonfinite:a:output"] == "6,2"


def test_tensors_known_finite_are_not_checked_the_others_are(tmp_path):
    """`finite` names tensors the capture's GPU found finite: no second check of them (no seconds
    spent checking when it names them all), the same bytes; a tensor it does not name is checked,
    its NaN/Inf counted as ever."""
    g = torch.Generator().manual_seed(4)
    tensors = {"a:input": torch.randn(64, 8, generator=g).to(torch.bfloat16), "a:output": torch.randn(64, 8, generator=g),
               "a:ids": torch.randint(0, 9, (13,), generator=g)}
    spent: dict = {}
    tensorfile.write_file(tmp_path / "checked", tensors, {}, nonfinite=True, spent=spent)
    assert spent["nonfinite"] > 0
    spent = {}
    tensorfile.write_file(tmp_path / "known", tensors, {}, nonfinite=True, spent=spent, finite={"a:input", "a:output"})
    assert "nonfinite" not in spent
    assert (tmp_path / "known").read_bytes() == (tmp_path / "checked").read_bytes()
    tensors["a:output"][3, 1] = float("nan")
    header: dict = {}
    tensorfile.write_file(tmp_path / "one", tensors, {}, header, nonfinite=True, finite={"a:input"})
    assert header["__metadata__"]["nonfinite:a:output"] == "1,0"


@pytest.mark.parametrize("shape", [(2, 3), (), (0, 4), (5,)])
def test_plain_reads_give_what_safetensors_reads(tmp_path, monkeypatch, shape):
    """A tensor read with plain file reads (PLAIN_READS) is safetensors' own, bit for bit, in
    every dtype and shape (0-d and empty too), with the same stored digests; a missing tensor and a
    file cut short in its data are errors."""
    numel = int(torch.tensor(shape, dtype=torch.int64).prod())
    tensors = {f"t.{code}": torch.arange(numel, dtype=torch.float32).reshape(shape).to(getattr(torch, name))
               for code, (name, _) in tensorfile.DTYPES.items()}
    path = tmp_path / "all.safetensors"
    tensorfile.write_file(path, tensors, {})
    for name, t in tensors.items():
        monkeypatch.setattr(tensorfile, "PLAIN_READS", False)
        theirs, their_digests = tensorfile.read_tensor_and_digests(path, name)
        monkeypatch.setattr(tensorfile, "PLAIN_READS", True)
        ours, our_digests = tensorfile.read_tensor_and_digests(path, name)
        assert ours.dtype == theirs.dtype == t.dtype and ours.shape == theirs.shape == t.shape, name
        flat = [x.reshape(-1).view(torch.uint8) for x in (ours, theirs)]
        assert torch.equal(*flat) and our_digests == their_digests != {}, name
    with pytest.raises(ValueError, match="holds no tensor"):
        tensorfile.read_tensor_and_digests(path, "absent")
    last = max(tensorfile.read_header(path).items(), key=lambda item: item[1]["data_offsets"][1])[0]
    if numel:
        path.write_bytes(path.read_bytes()[:-1])  # the header still fits: the last tensor's data is cut short
        with pytest.raises(UserError, match="truncated"):  # read_header sees it first
            tensorfile.read_tensor_and_digests(path, last)
