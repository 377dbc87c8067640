"""The hostile-user audit of issue 13, kept as tables: bad input, faults and tampering, each with
what must come of it. One table per class of the issue:

1. TRACEBACKS: what a user got wrong is one line on stderr and exit 2 (a --candidate forward
   that raises: exit 1, naming the candidate), never a traceback;
2. BAD_VALUES: every numeric flag and every field read from a file refuses what it cannot mean
   (0, negative, NaN, JSON booleans as integers, duplicates), in one line;
3. MESSAGES: no message suggests a flag the command lacks, an unsafe load, or warns before the error;
5. INTEGRITY: a checksum deleted or forged in one place is still checked against the other;
6. CONTAINMENT: a path read from a manifest, an index or an import source's listing that leaves
   its root (`..`, absolute, symlinks) is refused before it is opened;
7. NUMERICS: NaN/Inf a model produces are said and recorded; a NaN tensor never shows as exact.
Class 4 (data loss under --overwrite) is test_overwrite.py. `test_audit_count` counts the cases.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, run_cli
from safetensors.torch import load_file, save_file
from synthetic_runs import corrupt_tensor, toy_run

from layerwise import filebits, rawbytes, tensorfile, zoo
from layerwise.runs import MANIFEST

MODEL = "builtin:minimax-m2-tiny"


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable  # (lab) -> command line (after `layerwise`)
    fragment: str  # in the one line on stderr
    code: int = 2


class Lab:
    """Inputs for the cases, made on demand under one temporary directory."""

    def __init__(self, root: Path):
        self.root = root
        self._count = 0

    def new(self, name: str) -> Path:
        self._count += 1
        return self.root / f"{self._count:03d}-{name}"

    # -- runs
    @property
    def ref(self) -> Path:
        path = self.root / "ref"
        if not path.exists():
            toy_run(path)
        return path

    def run(self, edit: Callable[[dict, Path], object] | None = None, raw: str | None = None) -> Path:
        """A copy of the toy reference run, its manifest edited (or replaced by `raw` text)."""
        path = self.new("run")
        shutil.copytree(self.ref, path)
        if raw is not None:
            (path / MANIFEST).write_bytes(raw.encode("latin-1"))
        elif edit is not None:
            manifest = json.loads((path / MANIFEST).read_text())
            manifest = edit(manifest, path) or manifest
            (path / MANIFEST).write_text(json.dumps(manifest))
        return path

    # -- checkpoints
    def checkpoint(self, edit: Callable[[Path], object] | None = None) -> Path:
        path = self.new("ckpt")
        shutil.copytree(zoo.tiny_checkpoint("minimax-m2-tiny"), path)
        if edit is not None:
            edit(path)
        return path

    # -- files
    def file(self, name: str, data: bytes | str) -> Path:
        path = self.new("f") / name
        path.parent.mkdir(parents=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def source(self, files: dict[str, object]) -> Path:
        """An import source: {relative path: np array | torch tensor | bytes}."""
        path = self.new("src")
        for rel, value in files.items():
            target = path / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(value, np.ndarray):
                np.save(target, value)
            elif isinstance(value, torch.Tensor):
                torch.save(value, target)
            elif isinstance(value, dict):
                save_file(value, target)
            else:
                target.write_bytes(value)
        return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    return Lab(tmp_path_factory.mktemp("lab"))


def _check(capsys, lab, case: Case):
    code, out, err = run_cli(capsys, *case.argv(lab))
    assert "Traceback" not in err
    assert code == case.code, f"exit {code}: {err or out[-400:]}"
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert case.fragment in lines[0], f"{case.fragment!r} not in {lines[0]!r}"
    return lines[0]


# ------------------------------------------------------------------------------ helpers of cases

def _set(path: str, value):
    """A manifest edit: set a dotted path (`tensors.0.shape`) to `value`, or delete it (value DELETE)."""
    def edit(manifest, _):
        *parents, leaf = path.split(".")
        node = manifest
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if value is DELETE:
            del node[int(leaf) if isinstance(node, list) else leaf]
        else:
            node[int(leaf) if isinstance(node, list) else leaf] = value
    return edit


DELETE = object()


def _tensor_file_edit(change: Callable[[dict, str], dict]):
    """A manifest edit that rewrites the file of the run's first tensor: `change(tensors, name)`
    maps the file's {name: tensor} to what it holds instead (the manifest left as it was)."""
    def edit(manifest, path):
        entry = manifest["tensors"][0]
        file = path / entry["file"]
        save_file(change(load_file(file), entry["name"]), file)
    return edit


def _compare(edit=None, raw=None, *extra):
    return lambda lab: ["compare", lab.ref, lab.run(edit, raw), *extra]


def _self_compare(edit, *extra):
    """A run, its manifest edited, compared with itself (what only its files say is read)."""
    def argv(lab):
        run = lab.run(edit)
        return ["compare", run, run, *extra]
    return argv


def _as_extract_without_anatomy(manifest, _):
    manifest["producer"] = "layerwise extract"
    del manifest["anatomy"]


def _test_on_edited(edit, *extra):
    """`layerwise test` of layer 1 on a copy of the tiny MiniMax's reference, its manifest edited."""
    def argv(lab):
        reference = lab.new("ref")
        shutil.copytree(_minimax_ref(lab), reference)
        manifest = json.loads((reference / MANIFEST).read_text())
        edit(manifest, reference)
        (reference / MANIFEST).write_text(json.dumps(manifest))
        return ["test", MODEL, "--reference", reference, "--out", lab.new("test"), "--layer", "1", *extra]
    return argv


def _cut_run_file(manifest, path):
    """The run's first tensor file cut short (its manifest untouched)."""
    file = path / manifest["tensors"][0]["file"]
    file.write_bytes(file.read_bytes()[:-7])


