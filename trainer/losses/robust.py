"""Losses robust to missing labels, beyond both papers, in the same API.

* ``hill`` and ``splc``: Zhang et al. 2021, "Simple and robust loss design for multi-label
  learning with missing labels". Their setting has no verified negatives; here both losses
  treat annotated negatives as verified: SPLC never flips them, and Hill gives them plain BCE
  (Hill's down-weighting of confident negatives exists to tolerate false negatives, which a
  verified negative is not).
* ``ll-r`` and ``ll-ct``: Kim et al. 2022, "Large Loss Matters in Weakly Supervised
  Multi-Label Classification". Un-annotated labels are negatives, except the largest-loss ones
  of the batch, which are rejected (LL-R) or temporarily corrected to positive (LL-Ct). The
  rate grows by ``delta_rel`` per epoch from 0 at epoch 0, as the authors' code does after its
  warm-up epoch, and k = ceil(rate * B * C) like theirs: a count from static shapes, where the
  number of un-annotated labels would need a host sync. The loss of an un-annotated negative,
  softplus(z), is increasing in z, so "largest loss" is ranked on logits.

These are off the hot path and use plain autograd; focusing weights follow ``detach_focus``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import PartialLoss, check_float, check_int

__all__ = ["HillLoss", "SPLCLoss", "LargeLossReject", "LargeLossCorrect"]


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"parameter {name!r} must be a bool, got {value!r}")
    return value


class HillLoss(PartialLoss):
    """Hill loss (Zhang et al. 2021, eqs. for L+ "focal margin" and L- "Hill"):

        positives:          -(1 - p_m)^gamma log p_m,   p_m = sigmoid(z - margin)
        un-annotated:       (lamb - p) p^2,             p = sigmoid(z)
        annotated negative: -log(1 - p)

    Defaults follow the paper: lamb = 1.5, margin = 1, gamma = 2.
    """

    def __init__(self, *, lamb: float = 1.5, margin: float = 1.0, gamma: float = 2.0,
                 detach_focus: bool = True, reduction: str = "sum") -> None:
        super().__init__(reduction)
        self.lamb = check_float("lamb", lamb, low=1.0)
        self.margin = check_float("margin", margin, low=0.0)
        self.gamma = check_float("gamma", gamma, low=0.0)
        self.detach_focus = _check_bool("detach_focus", detach_focus)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        x = self._check(logits, targets)
        xm = x - self.margin
        focus = torch.sigmoid(-xm).pow(self.gamma)
        if self.detach_focus:
            focus = focus.detach()
        p = torch.sigmoid(x)
        per = torch.where(targets == 1, -focus * F.logsigmoid(xm),
                          torch.where(targets == 0, (self.lamb - p) * p * p, F.softplus(x)))
        return per.sum() * self._scale(x.shape[0])


class SPLCLoss(PartialLoss):
    """Self-Paced Loss Correction (Zhang et al. 2021): focal margin loss plus label flipping.

        from epoch ``change_epoch`` on, un-annotated c with sigmoid(z_c) > tau count as positive
        positives:  -(1 - p)^gamma log p,  p = sigmoid(z - margin) for annotated positives and
                    sigmoid(z) for flipped ones (the margin is for trusted labels, as in theirs)
        negatives (annotated, and un-annotated not flipped): -p^gamma log(1 - p), p = sigmoid(z)

    Defaults follow the paper: tau = 0.6, change_epoch = 1, margin = 1, gamma = 2.
    """

    def __init__(self, *, tau: float = 0.6, change_epoch: int = 1, margin: float = 1.0,
                 gamma: float = 2.0, detach_focus: bool = True, reduction: str = "sum") -> None:
        super().__init__(reduction)
        self.tau = check_float("tau", tau, low=0.0, high=1.0, low_open=True)
        if self.tau >= 1.0:
            raise ValueError(f"parameter 'tau' must be < 1, got {tau!r}")
        self.change_epoch = check_int("change_epoch", change_epoch, low=0)
        self.margin = check_float("margin", margin, low=0.0)
        self.gamma = check_float("gamma", gamma, low=0.0)
        self.detach_focus = _check_bool("detach_focus", detach_focus)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        x = self._check(logits, targets)
        annotated_pos = targets == 1
        as_pos = annotated_pos
        if self.epoch >= self.change_epoch:
            threshold = math.log(self.tau / (1.0 - self.tau))          # sigmoid(z) > tau
            as_pos = annotated_pos | ((targets == 0) & (x.detach() > threshold))
        z = torch.where(annotated_pos, x - self.margin, x)
        p = torch.sigmoid(z)
        focus = torch.where(as_pos, 1.0 - p, p).pow(self.gamma)
        if self.detach_focus:
            focus = focus.detach()
        nll = torch.where(as_pos, F.softplus(-z), F.softplus(z))
        return (focus * nll).sum() * self._scale(x.shape[0])


class _LargeLoss(PartialLoss):
    correct = False

    def __init__(self, *, delta_rel: float = 0.002, reduction: str = "sum") -> None:
        super().__init__(reduction)
        self.delta_rel = check_float("delta_rel", delta_rel, low=0.0, high=1.0)

    def num_modified(self, batch: int, num_classes: int) -> int:
        """k: how many labels of this batch are rejected/corrected at the current epoch."""
        total = batch * num_classes
        rate = min(self.delta_rel * self.epoch, 1.0)
        return min(total, math.ceil(rate * total - 1e-9))

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        x = self._check(logits, targets)
        b, c = x.shape
        pos_nll, neg_nll = F.softplus(-x), F.softplus(x)
        per = torch.where(targets == 1, pos_nll, neg_nll)
        k = self.num_modified(b, c)
        if k > 0:
            unann = targets == 0
            with torch.no_grad():
                ranked = torch.where(unann, x, torch.full_like(x, -math.inf))
                idx = ranked.reshape(-1).topk(k, sorted=False).indices
                chosen = torch.zeros_like(unann)
                chosen.view(-1)[idx] = True
                chosen &= unann
            per = torch.where(chosen, pos_nll if self.correct else torch.zeros_like(per), per)
        return per.sum() * self._scale(b)


class LargeLossReject(_LargeLoss):
    """LL-R (Kim et al. 2022, eq. for lambda_i = 0 on the rejected set):

        L = - sum_{P} log p - sum_{N} log(1 - p) - sum_{U \\ R} log(1 - p)
        R = the k un-annotated labels of the batch with the largest -log(1 - p),
        k = ceil(min(delta_rel * epoch, 1) * B * C)
    """


class LargeLossCorrect(_LargeLoss):
    """LL-Ct (Kim et al. 2022): as LL-R, but R is trained as positive for this step:

        L = - sum_{P u R} log p - sum_{N} log(1 - p) - sum_{U \\ R} log(1 - p)
    """

    correct = True
