"""The stream training reads: deterministic, rank-balanced, exactly resumable batches.

`ShardStream(root, split, batch_size=..., image_size=..., rank=..., world_size=...)` yields
dicts {"image": float32 [b, 3, S, S], "target": int8 [b, C] in {1, -1, 0}, "key": [str],
"shard": int64 [b], "index": int64 [b], "corrupt_shard": int64 [skipped]} ("corrupt_shard":
the shard of each sample this batch skipped as corrupt, so a reader can tell when a shard is
complete: its yielded plus skipped samples reach its manifest count). Which samples go where is decided by the pure plan of
`partition.py` (read its docstring first); this module executes it.

Augmentation. `train_transform=True` applies `augment` (`augment.AugmentSpec`: flip, Cutout,
RandAugment; default flip only) in the workers, keyed by (seed, epoch, shard, index) so resumed
and re-sharded reads see the same pixels; `train_transform=False` (evaluation, prior pass)
ignores `augment` and never augments.

Hand-off. Workers decode uint8 [b, S, S, 3] (already augmented) into reusable shared batch
slots (`handoff.SlotPool`) and the main process normalises (`decode.normalize`) from the slot:
normalising in the worker would hand 4x the bytes across. `output="uint8"` yields a copy of the
uint8 batch, for a trainer that normalises on the GPU; `pin_memory=True` (CUDA only) makes
that copy page-locked, for a `non_blocking` copy. `zero_copy=True` (uint8, unpinned) lends the
slot itself, valid until the consumer asks for the next batch (`trainer/prefetch.py` on CPU):
a 64x224x224 batch is 9.6 MB of copy and fresh pages saved.

Workers. With `num_workers > 0` the DataLoader's workers are persistent (default): forked at
the first iteration and reused, so an epoch pays for no new processes, S3 clients or cold
caches. The cursor reaches them through shared memory made before the fork: the main process
writes (epoch, first batch) and torch's reset makes each worker call `__iter__` again. A
consumer that stops mid-epoch leaves them alive; the next reset discards their prefetch. An
error in a worker shuts them down; `close()` stops them early.

Reading. Each DataLoader worker streams the shards of its lanes' plans in order
(`shard_reader.iter_shard`: fsspec, the standard tar stream reader, nothing ever unpickled).

Resume cost. A worker restarting mid-epoch opens only the shard holding the first sample it
still needs, streams (without keeping or decoding) that shard's prefix, then reads the current
shuffle window, decoding only samples not yet handed out. With `shuffle_buffer` no larger than
a shard that is at most about two shards of reading per worker and zero wasted decodes, never a
replay of the epoch.

The cursor counts batches handed out by the main-process iterator, not what workers prefetched:
`state_dict()` == {"epoch", "batch", "lane_index", ...plan settings}; one rank's is valid for all
(equal batch counts). After an epoch's last batch it moves to (epoch + 1, 0). Lanes
(`lanes`, `lanes_per_batch`; partition.py) make it rank-free: restored at another world size
over the same lanes, it continues at lane batch "lane_index". Restoring mid-epoch with other
lanes, lane batch size, worker count, shuffle setting or seed raises `ResumeError` (the order
would change); at an epoch boundary any change is allowed.

Corrupt data. Policy "skip" (default) drops a sample whose image does not decode, whose labels
are not valid JSON or break the contract, whose members are missing, or which a truncated tar
lost (the rule is `shard_reader.sample_parts`, shared with verify and the prior pass); it is
logged with shard and key and counted (`corrupt_samples`, summed across worker processes
through a per-batch count). Its batch is one smaller; batch counts never change, and a batch
with nothing left is yielded empty (zero rows), so every rank still takes the same number of
steps and the epoch completes. A shard holding more samples than its manifest entry is logged
(skip) or raises (fail): it means the manifest does not describe the shard. Policy "fail"
raises `CorruptSampleError` naming shard and key. A shard that cannot be opened at all raises
`ShardReadError` under either policy: missing data is an infrastructure failure, not a bad
sample to train around.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .augment import Augmenter, AugmentSpec
from .decode import ImageDecodeError, decode_image, normalize
from .format import Manifest, targets_from_sparse
from .handoff import SlotPool
from .partition import (
    WorkerPlan,
    lane_consumed,
    lane_layout,
    lane_pairs,
    lane_worker_batches,
    num_batches,
    plan_worker_for,
    worker_plan,
)
from .shard_reader import RawSample, SampleError, ShardReadError, iter_shard, sample_parts
from .storage import join, read_manifest

__all__ = [
    "ShardStream",
    "loader_shared_bytes",
    "CorruptSampleError",
    "ResumeError",
    "ShardReadError",
    "iter_shard",
]

log = logging.getLogger(__name__)

SPARE_SLOTS = 2  # shared batch slots per loader worker beyond its prefetch: one being filled, one being read


def loader_shared_bytes(num_workers: int, batch_size: int, image_size: int, num_classes: int,
                        prefetch_factor: int = 2) -> int:
    """Shared memory one stream maps for its batch slots (0 in-process): for sizing /dev/shm."""
    if num_workers < 1:
        return 0
    return SlotPool.size(num_workers, prefetch_factor + SPARE_SLOTS, batch_size, image_size, num_classes)


# What fixes the epoch's order at any world size (lanes), and what fixes it at this one.
_LANE_FIELDS = ("seed", "lanes", "lane_batch", "num_workers", "shuffle", "shuffle_buffer", "samples", "shards")
_PLAN_FIELDS = (*_LANE_FIELDS, "world_size", "batch_size")


class CorruptSampleError(ValueError):
    """A sample (or a batch of them) that cannot be used; the message names shard and key."""


class ResumeError(ValueError):
    """A cursor that cannot be restored exactly into this stream's settings."""


