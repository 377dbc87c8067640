"""The capture sink: its pinned-buffer pool (backpressure without deadlock) and what it hands the writer."""

import dataclasses
import threading
import time

import pytest
import torch

from layerwise.capture import Target, plan_targets
from layerwise.collector import Collector
from layerwise.pinned import PinnedPool
from layerwise.prompts import Prompt, make_batches

from helpers import in_thread as _in_thread




def test_closing_the_pool_fails_a_waiting_take():
    pool = PinnedPool(budget_bytes=100 << 16, pin=False)
    pool.take(80 << 16)
    errors = []

    def take():
        try:
            pool.take(80 << 16)
        except RuntimeError as err:
            errors.append(str(err))

    waiter = threading.Thread(target=take, daemon=True)
    waiter.start()
    time.sleep(0.1)
    pool.close()
    waiter.join(5)
    assert not waiter.is_alive() and errors == ["capture aborted"]


@pytest.mark.parametrize("copied", [False, True])
def test_batches_are_cut_into_prompts_with_padding_tails_and_stored_dtypes(copied):
    """Rows without padding, a decoder layer's input with its padding tail apart, router ids and
    weights in their stored dtypes (converted on the host, or with the copy when copied), the
    score bias whole for every prompt."""
    layer, router = "model.layers.0", "model.layers.0.mlp.gate"
    targets = [Target(layer, "input", (f"{layer}:input",), layer),
               Target(router, "output", tuple(f"{router}:{r}" for r in
                                              ("router_logits", "score_bias", "topk_weights", "topk_ids")), layer)]
    batch = make_batches([Prompt(0, None, (1, 2, 3)), Prompt(1, None, (4,))], 2, 0)[0]
    writer = ListWriter()
    collector = Collector(writer, targets, copy_host_tensors=copied, pinned_budget_bytes=1 << 20)
    collector.start_batch(batch)
    x = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    collector.take(targets[0], [x])
    logits, weights = torch.randn(6, 4), torch.rand(6, 2, dtype=torch.bfloat16)
    ids = torch.arange(12, dtype=torch.int64).reshape(6, 2) - 5
    collector.take(targets[1], [logits, torch.ones(4, dtype=torch.bfloat16), weights, ids])
    _in_thread(collector.close)
    files = {p: t for (p, _), t in writer.files.items()}
    assert torch.equal(files[1][f"{router}:topk_weights"], weights[3:4].float())
    assert torch.equal(files[1][f"{router}:topk_ids"], ids[3:4].to(torch.int32))
    assert files[0][f"{router}:score_bias"].dtype == torch.float32
    assert torch.equal(files[0][f"{layer}:input"], x[0]) and f"{layer}:input_padding" not in files[0]
    assert torch.equal(files[1][f"{layer}:input"], x[1, :1])
    assert torch.equal(files[1][f"{layer}:input_padding"], x[1, 1:])
    assert torch.equal(files[1][f"{router}:router_logits"], logits.reshape(2, 3, 4)[1, :1])
    assert files[1][f"{router}:topk_ids"].dtype == torch.int32 and files[1][f"{router}:topk_ids"].shape == (1, 2)
    assert files[0][f"{router}:topk_weights"].dtype == torch.float32
    assert files[0][f"{router}:score_bias"].shape == files[1][f"{router}:score_bias"].shape == (4,)


def test_pool_overdraws_for_files_still_waiting_instead_of_deadlocking():
    pool = PinnedPool(budget_bytes=100 << 16, pin=False)
    pool.take(80 << 16)  # sizes round up to powers of two: 128 << 16
    pool.set_blocked(128 << 16)  # those bytes wait in a file missing a tensor: they cannot come back first
    pool.take(80 << 16)
    assert pool.used == 256 << 16


def test_pool_waits_for_buffers_that_will_come_back_then_reuses_them():
    pool = PinnedPool(budget_bytes=200 << 16, pin=False)
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
        self.files, self.hold, self.pending, self.finite = {}, hold, [], {}

    def put(self, prompt, group, tensors, on_written=None, finite=frozenset()):
        self.files[(prompt, group)] = {n: t.clone() for n, t in tensors.items()}
        self.finite[(prompt, group)] = set(finite)
        if on_written:
            (self.pending.append if self.hold else lambda f: f())(on_written)


