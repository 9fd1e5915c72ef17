"""The optimizer and LR schedule the reference trains with, built from `optim:` alone.

DeepSpeed gets both from us (`engine.py`), so the optimisation is the reference's whatever the
ZeRO stage: Adam/AdamW/SGD over `models.param_groups` (no weight decay on biases and norms)
and a per-step OneCycle (or a constant LR). `STATE_KEYS` names the per-parameter state each
optimizer keeps: what a world-size-free checkpoint (`Engine.portable_state`) must carry.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from trainer.config import OptimConfig
from trainer.models import param_groups

__all__ = ["STATE_KEYS", "build_optimizer", "build_schedule", "state_keys"]

log = logging.getLogger(__name__)

# Per-parameter tensors of each optimizer's state, besides its scalar "step".
STATE_KEYS: dict[str, tuple[str, ...]] = {"adam": ("exp_avg", "exp_avg_sq"), "adamw": ("exp_avg", "exp_avg_sq"),
                                          "sgd": ("momentum_buffer",)}


def state_keys(o: OptimConfig) -> tuple[str, ...]:
    """The state tensors `o`'s optimizer keeps per parameter (SGD without momentum: none)."""
    return () if o.name == "sgd" and o.momentum == 0 else STATE_KEYS[o.name]


def build_optimizer(model: nn.Module, o: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, o.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if o.name == "adam":
        # Adam's L2-style decay on the decay group only, as the reference does.
        return torch.optim.Adam(groups, lr=o.lr)
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.momentum > 0)


def build_schedule(optimizer: torch.optim.Optimizer, o: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler | None:
    """OneCycle over `total_steps` optimizer steps, or None (constant LR)."""
    if o.schedule == "onecycle" and o.pct_start * total_steps <= 1.0:
        # OneCycle's warm-up phase would have no length (torch divides by zero): a smoke run
        # this short has no schedule to speak of, so it runs at the peak LR.
        log.warning("total_steps=%d too short for OneCycle with pct_start=%s: constant LR", total_steps, o.pct_start)
        return None
    if o.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=o.lr, total_steps=total_steps,
                                                   pct_start=o.pct_start)
    return None
