"""Lanes: the epoch's order and cursor survive a change of world size (pure numpy, no Ray).

For world sizes 1, 2, 4 and 8 over the same lanes: every sample exactly once per epoch, equal
micro-batch counts on every rank, the same samples in every optimizer step, and a cursor taken
after any optimizer step at one size resumed at any other covers the epoch exactly once.
"""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from data_shards.partition import (
    lane_consumed,
    lane_layout,
    lane_pairs,
    lane_worker_batches,
    layout_rank_batches,
    num_batches,
    plan_worker_for,
    rank_batches,
    worker_plan,
)

UNEVEN = [7, 7, 3, 7, 0, 7, 5, 11, 13, 2, 9, 6]  # 77 samples, an empty shard
SIZES = [1, 2, 4, 8]


def _all(counts):
    return Counter((s, i) for s, n in enumerate(counts) for i in range(n))


def _rank_batches(counts, lanes, ws, q, nw=2, lane_batch=2, epoch=0, seed=3, buf=4):
    return [layout_rank_batches(counts, lane_layout(lanes, ws, r, q), num_workers=nw, lane_batch=lane_batch,
                                epoch=epoch, seed=seed, shuffle_buffer=buf) for r in range(ws)]


def _steps(batches_per_rank, ws_groups, accum):
    """Samples of each optimizer step: micro-batches [t*g*accum, (t+1)*g*accum) of every rank."""
    per = ws_groups * accum
    k = len(batches_per_rank[0])
    return [Counter(tuple(x) for rank in batches_per_rank for b in rank[t * per:(t + 1) * per] for x in b)
            for t in range(k // per)]


@pytest.mark.parametrize("ws,q", [(w, q) for w in SIZES for q in (1, 2, 4, 8) if (8 // w) % q == 0])
@pytest.mark.parametrize("nw", [0, 1, 2, 3])
def test_every_world_size_reads_every_sample_once_with_equal_counts(ws, q, nw):
    plans = _rank_batches(UNEVEN, 8, ws, q, nw=nw)
    seen = Counter(tuple(x) for rank in plans for b in rank for x in b)
    assert seen == _all(UNEVEN)
    k_c = num_batches(sum(UNEVEN), 8, 2)
    assert {len(rank) for rank in plans} == {k_c * (8 // ws) // q}
    assert all(1 <= len(b) <= 2 * q for rank in plans for b in rank)


@pytest.mark.parametrize("accum", [1, 2])
def test_an_optimizer_step_holds_the_same_samples_at_every_world_size(accum):
    ref = None
    for ws in SIZES:
        for q in [q for q in (1, 2, 4, 8) if (8 // ws) % q == 0]:
            g = 8 // ws // q
            steps = _steps(_rank_batches(UNEVEN, 8, ws, q), g, accum)
            ref = ref or steps
            assert steps == ref, (ws, q)


@pytest.mark.parametrize("epoch,seed", [(0, 3), (1, 3), (0, 11)])
def test_a_cursor_at_any_step_resumes_at_any_other_size_exactly_once(epoch, seed):
    lanes, accum = 8, 1
    layouts = {(ws, q): _rank_batches(UNEVEN, lanes, ws, q, epoch=epoch, seed=seed)
               for ws in SIZES for q in (1, 2) if (lanes // ws) % q == 0}
    k_c = num_batches(sum(UNEVEN), lanes, 2)
    for (a, qa), (b, qb) in itertools.product(layouts, repeat=2):
        ga, gb = lanes // a // qa, lanes // b // qb
        for t in range(0, k_c // accum + 1):
            i = t * accum  # lane index of the cursor after optimizer step t
            before = Counter(tuple(x) for rank in layouts[(a, qa)] for bt in rank[:i * ga] for x in bt)
            after = Counter(tuple(x) for rank in layouts[(b, qb)] for bt in rank[i * gb:] for x in bt)
            assert before + after == _all(UNEVEN), (a, qa, b, qb, t)


def test_lanes_equal_to_the_world_size_is_the_plan_of_today():
    for ws, nw in itertools.product([1, 2, 3], [0, 2, 3]):
        for r in range(ws):
            new = layout_rank_batches(UNEVEN, lane_layout(ws, ws, r), num_workers=nw, lane_batch=4, epoch=2,
                                      seed=5, shuffle_buffer=5)
            old = rank_batches(UNEVEN, rank=r, world_size=ws, num_workers=nw, batch_size=4, epoch=2, seed=5,
                               shuffle_buffer=5)
            assert len(new) == len(old) and all(np.array_equal(x, y) for x, y in zip(new, old))


@pytest.mark.parametrize("ws,q,nw", [(w, q, nw) for w in SIZES for q in (1, 2) for nw in (0, 1, 2, 3)
                                     if (8 // w) % q == 0])
def test_each_lane_worker_is_read_by_one_dataloader_worker_and_resume_is_exact(ws, q, nw):
    """What the stream executes: each plan worker pulls, in order, lane batches from its own
    (lane, lane worker) pairs, skipping each pair's consumed batches; from any start batch the
    rank's micro-batches come out equal to the plan's."""
    lanes, lb, buf, epoch, seed = 8, 2, 4, 1, 9
    n = max(1, nw)
    for r in range(ws):
        layout = lane_layout(lanes, ws, r, q)
        ref = layout_rank_batches(UNEVEN, layout, num_workers=nw, lane_batch=lb, epoch=epoch, seed=seed,
                                  shuffle_buffer=buf)
        owners = Counter(p for w in range(n) for p in lane_pairs(layout, w, nw))
        assert set(owners.values()) == {1} and len(owners) == layout.per_rank * n
        for start in range(len(ref) + 1):
            got: dict[int, np.ndarray] = {}
            for lw in range(n):
                pw = plan_worker_for(lw, start, nw)
                mine = set(lane_pairs(layout, pw, nw))
                queues = {}
                for k, cw in mine:
                    p = worker_plan(UNEVEN, rank=k, world_size=lanes, worker=cw, num_workers=nw, batch_size=lb,
                                    epoch=epoch, seed=seed, shuffle_buffer=buf)
                    c = lane_consumed(layout, k, cw, start, nw)
                    queues[(k, cw)] = list(zip(p.batch_ids.tolist(), p.batches()))[c:]
                for j, i, pairs in lane_worker_batches(layout, pw, nw, start, len(ref)):
                    assert set(pairs) <= mine
                    parts = []
                    for pair in pairs:
                        bid, b = queues[pair].pop(0)
                        assert bid == i
                        parts.append(b)
                    got[j] = np.concatenate(parts)
                assert all(not q_ for q_ in queues.values())  # nothing left unread, nothing read twice
            assert sorted(got) == list(range(start, len(ref)))
            assert all(np.array_equal(got[j], ref[j]) for j in got)


def test_a_world_size_that_does_not_divide_the_lanes_is_refused_naming_those_that_do():
    with pytest.raises(ValueError, match="world size 3 does not divide the run's 8 data lanes; .*: 1, 2, 4, 8"):
        lane_layout(8, 3)
    with pytest.raises(ValueError, match="must divide"):
        lane_layout(8, 2, 0, per_batch=3)
