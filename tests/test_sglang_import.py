"""import --from sglang: dumps written as SGLang's dumper writes them (tests/sglang_dumps.py), every
file-format era, packed steps, chunked prefill and decode steps, TP=2 shards; the imported run is
bit-identical to layerwise's own extract in fp32, and a TP=2 dump un-shards to the TP=1 dump."""

import json

import pytest
import torch

from layerwise import loading, runs
from layerwise.compare import CompareOptions, compare_runs
from layerwise.engines import namemap, packing, sglang
from layerwise.engines.shards import parse_dims, unshard
from layerwise.errors import UserError
from layerwise.extract import ExtractOptions, extract_model
from layerwise.importer import import_run
from layerwise.tolerances import build_tolerances

from helpers import assert_one_line_error, assert_runs_equal, run_cli
from sglang_dumps import ERAS, Dumper, sglang_step
from tp_llama import tp_forward, weights

PROMPTS = ["The capital of France is", "Hello there", "a b c d e f g h i j k l m n o p q r"]


@pytest.fixture(scope="module")
def llama():
    return loading.load_model("builtin:llama-tiny", loading.LoadOptions(dtype="fp32"))


def hf_points(loaded, ids: list[int]) -> dict[str, torch.Tensor]:
    """What transformers computes for one sequence at every point the tests dump, [seq, ...]."""
    model, got, handles = loaded.model, {}, []
    core = model.model

    def keep(name, use_input=False):
        def hook(mod, args, kwargs, out=None):
            x = (args[0] if args else kwargs["hidden_states"]) if use_input else out
            got[name] = (x[0] if isinstance(x, tuple) else x)[0].clone()
        return hook

    handles.append(core.embed_tokens.register_forward_hook(keep("embed"), with_kwargs=True))
    handles.append(core.norm.register_forward_hook(keep("norm"), with_kwargs=True))
    for i, layer in enumerate(core.layers):
        handles.append(layer.register_forward_pre_hook(keep(f"in{i}", True), with_kwargs=True))
        handles.append(layer.register_forward_hook(keep(f"out{i}"), with_kwargs=True))
        handles.append(layer.self_attn.register_forward_hook(keep(f"attn{i}"), with_kwargs=True))
        handles.append(layer.mlp.register_forward_hook(keep(f"mlp{i}"), with_kwargs=True))
    try:
        with torch.inference_mode():
            got["logits"] = model(torch.tensor([ids]), use_cache=False).logits[0]
    finally:
        for h in handles:
            h.remove()
    return got


# One engine run: (rid, pool index, prompt, rows) per request of each step; rows "prefill", "chunk1/2",
# "chunk2/2" or "decode" (the token the previous step generated).
SCHEDULE = [[("r0", 3, 0, "prefill"), ("r1", 5, 1, "prefill")],
            [("r0", 3, 0, "decode"), ("r1", 5, 1, "decode")],
            [("r2", 3, 2, "chunk1/2")],
            [("r2", 3, 2, "chunk2/2")],
            [("r2", 3, 2, "decode")]]


