"""Findings of the CLI survey that were tracebacks or misleading lines: each is now one line on
stderr, exit 2, saying what is wrong and what to do. Every case drives the real CLI on the tiny
built-in (or a copy of its checkpoint broken on purpose)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from helpers import assert_one_line_error, run_cli

from layerwise import zoo
from layerwise.prompts import read_prompt_file

MODEL = "builtin:minimax-m2-tiny"


@pytest.fixture()
def checkpoint(tmp_path):
    """A private copy of the tiny checkpoint, to break."""
    return shutil.copytree(zoo.tiny_checkpoint("minimax-m2-tiny"), tmp_path / "model")


@pytest.mark.parametrize("command", ["extract", "stream"])
def test_missing_attention_package_is_one_line(tmp_path, capsys, command):
    pytest.importorskip("transformers")
    if __import__("importlib").util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    extra = ["--stream"] if command == "stream" else []
    code, _, err = run_cli(capsys, "extract", MODEL, "--out", tmp_path / "r", "--prompt", "hi",
                           "--attn-implementation", "flash_attention_2", *extra)
    assert_one_line_error(code, err, "FlashAttention2")
    assert "choose another --attn-implementation" in err and not (tmp_path / "r" / "manifest.json").exists()


@pytest.mark.parametrize("attn, fragment", [
    ("flash_attention_2", "which needs the flash-attn package"),
    ("kernels-community/flash-attn", "which needs the kernels package"),
    ("bogus", "which this transformers does not know (it knows eager, "),
])
def test_a_reference_s_attention_this_machine_lacks_is_named_with_its_origin(tmp_path, capsys, monkeypatch, attn,
                                                                             fragment):
    """A test takes the reference's attention unless told: one this machine cannot load is
    refused before any layer is built, saying it came from the reference and how to test anyway;
    --attn-implementation given is the user's choice, not checked here."""
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: False)
    monkeypatch.setattr(transformers.utils, "is_kernels_available", lambda: False)
    ref = tmp_path / "ref"
    code, _, err = run_cli(capsys, "extract", MODEL, "--out", ref, "--prompt", "hi", "--points", "residual",
                           "--dtype", "fp32")
    assert code == 0, err
    manifest = json.loads((ref / "manifest.json").read_text())
    manifest["settings"]["attn_implementation"] = attn  # as a machine with the package recorded it
    (ref / "manifest.json").write_text(json.dumps(manifest))
    for kind in (["--layer", "0"], ["--test-type", "full"]):
        code, _, err = run_cli(capsys, "test", MODEL, "--reference", ref, "--out", tmp_path / "t", *kind)
        assert_one_line_error(code, err, f"the reference ran with attn_implementation {attn}, {fragment}")
        assert "give --attn-implementation sdpa" in err and not (tmp_path / "t").exists()
    code, _, err = run_cli(capsys, "test", MODEL, "--reference", ref, "--out", tmp_path / "t", "--layer", "0",
                           "--attn-implementation", "sdpa")
    assert code in (0, 1) and "Traceback" not in err, err


@pytest.mark.parametrize("cache, fragment", [
    ("file", "it is a file, not a directory"),
    ("under-file", "Not a directory"),
])
def test_unusable_cache_is_one_line(tmp_path, capsys, monkeypatch, cache, fragment):
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path / "file" if cache == "file" else tmp_path / "file" / "sub"))
    code, _, err = run_cli(capsys, "load", MODEL)
    assert_one_line_error(code, err, fragment)
    assert "set LAYERWISE_CACHE to a writable directory" in err


@pytest.mark.parametrize("template, fragment", [
    ("{% if %}", "TemplateSyntaxError"),
    ("{{ raise_exception('only system turns') }}", "only system turns"),
])
def test_broken_chat_template_is_one_line(tmp_path, capsys, checkpoint, template, fragment):
    (checkpoint / "chat_template.jinja").write_text(template)
    code, _, err = run_cli(capsys, "extract", checkpoint, "--out", tmp_path / "r", "--prompt", "hi", "--chat-template")
    assert_one_line_error(code, err, "the tokenizer's chat template fails on prompt 0")
    assert fragment in err and "leave out --chat-template" in err


def test_malformed_tokenizer_is_named_not_missing(tmp_path, capsys, checkpoint):
    (checkpoint / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": 5')
    code, _, err = run_cli(capsys, "extract", checkpoint, "--out", tmp_path / "r", "--prompt", "hi")
    assert_one_line_error(code, err, "this model's tokenizer does not load (tokenizer.json")
    # token ids need no tokenizer: the same model still extracts
    (tmp_path / "ids.jsonl").write_text('{"token_ids": [1, 2, 3]}\n')
    assert run_cli(capsys, "extract", checkpoint, "--out", tmp_path / "r", "--prompts", tmp_path / "ids.jsonl")[0] == 0


@pytest.mark.parametrize("edit, fragment", [
    ({"num_experts_per_tok": 9, "num_local_experts": 8}, "num_experts_per_tok is 9, more than the 8 experts"),
    ({"num_attention_heads": 4, "num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
])
@pytest.mark.parametrize("command", ["extract", "plan"])
def test_config_sizes_that_disagree(tmp_path, capsys, checkpoint, edit, fragment, command):
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, **edit}))
    argv = (["extract", checkpoint, "--out", tmp_path / "r", "--prompt", "hi"] if command == "extract"
            else ["plan", checkpoint, "--gpus", "2x80GB"])
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, fragment)


