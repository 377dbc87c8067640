"""What two runs can be compared, decided from their manifests alone."""

import math

import pytest
import torch
from synthetic_runs import LAYERS, PROMPTS, toy_run, toy_tensors, write_toy_run

from layerwise.align import align_runs
from layerwise.errors import UserError
from layerwise.names import model_order_key


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    return toy_run(tmp_path_factory.mktemp("runs") / "ref")


def test_same_runs_align_completely_in_model_order(ref, tmp_path):
    plan = align_runs(ref, toy_run(tmp_path / "cand"))
    assert plan.prompts == (0, 1) and plan.skipped == ()
    assert list(plan.names) == sorted(ref.names, key=model_order_key) == ref.names
    assert all(plan.pairs[p] == set(ref.names) for p in plan.prompts)
    sizes = {"float32": 4, "int32": 4}
    assert plan.total_bytes == 2 * sum(math.prod(e.shape) * sizes[e.dtype] for e in ref.entries())


def test_a_baseline_adds_its_bytes_and_must_hold_the_prompts(ref, tmp_path):
    base = toy_run(tmp_path / "base")
    plan = align_runs(ref, toy_run(tmp_path / "cand"), base)
    assert plan.total_bytes == 3 * sum(e.nbytes for e in ref.entries())
    with pytest.raises(UserError, match="the baseline .* has no prompt 1"):
        align_runs(ref, toy_run(tmp_path / "cand2"), toy_run(tmp_path / "b2", prompts=PROMPTS[:1]))
    with pytest.raises(UserError, match="REF and BASELINE are runs of different models"):
        align_runs(ref, toy_run(tmp_path / "cand3"), toy_run(tmp_path / "b3", layers=2))


def test_what_one_run_lacks_is_skipped_per_layer_range(ref, tmp_path):
    cand = toy_run(tmp_path / "cand", drop=("mlp.gate", "model.layers.3:"))
    plan = align_runs(ref, cand)
    assert "model.layers.0.mlp.gate:router_logits" not in plan.names
    assert "model.layers.{0-3}.mlp.gate:topk_ids: only in REF" in plan.skipped
    assert "model.layers.3:input: only in REF" in plan.skipped and "model.layers.3:output: only in REF" in plan.skipped


def test_prompt_selection_keeps_the_order_asked(ref, tmp_path):
    plan = align_runs(ref, toy_run(tmp_path / "cand"), prompts=(1, 0))
    assert plan.prompts == (1, 0)
    with pytest.raises(UserError, match=r"CAND \(.*\) has no prompt 1 \(it has 0\)"):
        align_runs(ref, toy_run(tmp_path / "one", prompts=PROMPTS[:1]), prompts=(1,))


def test_padding_tails_are_never_compared(ref, tmp_path):
    tensors = toy_tensors()
    tensors[1]["model.layers.0:input_padding"] = torch.zeros(2, 32)
    plan = align_runs(ref, write_toy_run(tmp_path / "cand", tensors))
    assert "model.layers.0:input_padding" not in plan.names and plan.skipped == ()


def test_prompts_without_token_ids_are_matched_by_text(tmp_path):
    tensors = {0: {"lm_head:output": torch.zeros(3, 4)}}
    a = write_toy_run(tmp_path / "a", tensors, prompts=[[1, 2, 3]], layers=LAYERS)
    b = write_toy_run(tmp_path / "b", tensors, prompts=[[1, 2, 3]], layers=LAYERS)
    for run in (a, b):
        for prompt in run.manifest["prompts"]:
            prompt.pop("token_ids")
    assert align_runs(a, b).prompts == (0,)
    b.manifest["prompts"][0]["text"] = "another text"
    with pytest.raises(UserError, match="prompt 0 differs between REF and CAND \\(texts differ\\)"):
        align_runs(a, b)