@dataclass(frozen=True)
class _Config:
    urls: tuple[str, ...]
    counts: tuple[int, ...]
    num_classes: int
    batch_size: int
    image_size: int
    rank: int
    world_size: int
    num_workers: int
    seed: int
    shuffle: bool
    train_transform: bool
    shuffle_buffer: int
    corrupt: str
    max_member_bytes: int
    lanes: int
    per_batch: int  # lanes per micro-batch

    @property
    def lane_batch(self) -> int:
        return self.batch_size // self.per_batch


class _ShardDataset(IterableDataset):
    """Runs in each DataLoader worker: executes that worker's plan from the cursor on.

    The cursor (epoch, start batch) lives in shared memory created before the workers fork, so
    persistent workers see what the main process set when torch calls `__iter__` on their copy
    of this object at the start of each iteration.
    """

    def __init__(self, cfg: _Config):
        self.cfg = cfg
        # epoch, start batch, iteration number (generation); written only by the main process
        self.cursor = mp.RawArray("q", 3)
        self.pool: SlotPool | None = None  # set by the stream before the workers fork
        self.augmenter: Augmenter | None = None  # likewise; None: no train transform at all
        self._worker = self._generation = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        c = self.cfg
        epoch, start_batch, self._generation = (int(x) for x in self.cursor)
        info = get_worker_info()
        loader_worker, loader_workers = (info.id, info.num_workers) if info else (0, 1)
        self._worker = loader_worker
        assert loader_workers == max(1, c.num_workers), "DataLoader worker count differs from the plan"
        pw = plan_worker_for(loader_worker, start_batch, c.num_workers)
        layout = lane_layout(c.lanes, c.world_size, c.rank, c.per_batch)
        lanes = {}  # (lane, lane plan worker) -> its lane batches (raw items), from the cursor on
        for k, cw in lane_pairs(layout, pw, c.num_workers):
            plan = worker_plan(
                c.counts, rank=k, world_size=c.lanes, worker=cw, num_workers=c.num_workers,
                batch_size=c.lane_batch, epoch=epoch, seed=c.seed, shuffle=c.shuffle,
                shuffle_buffer=c.shuffle_buffer,
            )
            lanes[(k, cw)] = self._run(plan, lane_consumed(layout, k, cw, start_batch, c.num_workers))
        total = num_batches(sum(c.counts), c.lanes, c.lane_batch) * layout.groups
        for j, _, pairs in lane_worker_batches(layout, pw, c.num_workers, start_batch, total):
            yield self._assemble([item for pair in pairs for item in next(lanes[pair])], j, epoch)

    def _positions(self, plan: WorkerPlan, first: int) -> Iterator[tuple[int, int, int, RawSample]]:
        """(worker position, shard, sample index, raw) from position `first` on."""
        pos = 0
        for shard, lo, hi in plan.segments.tolist():
            n = hi - lo
            if pos + n <= first:
                pos += n  # never opened: wholly before the resume point
                continue
            skip = max(0, first - pos)
            at_end = self._extra_samples if hi == self.cfg.counts[shard] else None
            for idx, raw in iter_shard(self.cfg.urls[shard], lo + skip, hi, max_member_bytes=self.cfg.max_member_bytes,
                                       at_end=at_end):
                yield pos + idx - lo, shard, idx, raw
            pos += n

    def _extra_samples(self, message: str) -> None:
        if self.cfg.corrupt == "fail":
            raise CorruptSampleError(message)
        log.warning("%s; only the listed samples are read", message)

    def _run(self, plan: WorkerPlan, consumed: int) -> Iterator[list[tuple[int, int, RawSample]]]:
        """The raw items of each of a lane plan worker's batches, from batch `consumed` on."""
        if consumed >= len(plan.batch_sizes):
            return
        s = int(plan.batch_sizes[:consumed].sum())
        todo = plan.order[s:]
        needed = np.zeros(plan.num_samples, dtype=bool)
        needed[todo] = True
        sizes = plan.batch_sizes[consumed:]
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        last_needed = np.maximum.reduceat(todo, offsets[:-1])
        reader = self._positions(plan, int(todo.min()))
        buf: dict[int, tuple[int, int, RawSample]] = {}
        read_upto = 0
        for t, bid in enumerate(plan.batch_ids[consumed:].tolist()):
            while read_upto <= last_needed[t]:
                p, shard, idx, raw = next(reader)
                if needed[p]:
                    buf[p] = (shard, idx, raw)
                read_upto = p + 1
            yield [buf.pop(p) for p in todo[offsets[t] : offsets[t + 1]].tolist()]

    def _assemble(self, items: list[tuple[int, int, RawSample]], batch_id: int, epoch: int) -> dict[str, Any]:
        c = self.cfg
        pool = self.pool if get_worker_info() is not None else None
        slot = pool.acquire(self._worker, self._generation) if pool is not None else -1
        if slot >= 0:
            images = pool.images[slot]
        else:  # in-process, or every slot in use: a plain array, handed over by torch
            images = np.empty((len(items), c.image_size, c.image_size, 3), dtype=np.uint8)
        pos, neg, keys, shards, idxs = [], [], [], [], []
        corrupt: list[int] = []  # the shard of each skipped sample
        # Draws are keyed by (shard, index), so they can be made before knowing which decode.
        aug = self.augmenter
        draws = (aug.draws(c.seed, epoch, [s for s, _, _ in items], [i for _, i, _ in items]) if aug is not None
                 else [(False, None)] * len(items))
        for (shard, idx, raw), (flip, transform) in zip(items, draws):
            where = f"shard {c.urls[shard]} sample {raw.key!r}" if raw.key else f"shard {c.urls[shard]} sample #{idx}"
            try:
                image, p, n = sample_parts(raw, c.num_classes, where)
                try:
                    img = decode_image(image, c.image_size, flip=flip, transform=transform)
                except ImageDecodeError as e:
                    raise CorruptSampleError(f"{where}: {e}") from None
            except (CorruptSampleError, SampleError) as e:
                if c.corrupt == "fail":
                    raise CorruptSampleError(str(e)) from None
                if not raw.logged:
                    log.warning("skipping corrupt sample: %s", e)
                corrupt.append(shard)
                continue
            images[len(keys)] = img
            pos.append(p)
            neg.append(n)
            keys.append(raw.key)
            shards.append(shard)
            idxs.append(idx)
        if not keys:
            names = sorted({c.urls[s] for s, _, _ in items})
            log.warning("rank %d batch %d: all %d samples are corrupt (shards: %s); the batch is empty",
                        c.rank, batch_id, len(items), ", ".join(names))
        n = len(keys)
        out: dict[str, Any] = {
            "slot": slot,
            "key": keys,
            # numpy, not torch: small arrays travel inline with the message instead of each
            # taking a shared-memory segment and a file descriptor; the main process wraps them.
            "shard": np.asarray(shards, dtype=np.int64),
            "index": np.asarray(idxs, dtype=np.int64),
            "corrupt_shard": np.asarray(corrupt, dtype=np.int64),
        }
        if slot >= 0:
            targets_from_sparse(pos, neg, c.num_classes, out=pool.targets[slot, :n])
        else:
            # uint8 channels-last; the consumer normalises (see the module docstring).
            out["image"] = torch.from_numpy(images[:n])
            out["target"] = torch.from_numpy(targets_from_sparse(pos, neg, c.num_classes))
        return out


