"""Fault injection through real extracts: a fault at layer k is named at layer k, on the tiny
MiniMax-M2, tiny Llama, tiny Qwen3-MoE and the real SmolLM2; fp32 against bf16 of MiniMax-M2;
an imported run against an extracted one."""

import contextlib

import numpy as np
import pytest
import torch

from layerwise import loading
from layerwise.compare import CompareOptions, compare_runs
from layerwise.extract import ExtractOptions, extract_model
from layerwise.importer import import_run
from layerwise.runs import open_run
from layerwise.tolerances import DEFAULT_REL_L2, build_tolerances

# token ids (no tokenizer needed); batched two at a time, so padding is exercised
PROMPTS = [[84, 104, 101, 32, 99, 97, 112, 105, 116, 97, 108, 32, 111, 102], [72, 105, 33, 50, 51],
           list(range(40, 100, 3))]
POINTS = ExtractOptions(points="embed,residual,attn,mlp,router,norm,logits", batch_size=2, overwrite=True)


def _load(spec: str, dtype: str = "fp32"):
    return loading.load_model(spec, loading.LoadOptions(dtype=dtype, device_map="cpu", attn_implementation="sdpa"),
                              with_tokenizer=False)


@contextlib.contextmanager
def fault(model, kind: str, k: int, ref=None):
    """Break decoder layer k in place, restore it afterwards."""
    layer = model.model.layers[k]
    saved = {n: p.detach().clone() for n, p in layer.named_parameters()}
    with torch.no_grad():
        if kind == "scale":  # a small factor on one weight
            layer.self_attn.o_proj.weight.mul_(1.01)
        elif kind == "nan":
            layer.self_attn.o_proj.weight[0, 0] = float("nan")
        elif kind == "swap":  # two experts trade weights; the router is untouched
            i, j = _experts_to_swap(ref, k)
            for p in layer.mlp.experts.parameters():
                p[[i, j]] = p[[j, i]].clone()
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in layer.named_parameters():
                p.copy_(saved[n])


def _experts_to_swap(ref, k: int) -> tuple[int, int]:
    """The most used expert and another that some token chooses without it (so the swap shows)."""
    ids = torch.cat([ref.tensor(f"model.layers.{k}.mlp.gate:topk_ids", p) for p in range(len(PROMPTS))]).long()
    order = torch.bincount(ids.flatten()).argsort(descending=True).tolist()
    i = order[0]
    return i, next(j for j in order[1:] if ((ids == i).any(1) ^ (ids == j).any(1)).any())


def _table(report) -> str:
    return "\n".join(f"{r.name}: rel_l2={r.rel_l2} pass={r.passed}" for r in report.rows)


