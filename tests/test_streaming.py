"""Streaming: one layer at a time, bit-identical to the whole-model extract, about two layers resident."""

import weakref

import pytest

from layerwise import layer_loading, loading, runs, streaming
from layerwise.errors import UserError
from layerwise.extract import ExtractOptions, extract_model

from helpers import PROMPTS, assert_runs_equal, assert_stream_timeline, run_cli

ALL = ExtractOptions(points="embed,residual,attn,mlp,router,norm,logits", batch_size=3)


@pytest.mark.parametrize("spec, dtype", [("builtin:minimax-m2-tiny", "fp32"), ("builtin:minimax-m2-tiny", "bf16"),
                                         ("builtin:llama-tiny", "bf16"), ("builtin:qwen3-moe-tiny", "fp32")])
def test_streamed_equals_whole_model_extract(tmp_path, spec, dtype):
    loaded = loading.load_model(spec, loading.LoadOptions(dtype=dtype))
    extract_model(loaded, tmp_path / "full", PROMPTS, ALL)
    streaming.stream_extract(spec, tmp_path / "stream", PROMPTS, ALL, streaming.StreamOptions(dtype=dtype))
    full, streamed = runs.open_run(tmp_path / "full"), runs.open_run(tmp_path / "stream")
    assert full.names == streamed.names
    assert_runs_equal(full, streamed)
    assert any(e.role == "input_padding" for e in full.entries())  # padded rows: their tails kept for replays
    assert runs.open_run(tmp_path / "stream").manifest["stats"]["streamed"] is True



def test_a_rehearsed_stream_equals_the_whole_model_extract(tmp_path, monkeypatch):
    """The first layer's rehearsal (forced on the CPU) runs while layer 0 is read, once, over the
    first batch's shape, and changes no tensor of the run."""
    spec, calls = "builtin:minimax-m2-tiny", []
    real_pass = streaming.miniature_pass
    monkeypatch.setattr(streaming, "REHEARSE_ON", ("cuda", "cpu"))
    monkeypatch.setattr(streaming, "miniature_pass", lambda *a: (real_pass(*a), calls.append(a[1:]))[0])
    loaded = loading.load_model(spec, loading.LoadOptions(dtype="bf16"))
    extract_model(loaded, tmp_path / "full", PROMPTS, ALL)
    streaming.stream_extract(spec, tmp_path / "stream", PROMPTS, ALL, streaming.StreamOptions(dtype="bf16"))
    assert len(calls) == 1 and calls[0][0] == 0 and calls[0][1][0] == ALL.batch_size, calls
    assert_runs_equal(runs.open_run(tmp_path / "full"), runs.open_run(tmp_path / "stream"))

def test_at_most_two_layers_of_weights_are_alive(tmp_path, monkeypatch):
    """Peak memory: layer K's raw expert tensors (consumed by the build) and built modules are
    tracked separately; never more than two of them exist at once (build: raw K + built K;
    compute: built K + raw K+1), so nothing keeps a finished layer alive."""
    alive, peak = set(), [0]

    def track(key, obj):
        alive.add(key)
        peak[0] = max(peak[0], len(alive))
        weakref.finalize(obj, alive.discard, key)

    real_read, real_build = layer_loading.LayerSource.read, layer_loading.LayerSource.build

    def read(self, index):
        weights = real_read(self, index)
        for name, t in weights.tensors.items():
            if ".experts." in name:
                track(("raw", index, name), t)
        return weights

    def build(self, weights):
        layer = real_build(self, weights)
        track(("built", weights.index), layer.module)
        return layer

    monkeypatch.setattr(layer_loading.LayerSource, "read", read)
    monkeypatch.setattr(layer_loading.LayerSource, "build", build)
    streaming.stream_extract("builtin:minimax-m2-tiny", tmp_path / "run", PROMPTS, ALL,
                             streaming.StreamOptions(dtype="fp32"))
    layers_at_peak = {key[:2] for key in alive}  # at the end: nothing of any layer is left
    assert not layers_at_peak, f"still alive after the run: {sorted(layers_at_peak)}"
    experts = 8 * 3  # raw expert tensors per tiny MiniMax-M2 layer
    assert peak[0] <= experts + 1, f"{peak[0]} tracked objects alive at once (one layer's raw experts + 1 module)"

def test_stream_cli(tmp_path, capsys):
    code, out, _ = run_cli(capsys, "extract", "builtin:minimax-m2-tiny", "--out", tmp_path / "r", "--prompt", "abc",
                           "--stream", "--dtype", "fp32")
    assert code == 0 and "one layer at a time" in out
    run = runs.open_run(tmp_path / "r")
    assert run.names[-1] == "lm_head:output"
    startup = run.manifest["stats"]["startup"]  # before the recording and its end, in seconds since the process began
    assert [stage for stage, _ in startup["stages"]][-7:] == [
        "imported", "layers opened", "run started", "layers computed", "head computed", "capture closed",
        "files written"], startup
    seconds = [at for _, at in startup["stages"]]
    assert 0 < seconds[-7] and seconds == sorted(seconds), startup
    assert_stream_timeline(run.manifest["stats"], 4)
    manifest_at = (tmp_path / "r" / "manifest.json").stat().st_mtime - startup["process_start_unix"]
    assert seconds[-1] <= manifest_at + 0.01, (seconds, manifest_at)  # the files, then the manifest


def test_unstreamable_architecture_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(streaming, "_NOT_STREAMABLE", ("minimax_m2",))
    with pytest.raises(UserError, match="streaming would not reproduce them"):
        streaming.stream_extract("builtin:minimax-m2-tiny", tmp_path / "r", ["x"])


@pytest.mark.parametrize("points, prefetch, tail", [
    ("residual,logits", True, "read while the last layer runs"),
    ("residual,norm", False, "read after the layers"),
    ("residual,router", True, None),
])
def test_norm_and_head_read_ahead_or_not_at_all(tmp_path, monkeypatch, points, prefetch, tail):
    """The final norm and head are read on the reader thread during the last layer (with prefetch),
    after the layers without it, and not at all when nothing after the layers is captured; the
    run is the whole-model extract's either way."""
    import threading

    calls, real = [], layer_loading.LayerSource.load_shared

    def load_shared(self, parts=layer_loading.SHARED_PARTS):
        calls.append((parts, threading.current_thread() is threading.main_thread()))
        return real(self, parts)

    monkeypatch.setattr(layer_loading.LayerSource, "load_shared", load_shared)
    options = ExtractOptions(points=points, batch_size=3)
    streaming.stream_extract("builtin:minimax-m2-tiny", tmp_path / "stream", PROMPTS, options,
                             streaming.StreamOptions(dtype="fp32", prefetch=prefetch))
    heads = [on_main for parts, on_main in calls if "head" in parts]
    assert heads == ([] if tail is None else [not prefetch]), f"{tail}: {calls}"
    loaded = loading.load_model("builtin:minimax-m2-tiny", loading.LoadOptions(dtype="fp32"))
    extract_model(loaded, tmp_path / "full", PROMPTS, options)
    assert_runs_equal(runs.open_run(tmp_path / "full"), runs.open_run(tmp_path / "stream"))