def _targets(layers):
    from layerwise.anatomy import Anatomy

    anatomy = Anatomy(layers_path="model.layers", num_layers=layers, embed_path="model.embed_tokens",
                      norm_path="model.norm", head_path="lm_head", rotary_path=None, attn_name="self_attn",
                      mlp_name="mlp", routers=(None,) * layers)
    return plan_targets(anatomy, ("residual",), tuple(range(layers)))


def _batch(lengths, width):
    import torch

    from layerwise.prompts import Batch, Prompt

    prompts = tuple(Prompt(i, None, tuple(range(n))) for i, n in enumerate(lengths))
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return Batch(prompts, torch.zeros(len(lengths), width, dtype=torch.long), mask)


def _three_layers(collector, targets, batch, states) -> None:
    """One batch through 3 layers' hooks: layer k's input is states[k], its output states[k + 1]."""
    collector.start_batch(batch)
    for k in range(3):
        inp, out = [t for t in targets if t.group == f"model.layers.{k}"]
        collector.take(inp, [states[k]])
        collector.take(out, [states[k + 1]])
    collector.close()


@pytest.mark.parametrize("flush_bytes, packed", [(0, [2 * 160, 160, 160]), (400, [2 * 160, 2 * 160])])
def test_collector_copies_each_tensor_once_and_cuts_prompts(flush_bytes, packed):
    """A decoder layer's input flushes what came before once that is `flush_bytes`: layer K's
    output and layer K+1's input are one tensor, copied once (4 distinct tensors for 3 layers:
    3 packed copies when every layer flushes, 2 when a flush waits for 400 bytes); prompts are
    cut without their padding, which is kept as the layer's input_padding."""
    writer = ListWriter()
    targets = _targets(3)
    collector = Collector(writer, targets, pinned_budget_bytes=1 << 20, copy_host_tensors=True,
                          flush_bytes=flush_bytes)
    requested = []
    take = collector.pool.take
    collector.pool.take = lambda n, own=0: requested.append(n) or take(n, own)
    states = [torch.randn(2, 5, 4) for _ in range(4)]
    _three_layers(collector, targets, _batch([5, 3], 5), states)
    for k in range(3):
        got = writer.files[(1, f"model.layers.{k}")]
        assert torch.equal(got[f"model.layers.{k}:input"], states[k][1, :3])
        assert torch.equal(got[f"model.layers.{k}:output"], states[k + 1][1, :3])
        assert torch.equal(got[f"model.layers.{k}:input_padding"], states[k][1, 3:])
        assert f"model.layers.{k}:input_padding" not in writer.files[(0, f"model.layers.{k}")]
    assert requested == packed, requested  # packed bytes per flush: 4 tensors of 160 bytes, once each
    assert collector.pool.used == 0, "every buffer came back"


def test_a_flush_of_mixed_dtypes_keeps_every_host_view_aligned():
    """One packed buffer holds tensors of 1, 2, 4 and 8 bytes an element, whatever their order and
    counts: each host view starts at a multiple of its element size (a 3-byte tensor before an
    int64 one once failed the capture: a view of bytes as Long needs an offset divisible by 8)."""
    writer = ListWriter()
    targets = _targets(3)
    collector = Collector(writer, targets, pinned_budget_bytes=1 << 20, copy_host_tensors=True, flush_bytes=1 << 20)
    g = torch.Generator().manual_seed(0)
    states = [torch.randint(0, 200, (1, 3, 1), generator=g, dtype=torch.uint8),
              torch.randn(1, 3, 1, generator=g).to(torch.bfloat16),
              torch.randint(-9, 9, (1, 3, 1), generator=g, dtype=torch.int32),
              torch.randint(-9, 9, (1, 3, 1), generator=g, dtype=torch.int64)]
    _three_layers(collector, targets, _batch([3], 3), states)
    for k in range(3):
        got = writer.files[(0, f"model.layers.{k}")]
        for role, t in (("input", states[k]), ("output", states[k + 1])):
            assert got[f"model.layers.{k}:{role}"].dtype == t.dtype
            assert torch.equal(got[f"model.layers.{k}:{role}"], t[0])
    assert collector.pool.used == 0, "every buffer came back"


