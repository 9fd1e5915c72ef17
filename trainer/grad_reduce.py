"""Gradient averaging that overlaps backward, for DeepSpeed's ZeRO-0 data parallelism.

Why not DeepSpeed's own. At ZeRO-0 DeepSpeed averages gradients after ``loss.backward()``
returns: it flattens every gradient into a new buffer, all-reduces it, scales it and copies
it back (``buffered_allreduce_fallback``). Nothing overlaps the backward pass, and at world
size 1 it still makes those copies. On the 2-CPU synthetic benchmark that was 7 ms of a
98 ms step at one rank and 10-13 ms at two (``bench/train_throughput.py``; scratch timings).

What this does instead is what torch's DDP reducer does, in a few lines over
``torch.distributed``:

- Parameters are grouped, in reverse registration order (about the order backward produces
  their gradients), into buckets of about ``bucket_bytes``, each one preallocated flat buffer.
- A post-accumulate-grad hook copies each gradient into its slot, already divided by the
  world size, as soon as autograd has finished it. A bucket whose gradients are all in is
  all-reduced asynchronously while backward goes on with earlier layers.
- Buckets are launched strictly in index order, so every rank issues the same collectives in
  the same order even if autograd finished gradients in a different order.
- ``finish()`` (after backward) launches what is left (a parameter backward did not reach
  contributes what it has accumulated, or zeros), waits, and points each ``.grad`` at its averaged slot,
  with the parameter's own strides (channels_last weights keep channels_last gradients).

Only at an accumulation boundary (``arm(True)``): between boundaries gradients accumulate in
``.grad`` as usual and the hook does nothing. The slot views stay valid until the next armed
backward; DeepSpeed's step sets ``.grad`` to None after the optimizer has read them.

This module does not import DeepSpeed: ``engine.py`` switches DeepSpeed's reduction off and
calls this one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["OverlappedGradReducer"]


def _slot_strides(p: torch.Tensor) -> tuple[int, ...]:
    """The parameter's strides if they pack it densely (contiguous or channels_last), else
    contiguous ones: a slot must cover exactly ``numel`` consecutive elements."""
    if p.is_contiguous() or (p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)):
        return tuple(p.stride())  # size-1 dimensions may carry any stride: keep the parameter's
    return tuple(torch.empty(p.shape, device="meta").stride())


class OverlappedGradReducer:
    """Average the gradients of ``params`` over ``group`` during backward (see module doc)."""

    def __init__(self, params: list[nn.Parameter], group: dist.ProcessGroup | None = None,
                 bucket_bytes: int = 1 << 20) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.params = [p for p in params if p.requires_grad]
        self._buckets: list[torch.Tensor] = []
        self._members: list[list[int]] = []  # bucket -> parameter indices
        self._slot: list[tuple[int, torch.Tensor]] = []  # parameter -> (bucket, view)
        self._plan(bucket_bytes)
        self._armed = False
        self._arrived: list[bool] = []
        self._missing: list[int] = []
        self._next = 0
        self._works: list[dist.Work] = []
        self._hooks = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)]

    def _plan(self, bucket_bytes: int) -> None:
        order = list(reversed(range(len(self.params))))
        groups: list[list[int]] = []
        size = 0
        for i in order:
            p = self.params[i]
            nbytes = p.numel() * p.element_size()
            if not groups or size + nbytes > bucket_bytes or self.params[groups[-1][0]].dtype != p.dtype \
                    or self.params[groups[-1][0]].device != p.device:
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += nbytes
        self._slot = [None] * len(self.params)  # type: ignore[list-item]
        for b, members in enumerate(groups):
            first = self.params[members[0]]
            flat = torch.zeros(sum(self.params[i].numel() for i in members), dtype=first.dtype, device=first.device)
            offset = 0
            for i in members:
                p = self.params[i]
                self._slot[i] = (b, flat.as_strided(p.shape, _slot_strides(p), offset))
                offset += p.numel()
            self._buckets.append(flat)
            self._members.append(members)

    @property
    def num_buckets(self) -> int:
        return len(self._buckets)

    def arm(self, boundary: bool) -> None:
        """Call before each backward: ``boundary`` says whether this one ends an optimizer step."""
        self._armed = boundary
        if boundary:
            self._arrived = [False] * len(self.params)
            self._missing = [len(m) for m in self._members]
            self._next = 0
            self._works = []

    def _hook(self, i: int):
        def hook(p: torch.Tensor) -> None:
            if not self._armed or self._arrived[i]:
                return
            self._put(i)
            self._launch_ready()
        return hook

    def _put(self, i: int) -> None:
        b, view = self._slot[i]
        grad = self.params[i].grad
        if grad is None:
            view.zero_()
        else:
            torch.mul(grad, 1.0 / self.world_size, out=view)
        self._arrived[i] = True
        self._missing[b] -= 1

    def _launch_ready(self) -> None:
        while self._next < len(self._buckets) and self._missing[self._next] == 0:
            self._works.append(dist.all_reduce(self._buckets[self._next], group=self.group, async_op=True))
            self._next += 1

    def finish(self) -> None:
        """Call after each backward: at a boundary, wait for the averages and install them."""
        if not self._armed:
            return
        self._armed = False
        # Parameters this backward did not reach: their gradient so far (accumulated over
        # earlier micro-batches), or zeros when they have none, as DDP does.
        for i, arrived in enumerate(self._arrived):
            if not arrived:
                self._put(i)
        self._launch_ready()
        for work in self._works:
            work.wait()
        for p, (_, view) in zip(self.params, self._slot):
            p.grad = view

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
