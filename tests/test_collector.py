"""The capture sink: its pinned-buffer pool (backpressure without deadlock) and what it hands the writer."""

import threading
import time

import torch

from layerwise.capture import Target
from layerwise.collector import Collector, PinnedPool
from layerwise.prompts import Prompt, make_batches


def _in_thread(fn, timeout: float = 5.0):
    """Run fn in a thread; fail (not hang) if it has not returned within `timeout` seconds."""
    out: list = []
    worker = threading.Thread(target=lambda: out.append(fn()), daemon=True)
    worker.start()
    worker.join(timeout)
    assert not worker.is_alive(), f"still blocked after {timeout} s"
    return out[0]


def test_pool_overdraws_for_the_open_group_instead_of_deadlocking():
    pool = PinnedPool(budget_bytes=100, pin=False)
    a = pool.take(80)
    b = _in_thread(lambda: pool.take(80, open_group_bytes=80))  # same group: waiting would deadlock
    assert pool.used == 160 and a.numel() == b.numel() == 80


def test_pool_waits_for_other_groups_then_reuses_buffers():
    pool = PinnedPool(budget_bytes=100, pin=False)
    first = pool.take(80)
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.take(80, open_group_bytes=0)), daemon=True)
    waiter.start()
    time.sleep(0.2)
    assert not got, "a new group must wait while another group's buffers are out (backpressure)"
    pool.give(first)
    waiter.join(5)
    assert got and got[0] is first, "the returned buffer is reused, not reallocated"
    assert pool.held == 80


def test_closing_the_pool_fails_a_waiting_take():
    pool = PinnedPool(budget_bytes=100, pin=False)
    pool.take(80)
    errors = []

    def take():
        try:
            pool.take(80)
        except RuntimeError as err:
            errors.append(str(err))

    waiter = threading.Thread(target=take, daemon=True)
    waiter.start()
    time.sleep(0.1)
    pool.close()
    waiter.join(5)
    assert not waiter.is_alive() and errors == ["capture aborted"]


class ListWriter:
    def __init__(self):
        self.files = []

    def put(self, prompt, group, tensors, on_written=None):
        self.files.append((prompt, group, tensors))
        if on_written is not None:
            on_written()


def test_batches_are_cut_into_prompts_with_padding_tails_and_stored_dtypes():
    """Rows without padding, a decoder layer's input with its padding tail apart, router ids and
    weights in their stored dtypes, the score bias whole for every prompt."""
    layer, router = "model.layers.0", "model.layers.0.mlp.gate"
    targets = [Target(layer, "input", (f"{layer}:input",), layer),
               Target(router, "output", tuple(f"{router}:{r}" for r in
                                              ("router_logits", "score_bias", "topk_weights", "topk_ids")), layer)]
    batch = make_batches([Prompt(0, None, (1, 2, 3)), Prompt(1, None, (4,))], 2, 0)[0]
    writer = ListWriter()
    collector = Collector(writer, targets)
    collector.start_batch(batch)
    x = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    collector.take(targets[0], [x])
    logits = torch.randn(6, 4)
    collector.take(targets[1], [logits, torch.ones(4, dtype=torch.bfloat16), torch.rand(6, 2, dtype=torch.bfloat16),
                                torch.zeros(6, 2, dtype=torch.int64)])
    _in_thread(collector.close)
    files = {p: t for p, _, t in writer.files}
    assert torch.equal(files[0][f"{layer}:input"], x[0]) and f"{layer}:input_padding" not in files[0]
    assert torch.equal(files[1][f"{layer}:input"], x[1, :1])
    assert torch.equal(files[1][f"{layer}:input_padding"], x[1, 1:])
    assert torch.equal(files[1][f"{router}:router_logits"], logits.reshape(2, 3, 4)[1, :1])
    assert files[1][f"{router}:topk_ids"].dtype == torch.int32 and files[1][f"{router}:topk_ids"].shape == (1, 2)
    assert files[0][f"{router}:topk_weights"].dtype == torch.float32
    assert files[0][f"{router}:score_bias"].shape == files[1][f"{router}:score_bias"].shape == (4,)