@pytest.mark.parametrize("nan, check_bytes", [(False, 0), (True, 0), (False, 1 << 30)])
def test_a_large_copy_s_float_runs_found_finite_are_not_checked_again(monkeypatch, nan, check_bytes):
    """A copy of CHECK_BYTES or more carries each float dtype's float64 sum behind its bytes: the
    files name the tensors of the runs whose sum is finite, so the writer does not check them
    again; a NaN takes its whole run (every float32 tensor of the flush) out of it; integers are
    never in it; a padding tail is when its layer input is; a copy under CHECK_BYTES: none. The
    tensors are the same bytes either way."""
    from layerwise import hostcopy

    monkeypatch.setattr(hostcopy, "CHECK_BYTES", check_bytes)
    writer = ListWriter()
    targets = _targets(3)
    collector = Collector(writer, targets, pinned_budget_bytes=1 << 20, copy_host_tensors=True, flush_bytes=1 << 20)
    g = torch.Generator().manual_seed(1)
    states = [torch.randn(2, 3, 4, generator=g).to(torch.bfloat16), torch.randn(2, 3, 4, generator=g),
              torch.randn(2, 3, 4, generator=g), torch.randint(-9, 9, (2, 3, 4), generator=g)]
    if nan:
        states[1][1, 2, 3] = float("nan")
    _three_layers(collector, targets, _batch([3, 2], 3), states)
    for k in range(3):
        for prompt, n in ((0, 3), (1, 2)):
            got = writer.files[(prompt, f"model.layers.{k}")]
            for role, t in (("input", states[k]), ("output", states[k + 1])):
                torch.testing.assert_close(got[f"model.layers.{k}:{role}"], t[prompt, :n], rtol=0, atol=0,
                                           equal_nan=True)
    expected = {0: {"input", "output"}, 1: {"input", "output"}, 2: {"input"}}
    if nan:  # states 1 and 2 are the float32 run
        expected = {0: {"input"}, 1: set(), 2: set()}
    for k in range(3):
        want = set() if check_bytes else {f"model.layers.{k}:{role}" for role in expected[k]}
        assert writer.finite[(0, f"model.layers.{k}")] == want
        tail = {f"model.layers.{k}:input_padding"} if f"model.layers.{k}:input" in want else set()
        assert writer.finite[(1, f"model.layers.{k}")] == want | tail
    assert collector.pool.used == 0, "every buffer came back"


def test_collector_backpressure_waits_for_the_writer():
    """With the budget spent and the writer holding its buffers, the next batch waits; once the
    writer lets go, it proceeds."""
    import torch

    writer = ListWriter(hold=True)
    targets = _targets(1)
    collector = Collector(writer, targets, pinned_budget_bytes=1 << 16, copy_host_tensors=True)  # one packed buffer
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
    stats = collector.stats()
    assert stats["capture_wait_seconds"] >= 0.25, stats  # the wait is counted: the manifest says the disk was the bound
    assert stats["pinned_peak_bytes"] == 1 << 16 and "pinned_alloc_seconds" in stats, stats
    collector.abort()


def test_a_flush_over_two_devices_never_waits_for_its_own_buffers():
    """A flush takes one buffer per device; with the budget spent by its first, the second must
    overdraw (nothing else will come back), not wait forever."""
    pool = PinnedPool(budget_bytes=1 << 16, pin=False)
    first = pool.take(1 << 16)
    second = _in_thread(lambda: pool.take(1 << 16, own=first.numel()))
    assert pool.used == 2 << 16 and second.numel() == 1 << 16


