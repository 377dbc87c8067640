"""Loading one decoder layer without the model: bit-identical to the full load, reads only its tensors."""

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from layerwise import layer_loading, loading, zoo
from layerwise.errors import UserError
from layerwise.layer_loading import LayerOptions, open_layers

from helpers import copy_checkpoint


def _full(spec, dtype, attn=None):
    return loading.load_model(spec, loading.LoadOptions(device_map="cpu", dtype=dtype, attn_implementation=attn),
                              with_tokenizer=False).model


def assert_same_state(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), f"{what}: names differ: {sorted(set(got) ^ set(want))}"
    for name in want:
        a, b = got[name], want[name]
        assert a.dtype == b.dtype and a.shape == b.shape, \
            f"{what} {name}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b), f"{what} {name}: max |diff| {(a.float() - b.float()).abs().max().item():.3g}"


@pytest.mark.parametrize("spec, dtype", [
    ("builtin:minimax-m2-tiny", "bf16"), ("builtin:minimax-m2-tiny", "fp32"),
    ("builtin:llama-tiny", "fp32"), ("builtin:qwen3-moe-tiny", "bf16"),
])
def test_isolated_layer_is_bit_identical_to_full_load(spec, dtype):
    source = open_layers(spec, LayerOptions(dtype=dtype))
    full = _full(spec, dtype)
    for index in range(source.num_layers):
        layer = source.load(index)
        assert_same_state(layer.module.state_dict(), full.get_submodule(source.anatomy.layer(index)).state_dict(),
                          f"{spec} layer {index}")
    shared = source.load_shared()
    for part, path in (("embed", source.anatomy.embed_path), ("norm", source.anatomy.norm_path),
                       ("head", source.anatomy.head_path)):
        assert_same_state(shared[part].state_dict(), full.get_submodule(path).state_dict(), f"{spec} {part}")


def test_minimax_router_stays_fp32_in_bf16():
    layer = open_layers("builtin:minimax-m2-tiny", LayerOptions(dtype="bf16")).load(1)
    dtypes = {n: t.dtype for n, t in layer.weights().items()}
    assert dtypes["mlp.gate.weight"] == torch.float32
    assert dtypes["mlp.e_score_correction_bias"] == torch.float32
    assert dtypes["mlp.experts.gate_up_proj"] == torch.bfloat16  # fused from w1/w3 by transformers
    assert layer.module.mlp.experts.gate_up_proj.shape == (8, 64, 64)


def test_rotary_matches_full_model():
    source = open_layers("builtin:minimax-m2-tiny", LayerOptions(dtype="fp32"))
    full = _full("builtin:minimax-m2-tiny", "fp32")
    x = torch.zeros(1, 9, 64)
    positions = torch.arange(9)[None]
    cos, sin = source.load(3).position_embeddings(x, positions)
    want_cos, want_sin = full.model.rotary_emb(x, positions)
    assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)


def _count_reads(monkeypatch) -> list[str]:
    """Every tensor name read from the checkpoint's shards (checkpoint.read_tensors is the only reader)."""
    from layerwise import checkpoint

    real = checkpoint.read_tensors
    read: list[str] = []

    def spy(directory, names, *args, **kwargs):
        read.extend(names)
        return real(directory, names, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "read_tensors", spy)
    return read

def test_loading_layer_k_reads_only_layer_k(monkeypatch, tiny_minimax):
    source = open_layers("builtin:minimax-m2-tiny", LayerOptions(dtype="bf16"))
    wmap = source.store.names()
    read = _count_reads(monkeypatch)
    layer = source.load(2)
    want = sorted(n for n in wmap if n.startswith("model.layers.2."))
    assert sorted(read) == want, f"read {len(read)} tensors, layer 2 has {len(want)}"
    assert len(want) == 8 * 3 + 10  # 8 experts x w1/w2/w3, attention 6, 2 norms, router weight and bias
    total = sum(1 for _ in wmap)
    assert len(read) < total / 4
    assert layer.bytes_read == sum(t.numel() * t.element_size() for t in layer.weights().values())
    read.clear()
    source.load_shared(("norm",))
    assert read == ["model.norm.weight"]