def _garble_run_file_header(manifest, path):
    file = path / manifest["tensors"][0]["file"]
    data = bytearray(file.read_bytes())
    data[8] = ord("[")  # the header's JSON is no longer an object
    file.write_bytes(bytes(data))


def _fifo(lab) -> Path:
    path = lab.new("fifo")
    os.mkfifo(path)
    return path


def _index_edit(change: Callable[[dict], dict]):
    def edit(path):
        index = path / "model.safetensors.index.json"
        data = json.loads(index.read_text())
        data["weight_map"] = change(data["weight_map"])
        index.write_text(json.dumps(data))
    return edit


def _drop_shard(wmap):
    last = sorted(set(wmap.values()))[-1]
    return {k: v for k, v in wmap.items() if v != last}


def _config_edit(**changes):
    def edit(path):
        config = json.loads((path / "config.json").read_text())
        config.update(changes)
        (path / "config.json").write_text(json.dumps(config))
    return edit


def _corrupt_header(path):
    shard = sorted(path.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"] = 7  # valid JSON, not [begin, end]
    blob = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    assert len(blob) == length
    shard.write_bytes(data[:8] + blob[:length] + data[8 + length:])


def _gguf(lab, size: int | None) -> Path:
    """A .gguf file: garbage (size None) or the real SmolLM2 file cut to `size` bytes."""
    if size is None:
        return lab.file("garbage.gguf", os.urandom(4096))
    with open(zoo.smollm2_gguf(), "rb") as fh:
        return lab.file("truncated.gguf", fh.read(size))


def _candidate(lab, body: str) -> str:
    path = lab.file("cand.py", "import torch\nfrom torch import nn\n\n" + body)
    return f"{path}:build"


FACTORY_RAISES = "def build(config, index, weights):\n    raise ValueError('my factory is broken')\n"
FORWARD_RAISES = ("class Broken(nn.Module):\n    def forward(self, hidden_states, **kw):\n"
                  "        raise RuntimeError('my forward is broken')\n\n\n"
                  "def build(config, index, weights):\n    return Broken()\n")


def _minimax_ref(lab) -> Path:
    """A reference run of the tiny MiniMax (made once)."""
    from layerwise.cli import main

    reference = lab.root / "minimax-ref"
    if not reference.exists():
        assert main(["extract", MODEL, "--out", str(reference), "--prompt", "The capital of France is",
                     "--prompt", "Hi", "--dtype", "fp32"]) == 0
    return reference


def _test(lab, *extra, model=MODEL):
    return ["test", model, "--reference", _minimax_ref(lab), "--out", lab.new("test"), *extra]


# ------------------------------------------------------------------------------ 1. tracebacks

TRACEBACKS = [
    Case("candidate factory raises", lambda lab: _test(lab, "--layer", "1", "--candidate",
                                                       _candidate(lab, FACTORY_RAISES)),
         "ValueError: my factory is broken (at "),
    Case("candidate forward raises", lambda lab: _test(lab, "--layer", "1", "--candidate",
                                                       _candidate(lab, FORWARD_RAISES)),
         "RuntimeError: my forward is broken (at ", code=1),
    Case("garbage .gguf", lambda lab: ["plan", _gguf(lab, None)], "not a GGUF file"),
    Case("truncated .gguf (plan)", lambda lab: ["plan", _gguf(lab, 3_000_000)], "re-download it"),
    Case("truncated .gguf (load)", lambda lab: ["load", _gguf(lab, 3_000_000)], "re-download it"),
    Case("compare --metrics-device not there", lambda lab: ["compare", lab.ref, lab.ref,
                                                             "--metrics-device", "cuda:99"],
         "--metrics-device cuda:99 is not usable here"),
    Case("compare --metrics-device meta", lambda lab: ["compare", lab.ref, lab.ref, "--metrics-device", "meta"],
         "--metrics-device meta holds no data"),
    Case("extract --stream --device meta", lambda lab: [
        "extract", MODEL, "--out", lab.new("r"), "--prompt", "hi", "--stream", "--device", "meta"],
        "--device meta holds no data"),
    Case(".gguf cut inside its header", lambda lab: ["plan", lab.file("short.gguf", b"GGUF\x03\x00\x00\x00")],
         "re-download it"),
    Case("extract --engine llama.cpp of a garbage .gguf", lambda lab: [
        "extract", _gguf(lab, None), "--engine", "llama.cpp", "--out", lab.new("r"), "--prompt", "hi"], "GGUF"),
    Case("index drops a shard's entries (load)", lambda lab: ["load", lab.checkpoint(_index_edit(_drop_shard))],
         "the index lists none of its tensors"),
    Case("index drops a shard's entries (test)", lambda lab: _test(
        lab, "--layer", "3", "--allow-config-mismatch", model=lab.checkpoint(_index_edit(_drop_shard))),
        "the index lists none of its tensors"),
    Case("index drops one tensor of a layer", lambda lab: ["load", lab.checkpoint(_index_edit(
        lambda m: {k: v for k, v in m.items() if k != "model.layers.1.self_attn.k_norm.weight"}))],
        "the index lacks 1 tensor(s) of model.layers.1"),
    Case("config does not fit the weights", lambda lab: ["load", lab.checkpoint(_config_edit(hidden_size=32))],
         "its tensor shapes do not fit its config.json"),
    Case("shard header of the wrong structure", lambda lab: ["load", lab.checkpoint(_corrupt_header)],
         "has a corrupt safetensors header"),
    Case("run file lacks a tensor its manifest names", _compare(_tensor_file_edit(
        lambda tensors, name: {k: v for k, v in tensors.items() if k != name} or {"other": torch.zeros(1)})),
        "holds no tensor"),
    Case("manifest without tensors", _compare(_set("tensors", DELETE)), "it has no tensors list"),
    Case("manifest version a string", _compare(_set("format_version", "1")), "format_version is '1'"),
    Case("manifest entry without shape", _compare(_set("tensors.0.shape", DELETE)), "has no 'shape'"),
    Case("manifest a list", _compare(lambda m, _: [m]), "is not a layerwise run manifest"),
    Case("manifest entry a string", _compare(_set("tensors.0", "x")), "an entry is a str"),
    Case("manifest entry empty", _compare(_set("tensors", [{}])), "has no 'name'"),
    Case("manifest prompts an object", _compare(_set("prompts", {})), "prompts is a dict"),
    Case("manifest settings a list", _compare(_set("settings", [])), "settings is a list"),
    Case("manifest not UTF-8", _compare(raw='{"format": "layerwise-run", "x": "\xe9"}'), "not UTF-8"),
    Case("manifest entry listed twice", _compare(lambda m, _: m["tensors"].append(dict(m["tensors"][0]))),
         "is listed twice"),
    Case("intent a list, resumed", lambda lab: ["import", lab.source({"0/tokens.npy": np.array([1, 2])}), "--out",
                                                _broken_intent(lab)], "is not a run's intent"),
    Case("prompt file not UTF-8 (extract)", lambda lab: ["extract", MODEL, "--out", lab.new("r"), "--prompts",
                                                         lab.file("p.txt", b"caf\xe9\n")], "is not UTF-8 text"),
    Case("prompt file not UTF-8 (test)", lambda lab: ["test", MODEL, "--test-type", "extract-all", "--out",
                                                      lab.new("r"), "--prompts", lab.file("p.txt", b"\xff\xfe")],
         "is not UTF-8 text"),
    Case("prompt file a directory", lambda lab: ["extract", MODEL, "--out", lab.new("r"), "--prompts", lab.root],
         "is not a file"),
    Case("tolerance file not UTF-8", lambda lab: ["compare", lab.ref, lab.ref, "--tolerance-file",
                                                  lab.file("t.json", b"\xff")], "is not UTF-8"),
    Case("device-map file not UTF-8", lambda lab: ["plan", MODEL, "--device-map", lab.file("m.json", b"\xff")],
         "cannot read device-map file"),
    Case("--json in a missing directory", lambda lab: ["compare", lab.ref, lab.ref, "--json",
                                                       lab.root / "no" / "r.json"], "does not exist"),
    Case("--json a directory", lambda lab: ["compare", lab.ref, lab.ref, "--json", lab.root], "is a directory"),
    Case("--html under a file", lambda lab: ["compare", lab.ref, lab.ref, "--html",
                                             lab.file("f", "x") / "r.html"], "is not a directory"),
    Case("--plot under a file", lambda lab: ["compare", lab.ref, lab.ref, "--plot",
                                             lab.file("f", "x") / "r.png"], "is not a directory"),
    Case("--json of test under a file", lambda lab: _test(lab, "--layer", "0", "--json",
                                                          lab.file("f", "x") / "r.json"), "cannot write --json"),
    Case("extract --out under a file", lambda lab: ["extract", MODEL, "--out", lab.file("f", "x") / "run",
                                                    "--prompt", "hi"], "cannot write the run"),
    Case("import --out under a file", lambda lab: ["import", lab.source({"0/tokens.npy": np.array([1, 2])}),
                                                   "--out", lab.file("f", "x") / "run"], "cannot write the run"),
    Case("import name escapes the run (--rename)", lambda lab: [
        "import", lab.source({"0/tokens.npy": np.array([1, 2]),
                              "0/model.layers.0.output.npy": np.zeros((2, 4), np.float32)}),
        "--out", lab.new("r"), "--rename", "model=../../evil"], "outside the run's directory"),
    Case("import name escapes the run (safetensors key)", lambda lab: [
        "import", lab.source({"0.safetensors": {"tokens": torch.tensor([1, 2]), "../../x:output": torch.zeros(2, 4)}}),
        "--out", lab.new("r")], "outside the run's directory"),
    Case("import a garbage .safetensors", lambda lab: ["import", lab.source({"0.safetensors": b"\x10" * 64}),
                                                       "--out", lab.new("r")], "is not a safetensors file"),
    Case("extract --stream on a device that is not there", lambda lab: [
        "extract", MODEL, "--out", lab.new("r"), "--prompt", "hi", "--stream", "--device", "cuda:99"],
        "--device cuda:99 is not usable here"),
    Case("config.json not UTF-8", lambda lab: ["plan", lab.checkpoint(
        lambda p: (p / "config.json").write_bytes(b'{"model_type": "\xff"}'))], "not UTF-8"),
]


def _broken_intent(lab) -> Path:
    path = lab.new("run")
    path.mkdir()
    (path / "intent.json").write_text("[1, 2]")
    return path


@pytest.mark.parametrize("case", TRACEBACKS, ids=lambda c: c.id)
def test_one_line_not_a_traceback(capsys, lab, case):
    line = _check(capsys, lab, case)
    if case.id.startswith("candidate"):
        assert "cand.py:" in line and "--candidate" in line  # the user's own line, the candidate named


# ------------------------------------------------------------------------------ 2. bad values

def _flag(command: str, *extra) -> Callable:
    """A command line of `command` that is otherwise valid, with `extra` flags."""
    def argv(lab):
        base = {"check": ["check", "--cpu"], "plan": ["plan", MODEL], "load": ["load", MODEL],
                "extract": ["extract", MODEL, "--out", lab.new("r"), "--prompt", "hi"],
                "test": ["test", MODEL, "--reference", lab.ref, "--out", lab.new("t")],
                "compare": ["compare", lab.ref, lab.ref]}[command]
        return base + [str(x) for x in extra if x != ""]
    return argv


def _prompts(line: str) -> Callable:
    return lambda lab: ["extract", MODEL, "--out", lab.new("r"), "--prompts", lab.file("p.jsonl", line + "\n")]


def _tolerance_file(text: str) -> Callable:
    return lambda lab: ["compare", lab.ref, lab.ref, "--tolerance-file", lab.file("t.json", text)]


def _tokens(value) -> Callable:
    return lambda lab: ["import", lab.source({"0/tokens.npy": value}), "--out", lab.new("r")]


BAD_VALUES = [Case(f"{command} {flag} {value}", _flag(command, flag, value), fragment) for command, flag, value, fragment in [
    ("check", "--tokens", "0", "at least 1"), ("plan", "--tokens", "0", "at least 1"),
    ("plan", "--tokens", "-5", "at least 1"), ("plan", "--tokens", "1e3", "not an integer"),
    ("load", "--tokens", "0", "at least 1"), ("extract", "--tokens", "-1", "at least 1"),
    ("test", "--tokens", "0", "at least 1"),
    ("extract", "--batch-size", "0", "at least 1"), ("test", "--batch-size", "0", "at least 1"),
    ("extract", "--max-tokens", "0", "at least 1"), ("test", "--max-tokens", "-3", "at least 1"),
    ("extract", "--pinned-gib", "0", "above 0"), ("extract", "--pinned-gib", "nan", "NaN"),
    ("extract", "--pinned-gib", "inf", "not a finite number"),
    ("compare", "--max-rel-l2", "nan", "NaN"), ("compare", "--max-rel-l2", "-1", "negative"),
    ("compare", "--rtol", "nan", "NaN"), ("compare", "--atol=-1e-3", "", "negative"),
    ("compare", "--min-cosine", "nan", "NaN"), ("compare", "--min-cosine", "1.5", "not a cosine"),
    ("compare", "--max-abs", "-0.5", "negative"), ("compare", "--max-kl", "nan", "NaN"),
    ("compare", "--tie-threshold", "nan", "NaN"), ("compare", "--tie-threshold", "-1", "negative"),
    ("compare", "--noise-factor", "-2", "negative"), ("compare", "--logits-topk", "0", "at least 1"),
    ("test", "--logits-topk", "0", "at least 1"), ("test", "--max-rel-l2", "nan", "NaN"),
    ("compare", "--prompt-index", "0-99999999999", "expected prompt indices"),
    ("compare", "--tolerance", "*=rel_l2<nan", "cannot be NaN"),
    ("compare", "--tolerance", "*=rel_l2<-1", "rel_l2 lies from 0 up"),
    ("compare", "--tolerance", "lm_head:output=top1>=2", "top1 lies from 0 to 1"),
    ("plan", "--gpus", "0:80GB,0:40GB", "names GPU 0 twice"), ("plan", "--gpus", "0x80GB", "give 1 to 1024"),
    ("plan", "--gpus", "2x0GB", "larger than zero"), ("plan", "--max-memory", "cpu:1GB,cpu:2GB", "twice"),
    ("extract", "--layers", "0-99999999999", "layers"), ("test", "--layer", "-1", "not a layer number"),
]] + [
    Case("extract --points ''", lambda lab: ["extract", MODEL, "--out", lab.new("r"), "--prompt", "hi", "--points", ""],
         "argument --points: '' is empty: give a value"),
    Case("extract --layers ''", lambda lab: ["extract", MODEL, "--out", lab.new("r"), "--prompt", "hi", "--layers", " "],
         "argument --layers: ' ' is empty"),
    Case("test --layers ''", lambda lab: ["test", MODEL, "--reference", lab.ref, "--test-type", "multi",
                                          "--layers", ""], "argument --layers: '' is empty"),
    Case("compare --metrics-device ''", lambda lab: ["compare", lab.ref, lab.ref, "--metrics-device", ""],
         "argument --metrics-device: '' is empty"),
    Case("plan --device-map ''", lambda lab: ["plan", MODEL, "--device-map", ""], "argument --device-map: '' is empty"),
    Case("token_ids [true, 2]", _prompts('{"token_ids": [true, 2]}'), "not a non-negative integer"),
    Case("token_ids [1.5]", _prompts('{"token_ids": [1.5]}'), "not a non-negative integer"),
    Case("token_ids [-1]", _prompts('{"token_ids": [-1]}'), "not a non-negative integer"),
    Case("token_ids []", _prompts('{"token_ids": []}'), "non-empty list"),
    Case("token_ids a string", _prompts('{"token_ids": "5"}'), "non-empty list"),
    Case("tolerance file NaN", _tolerance_file('{"max_rel_l2": NaN}'), "must be a finite number"),
    Case("tolerance file true", _tolerance_file('{"max_rel_l2": true}'), "must be a finite number"),
    Case("tolerance file cosine 2", _tolerance_file('{"min_cosine": 2}'), "cosine lies from -1 to 1"),
    Case("tolerance file rule NaN", _tolerance_file('{"rules": {"*": "rel_l2<NaN"}}'), "cannot be NaN"),
    Case("manifest prompt index true", _compare(_set("tensors.0.prompt", True)), "prompt is True"),
    Case("manifest token_ids [true]", _compare(_set("prompts.0.token_ids", [True])), "not a non-negative integer"),
    Case("manifest shape [true]", _compare(_set("tensors.0.shape", [True, 2])), "is not a list of sizes"),
    Case("manifest batch_size 0", _compare(_set("settings.batch_size", 0)), "settings.batch_size is 0"),
    Case("manifest sha256 not hex", _compare(_set("tensors.0.sha256", "xyz")), "sha256 'xyz' is not a hex digest"),
    Case("manifest sha256_tree short", _compare(_set("tensors.0.sha256_tree", "ab" * 31)), "is not a hex digest"),
    Case("manifest format_version true", _compare(_set("format_version", True)), "format_version is True"),
    Case("manifest without model", _compare(_set("model", DELETE)), "it has no 'model'"),
    Case("manifest without settings", _compare(_set("settings", DELETE)), "it has no 'settings'"),
    Case("manifest without prompts", _compare(_set("prompts", DELETE)), "it has no 'prompts'"),
    Case("manifest of an extract without anatomy", _compare(_as_extract_without_anatomy),
         "it has no 'anatomy', which layerwise extract always writes"),
    Case("manifest anatomy layers_path 5", _compare(_set("anatomy.layers_path", 5)), "anatomy.layers_path is 5"),
    Case("manifest model num_layers '4'", _compare(_set("model.num_layers", "4")), "model.num_layers is '4'"),
    Case("manifest entry dtype banana", _compare(_set("tensors.0.dtype", "banana")),
         "has dtype 'banana', not a torch dtype name"),
    Case("manifest entry dtype a list", _compare(_set("tensors.0.dtype", ["float32"])), "not a torch dtype name"),
    Case("manifest entry dtype float64, file float32", _compare(_set("tensors.0.dtype", "float64")),
         "is float64 [8, 32], but"),
    Case("manifest entry dtype float64, file float32 (--no-verify)",
         _compare(_set("tensors.0.dtype", "float64"), None, "--no-verify"), "holds float32 [8, 32]"),
    Case("manifest entry shape not the file's", _self_compare(_set("tensors.0.shape", [8, 16])),
         "holds float32 [8, 32]"),
    Case("manifest entry of prompt 99", _compare(_set("tensors.0.prompt", 99)), "is of prompt 99, which the run's"),
    Case("manifest prompt listed twice", _compare(lambda m, _: m["prompts"].append(dict(m["prompts"][0]))),
         "prompt 0 is listed twice"),
    Case("manifest settings.dtype banana", _compare(_set("settings.dtype", "banana")),
         "settings.dtype is 'banana', not a dtype name"),
    Case("manifest settings.attn_implementation 5", _compare(_set("settings.attn_implementation", 5)),
         "settings.attn_implementation is 5"),
    Case("manifest settings.attn_implementation 5 (test)", _test_on_edited(_set("settings.attn_implementation", 5)),
         "settings.attn_implementation is 5"),
    Case("manifest settings.quant banana (test)", _test_on_edited(_set("settings.quant", "banana")),
         "settings.quant is 'banana'"),
    Case("import tokens booleans", _tokens(np.array([True, False])), "not integer token ids"),
    Case("import tokens floats", _tokens(np.array([1.5, 2.0])), "not integer token ids"),
    Case("import tokens negative", _tokens(np.array([3, -1])), "not a non-negative integer"),
    Case("config num_hidden_layers 0", lambda lab: ["plan", lab.checkpoint(_config_edit(num_hidden_layers=0))],
         "num_hidden_layers is 0"),
    Case("config hidden_size a string", lambda lab: ["plan", lab.checkpoint(_config_edit(hidden_size="64"))],
         "hidden_size is '64'"),
    Case("config vocab_size true", lambda lab: ["plan", lab.checkpoint(_config_edit(vocab_size=True))],
         "vocab_size is True"),
    Case("device map names no module", lambda lab: ["plan", MODEL, "--device-map",
                                                    lab.file("m.json", '{"model.nope": "cpu", "": "cpu"}')],
         "device map names 'model.nope', which is not a module of this model"),
    Case("device map true", lambda lab: ["plan", MODEL, "--device-map", lab.file("m.json", '{"": true}')],
         "is not a device"),
    Case("import a tensor twice (.npy and .pt)", lambda lab: ["import", lab.source({
        "0/tokens.npy": np.array([1, 2]), "0/model.layers.0.output.npy": np.zeros((2, 4), np.float32),
        "0/model.layers.0.output.pt": torch.zeros(2, 4)}), "--out", lab.new("r")], "holds model.layers.0:output twice"),
    Case("import --rename maps two tensors together", lambda lab: ["import", lab.source({
        "0/tokens.npy": np.array([1, 2]), "0/model.layers.0.output.npy": np.zeros((2, 4), np.float32),
        "0/model.layers.1.output.npy": np.zeros((2, 4), np.float32)}), "--out", lab.new("r"),
        "--rename", r"layers\.\d=layers.0"], "two tensors map to model.layers.0:output"),
    Case("index weight_map value a number", lambda lab: ["load", lab.checkpoint(_index_edit(
        lambda m: {**m, sorted(m)[0]: 5}))], "not a valid safetensors index"),
]


def test_a_gpu_index_the_machine_lacks_is_refused_by_name(monkeypatch):
    """cuda:7 on a machine of one GPU is one line naming the GPUs there, before torch is asked."""
    from layerwise.errors import UserError
    from layerwise.machine import usable_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match=r"--metrics-device cuda:7 is not usable here: this machine has 1 GPU "
                                        r"\(cuda:0-0\); give one of them or cpu"):
        usable_device("cuda:7", "--metrics-device")