def _as_is(batch: dict[str, Any]) -> dict[str, Any]:
    return batch  # torch's default would turn the small numpy arrays into shared-memory tensors


def _shutdown(loader_iter: Any) -> None:
    shutdown = getattr(loader_iter, "_shutdown_workers", None)  # absent in-process (num_workers 0)
    if shutdown is not None:
        shutdown()


class ShardStream:
    """Batches of one split for one rank; iterate it once per epoch (see the module docstring).

    `num_workers` DataLoader processes decode in parallel (0: in-process). Not re-entrant: one
    iteration at a time.
    """

    def __init__(
        self,
        root: str,
        split: str,
        *,
        batch_size: int,
        image_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        train_transform: bool = True,
        augment: AugmentSpec | None = None,
        shuffle_buffer: int = 1000,
        corrupt: Literal["skip", "fail"] = "skip",
        manifest: Manifest | None = None,
        prefetch_factor: int = 2,
        max_member_bytes: int = 64 << 20,
        output: Literal["float", "uint8"] = "float",
        persistent_workers: bool = True,
        pin_memory: bool = False,
        zero_copy: bool = False,
        lanes: int | None = None,
        lanes_per_batch: int = 1,
    ):
        if corrupt not in ("skip", "fail"):
            raise ValueError(f"corrupt policy {corrupt!r}: use 'skip' or 'fail'")
        if output not in ("float", "uint8"):
            raise ValueError(f"output {output!r}: use 'float' or 'uint8'")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory=True needs a CUDA device (page-locked memory serves copies to it)")
        if zero_copy and (output != "uint8" or pin_memory):
            raise ValueError("zero_copy=True lends the uint8 slot itself: it needs output='uint8' and no pin_memory")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, world_size={world_size})")
        if num_workers < 0 or shuffle_buffer < 1 or prefetch_factor < 1 or seed < 0:
            raise ValueError(
                f"need num_workers >= 0, seed >= 0, shuffle_buffer and prefetch_factor >= 1; got "
                f"{num_workers}, {seed}, {shuffle_buffer}, {prefetch_factor}"
            )
        self.root, self.split = root, split
        self.manifest = manifest if manifest is not None else read_manifest(root)
        info = self.manifest.split(split)
        counts = tuple(s.samples for s in info.shards)
        lanes = world_size if lanes is None else lanes
        layout = lane_layout(lanes, world_size, rank, lanes_per_batch)  # ValueError naming the sizes that work
        if batch_size % lanes_per_batch:
            raise ValueError(f"batch_size {batch_size} is not a multiple of lanes_per_batch {lanes_per_batch}")
        self._num_batches = num_batches(sum(counts), lanes, batch_size // lanes_per_batch) * layout.groups
        self._groups = layout.groups
        self._cfg = _Config(
            urls=tuple(join(root, *s.path.split("/")) for s in info.shards), counts=counts,
            num_classes=self.manifest.num_classes, batch_size=batch_size, image_size=image_size,
            rank=rank, world_size=world_size, num_workers=num_workers, seed=seed, shuffle=shuffle,
            train_transform=train_transform, shuffle_buffer=shuffle_buffer, corrupt=corrupt,
            max_member_bytes=max_member_bytes, lanes=lanes, per_batch=lanes_per_batch,
        )
        self._dataset = _ShardDataset(self._cfg)
        if train_transform:  # built here, before the fork: workers inherit it (and timm's import)
            self._dataset.augmenter = Augmenter(augment if augment is not None else AugmentSpec())
        self.prefetch_factor = prefetch_factor
        self.output = output
        self.pin_memory = pin_memory
        self.zero_copy = zero_copy
        self.persistent_workers = persistent_workers and num_workers > 0
        self._loader: DataLoader | None = None
        self._epoch = 0
        self._batch = 0
        self.corrupt_samples = 0

    @property
    def num_classes(self) -> int:
        return self._cfg.num_classes

    @property
    def epoch(self) -> int:
        return self._epoch

    def __len__(self) -> int:
        """Batches per epoch, the same on every rank."""
        return self._num_batches

    def set_epoch(self, epoch: int) -> None:
        """Move to `epoch` from its start; the current epoch keeps its cursor (resume loops)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self._epoch:
            self._epoch, self._batch = epoch, 0

    def _plan_settings(self) -> dict[str, Any]:
        c = self._cfg
        return {
            "seed": c.seed, "world_size": c.world_size, "batch_size": c.batch_size,
            "num_workers": max(1, c.num_workers), "shuffle": c.shuffle, "shuffle_buffer": c.shuffle_buffer,
            "samples": sum(c.counts), "shards": len(c.counts), "lanes": c.lanes, "lane_batch": c.lane_batch,
        }

    def state_dict(self) -> dict[str, Any]:
        # "lane_index": the lane batches every lane has handed out, the rank-free cursor (None
        # inside a lane batch index, which only happens between the micro-steps of one step)
        index = self._batch // self._groups if self._batch % self._groups == 0 else None
        return {"version": 1, "split": self.split, "epoch": self._epoch, "batch": self._batch,
                "lane_index": index, "rank": self._cfg.rank, "corrupt": self.corrupt_samples,
                **self._plan_settings()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            epoch, batch = int(state["epoch"]), int(state["batch"])
        except (KeyError, TypeError, ValueError):
            raise ResumeError(f"stream state needs integer 'epoch' and 'batch', got {state!r}") from None
        if epoch < 0 or batch < 0:
            raise ResumeError(f"stream state has negative epoch/batch: {epoch}/{batch}")
        if batch > 0:
            mine = self._plan_settings()
            # a cursor from before lanes: its plan had one lane per rank
            old = {"lanes": state.get("world_size"), "lane_batch": state.get("batch_size"), **state}
            diff = [f"{k} {old.get(k)!r} -> {mine[k]!r}" for k in _LANE_FIELDS if old.get(k) != mine[k]]
            if not diff and any(old.get(k) != mine[k] for k in _PLAN_FIELDS):  # another world size, same lanes
                if old.get("lane_index") is None:
                    diff = [f"batch {batch} is inside a lane batch (world size {old.get('world_size')})"]
                else:
                    batch = int(old["lane_index"]) * self._groups
            if diff:
                raise ResumeError(
                    f"cannot resume mid-epoch (epoch {epoch}, batch {batch}): {', '.join(diff)} changes the "
                    "order of the epoch; keep these settings, or restart the epoch (set 'batch' to 0)"
                )
            if batch > self._num_batches:
                raise ResumeError(f"stream state batch {batch} beyond the {self._num_batches} batches of an epoch")
        if batch == self._num_batches:
            epoch, batch = epoch + 1, 0
        self._epoch, self._batch = epoch, batch
        self.corrupt_samples = int(state.get("corrupt", 0))

    def close(self) -> None:
        """Stop persistent workers now (they also stop when the stream is garbage collected)."""
        loader, self._loader = self._loader, None
        _shutdown(getattr(loader, "_iterator", None))

    def _own(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of a slot's view that the consumer owns, page-locked if `pin_memory`."""
        if not self.pin_memory:
            return t.clone()
        return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        k = self._num_batches
        start = self._batch
        # Read by each worker's `__iter__`, which torch calls after `iter(loader)` below: at
        # worker start, or for persistent workers on the resume message it sends them.
        cursor = self._dataset.cursor
        cursor[0], cursor[1], cursor[2] = self._epoch, start, cursor[2] + 1
        nw = self._cfg.num_workers
        if self._loader is None:
            if nw and self._dataset.pool is None:
                c = self._cfg
                self._dataset.pool = SlotPool(nw, self.prefetch_factor + SPARE_SLOTS, c.batch_size, c.image_size,
                                              c.num_classes)
            self._loader = DataLoader(
                self._dataset, batch_size=None, num_workers=nw, persistent_workers=self.persistent_workers,
                prefetch_factor=self.prefetch_factor if nw else None, pin_memory=False,
                # fork: the workers inherit the slot pool's mapping and the cursor
                multiprocessing_context="fork" if nw else None, collate_fn=_as_is,
            )
        pool = self._dataset.pool
        expect = k - start
        got = 0
        it = iter(self._loader)
        try:
            for batch in it:
                got += 1
                assert got <= expect, "a worker yielded more batches than its plan"
                self.corrupt_samples += len(batch["corrupt_shard"])
                slot = batch.pop("slot")
                lent = slot if self.zero_copy else -1  # freed once the consumer asks for the next batch
                if slot >= 0:
                    assert pool is not None
                    try:
                        n = len(batch["key"])
                        image = torch.from_numpy(pool.images[slot, :n])
                        if self.output == "float":
                            batch["image"] = normalize(image)
                        else:
                            batch["image"] = image if lent >= 0 else self._own(image)
                        batch["target"] = self._own(torch.from_numpy(pool.targets[slot, :n]))
                    finally:
                        if lent < 0:
                            pool.release(slot)
                elif self.output == "float":
                    batch["image"] = normalize(batch["image"])
                elif self.pin_memory:
                    batch["image"], batch["target"] = batch["image"].pin_memory(), batch["target"].pin_memory()
                for name in ("shard", "index", "corrupt_shard"):
                    batch[name] = torch.from_numpy(batch[name])
                self._batch += 1
                if self._batch == k:
                    self._epoch, self._batch = self._epoch + 1, 0
                yield batch
                if lent >= 0:
                    pool.release(lent)
        except GeneratorExit:
            # The consumer stopped early (a step limit, a checkpoint test). Persistent workers
            # stay: the next iteration's reset discards what they had prefetched.
            if not self.persistent_workers:
                _shutdown(it)
            raise
        except BaseException:
            # A worker error (policy "fail", an unreadable shard) or an interrupt: start clean
            # next time. Shutting down here, not from gc, is also what keeps it prompt: an
            # exception's traceback keeps the loader iterator alive until a gc pass, and a
            # shutdown from gc finds its queues already finalised, each worker join then
            # waiting out a 5 s timeout.
            _shutdown(it)
            self.close()
            raise
        if not self.persistent_workers:
            _shutdown(it)
        if got != expect:
            raise RuntimeError(f"stream ended after {got} of {expect} batches (a worker stopped early)")
