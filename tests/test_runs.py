"""The run format: pinned schema, atomic writes, resume rules, lazy verified reads."""

import json
import os
import re
from pathlib import Path

import blake3
import pytest
import torch
from safetensors import safe_open

from layerwise import runs, tensorfile
from layerwise.errors import UserError

from helpers import assert_one_line_error, run_cli, write_run
from synthetic_runs import as_version_1, corrupt_tensor

INTENT = {"producer": "test", "model": {"spec": "m", "model_type": "llama"}, "settings": {"dtype": "float32"},
          "prompts": [{"index": 0, "text": "ab", "token_ids": [1, 2]}, {"index": 1, "text": "c", "token_ids": [3]}]}


def write_small_run(path, intent=INTENT, **kw):
    tensors = {p: {"model.layers.0:input": torch.full((n, 4), float(p)),
                   "model.layers.0:output": torch.full((n, 4), p + 0.5),
                   "lm_head:output": torch.arange(n * 3, dtype=torch.bfloat16).reshape(n, 3),
                   "model.embed_tokens:output": torch.zeros(n, 4)} for p, n in ((0, 2), (1, 1))}
    return write_run(path, intent, tensors, {"stats": {"seconds": 0}}, **kw)


def test_manifest_schema_is_pinned(tmp_path):
    m = write_small_run(tmp_path / "run")
    assert list(m) == ["format", "format_version", "created", "producer", "model", "settings", "prompts", "stats",
                       "nonfinite", "tensors"]
    assert m["nonfinite"] == []
    assert m["format"] == "layerwise-run" and m["format_version"] == 3
    first = m["tensors"][0]
    assert list(first) == ["name", "module", "role", "prompt", "shape", "dtype", "file", "blake3"]
    assert first == {"name": "model.embed_tokens:output", "module": "model.embed_tokens", "role": "output", "prompt": 0,
                     "shape": [2, 4], "dtype": "float32", "file": "tensors/p00000/model.embed_tokens.safetensors",
                     "blake3": blake3.blake3(bytes(32)).hexdigest()}  # 2 x 4 float32 zeros
    assert [(t["name"], t["prompt"]) for t in m["tensors"]] == [
        ("model.embed_tokens:output", 0), ("model.layers.0:input", 0), ("model.layers.0:output", 0),
        ("lm_head:output", 0), ("model.embed_tokens:output", 1), ("model.layers.0:input", 1),
        ("model.layers.0:output", 1), ("lm_head:output", 1)]
    assert json.loads((tmp_path / "run" / runs.MANIFEST).read_text()) == m


def test_tensor_files_are_standard_safetensors(tmp_path):
    write_small_run(tmp_path / "run")
    file = tmp_path / "run" / "tensors" / "p00001" / "lm_head.safetensors"
    with safe_open(str(file), "pt") as fh:
        assert fh.metadata()["prompt"] == "1"
        t = fh.get_tensor("lm_head:output")
        assert fh.metadata()["blake3:lm_head:output"] == tensorfile.digest(t)
    assert t.dtype == torch.bfloat16 and t.tolist() == [[0, 1, 2]]
    header_len = int.from_bytes(file.read_bytes()[:8], "little")
    assert header_len % 8 == 0


def test_open_run_reads_lazily_and_verifies(tmp_path):
    write_small_run(tmp_path / "run")
    run = runs.open_run(tmp_path / "run")
    assert run.names == ["model.embed_tokens:output", "model.layers.0:input", "model.layers.0:output", "lm_head:output"]
    assert run.tensor("model.layers.0:output", 1).tolist() == [[1.5] * 4]
    file = tmp_path / "run" / run.entry("model.layers.0:output", 1).file
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF  # flip a bit of the last tensor's data
    file.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"p00001/model.layers.0.safetensors fails its digest check"):
        runs.open_run(tmp_path / "run").tensor("model.layers.0:output", 1)
    with pytest.raises(UserError, match="has no tensor nope for prompt 0"):
        run.tensor("nope", 0)


