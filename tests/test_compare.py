"""compare_runs on runs of a toy MoE model: faults at layer k are named at layer k."""

import math
import weakref

import pytest
import torch
from synthetic_runs import LAYERS, PROMPTS, as_version_1, corrupt_tensor, toy_run, toy_tensors, write_toy_run

from layerwise import tensorfile
from layerwise.compare import CompareOptions, compare_runs
from layerwise.errors import UserError
from layerwise.runs import Run
from layerwise.tolerances import DEFAULT_REL_L2, build_tolerances


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return toy_run(tmp_path_factory.mktemp("runs") / "ref")


@pytest.fixture(autouse=True, params=["eager", "batched"])
def metrics_path(request, monkeypatch):
    """Every test twice: tensor metrics measured as each tensor comes (the CPU's path), and
    batched over units as on a GPU (measuring.Batch, metricsbatch.py), here on the CPU, the
    batch measured every 64 KiB of units so that it spans several units and several batches."""
    if request.param == "batched":
        from layerwise import measuring

        monkeypatch.setattr(measuring, "BATCH_DEVICES", ("cuda", "cpu"))
        monkeypatch.setattr(measuring, "BATCH_BYTES", 64 << 10)
    return request.param


def _stats(report):
    return "\n".join(f"{r.name}: rel_l2={r.rel_l2} pass={r.passed}" for r in report.rows)


def test_identical_runs_pass_with_zero_error(ref, tmp_path):
    report = compare_runs(ref, toy_run(tmp_path / "same"))
    assert report.verdict == "pass" and report.first_divergence is None, _stats(report)
    numeric = [r for r in report.rows if r.kind != "routing"]
    assert len(numeric) == 31 - LAYERS and all(r.rel_l2 == 0 and r.max_abs == 0 and r.cosine == 1 for r in numeric)
    assert all(r.routing.same_set == 1.0 and r.routing.flips == 0 for r in report.routing)
    assert report.logits.overall.top1 == 1.0 and report.logits.overall.kl_mean == 0.0
    assert report.prompts == (0, 1) and report.skipped == ()
    sizes = {"float32": 4, "int32": 4}
    assert report.bytes_read == 2 * sum(math.prod(e.shape) * sizes[e.dtype] for e in ref.entries())


@pytest.mark.parametrize("layer", range(LAYERS))
def test_perturbed_layer_is_named_first(ref, tmp_path, layer):
    report = compare_runs(ref, toy_run(tmp_path / "cand", fault=("scale", layer, 1.001)))
    first = report.first_divergence
    assert report.verdict == "fail" and first.layer == layer, _stats(report)
    assert first.name == f"model.layers.{layer}.self_attn:output"
    before = [r for r in report.rows[:report.rows.index(first)] if r.kind != "routing"]
    assert all(r.rel_l2 == 0 for r in before), "nothing before the fault may differ"
    out = next(r for r in report.rows if r.name == f"model.layers.{layer}:output")
    assert out.growth is None, "no error comes into the layer that starts it: no growth to show"


@pytest.mark.parametrize("layer", range(LAYERS))
def test_nan_at_layer_is_named_first(ref, tmp_path, layer):
    report = compare_runs(ref, toy_run(tmp_path / "cand", fault=("nan", layer)))
    first = report.first_divergence
    assert (first.layer, first.name) == (layer, f"model.layers.{layer}.mlp:output"), _stats(report)
    assert first.nan == (0, 2) and first.nonfinite_mismatch == 2
    assert "NaN/Inf where the other run differs" in first.failures[0]


@pytest.mark.parametrize("layer", [0, 2])
def test_renumbered_experts_are_named_at_their_router(ref, tmp_path, layer):
    report = compare_runs(ref, toy_run(tmp_path / "cand", fault=("router", layer)))
    assert report.first_divergence.name == f"model.layers.{layer}.mlp.gate:router_logits", _stats(report)
    routing = next(r for r in report.routing if r.layer == layer).routing
    assert routing.flips > 0 and routing.same_set < 1