def test_buffers_taken_in_inference_mode_are_reused_outside_it():
    """A forward pass runs under torch.inference_mode, a later flush (close) may not: a pooled
    buffer made inside must still take copies outside (an inference tensor would refuse)."""
    writer = ListWriter()
    targets = _targets(1)
    inp, out = targets
    collector = Collector(writer, targets, pinned_budget_bytes=1 << 20, copy_host_tensors=True)
    with torch.inference_mode():
        collector.start_batch(_batch([5], 5))
        collector.take(inp, [torch.randn(1, 5, 4)])
        collector.take(out, [torch.randn(1, 5, 4)])
        collector.flush()  # the buffer, made in inference mode, is written and back in the pool
    collector.start_batch(_batch([5], 5))
    collector.take(inp, [torch.randn(1, 5, 4)])
    collector.take(out, [torch.randn(1, 5, 4)])
    collector.close()  # outside inference mode, reusing that buffer
    assert len(writer.files) == 1 and collector.pool.held == 1 << 16


def test_a_flush_packs_into_slabs_and_a_larger_tensor_gets_its_own_buffer():
    """The pool hands out one size class up to a slab (a sixteenth of the budget: 1 MiB here), so a
    flush packs its tensors into slab-sized copies; a tensor larger than a slab is copied alone
    into a power of two. The files are the tensors, whatever the packing."""
    writer = ListWriter()
    targets = _targets(3)
    collector = Collector(writer, targets, pinned_budget_bytes=16 << 20, copy_host_tensors=True)
    taken = []
    take = collector.pool.take
    collector.pool.take = lambda n, own=0: taken.append(collector.pool.size_class(n)) or take(n, own)
    states = [torch.randn(1, 2, 50_000) for _ in range(3)] + [torch.randn(1, 2, 200_000)]  # 400 KB x 3, 1.6 MB
    _three_layers(collector, targets, _batch([2], 2), states)
    for k in range(3):
        got = writer.files[(0, f"model.layers.{k}")]
        assert torch.equal(got[f"model.layers.{k}:input"], states[k][0]) and \
            torch.equal(got[f"model.layers.{k}:output"], states[k + 1][0])
    assert sorted(taken) == [1 << 20] * 2 + [1 << 21], taken  # 2 x 400 KB share a slab; 1.6 MB alone
    assert collector.pool.used == 0


def test_the_pool_takes_slabs_pinned_ahead_before_pinning_more(monkeypatch):
    """Slabs `reserve` pinned while the model loaded are handed out first: no pinning on the
    forward thread (on a CPU there is nothing to pin: `reserve` starts nothing)."""
    from layerwise import pinned

    ahead = [torch.empty(pinned.SLAB_BYTES, dtype=torch.uint8) for _ in range(2)]
    monkeypatch.setattr(pinned, "_RESERVE", list(ahead))
    pool = PinnedPool(budget_bytes=4 * pinned.SLAB_BYTES, pin=True, slab_bytes=pinned.SLAB_BYTES)
    first, second = pool.take(10), pool.take(pinned.SLAB_BYTES)
    assert {id(first), id(second)} == {id(t) for t in ahead} and pinned._RESERVE == []
    assert pool.alloc_seconds == 0 and pool.held == 2 * pinned.SLAB_BYTES
    if not torch.cuda.is_available():
        assert pinned.reserve(4 << 30) is None


