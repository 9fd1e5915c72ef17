"""Epoch planning: which samples each rank and DataLoader worker reads, in which order.

Everything here is a pure numpy function of (shard sample counts, world size, rank, number of
workers, batch size, epoch, seed): no I/O, no torch. The stream (`stream.py`) executes a plan;
tests and other readers (the prior pass, evaluation) can compute the same plan without reading
a byte. Determinism and exact resume follow from that purity.

The plan, step by step:

1. Shard order. Train: a permutation of the manifest's shards drawn from
   `default_rng([seed, epoch])`, so every epoch visits shards in another order. Eval
   (`shuffle=False`): manifest order.
2. Rank spans. The global sample sequence is the concatenation of the shards in that order. It
   is cut into `world_size` contiguous spans whose sizes differ by at most one. A span may begin
   or end inside a shard; that shard is then read partly by two ranks (each streams it from the
   start and skips what is not its own: at most one shard prefix of wasted reading per span).
3. Equal batch counts. Every rank yields K = ceil(max_r n_r / batch_size) batches: unequal
   counts would leave one rank waiting in a collective that the others never enter. A rank cuts
   its n_r samples greedily, batch i taking min(B, remaining - batches_left_after_i), so every
   batch is non-empty and at most B. Ranks with fewer samples get a slightly smaller last batch
   or two (the tail of an epoch may hold batches of B-1, or a short last batch); there is no
   `drop_last` and no padding: every sample is read exactly once per epoch. If some rank has
   fewer than K samples (tiny data, or batch_size 1 with uneven spans) there is no such cut and
   `num_batches` raises ValueError.
4. Workers. torch's DataLoader takes batches from IterableDataset workers round-robin (output i
   comes from worker i % num_workers), so rank batch i belongs to worker i % nw. Worker w owns
   a contiguous sub-span of the rank span, its size the sum of its batches' sizes, workers laid
   out in order: no two workers read the same sample and each streams its shards sequentially.
5. Shuffle. Inside a worker span, samples are permuted within consecutive windows of
   `shuffle_buffer` positions, window k's permutation drawn from
   `default_rng([seed, epoch, rank, worker, k])`. This plays the role of a shuffle buffer, but
   its state is a function of the position alone, which is what makes resume exact and cheap:
   a worker that has handed out s samples restarts at window s // shuffle_buffer, re-reading at
   most the prefix of one shard (to reach the window's first sample in a tar stream) plus the
   consumed part of one window, and decodes nothing twice. Mixing quality is that of a buffer of
   the same size; across shards it comes from the per-epoch shard permutation.
6. Resume. A cursor is (epoch, batches handed out). Because batch counts are equal across ranks,
   the cursor of rank 0 is valid for every rank. On resume at rank batch j, DataLoader worker w'
   plays plan worker (w' + j) % nw, so the round-robin restarts exactly at batch j
   (`plan_worker_for`), and each plan worker skips the samples of its `consumed_batches`.

The plan depends on num_workers (step 4). A plan independent of it would either make every
worker read the whole rank span (nw times the I/O, ruinous from S3) or need a fixed number of
interleaved lanes per worker (many open streams and buffers); resuming mid-epoch with another
worker count is therefore refused by the stream, and allowed at an epoch boundary.

Lanes: the same epoch at another world size. Steps 2-6 are computed once for `lanes` canonical
ranks C (MosaicML's "canonical nodes"), each with `lane_batch` samples per batch; a lane's batch
i is the same samples whatever the world size. Canonical batch index i of every lane together
is one global micro-step; `grad_accum` consecutive indices are one optimizer step (the global
batch, C x lane_batch x accum samples). At world size W (W must divide C) rank r plays the
m = C/W contiguous lanes [r*m, (r+1)*m), and its micro-batch j concatenates lane batch
i = j // g of q adjacent lanes (group j % g, g = m/q): the per-worker batch is q x lane_batch and
the accumulation g x accum, so the optimizer step still covers indices [t*accum, (t+1)*accum) of
every lane. The cursor is therefore rank-free: a checkpoint at optimizer step t is lane index
i = t*accum, and any W dividing C resumes at micro-batch i*g. `lanes = world size` (the
default) is exactly the plan above.

Trade-offs of lanes. (a) Shuffle quality does not depend on C: the shard permutation is global
and the windows are per lane worker, as before. (b) Shards: C lane spans cut the sequence in C
places instead of W, so up to C (not W) shards are read partly by two lanes (at most one shard
prefix of wasted reading each). (c) Readers: a rank reads its m lanes side by side, so each
DataLoader worker holds about m open shard streams and shuffle windows (m = 1 at the run's own
size); set C to the largest world size the run may grow to, not larger. (d) Workers: a lane's
plan worker cw feeds micro-batches j with j = cw*g + group (mod nw), so every (lane, plan
worker) pair is read by exactly one DataLoader worker and each sample is read once; the number
of DataLoader workers is still part of the mid-epoch plan. (e) A world size that does not
divide C cannot keep every lane whole on one rank and is refused (`lane_layout` names the sizes
that can).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = [
    "shard_order",
    "balanced_bounds",
    "num_batches",
    "split_batches",
    "plan_worker_for",
    "consumed_batches",
    "WorkerPlan",
    "worker_plan",
    "rank_batches",
    "LaneLayout",
    "lane_layout",
    "valid_world_sizes",
    "lane_pairs",
    "lane_consumed",
    "lane_worker_batches",
    "layout_rank_batches",
]


def _counts(counts: Sequence[int] | np.ndarray) -> np.ndarray:
    c = np.asarray(counts, dtype=np.int64)
    if c.ndim != 1 or (c < 0).any():
        raise ValueError("shard sample counts must be a 1-D sequence of non-negative integers")
    return c


def _check(world_size: int, batch_size: int, num_workers: int = 0, shuffle_buffer: int = 1) -> None:
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")


def shard_order(num_shards: int, *, epoch: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """Manifest shard indices in the order this epoch reads them."""
    if not shuffle:
        return np.arange(num_shards, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(num_shards).astype(np.int64)


def balanced_bounds(total: int, parts: int) -> np.ndarray:
    """Boundaries [parts + 1] of `parts` contiguous spans of `total` whose sizes differ by <= 1."""
    return (np.arange(parts + 1, dtype=np.int64) * total) // parts


def num_batches(total: int, world_size: int, batch_size: int) -> int:
    """K, the number of batches every rank yields per epoch; ValueError if impossible."""
    _check(world_size, batch_size)
    sizes = np.diff(balanced_bounds(total, world_size))
    k = -(-int(sizes.max()) // batch_size)
    if int(sizes.min()) < k or k == 0:
        raise ValueError(
            f"{total} samples cannot give {world_size} ranks the same number of non-empty batches "
            f"of at most {batch_size} (a rank would get {int(sizes.min())} samples for {max(k, 1)} batches): "
            "use more data, a larger batch size or fewer ranks"
        )
    return k


def split_batches(n: int, k: int, batch_size: int) -> np.ndarray:
    """Sizes of k non-empty batches of at most batch_size covering n samples (greedy)."""
    if not k <= n <= k * batch_size:
        raise ValueError(f"cannot cut {n} samples into {k} non-empty batches of at most {batch_size}")
    # Greedy: full batches first; the shortfall n - k*B lands on the last batches, each still >= 1.
    i = np.arange(k, dtype=np.int64)
    taken_before = np.minimum(i * batch_size, n - (k - i))
    taken_upto = np.minimum((i + 1) * batch_size, n - (k - i - 1))
    return taken_upto - taken_before


def plan_worker_for(loader_worker: int, start_batch: int, num_workers: int) -> int:
    """The plan worker a DataLoader worker plays when iteration starts at rank batch start_batch."""
    nw = max(1, num_workers)
    return (loader_worker + start_batch) % nw


def consumed_batches(start_batch: int, plan_worker: int, num_workers: int) -> int:
    """How many of plan_worker's batches lie before rank batch start_batch."""
    nw = max(1, num_workers)
    return max(0, -(-(start_batch - plan_worker) // nw))


@dataclass(frozen=True)
class WorkerPlan:
    """What one plan worker of one rank reads in one epoch.

    `segments` rows are (manifest shard index, first sample, stop) in read order; worker
    position p is the p-th sample of their concatenation. `order` lists worker positions in the
    order they are handed out (window-shuffled); batch t takes the next `batch_sizes[t]` of them.
    """

    rank: int
    worker: int
    num_workers: int
    batch_ids: np.ndarray
    batch_sizes: np.ndarray
    segments: np.ndarray
    order: np.ndarray
    window: int

    @property
    def num_samples(self) -> int:
        return int(self.batch_sizes.sum())

    def samples(self) -> np.ndarray:
        """[m, 2] (shard index, sample index) for every worker position, unshuffled."""
        if len(self.segments) == 0:
            return np.zeros((0, 2), dtype=np.int64)
        lens = self.segments[:, 2] - self.segments[:, 1]
        shard = np.repeat(self.segments[:, 0], lens)
        seg_start = np.repeat(np.cumsum(lens) - lens, lens)
        idx = np.repeat(self.segments[:, 1], lens) + np.arange(int(lens.sum())) - seg_start
        return np.stack([shard, idx], axis=1)

    def batches(self) -> list[np.ndarray]:
        """Per batch of this worker: [b, 2] (shard index, sample index) in yield order."""
        s = self.samples()[self.order]
        return np.split(s, np.cumsum(self.batch_sizes)[:-1]) if len(self.batch_sizes) else []


def _segments(order: np.ndarray, counts: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Pieces of shards covering global positions [lo, hi) of the ordered sequence."""
    c = counts[order]
    cum = np.concatenate([[0], np.cumsum(c)])
    sel = np.nonzero((cum[:-1] < hi) & (cum[1:] > lo))[0]
    start = np.maximum(lo, cum[sel]) - cum[sel]
    stop = np.minimum(hi, cum[sel + 1]) - cum[sel]
    return np.stack([order[sel], start, stop], axis=1).astype(np.int64).reshape(-1, 3)


def _window_order(m: int, window: int, key: tuple[int, ...], shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(m, dtype=np.int64)
    out = np.empty(m, dtype=np.int64)
    for k, lo in enumerate(range(0, m, window)):
        n = min(window, m - lo)
        out[lo : lo + n] = lo + np.random.default_rng([*key, k]).permutation(n)
    return out


def worker_plan(
    counts: Sequence[int] | np.ndarray,
    *,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    batch_size: int,
    epoch: int,
    seed: int,
    shuffle: bool = True,
    shuffle_buffer: int = 1000,
) -> WorkerPlan:
    """The plan of one DataLoader worker (num_workers 0 means one worker, in-process)."""
    c = _counts(counts)
    _check(world_size, batch_size, num_workers, shuffle_buffer)
    nw = max(1, num_workers)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    if not 0 <= worker < nw:
        raise ValueError(f"worker {worker} not in [0, {nw})")
    total = int(c.sum())
    k = num_batches(total, world_size, batch_size)
    bounds = balanced_bounds(total, world_size)
    lo, hi = int(bounds[rank]), int(bounds[rank + 1])
    sizes = split_batches(hi - lo, k, batch_size)
    owner = np.arange(k) % nw
    per_worker = np.bincount(owner, weights=sizes, minlength=nw).astype(np.int64)
    w_lo = lo + int(per_worker[:worker].sum())
    w_hi = w_lo + int(per_worker[worker])
    order = shard_order(len(c), epoch=epoch, seed=seed, shuffle=shuffle)
    mine = np.nonzero(owner == worker)[0]
    return WorkerPlan(
        rank=rank,
        worker=worker,
        num_workers=nw,
        batch_ids=mine.astype(np.int64),
        batch_sizes=sizes[mine],
        segments=_segments(order, c, w_lo, w_hi),
        order=_window_order(w_hi - w_lo, shuffle_buffer, (seed, epoch, rank, worker), shuffle),
        window=shuffle_buffer,
    )


def rank_batches(
    counts: Sequence[int] | np.ndarray,
    *,
    rank: int,
    world_size: int,
    num_workers: int,
    batch_size: int,
    epoch: int,
    seed: int,
    shuffle: bool = True,
    shuffle_buffer: int = 1000,
) -> list[np.ndarray]:
    """Every batch rank yields this epoch, in order: [b, 2] (shard index, sample index) each."""
    nw = max(1, num_workers)
    out: list[np.ndarray | None] = [None] * num_batches(int(_counts(counts).sum()), world_size, batch_size)
    for w in range(nw):
        p = worker_plan(
            counts, rank=rank, world_size=world_size, worker=w, num_workers=num_workers,
            batch_size=batch_size, epoch=epoch, seed=seed, shuffle=shuffle, shuffle_buffer=shuffle_buffer,
        )
        for i, b in zip(p.batch_ids, p.batches()):
            out[int(i)] = b
    return out  # type: ignore[return-value]


# -- lanes: a plan that survives a change of world size (see the module docstring) ----------


def valid_world_sizes(lanes: int) -> list[int]:
    """World sizes that keep every lane whole on one rank: the divisors of `lanes`."""
    return [w for w in range(1, lanes + 1) if lanes % w == 0]


@dataclass(frozen=True)
class LaneLayout:
    """How one rank of a world of `world_size` plays `lanes` canonical ranks.

    Rank r owns lanes [r*per_rank, (r+1)*per_rank); its micro-batch j is lane batch j // groups
    of the `per_batch` lanes of group j % groups.
    """

    lanes: int
    world_size: int
    rank: int
    per_batch: int  # q: lanes concatenated into one micro-batch

    @property
    def per_rank(self) -> int:
        return self.lanes // self.world_size

    @property
    def groups(self) -> int:
        """g: micro-batches per lane batch index."""
        return self.per_rank // self.per_batch

    def first_lane(self) -> int:
        return self.rank * self.per_rank

    def lanes_of(self, j: int) -> tuple[int, range]:
        """(lane batch index, lanes) of rank micro-batch j."""
        lo = self.first_lane() + (j % self.groups) * self.per_batch
        return j // self.groups, range(lo, lo + self.per_batch)

    def group_of(self, lane: int) -> int:
        return (lane - self.first_lane()) // self.per_batch


def lane_layout(lanes: int, world_size: int, rank: int = 0, per_batch: int = 1) -> LaneLayout:
    """A checked `LaneLayout`; ValueError naming the world sizes that work."""
    if lanes < 1 or world_size < 1:
        raise ValueError(f"lanes and world_size must be >= 1, got {lanes} and {world_size}")
    if lanes % world_size:
        raise ValueError(
            f"world size {world_size} does not divide the run's {lanes} data lanes; world sizes that keep "
            f"the run's order and global batch: {', '.join(map(str, valid_world_sizes(lanes)))}"
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} not in [0, {world_size})")
    m = lanes // world_size
    if per_batch < 1 or m % per_batch:
        raise ValueError(f"lanes per micro-batch {per_batch} must divide the {m} lanes of each rank")
    return LaneLayout(lanes=lanes, world_size=world_size, rank=rank, per_batch=per_batch)


def lane_pairs(layout: LaneLayout, plan_worker: int, num_workers: int) -> list[tuple[int, int]]:
    """(lane, lane plan worker) pairs that rank plan worker `plan_worker` reads, in lane order.

    Micro-batch j goes to plan worker j % nw and takes lane batch i = j // g from lane plan
    worker i % nw; over i = cw (mod nw) that is the constant (cw*g + group) % nw, so each pair
    belongs to exactly one plan worker of the rank.
    """
    nw, g = max(1, num_workers), layout.groups
    first = layout.first_lane()
    return [(k, cw) for k in range(first, first + layout.per_rank) for cw in range(nw)
            if (cw * g + layout.group_of(k)) % nw == plan_worker]


def lane_consumed(layout: LaneLayout, lane: int, lane_worker: int, start_batch: int, num_workers: int) -> int:
    """How many of the pair's lane batches lie before rank micro-batch `start_batch`."""
    g, group = layout.groups, layout.group_of(lane)
    before = max(0, -(-(start_batch - group) // g))  # lane batch indices i with i*g + group < start
    return consumed_batches(before, lane_worker, num_workers)


def lane_worker_batches(layout: LaneLayout, plan_worker: int, num_workers: int, start_batch: int,
                        total_batches: int) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """(micro-batch j, lane batch index i, its (lane, lane worker) pairs) for each micro-batch
    plan worker `plan_worker` yields from rank micro-batch `start_batch` on."""
    nw = max(1, num_workers)
    first = start_batch + (plan_worker - start_batch) % nw
    out = []
    for j in range(first, total_batches, nw):
        i, lanes = layout.lanes_of(j)
        out.append((j, i, [(k, i % nw) for k in lanes]))
    return out


def layout_rank_batches(
    counts: Sequence[int] | np.ndarray,
    layout: LaneLayout,
    *,
    num_workers: int,
    lane_batch: int,
    epoch: int,
    seed: int,
    shuffle: bool = True,
    shuffle_buffer: int = 1000,
) -> list[np.ndarray]:
    """Every micro-batch of one rank of a lane layout, in order: [b, 2] (shard, sample) each."""
    per_lane = {
        k: rank_batches(counts, rank=k, world_size=layout.lanes, num_workers=num_workers, batch_size=lane_batch,
                        epoch=epoch, seed=seed, shuffle=shuffle, shuffle_buffer=shuffle_buffer)
        for k in range(layout.first_lane(), layout.first_lane() + layout.per_rank)
    }
    k_c = len(next(iter(per_lane.values())))
    out = []
    for j in range(k_c * layout.groups):
        i, lanes = layout.lanes_of(j)
        out.append(np.concatenate([per_lane[k][i] for k in lanes]))
    return out
