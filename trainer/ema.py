"""Exponential moving average of a model's weights, kept in fp32: plain torch, no DeepSpeed.

The EMA is a frozen fp32 copy of the model (parameters and buffers) on each rank, usable as a
model for evaluation and pseudo-labels. Decay is constant (the reference's choice) unless
``warmup_steps`` > 0, then ``decay * (1 - exp(-updates / warmup_steps))`` as in YOLOv5/timm-style
warm-up; the decay comes from a host-side counter, so an update costs no host sync.
`trainer/engine.py` owns when it is updated and how ZeRO-3's partitions are gathered for it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["ModelEMA", "named_tensors"]


class ModelEMA:
    """Exponential moving average of a module's parameters and buffers, kept in fp32.

    The average lives in ``self.module``, a frozen fp32 copy of the model in eval mode, so
    it can be evaluated (or used for pseudo-labels) as it is; ``self.weights`` names its
    tensors. Float tensors are averaged with ``lerp``; integer buffers (BatchNorm's
    ``num_batches_tracked``) are copied. Plain torch: ``Engine.update_ema`` gathers ZeRO-3
    partitions before calling ``update``, and the copy must be made from a full model.
    """

    def __init__(self, model: nn.Module, decay: float, warmup_steps: int = 0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.updates = 0
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)
        self.weights: dict[str, torch.Tensor] = {name: t for name, t in named_tensors(self.module)}

    def to(self, device: torch.device | str) -> ModelEMA:
        self.module.to(device)
        self.weights = {name: t for name, t in named_tensors(self.module)}  # .to() replaces buffers
        return self

    def current_decay(self) -> float:
        if self.warmup_steps:
            return self.decay * (1.0 - math.exp(-self.updates / self.warmup_steps))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        weight = 1.0 - self.current_decay()
        ema_f, cur_f = [], []
        for name, t in named_tensors(model):
            e = self.weights[name]
            if e.is_floating_point():
                ema_f.append(e)
                cur_f.append(t.detach().to(e.dtype))
            else:
                e.copy_(t)
        if ema_f:
            torch._foreach_lerp_(ema_f, cur_f, weight)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "warmup_steps": self.warmup_steps, "updates": self.updates,
                "weights": dict(self.weights)}

    def save(self, path: str) -> None:
        """The weights as safetensors (a local path), with the update count."""
        from safetensors.torch import save_file  # noqa: PLC0415

        tensors = {k: v.detach().contiguous().cpu() for k, v in self.weights.items()}
        save_file(tensors, path, metadata={"updates": str(self.updates), "decay": str(self.decay)})

    def load(self, path: str) -> None:
        from safetensors import safe_open  # noqa: PLC0415

        with safe_open(path, framework="pt") as f:
            weights = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            updates = int((f.metadata() or {}).get("updates", 0))
        self.load_state_dict({"weights": weights, "updates": updates})

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = set(self.weights) ^ set(state["weights"])
        if missing:
            raise ValueError(f"EMA state does not match the model: {sorted(missing)[:5]}")
        for name, t in state["weights"].items():
            self.weights[name].copy_(t)
        self.updates = int(state["updates"])


def named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()
