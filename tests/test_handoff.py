"""The shared batch slots of the worker-to-main hand-off: ownership by generation, and the
bytes a forked worker writes being the bytes the parent reads."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest

from data_shards.handoff import SlotPool


def test_slots_are_taken_released_and_reclaimed_from_earlier_generations():
    pool = SlotPool(workers=2, slots=2, batch_size=3, image_size=4, num_classes=5)
    assert pool.images.shape == (4, 3, 4, 4, 3) and pool.targets.shape == (4, 3, 5)
    assert pool.nbytes == 4 * 3 * (4 * 4 * 3 + 5)
    assert [pool.acquire(1, 1), pool.acquire(1, 1)] == [2, 3]  # worker 1 owns slots 2 and 3
    assert pool.acquire(1, 1) == -1  # all in use in this generation
    pool.release(3)
    assert pool.acquire(1, 1) == 3
    assert pool.acquire(0, 1) == 0  # other workers' slots are theirs
    # Generation 2: batches of generation 1 that were never released were discarded.
    assert [pool.acquire(1, 2), pool.acquire(1, 2), pool.acquire(1, 2)] == [2, 3, -1]


def _fill(pool: SlotPool, slot: int, value: int) -> None:
    pool.images[slot] = value
    pool.targets[slot] = -1


def test_a_forked_worker_writes_into_the_parents_mapping():
    pool = SlotPool(workers=1, slots=2, batch_size=2, image_size=3, num_classes=4)
    p = mp.get_context("fork").Process(target=_fill, args=(pool, 1, 7))
    p.start()
    p.join()
    assert p.exitcode == 0
    assert (pool.images[1] == 7).all() and (pool.targets[1] == -1).all()
    assert (pool.images[0] == 0).all()


def test_bad_sizes():
    with pytest.raises(ValueError, match="slots"):
        SlotPool(workers=1, slots=0, batch_size=2, image_size=3, num_classes=4)
    assert np.asarray(SlotPool(1, 1, 1, 1, 1).images).dtype == np.uint8