def test_bf16_noise_passes_bf16_defaults_and_fails_fp32_defaults(ref, tmp_path):
    bf16 = compare_runs(ref, toy_run(tmp_path / "bf16", dtype=torch.bfloat16))
    assert bf16.verdict == "pass", _stats(bf16)
    assert all(r.tolerance == f"rel_l2<={DEFAULT_REL_L2['bf16']:g}" for r in bf16.rows if r.kind != "routing")
    worst = max(r.rel_l2 for r in bf16.rows if r.rel_l2 is not None)
    assert DEFAULT_REL_L2["fp32"] < worst < DEFAULT_REL_L2["bf16"]
    # the same numbers from a run that says it is fp32: judged by the fp32 default, they fail
    fake = compare_runs(ref, toy_run(tmp_path / "fake", dtype=torch.bfloat16, stored_as=torch.float32))
    assert fake.verdict == "fail" and fake.first_divergence.name == "model.embed_tokens:output", _stats(fake)
    assert fake.first_divergence.tolerance == f"rel_l2<={DEFAULT_REL_L2['fp32']:g}"


def test_rules_change_the_verdict(ref, tmp_path):
    cand = toy_run(tmp_path / "cand", fault=("scale", 2, 1.001))
    loose = CompareOptions(tolerances=build_tolerances(["*=rel_l2<0.1"]))
    assert compare_runs(ref, cand, loose).verdict == "pass"
    # a tighter rule on layer 3 only: layer 2 passes under the loose global limit, layer 3 fails
    mixed = CompareOptions(tolerances=build_tolerances(["model.layers.3*=rel_l2<1e-4"], max_rel_l2=0.1))
    assert compare_runs(ref, cand, mixed).first_divergence.layer == 3
    allclose = CompareOptions(tolerances=build_tolerances(rtol=1e-6, atol=1e-6))
    first = compare_runs(ref, cand, allclose).first_divergence
    assert first.layer == 2 and "break allclose" in first.failures[0]


def test_tokens_diverted_by_a_tie_flip_are_excused_downstream(ref, tmp_path):
    """A near-tie flips one token's experts at layer 1: its MLP output, and everything after it
    for that token, differ a lot. The router scores are within tolerance, the flip is consistent
    with them, so later tensors are judged without that token (ok*) and the runs pass."""
    options = CompareOptions(tolerances=build_tolerances(max_rel_l2=5e-2))
    report = compare_runs(ref, toy_run(tmp_path / "tie", fault=("tie", 1)), options)
    assert report.verdict == "pass", _stats(report)
    routing = next(r for r in report.routing if r.layer == 1).routing
    assert routing.flips >= 1 and routing.flips_inconsistent == 0
    mlp = next(r for r in report.rows if r.name == "model.layers.1.mlp:output")
    assert mlp.excused >= 1 and mlp.rel_l2 > 5e-2, "shown with every token, passed without the diverted ones"
    assert any("pass only without the tokens" in n for n in report.notes)
    strict = compare_runs(ref, toy_run(tmp_path / "tie2", fault=("tie", 1)))
    assert strict.first_divergence.name == "model.layers.1.mlp.gate:router_logits", "fp32: the scores differ"


def test_a_fault_after_a_tie_flip_is_still_found(ref, tmp_path):
    tensors = toy_tensors(fault=("tie", 1))
    later = toy_tensors(fault=("scale", 3, 1.5))
    for p in tensors:  # layer 3 onwards from a faulty layer 3
        for name in tensors[p]:
            if name.startswith("model.layers.3") or name.startswith(("model.norm", "lm_head")):
                tensors[p][name] = later[p][name]
    options = CompareOptions(tolerances=build_tolerances(max_rel_l2=5e-2))
    report = compare_runs(ref, write_toy_run(tmp_path / "c", tensors), options)
    assert report.first_divergence.layer == 3, _stats(report)


def test_common_subset_and_skipped(ref, tmp_path):
    cand = toy_run(tmp_path / "cand", drop=("self_attn", "lm_head"), prompts=PROMPTS[:1])
    report = compare_runs(ref, cand)
    assert report.verdict == "pass" and report.prompts == (0,)
    assert not any("self_attn" in r.name or r.name == "lm_head:output" for r in report.rows)
    assert report.logits is None
    assert report.skipped == ("prompts 1: only in REF", "model.layers.{0-3}.self_attn:output: only in REF",
                              "lm_head:output: only in REF")


def test_prompt_selection(ref, tmp_path):
    report = compare_runs(ref, toy_run(tmp_path / "cand"), CompareOptions(prompts=(1,)))
    assert report.prompts == (1,) and all(len(r.per_prompt) == 1 for r in report.rows)
    with pytest.raises(UserError, match="--prompt-index 5: REF .* has no prompt 5 \\(it has 0-1\\)"):
        compare_runs(ref, toy_run(tmp_path / "cand2"), CompareOptions(prompts=(5,)))


