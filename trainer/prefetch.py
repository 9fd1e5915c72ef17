"""Batches on the device, normalised there, the next one's copy in flight during this step.

The training process takes uint8 NHWC batches from `ShardStream(output="uint8")` (a quarter of
the bytes of float32), copies them with `non_blocking=True` and normalises on the device
(`decode.normalize`). On CUDA the stream copies each batch out of its shared slot into
page-locked memory, the one host copy a DMA needs; on CPU (`zero_copy`) it lends the slot and
normalising reads it directly, before the next batch is asked for. `DevicePrefetcher` keeps
one batch ahead, as timm's PrefetchLoader and torchtitan's loaders do: when the loop receives
batch k, batch k+1 has been received and its copy and normalisation are queued.

CUDA: the copy and normalisation run on a side stream and the compute stream waits for that
batch's event only, so the copy of batch k+1 overlaps step k on the GPU; `record_stream` tells
the caching allocator that the compute stream uses the tensors. CPU: the same code, no side
stream, no pinning; the "copy" is a no-op and the normalisation runs on the host.

The cursor. `ShardStream.state_dict()` counts batches the stream handed out, and this
prefetcher has taken one more than the loop has seen. `state_dict()` here is the stream's state
as it was right after the batch most recently handed to the loop, so a checkpoint taken after
a step resumes at the next batch, never one past it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from data_shards.decode import normalize

__all__ = ["DevicePrefetcher"]


class DevicePrefetcher:
    """Iterate `stream` (a `ShardStream` with `output="uint8"`) as device batches, one ahead.

    Yields the stream's dicts with "image" float32 [b, 3, S, S] on `device` (channels_last in
    memory when asked) and "target" int8 on `device`; the other fields stay on the host. A
    batch is copied (or, on CPU, normalised) as soon as it is received, before the stream is
    asked for the next one: what a `zero_copy` stream needs.
    """

    def __init__(self, stream: Any, device: torch.device | str, *, channels_last: bool = False) -> None:
        if getattr(stream, "output", "uint8") != "uint8":
            raise ValueError("DevicePrefetcher normalises on the device: give it a stream with output='uint8'")
        self.stream = stream
        self.device = torch.device(device)
        self.channels_last = channels_last
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._state = stream.state_dict()

    def __len__(self) -> int:
        return len(self.stream)

    @property
    def num_classes(self) -> int:
        return self.stream.num_classes

    def state_dict(self) -> dict[str, Any]:
        """The stream's cursor after the last batch this prefetcher handed out."""
        return dict(self._state)

    def _send(self, batch: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        """Queue the copy and normalisation of `batch`; returns it and the event marking its end."""
        ctx = torch.cuda.stream(self._side) if self._side is not None else contextlib.nullcontext()
        with ctx:
            image = batch["image"].to(self.device, non_blocking=True)
            out = {**batch, "image": normalize(image, channels_last=self.channels_last),
                   "target": batch["target"].to(self.device, non_blocking=True)}
            done = self._side.record_event() if self._side is not None else None
        return out, done

    def _ready(self, batch: dict[str, Any], done: Any) -> dict[str, Any]:
        if self._side is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(done)
            for name in ("image", "target"):
                batch[name].record_stream(compute)  # allocated on the side stream, used on this one
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._state = self.stream.state_dict()
        it = iter(self.stream)
        try:
            ahead = next(it, None)
            pending = (*self._send(ahead), self.stream.state_dict()) if ahead is not None else None
            while pending is not None:
                batch, done, state = pending
                ahead = next(it, None)  # received and queued before the loop runs `batch`
                pending = (*self._send(ahead), self.stream.state_dict()) if ahead is not None else None
                self._state = state
                yield self._ready(batch, done)
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # the stream's own early-stop handling (its workers stay for the next epoch)
