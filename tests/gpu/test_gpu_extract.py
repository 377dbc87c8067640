"""On real GPUs: async capture over several GPUs is bit-identical to transformers' own hidden states."""

import pytest
import torch

import helpers
from layerwise import loading, runs
from layerwise.extract import ExtractOptions, extract_model

pytestmark = pytest.mark.gpu

PROMPTS = helpers.PROMPTS[:2] + ["a b c d e f g h i j k l m n o p q r s t u v w x y z " * 8]  # one long prompt


def need_gpus(n):
    if torch.cuda.device_count() < n:
        pytest.skip(f"needs {n} GPUs")


@pytest.mark.parametrize("device_map, budget_gib", [("balanced", 4.0), ("balanced", 0.0001), ("cuda:0", 4.0)])
def test_capture_over_gpus_matches_output_hidden_states(tmp_path, device_map, budget_gib):
    need_gpus(2 if device_map == "balanced" else 1)
    loaded = loading.load_model("builtin:minimax-m2-tiny", loading.LoadOptions(dtype="bf16", device_map=device_map,
                                                                                tokens=512))
    if device_map == "balanced":
        assert len({str(p.device) for p in loaded.model.parameters()}) >= 2, "the tiny model must really be split"
    # a near-zero pinned budget forces every hook to wait for buffers: backpressure must not corrupt data
    extract_model(loaded, tmp_path / "run", PROMPTS,
                  ExtractOptions(points="embed,residual,attn,mlp,router,norm,logits", batch_size=3,
                                 pinned_budget_gib=budget_gib))
    run = runs.open_run(tmp_path / "run")
    tok = loaded.tokenizer
    enc = tok(PROMPTS, padding=True, return_tensors="pt", padding_side="right").to(loaded.input_device)
    with torch.inference_mode():
        out = loaded.model(**enc, output_hidden_states=True, use_cache=False)
    layers = loaded.anatomy.num_layers
    for p, n in enumerate(enc.attention_mask.sum(1).tolist()):
        for k in range(layers - 1):
            assert torch.equal(run.tensor(f"model.layers.{k}:output", p), out.hidden_states[k + 1][p, :n].cpu()), (p, k)
        assert torch.equal(run.tensor("model.norm:output", p), out.hidden_states[layers][p, :n].cpu())
        assert torch.equal(run.tensor("lm_head:output", p), out.logits[p, :n].cpu())


def test_placement_rows_have_live_memory():
    need_gpus(1)
    loaded = loading.load_model("builtin:minimax-m2-tiny", loading.LoadOptions(device_map="cuda:0", tokens=64),
                                with_tokenizer=False)
    row = loading.placement_rows(loaded)[0]
    assert row.device == "cuda:0" and row.allocated_bytes >= row.weight_bytes and row.total_bytes > 10**9


def test_streamed_extract_on_gpu_equals_whole_model(tmp_path, monkeypatch):
    """Layer reads go through pinned staging and a side stream while the previous layer computes
    (and its raw weights are freed): the result must still be bit-identical. Small chunks force
    many staged copies per layer."""
    need_gpus(1)
    from layerwise import tensorfile
    from layerwise.streaming import StreamOptions, stream_extract

    monkeypatch.setattr(tensorfile, "_CHUNK", 4096)
    options = ExtractOptions(points="embed,residual,attn,mlp,router,norm,logits", batch_size=3)
    loaded = loading.load_model("builtin:minimax-m2-tiny", loading.LoadOptions(dtype="bf16", device_map="cuda:0",
                                                                                tokens=512))
    extract_model(loaded, tmp_path / "full", PROMPTS, options)
    stream_extract("builtin:minimax-m2-tiny", tmp_path / "stream", PROMPTS, options,
                   StreamOptions(device="cuda:0", dtype="bf16"))
    helpers.assert_runs_equal(runs.open_run(tmp_path / "full"), runs.open_run(tmp_path / "stream"))
    helpers.assert_stream_timeline(runs.open_run(tmp_path / "stream").manifest["stats"], 4)  # compute: GPU events


def test_nan_inf_looked_for_on_the_gpu_are_counted_as_on_the_cpu(tmp_path, monkeypatch):
    """helpers.nan_inf_found_by_the_capture_as_by_the_writer on the GPU: the sums on the copy stream."""
    need_gpus(1)
    helpers.nan_inf_found_by_the_capture_as_by_the_writer(tmp_path, monkeypatch, PROMPTS, "cuda:0", "bf16")


def test_staging_buffers_are_page_locked_copy_as_such_and_are_unpinned_at_a_command_s_end():
    """The readers' staging buffers are registered shared regions (a power of two), the source of
    asynchronous copies as torch's pinned memory is; `unpin_all` (a command's end) makes them
    pageable, and a buffer asked for afterwards is page-locked again (a new region)."""
    from layerwise import shmbuffers

    staging = shmbuffers.locked_buffer(3 << 20)
    assert staging.numel() == 4 << 20 and staging.is_pinned()
    staging.copy_(torch.arange(staging.numel(), dtype=torch.int32).to(torch.uint8))
    on_device = torch.empty(staging.numel(), dtype=torch.uint8, device="cuda")
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        on_device.copy_(staging, non_blocking=True)
    side.synchronize()
    assert torch.equal(on_device.cpu(), staging)
    assert shmbuffers.unpin_all() >= staging.numel() and not staging.is_pinned()
    again = shmbuffers.locked_buffer(3 << 20)
    assert again.is_pinned() and again.data_ptr() != staging.data_ptr()