@pytest.mark.parametrize("value, fragment", [("1e14", "more than a week"), ("1e300", "more than a week"),
                                             ("0", "not a finite number above 0")])
def test_dist_timeout_bounds(tmp_path, capsys, value, fragment):
    code, _, err = run_cli(capsys, "extract", MODEL, "--out", tmp_path / "r", "--prompt", "hi", "--dist-timeout", value)
    assert_one_line_error(code, err, fragment)


def test_dist_timeout_of_a_week_is_taken(tmp_path, capsys):
    code, _, err = run_cli(capsys, "extract", MODEL, "--out", tmp_path / "r", "--prompt", "hi",
                           "--dist-timeout", "604800")
    assert code == 0, err


def test_prompt_files(tmp_path):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfhello\nworld\n")
    assert read_prompt_file(str(tmp_path / "bom.txt")) == ["hello", "world"], "a byte-order mark is not text"
    (tmp_path / "brace.txt").write_text('{"text": "x"} is how JSONL spells it\n')
    assert read_prompt_file(str(tmp_path / "brace.txt")) == ['{"text": "x"} is how JSONL spells it']
    (tmp_path / "noext").write_text('{"text": "x"}\n')
    assert read_prompt_file(str(tmp_path / "noext")) == ["x"], "no suffix: an object on line 1 means JSONL"
    os.symlink(tmp_path / "b", tmp_path / "a")
    os.symlink(tmp_path / "a", tmp_path / "b")
    with pytest.raises(Exception, match="cannot be read: Too many levels of symbolic links"):
        read_prompt_file(str(tmp_path / "a"))


@pytest.mark.parametrize("spec, fragment", [
    (r"model\.layers\.0\.mlp:banana", "'banana' is not a role"),
    (r"model\.layers\.0\.mlp:input,outptu", "'outptu' is not a role"),
    (r"model\.layers\.0\.mlpx:output", "matches no module of this model"),
])
def test_module_roles(tmp_path, capsys, spec, fragment):
    code, _, err = run_cli(capsys, "extract", MODEL, "--out", tmp_path / "r", "--prompt", "hi", "--modules", spec)
    assert_one_line_error(code, err, fragment)


def test_import_dirs_layout_named_for_safetensors(tmp_path, capsys):
    np = pytest.importorskip("numpy")
    (tmp_path / "src" / "0").mkdir(parents=True)
    np.save(tmp_path / "src" / "0" / "tokens.npy", np.array([1, 2, 3]))
    code, _, err = run_cli(capsys, "import", tmp_path / "src", "--from", "safetensors", "--out", tmp_path / "r",
                           "--model", MODEL)
    assert_one_line_error(code, err, "holds per-prompt directories, the dirs layout")
    assert "use --from dirs" in err


def test_cpu_limit_below_the_model_with_no_gpu(capsys):
    """With no GPU the whole model runs on the CPU: a --max-memory cpu limit below its weights is
    refused by load, and plan's verdict says so (it used to load anyway, the limit ignored)."""
    code, _, err = run_cli(capsys, "load", MODEL, "--max-memory", "cpu:1KB")
    assert_one_line_error(code, err, "exceed the 1.0 KB the CPU may hold")
    code, out, _ = run_cli(capsys, "plan", MODEL, "--max-memory", "cpu:1KB")
    assert "exceed the 1.0 KB the CPU may hold" in " ".join(out.split())
    code, out, err = run_cli(capsys, "load", MODEL, "--max-memory", "cpu:10GB")
    assert code == 0, err


def test_prompts_from_stdin_and_pipes(tmp_path, monkeypatch):
    """`--prompts -` reads the standard input, a named pipe reads as a file does; a directory is
    still "not a file", and under torchrun the standard input is refused (one rank would get it)."""
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b'{"text": "a"}\n{"token_ids": [1, 2]}\n')))
    assert read_prompt_file("-") == ["a", [1, 2]]
    fifo = tmp_path / "p.fifo"
    os.mkfifo(fifo)
    import threading

    writer = threading.Thread(target=lambda: fifo.write_text("one\ntwo\n"))
    writer.start()
    assert read_prompt_file(str(fifo)) == ["one", "two"]
    writer.join()
    with pytest.raises(Exception, match="is not a file"):
        read_prompt_file(str(tmp_path))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(Exception, match="reaches one rank only under torchrun"):
        read_prompt_file("-")


def test_empty_report_name_refused_by_the_library_too(tmp_path):
    """The CLI refuses `--json ""` at parsing; the library's own check says the same to callers."""
    from layerwise.paths import check_output_file

    with pytest.raises(Exception, match="is given an empty file name"):
        check_output_file("", "--json")