CASES = [(spec, kind, k) for spec, kinds in (("builtin:minimax-m2-tiny", ("scale", "nan", "swap")),
                                             ("builtin:llama-tiny", ("scale", "nan")),
                                             ("builtin:qwen3-moe-tiny", ("swap",)))
         for kind in kinds for k in range(4)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Each tiny model loaded once in fp32, with its reference run."""
    cache = {}

    def get(spec):
        if spec not in cache:
            loaded = _load(spec)
            path = tmp_path_factory.mktemp("ref") / spec.split(":")[1]
            extract_model(loaded, path, PROMPTS, POINTS)
            cache[spec] = (loaded, open_run(path))
        return cache[spec]

    return get


@pytest.mark.parametrize("spec, kind, k", CASES)
def test_fault_at_layer_k_is_named_first(tiny, tmp_path, spec, kind, k):
    loaded, ref = tiny(spec)
    with fault(loaded.model, kind, k, ref):
        extract_model(loaded, tmp_path / "cand", PROMPTS, POINTS)
    report = compare_runs(ref, open_run(tmp_path / "cand"))
    first = report.first_divergence
    expected = f"model.layers.{k}.mlp:output" if kind == "swap" else f"model.layers.{k}.self_attn:output"
    assert report.verdict == "fail" and first.name == expected, _table(report)
    assert all(r.rel_l2 in (0.0, None) for r in report.rows if r.layer is not None and r.layer < k), \
        "nothing before layer k may differ"
    if kind == "swap":
        routing = next(r for r in report.routing if r.layer == k).routing
        assert routing.flips == 0, "the router did not change: the experts' outputs did"


@pytest.mark.parametrize("kind, k", [("scale", 0), ("scale", 15), ("nan", 29)])
def test_fault_in_smollm2(smollm2_fp32, tmp_path, kind, k):
    """The real trained model (30 layers): same property."""
    points = ExtractOptions(points="residual,attn,mlp,norm,logits", batch_size=2, overwrite=True)
    extract_model(smollm2_fp32, tmp_path / "ref", PROMPTS, points)
    with fault(smollm2_fp32.model, kind, k):
        extract_model(smollm2_fp32, tmp_path / "cand", PROMPTS, points)
    report = compare_runs(open_run(tmp_path / "ref"), open_run(tmp_path / "cand"))
    assert report.first_divergence.name == f"model.layers.{k}.self_attn:output", _table(report)


def test_minimax_fp32_against_bf16(tmp_path):
    """The same tiny MiniMax-M2 in fp32 and in bf16: bf16-level differences (and a routing flip
    at a near-tie) pass under the bf16 defaults and fail under the fp32 ones."""
    extract_model(_load("builtin:minimax-m2-tiny", "fp32"), tmp_path / "fp32", PROMPTS, POINTS)
    extract_model(_load("builtin:minimax-m2-tiny", "bf16"), tmp_path / "bf16", PROMPTS, POINTS)
    ref, cand = open_run(tmp_path / "fp32"), open_run(tmp_path / "bf16")
    report = compare_runs(ref, cand)
    assert report.verdict == "pass", _table(report)
    assert report.dtypes == ("float32", "bfloat16")
    assert {r.tolerance for r in report.rows if r.kind != "routing"} == {f"rel_l2<={DEFAULT_REL_L2['bf16']:g}"}
    assert max(r.rel_l2 for r in report.rows if r.rel_l2 is not None) > DEFAULT_REL_L2["fp32"]
    assert all(r.routing.flips_inconsistent == 0 for r in report.routing)
    strict = compare_runs(ref, cand, CompareOptions(tolerances=build_tolerances(max_rel_l2=DEFAULT_REL_L2["fp32"])))
    assert strict.verdict == "fail" and strict.first_divergence.layer == 0, _table(strict)


def test_imported_hidden_states_equal_the_extracted_run(tmp_path):
    """transformers' output_hidden_states saved as .npy and imported compare exactly equal to
    layerwise's own extract of the same model and prompts."""
    loaded = _load("builtin:llama-tiny")
    # one prompt per forward pass, as below: the same shapes, the same kernels, the same bits
    extract_model(loaded, tmp_path / "extracted", PROMPTS, ExtractOptions(points="residual,norm", batch_size=1))
    n = loaded.anatomy.num_layers
    for p, tokens in enumerate(PROMPTS):
        with torch.inference_mode():
            hidden = loaded.model(torch.tensor([tokens]), output_hidden_states=True).hidden_states
        folder = tmp_path / "npy" / str(p)
        folder.mkdir(parents=True)
        np.save(folder / "tokens.npy", np.array(tokens))
        for k in range(n):
            np.save(folder / f"model.layers.{k}.input.npy", hidden[k].numpy())  # [1, seq, hidden] is accepted
            if k < n - 1:  # transformers' last hidden state is after the final norm
                np.save(folder / f"model.layers.{k}.output.npy", hidden[k + 1].numpy())
        np.save(folder / "model.norm.output.npy", hidden[n].numpy())
    import_run(str(tmp_path / "npy"), str(tmp_path / "imported"))
    report = compare_runs(open_run(tmp_path / "extracted"), open_run(tmp_path / "imported"))
    assert report.verdict == "pass" and len(report.rows) == 2 * n
    assert all(r.rel_l2 == 0 and r.max_abs == 0 for r in report.rows), _table(report)
    assert report.skipped == (f"model.layers.{n - 1}:output: only in REF",)