def write_big_run(path, monkeypatch, chunk: int = 64):
    """A run as version 2 wrote it ("sha256_tree" digests), whose float tensors span several
    HASH_CHUNKs (made tiny: `chunk` bytes)."""
    monkeypatch.setattr(tensorfile, "HASH_CHUNK", chunk)
    monkeypatch.setattr(tensorfile, "DIGEST", "sha256_tree")
    g = torch.Generator().manual_seed(0)
    tensors = {p: {"model.layers.0:output": torch.randn(n, 40, generator=g),  # n * 160 bytes
                   "lm_head:output": torch.randn(n, 50, generator=g).to(torch.bfloat16)} for p, n in ((0, 3), (1, 2))}
    write_run(path, INTENT, tensors)
    return runs.open_run(path), tensors


@pytest.mark.parametrize("where", [0, 100, 479])  # a byte in the first, a middle and the last 64-byte chunk
def test_a_changed_byte_in_any_chunk_fails_the_check(tmp_path, monkeypatch, where):
    run, tensors = write_big_run(tmp_path / "run", monkeypatch)
    e = run.entry("model.layers.0:output", 0)
    assert e.digests == (("sha256_tree", tensorfile.digest(tensors[0]["model.layers.0:output"])),)
    assert e.digests[0][1] != tensorfile.digest(tensors[0]["model.layers.0:output"], "sha256")  # 8 chunks: a tree
    assert torch.equal(run.tensor(e.name, 0), tensors[0][e.name])
    file = run.path / e.file
    data = bytearray(file.read_bytes())
    begin = 8 + int.from_bytes(data[:8], "little") + json.loads(data[8:8 + int.from_bytes(data[:8], "little")])[
        e.name]["data_offsets"][0]
    data[begin + where] ^= 0x01
    file.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"tensor model.layers.0:output in .*p00000/model.layers.0.safetensors "
                                        r"fails its digest check: the file is corrupt, re-extract it$"):
        run.tensor(e.name, 0)


def test_a_manifest_digest_unlike_the_header_is_refused(tmp_path, monkeypatch):
    """Both the manifest's and the header's digest hold the true bytes' digest, or the read fails."""
    run, tensors = write_big_run(tmp_path / "run", monkeypatch)
    manifest = json.loads((run.path / runs.MANIFEST).read_text())
    other = tensorfile.digest(tensors[1]["model.layers.0:output"])
    for e in manifest["tensors"]:
        if (e["name"], e["prompt"]) == ("model.layers.0:output", 0):
            e["sha256_tree"] = other
        if (e["name"], e["prompt"]) == ("lm_head:output", 0):  # the plain sha256 of the true bytes, beside
            e["sha256"] = tensorfile.digest(tensors[0]["lm_head:output"], "sha256")
    (run.path / runs.MANIFEST).write_text(json.dumps(manifest))
    run = runs.open_run(run.path)
    with pytest.raises(UserError, match="fails its digest check"):
        run.tensor("model.layers.0:output", 0)
    assert torch.equal(run.tensor("lm_head:output", 0), tensors[0]["lm_head:output"])
    assert len(run.entry("lm_head:output", 0).digests) == 2


def test_a_version_1_run_opens_and_verifies(tmp_path, monkeypatch):
    """Plain sha256 of every tensor, in the headers and the manifest, as version 1 wrote them:
    read, verified, and a flipped bit still caught."""
    run, tensors = write_big_run(tmp_path / "run", monkeypatch)
    old = as_version_1(run)
    assert old.manifest["format_version"] == 1
    e = old.entry("model.layers.0:output", 0)
    assert e.digests == (("sha256", tensorfile.digest(tensors[0][e.name], "sha256")),)
    assert all(torch.equal(old.tensor(e.name, e.prompt), tensors[e.prompt][e.name]) for e in old.entries())
    path = corrupt_tensor(old, e.name)
    with pytest.raises(UserError, match=f"in {re.escape(str(path))} fails its digest check"):
        old.tensor(e.name, 0)


def test_resuming_a_version_1_run_keeps_its_digests(tmp_path, monkeypatch):
    """A run begun by version 1 and finished by this version: the old files' entries carry "sha256"."""
    run, tensors = write_big_run(tmp_path / "run", monkeypatch)
    as_version_1(run)
    monkeypatch.setattr(tensorfile, "DIGEST", "blake3")
    (run.path / runs.MANIFEST).unlink()  # killed before the manifest
    (run.path / "tensors/p00001/lm_head.safetensors").unlink()
    w = runs.RunWriter(run.path, INTENT)
    w.put(1, "lm_head", {"lm_head:output": tensors[1]["lm_head:output"]})
    m = w.finish()
    fields = {(e["name"], e["prompt"]): e.keys() - {"name", "module", "role", "prompt", "shape", "dtype", "file"}
              for e in m["tensors"]}
    assert fields[("lm_head:output", 1)] == {"blake3"} and fields[("lm_head:output", 0)] == {"sha256"}
    new = runs.open_run(run.path)
    assert all(torch.equal(new.tensor(e.name, e.prompt), tensors[e.prompt][e.name]) for e in new.entries())


