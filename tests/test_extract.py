"""extract: bit-identical to transformers' own hidden states, resumable, bounded, and refusing bad input."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from layerwise import loading, runs, tensorfile
from layerwise.extract import ExtractOptions, extract_model

from helpers import PROMPTS, assert_one_line_error, nan_inf_found_by_the_capture_as_by_the_writer, run_cli

ALL_POINTS = "embed,residual,attn,mlp,router,norm,logits"


@pytest.fixture(scope="module")
def minimax_fp32():
    return loading.load_model("builtin:minimax-m2-tiny", loading.LoadOptions(dtype="fp32"))


def oracle(loaded, prompts):
    """transformers' own output_hidden_states for the same right-padded batch, rows in the extract's
    order (longest first): a row's bits may depend on where it sits in the batch (CPU GEMM edge tiles),
    so only the same batch is a fair oracle. Returned indexed by prompt, as the run is."""
    tok = loaded.tokenizer
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    lengths = [len(tok(p)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (-lengths[i], i))
    enc = tok([prompts[i] for i in order], padding=True, return_tensors="pt", padding_side="right")
    with torch.inference_mode():  # on the model's device (a GPU machine runs these too); compared on the CPU
        out = loaded.model(**enc.to(loaded.input_device), output_hidden_states=True)
    back = torch.tensor([order.index(i) for i in range(len(prompts))])
    out.hidden_states = tuple(h.cpu()[back] for h in out.hidden_states)
    out.logits = out.logits.cpu()[back]
    return out, lengths


def assert_matches_oracle(run, loaded, prompts):
    out, lengths = oracle(loaded, prompts)
    hs, layers = out.hidden_states, loaded.anatomy.num_layers
    assert len(hs) == layers + 1
    for p, n in enumerate(lengths):
        for k in range(layers):
            assert torch.equal(run.tensor(f"model.layers.{k}:input", p), hs[k][p, :n]), (p, k, "input")
            if k < layers - 1:  # the last hidden state is after the final norm
                assert torch.equal(run.tensor(f"model.layers.{k}:output", p), hs[k + 1][p, :n]), (p, k, "output")
        assert torch.equal(run.tensor("model.norm:output", p), hs[layers][p, :n]), (p, "norm")
        assert torch.equal(run.tensor("lm_head:output", p), out.logits[p, :n]), (p, "logits")
        assert run.tensor("model.layers.0:input", p).shape == (n, loaded.model.config.hidden_size)


@pytest.mark.parametrize("spec, dtype", [("builtin:minimax-m2-tiny", "fp32"), ("builtin:minimax-m2-tiny", "bf16"),
                                         ("builtin:llama-tiny", "bf16"), ("builtin:qwen3-moe-tiny", "fp32")])
def test_bit_identical_to_output_hidden_states(tmp_path, spec, dtype):
    loaded = loading.load_model(spec, loading.LoadOptions(dtype=dtype))
    extract_model(loaded, tmp_path / "run", PROMPTS, ExtractOptions(points=ALL_POINTS, batch_size=4))
    assert_matches_oracle(runs.open_run(tmp_path / "run"), loaded, PROMPTS)


@pytest.mark.slow
def test_smollm2_bit_identical(tmp_path):
    loaded = loading.load_model("builtin:smollm2", loading.LoadOptions(dtype="fp32"))
    prompts = ["The capital of France is", "Water boils at"]
    extract_model(loaded, tmp_path / "run", prompts, ExtractOptions(points="residual,norm,logits", batch_size=2))
    run = runs.open_run(tmp_path / "run")
    assert_matches_oracle(run, loaded, prompts)
    logits = run.tensor("lm_head:output", 0)
    assert loaded.tokenizer.decode(int(logits[-1].argmax())) == " Paris"  # a real model: the right answer


def test_router_ids_follow_the_routing_rule(tmp_path, minimax_fp32):
    extract_model(minimax_fp32, tmp_path / "run", PROMPTS, ExtractOptions(points="router"))
    run = runs.open_run(tmp_path / "run")
    for k, layer in enumerate(minimax_fp32.model.model.layers):
        bias = layer.mlp.e_score_correction_bias.float().cpu()
        for p in range(len(PROMPTS)):
            logits = run.tensor(f"model.layers.{k}.mlp.gate:router_logits", p)
            ids = run.tensor(f"model.layers.{k}.mlp.gate:topk_ids", p)
            weights = run.tensor(f"model.layers.{k}.mlp.gate:topk_weights", p)
            assert ids.dtype == torch.int32 and weights.dtype == torch.float32 and logits.dtype == torch.float32
            scores = torch.sigmoid(logits.float())
            expected = (scores + bias).topk(2, dim=-1).indices
            assert torch.equal(ids.sort(-1).values, expected.to(torch.int32).sort(-1).values), (k, p)
            chosen = scores.gather(1, ids.long())
            torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True))


def test_softmax_router_rule(tmp_path):
    loaded = loading.load_model("builtin:qwen3-moe-tiny", loading.LoadOptions(dtype="fp32"))
    extract_model(loaded, tmp_path / "run", PROMPTS[:2], ExtractOptions(points="router"))
    run = runs.open_run(tmp_path / "run")
    logits = run.tensor("model.layers.2.mlp.gate:router_logits", 0)
    ids = run.tensor("model.layers.2.mlp.gate:topk_ids", 0)
    expected = torch.softmax(logits.float(), -1).topk(2, -1).indices
    assert torch.equal(ids.sort(-1).values, expected.to(torch.int32).sort(-1).values)


def test_layers_and_points_restrict_capture(tmp_path, minimax_fp32):
    extract_model(minimax_fp32, tmp_path / "run", PROMPTS[:1], ExtractOptions(points="attn,mlp", layers="1-2"))
    names = runs.open_run(tmp_path / "run").names
    assert names == ["model.layers.1.self_attn:output", "model.layers.1.mlp:output",
                     "model.layers.2.self_attn:output", "model.layers.2.mlp:output"]


def test_manifest_records_what_and_how(tmp_path, minimax_fp32):
    extract_model(minimax_fp32, tmp_path / "run", PROMPTS[:2], ExtractOptions())
    m = json.loads((tmp_path / "run" / runs.MANIFEST).read_text())
    assert m["model"]["model_type"] == "minimax_m2" and len(m["model"]["config_sha256"]) == 64
    assert m["settings"]["dtype"] == "float32" and m["settings"]["points"] == ["residual", "router", "logits"]
    assert m["prompts"][0]["token_ids"] == list(PROMPTS[0].encode())
    assert {"torch", "transformers", "accelerate", "safetensors", "layerwise"} <= set(m["versions"])
    assert any(f["name"] == "fp32-router" for f in m["fixes"])


def test_rerun_resumes_and_different_settings_are_refused(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["extract", "builtin:minimax-m2-tiny", "--out", out, "--prompt", "abc", "--prompt", "de", "--dtype", "fp32"]
    assert run_cli(capsys, *args)[0] == 0
    before = _snapshot(out)
    code, text, _ = run_cli(capsys, *args)
    assert code == 0 and "1 batch already on disk" in text
    assert _snapshot(out) == before
    code, _, err = run_cli(capsys, *args[:-1], "bf16")
    assert_one_line_error(code, err, "holds a run with different settings dtype")
    assert run_cli(capsys, *args[:-1], "bf16", "--overwrite")[0] == 0
    assert json.loads((out / runs.MANIFEST).read_text())["settings"]["dtype"] == "bfloat16"


def _kill_script(out: Path, prompts_file: Path) -> list[str]:
    return [sys.executable, "-m", "layerwise", "extract", "builtin:minimax-m2-tiny", "--out", str(out),
            "--prompts", str(prompts_file), "--dtype", "fp32", "--batch-size", "2", "--points", ALL_POINTS]


def _snapshot(run_dir: Path) -> dict:
    """Every tensor's raw bytes, by file and name (file headers order their metadata freely)."""
    from safetensors import safe_open

    out = {}
    for path in sorted(run_dir.rglob("*.safetensors")):
        with safe_open(str(path), "pt") as fh:
            for name in fh.keys():
                out[(str(path.relative_to(run_dir)), name)] = tensorfile.digest(fh.get_tensor(name))
    return out


