import threading
import time

import pytest

from layerwise import capture
from layerwise.anatomy import find_anatomy
from layerwise.errors import UserError


def test_pool_overdraws_for_files_still_waiting_instead_of_deadlocking():
    pool = capture.PinnedPool(budget_bytes=100 << 16, pin=False)
    pool.take(80 << 16)  # sizes round up to powers of two: 128 << 16
    pool.set_blocked(128 << 16)  # those bytes wait in a file missing a tensor: they cannot come back first
    pool.take(80 << 16)
    assert pool.used == 256 << 16


def test_pool_waits_for_buffers_that_will_come_back_then_reuses_them():
    pool = capture.PinnedPool(budget_bytes=200 << 16, pin=False)
    first = pool.take(80 << 16)
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.take(100 << 16)), daemon=True)
    waiter.start()
    time.sleep(0.2)
    assert not got, "while buffers that will come back are out, a take beyond the budget waits (backpressure)"
    pool.give(first)
    waiter.join(5)
    assert not waiter.is_alive(), "the waiting take never woke up"
    assert got and got[0] is first, "the returned buffer is reused (same size class), not reallocated"
    assert pool.held == 128 << 16


class ListWriter:
    """Collects what a Collector writes, releasing its buffers at once (or never, when held)."""

    def __init__(self, hold: bool = False):
        self.files, self.hold, self.pending = {}, hold, []

    def put(self, prompt, group, tensors, on_written=None):
        self.files[(prompt, group)] = {n: t.clone() for n, t in tensors.items()}
        if on_written:
            (self.pending.append if self.hold else lambda f: f())(on_written)


def _targets(layers):
    from layerwise.anatomy import Anatomy

    anatomy = Anatomy(layers_path="model.layers", num_layers=layers, embed_path="model.embed_tokens",
                      norm_path="model.norm", head_path="lm_head", rotary_path=None, attn_name="self_attn",
                      mlp_name="mlp", routers=(None,) * layers)
    return capture.plan_targets(anatomy, ("residual",), tuple(range(layers)))


def _batch(lengths, width):
    import torch

    from layerwise.prompts import Batch, Prompt

    prompts = tuple(Prompt(i, None, tuple(range(n))) for i, n in enumerate(lengths))
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return Batch(prompts, torch.zeros(len(lengths), width, dtype=torch.long), mask)


@pytest.mark.parametrize("device_budget", [1 << 30, 1])
def test_collector_copies_each_tensor_once_and_cuts_prompts(device_budget):
    """Layer K's output is layer K+1's input: one copy, two files; prompts cut without their
    padding, which is kept as the layer's input_padding. A tiny device budget flushes at every
    hook (files then span flushes, and a tensor seen twice is copied twice) with the same files."""
    import torch

    writer = ListWriter()
    targets = _targets(3)
    collector = capture.Collector(writer, targets, pinned_budget_bytes=1 << 20, device_budget_bytes=device_budget,
                                  copy_host_tensors=True)
    batch = _batch([5, 3], 5)
    states = [torch.randn(2, 5, 4) for _ in range(4)]
    collector.start_batch(batch)
    for k in range(3):
        inp, out = [t for t in targets if t.group == f"model.layers.{k}"]
        collector.take(inp, [states[k]])
        collector.take(out, [states[k + 1]])
    collector.close()
    for k in range(3):
        got = writer.files[(1, f"model.layers.{k}")]
        assert torch.equal(got[f"model.layers.{k}:input"], states[k][1, :3])
        assert torch.equal(got[f"model.layers.{k}:output"], states[k + 1][1, :3])
        assert torch.equal(got[f"model.layers.{k}:input_padding"], states[k][1, 3:])
        assert f"model.layers.{k}:input_padding" not in writer.files[(0, f"model.layers.{k}")]
    assert collector.pool.used == 0, "every buffer came back"
    if device_budget > 1:  # one flush per batch: each distinct tensor copied once (4 of them, not 6)
        assert collector.pool.peak == 4 * (1 << 16)  # 4 buffers of the smallest size class


def test_collector_backpressure_waits_for_the_writer():
    """With the budget spent and the writer holding its buffers, the next batch waits; once the
    writer lets go, it proceeds."""
    import torch

    writer = ListWriter(hold=True)
    targets = _targets(1)
    collector = capture.Collector(writer, targets, pinned_budget_bytes=2 << 16, copy_host_tensors=True)
    inp, out = targets
    collector.start_batch(_batch([5, 5], 5))
    collector.take(inp, [torch.randn(2, 5, 4)])
    collector.take(out, [torch.randn(2, 5, 4)])
    collector.flush()
    done = threading.Event()

    def second():
        collector.start_batch(_batch([5, 5], 5))
        collector.take(inp, [torch.randn(2, 5, 4)])
        collector.take(out, [torch.randn(2, 5, 4)])
        collector.end_batch()
        done.set()

    thread = threading.Thread(target=second, daemon=True)
    thread.start()
    assert not done.wait(0.3), "the second batch must wait while the writer holds the budget"
    for release in writer.pending:
        release()
    assert done.wait(5), "the second batch never proceeded"
    thread.join(5)
    collector.abort()


@pytest.mark.parametrize("text, expected", [(None, capture.DEFAULT_POINTS), ("embed, logits", ("embed", "logits")),
                                            ("residual,residual", ("residual",))])
def test_parse_points(text, expected):
    assert capture.parse_points(text) == expected


def test_parse_layers():
    assert capture.parse_layers("0-2,5", 8) == (0, 1, 2, 5)
    assert capture.parse_layers(None, 3) == (0, 1, 2)
    for bad, fragment in [("9", "names layer 9"), ("2-1", "reversed"), ("a", "not a layer number"), ("-1", "not a layer")]:
        with pytest.raises(UserError, match=fragment):
            capture.parse_layers(bad, 8)


def test_targets_in_model_order():
    from layerwise import models, placement, runs

    meta = placement.meta_model(models.load_config(models.resolve_model("builtin:minimax-m2")).config, __import__("torch").bfloat16)
    anatomy = find_anatomy(meta)
    targets = capture.plan_targets(anatomy, capture.POINTS, (0, 61))
    names = [n for t in targets for n in t.names]
    assert names[:3] == ["model.embed_tokens:output", "model.layers.0:input", "model.layers.0.self_attn:output"]
    assert names[-2:] == ["model.norm:output", "lm_head:output"]
    assert names == sorted(names, key=runs.model_order_key)
    assert capture.groups_of(targets)["model.layers.61"][-1] == "model.layers.61:output"