def engine_run(loaded, dumper_for, style: str = "hand"):
    """Run the schedule, dumping each step's packed tensors as SGLang's user (hand) or its
    non-intrusive dumper (DUMPER_NON_INTRUSIVE_MODE=all, layers returning (mlp_out, residual)) does.
    Returns the prompts' token ids and the generated tokens."""
    tok = loaded.tokenizer
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    prompt_points = [hf_points(loaded, x) for x in ids]
    generated = [int(pp["logits"][-1].argmax()) for pp in prompt_points]
    decode_points = [hf_points(loaded, x + [g]) for x, g in zip(ids, generated)]
    layers = loaded.anatomy.num_layers
    dumper = dumper_for(0)
    for step in SCHEDULE:
        rows, positions, seq_lens, tokens = [], [], [], []
        for _, _, p, kind in step:
            n = len(ids[p])
            span = {"prefill": (0, n), "chunk1/2": (0, n // 2), "chunk2/2": (n // 2, n), "decode": (n, n + 1)}[kind]
            points = decode_points[p] if kind == "decode" else prompt_points[p]
            rows.append((points, span))
            positions += list(range(*span))
            seq_lens.append(span[1])
            tokens += (ids[p] + [generated[p]])[span[0]:span[1]]
        sglang_step(dumper, tokens, positions, seq_lens, [r for r, _, _, _ in step], [q for _, q, _, _ in step])

        def packed(key):
            return torch.cat([pts[key][a:b] for pts, (a, b) in rows])

        if style == "hand":
            ctx = dumper.era in ("0.5.6", "0.5.9", "0.5.10")  # layer_id by set_ctx (0.5.6+) or as a tag
            for i in range(layers):
                dumper.dump("layer_input", packed(f"in{i}"), layer_id=i)
                if ctx:
                    dumper.set_ctx(layer_id=i)
                    dumper.dump("attn_output", packed(f"attn{i}"))
                    dumper.dump("mlp_output", packed(f"mlp{i}"))
                    dumper.set_ctx(layer_id=None)
                else:
                    dumper.dump("attn_output", packed(f"attn{i}"), layer_id=i)
                    dumper.dump("mlp_output", packed(f"mlp{i}"), layer_id=i)
                dumper.dump("layer_output", packed(f"out{i}"), layer_id=i)
        else:
            ni = "non_intrusive__model."
            dumper.dump(ni + "embed_tokens.output", packed("embed"))
            for i in range(layers):
                stream, attn, mlp = packed(f"in{i}"), packed(f"attn{i}"), packed(f"mlp{i}")
                after_attn = stream + attn  # SGLang's residual after the attention's fused add-norm
                dumper.dump(ni + f"layers.{i}.inputs.0", torch.tensor(positions), layer_id=i)
                if i == 0:
                    dumper.dump(ni + "layers.0.inputs.1", stream, layer_id=0)
                else:  # hidden_states = the previous MLP's output, residual = the stream before it
                    prev_mlp = packed(f"mlp{i - 1}")
                    dumper.dump(ni + f"layers.{i}.inputs.1", prev_mlp, layer_id=i)
                    residual = packed(f"in{i - 1}") + packed(f"attn{i - 1}")
                    dumper.dump(ni + f"layers.{i}.inputs.3", residual, layer_id=i)
                dumper.dump(ni + f"layers.{i}.self_attn.o_proj.output", attn, layer_id=i)
                dumper.dump(ni + f"layers.{i}.self_attn.output", attn, layer_id=i)
                dumper.dump(ni + f"layers.{i}.mlp.output", mlp, layer_id=i)
                dumper.dump(ni + f"layers.{i}.output.0", mlp)  # no layer_id: the context is already cleared
                dumper.dump(ni + f"layers.{i}.output.1", after_attn)
            dumper.dump(ni + "norm.output.0", packed("norm"))
            dumper.dump(ni + "norm.output.1", packed(f"out{layers - 1}"))
        dumper.step()
    return ids, generated


@pytest.mark.parametrize("era", ERAS)
def test_every_era_imports_bit_identical_to_extract(tmp_path, llama, era):
    """fp32: the SGLang dump (packed batch, chunked prefill, decode steps) imports to exactly
    what layerwise extracts from the same model; decode steps are skipped by default."""
    ids, _ = engine_run(llama, lambda rank: Dumper(tmp_path / "dumps", era, rank))
    code = import_run(str(tmp_path / "dumps"), str(tmp_path / "imported"))
    assert code["settings"]["format"] == "sglang" and code["settings"]["dtype"] == "float32"
    extract_model(llama, tmp_path / "extracted", PROMPTS, ExtractOptions(points="residual,attn,mlp", batch_size=1))
    imported, extracted = runs.open_run(tmp_path / "imported"), runs.open_run(tmp_path / "extracted")
    assert [p["token_ids"] for p in imported.prompts] == ids
    assert [p.get("source_id") for p in imported.prompts] == ["r0", "r1", "r2"]
    assert assert_runs_equal(imported, extracted) == len(PROMPTS) * 4 * llama.anatomy.num_layers
    assert any("3 decode token(s) skipped" in n for n in code["notes"])
    report = compare_runs(extracted, imported, CompareOptions(tolerances=build_tolerances([], None, max_rel_l2=0.0)))
    assert report.passed and report.dtypes == ("float32", "float32")


def test_non_intrusive_dumps_and_decode_steps(tmp_path, llama, capsys):
    """DUMPER_NON_INTRUSIVE_MODE=all names (0.5.10-0.5.20): the stream is output.0 + output.1 and
    inputs.1 + inputs.3; with --decode include the generated tokens are further positions."""
    ids, generated = engine_run(llama, lambda rank: Dumper(tmp_path / "dumps", "0.5.10", rank), style="all")
    code, out, err = run_cli(capsys, "import", tmp_path / "dumps", "--out", tmp_path / "imported")
    assert code == 0, err
    assert "from sglang (float32): 3 prompts" in out and "not imported (no name map rule)" in out
    assert "non_intrusive__model.layers.0.self_attn.o_proj.output" in out
    extract_model(llama, tmp_path / "extracted", PROMPTS,
                  ExtractOptions(points="embed,residual,attn,mlp,norm", batch_size=1))
    imported = runs.open_run(tmp_path / "imported")
    assert assert_runs_equal(imported, runs.open_run(tmp_path / "extracted")) == len(PROMPTS) * 18
    # decode steps as their own positions: the prompts grow by the generated token
    code, _, err = run_cli(capsys, "import", tmp_path / "dumps", "--out", tmp_path / "with-decode", "--decode", "include")
    assert code == 0, err
    grown = runs.open_run(tmp_path / "with-decode")
    assert [p["token_ids"] for p in grown.prompts] == [x + [g] for x, g in zip(ids, generated)]
    oracle = hf_points(llama, ids[2] + [generated[2]])
    assert torch.equal(grown.tensor("model.layers.3:output", 2)[-1], oracle["out3"][-1])
    assert torch.equal(grown.tensor("model.layers.3:output", 2)[:-1], imported.tensor("model.layers.3:output", 2))


TP_MAP = """
[[rules]]
match = 'q'
name = 'model.layers.{layer_id}.self_attn.q_proj:output'

[[rules]]
match = 'o_partial'
name = 'model.layers.{layer_id}.self_attn.o_proj:output'
dims = 't h[tp:partial]'

[[rules]]
match = 'act'
name = 'model.layers.{layer_id}.mlp.down_proj:input'

[[rules]]
match = 'down_partial'
name = 'model.layers.{layer_id}.mlp.down_proj:output'
"""


def tp_dump(root, loaded, tp: int, dims_in_map: bool = True):
    """Two prompts packed in one step, on `tp` ranks (SGLang 0.5.23 with the rank in file names)."""
    w, config = weights(loaded.model), loaded.model.config
    ids = [loaded.tokenizer(p)["input_ids"] for p in PROMPTS[:2]]
    per_prompt = [tp_forward(w, config, x, tp) for x in ids]
    dims = {"q": "t h[tp]", "act": "t h[tp]", "down_partial": "t h[tp:partial]"}
    for rank in range(tp):
        d = Dumper(root, "0.5.23", rank, tp_size=tp)
        sglang_step(d, sum(ids, []), [i for x in ids for i in range(len(x))], [len(x) for x in ids], ["a", "b"], [0, 1])
        for (name, layer) in per_prompt[0][rank]:
            value = torch.cat([pp[rank][(name, layer)] for pp in per_prompt])
            d.dump(name, value, dims=dims.get(name) if dims_in_map else None, layer_id=layer)
        d.step()
    return ids


def test_tp2_unshards_to_the_tp1_dump(tmp_path, llama):
    """Column shards concatenated, row-parallel partial sums added: the TP=2 dump equals the TP=1
    dump within fp32 rounding, and both equal transformers' own modules within it."""
    (tmp_path / "map.toml").write_text(TP_MAP)
    tp_dump(tmp_path / "tp1", llama, 1)
    tp_dump(tmp_path / "tp2", llama, 2)
    for tp in ("tp1", "tp2"):
        import_run(str(tmp_path / tp), str(tmp_path / f"run-{tp}"), map_file=str(tmp_path / "map.toml"))
    one, two = runs.open_run(tmp_path / "run-tp1"), runs.open_run(tmp_path / "run-tp2")
    assert one.manifest["settings"]["ranks"] == 1 and two.manifest["settings"]["ranks"] == 2
    assert len(two.names) == 8 * llama.anatomy.num_layers
    worst = 0.0
    for name in one.names:
        for p in range(2):
            a, b = one.tensor(name, p).double(), two.tensor(name, p).double()
            assert a.shape == b.shape, name
            worst = max(worst, ((a - b).norm() / a.norm()).item())
    assert worst < 1e-6, f"TP=2 un-sharded differs from TP=1 by rel_l2 {worst:.2e}"
    print(f"TP=2 vs TP=1: worst rel_l2 {worst:.2e}")
    mods = (r"model\.layers\.\d+\.self_attn\.(q|o)_proj", r"model\.layers\.\d+\.mlp\.down_proj:input,output")
    extract_model(llama, tmp_path / "hf", PROMPTS[:2], ExtractOptions(points="residual,attn,mlp", batch_size=1,
                                                                     modules=mods))
    report = compare_runs(runs.open_run(tmp_path / "hf"), two, CompareOptions())
    assert report.passed and len(report.rows) == len(two.names), report.skipped
    assert max(r.rel_l2 for r in report.rows) < 1e-5


def test_tp_shards_without_dims_are_refused(tmp_path, llama, capsys):
    tp_dump(tmp_path / "tp2", llama, 2, dims_in_map=False)
    code, _, err = run_cli(capsys, "import", tmp_path / "tp2", "--out", tmp_path / "run",
                           "--map", _write(tmp_path / "map.json", {"rules": [
                               {"match": "q", "name": "model.layers.{layer_id}.self_attn.q_proj:output"}]}))
    assert_one_line_error(code, err, "q (step 0) differs between rank 0 and rank 1 (max |diff|")


def _write(path, data):
    path.write_text(json.dumps(data))
    return path


# ------------------------------------------------------------------------------- pure parts

@pytest.mark.parametrize("stem, expected", [
    ("step=0___rank=1___dump_index=7___name=x___recompute_status=disabled___layer_id=3",
     {"step": "0", "rank": "1", "dump_index": "7", "name": "x", "recompute_status": "disabled", "layer_id": "3"}),
    ("forward_pass_id=None___name=hidden", {"forward_pass_id": "None", "name": "hidden"}),
    ("step=0___name=a=b", {"step": "0", "name": "a=b"}),
    ("model.layers.0.output", None),
    ("step=0___rank=0", None),
])
def test_file_names(stem, expected):
    assert sglang.parse_file_name(stem) == expected


def test_packing_splits_steps_into_prompts():
    steps = [packing.StepTokens(0, (1, 2, 3, 4, 5), (0, 1, 2, 0, 1), (3, 2), ("a", "b")),
             packing.StepTokens(1, (9, 8), (3, 2), (4, 3), ("a", "b")),
             packing.StepTokens(2, (6, 7, 6), (0, 1, 2), (3,), ("a",)),  # pool reuse: a new prompt at 0
             packing.StepTokens(3, (5, 5), (3, 4), (5,), ("a",))]  # a chunk of two: its prefill goes on
    plans, notes = packing.plan_prompts(steps, "skip")
    assert [(p.token_ids, p.pieces) for p in plans] == [([1, 2, 3], [(0, 0, 3)]), ([4, 5], [(0, 3, 5)]),
                                                        ([6, 7, 6, 5, 5], [(2, 0, 3), (3, 0, 2)])]
    assert notes == ["2 decode token(s) skipped (--decode include imports them as further positions)"]
    plans, _ = packing.plan_prompts(steps, "include")
    assert plans[0].token_ids == [1, 2, 3, 9] and plans[0].pieces == [(0, 0, 3), (1, 0, 1)]


@pytest.mark.parametrize("step, fragment", [
    (packing.StepTokens(0, (1, 2, 3), (0, 1, 2), (4,)), "does not fit"),
    (packing.StepTokens(0, (1, 2, 3), (0, 2, 3), (3,)), "are not 0..2"),
    (packing.StepTokens(0, (1, 2, 3), (0, 1, 2), (2, 2)), "request 1 .* does not fit"),
    (packing.StepTokens(0, (1, 2, 3), (0, 2, 1), (3,)), "are not 0..2"),
    (packing.StepTokens(0, (1, 2), (5, 6), (7,), ("x",)), "no earlier step computed its first tokens"),
])
def test_packing_refuses_what_does_not_add_up(step, fragment):
    with pytest.raises(UserError, match=fragment):
        packing.plan_prompts([step])


def test_unshard():
    a, b = torch.arange(6.0).reshape(2, 3), torch.arange(6.0, 12.0).reshape(2, 3)
    pieces = [({"rank": 0, "tp": 0}, a), ({"rank": 1, "tp": 1}, b)]
    assert torch.equal(unshard(pieces, parse_dims("t h[tp]"), "x"), torch.cat([a, b], 1))
    assert torch.equal(unshard(pieces[::-1], parse_dims("t[tp] h"), "x"), torch.cat([a, b], 0))
    assert torch.equal(unshard(pieces, parse_dims("t h[tp:partial]"), "x"), a + b)
    assert torch.equal(unshard([pieces[0], ({"rank": 1, "tp": 1}, a)], parse_dims("t h # tp:replicated"), "x"), a)
    with pytest.raises(UserError, match="a rank is missing"):
        unshard([pieces[1]] * 2, parse_dims("t h[tp]"), "x")
    for bad in ("t h[zz]", "t[cp:zigzag] h", "t h["):
        with pytest.raises(UserError):
            parse_dims(bad)


def test_name_map_file_and_show_map(tmp_path, capsys):
    m = namemap.load_map(_write(tmp_path / "m.json", {"rules": [{"match": r"h(\d+)", "name": r"model.layers.\1:output"}],
                                                      "tokens": {"input_ids": "ids"}}), namemap.sglang_default())
    assert m.lookup("h7") == ("model.layers.7:output", m.rules[0])
    assert m.lookup("layer_output", {"layer_id": "2"})[0] == "model.layers.2:output"  # the built-in rules follow
    assert m.tokens["input_ids"] == "ids"
    with pytest.raises(UserError, match="needs the tag layer_id"):
        m.lookup("layer_output", {})
    code, out, _ = run_cli(capsys, "import", "--show-map")
    assert code == 0 and "extend_default = false" in out and "[[rules]]" in out
    (tmp_path / "shown.toml").write_text(out)
    again = namemap.load_map(tmp_path / "shown.toml")
    assert [(r.match.pattern, r.name, r.combine) for r in again.rules] == \
        [(r.match.pattern, r.name, r.combine) for r in namemap.sglang_default().rules]


@pytest.mark.parametrize("data, fragment", [
    ({"rules": [{"match": "x"}]}, "each rule needs match"),
    ({"rules": [{"match": "(", "name": "a:output"}]}, "bad regular expression"),
    ({"rules": [{"match": "x", "name": "a:output", "combine": "mean"}]}, "the only combination is"),
    ({"rulez": []}, "unknown key 'rulez'"),
    ({"tokens": {"ids": "x"}}, "[tokens] maps"),
])
def test_bad_name_maps(tmp_path, capsys, data, fragment):
    code, _, err = run_cli(capsys, "import", tmp_path, "--out", tmp_path.parent / f"{tmp_path.name}-run", "--map", _write(tmp_path / "m.json", data))
    assert_one_line_error(code, err, fragment)


def test_dump_problems_are_one_line(tmp_path, llama, capsys):
    d = Dumper(tmp_path / "a", "0.5.10")
    d.dump("layer_output", torch.zeros(3, 4), layer_id=0)
    code, _, err = run_cli(capsys, "import", tmp_path / "a", "--out", tmp_path / "r1")
    assert_one_line_error(code, err, "has tensors but no input_ids")
    Dumper(tmp_path / "b", "0.5.10", when=1.0).dump("x", torch.zeros(1))
    Dumper(tmp_path / "b", "0.5.10", when=2.0).dump("x", torch.zeros(1))
    code, _, err = run_cli(capsys, "import", tmp_path / "b", "--out", tmp_path / "r2")
    assert_one_line_error(code, err, "holds 2 dumps")
    d = Dumper(tmp_path / "c", "0.5.10")
    sglang_step(d, [1, 2, 3], [0, 1, 2], [3], ["r"], [0])
    d.dump("layer_output", torch.zeros(4, 8), layer_id=0)
    code, _, err = run_cli(capsys, "import", tmp_path / "c", "--out", tmp_path / "r3")
    assert_one_line_error(code, err, "has shape [4, 8], but the step has 3 tokens")


def test_the_documented_name_map(tmp_path):
    """docs/FORMAT.md's name map example reads and maps as the page says."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "FORMAT.md").read_text()
    block = re.search(r"### The name map\n.*?```toml\n(.*?)```", text, flags=re.S).group(1)
    (tmp_path / "map.toml").write_text(block)
    m = namemap.load_map(tmp_path / "map.toml", namemap.sglang_default())
    name, rule = m.lookup("q", {"layer_id": "3"})
    assert (name, rule.dims) == ("model.layers.3.self_attn.q_proj:output", "t h[tp]")
    assert m.lookup("o_partial", {"layer_id": "0"})[1].dims == "t h[tp:partial]"
    name, rule = m.lookup("non_intrusive__model.layers.12.output.1")
    assert (name, rule.combine) == ("model.layers.12:output", "sum")
    assert m.lookup("layer_output", {"layer_id": "5"})[0] == "model.layers.5:output"  # extend_default = true
    assert m.tokens == {r: r for r in namemap.TOKEN_ROLES}


def test_a_value_missing_from_a_step_is_noted(tmp_path):
    """A chunked prefill over two steps whose layer_output was dumped in the first step only (a
    DUMPER_FILTER, say): the prompt keeps what every step has, the note says what it lacks."""
    d = Dumper(tmp_path / "d", "0.5.10")
    for step, positions in enumerate(([0, 1, 2], [3, 4])):
        sglang_step(d, [7] * len(positions), positions, [positions[-1] + 1], ["r"], [0])
        d.dump("layer_input", torch.ones(len(positions), 4), layer_id=0)
        if step == 0:
            d.dump("layer_output", torch.ones(3, 4), layer_id=0)
        d.step()
    manifest = import_run(str(tmp_path / "d"), str(tmp_path / "run"))
    assert [e["name"] for e in manifest["tensors"]] == ["model.layers.0:input"]
    assert manifest["prompts"][0]["token_ids"] == [7] * 5
    assert "model.layers.0:output was not dumped in every step of prompt(s) 0: not imported for them" in manifest["notes"]
