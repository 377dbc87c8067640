"""Test helpers shared by the test files: prompts, copies of the tiny checkpoint to break on
purpose, the CLI runner, run writing, and assertions whose messages carry diff statistics."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import torch

from layerwise.cli import main
from layerwise.names import file_group
from layerwise.runs import RunWriter

# Text prompts of uneven lengths (batches of several pad their shorter rows).
PROMPTS = ["The capital of France is", "Hi", "a b c d e f g h i j k l m n o p q", "Paris is a city in"]


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def write_medium_minimax(path: Path, layers: int, experts: int, top_k: int) -> Path:
    """A MiniMax-M2 checkpoint with dimensions that take 128x128 FP8 blocks and real head sizes
    (hidden 1024, head_dim 128, rotary_dim 64), seeded random bf16 weights, written to `path`."""
    from layerwise import zoo

    config = {**zoo.MINIMAX_M2_CONFIG, "hidden_size": 1024, "intermediate_size": 512, "num_hidden_layers": layers,
              "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128, "rotary_dim": 64,
              "num_local_experts": experts, "num_experts_per_tok": top_k, "vocab_size": 512,
              "max_position_embeddings": 4096, "bos_token_id": 256, "eos_token_id": 257, "pad_token_id": 258,
              "num_mtp_modules": 0}
    path.mkdir(parents=True, exist_ok=True)
    zoo._write_tiny_checkpoint(config, path)
    return path


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, fragment: str) -> None:
    assert code == 2, f"exit {code}, stderr: {err!r}"
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert "Traceback" not in err
    assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def write_run(path, intent: dict, tensors_by_prompt: dict[int, dict[str, torch.Tensor]], extra: dict | None = None,
              **writer_options) -> dict:
    """Write tensors as a run, grouped into files as extract groups them (`extra` beside the intent
    in the manifest); returns the manifest."""
    writer = RunWriter(path, intent, **writer_options)
    for prompt, tensors in tensors_by_prompt.items():
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in tensors.items():
            groups.setdefault(file_group(name.rpartition(":")[0]), {})[name] = t
        for group, items in groups.items():
            writer.put(prompt, group, items)
    return writer.finish(extra)


def rel_l2(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """||candidate - reference|| / ||reference|| in float64."""
    a, b = candidate.double(), reference.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_stream_timeline(stats: dict, layers: int) -> None:
    """A streamed extract's stats: each layer read, built and computed in that order (the norm and
    head as layer `layers`: read, then computed), phases and their seconds consistent."""
    by = {}
    for phase, layer, start, end in stats["timeline"]:
        assert 0 <= start <= end, (phase, layer, start, end)
        by.setdefault(phase, {})[layer] = (start, end)
    assert sorted(by["compute"]) == sorted(by["read"]) == list(range(layers + 1)), by
    assert sorted(by["build"]) == list(range(layers)) and 0 in by["rehearse"], by
    for k in range(layers + 1):
        assert by["read"][k][1] <= by["compute"][k][0], (k, by)  # computed after its weights arrived
    for k in range(layers):
        assert by["read"][k][1] <= by["build"][k][0] <= by["build"][k][1] <= by["compute"][k][0], (k, by)
    total = sum(end - start for start, end in by["compute"].values())
    assert abs(stats["compute_seconds"] - total) < 1e-3 * (layers + 1), (stats["compute_seconds"], total)


def assert_runs_equal(a, b, names=None, exclude_roles: tuple[str, ...] = ()) -> int:
    """Two runs hold the same tensors (name, prompt, shape, dtype) with the same bits; with `names`,
    only those names are compared (both runs must hold them for the same prompts). The message
    names the first difference with its statistics. Returns how many tensors were compared."""
    wanted = None if names is None else set(names)

    def keys(run):
        return {(e.name, e.prompt) for e in run.entries()
                if e.role not in exclude_roles and (wanted is None or e.name in wanted)}

    keys_a, keys_b = keys(a), keys(b)
    assert keys_a == keys_b, (f"tensors differ: only in A {sorted(keys_a - keys_b)[:3]}, "
                              f"only in B {sorted(keys_b - keys_a)[:3]}")
    differ = []
    for name, prompt in sorted(keys_a):
        x, y = a.tensor(name, prompt), b.tensor(name, prompt)
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
            stats = ""
            if x.shape == y.shape and x.is_floating_point():
                stats = f": max |diff| {(x.double() - y.double()).abs().max().item():.3e}, rel_l2 {rel_l2(y, x):.3e}"
            differ.append(f"{name} prompt {prompt} ({x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)}){stats}")
    assert not differ, f"{len(differ)} of {len(keys_a)} tensors differ; first: {differ[0]}"
    return len(keys_a)


def nan_inf_found_by_the_capture_as_by_the_writer(tmp_path, monkeypatch, prompts, device_map: str, dtype: str):
    """Every copy's float runs summed (hostcopy.CHECK_BYTES 0; on the CPU the capture's copies
    made as on a GPU; the batch's last flush summed first, on a GPU on the compute stream), a
    flush at every decoder layer, a weight of layer 1 made NaN: the files the
    capture calls finite hold no NaN/Inf (torch's isfinite on what was read back), and some are
    (layer 0's flush: a NaN takes its whole run of a flush out); the run is the one written with
    every tensor checked by the writer (the same digests, the same NaN/Inf records), and those
    records are torch's own counts."""
    from layerwise import hostcopy, loading, recording, runs
    from layerwise.collector import Collector
    from layerwise.extract import ExtractOptions, extract_model

    on_cpu = device_map == "cpu"
    monkeypatch.setattr(recording, "Collector",
                        lambda *a, **k: Collector(*a, flush_bytes=0, copy_host_tensors=on_cpu, **k))
    loaded = loading.load_model("builtin:minimax-m2-tiny", loading.LoadOptions(dtype=dtype, device_map=device_map,
                                                                                tokens=512))
    weight = next(p for n, p in loaded.model.named_parameters() if ".layers.1." in n and p.dim() == 2)
    with torch.no_grad():
        weight[0, 0] = float("nan")
    named, put_many = [], runs.RunWriter.put_many  # `put` hands its one file to `put_many` too

    def noted(self, files):
        named.extend((prompt, name) for prompt, _, _, _, finite in files for name in finite)
        return put_many(self, files)
    monkeypatch.setattr(runs.RunWriter, "put_many", noted)
    firsts, pack = [], hostcopy.HostCopier.pack  # the batch's last flush sums first, on the compute stream
    monkeypatch.setattr(hostcopy.HostCopier, "pack", lambda self, *a, sum_first=False:
                        firsts.append(sum_first) or pack(self, *a, sum_first=sum_first))
    manifests = {}
    for check_bytes in (0, 1 << 62):
        monkeypatch.setattr(hostcopy, "CHECK_BYTES", check_bytes)
        extract_model(loaded, tmp_path / str(check_bytes), prompts,
                      ExtractOptions(points="residual,attn,mlp,router,logits", batch_size=3))
        manifests[check_bytes] = runs.open_run(tmp_path / str(check_bytes)).manifest
    assert True in firsts and False in firsts
    assert manifests[0]["tensors"] == manifests[1 << 62]["tensors"]
    assert manifests[0]["nonfinite"] == manifests[1 << 62]["nonfinite"] != []
    run = runs.open_run(tmp_path / "0")
    assert named and all(torch.isfinite(run.tensor(name, prompt)).all() for prompt, name in named)
    records = {(r["name"], r["prompt"]): (r["nan"], r["inf"]) for r in manifests[0]["nonfinite"]}
    for entry in manifests[0]["tensors"]:
        t = run.tensor(entry["name"], entry["prompt"])
        if t.is_floating_point() and not torch.isfinite(t).all():
            assert records[(entry["name"], entry["prompt"])] == (int(torch.isnan(t).sum()), int(torch.isinf(t).sum()))
        else:
            assert (entry["name"], entry["prompt"]) not in records



def in_thread(fn, timeout: float = 5.0):
    """Run fn in a thread; fail (not hang) if it has not returned within `timeout` seconds."""
    out: list = []
    worker = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    worker.start()
    worker.join(timeout)
    assert not worker.is_alive(), f"still blocked after {timeout} s"
    return out[0]
