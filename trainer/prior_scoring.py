"""Scoring shards for the prior pass (paper 1 eq. 10-11): per-shard sums of sigmoid outputs.

`score_shards` reads a list of shards with the training stream in evaluation order
(`ShardStream(shuffle=False, train_transform=False)`: one tar reader and one decode for the
whole project): its loader worker processes decode while the model runs, batches arrive as
uint8 and `DevicePrefetcher` copies and normalises them on the model's device one batch ahead
(a quarter of the host-to-device bytes of float32), and the model runs under bf16 autocast on
a GPU. No second decode loop exists.

Per shard it keeps float64 sums of the sigmoid outputs, the scored and the skipped (corrupt)
counts and the positive-annotation counts, and hands the shard out (`ShardScore`) as soon as
it is complete: its scored plus skipped samples reach its manifest count (the stream names
the shard of every sample it skips, `corrupt_shard`). A shard with samples missing when the
stream ends is an error, never a short row. Memory: O(C) per shard in flight (at most one
partly read shard per loader worker plus the one a worker split), whatever the number of
shards; the rows of one shard in a batch are contiguous (no shuffle), so a batch costs one
sum per shard it touches, with no host sync until a shard completes.

Fault isolation. An unreadable shard (`OSError`, e.g. `ShardReadError` after the reader's own
retries) stops the stream. Raised in a loader worker, the error reaches this process as text
only (torch re-raises a worker's exception from its message), so the shard is found from the
pure plan instead: the suspects are, for each loader worker, the first of its shards not yet
complete (`partition.worker_plan`). Each suspect is scored alone in this process (a one-shard
stream without workers, where the error keeps its type), with doubling back-off retries; one
that still fails becomes an error row naming it, the others complete, and the stream resumes
on the remaining shards. Every round completes or fails at least one shard, so it ends.

Cost at OpenImages scale (9M images, 9,600 classes, 64 GPU actors): each actor keeps a few
9,600-float64 vectors (77 kB each) and yields one row per finished shard (~150 kB as float64
sums + int64 counts); the decode is the same per-image cost as training's eval stream.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import numpy as np

from data_shards.format import Manifest, SplitInfo
from data_shards.partition import worker_plan
from data_shards.storage import join, redact

__all__ = ["ShardScore", "score_shards", "retrying", "SHARD_RETRIES"]

log = logging.getLogger(__name__)
T = TypeVar("T")

SHARD_RETRIES = 2  # attempts beyond the first, per shard, on top of the tar reader's own retries
RETRY_BACKOFF_S = 1.0  # doubles per attempt, capped at 30 s


@dataclass
class ShardScore:
    """One shard's contribution: float64 sums [C], int64 positive counts [C], counts.
    `error` set: the shard failed and the rest is zero."""

    shard: int
    sum: np.ndarray
    pos: np.ndarray
    count: int
    corrupt: int
    error: str = ""


def retrying(fn: Callable[[], T], retries: int, what: str) -> T:
    """fn(), retried on OSError with doubling back-off (RETRY_BACKOFF_S, capped at 30 s)."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except OSError as e:
            if attempt == retries:
                raise
            delay = min(RETRY_BACKOFF_S * 2**attempt, 30.0)
            log.warning("%s: %s: %s; attempt %d of %d, retrying in %.0f s", what, type(e).__name__, redact(str(e)),
                        attempt + 1, retries + 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _sub_manifest(manifest: Manifest, split: str, shards: list[int]) -> Manifest:
    """`manifest` with `split` cut to `shards` (in that order): what one stream reads."""
    chosen = [manifest.split(split).shards[i] for i in shards]
    info = SplitInfo(samples=sum(s.samples for s in chosen), shards=chosen)
    return manifest.model_copy(update={"splits": {split: info}, "stats": {}, "truth": {}})


def _stream_scores(model: Any, data: str, split: str, manifest: Manifest, shards: list[int], *, image_size: int,
                   batch_size: int, workers: int, device: Any) -> Iterator[ShardScore]:
    """One stream over `shards`; yields each shard once it is complete (see the module docstring)."""
    import torch

    from data_shards.stream import ShardStream

    from .prefetch import DevicePrefetcher

    c = manifest.num_classes
    expected = [manifest.split(split).shards[i].samples for i in shards]
    scored = np.zeros(len(shards), dtype=np.int64)
    skipped = np.zeros(len(shards), dtype=np.int64)
    sums: dict[int, Any] = {}
    pos: dict[int, Any] = {}
    finished = np.zeros(len(shards), dtype=bool)

    def complete(j: int) -> ShardScore:
        finished[j] = True
        s = sums.pop(j, None)
        total = s.cpu().numpy() if s is not None else np.zeros(c)  # the syncs: once per shard
        p = pos.pop(j, None)
        positives = p.cpu().numpy() if p is not None else np.zeros(c, dtype=np.int64)
        return ShardScore(shards[j], total, positives, int(scored[j]), int(skipped[j]))

    for j in np.flatnonzero(np.asarray(expected) == 0).tolist():
        yield complete(j)
    if sum(expected) == 0:
        return
    stream = ShardStream(data, split, manifest=_sub_manifest(manifest, split, shards), batch_size=batch_size,
                         image_size=image_size, num_workers=workers, shuffle=False, train_transform=False,
                         output="uint8", persistent_workers=False, pin_memory=device.type == "cuda")
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    for batch in DevicePrefetcher(stream, device):  # copied and normalised one batch ahead
        sh = batch["shard"].numpy()
        bad = batch["corrupt_shard"].numpy()
        np.add.at(skipped, bad, 1)
        touched = set(bad.tolist())
        if len(sh):
            with torch.no_grad(), amp:
                prob = model(batch["image"]).float().sigmoid()
            target = batch["target"]
            cuts = [0, *(np.flatnonzero(np.diff(sh)) + 1).tolist(), len(sh)]
            for lo, hi in zip(cuts[:-1], cuts[1:]):
                j = int(sh[lo])
                if j not in sums:
                    sums[j] = torch.zeros(c, dtype=torch.float64, device=device)
                    pos[j] = torch.zeros(c, dtype=torch.int64, device=device)
                sums[j] += prob[lo:hi].sum(0, dtype=torch.float64)
                pos[j] += (target[lo:hi] == 1).sum(0)
                scored[j] += hi - lo
                touched.add(j)
        for j in sorted(touched):
            if scored[j] + skipped[j] > expected[j]:
                raise RuntimeError(f"shard {shards[j]}: {scored[j]} + {skipped[j]} samples, manifest says {expected[j]}")
            if scored[j] + skipped[j] == expected[j]:
                yield complete(j)
    short = np.flatnonzero(~finished)
    if short.size:
        j = int(short[0])
        raise RuntimeError(f"shard {shards[j]}: the stream ended after {scored[j]} + {skipped[j]} corrupt of its "
                           f"{expected[j]} samples")


def _suspects(expected: list[int], shards: list[int], done: set[int], workers: int, batch_size: int) -> list[int]:
    """For each loader worker of a stream over `shards`, the first of its shards not in `done`."""
    out: list[int] = []
    for w in range(max(1, workers)):
        plan = worker_plan(expected, rank=0, world_size=1, worker=w, num_workers=workers, batch_size=batch_size,
                           epoch=0, seed=0, shuffle=False)
        for j, _, _ in plan.segments.tolist():
            if shards[j] not in done:
                if shards[j] not in out:
                    out.append(shards[j])
                break
    return out


def score_shards(model: Any, data: str, split: str, manifest: Manifest, shards: list[int], *, image_size: int,
                 batch_size: int, workers: int, device: Any, retries: int = SHARD_RETRIES) -> Iterator[ShardScore]:
    """Score `shards` (indices into the split's manifest list) with `model` on `device`: each
    shard's `ShardScore` once complete, or with `error` set after `retries` retries."""
    c = manifest.num_classes
    pending = list(shards)
    while pending:
        done: set[int] = set()
        try:
            for row in _stream_scores(model, data, split, manifest, pending, image_size=image_size,
                                      batch_size=batch_size, workers=workers, device=device):
                done.add(row.shard)
                yield row
            return
        except OSError as e:
            expected = [manifest.split(split).shards[i].samples for i in pending]
            suspects = _suspects(expected, pending, done, workers, batch_size)
            log.warning("prior pass: %s: %s; scoring shards %s alone to find the one that fails", type(e).__name__,
                        redact(str(e)).splitlines()[0], suspects)
        for s in suspects:
            url = redact(join(data, manifest.split(split).shards[s].path))
            try:
                row = retrying(lambda: next(iter(_stream_scores(model, data, split, manifest, [s], image_size=image_size,
                                                                batch_size=batch_size, workers=0, device=device))),
                               retries, f"shard {s} ({url})")
            except OSError as e:
                row = ShardScore(s, np.zeros(c), np.zeros(c, dtype=np.int64), 0, 0,
                                 error=f"shard {s} ({url}) failed {retries + 1} times: {type(e).__name__}: {redact(str(e))}")
            done.add(s)
            yield row
        pending = [s for s in pending if s not in done]