@pytest.mark.parametrize("make, fragment", [
    (lambda d: toy_run(d, prompts=[[5, 9, 2, 7, 1, 3, 8, 0], PROMPTS[1]]),
     "prompt 0 differs between REF and CAND (8 vs 8 tokens, first difference at token 7)"),
    (lambda d: toy_run(d, prompts=[[1, 2], [3]]), "prompt 0 differs"),
    (lambda d: toy_run(d, model={"model_type": "llama", "num_layers": LAYERS}),
     "different models (model_type toy_moe vs llama)"),
    (lambda d: toy_run(d, layers=2), "different models (num_layers 4 vs 2)"),
    (lambda d: write_toy_run(d, {0: {"model.norm:output": torch.zeros(8, 5)}}),
     "has shape [8, 32] in REF but [8, 5] in CAND"),
    (lambda d: write_toy_run(d, {0: {"other:output": torch.zeros(8, 5)}}), "no tensor in common"),
])
def test_runs_that_cannot_be_compared(ref, tmp_path, make, fragment):
    with pytest.raises(UserError) as info:
        compare_runs(ref, make(tmp_path / "cand"))
    assert fragment in str(info.value)


def test_no_common_prompt(ref, tmp_path):
    cand = write_toy_run(tmp_path / "c", {}, prompts=[])
    with pytest.raises(UserError, match="no prompt in common"):
        compare_runs(ref, cand)


def test_baseline_noise_floor(ref, tmp_path):
    cand = toy_run(tmp_path / "cand", fault=("scale", 1, 1.001))
    base = toy_run(tmp_path / "base", dtype=torch.bfloat16, stored_as=torch.float32)  # a noisy rerun of REF
    strict = compare_runs(ref, cand)
    assert strict.verdict == "fail"
    judged = compare_runs(ref, cand, baseline=base)
    assert judged.verdict == "pass", "errors below the reference's own noise floor pass"
    out = next(r for r in judged.rows if r.name == "model.layers.2:output")
    assert out.noise_floor > 0 and out.x_floor == pytest.approx(out.rel_l2 / out.noise_floor)
    tight = compare_runs(ref, cand, CompareOptions(noise_factor=1e-3), baseline=base)
    assert tight.first_divergence.layer == 1
    with pytest.raises(UserError, match="the baseline .* has no prompt 1"):
        compare_runs(ref, cand, baseline=toy_run(tmp_path / "b2", prompts=PROMPTS[:1]))


def test_expert_weights_compared_per_expert_not_per_slot(ref, tmp_path):
    """The order of the top-k ids is not meaningful: slots swapped in ids and weights alike
    compare equal."""
    tensors = toy_tensors()
    for p in tensors:
        for name in ("model.layers.1.mlp.gate:topk_ids", "model.layers.1.mlp.gate:topk_weights"):
            tensors[p][name] = tensors[p][name].flip(-1).contiguous()
    report = compare_runs(ref, write_toy_run(tmp_path / "c", tensors))
    assert report.verdict == "pass", _stats(report)


@pytest.mark.parametrize("streamed", [False, True])
def test_a_digest_mismatch_names_the_file(tmp_path, monkeypatch, streamed):
    """Read whole or streamed in pieces (readahead, let onto the CPU here), the same error."""
    if streamed:
        from layerwise import readahead

        for name, value in (("STREAM_DEVICES", ("cpu",)), ("STREAM_BYTES", 1), ("STREAM_PIECE", 40)):
            monkeypatch.setattr(readahead, name, value)
    ref = toy_run(tmp_path / "ref")
    cand = toy_run(tmp_path / "cand")
    path = corrupt_tensor(cand, "model.layers.2:output", 1)
    with pytest.raises(UserError, match=f"in {path} fails its digest check"):
        compare_runs(ref, cand)
    assert compare_runs(ref, cand, CompareOptions(verify=False)).verdict == "fail"