@pytest.mark.parametrize("case", BAD_VALUES, ids=lambda c: c.id)
def test_bad_value_is_refused(capsys, lab, case):
    _check(capsys, lab, case)


# ------------------------------------------------------------------------------ 3. messages

def _no(*words):
    return words


def _npy_object(lab):
    path = lab.new("src")
    (path / "0").mkdir(parents=True)
    np.save(path / "0" / "tokens.npy", np.array([1, 2]))
    np.save(path / "0" / "model.layers.0.output.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return path


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _malicious_pt(lab):
    path = lab.new("src")
    (path / "0").mkdir(parents=True)
    np.save(path / "0" / "tokens.npy", np.array([1, 2]))
    torch.save({"x": _Payload()}, path / "0" / "model.layers.0.output.pt")
    return path


MESSAGES = [  # (case, words the line must not hold)
    (Case("load --max-memory without GPUs", _flag("load", "--max-memory", "40GB"), "no GPU is present"),
     _no("--gpus")),
    (Case("plan --max-memory without GPUs", _flag("plan", "--max-memory", "40GB"), "simulate a machine with --gpus"),
     ()),
    (Case("garbage .npy", lambda lab: ["import", lab.source({"0/tokens.npy": np.array([1, 2]),
                                                             "0/model.layers.0.output.npy": os.urandom(300)}),
                                       "--out", lab.new("r")], "is not a .npy file"), _no("pickle", "allow_pickle")),
    (Case("object .npy", lambda lab: ["import", _npy_object(lab), "--out", lab.new("r")], "holds Python objects"),
     _no("allow_pickle")),
    (Case("malicious .pt", lambda lab: ["import", _malicious_pt(lab), "--out", lab.new("r")], "holds code"),
     _no("weights_only=False", "add_safe_globals")),
    (Case("garbage .pt", lambda lab: ["import", lab.source({"0/tokens.npy": np.array([1, 2]),
                                                            "0/model.layers.0.output.pt": os.urandom(300)}),
                                      "--out", lab.new("r")], "is not a torch tensor file"), ()),
    (Case("no tokenizer, text prompt", lambda lab: ["extract", lab.checkpoint(
        lambda p: [f.unlink() for f in p.glob("tokenizer*")]), "--out", lab.new("r"), "--prompt", "hi"],
        "has no tokenizer"), _no("WARNING")),
    (Case("compare --prompts (renamed)", _flag("compare", "--prompts", "0"), "is now --prompt-index"), ()),
    (Case("unknown attention implementation", _flag("load", "--attn-implementation", "bogus"),
          "choose another --attn-implementation"), _no("checks its files")),
    (Case("truncated run file", _compare(_cut_run_file), "the run is corrupt, re-extract it"),
     _no("re-download", "shard")),
    (Case("run file header not an object", _compare(_garble_run_file_header), "the run is corrupt, re-extract it"),
     _no("re-download", "shard")),
    (Case("--json ''", lambda lab: ["compare", lab.ref, lab.ref, "--json", ""], "argument --json: '' is empty: give a value"),
     _no("is a directory")),
    (Case("--json /proc/version", lambda lab: ["compare", lab.ref, lab.ref, "--json", "/proc/version"],
          "directory /proc takes no new files"), _no("No such file")),
    (Case("--json a named pipe", lambda lab: ["compare", lab.ref, lab.ref, "--json", _fifo(lab)],
          "is not a regular file"), ()),
]


@pytest.mark.parametrize("case, banned", MESSAGES, ids=lambda c: getattr(c, "id", ""))
def test_message_says_what_is_true(capsys, lab, case, banned):
    line = _check(capsys, lab, case)
    assert not [w for w in banned if w in line], line


def test_help_texts(capsys):
    from layerwise.arguments import build_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    assert "--baseline" not in subs["test"].format_help()
    assert subs["import"].description and "SRC" in subs["import"].description
    assert "--prompt-index" in subs["compare"].format_help() and "--prompts " not in subs["compare"].format_help()


# ------------------------------------------------------------------------------ 5. integrity

def _flip(run_dir: Path, name: str = "model.layers.1:output") -> Path:
    from layerwise.runs import open_run

    return corrupt_tensor(open_run(run_dir), name)


def _null_sha(manifest, path):
    for e in manifest["tensors"]:
        e[tensorfile.DIGEST] = None


def _drop_sha(manifest, path):
    for e in manifest["tensors"]:
        del e[tensorfile.DIGEST]


def _strip_header_hashes(path: Path):
    """Rewrite every tensor file of a run without the digests in its header."""
    for file in path.glob("tensors/*/*.safetensors"):
        tensors = load_file(file)
        save_file(tensors, file, metadata={"prompt": "0"})


def _integrity(edit, files: Callable[[Path], object] | None = None, *extra):
    def argv(lab):
        cand = lab.run(edit)
        if files is not None:
            files(cand)
        return ["compare", lab.ref, cand, *extra]
    return argv


INTEGRITY = [
    Case("manifest digest null, bytes flipped", _integrity(_null_sha, _flip), "fails its digest check"),
    Case("manifest digest deleted, bytes flipped", _integrity(_drop_sha, _flip), "fails its digest check"),
    Case("no checksum anywhere", _integrity(_null_sha, _strip_header_hashes), "has no digest"),
    Case("manifest digest forged to the flipped bytes", _integrity(None, lambda p: _forge(p)), "fails its digest"),
]


def _forge(path: Path):
    """Flip bytes, and write the flipped tensor's digest into the manifest (the header keeps the true one)."""
    from layerwise.runs import open_run

    name = "model.layers.1:output"
    _flip(path, name)
    flipped = open_run(path).tensor(name, 0, verify=False)
    manifest = json.loads((path / MANIFEST).read_text())
    for e in manifest["tensors"]:
        if e["name"] == name and e["prompt"] == 0:
            e[tensorfile.DIGEST] = tensorfile.digest(flipped)
    (path / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("case", INTEGRITY, ids=lambda c: c.id)
def test_checksums_cannot_be_switched_off(capsys, lab, case):
    _check(capsys, lab, case)


def test_no_verify_reads_a_run_without_checksums(capsys, lab):
    cand = lab.run(_null_sha)
    _strip_header_hashes(cand)
    code, out, err = run_cli(capsys, "compare", lab.ref, cand, "--no-verify")
    assert code == 0 and not err, err


# ------------------------------------------------------------------------------ 6. containment

def _outside(lab) -> Path:
    """A file outside every run: a copy of one of the reference's tensor files."""
    path = lab.root / "outside" / "x.safetensors"
    if not path.exists():
        path.parent.mkdir(parents=True)
        shutil.copy(next((lab.ref / "tensors" / "p00000").glob("model.layers.1.*")), path)
    return path


def _file_to(target: Callable[[Path, Path], str]):
    """A manifest edit pointing every model.layers.1 entry of prompt 0 at target(run, outside)."""
    def argv(lab):
        outside = _outside(lab)

        def edit(manifest, run):
            for e in manifest["tensors"]:
                if e["file"].endswith("p00000/model.layers.1.safetensors"):
                    e["file"] = target(run, outside)
        return ["compare", lab.ref, lab.run(edit)]
    return argv


def _symlinked(link: Callable[[Path, Path], None]):
    def argv(lab):
        outside = _outside(lab)
        run = lab.run()
        link(run, outside)
        return ["compare", lab.ref, run]
    return argv


def _link_file(run: Path, outside: Path):
    target = run / "tensors" / "p00000" / "model.layers.1.safetensors"
    target.unlink()
    target.symlink_to(outside)


def _link_dir(run: Path, outside: Path):
    prompt = run / "tensors" / "p00000"
    moved = outside.parent / f"p00000-{run.name}"
    shutil.move(prompt, moved)
    prompt.symlink_to(moved, target_is_directory=True)


def _shard_outside(mode: str):
    def edit(path: Path):
        index = path / "model.safetensors.index.json"
        data = json.loads(index.read_text())
        shard = sorted(set(data["weight_map"].values()))[0]
        away = path.parent / f"away-{path.name}"
        away.mkdir()
        shutil.move(path / shard, away / shard)
        if mode == "link":
            (path / shard).symlink_to(away / shard)
            return
        new = f"../{away.name}/{shard}" if mode == "dotdot" else str(away / shard)
        data["weight_map"] = {k: (new if v == shard else v) for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data))
    return edit


def _config_outside(path: Path):
    away = path.parent / f"away-{path.name}.json"
    shutil.move(path / "config.json", away)
    (path / "config.json").symlink_to(away)


def _import_link(kind: str):
    def argv(lab):
        src = lab.source({"0/tokens.npy": np.array([1, 2])})
        away = lab.new("away")
        away.mkdir()
        np.save(away / "model.layers.0.output.npy", np.zeros((2, 4), np.float32))
        if kind == "file":
            (src / "0" / "model.layers.0.output.npy").symlink_to(away / "model.layers.0.output.npy")
        else:
            np.save(away / "tokens.npy", np.array([1, 2]))
            (src / "1").symlink_to(away, target_is_directory=True)
        return ["import", src, "--out", lab.new("r")]
    return argv


CONTAINMENT = [
    Case("manifest file ../outside", _file_to(lambda run, out: os.path.relpath(out, run)), "points outside"),
    Case("manifest file absolute", _file_to(lambda run, out: str(out)), "points outside"),
    Case("manifest file through ..", _file_to(lambda run, out: "tensors/../../" + os.path.relpath(out, run.parent)),
         "points outside"),
    Case("tensor file a symlink out", _symlinked(_link_file), "outside"),
    Case("prompt directory a symlink out", _symlinked(_link_dir), "outside"),
    Case("index weight_map ../", lambda lab: ["load", lab.checkpoint(_shard_outside("dotdot"))], "points outside"),
    Case("index weight_map absolute", lambda lab: ["load", lab.checkpoint(_shard_outside("absolute"))],
         "points outside"),
    Case("shard a symlink out", lambda lab: ["load", lab.checkpoint(_shard_outside("link"))], "outside"),
    Case("config.json a symlink out", lambda lab: ["plan", lab.checkpoint(_config_outside)], "outside"),
    Case("import file a symlink out", _import_link("file"), "outside"),
    Case("import prompt directory a symlink out", _import_link("dir"), "outside"),
]


@pytest.mark.parametrize("case", CONTAINMENT, ids=lambda c: c.id)
def test_paths_stay_inside_their_root(capsys, lab, case):
    _check(capsys, lab, case)


def test_a_hugging_face_cache_snapshot_may_link_to_its_blobs(tmp_path):
    """The cache layout (snapshots/<rev>/file -> ../../blobs/<hash>) is inside its repository."""
    from layerwise import checkpoint

    repo = tmp_path / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for f in zoo.tiny_checkpoint("minimax-m2-tiny").iterdir():
        shutil.copy(f, blobs / f.name)
        (snapshot / f.name).symlink_to(Path("../../blobs") / f.name)
    assert checkpoint.require_complete(snapshot).ok


# ------------------------------------------------------------------------------ 7. numerics

def _nan_checkpoint(lab) -> Path:
    def poison(path: Path):
        index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
        name = "model.layers.2.self_attn.o_proj.weight"
        shard = path / index[name]
        tensors = load_file(shard)
        tensors[name][0, 0] = float("nan")
        save_file(tensors, shard, metadata={"format": "pt"})
    return lab.checkpoint(poison)


def test_extract_says_when_the_model_produces_nan(capsys, lab):
    out = lab.new("nan-run")
    code, stdout, err = run_cli(capsys, "extract", _nan_checkpoint(lab), "--out", out, "--prompt", "hello there",
                                "--prompt", "Hi", "--dtype", "fp32", "--points", "embed,residual,attn,mlp,router")
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "NaN/Inf" in lines[0], lines
    assert "first at model.layers.2.self_attn:output (layer 2), prompt 0" in lines[0]
    manifest = json.loads((out / MANIFEST).read_text())
    first = manifest["nonfinite"][0]
    assert first["name"] == "model.layers.2.self_attn:output" and first["nan"] > 0
    assert all(e["name"] != "model.layers.1:output" for e in manifest["nonfinite"])


def test_a_nan_tensor_never_shows_as_exact(capsys, tmp_path):
    ref, nan = toy_run(tmp_path / "ref").path, toy_run(tmp_path / "nan", fault=("nan", 1)).path
    code, out, _ = run_cli(capsys, "compare", ref, nan)
    assert code == 1
    detail = [line for line in out.splitlines() if line.strip().startswith("model.layers.1.mlp:output")]
    assert detail, out
    cells = detail[0].split()
    assert cells[1] == "nan" and cells[2] == "nan" and cells[-1] == "FAIL", detail[0]
    assert "1.000000" not in detail[0]


def nonfinite_counts(t: torch.Tensor):
    """What the run writer records of a tensor: (NaN, Inf) counts from its bits, None when finite."""
    return filebits.nonfinite(rawbytes.raw_bytes(t), tensorfile.code(t.dtype)) if t.is_floating_point() else None


def test_nonfinite_counts_are_exact():
    t = torch.randn(100, 8).bfloat16()
    assert nonfinite_counts(t) is None
    t[3, 1], t[5, 2], t[7, 7] = float("nan"), float("inf"), -float("inf")
    assert nonfinite_counts(t) == (1, 2)
    big = torch.full((1000,), 60000.0, dtype=torch.float16)  # its sum would overflow: the bits are finite
    assert nonfinite_counts(big) is None
    assert nonfinite_counts(torch.tensor([1, 2])) is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16,
                                   torch.float8_e4m3fn, torch.float8_e5m2])
