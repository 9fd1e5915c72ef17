"""The baselines both papers compare against, in the same API as the selective losses.

``ignore``, ``negative``, ``focal`` and ``asl`` are special cases of paper 1's eq. (3), so they
share :func:`partial_focal` (and its single-pass gradient) instead of re-deriving BCE:

* ``ignore``  (paper 1, "CE, Ignore"):   gammas 0, omega = 0.
* ``negative`` ("CE, Negative"):         gammas 0, omega = 1.
* ``focal`` (Lin et al. 2017, eq. 2):    all gammas equal, un-annotated as negatives.
* ``asl`` (Ben-Baruch et al. 2020):      gamma_pos; gamma_neg on every negative, annotated or
  not; probability margin p_m = max(p - clip, 0) on negatives.

``wce`` (Durand et al. 2019) is Ignore mode with a per-image weight, and ``an-ls`` is plain
``binary_cross_entropy_with_logits`` on smoothed targets (already one fused op).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import PartialLoss, check_float, partial_focal

__all__ = ["IgnoreBCE", "NegativeBCE", "WeightedPartialBCE", "FocalLoss", "AsymmetricLoss",
           "LabelSmoothingNegative"]


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"parameter {name!r} must be a bool, got {value!r}")
    return value


class IgnoreBCE(PartialLoss):
    """BCE on annotated labels only (paper 1 sec. 3.2, *Ignore*; eq. 1 with L^u = 0):

        L = - sum_{P} log p - sum_{N} log(1 - p)
    """

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        x = self._check(logits, targets)
        return partial_focal(x, targets, unann_weight=0.0, scale=self._scale(x.shape[0]))


class NegativeBCE(PartialLoss):
    """BCE with un-annotated labels as negatives (paper 1 sec. 3.2, *Negative*, L^u = L^-):

        L = - sum_{P} log p - sum_{N u U} log(1 - p)
    """

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        x = self._check(logits, targets)
        return partial_focal(x, targets, unann_weight=1.0, scale=self._scale(x.shape[0]))


class WeightedPartialBCE(PartialLoss):
    """Durand et al. 2019 partial BCE (paper 1 ref. [7], "wCE"):

        L(x) = g(p_x) / C * [ - sum_{P} log p_c - sum_{N} log(1 - p_c) ]
        g(p) = alpha * p^gamma + beta,  p_x = |P u N| / C  (the image's annotated fraction)

    Defaults alpha = -4.45, beta = 5.45, gamma = 1 give g(0.1) = 5 and g(1) = 1: with every
    label annotated this is BCE averaged over classes.
    """

    def __init__(self, *, alpha: float = -4.45, beta: float = 5.45, gamma: float = 1.0,
                 reduction: str = "sum") -> None:
        super().__init__(reduction)
        self.alpha = check_float("alpha", alpha)
        self.beta = check_float("beta", beta)
        self.gamma = check_float("gamma", gamma, low=0.0, low_open=True)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        x = self._check(logits, targets)
        c = x.shape[1]
        frac = (targets != 0).sum(dim=1, keepdim=True).to(torch.float32) / c
        g = self.alpha * frac.pow(self.gamma) + self.beta
        return partial_focal(x, targets, unann_weight=0.0, row_weight=g / c,
                             scale=self._scale(x.shape[0]))


class FocalLoss(PartialLoss):
    """Focal loss (Lin et al. 2017; paper 1 eq. 2), un-annotated labels as negatives:

        L = - sum_{P} (1-p)^gamma log p - sum_{N u U} p^gamma log(1-p)

    Focusing weights are detached unless ``detach_focus=False`` (see ``base``).
    """

    def __init__(self, *, gamma: float = 2.0, detach_focus: bool = True, reduction: str = "sum") -> None:
        super().__init__(reduction)
        self.gamma = check_float("gamma", gamma, low=0.0)
        self.detach_focus = _check_bool("detach_focus", detach_focus)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        x = self._check(logits, targets)
        g = self.gamma
        return partial_focal(x, targets, gamma_pos=g, gamma_neg=g, gamma_unann=g,
                             scale=self._scale(x.shape[0]), detach_focus=self.detach_focus)


class AsymmetricLoss(PartialLoss):
    """ASL (Ben-Baruch et al. 2020, paper 1 ref. [2]), un-annotated labels as negatives:

        L = - sum_{P} (1-p)^gamma_pos log p - sum_{N u U} p_m^gamma_neg log(1 - p_m)
        p_m = max(p - clip, 0)

    Defaults are ASL's: gamma_pos = 0, gamma_neg = 4, clip = 0.05. Focusing weights detached
    unless ``detach_focus=False``.
    """

    def __init__(self, *, gamma_pos: float = 0.0, gamma_neg: float = 4.0, clip: float = 0.05,
                 detach_focus: bool = True, reduction: str = "sum") -> None:
        super().__init__(reduction)
        self.gamma_pos = check_float("gamma_pos", gamma_pos, low=0.0)
        self.gamma_neg = check_float("gamma_neg", gamma_neg, low=0.0)
        self.clip = check_float("clip", clip, low=0.0, high=1.0)
        self.detach_focus = _check_bool("detach_focus", detach_focus)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        x = self._check(logits, targets)
        return partial_focal(x, targets, gamma_pos=self.gamma_pos, gamma_neg=self.gamma_neg,
                             gamma_unann=self.gamma_neg, clip=self.clip,
                             scale=self._scale(x.shape[0]), detach_focus=self.detach_focus)


class LabelSmoothingNegative(PartialLoss):
    """AN-LS: un-annotated labels as negatives, then label smoothing (paper 2's BCE-LS):

        y' = 1 - eps on positives, eps on annotated and un-annotated negatives
        L  = - sum_{c} [ y'_c log p_c + (1 - y'_c) log(1 - p_c) ]
    """

    def __init__(self, *, eps: float = 0.1, reduction: str = "sum") -> None:
        super().__init__(reduction)
        self.eps = check_float("eps", eps, low=0.0, high=0.5)

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        x = self._check(logits, targets)
        pos = targets.to(torch.float32).clamp(min=0.0)
        smooth = pos * (1.0 - 2.0 * self.eps) + self.eps
        return F.binary_cross_entropy_with_logits(x, smooth, reduction="sum") * self._scale(x.shape[0])
