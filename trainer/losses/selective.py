"""P-ASL and the Class-aware Selective Loss (paper 1, sec. 4).

All three losses are eq. (3): positives, annotated negatives and un-annotated labels each get
their own focusing parameter, and un-annotated labels are weighted by omega_c:

* ``pasl``: omega = 1 (P-ASL in *Negative* mode).
* ``csl``: omega = 0 on Omega_Ignore = Omega_L u Omega_P (eqs. 5, 7, 8, 9), else 1.
* ``csl-soft``: omega = 0 on Omega_L, exp(-alpha * prior_c) elsewhere (appendix B).

Omega_L (eq. 5) is the K un-annotated labels of each image with the highest predicted
probability, prior-ignored ones included. It is ranked on logits (sigmoid is monotonic and
saturates in float32, logits do not) with ``topk`` per row, O(B C) with a tiny K, instead of the
reference code's argsort of the whole flattened batch. ``topk_scope="batch"`` reproduces the
reference variant: the K * B most likely un-annotated labels of the flattened batch.

Omega_P (eq. 7) needs the label prior. It is a registered buffer, moved with the module and
saved in its state dict; the threshold comparison is redone per call on [C] values (cheap, and
never stale after ``load_state_dict``).

Focusing weights are detached by default, as the public reference code does (it computes them
under ``no_grad``); ``detach_focus=False`` lets gradient flow through them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import PartialLoss, check_float, check_int, partial_focal, prior_buffer

__all__ = ["PartialASL", "ClassAwareSelectiveLoss", "SoftSelectiveLoss", "likelihood_mask"]

TOPK_SCOPES = ("sample", "batch")


def likelihood_mask(logits: Tensor, targets: Tensor, k: int, scope: str = "sample",
                    class_weight: Tensor | None = None) -> Tensor:
    """Float [B, C]: 0 on Omega_L (eq. 5), ``class_weight`` ([C], default 1) elsewhere.

    Annotated labels are pushed far below every un-annotated logit so ``topk`` only picks
    them when an image has fewer than K un-annotated labels; the mask is only ever applied to
    un-annotated terms, so those picks do nothing.
    """
    b, c = logits.shape
    with torch.no_grad():
        annotated = targets.to(torch.float32).abs()
        ranked = torch.add(logits.clamp(-1e30, 1e30), annotated, alpha=-1e32)
        # The class weight is folded in here, saving a [B, C] multiply per call.
        keep = (torch.ones_like(ranked) if class_weight is None
                else class_weight.to(ranked.dtype).expand(b, c).contiguous())
        if scope == "sample":
            idx = ranked.topk(min(k, c), dim=1, sorted=False).indices
            keep.scatter_(1, idx, 0.0)
        else:
            idx = ranked.reshape(-1).topk(min(k * b, b * c), sorted=False).indices
            keep.view(-1).scatter_(0, idx, 0.0)
    return keep


class PartialASL(PartialLoss):
    """P-ASL, eq. (3) with omega = 1:

        L = - sum_{P} (1-p)^g+ log p - sum_{N} p_m^g- log(1-p_m) - sum_{U} p_m^gu log(1-p_m)

    ``clip`` is ASL's probability margin p_m = max(p - clip, 0), on both negative terms as the
    reference code does; 0 (the default) is eq. (3) as printed.
    """

    def __init__(self, *, gamma_pos: float = 0.0, gamma_neg: float = 1.0, gamma_unann: float = 4.0,
                 clip: float = 0.0, detach_focus: bool = True, reduction: str = "sum") -> None:
        super().__init__(reduction)
        self.gamma_pos = check_float("gamma_pos", gamma_pos, low=0.0)
        self.gamma_neg = check_float("gamma_neg", gamma_neg, low=0.0)
        self.gamma_unann = check_float("gamma_unann", gamma_unann, low=0.0)
        self.clip = check_float("clip", clip, low=0.0, high=1.0)
        if not isinstance(detach_focus, bool):
            raise ValueError(f"parameter 'detach_focus' must be a bool, got {detach_focus!r}")
        self.detach_focus = detach_focus

    def _omega(self, logits: Tensor, targets: Tensor) -> Tensor | float:
        return 1.0

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        x = self._check(logits, targets)
        return partial_focal(
            x, targets, gamma_pos=self.gamma_pos, gamma_neg=self.gamma_neg,
            gamma_unann=self.gamma_unann, clip=self.clip, unann_weight=self._omega(x, targets),
            scale=self._scale(x.shape[0]), detach_focus=self.detach_focus)


class ClassAwareSelectiveLoss(PartialASL):
    """CSL: eq. (3) with omega_c from eq. (9): 0 on Omega_L u Omega_P (eqs. 5, 7, 8), else 1.

    ``likelihood_topk`` is K of eq. (5), ``prior_threshold`` eta of eq. (7). K = 0 and no prior
    is ``pasl``; K = C ignores every un-annotated label (*Ignore* mode P-ASL).
    """

    def __init__(self, *, prior: Any = None, likelihood_topk: int = 5, prior_threshold: float = 0.5,
                 topk_scope: str = "sample", gamma_pos: float = 0.0, gamma_neg: float = 1.0,
                 gamma_unann: float = 4.0, clip: float = 0.0, detach_focus: bool = True,
                 reduction: str = "sum") -> None:
        super().__init__(gamma_pos=gamma_pos, gamma_neg=gamma_neg, gamma_unann=gamma_unann,
                         clip=clip, detach_focus=detach_focus, reduction=reduction)
        self.likelihood_topk = check_int("likelihood_topk", likelihood_topk, low=0)
        self.prior_threshold = check_float("prior_threshold", prior_threshold, low=0.0, high=1.0)
        if topk_scope not in TOPK_SCOPES:
            raise ValueError(f"parameter 'topk_scope' must be one of {list(TOPK_SCOPES)}, got {topk_scope!r}")
        self.topk_scope = topk_scope
        self.register_buffer("prior", None if prior is None else prior_buffer(prior))

    def _prior_for(self, num_classes: int) -> Tensor | None:
        prior = self.prior
        if prior is not None and prior.numel() != num_classes:
            raise ValueError(f"prior has {prior.numel()} classes but logits have {num_classes}")
        return prior

    def _prior_weight(self, prior: Tensor) -> Tensor:
        return (prior <= self.prior_threshold).to(torch.float32)        # eq. (7): 0 on Omega_P

    def _omega(self, logits: Tensor, targets: Tensor) -> Tensor | float:
        prior = self._prior_for(logits.shape[1])
        pw = None if prior is None else self._prior_weight(prior)
        if self.likelihood_topk > 0:
            # eq. (8): the union of Omega_L and Omega_P is the product of their 0/1 masks.
            return likelihood_mask(logits, targets, self.likelihood_topk, self.topk_scope, pw)
        return 1.0 if pw is None else pw

    def extra_repr(self) -> str:
        return (f"K={self.likelihood_topk}, eta={self.prior_threshold}, scope={self.topk_scope!r}, "
                f"prior={'none' if self.prior is None else self.prior.numel()}, {super().extra_repr()}")


class SoftSelectiveLoss(ClassAwareSelectiveLoss):
    """Appendix B: omega_c = 0 on Omega_L, exp(-prior_alpha * prior_c) elsewhere (no eta)."""

    def __init__(self, *, prior: Any = None, likelihood_topk: int = 5, prior_alpha: float = 10.0,
                 topk_scope: str = "sample", gamma_pos: float = 0.0, gamma_neg: float = 1.0,
                 gamma_unann: float = 4.0, clip: float = 0.0, detach_focus: bool = True,
                 reduction: str = "sum") -> None:
        if prior is None:
            raise ValueError("parameter 'prior' is required by csl-soft (appendix B weights by it)")
        super().__init__(prior=prior, likelihood_topk=likelihood_topk, topk_scope=topk_scope,
                         gamma_pos=gamma_pos, gamma_neg=gamma_neg, gamma_unann=gamma_unann,
                         clip=clip, detach_focus=detach_focus, reduction=reduction)
        self.prior_alpha = check_float("prior_alpha", prior_alpha, low=0.0)

    def _prior_weight(self, prior: Tensor) -> Tensor:
        return torch.exp(-self.prior_alpha * prior)