def test_nonfinite_bit_test_agrees_with_torch_on_every_bit_pattern(dtype):
    """The bit test (two maxima of the raw bits, numpy; then counts from the bits) against torch's isnan/isinf: random bit
    patterns (NaN and Inf of both signs among them), the largest finite values of both signs
    (the patterns just below NaN/Inf), each kind of NaN/Inf alone, and views that are not
    contiguous."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    signed = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[itemsize]
    g = torch.Generator().manual_seed(itemsize)
    n = 100_006  # even: the last element is in finite[1::2]
    patterns = torch.randint(torch.iinfo(signed).min, torch.iinfo(signed).max, (n,), generator=g, dtype=signed)
    mixed = patterns.view(dtype)
    wide = mixed.float() if itemsize == 1 else mixed  # torch counts no NaN/Inf in FP8 itself
    oracle = (int(torch.isnan(wide).sum()), int(torch.isinf(wide).sum()))
    assert oracle[0] > 0 or dtype in (torch.float64, torch.float32)  # wide types: few random NaNs
    assert nonfinite_counts(mixed) == (oracle if any(oracle) else None)
    finite = torch.full((n,), torch.finfo(dtype).max, dtype=dtype)
    finite[::2] = torch.finfo(dtype).min
    assert nonfinite_counts(finite) is None
    specials = [float("nan"), -float("nan")] + ([float("inf"), -float("inf")] if dtype != torch.float8_e4m3fn else [])
    for value in specials:
        one = finite.clone()
        one[n // 3] = value
        assert nonfinite_counts(one) == ((1, 0) if value != value else (0, 1)), value
    finite[-1] = float("nan")
    assert nonfinite_counts(finite) == (1, 0)
    assert nonfinite_counts(finite[::2]) is None  # not contiguous
    assert nonfinite_counts(finite[1::2]) == (1, 0)


def test_import_says_when_the_tensors_hold_nan(capsys, lab):
    src = lab.source({"0/tokens.npy": np.array([1, 2]),
                      "0/model.layers.0.output.npy": np.array([[0.0, np.nan], [1.0, 2.0]], np.float32)})
    code, _, err = run_cli(capsys, "import", src, "--out", lab.new("r"))
    assert code == 0 and "NaN/Inf: first at model.layers.0:output (layer 0), prompt 0 (1 NaN, 0 Inf)" in err


# ------------------------------------------------------------------------------ the audit

OTHER_CASES = [  # cases kept as their own tests (test_overwrite.py and the usability tests)
    "import --overwrite killed at random points", "extract --overwrite killed, then resumed",
    "--overwrite on a full disk (RLIMIT_FSIZE)", "--overwrite on a tiny tmpfs", "a failed swap",
    "an old run that cannot be removed", "a directory in the way of the replacement",
    "--overwrite into an unwritable place", "HF cache snapshot links allowed", "--no-verify without checksums",
    "extract of a model producing NaN", "NaN tensor in the detail table", "help texts", "NaN counting",
    "import of tensors holding NaN", "a closed output pipe (| head)", "a CLI subprocess with a bad prompt file",
]


def test_audit_count():
    tables = {"tracebacks": TRACEBACKS, "bad values": BAD_VALUES, "messages": MESSAGES, "integrity": INTEGRITY,
              "containment": CONTAINMENT}
    total = sum(map(len, tables.values())) + len(OTHER_CASES)
    assert total >= 69, {k: len(v) for k, v in tables.items()}
    print(f"hostile audit: {total} cases " + ", ".join(f"{k} {len(v)}" for k, v in tables.items()))


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`layerwise plan ... | head -1`: the reader goes away; no BrokenPipeError traceback."""
    done = subprocess.run(f"{sys.executable} -m layerwise plan builtin:minimax-m2-fp8 --gpus 4x80GB | head -1",
                          shell=True, capture_output=True, text=True)
    assert done.stdout.startswith("plan for") and "Traceback" not in done.stderr, done.stderr


def test_the_cli_as_a_subprocess_prints_no_traceback(tmp_path):
    """One case end to end through the real entry point (no in-process shortcut)."""
    bad = tmp_path / "p.txt"
    bad.write_bytes(b"caf\xe9\n")
    done = subprocess.run([sys.executable, "-m", "layerwise", "extract", MODEL, "--out", str(tmp_path / "r"),
                           "--prompts", str(bad)], capture_output=True, text=True)
    assert_one_line_error(done.returncode, done.stderr, "is not UTF-8 text")