def test_threads_read_and_build_concurrently():
    source = open_layers("builtin:minimax-m2-tiny", LayerOptions(dtype="bf16"))
    serial = [source.load(i).module.state_dict() for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        weights = list(pool.map(source.read, [3, 2, 1, 0, 3, 2, 1, 0]))
        built = list(pool.map(source.build, weights))
    for layer in built:
        assert_same_state(layer.module.state_dict(), serial[layer.index], f"threaded layer {layer.index}")
    assert torch.get_default_dtype() == torch.float32


def test_layer_index_out_of_range():
    source = open_layers("builtin:llama-tiny")
    with pytest.raises(UserError, match="layer 4 is out of range: builtin:llama-tiny has layers 0-3"):
        source.read(4)


def test_missing_layer_tensor_is_named(tmp_path, tiny_minimax):
    import json

    ckpt = copy_checkpoint(tiny_minimax.path, tmp_path / "m")
    index = ckpt / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    wmap = data["weight_map"]
    del wmap["model.layers.1.self_attn.k_norm.weight"]
    index.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"the index lacks 1 tensor\(s\) of model.layers.1 that other layers have "
                                        r"\(first: model.layers.1.self_attn.k_norm.weight\)"):
        open_layers(str(ckpt))  # before any layer is read: the other layers have it
    for k in [k for k in wmap if k.endswith("self_attn.k_norm.weight")]:
        del wmap[k]  # missing from every layer: only building the layer finds it
    index.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"lacks 1 tensor\(s\) of layer 1 "
                                        r"\(first: model.layers.1.self_attn.k_norm.weight\)"):
        open_layers(str(ckpt)).load(1)


def test_unsliced_config_is_caught(monkeypatch, tmp_path):
    """A layer-index-dependent config field the slicer misses must not load a wrong layer silently."""
    spec = _mixed_qwen3_moe(tmp_path)
    monkeypatch.setattr(layer_loading, "one_layer_config", _unsliced)
    with pytest.raises(UserError, match="layer 1 of .* cannot be loaded on its own: .*mlp"):
        open_layers(spec).load(1)  # sparse in the model (step 2), dense when built as layer 0 unsliced


def _unsliced(config, index):
    import copy

    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers, cfg.vocab_size, cfg.pad_token_id = 1, 1, None
    cfg.mlp_only_layers = []
    return cfg


def _mixed_qwen3_moe(tmp_path) -> str:
    """Qwen3-MoE where layers 0 and 2 are dense (sparse step 2) and layer 3 is dense (mlp_only)."""
    cfg = zoo.BUILTINS["qwen3-moe-tiny"].config()
    cfg.update(decoder_sparse_step=2, mlp_only_layers=[3])
    out = tmp_path / "qwen3-moe-mixed"
    zoo._write_tiny_checkpoint(cfg, out)
    return str(out)


def _sliding_qwen3(tmp_path) -> str:
    """Dense Qwen3 alternating full and sliding-window (4 tokens) attention."""
    cfg = {k: v for k, v in zoo.BUILTINS["qwen3-moe-tiny"].config().items()
           if k not in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                        "decoder_sparse_step", "mlp_only_layers")}
    cfg.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"], use_sliding_window=True, sliding_window=4,
               max_window_layers=0,
               layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"])
    out = tmp_path / "qwen3-sliding"
    zoo._write_tiny_checkpoint(cfg, out)
    return str(out)


@pytest.mark.parametrize("make", [_mixed_qwen3_moe, _sliding_qwen3])
def test_layer_dependent_configs_are_sliced(make, tmp_path):
    spec = make(tmp_path)
    source = open_layers(spec, LayerOptions(dtype="bf16"))
    full = _full(spec, "bf16")
    for index in range(source.num_layers):
        layer = source.load(index)
        want = full.get_submodule(source.anatomy.layer(index))
        assert_same_state(layer.module.state_dict(), want.state_dict(), f"{spec} layer {index}")
        window = getattr(want.self_attn, "sliding_window", None)
        assert getattr(layer.module.self_attn, "sliding_window", None) == window
    types = getattr(source.config, "layer_types", None) or ["full_attention"] * 4
    assert [source.layer_type(i) for i in range(4)] == list(types)


@pytest.mark.slow
def test_gguf_falls_back_to_one_cpu_load(monkeypatch, smollm2_fp32):
    calls = []
    real = layer_loading.load_whole_on_cpu
    monkeypatch.setattr(layer_loading, "load_whole_on_cpu", lambda *a, **k: calls.append(a) or real(*a, **k))
    source = open_layers("builtin:smollm2", LayerOptions(dtype="fp32"))
    first, last = source.load(0), source.load(29)
    shared = source.load_shared(("norm",))
    assert len(calls) == 1, "the .gguf model must be loaded once, then layers taken from it"
    full = smollm2_fp32.model
    assert_same_state(first.module.state_dict(), full.model.layers[0].state_dict(), "smollm2 layer 0")
    assert_same_state(last.module.state_dict(), full.model.layers[29].state_dict(), "smollm2 layer 29")
    assert_same_state(shared["norm"].state_dict(), full.model.norm.state_dict(), "smollm2 norm")
