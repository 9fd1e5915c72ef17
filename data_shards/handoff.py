"""Batch hand-off from DataLoader workers to the main process through reusable shared slots.

Why. torch hands a tensor from a worker to the main process by moving its storage into a fresh
shared-memory segment: allocate, copy, pass a file descriptor over a socket, map it in the
consumer, fault its pages in, unmap it later; once per tensor per batch. On the 2-core build
machine (9 OpenImages photos, batches of 32 at 224 px, 2 workers) that made the stream spend
1.5-1.8x the CPU time of the same decoding without a hand-off, and `bench/data_throughput.py`
put the stream at 0.76 of the decode ceiling; with these slots, at 0.92-1.02. It also needs
/dev/shm, which containers cap at 64 MB unless told otherwise.

How. Before the workers fork, the main process maps one anonymous shared region (not a
/dev/shm file, so not under that cap; pages are committed on first touch and then stay mapped
in every process): `slots` batch slots per worker, each holding uint8 images
[batch, S, S, 3] and int8 targets [batch, C]. A worker decodes straight into a free slot and
sends only the slot number with the small fields; the main process reads the slot in place
(normalising it into a new float tensor, or copying it for uint8 output) and frees it before
it yields the batch, so what a consumer holds never aliases a slot.

Ownership. `owner[slot]` is the iteration number (generation) of the batch in it, 0 when free.
A worker takes a slot that is free or owned by an earlier generation: when an iteration ends
early or a new epoch starts, torch's reset discards the batches workers had prefetched, so no
one frees their slots; by the time a worker runs in generation g, the main process has
finished with every batch of earlier generations. In steady state a worker has at most
`prefetch_factor + 1` batches unfreed (its outstanding requests and the one the main process
is reading), so `prefetch_factor + 2` slots always leave one; if none is free anyway the
worker falls back to a plain tensor (torch's own hand-off), so correctness never rests on
that count. Slot ownership changes under one lock: its release/acquire pairing orders the
main process's reads of a slot before a worker's next writes to it on any CPU architecture.

Cost. The slots stay mapped for the stream's life: workers x (prefetch_factor + 2) batches,
e.g. 2 x 4 x 32 x 224 x 224 x 3 bytes = 39 MB (plus targets), where torch's own hand-off holds
up to workers x prefetch_factor batches at a time in /dev/shm.
"""

from __future__ import annotations

import mmap
import multiprocessing as mp

import numpy as np

__all__ = ["SlotPool"]


class SlotPool:
    """`workers * slots` shared batch slots; create before forking the workers."""

    def __init__(self, workers: int, slots: int, batch_size: int, image_size: int, num_classes: int):
        if workers < 1 or slots < 1:
            raise ValueError(f"need workers and slots >= 1, got {workers}, {slots}")
        self.slots = slots
        n = workers * slots
        image_bytes = n * batch_size * image_size * image_size * 3
        self._region = mmap.mmap(-1, self.size(workers, slots, batch_size, image_size, num_classes))  # MAP_SHARED | MAP_ANONYMOUS
        self.images = np.frombuffer(self._region, np.uint8, image_bytes).reshape(
            n, batch_size, image_size, image_size, 3)
        self.targets = np.frombuffer(self._region, np.int8, n * batch_size * num_classes, image_bytes).reshape(
            n, batch_size, num_classes)
        self.owner = mp.RawArray("q", n)
        self._lock = mp.get_context("fork").Lock()

    @staticmethod
    def size(workers: int, slots: int, batch_size: int, image_size: int, num_classes: int) -> int:
        """Bytes the pool maps: uint8 images [n, b, S, S, 3] and int8 targets [n, b, C]."""
        return workers * slots * batch_size * (image_size * image_size * 3 + num_classes)

    @property
    def nbytes(self) -> int:
        return len(self._region)

    def acquire(self, worker: int, generation: int) -> int:
        """A slot of `worker` for a batch of `generation` (>= 1), or -1 when all are in use."""
        with self._lock:
            for s in range(worker * self.slots, (worker + 1) * self.slots):
                if self.owner[s] != generation:
                    self.owner[s] = generation
                    return s
        return -1

    def release(self, slot: int) -> None:
        with self._lock:
            self.owner[slot] = 0