@pytest.mark.slow
def test_killed_extract_never_looks_complete_and_resumes_identically(tmp_path, tiny_minimax):
    prompts = tmp_path / "prompts.txt"
    rng = random.Random(1)
    prompts.write_text("\n".join(" ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) for _ in range(rng.randint(40, 120)))
                                 for _ in range(60)) + "\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    reference = tmp_path / "reference"
    subprocess.run(_kill_script(reference, prompts), check=True, env=env, capture_output=True)
    out = tmp_path / "killed"
    kills = 0
    for attempt in range(4):
        proc = subprocess.Popen(_kill_script(out, prompts), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        target_files = rng.randint(5, 200)
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            if len(list(out.glob("tensors/*/*.safetensors"))) >= target_files:
                time.sleep(rng.random() * 0.05)
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.005)
        proc.wait()
        if (out / runs.MANIFEST).exists():
            runs.open_run(out)  # a manifest means complete: every listed tensor reads and verifies
            for e in runs.open_run(out).entries():
                runs.open_run(out).tensor(e.name, e.prompt)
            break
        with pytest.raises(Exception, match="incomplete"):
            runs.open_run(out)
    assert kills >= 1, "the extract finished before any kill; make it longer"
    subprocess.run(_kill_script(out, prompts), check=True, env=env, capture_output=True)
    assert _snapshot(out) == _snapshot(reference)
    ref_manifest = json.loads((reference / runs.MANIFEST).read_text())
    got_manifest = json.loads((out / runs.MANIFEST).read_text())
    assert got_manifest["tensors"] == ref_manifest["tensors"]


def test_disk_full_leaves_nothing_that_looks_complete(tmp_path, tiny_minimax):
    import resource

    out = tmp_path / "run"

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    cmd = [sys.executable, "-m", "layerwise", "extract", "builtin:minimax-m2-tiny", "--out", str(out),
           "--prompt", "x" * 300, "--points", ALL_POINTS, "--dtype", "fp32"]
    # on the CPU: under so small a file-size limit a GPU's driver cannot even start
    proc = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=limit_file_size,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert_one_line_error(proc.returncode, proc.stderr, "cannot write")
    assert not (out / runs.MANIFEST).exists()
    assert not list(out.rglob("*.tmp")), "temporary files must be cleaned up"


def test_disk_full_on_a_tiny_filesystem(tmp_path, tiny_minimax):
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        cmd = [sys.executable, "-m", "layerwise", "extract", "builtin:minimax-m2-tiny", "--out", str(mount / "run"),
               "--prompt", "y" * 400, "--points", ALL_POINTS, "--dtype", "fp32"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert_one_line_error(proc.returncode, proc.stderr, "is the disk full?")
        assert not (mount / "run" / runs.MANIFEST).exists()
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("extra, fragment", [
    (["--points", "residual,bogus"], "unknown capture point 'bogus'"),
    (["--layers", "2-9"], "names layer 4, but the model has layers 0-3"),
    (["--layers", "3-1"], "is reversed"),
    (["--max-tokens", "3"], "more than --max-tokens 3"),
    (["--batch-size", "0"], "argument --batch-size: 0 is too small"),
])
def test_bad_extract_options(tmp_path, capsys, extra, fragment):
    code, _, err = run_cli(capsys, "extract", "builtin:minimax-m2-tiny", "--out", tmp_path / "r", "--prompt", "hello", *extra)
    assert_one_line_error(code, err, fragment)


def test_bad_prompt_files(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, _, err = run_cli(capsys, "extract", "builtin:minimax-m2-tiny", "--out", tmp_path / "r", "--prompts", empty)
    assert_one_line_error(code, err, "holds no prompt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken}\n')
    code, _, err = run_cli(capsys, "extract", "builtin:minimax-m2-tiny", "--out", tmp_path / "r", "--prompts", bad)
    assert_one_line_error(code, err, "line 2 is not valid JSON")
    ids = tmp_path / "ids.jsonl"
    ids.write_text('{"token_ids": [1, 2, 3]}\n{"token_ids": [5, 99999]}\n')
    code, _, err = run_cli(capsys, "extract", "builtin:minimax-m2-tiny", "--out", tmp_path / "r", "--prompts", ids)
    assert_one_line_error(code, err, "outside the vocabulary of 512")
    code, _, err = run_cli(capsys, "extract", "builtin:minimax-m2-tiny", "--out", tmp_path / "r")
    assert_one_line_error(code, err, "no prompt given")


def test_prompt_longer_than_context(tmp_path, capsys):
    code, _, err = run_cli(capsys, "extract", "builtin:minimax-m2-tiny", "--out", tmp_path / "r", "--prompt", "z" * 5000)
    assert_one_line_error(code, err, "more than the model's context of 4096")


def test_output_path_is_a_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    code, _, err = run_cli(capsys, "extract", "builtin:minimax-m2-tiny", "--out", target, "--prompt", "hello")
    assert_one_line_error(code, err, "is a file")


def test_token_id_prompts_and_jsonl_text(tmp_path, capsys):
    f = tmp_path / "p.jsonl"
    f.write_text('{"text": "ab"}\n{"token_ids": [97, 98]}\n')
    assert run_cli(capsys, "extract", "builtin:minimax-m2-tiny", "--out", tmp_path / "r", "--prompts", f)[0] == 0
    run = runs.open_run(tmp_path / "r")
    assert run.prompts[0]["token_ids"] == run.prompts[1]["token_ids"] == [97, 98]
    assert torch.equal(run.tensor("lm_head:output", 0), run.tensor("lm_head:output", 1))


def test_chat_template(tmp_path, capsys):
    assert run_cli(capsys, "extract", "builtin:minimax-m2-tiny", "--out", tmp_path / "r", "--prompt", "hi",
                   "--chat-template")[0] == 0
    ids = runs.open_run(tmp_path / "r").prompts[0]["token_ids"]
    assert ids[0] == 256 and bytes(i for i in ids if i < 256).startswith(b"user: hi")


def test_router_selection_bias_is_recorded(tmp_path, minimax_fp32):
    extract_model(minimax_fp32, tmp_path / "run", PROMPTS[:2], ExtractOptions(points="router"))
    run = runs.open_run(tmp_path / "run")
    for k, layer in enumerate(minimax_fp32.model.model.layers):
        for p in range(2):
            bias = run.tensor(f"model.layers.{k}.mlp.gate:score_bias", p)
            assert bias.dtype == torch.float32 and torch.equal(bias, layer.mlp.e_score_correction_bias.cpu())
    qwen = loading.load_model("builtin:qwen3-moe-tiny", loading.LoadOptions(dtype="fp32"), with_tokenizer=False)
    extract_model(qwen, tmp_path / "qwen", [[1, 2, 3]], ExtractOptions(points="router"))
    assert not any(n.endswith(":score_bias") for n in runs.open_run(tmp_path / "qwen").names)


def test_nan_inf_found_by_the_capture_are_counted_as_by_the_writer(tmp_path, monkeypatch):
    """`nan_inf_found_by_the_capture_as_by_the_writer` (helpers.py) on the CPU (the GPU's path of copies
    and sums, made on the host)."""
    nan_inf_found_by_the_capture_as_by_the_writer(tmp_path, monkeypatch, PROMPTS, "cpu", "fp32")



@pytest.mark.parametrize("stream", [False, True])
def test_the_manifest_counts_every_byte_written_with_replies_still_in_flight(tmp_path, capsys, monkeypatch, stream):
    """The manifest's stats.bytes is every tensor byte the call wrote, the last files' too: counted
    once every file is written, not when the capture closes (each writer-process reply is held
    back here, so at the capture's close most files are not counted yet)."""
    handed = runs.RunWriter._handed

    def late(self, *args, **kwargs):
        time.sleep(0.02)
        return handed(self, *args, **kwargs)
    monkeypatch.setattr(runs.RunWriter, "_handed", late)
    out = tmp_path / "r"
    code, _, err = run_cli(capsys, "extract", "builtin:minimax-m2-tiny", "--out", out, "--prompt", "hello there",
                           "--prompt", "a second prompt", "--batch-size", "1", *(["--stream"] if stream else []))
    assert code == 0, err
    run = runs.open_run(out)
    tensors = [run.tensor(e.name, e.prompt) for e in run.entries()]
    written = sum(t.numel() * t.element_size() for t in tensors)
    assert len(tensors) > 10 and run.manifest["stats"]["bytes"] == written
