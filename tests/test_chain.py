"""chain.Link's parts that need no second process: which pairs it connects, and the marks in
torchrun's store that say a layer's outputs are on their way (one schedule's marks never answer
another's)."""

from __future__ import annotations

import datetime

import torch.distributed as dist

from layerwise.chain import Link
from layerwise.distributed import Env, Session


def _session(rank: int, store) -> Session:
    return Session(Env(rank, 3), timeout_s=5, store=store)


def test_pairs_are_the_chains_edges_each_once_in_one_order():
    link = Link(_session(0, dist.HashStore()), [(0, 1), (1, 2), (2, 0), (0, 1), (1, 1)])
    assert link.pairs == [(0, 1), (0, 2), (1, 2)]  # undirected, no self-pairs, sorted: every rank's order


def test_a_mark_is_seen_by_the_same_schedule_only():
    store = dist.HashStore()
    store.set_timeout(datetime.timedelta(seconds=5))
    sender, receiver = Link(_session(0, store), [(0, 1)]), Link(_session(1, store), [(0, 1)])
    receiver.tag = sender.tag  # ranks make their schedules in the same order: the same tag
    assert not receiver.posted(0)
    sender.post(0)
    assert receiver.posted(0) and not receiver.posted(1)
    later = Link(_session(1, store), [(0, 1)])  # the next schedule of the job
    assert later.tag != sender.tag and not later.posted(0)
