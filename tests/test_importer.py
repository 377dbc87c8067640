"""import: foreign tensors become a run equal to what extract writes."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from layerwise import loading, runs
from layerwise.extract import ExtractOptions, extract_model
from layerwise.importer import import_run, parse_renames

from helpers import PROMPTS, assert_one_line_error, assert_runs_equal, run_cli

TEXTS = PROMPTS[:2]  # one long and one short prompt


@pytest.fixture(scope="module")
def llama():
    return loading.load_model("builtin:llama-tiny", loading.LoadOptions(dtype="fp32"))


def hf_hidden_states(loaded, text):
    ids = loaded.tokenizer(text, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = loaded.model(ids, output_hidden_states=True)
    return ids[0], out


def test_npy_import_equals_extract(tmp_path, llama):
    """Another engine's dump (here transformers' output_hidden_states as .npy, in [1, seq, hidden]
    and [seq, hidden] shapes) imports to exactly what extract captures."""
    src = tmp_path / "src"
    layers = llama.anatomy.num_layers
    for p, text in enumerate(TEXTS):
        d = src / str(p)
        d.mkdir(parents=True)
        ids, out = hf_hidden_states(llama, text)
        np.save(d / "tokens.npy", ids.numpy())
        for k in range(layers - 1):
            arr = out.hidden_states[k + 1].numpy()
            np.save(d / f"model.layers.{k}.output.npy", arr if k % 2 else arr[0])
        np.save(d / "model.layers.0.input.npy", out.hidden_states[0][0].numpy())
        np.save(d / "model.norm.output.npy", out.hidden_states[layers][0].numpy())
        np.save(d / "lm_head.output.npy", out.logits[0].numpy())
    import_run(str(src), str(tmp_path / "imported"))
    extract_model(llama, tmp_path / "extracted", TEXTS, ExtractOptions(points="residual,norm,logits", batch_size=1))
    imported, extracted = runs.open_run(tmp_path / "imported"), runs.open_run(tmp_path / "extracted")
    assert imported.prompts[0]["token_ids"] == extracted.prompts[0]["token_ids"]
    assert len(imported.names) == layers + 2
    assert assert_runs_equal(imported, extracted, names=imported.names) == len(imported.names) * len(TEXTS)


def test_safetensors_layout_with_renames(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    save_file({"tokens": torch.arange(5), "transformer.h.3.hidden:output": x,
               "transformer.h.3.moe.router:topk_ids": torch.zeros(5, 2, dtype=torch.int32)}, str(src / "0.safetensors"))
    code = import_run(str(src), str(tmp_path / "run"), renames=[r"^transformer\.h\.=model.layers.",
                                                               r"\.hidden:=:", r"\.moe\.router:=.mlp.gate:"])
    run = runs.open_run(tmp_path / "run")
    assert set(run.names) == {"model.layers.3:output", "model.layers.3.mlp.gate:topk_ids"}
    assert torch.equal(run.tensor("model.layers.3:output"), x)
    assert code["producer"] == "layerwise import"


def test_pt_files(tmp_path):
    d = tmp_path / "src" / "0"
    d.mkdir(parents=True)
    torch.save(torch.tensor([1, 2, 3]), d / "tokens.pt")
    torch.save(torch.ones(1, 3, 4, dtype=torch.bfloat16), d / "model.layers.0.output.pt")
    import_run(str(tmp_path / "src"), str(tmp_path / "run"))
    assert runs.open_run(tmp_path / "run").tensor("model.layers.0:output").shape == (3, 4)


def test_an_imported_run_has_no_anatomy_and_a_corrupt_one_says_re_import(tmp_path, capsys):
    """An imported run carries no "anatomy" (FORMAT.md: readers take transformers' spelling) and is
    read; a file of it cut short is a run to import again, not a download."""
    d = tmp_path / "src" / "0"
    d.mkdir(parents=True)
    np.save(d / "tokens.npy", np.array([1, 2, 3]))
    np.save(d / "model.layers.0.output.npy", np.ones((3, 4), dtype=np.float32))
    manifest = import_run(str(tmp_path / "src"), str(tmp_path / "run"))
    assert "anatomy" not in manifest
    run = runs.open_run(tmp_path / "run")
    assert torch.equal(run.tensor("model.layers.0:output"), torch.ones(3, 4))
    file = run.path / run.entry("model.layers.0:output", 0).file
    file.write_bytes(file.read_bytes()[:-3])
    code, _, err = run_cli(capsys, "compare", tmp_path / "run", tmp_path / "run")
    assert_one_line_error(code, err, "truncated")
    assert err.strip().endswith("the run is corrupt, re-import it") and "re-download" not in err, err


@pytest.mark.parametrize("setup, fragment", [
    ("no_tokens", "has no tokens"),
    ("bad_name", "'layer7' is not named <module path>:<role>"),
    ("bad_shape", "expected [3, ...] or [1, 3, ...]"),
    ("gap", "numbered 0, 1, 2"),
    ("empty", "holds neither"),
])
def test_import_errors(tmp_path, capsys, setup, fragment):
    src = tmp_path / "src"
    d = src / ("2" if setup == "gap" else "0")
    d.mkdir(parents=True)
    if setup != "no_tokens" and setup != "empty":
        np.save(d / "tokens.npy", np.array([1, 2, 3]))
    if setup == "bad_name":
        np.save(d / "layer7.npy", np.zeros((3, 4), dtype=np.float32))
    if setup == "bad_shape":
        np.save(d / "model.layers.0.output.npy", np.zeros((4, 4), dtype=np.float32))
    if setup == "empty":
        d.rmdir()
    code, _, err = run_cli(capsys, "import", src, "--out", tmp_path / "run")
    assert_one_line_error(code, err, fragment)


@pytest.mark.parametrize("flags, fragment", [
    (["--layers", "abc"], "--layers names the layers vLLM hidden-states files hold, and {src} is dirs: drop --layers"),
    (["--layers", "2,16"], "--layers names the layers vLLM hidden-states files hold"),
    (["--decode", "include"], "--decode is for SGLang dumps' decode steps, and {src} is dirs: drop --decode"),
    (["--model", "builtin:nope"], "unknown built-in model --model 'builtin:nope': choose one of builtin:minimax-m2"),
])
def test_flags_that_do_not_apply_are_refused(tmp_path, capsys, flags, fragment):
    """A flag of another layout, or a built-in model that does not exist, was recorded or dropped
    silently: now one line, and no run written."""
    src = tmp_path / "src"
    (src / "0").mkdir(parents=True)
    np.save(src / "0" / "tokens.npy", np.array([1, 2, 3]))
    np.save(src / "0" / "model.layers.0.output.npy", np.zeros((3, 4), dtype=np.float32))
    code, _, err = run_cli(capsys, "import", src, "--out", tmp_path / "run", *flags)
    assert_one_line_error(code, err, fragment.format(src=src))
    assert not (tmp_path / "run").exists()
    code, _, err = run_cli(capsys, "import", src, "--out", tmp_path / "ok", "--model", "builtin:llama-tiny")
    assert code == 0, err
    assert runs.open_run(tmp_path / "ok").manifest["model"]["spec"] == "builtin:llama-tiny"


def test_bad_rename_rule(tmp_path, capsys):
    code, _, err = run_cli(capsys, "import", tmp_path, "--out", tmp_path.parent / f"{tmp_path.name}-run", "--rename", "([=x")
    assert_one_line_error(code, err, "bad regular expression")


@pytest.mark.parametrize("rule, pattern, replacement", [
    ("s|^step=0___name=(.*)$|\\1|", "^step=0___name=(.*)$", "\\1"),
    ("s#a|b#c#", "a|b", "c"),
    (r"^transformer\.h\.=model.layers.", r"^transformer\.h\.", "model.layers."),
    ("s.x=y", "s.x", "y"),  # not three dots: the old REGEX=REPLACEMENT form
])
def test_rename_rules(rule, pattern, replacement):
    (compiled, repl), = parse_renames([rule])
    assert (compiled.pattern, repl) == (pattern, replacement)


def test_bad_sed_rule(tmp_path, capsys):
    code, _, err = run_cli(capsys, "import", tmp_path, "--out", tmp_path.parent / f"{tmp_path.name}-run", "--rename", "s|a|b")
    assert_one_line_error(code, err, "must read s|REGEX|REPLACEMENT|")


def test_foreign_file_names_renamed_before_they_are_checked(tmp_path, capsys):
    """The issue's case: SGLang files (`=` in their names, {"value", "meta"} inside) put into a
    per-prompt directory; a sed-style rule renames them, and the run records their dtype."""
    d = tmp_path / "src" / "0"
    d.mkdir(parents=True)
    torch.save({"value": torch.tensor([1, 2, 3]), "meta": {"name": "input_ids"}}, d / "tokens.pt")
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    for layer in range(2):
        torch.save({"value": x + layer, "meta": {"layer_id": layer}},
                   d / f"step=0___rank=0___dump_index={layer + 2}___name=layer_output___layer_id={layer}.pt")
    code, out, err = run_cli(capsys, "import", tmp_path / "src", "--out", tmp_path / "run", "--rename",
                             r"s|^step=0___rank=0___dump_index=\d+___name=layer_output___layer_id=(\d+)$|"
                             r"model.layers.\1:output|")
    assert code == 0, err
    assert "from dirs (bfloat16): 1 prompt, 2 tensors" in out
    run = runs.open_run(tmp_path / "run")
    assert torch.equal(run.tensor("model.layers.1:output"), x + 1)
    code, out, _ = run_cli(capsys, "compare", tmp_path / "run", tmp_path / "run")
    assert code == 0 and f"REF  {tmp_path / 'run'} (bfloat16)" in out


def test_a_map_file_renames_and_sums(tmp_path):
    d = tmp_path / "src" / "0"
    d.mkdir(parents=True)
    np.save(d / "tokens.npy", np.array([4, 5]))
    np.save(d / "h3_a.npy", np.ones((2, 4), dtype=np.float32))
    np.save(d / "h3_b.npy", np.full((2, 4), 2, dtype=np.float32))
    (tmp_path / "map.toml").write_text("[[rules]]\nmatch = 'h(\\d+)_[ab]'\nname = 'model.layers.\\1:output'\n"
                                       "combine = 'sum'\n")
    import_run(str(tmp_path / "src"), str(tmp_path / "run"), map_file=str(tmp_path / "map.toml"))
    assert torch.equal(runs.open_run(tmp_path / "run").tensor("model.layers.3:output"), torch.full((2, 4), 3.0))
