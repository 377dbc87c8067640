"""Layer replay against reference runs made by transformers' own forward (tests/reference_runs.py)."""

import json

import pytest
import torch

from layerwise import open_run, replay
from layerwise.errors import UserError
from layerwise.replay import ReplayOptions

from helpers import assert_runs_equal, copy_checkpoint, rel_l2
from reference_runs import PROMPTS, make_reference_run

MINIMAX = "builtin:minimax-m2-tiny"


def output_errors(reference, candidate, layers) -> list[float]:
    """Worst rel_l2 over prompts of each layer's output."""
    return [max(rel_l2(candidate.tensor(f"model.layers.{k}:output", p["index"]),
                       reference.tensor(f"model.layers.{k}:output", p["index"])) for p in reference.prompts)
            for k in layers]


def assert_identical(reference, candidate) -> None:
    """Every tensor the candidate holds that the reference holds too is bit-identical."""
    common = set(candidate.names) & set(reference.names)
    assert assert_runs_equal(candidate, reference, names=common) >= len(reference.prompts) * 2


@pytest.fixture(scope="module")
def minimax_fp32_ref(tmp_path_factory):
    return make_reference_run(MINIMAX, tmp_path_factory.mktemp("ref") / "fp32", "fp32", "sdpa")


@pytest.mark.parametrize("dtype, attn", [("fp32", "sdpa"), ("bf16", "eager"), ("bf16", "sdpa")])
def test_reference_settings_give_zero_error_on_every_layer(tmp_path, dtype, attn):
    reference = make_reference_run(MINIMAX, tmp_path / "ref", dtype, attn)
    result = replay.replay(MINIMAX, reference.path, list(range(4)), isolated=tmp_path / "iso",
                           chained=tmp_path / "chain")
    assert result.settings["dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    assert result.settings["attn_implementation"] == attn
    isolated, chained = open_run(result.isolated), open_run(result.chained)
    # Every layer output, attention and MoE output, router logits, top-k ids and weights: bit-identical.
    assert {"model.layers.2.self_attn:output", "model.layers.2.mlp:output", "model.layers.2.mlp.gate:topk_ids",
            "model.layers.2.mlp.gate:router_logits", "model.layers.2.mlp.gate:topk_weights"} <= set(isolated.names)
    assert_identical(reference, isolated)
    assert_identical(reference, chained)
    assert isolated.manifest["settings"]["replay"] == "isolated" and isolated.prompts == reference.prompts


def test_multi_range_chains_from_first_layer(tmp_path, minimax_fp32_ref):
    result = replay.replay(MINIMAX, minimax_fp32_ref.path, [1, 2], chained=tmp_path / "chain")
    run = open_run(result.chained)
    assert {n.split(":")[0] for n in run.names} >= {"model.layers.1", "model.layers.2"}
    assert not any(n.startswith("model.layers.0") or n.startswith("model.layers.3") for n in run.names)
    assert_identical(minimax_fp32_ref, run)
    stats = run.manifest["stats"]  # where the time went, by phase of the schedule's thread
    assert stats["build_seconds"] > 0 and stats["compute_seconds"] > 0 and stats["read_wait_seconds"] >= 0, stats
    # and when, per layer: every layer read (on the reader thread), waited for, built and computed
    timeline = stats["timeline"]
    # the warm-up and rehearsal on a thread of their own; the chain's first inputs read ahead (layer 1's
    # only: a chained test replays later layers on their predecessors' outputs)
    assert {(phase, layer) for phase, layer, _, _ in timeline} == {
        (phase, layer) for phase in ("read", "read_wait", "build", "compute") for layer in (1, 2)} | {
        ("warm", 1), ("rehearse", 1), ("warm_wait", 1), ("read_inputs", 1)}, timeline
    assert all(0 <= start <= end for _, _, start, end in timeline) and stats["timeline_origin_unix"] > 1.7e9
    spans = {(phase, layer): (start, end) for phase, layer, start, end in timeline}
    assert spans[("read", 1)][1] <= spans[("build", 1)][0] and spans[("build", 1)][1] <= spans[("compute", 1)][0]
    assert spans[("read", 2)][0] <= spans[("build", 1)][1]  # layer 2's read began before layer 1 was built


@pytest.mark.slow
def test_smollm2_every_layer_zero_error(tmp_path, smollm2_fp32):
    prompts = [{"index": 0, "text": "The capital of France is", "token_ids": [504, 3575, 282, 4649, 314]}]
    reference = make_reference_run("builtin:smollm2", tmp_path / "ref", "fp32", "sdpa", prompts, loaded=smollm2_fp32)
    result = replay.replay("builtin:smollm2", reference.path, list(range(30)), isolated=tmp_path / "iso")
    assert_identical(reference, open_run(result.isolated))


def _perturb(src, dst, tensor: str, scale: float) -> str:
    """A copy of a checkpoint with one tensor scaled: a 'broken port' of that layer."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    ckpt = copy_checkpoint(src, dst)
    shard = ckpt / json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"][tensor]
    with safe_open(str(shard), "pt") as fh:
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        metadata = fh.metadata()
    tensors[tensor] = (tensors[tensor].float() * scale).to(tensors[tensor].dtype)
    save_file(tensors, str(shard), metadata=metadata)
    return str(ckpt)


def test_perturbed_layer_fails_alone_isolated_and_onward_propagated(tmp_path, tiny_minimax, minimax_fp32_ref):
    broken = _perturb(tiny_minimax.path, tmp_path / "broken", "model.layers.2.self_attn.o_proj.weight", 1.05)
    result = replay.replay(broken, minimax_fp32_ref.path, list(range(4)), isolated=tmp_path / "iso",
                           chained=tmp_path / "chain")
    isolated = output_errors(minimax_fp32_ref, open_run(result.isolated), range(4))
    propagated = output_errors(minimax_fp32_ref, open_run(result.chained), range(4))
    table = "\n".join(f"layer {k}: isolated {i:.2e} propagated {p:.2e}"
                      for k, (i, p) in enumerate(zip(isolated, propagated)))
    assert [k for k, e in enumerate(isolated) if e > 1e-6] == [2], table
    assert [k for k, e in enumerate(propagated) if e > 1e-6] == [2, 3], table
    assert isolated[2] > 1e-3, table


def test_from_scratch_candidate_passes_within_fp32_tolerance(tmp_path, minimax_fp32_ref):
    result = replay.replay(MINIMAX, minimax_fp32_ref.path, list(range(4)),
                           ReplayOptions(candidate="reference_minimax:factory"),
                           isolated=tmp_path / "iso")
    errors = output_errors(minimax_fp32_ref, open_run(result.isolated), range(4))
    assert max(errors) < 1e-6, errors
    assert open_run(result.isolated).manifest["settings"]["candidate"] == "reference_minimax:factory"


def hf_layer(config, layer_index, weights):
    """A candidate built from transformers' own layer class and the weights it is given."""
    from transformers.models.minimax_m2.modeling_minimax_m2 import MiniMaxM2DecoderLayer

    with torch.device("meta"):
        layer = MiniMaxM2DecoderLayer(config, layer_index)
    layer.load_state_dict(weights, assign=True)
    return layer


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_factory_gets_the_candidate_attention_implementation(tmp_path, attn):
    """A factory building transformers' modules must run the chosen attention with its own mask
    (eager given sdpa's None mask would attend to the future)."""
    reference = make_reference_run(MINIMAX, tmp_path / "ref", "fp32", attn, PROMPTS[:1])
    result = replay.replay(MINIMAX, reference.path, [0, 3], ReplayOptions(candidate="test_replay:hf_layer"),
                           isolated=tmp_path / "iso")
    assert output_errors(reference, open_run(result.isolated), [0, 3]) == [0.0, 0.0]


@pytest.mark.parametrize("factory, threshold", [("full_rope_factory", 1e-2), ("bf16_router_factory", 3e-5)])
def test_wrong_candidates_fail_on_every_layer(tmp_path, minimax_fp32_ref, factory, threshold):
    result = replay.replay(MINIMAX, minimax_fp32_ref.path, list(range(4)),
                           ReplayOptions(candidate=f"reference_minimax:{factory}"), isolated=tmp_path / "iso")
    errors = output_errors(minimax_fp32_ref, open_run(result.isolated), range(4))
    assert min(errors) > threshold, errors


@pytest.mark.parametrize("source, fragment", [
    ("no_such_module_xyz:factory", "cannot import no_such_module_xyz (ModuleNotFoundError"),
    ("reference_minimax:nothing", "reference_minimax has no attribute nothing"),
    ("reference_minimax:math", "math is a module, not callable"),
    ("reference_minimax", "must be package.module:factory"),
    ("/no/such/file.py:f", "does not exist"),
])
def test_candidate_that_cannot_be_used(source, fragment):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(")):
        replay.load_candidate(source)


def test_candidate_from_a_file(tmp_path):
    path = tmp_path / "my_layer.py"
    path.write_text("def make(config, layer_index, weights):\n    return layer_index\n")
    assert replay.load_candidate(f"{path}:make")(None, 3, {}) == 3


@pytest.mark.parametrize("body, fragment", [
    ("return torch.nn.Identity() if False else 7", "returned int for layer 0, not a torch.nn.Module"),
    ("return Half()", "make: layer 0 returned (1, 11, 32) for an input of shape (1, 11, 64)"),
])
def test_candidate_with_wrong_result(tmp_path, minimax_fp32_ref, monkeypatch, body, fragment):
    name = f"bad_layer_{len(body)}"  # a fresh module per case (imports are cached)
    (tmp_path / f"{name}.py").write_text(
        "import torch\n"
        "class Half(torch.nn.Module):\n"
        "    def forward(self, hidden_states, **kw):\n"
        "        return hidden_states[..., :32]\n"
        f"def make(config, layer_index, weights):\n    {body}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        replay.replay(MINIMAX, minimax_fp32_ref.path, [0], ReplayOptions(candidate=f"{name}:make"),
                      isolated=tmp_path / "iso")
    assert not (tmp_path / "iso" / "manifest.json").exists()


def test_reference_from_another_model(tmp_path, minimax_fp32_ref):
    with pytest.raises(UserError, match="made from a minimax_m2 model, not llama"):
        replay.replay("builtin:llama-tiny", minimax_fp32_ref.path, [0], isolated=tmp_path / "iso")


def test_reference_with_another_config(tmp_path, tiny_minimax, minimax_fp32_ref):
    ckpt = copy_checkpoint(tiny_minimax.path, tmp_path / "m")
    config = json.loads((ckpt / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="made from another model config .* --allow-config-mismatch"):
        replay.replay(str(ckpt), minimax_fp32_ref.path, [0], isolated=tmp_path / "iso")
    result = replay.replay(str(ckpt), minimax_fp32_ref.path, [0], ReplayOptions(allow_config_mismatch=True),
                           isolated=tmp_path / "iso")
    assert "allowed" in result.notes[0]


def test_reference_without_the_layer_input(tmp_path):
    reference = make_reference_run(MINIMAX, tmp_path / "ref", "fp32", "sdpa", PROMPTS[:1], internals=False)
    manifest = json.loads((reference.path / "manifest.json").read_text())
    manifest["tensors"] = [t for t in manifest["tensors"] if t["name"] != "model.layers.3:input"]
    (reference.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="has no model.layers.3:input for prompt 0: re-extract"):
        replay.replay(MINIMAX, reference.path, [3], isolated=tmp_path / "iso")
    # A chain needs only its first layer's input.
    replay.replay(MINIMAX, reference.path, [2, 3], chained=tmp_path / "chain")


# Prompts of different lengths: batches of 3 pad their shorter rows, and MoE layers route the
# padding positions too (which changes expert group sizes, and on the CPU the bits of real rows).
UNEVEN = ["The capital of France is", "Hi", "a b c d e f g h i j k l m n o p q r s t", "Paris is a city",
          "x", "one two three four five six"]


@pytest.mark.parametrize("spec, dtype, batch_size, stream", [
    (MINIMAX, "fp32", 3, False), (MINIMAX, "fp32", 1, False), (MINIMAX, "bf16", 4, True),
    ("builtin:qwen3-moe-tiny", "fp32", 3, True), ("builtin:llama-tiny", "bf16", 6, False)])
def test_self_test_is_exact_for_every_extract_mode(tmp_path, spec, dtype, batch_size, stream):
    """A model replayed against its own extract (whole-model or streamed, any batch size): every
    isolated and chained tensor is bit-identical, and the kernels were checked deterministic."""
    from layerwise import loading
    from layerwise.extract import ExtractOptions, extract_model
    from layerwise.streaming import StreamOptions, stream_extract

    options = ExtractOptions(points="residual,attn,mlp,router", batch_size=batch_size)
    if stream:
        stream_extract(spec, tmp_path / "ref", UNEVEN, options, StreamOptions(dtype=dtype))
    else:
        extract_model(loading.load_model(spec, loading.LoadOptions(dtype=dtype)), tmp_path / "ref", UNEVEN, options)
    reference = open_run(tmp_path / "ref")
    result = replay.replay(spec, reference, list(range(4)), isolated=tmp_path / "iso", chained=tmp_path / "chain")
    assert result.deterministic is True and not result.notes, result.notes
    for kind in ("iso", "chain"):
        run = open_run(tmp_path / kind)
        missing = [n for n in run.names if n not in reference.names]
        assert not missing, missing
        assert assert_runs_equal(run, reference, names=run.names) > 4 * len(UNEVEN) * 2, kind


def test_reference_without_padding_tails_says_so(tmp_path):
    """A run made before padding tails were recorded still replays; the result says why padded
    MoE rows may differ by rounding."""
    from layerwise import loading
    from layerwise.extract import ExtractOptions, extract_model

    extract_model(loading.load_model(MINIMAX, loading.LoadOptions(dtype="fp32")), tmp_path / "ref", UNEVEN,
                  ExtractOptions(points="residual", batch_size=3))
    manifest_path = tmp_path / "ref" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["tensors"] = [e for e in manifest["tensors"] if e["role"] != "input_padding"]
    manifest_path.write_text(json.dumps(manifest))
    result = replay.replay(MINIMAX, tmp_path / "ref", [1], isolated=tmp_path / "iso")
    assert any("padding tails" in n for n in result.notes), result.notes
    errors = output_errors(open_run(tmp_path / "ref"), open_run(result.isolated), [1])
    assert errors[0] < 1e-5, errors


@pytest.mark.parametrize("spec", [MINIMAX, "builtin:llama-tiny", "builtin:qwen3-moe-tiny",
                                  "builtin:minimax-m2-tiny-fp8"])
def test_the_rehearsal_runs_a_miniature_of_the_layer_and_leaves_the_random_state(spec):
    """streaming.miniature_pass: the layer's own class over a batch's shape, with no more experts
    than a token routes to, on its own random generator."""
    from layerwise.layer_loading import LayerOptions, open_layers
    from layerwise.streaming import miniature_pass

    source = open_layers(spec, LayerOptions(dtype="fp32"))
    real = source.load(1).module
    before = torch.get_rng_state()
    y, module = miniature_pass(source, 1, (2, 7))
    assert torch.equal(before, torch.get_rng_state())
    assert tuple(y.shape) == (2, 7, source.config.hidden_size) and torch.isfinite(y).all()
    assert type(module) is type(real)
    size = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    experts = getattr(source.config, "num_local_experts", None) or getattr(source.config, "num_experts", None)
    if experts and experts > source.config.num_experts_per_tok:
        assert size(module) < size(real)
    else:
        assert size(module) == size(real)


def test_the_rehearsal_never_fails_the_test_and_never_changes_its_numbers(tmp_path, minimax_fp32_ref, monkeypatch):
    """Rehearsed (forced on the CPU), a layer test is bit-identical to the reference; a rehearsal
    that raises is only skipped, and off a GPU none runs."""
    from layerwise import streaming

    from layerwise.layer_loading import open_layers

    assert streaming.rehearse(open_layers(MINIMAX), 0, (1, 4)) is False  # a CPU: nothing to warm
    monkeypatch.setattr(streaming, "REHEARSE_ON", ("cuda", "cpu"))
    calls = []
    real_pass = streaming.miniature_pass
    # recorded once it has run through (rehearse would swallow what it raised)
    monkeypatch.setattr(streaming, "miniature_pass", lambda *a: (real_pass(*a), calls.append(a))[0])
    result = replay.replay(MINIMAX, minimax_fp32_ref.path, [0, 1, 2], isolated=tmp_path / "iso",
                           chained=tmp_path / "chain")
    widest = max(len(p["token_ids"]) for p in minimax_fp32_ref.prompts)
    assert [(c[1], c[2][1]) for c in calls] == [(0, widest)]  # once, layer 0, the first batch's shape
    assert_identical(minimax_fp32_ref, open_run(result.isolated))
    assert_identical(minimax_fp32_ref, open_run(result.chained))

    def broken(*_):
        raise RuntimeError("no miniature for this model")

    monkeypatch.setattr(streaming, "miniature_pass", broken)
    result = replay.replay(MINIMAX, minimax_fp32_ref.path, [0, 1], isolated=tmp_path / "iso2")
    assert_identical(minimax_fp32_ref, open_run(result.isolated))


def test_recorded_inputs_read_ahead_within_their_window_the_rest_when_used(tmp_path, minimax_fp32_ref, monkeypatch):
    """rebatch.ReadAhead holds a layer's first batches' inputs up to INPUTS_AHEAD_BYTES; the
    others are read where they are used. Either way the runs are the reference's, bit for bit."""
    from layerwise import rebatch

    assert len(minimax_fp32_ref.prompts) >= 2  # one batch per prompt: several batches
    held, reads = [], []
    real_stacked, real_recorded = rebatch.ReadAhead._stacked, rebatch.recorded_input
    monkeypatch.setattr(rebatch, "INPUTS_AHEAD_BYTES", 1)  # the first batch only
    monkeypatch.setattr(rebatch.ReadAhead, "_stacked", lambda self, i: held.append(r := real_stacked(self, i)) or r)
    monkeypatch.setattr(rebatch, "recorded_input", lambda *a: reads.append(a[1]) or real_recorded(*a))
    result = replay.replay(MINIMAX, minimax_fp32_ref.path, [0, 1, 2], isolated=tmp_path / "iso",
                           chained=tmp_path / "chain")
    assert [len(h) for h in held] == [1, 1, 1]  # every layer: one batch ahead (the isolated track needs all)
    batches = len(minimax_fp32_ref.prompts)
    # the rest read when used: the isolated track's other batches of each layer, and the chain's at layer 0
    assert len(reads) == 3 * (batches - 1) + (batches - 1), reads
    assert_identical(minimax_fp32_ref, open_run(result.isolated))
    assert_identical(minimax_fp32_ref, open_run(result.chained))