def test_format_md_verifier_checks_a_written_run(tmp_path, monkeypatch):
    """The lines of docs/FORMAT.md verify every file of a run (blake3), and of a version 2 run
    (sha256_tree over several chunks), and catch a flipped bit."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "FORMAT.md").read_text()
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "def bad_tensors" in b)
    namespace: dict = {}
    exec(snippet, namespace)
    assert namespace["CHUNK"] == tensorfile.HASH_CHUNK == 64 << 20
    write_small_run(tmp_path / "new")
    files = sorted((tmp_path / "new").glob("tensors/*/*.safetensors"))
    assert len(files) == 6 and all(namespace["bad_tensors"](f) == [] for f in files)
    corrupt_tensor(runs.open_run(tmp_path / "new"), "lm_head:output", 1)
    assert namespace["bad_tensors"](tmp_path / "new/tensors/p00001/lm_head.safetensors") == ["lm_head:output"]
    run, _ = write_big_run(tmp_path / "run", monkeypatch)
    namespace["CHUNK"] = tensorfile.HASH_CHUNK  # 64 bytes: every float tensor spans several chunks
    files = sorted(run.path.glob("tensors/*/*.safetensors"))
    assert len(files) == 4 and all(namespace["bad_tensors"](f) == [] for f in files)
    corrupt_tensor(run, "lm_head:output", 1)
    assert namespace["bad_tensors"](run.path / "tensors/p00001/lm_head.safetensors") == ["lm_head:output"]


@pytest.mark.parametrize("setup, fragment", [
    ("missing", "does not exist"), ("file", "is not a run directory"), ("empty", "not a layerwise run"),
    ("incomplete", "is incomplete"), ("badjson", "not valid JSON"), ("foreign", "not a layerwise run manifest"),
    ("future", "upgrade layerwise"),
])
def test_open_run_errors(tmp_path, setup, fragment):
    path = tmp_path / "run"
    if setup == "file":
        path.write_text("x")
    elif setup != "missing":
        path.mkdir()
    if setup == "incomplete":
        (path / runs.INTENT).write_text("{}")
    if setup == "badjson":
        (path / runs.MANIFEST).write_text("{")
    if setup == "foreign":
        (path / runs.MANIFEST).write_text('{"format": "other"}')
    if setup == "future":
        (path / runs.MANIFEST).write_text('{"format": "layerwise-run", "format_version": 99}')
    with pytest.raises(UserError, match=fragment):
        runs.open_run(path)


def test_resume_keeps_files_and_refuses_other_runs(tmp_path):
    path = tmp_path / "run"
    w = runs.RunWriter(path, INTENT)
    w.put(0, "lm_head", {"lm_head:output": torch.ones(2, 3)})
    w.wait()
    w.abort()  # killed before finishing: no manifest
    assert not (path / runs.MANIFEST).exists()
    w2 = runs.RunWriter(path, INTENT)
    assert w2.has(0, "lm_head") and not w2.has(1, "lm_head")
    w2.abort()
    other = dict(INTENT, settings={"dtype": "bfloat16"})
    with pytest.raises(UserError, match="different settings dtype"):
        runs.RunWriter(path, other)
    runs.RunWriter(path, other, overwrite=True).finish()
    assert not (path / "tensors" / "p00000" / "lm_head.safetensors").exists()


def test_the_manifest_a_writer_keeps_equals_its_files_read_back(tmp_path):
    """A writer builds the manifest from what it wrote, not by reading every file back: the
    entries (digests, dtypes, shapes, NaN/Inf counts) equal those indexed from the files' headers,
    with the files of an earlier, killed writer of the same run among them (read back)."""
    path = tmp_path / "run"
    first = runs.RunWriter(path, INTENT)
    first.put(0, "model.layers.0", {"model.layers.0:input": torch.randn(2, 4),
                                    "model.layers.0:output": torch.tensor([[1.0, float("nan")], [float("inf"), 0]])})
    first.wait()
    first.abort()  # killed: its file stays, no manifest
    second = runs.RunWriter(path, INTENT, threads=3)
    for prompt, n in ((0, 2), (1, 1)):
        second.put(prompt, "lm_head", {"lm_head:output": torch.arange(n * 3, dtype=torch.bfloat16).reshape(n, 3)})
        second.put(prompt, "model.layers.1", {"model.layers.1:output": torch.randn(n, 4, dtype=torch.float16),
                                              "model.layers.1:router_logits": torch.randn(n, 8)})
    manifest = second.finish({"stats": {"seconds": 0}})
    assert len(second.written) == 4 and "tensors/p00000/model.layers.0.safetensors" not in second.written
    read_back = runs.build_manifest(path, INTENT, {}, None)  # every file's header, as a reader sees it
    assert manifest["tensors"] == read_back["tensors"] and len(manifest["tensors"]) == 8
    assert manifest["nonfinite"] == read_back["nonfinite"] == [
        {"name": "model.layers.0:output", "prompt": 0, "nan": 1, "inf": 1}]
    assert second.entries(every=False) == [e for e in runs.index_files(path, sorted(second.written))]


def test_manifest_json_is_the_manifest_one_line_per_tensor(tmp_path):
    """manifest.json parses to the manifest `finish` returns; its facts are indented and each
    tensor's entry is one line (what grep finds), NaN/Inf records and a resumed file's among them."""
    path = tmp_path / "run"
    first = runs.RunWriter(path, INTENT)
    first.put(1, "model.layers.0", {"model.layers.0:output": torch.tensor([[1.0, float("nan")]])})
    first.wait()
    first.abort()
    writer = runs.RunWriter(path, INTENT)
    writer.put(0, "model.layers.0", {"model.layers.0:input": torch.randn(2, 4), "model.layers.0:output": torch.ones(2)})
    manifest = writer.finish({"stats": {"where": tmp_path}})  # a value json cannot encode: written as text
    text = (path / runs.MANIFEST).read_text()
    assert json.loads(text) == json.loads(json.dumps(manifest, default=str))
    assert text.endswith("]\n}\n") and list(json.loads(text)) == list(manifest)  # the keys in their order
    lines = text.splitlines()
    lines = lines[lines.index(' "tensors": [') + 1:lines.index(" ]", lines.index(' "tensors": ['))]
    assert [json.loads(line.rstrip(",")) for line in lines] == manifest["tensors"] and len(lines) == 3
    assert manifest["nonfinite"] == [{"name": "model.layers.0:output", "prompt": 1, "nan": 1, "inf": 0}]
    assert json.loads((path / runs.INTENT).read_text()) == INTENT
    empty = runs.RunWriter(tmp_path / "empty", INTENT).finish()
    assert json.loads((tmp_path / "empty" / runs.MANIFEST).read_text()) == empty and empty["tensors"] == []


def test_a_list_s_text_is_used_again_for_that_very_list_only(tmp_path, monkeypatch):
    """`json_text(document, known)`: a list's text is made once and used again for the same list
    object (finish writes the intent's prompts as text while the last files are written, and the
    manifest made from the intent holds the very same list); another list under the same key,
    even an equal one, is encoded anew."""
    from layerwise import manifest

    prompts = [dict(p) for p in INTENT["prompts"]]
    known: dict = {}
    plain = runs.json_text({"prompts": prompts})
    assert runs.json_text({"prompts": prompts}, known) == plain and known["prompts"][0] is prompts
    known["prompts"] = (prompts, "[made before]")
    assert runs.json_text({"n": 1, "prompts": prompts}, known) == '{\n "n": 1,\n "prompts": [made before]\n}\n'
    assert runs.json_text({"prompts": [dict(p) for p in prompts]}, known) == plain
    texts = []
    json_text = manifest.json_text
    monkeypatch.setattr(runs, "json_text", lambda doc, known=None: texts.append(known) or json_text(doc, known))
    written = runs.RunWriter(tmp_path / "run", INTENT).finish()
    assert texts[-1] is texts[-2] and texts[-1]["prompts"][0] is INTENT["prompts"]  # intent's text, then the manifest's
    assert json.loads((tmp_path / "run" / runs.MANIFEST).read_text()) == json.loads(json.dumps(written, default=str))


@pytest.mark.parametrize("writer_kind", ["process", "threads"])
def test_the_manifest_made_from_entries_encoded_as_files_end_is_the_same_text(tmp_path, monkeypatch, writer_kind):
    """`finish` writes the manifest's tensor list from each entry's text, made as its file was
    indexed (by the writer's process, or while the last files were written): the very text of the manifest encoded whole,
    for files this writer wrote (one holding NaN/Inf, whose counts the manifest lists apart) and a
    resumed run's files found on disk; each of this writer's entries was encoded once."""
    from layerwise import manifest, writerproc

    if writer_kind == "threads":
        monkeypatch.setenv(writerproc.ENV, "threads")
    path = tmp_path / "run"
    layers = [f"model.layers.{i}" for i in range(3)]

    def tensors(prompt: int, layer: int) -> dict:
        out = {f"{layers[layer]}:input": torch.full((prompt + 2, 4), float(layer)),
               f"{layers[layer]}:output": torch.arange(4.0 * (prompt + 2)).reshape(prompt + 2, 4)}
        if (prompt, layer) == (1, 2):
            out[f"{layers[layer]}:output"][0, 1] = float("nan")
        return out

    first = runs.RunWriter(path, INTENT)
    first.put(0, layers[0], tensors(0, 0))
    first.wait()
    first.abort()  # an interrupted run: its one file is found again by the next writer
    encoded, seeded = [], []
    original = manifest.item_text
    counted = lambda item: encoded.append(item["file"]) or original(item)  # noqa: E731
    monkeypatch.setattr(runs, "item_text", counted)  # this process's threads' files, as they are indexed
    monkeypatch.setattr(manifest, "item_text", counted)  # an entry without a text, in the manifest's
    monkeypatch.setattr(runs, "json_text", lambda doc, known=None: seeded.append(dict(known or {}))
                        or manifest.json_text(doc, known))
    writer = runs.RunWriter(path, INTENT)
    assert writer.has(0, layers[0])
    for prompt in (0, 1):
        for layer in range(3):
            if (prompt, layer) != (0, 0):
                writer.put(prompt, layers[layer], tensors(prompt, layer))
    written = writer.finish({"stats": {"seconds": 0.25}})
    assert (path / runs.MANIFEST).read_text() == manifest.json_text(written)
    assert written["nonfinite"] == [{"name": f"{layers[2]}:output", "prompt": 1, "nan": 1, "inf": 0}]
    assert len(written["tensors"]) == 12 and all("nonfinite" not in e for e in written["tensors"])
    resumed = runs.group_file(0, layers[0])
    mine = [runs.group_file(p, g) for p in (0, 1) for g in layers if (p, g) != (0, layers[0])] * 2
    assert sorted(encoded) == sorted([resumed] * 2 + (mine if writer_kind == "threads" else [])), \
        "each entry encoded once: this writer's as they were indexed (by its process: not here), the resumed file's at the end"
    assert encoded[-2:] == [resumed, resumed]
    assert seeded[-1]["tensors"][0] is written["tensors"], "the manifest's tensor list was not encoded again"


def test_library_versions_are_looked_up_once_and_handed_out_as_copies(monkeypatch):
    from layerwise import manifest

    looked_up = []
    real = manifest.md.version
    monkeypatch.setattr(manifest.md, "version", lambda package: looked_up.append(package) or real(package))
    manifest._versions.cache_clear()
    try:
        first = runs.library_versions()
        first["torch"] = "changed"
        assert runs.library_versions()["torch"] == torch.__version__ and first["python"]
        assert looked_up == ["layerwise", "torch", "transformers", "accelerate", "safetensors"]
    finally:
        manifest._versions.cache_clear()


def test_refuses_to_overwrite_a_foreign_directory(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a layerwise run"):
        runs.RunWriter(tmp_path, INTENT)
    with pytest.raises(UserError, match="refusing to delete it"):
        runs.RunWriter(tmp_path, INTENT, overwrite=True)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_put_blocks_when_the_queue_is_full(tmp_path):
    """Backpressure: a slow disk makes put() wait instead of piling tensors up in memory."""
    import threading
    import time

    w = runs.RunWriter(tmp_path / "run", INTENT, threads=1, queue_depth=1)
    gate = threading.Event()
    w.put(0, "a", {"a:output": torch.ones(1)}, on_written=gate.wait)  # the only writer now waits on the gate
    w.put(0, "b", {"b:output": torch.ones(1)})  # fills the queue
    done = threading.Event()
    threading.Thread(target=lambda: (w.put(0, "c", {"c:output": torch.ones(1)}), done.set())).start()
    time.sleep(0.2)
    assert not done.is_set(), "put must block while the queue is full"
    gate.set()
    assert done.wait(5)
    w.finish()


def test_a_moved_checkpoint_still_resumes(tmp_path):
    moved = dict(INTENT, model={**INTENT["model"], "path": "/elsewhere/m"})
    w = runs.RunWriter(tmp_path / "run", dict(INTENT, model={**INTENT["model"], "path": "/here/m"}))
    w.abort()
    runs.RunWriter(tmp_path / "run", moved).abort()  # same model, same settings, same prompts: resumed


def test_writer_threads_share_the_cores_with_the_other_ranks_on_the_machine(monkeypatch):
    """A thread per two cores the process may use (its affinity), torchrun's ranks on one machine
    (LOCAL_WORLD_SIZE) sharing them, 2 to 8."""
    from layerwise import _boot

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    assert _boot.cores_per_process({}) == 32
    assert _boot.cores_per_process({"LOCAL_WORLD_SIZE": "2"}) == 16
    assert _boot.cores_per_process({"LOCAL_WORLD_SIZE": "64"}) == 1
    assert _boot.cores_per_process({"LOCAL_WORLD_SIZE": "two"}) == 32  # not torchrun's: ignored
    for ranks, threads in (("1", 8), ("2", 8), ("4", 4), ("32", 2)):
        monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks)
        assert runs.writer_threads() == threads
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert runs.writer_threads() == 2


def test_the_writer_processes_take_a_thread_per_core_2_to_16(monkeypatch):
    from layerwise import writerproc

    for cores, threads in ((1, 2), (2, 2), (12, 12), (16, 16), (32, 16)):
        monkeypatch.setattr(writerproc, "cores_per_process", lambda cores=cores: cores)
        assert writerproc.process_threads() == threads


def test_read_threads_default_and_override(monkeypatch, capsys):
    """Half the cores a process may use, 4 to 8; LAYERWISE_READ_THREADS overrides it, and a bad
    value is one line and exit 2 from the command line."""
    from layerwise import _boot

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    assert _boot.read_threads({}) == 8
    assert _boot.read_threads({"LOCAL_WORLD_SIZE": "4"}) == 4
    assert _boot.read_threads({"LOCAL_WORLD_SIZE": "2", "LAYERWISE_READ_THREADS": "16"}) == 16
    for bad in ("0", "-3", "many", "257"):
        with pytest.raises(ValueError, match="LAYERWISE_READ_THREADS"):
            _boot.read_threads({"LAYERWISE_READ_THREADS": bad})
    monkeypatch.setenv("LAYERWISE_READ_THREADS", "lots")
    code, _, err = run_cli(capsys, "plan", "builtin:minimax-m2-tiny", "--gpus", "1x80GB")
    assert_one_line_error(code, err, "LAYERWISE_READ_THREADS='lots' is not a thread count")


def test_build_manifest_orders_by_prompt_then_model_order_and_leaves_its_entries_alone(tmp_path):
    """Entries in any order come out by prompt, then in model order (layer 10 after layer 2, a
    layer's input first, its output last), the same order a plain sort by (prompt,
    `model_order_key`) gives; the tensors holding NaN/Inf are listed, in that order, with their
    counts taken out of their entries, and the caller's entries are not changed."""
    import random
    from layerwise.names import model_order_key
    names = [f"model.layers.{i}{part}" for i in (0, 2, 10) for part in (
        ":input", ".self_attn:output", ".mlp.gate:router_logits", ".mlp:output", ":output")]
    names += ["model.embed_tokens:output", "model.norm:output", "lm_head:output"]
    entries = [{"name": n, "prompt": p, "file": f"tensors/p{p:05d}/x.safetensors", "shape": [1]}
               for p in (0, 1, 12) for n in names]
    entries[7]["nonfinite"], entries[3]["nonfinite"], entries[40]["nonfinite"] = [2, 0], [0, 5], [1, 1]
    random.Random(1).shuffle(entries)
    before = [dict(e) for e in entries]
    manifest = runs.build_manifest(tmp_path, INTENT, {}, entries)
    assert entries == before  # not changed, "nonfinite" still in the caller's
    expected = sorted(before, key=lambda e: (e["prompt"], model_order_key(e["name"])))
    assert manifest["tensors"] == [{k: v for k, v in e.items() if k != "nonfinite"} for e in expected]
    assert [e["name"] for e in manifest["tensors"][:3]] == ["model.embed_tokens:output", "model.layers.0:input",
                                                            "model.layers.0.self_attn:output"]
    assert manifest["tensors"][-1] == {"name": "lm_head:output", "prompt": 12, "file": "tensors/p00012/x.safetensors",
                                       "shape": [1]}
    flagged = [e for e in expected if e.get("nonfinite")]
    assert manifest["nonfinite"] == [{"name": e["name"], "prompt": e["prompt"], "nan": e["nonfinite"][0],
                                      "inf": e["nonfinite"][1]} for e in flagged] and len(flagged) == 3


def test_a_manifest_drafted_in_parts_is_the_one_made_at_once(tmp_path):
    """`ManifestDraft` takes entries in parts (a run's files written during the forward pass,
    then its last ones, whose names the first part may lack): the same manifest as one
    `build_manifest` of them all, its tensor list's text the entries' own (json reads it back to
    them), using a text made where a file was written where one is given."""
    import json
    import random
    from layerwise import manifest

    names = [f"model.layers.{i}{part}" for i in (0, 2, 10) for part in (":input", ".mlp.gate:router_logits", ":output")]
    names += ["model.embed_tokens:output", "model.norm:output", "lm_head:output"]
    entries = [{"name": n, "prompt": p, "file": f"tensors/p{p:05d}/{n.split(':')[0]}.safetensors", "shape": [p + 1]}
               for p in (0, 1, 12) for n in names]
    entries[4]["nonfinite"], entries[20]["nonfinite"], entries[-1]["nonfinite"] = [1, 0], [0, 0], [0, 3]
    random.Random(2).shuffle(entries)
    late = [e for e in entries if e["name"].startswith(("model.layers.10", "lm_head")) or e["prompt"] == 12]
    early = [e for e in entries if e not in late]
    texts = {(e["file"], e["name"]): manifest.item_text(e) for e in early}
    marked = early[5]
    texts[(marked["file"], marked["name"])] = manifest.item_text({**marked, "shape": [99]})  # shows it was used
    draft = manifest.ManifestDraft(INTENT)
    draft.add(early, texts)
    draft.add(late)
    drafted, whole = draft.manifest({"stats": {}}), runs.build_manifest(tmp_path, INTENT, {"stats": {}}, entries)
    assert {**drafted, "created": 0} == {**whole, "created": 0}
    assert len(drafted["nonfinite"]) == 3 and [e["name"] for e in drafted["tensors"][:2]] == [
        "model.embed_tokens:output", "model.layers.0:input"]
    expected = [{**e, "shape": [99]} if (e["file"], e["name"]) == (marked["file"], marked["name"]) else e
                for e in whole["tensors"]]
    assert json.loads(draft.text()) == expected


@pytest.mark.parametrize("writer_kind", ["process", "threads"])
def test_finish_drafts_the_files_already_written_and_adds_the_last(tmp_path, monkeypatch, writer_kind):
    """`finish` puts the entries of the files written before it into the manifest's draft while
    the last files are written (a layer the drafted files lack among them); the manifest is the
    one made from the files' headers read back."""
    from layerwise import writerproc

    if writer_kind == "threads":
        monkeypatch.setenv(writerproc.ENV, "threads")
    drafted: list = []
    draft = runs.RunWriter._draft
    monkeypatch.setattr(runs.RunWriter, "_draft", lambda self, d: drafted.append(draft(self, d)) or drafted[-1])
    writer = runs.RunWriter(tmp_path / "run", INTENT)
    for layer in range(3):
        writer.put(0, f"model.layers.{layer}", {f"model.layers.{layer}:output": torch.full((3, 4), float(layer))})
    writer.wait()
    for layer in range(4):
        writer.put(1, f"model.layers.{layer}", {f"model.layers.{layer}:output": torch.full((2, 4), float(layer))})
    written = writer.finish({"stats": {}})
    assert {runs.group_file(0, f"model.layers.{layer}") for layer in range(3)} <= drafted[0]
    assert {**written, "created": 0} == {**runs.build_manifest(writer.path, INTENT, {"stats": {}}), "created": 0}
    assert len(written["tensors"]) == 7 and written["tensors"][-1]["name"] == "model.layers.3:output"
