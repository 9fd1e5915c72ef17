"""Epoch planning: determinism, exactly-once coverage, equal batch counts, resume arithmetic.

Pure numpy: many configurations run in well under a second.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from data_shards.partition import (
    balanced_bounds,
    consumed_batches,
    num_batches,
    plan_worker_for,
    rank_batches,
    shard_order,
    split_batches,
    worker_plan,
)

UNEVEN = [7, 7, 3, 7, 0, 7, 5, 11]  # 47 samples, an empty shard, sizes all over the place


def _all_samples(counts):
    return {(s, i) for s, n in enumerate(counts) for i in range(n)}


def _plan(counts, ws, nw, bs, epoch=0, seed=0, shuffle=True, buf=5):
    return [
        rank_batches(counts, rank=r, world_size=ws, num_workers=nw, batch_size=bs, epoch=epoch,
                     seed=seed, shuffle=shuffle, shuffle_buffer=buf)
        for r in range(ws)
    ]


@pytest.mark.parametrize("ws,nw,bs,shuffle", list(itertools.product([1, 2, 3], [0, 1, 2, 3], [1, 4, 6], [True, False])))
def test_every_sample_exactly_once_with_equal_batch_counts(ws, nw, bs, shuffle):
    counts = UNEVEN
    total = sum(counts)
    if bs == 1 and total % ws:
        with pytest.raises(ValueError, match="same number of non-empty batches"):
            _plan(counts, ws, nw, bs)
        return
    plans = _plan(counts, ws, nw, bs, shuffle=shuffle)
    seen = [tuple(x) for rank in plans for b in rank for x in b]
    assert len(seen) == total and set(seen) == _all_samples(counts)
    k = {len(rank) for rank in plans}
    assert k == {num_batches(total, ws, bs)}
    assert all(1 <= len(b) <= bs for rank in plans for b in rank)


def test_many_random_configurations():
    rng = np.random.default_rng(0)
    for _ in range(200):
        counts = rng.integers(0, 30, size=rng.integers(1, 12))
        total = int(counts.sum())
        ws, nw, bs = int(rng.integers(1, 5)), int(rng.integers(0, 5)), int(rng.integers(2, 9))
        try:
            plans = _plan(counts, ws, nw, bs, epoch=int(rng.integers(3)), buf=int(rng.integers(1, 20)))
        except ValueError:
            sizes = np.diff(balanced_bounds(total, ws))
            assert sizes.min() < -(-sizes.max() // bs) or total == 0
            continue
        seen = [tuple(x) for rank in plans for b in rank for x in b]
        assert len(seen) == total and set(seen) == _all_samples(counts)
        assert len({len(r) for r in plans}) == 1


def test_same_seed_same_plan_other_epoch_other_order():
    a = _plan(UNEVEN, 2, 2, 4, epoch=0, seed=1)
    b = _plan(UNEVEN, 2, 2, 4, epoch=0, seed=1)
    c = _plan(UNEVEN, 2, 2, 4, epoch=1, seed=1)
    d = _plan(UNEVEN, 2, 2, 4, epoch=0, seed=2)
    flat = lambda p: np.concatenate([x for r in p for x in r]).tolist()  # noqa: E731
    assert flat(a) == flat(b)
    assert flat(a) != flat(c) and flat(a) != flat(d)
    assert sorted(map(tuple, flat(a))) == sorted(map(tuple, flat(c)))


def test_eval_order_is_manifest_order():
    plans = _plan(UNEVEN, 1, 0, 4, shuffle=False)
    flat = [tuple(x) for b in plans[0] for x in b]
    assert flat == sorted(_all_samples(UNEVEN))
    assert shard_order(5, epoch=3, seed=9, shuffle=False).tolist() == [0, 1, 2, 3, 4]
    assert sorted(shard_order(5, epoch=3, seed=9).tolist()) == [0, 1, 2, 3, 4]


def test_balanced_spans_and_greedy_batches():
    assert np.diff(balanced_bounds(10, 3)).tolist() == [3, 3, 4]
    assert split_batches(10, 3, 4).tolist() == [4, 4, 2]
    assert split_batches(9, 3, 4).tolist() == [4, 4, 1]
    assert split_batches(5, 5, 4).tolist() == [1] * 5
    assert split_batches(12, 3, 4).tolist() == [4, 4, 4]
    with pytest.raises(ValueError):
        split_batches(2, 3, 4)
    with pytest.raises(ValueError, match="non-empty batches"):
        num_batches(2, 3, 4)


def test_workers_read_contiguous_disjoint_spans_round_robin():
    counts = UNEVEN
    for nw in (2, 3):
        plans = [worker_plan(counts, rank=0, world_size=1, worker=w, num_workers=nw, batch_size=4,
                             epoch=0, seed=0) for w in range(nw)]
        k = num_batches(sum(counts), 1, 4)
        assert sorted(i for p in plans for i in p.batch_ids.tolist()) == list(range(k))
        for p in plans:
            assert all(i % nw == p.worker for i in p.batch_ids.tolist())
        # Laid out in order: worker w's span ends where w+1's starts (in the shuffled shard order).
        order = shard_order(len(counts), epoch=0, seed=0)
        seq = [(int(s), i) for s in order for i in range(counts[s])]
        got = [tuple(x) for p in plans for x in p.samples().tolist()]
        assert got == seq


def test_window_shuffle_stays_inside_windows():
    p = worker_plan([50], rank=0, world_size=1, worker=0, num_workers=0, batch_size=5, epoch=0,
                    seed=0, shuffle_buffer=8)
    for lo in range(0, 50, 8):
        assert sorted(p.order[lo : lo + 8].tolist()) == list(range(lo, min(lo + 8, 50)))
    assert p.order.tolist() != list(range(50))


@pytest.mark.parametrize("nw", [1, 2, 3])
def test_rotated_workers_resume_exactly(nw):
    """Simulate DataLoader's round-robin after a restart at batch j: outputs == plan[j:]."""
    counts, bs = UNEVEN, 3
    full = rank_batches(counts, rank=1, world_size=2, num_workers=nw, batch_size=bs, epoch=2, seed=5,
                        shuffle_buffer=4)
    for j in range(len(full) + 1):
        queues = []
        for lw in range(nw):
            pw = plan_worker_for(lw, j, nw)
            p = worker_plan(counts, rank=1, world_size=2, worker=pw, num_workers=nw, batch_size=bs,
                            epoch=2, seed=5, shuffle_buffer=4)
            queues.append(p.batches()[consumed_batches(j, pw, nw):])
        out, t = [], 0
        while any(queues):
            q = queues[t % nw]
            if q:
                out.append(q.pop(0))
            t += 1
        assert [b.tolist() for b in out] == [b.tolist() for b in full[j:]]