def test_reserve_pins_a_fixed_count_and_only_slabs_a_pool_will_take(monkeypatch):
    """`reserve` tops the process up to RESERVE_BYTES once (slabs a pool takes meanwhile are not
    pinned again) and pins nothing for a budget whose pool would use smaller slabs."""
    from layerwise import pinned

    monkeypatch.setattr(pinned.torch.cuda, "is_available", lambda: True)
    assert pinned.slab_for(16 << 20) == 1 << 20 and pinned.reserve(16 << 20) is None
    monkeypatch.setattr(pinned, "_RESERVE", [None] * (pinned.RESERVE_BYTES // pinned.SLAB_BYTES - 2))
    made = []
    monkeypatch.setattr(pinned, "new_buffer", lambda n, pin: made.append((n, pin)) or torch.empty(1))
    pinned.reserve(4 << 30).join()
    assert made == [(pinned.SLAB_BYTES, True)] * 2 and len(pinned._RESERVE) == pinned.RESERVE_BYTES // pinned.SLAB_BYTES


def test_reserve_for_a_capture_expected_small_pins_only_the_slabs_it_will_hold(monkeypatch):
    """A layer test's capture holds a few layer outputs in flight: the process pins slabs for
    those (rounded up), not a whole RESERVE_BYTES it would then tear down; never more than the
    reserve for a large one."""
    from layerwise import pinned

    monkeypatch.setattr(pinned.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(pinned, "_RESERVE", [])
    made = []
    monkeypatch.setattr(pinned, "new_buffer", lambda n, pin: made.append((n, pin)) or torch.empty(1))
    pinned.reserve(4 << 30, pinned.SLAB_BYTES + 1).join()
    assert made == [(pinned.SLAB_BYTES, True)] * 2
    assert pinned.reserve(4 << 30, 10) is None and len(made) == 2  # it holds enough already
    pinned.reserve(4 << 30, 100 << 30).join()
    assert len(pinned._RESERVE) == pinned.RESERVE_BYTES // pinned.SLAB_BYTES


def test_the_largest_batch_s_logits_buffer_is_pinned_ahead_and_the_pool_takes_it(monkeypatch):
    """An extract's logits are over a slab: their buffer (the pool's size class for them) is
    pinned in the background while the layers run, once, within the budget beside the slabs,
    and the pool hands it out instead of pinning on the forward thread."""
    from types import SimpleNamespace

    from layerwise import extract, pinned
    from layerwise.extract import ExtractOptions

    monkeypatch.setattr(pinned.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(pinned, "_LARGE", {})
    made = []
    monkeypatch.setattr(pinned, "new_buffer", lambda n, pin: made.append(n) or torch.empty(n, dtype=torch.uint8))
    batches = [SimpleNamespace(input_ids=torch.zeros(2, 100)), SimpleNamespace(input_ids=torch.zeros(3, 90))]
    options = ExtractOptions(pinned_budget_gib=4)
    assert extract.pin_head_ahead(options, ("residual",), batches, 200_000, torch.bfloat16) is None  # no logits
    extract.pin_head_ahead(options, ("residual", "logits"), batches, 200_000, torch.bfloat16).join()
    size = 1 << (270 * 200_000 * 2 - 1).bit_length()  # 3 x 90 tokens: the largest batch
    assert made == [size] and [t.numel() for t in pinned._LARGE[size]] == [size]
    assert pinned.reserve_large(4 << 30, size) is None and made == [size]  # held already
    assert pinned.reserve_large(4 << 30, pinned.SLAB_BYTES) is None  # a slab's: the slab reserve
    assert pinned.reserve_large(4 << 30, 3 << 30) is None  # with the slabs, over the budget
    pool = PinnedPool(budget_bytes=4 << 30, pin=True, slab_bytes=pinned.SLAB_BYTES)
    taken = pool.take(270 * 200_000 * 2 + 40)  # the logits and their sums
    assert taken.numel() == size and pinned._LARGE[size] == [] and pool.alloc_seconds == 0 and made == [size]


class ThreadWriter(ListWriter):
    """A ListWriter that notes which thread handed it each file, and can hold one put until told."""

    def __init__(self):
        super().__init__()
        self.threads, self.order, self.gate = {}, [], None

    def put(self, prompt, group, tensors, on_written=None, finite=frozenset()):
        if self.gate is not None:
            self.gate.wait(5)
        self.threads[(prompt, group)] = threading.current_thread().name
        self.order.append((prompt, group))
        super().put(prompt, group, tensors, on_written)


def test_flush_completes_the_last_copy_itself_when_the_completion_thread_is_idle():
    """`flush` with nothing queued cuts and hands the files on its own thread (no wake-up of
    another thread, then of this one); with a flush still queued it leaves the work to the
    completion thread: files keep their order whichever thread hands them on. (Layer 1's hooks
    never fire here: else the batch's last hook would have flushed already.)"""
    targets = _targets(2)
    writer = ThreadWriter()
    collector = Collector(writer, targets, pinned_budget_bytes=1 << 20, copy_host_tensors=True)
    states = [torch.randn(1, 4, 2) for _ in range(2)]
    collector.start_batch(_batch([4], 4))
    collector.take(targets[0], [states[0]])
    collector.take(targets[1], [states[1]])
    collector.flush()
    assert writer.threads == {(0, "model.layers.0"): threading.current_thread().name}
    # a batch queued for the completion thread (held there by the writer), then another flushed
    writer.gate = threading.Event()
    collector.start_batch(dataclasses.replace(_batch([4], 4), prompts=(Prompt(1, None, (0, 1, 2, 3)),)))
    collector.take(targets[0], [states[0]])
    collector.take(targets[1], [states[1]])
    collector.start_batch(dataclasses.replace(_batch([4], 4), prompts=(Prompt(2, None, (0, 1, 2, 3)),)))
    collector.take(targets[0], [states[1]])
    collector.take(targets[1], [states[0]])
    threading.Timer(0.2, writer.gate.set).start()
    _in_thread(collector.flush)
    assert writer.order == [(0, "model.layers.0"), (1, "model.layers.0"), (2, "model.layers.0")]
    assert writer.threads[(1, "model.layers.0")] == "layerwise-capture"
    assert torch.equal(writer.files[(2, "model.layers.0")]["model.layers.0:input"], states[1][0])
    _in_thread(collector.close)
    assert collector.pool.used == 0, "every buffer came back"


def test_one_tensor_under_names_stored_in_two_dtypes_is_stored_in_each():
    """A tensor object two targets both yield (a --modules module returning the router's bf16
    top-k weights): the router's file stores it in float32, the module's file as it is."""
    layer, router, extra = "model.layers.0", "model.layers.0.mlp.gate", "model.layers.0.mlp.scale"
    targets = [Target(router, "output", tuple(f"{router}:{r}" for r in
                                              ("router_logits", "score_bias", "topk_weights", "topk_ids")), layer),
               Target(extra, "output", (f"{extra}:output",), extra, extra=True)]
    writer = ListWriter()
    collector = Collector(writer, targets, pinned_budget_bytes=1 << 20, copy_host_tensors=True)
    collector.start_batch(_batch([3], 3))
    weights = torch.rand(3, 2, dtype=torch.bfloat16)
    collector.take(targets[0], [torch.randn(3, 4), None, weights, torch.zeros(3, 2, dtype=torch.int64)])
    collector.take(targets[1], [weights])
    _in_thread(collector.close)
    assert writer.files[(0, layer)][f"{router}:topk_weights"].dtype == torch.float32
    assert torch.equal(writer.files[(0, layer)][f"{router}:topk_weights"], weights.float())
    assert torch.equal(writer.files[(0, extra)][f"{extra}:output"], weights)
    assert writer.files[(0, extra)][f"{extra}:output"].dtype == torch.bfloat16


def test_flattened_router_tensors_are_cut_per_prompt_from_their_token_rows():
    """A router's [batch x tokens, k] outputs: prompt r's rows are r*S .. r*S+n, padding dropped;
    a single unpadded prompt keeps all rows."""
    layer, router = "model.layers.0", "model.layers.0.mlp.gate"
    targets = [Target(router, "output", tuple(f"{router}:{r}" for r in
                                              ("router_logits", "score_bias", "topk_weights", "topk_ids")), layer)]
    for lengths, width in (([3, 1, 2], 3), ([4], 4)):
        writer = ListWriter()
        collector = Collector(writer, targets, pinned_budget_bytes=1 << 20, copy_host_tensors=True)
        collector.start_batch(_batch(lengths, width))
        rows = len(lengths) * width
        logits, ids = torch.randn(rows, 5), torch.arange(rows * 2).reshape(rows, 2)
        collector.take(targets[0], [logits, torch.ones(5), torch.rand(rows, 2), ids])
        _in_thread(collector.close)
        for r, n in enumerate(lengths):
            got = writer.files[(r, layer)]
            assert torch.equal(got[f"{router}:router_logits"], logits[r * width:r * width + n])
            assert torch.equal(got[f"{router}:topk_ids"], ids[r * width:r * width + n].to(torch.int32))
            assert got[f"{router}:topk_ids"].dtype == torch.int32 and torch.equal(got[f"{router}:score_bias"],
                                                                                   torch.ones(5))


def test_the_batch_s_last_hook_flushes_at_once_and_a_batch_missing_a_hook_waits_for_its_end():
    """Once every hook of a batch fired, its last tensors are copied and their files handed on
    at once (the model's final norm and head run meanwhile), with no `flush` or `close` called;
    a batch where a hook did not fire (an expert no token chose) keeps what it holds until its
    end, then writes the same files."""
    targets = _targets(2)
    writer = ThreadWriter()
    collector = Collector(writer, targets, pinned_budget_bytes=1 << 20, copy_host_tensors=True,
                          flush_bytes=1 << 30)  # no decoder layer's input flushes: only the last hook
    states = [torch.randn(2, 4, 3) for _ in range(3)]
    for batch in range(2):  # a second batch counts its own hooks
        collector.start_batch(dataclasses.replace(_batch([4, 4], 4), prompts=(
            Prompt(2 * batch, None, (0, 1, 2, 3)), Prompt(2 * batch + 1, None, (0, 1, 2, 3)))))
        for k in range(2):
            inp, out = [t for t in targets if t.group == f"model.layers.{k}"]
            collector.take(inp, [states[k]])
            assert not writer.files.keys() & {(2 * batch, "model.layers.0")}, "flushed before the last hook"
            collector.take(out, [states[k + 1]])
        assert not collector._held, "the last hook's tensors still held"
        deadline = time.monotonic() + 5
        while len(writer.files) < 4 * (batch + 1) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(writer.files) == 4 * (batch + 1), "the files were not handed on before the batch ended"
        assert writer.threads[(2 * batch + 1, "model.layers.1")] == "layerwise-capture"
    assert torch.equal(writer.files[(3, "model.layers.1")]["model.layers.1:output"], states[2][1])
    collector.start_batch(dataclasses.replace(_batch([4], 4), prompts=(Prompt(4, None, (0, 1, 2, 3)),)))
    collector.take(targets[0], [states[0]])
    collector.take(targets[1], [states[1]])  # layer 1's hooks never fire
    time.sleep(0.2)
    assert (4, "model.layers.0") not in writer.files and len(collector._held) == 2
    _in_thread(collector.close)
    assert torch.equal(writer.files[(4, "model.layers.0")]["model.layers.0:output"], states[1][0])
    assert collector.pool.used == 0, "every buffer came back"


def test_a_model_s_last_layer_is_flushed_before_its_final_norm_runs(tiny_llama):
    """In a real forward pass the last hook is the last decoder layer's output: its copy is
    issued before the model's final norm (and head) run, not after the forward pass returns."""
    from layerwise import capture, loading

    loaded = loading.load_model(tiny_llama.spec, loading.LoadOptions(device_map="cpu", dtype="float32"))
    model, anatomy = loaded.model, loaded.anatomy
    targets = capture.plan_targets(anatomy, ("residual",), tuple(range(anatomy.num_layers)))
    writer = ThreadWriter()
    collector = Collector(writer, targets, pinned_budget_bytes=1 << 24, copy_host_tensors=True,
                          flush_bytes=1 << 30)
    seen = []
    norm = model.get_submodule(anatomy.norm_path)
    handle = norm.register_forward_pre_hook(lambda mod, args: seen.append((len(collector._held), collector._queued)))
    batch = _batch([5, 3], 5)
    try:
        with capture.Capture(model, targets, collector), torch.inference_mode():
            collector.start_batch(batch)
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    finally:
        handle.remove()
    _in_thread(collector.close)
    assert seen and seen[0][0] == 0, f"the norm ran with {seen[0][0]} tensors still held (not flushed)"
    assert len(writer.files) == 2 * anatomy.num_layers


def test_a_flush_s_files_reach_a_writer_that_takes_many_in_one_call():
    """A writer with `put_many` (the run writer: one message to each writer process for them all)
    gets a flush's files in one call, in the order `put` would have had them; one without it
    gets them one by one."""
    class ManyWriter(ListWriter):
        def __init__(self):
            super().__init__()
            self.calls, self.order = [], []

        def put_many(self, files):
            self.calls.append(len(files))
            for prompt, group, tensors, on_written, finite in files:
                self.order.append((prompt, group))
                self.put(prompt, group, tensors, on_written, finite)

    g = torch.Generator().manual_seed(7)
    states = [torch.randn(2, 3, 4, generator=g) for _ in range(4)]
    targets = _targets(3)
    got = {}
    batched = ManyWriter()
    for writer in (batched, ListWriter()):
        collector = Collector(writer, targets, pinned_budget_bytes=1 << 20, copy_host_tensors=True,
                              flush_bytes=1 << 20)
        _three_layers(collector, targets, _batch([3, 2], 3), states)  # one flush, at the batch's last hook
        assert collector.pool.used == 0, "every buffer came back"
        got[type(writer).__name__] = writer.files
    assert batched.calls == [6]  # 3 layers x 2 prompts
    assert batched.order == [(p, f"model.layers.{k}") for k in range(3) for p in (0, 1)]
    many = got["ManyWriter"]
    assert many.keys() == got["ListWriter"].keys()
    for key, tensors in many.items():
        assert tensors.keys() == got["ListWriter"][key].keys()
        assert all(torch.equal(t, got["ListWriter"][key][n]) for n, t in tensors.items())


def test_no_garbage_collection_while_a_batch_s_layers_run_and_it_is_given_back(tiny_llama):
    """In a real forward pass the garbage collector is off from `start_batch` through every
    decoder layer, on again when the norm runs (after the last hook), after `flush`, after
    `abort` mid-batch, and never turned on by a capture when the caller had it off. Batches that
    do not fire every hook (streaming) turn it off no more once one has ended so."""
    import gc

    from layerwise import capture, loading

    loaded = loading.load_model(tiny_llama.spec, loading.LoadOptions(device_map="cpu", dtype="float32"))
    model, anatomy = loaded.model, loaded.anatomy
    targets = capture.plan_targets(anatomy, ("residual",), tuple(range(anatomy.num_layers)))
    batch = _batch([5, 3], 5)
    seen = []
    layers = [model.get_submodule(anatomy.layer(i)) for i in range(anatomy.num_layers)]
    handles = [m.register_forward_pre_hook(lambda mod, args: seen.append(("layer", gc.isenabled()))) for m in layers]
    handles.append(model.get_submodule(anatomy.norm_path).register_forward_pre_hook(
        lambda mod, args: seen.append(("norm", gc.isenabled()))))
    assert gc.isenabled()
    try:
        for caller_had_it_on in (True, False):
            if not caller_had_it_on:
                gc.disable()
            seen.clear()
            collector = Collector(ThreadWriter(), targets, pinned_budget_bytes=1 << 24, copy_host_tensors=True)
            with capture.Capture(model, targets, collector), torch.inference_mode():
                collector.start_batch(batch)
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
                collector.flush()
                assert gc.isenabled() == caller_had_it_on
                collector.start_batch(batch)  # a batch that fails half-way: the capture is aborted
                assert not gc.isenabled()
                collector.abort()
                assert gc.isenabled() == caller_had_it_on
            assert seen == [("layer", False)] * anatomy.num_layers + [("norm", caller_had_it_on)]
        gc.enable()
        # batches that fire only some hooks (streaming: a layer at a time): after the first, it stays on
        collector = Collector(ThreadWriter(), targets, pinned_budget_bytes=1 << 24, copy_host_tensors=True)
        on = []
        for _ in range(3):
            collector.start_batch(batch)
            collector.take(targets[0], [torch.zeros(2, 5, 4)])
            on.append(gc.isenabled())
        _in_thread(collector.close)
        assert on == [False, True, True] and gc.isenabled()
    finally:
        gc.enable()
        for h in handles:
            h.remove()