@pytest.mark.parametrize("digest", ["blake3", "sha256_tree"])
def test_a_version_1_run_compares_as_before(tmp_path, monkeypatch, digest):
    """A run of format version 1 (plain sha256 of every tensor, whatever its size) against one of
    this version (blake3) and one of version 2, whose tensors span several chunks of the sha256
    tree: verified, equal, and a flipped bit caught."""
    monkeypatch.setattr(tensorfile, "HASH_CHUNK", 64)  # the toy tensors span up to 64 chunks
    monkeypatch.setattr(tensorfile, "DIGEST", digest)
    new = toy_run(tmp_path / "new")
    old = as_version_1(toy_run(tmp_path / "old"))
    assert {e.digests[0][0] for e in new.entries()} == {digest} and old.manifest["format_version"] == 1
    for report in (compare_runs(new, old), compare_runs(old, new)):
        assert report.verdict == "pass" and all(r.rel_l2 == 0 for r in report.rows if r.kind != "routing"), \
            _stats(report)
    path = corrupt_tensor(old, "model.layers.2:output", 1)
    with pytest.raises(UserError, match=f"in {path} fails its digest check"):
        compare_runs(new, old)


@pytest.mark.parametrize("prefetch, ahead, limit", [(False, 1 << 30, 1), (True, 1, 2), (True, 1 << 30, 10**6)])
def test_streams_a_bounded_number_of_tensors(ref, tmp_path, monkeypatch, metrics_path, prefetch, ahead, limit):
    """Memory: without prefetch one reading unit (one tensor, or one router's three) per run is
    alive; with it, the units read ahead stop at the byte window (1 byte: one unit ahead). A batch
    (as on a GPU) holds the units it has not measured yet besides, up to BATCH_BYTES and one unit."""
    from layerwise import measuring, readahead

    monkeypatch.setattr(readahead, "READ_AHEAD_BYTES", ahead)
    cand = toy_run(tmp_path / "cand")
    alive, peak, held, peak_held, largest = [0], [0], [0], [0], [0]
    read = Run.tensor

    def counting(self, name, prompt=0, verify=True, device="cpu"):
        t = read(self, name, prompt, verify, device)
        nbytes = t.numel() * t.element_size()
        alive[0] += 1
        held[0] += nbytes
        peak[0], peak_held[0], largest[0] = max(peak[0], alive[0]), max(peak_held[0], held[0]), max(largest[0], nbytes)

        def gone():
            alive[0] -= 1
            held[0] -= nbytes
        weakref.finalize(t, gone)
        return t

    monkeypatch.setattr(Run, "tensor", counting)
    compare_runs(ref, cand, CompareOptions(prefetch=prefetch))
    if metrics_path == "eager":
        assert 2 <= peak[0] <= limit * 2 * 3, f"peak {peak[0]} tensors alive"
    else:
        unit = 2 * 3 * largest[0]
        assert peak[0] > limit * 2 * 3 or limit > 10, "the batch should hold several units"
        assert peak_held[0] <= measuring.BATCH_BYTES + unit * (min(limit, 10**3) + 1), f"peak {peak_held[0]} bytes"
    assert alive[0] == 0


class _Ranks:
    """torchrun's ranks, played in one process: rank `rank` of `world`; rank 0's gather returns
    what every rank handed in (the others run first)."""

    def __init__(self, rank: int, world: int, handed: dict):
        self.rank, self.world, self.handed = rank, world, handed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def gather(self, obj):
        self.handed[self.rank] = obj
        return [self.handed[r] for r in range(self.world)] if self.is_main else None


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_share_the_prompts_and_rank_0_reports_as_one_process(ref, tmp_path, world):
    """Each rank measures a block of the prompts (with 3 ranks and 2 prompts, rank 0 none); rank 0's
    report equals one process's, the tokens a tie flip diverts excused as before."""
    from layerwise.report import report_json

    options = CompareOptions(tolerances=build_tolerances(max_rel_l2=5e-2))
    cand = toy_run(tmp_path / "tie", fault=("tie", 1))
    one = compare_runs(ref, cand, options)
    handed: dict = {}
    for rank in reversed(range(world)):
        got = compare_runs(ref, cand, options, ranks=_Ranks(rank, world, handed))
        assert (got is None) == (rank != 0)
    measured = [sorted({res.prompt for results in handed[rank][0].values() for res in results}) for rank in range(world)]
    assert measured == ([[0], [1]] if world == 2 else [[], [0], [1]]), measured

    def same(report):
        data = report_json(report)
        del data["stats"]["seconds"], data["stats"]["gb_per_s"]
        return data

    assert same(got) == same(one) and got.verdict == "pass" and got.bytes_read == one.bytes_read
    assert next(r for r in got.rows if r.name == "model.layers.1.mlp:output").excused >= 1
