"""Paper 2's pseudo-label dynamic loss, eqs. (11) and (12).

Per image (existing part E = annotated labels, N_e = |E|; non-existing part S = the q-sampled
un-annotated labels, N_ne = |S|; y_hat = sigmoid(z); y_tilde the pseudo-labels):

    L_i = - p_i alpha [ 1/N_e sum_E y log y_hat       + d/N_ne sum_S y_tilde log y_hat ]
          - p_i beta  [ 1/N_e sum_E (1-y) log(1-y_hat) + d/N_ne sum_S (1-y_tilde) log(1-y_hat) ]

* beta = max(P / T, gamma_floor), alpha = 1 - beta, P the positive and T all annotated labels
  of the batch (sec. IV.B): few positives means a large alpha on the positive terms.
* d = exp((e_c + m) / e_T - 1). The printed eq. (9) omits the "- 1", but the text says d = 1 at
  epoch e_T - m and that the existing part dominates before it; only this form does both.
  Before ``set_epoch`` is first called d = 1.
* p_i = 2 when every prediction of the image is <= ``low`` (eq. 10's sign(sum max(y - low, 0))
  is 0 exactly then), else 1. It is a step function: no gradient, so it is computed on logits.
* eq. (12): each step keeps a random fraction q of each image's un-annotated labels (Bernoulli
  draws from a generator seeded by ``seed`` and the epoch, so a run is reproducible per epoch).
  Empty parts contribute 0 (counts are clamped to 1).

Pseudo-labels. ``forward(..., pseudo=None)`` uses the paper's initial 0.5 (eq. 5). Updating
them with the model's own current prediction is useless: the non-existing term's gradient is
proportional to (y_tilde - y_hat) when alpha = beta, exactly zero for y_tilde = y_hat. And a
per-sample table at 9M x 9,600 floats is 345 GB. So the trainer passes the detached
predictions of its EMA model as ``pseudo``; this loss only consumes them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import PartialLoss, check_float, check_int

__all__ = ["PseudoLabelLoss"]


class PseudoLabelLoss(PartialLoss):
    """Paper 2, eq. (12) (eq. (11) when q = 1). See the module docstring for every term."""

    def __init__(self, *, q: float = 1.0, m: float = 3.0, gamma_floor: float = 0.05,
                 low: float = 0.1, seed: int = 0, reduction: str = "sum") -> None:
        super().__init__(reduction)
        self.q = check_float("q", q, low=0.0, high=1.0, low_open=True)
        self.m = check_float("m", m)
        self.gamma_floor = check_float("gamma_floor", gamma_floor, low=0.0, high=1.0)
        self.low = check_float("low", low, low=0.0, high=1.0, low_open=True)
        if self.low >= 1.0:
            raise ValueError(f"parameter 'low' must be < 1, got {low!r}")
        self.seed = check_int("seed", seed, low=0)
        self._generator: torch.Generator | None = None
        self._generator_key: tuple[str, int] | None = None

    def dynamic_weight(self) -> float:
        """d of eq. (9), as the text defines it (see the module docstring)."""
        if self.total_epochs is None:
            return 1.0
        return math.exp((self.epoch + self.m) / self.total_epochs - 1.0)

    def _sample_mask(self, unann: Tensor) -> Tensor:
        """eq. (12): keep each un-annotated label with probability q."""
        if self.q >= 1.0:
            return unann
        key = (str(unann.device), self.epoch)
        if self._generator is None or self._generator_key != key:
            # Reseeded per epoch: a run resumed at an epoch boundary draws the same labels.
            self._generator = torch.Generator(device=unann.device)
            self._generator.manual_seed(self.seed * 1_000_003 + self.epoch)
            self._generator_key = key
        draw = torch.rand(unann.shape, generator=self._generator, device=unann.device)
        return unann & (draw < self.q)

    def forward(self, logits: Tensor, targets: Tensor, pseudo: Tensor | None = None) -> Tensor:
        x = self._check(logits, targets)
        if pseudo is None:
            y_tilde: Tensor | float = 0.5
        else:
            if pseudo.shape != x.shape:
                raise ValueError(f"pseudo shape {tuple(pseudo.shape)} != logits shape {tuple(x.shape)}")
            y_tilde = pseudo.detach().to(torch.float32).clamp(0.0, 1.0)
        pos = (targets == 1).to(torch.float32)
        neg = (targets == -1).to(torch.float32)
        sel = self._sample_mask(targets == 0).to(torch.float32)

        log_p = F.logsigmoid(x)
        log_q = F.logsigmoid(-x)
        n_e = (pos + neg).sum(dim=1).clamp(min=1.0)
        n_ne = sel.sum(dim=1).clamp(min=1.0)
        d = self.dynamic_weight()

        positives = pos.sum()
        total = (pos.sum() + neg.sum()).clamp(min=1.0)
        beta = torch.clamp(positives / total, min=self.gamma_floor)     # sec. IV.B
        alpha = 1.0 - beta

        pos_part = (pos * log_p).sum(1) / n_e + d * (sel * y_tilde * log_p).sum(1) / n_ne
        neg_part = (neg * log_q).sum(1) / n_e + d * (sel * (1.0 - y_tilde) * log_q).sum(1) / n_ne
        with torch.no_grad():
            threshold = math.log(self.low / (1.0 - self.low))           # eq. (10) on logits
            penalty = 1.0 + (x.amax(dim=1) > threshold).logical_not().to(torch.float32)
        per_image = -penalty * (alpha * pos_part + beta * neg_part)
        return per_image.sum() * self._scale(x.shape[0])
