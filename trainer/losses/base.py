"""Shared pieces of the loss zoo: the base module, parameter checks and the focal kernel.

Every loss takes ``logits [B, C]`` (any float dtype) and ``targets [B, C]`` (integer, paper 1's
encoding: 1 positive, -1 annotated negative, 0 un-annotated) and returns a scalar. The maths is
done in float32 whatever the logits' dtype, so bf16 training gets the same loss as fp32.

Why a hand-made gradient. Most losses here are eq. (3) of paper 1 with different parameters
(P-ASL, CSL, ASL, focal, plain BCE in Ignore or Negative mode). With focusing weights detached,
as the public CSL code does, eq. (3)'s gradient per element is a single power:

    u = -z on positives, z elsewhere;  r = sigmoid(u)  (the probability of the wrong answer)
    loss_e = w_e * softplus(u)         w_e = omega_e * r^gamma_e   (detached)
    d loss_e / d u = w_e * r           d loss_e / d z = sign_e * w_e * r

so :func:`partial_focal` computes the value and the gradient in one pass with float masks
(comparisons and ``torch.where`` on int8 cost several times a float multiply on CPU) and
attaches the gradient with :class:`_PrecomputedGrad`. Autograd through the same expression
would keep about ten [B, C] temporaries alive and run a backward op per forward op; measured
in ``bench/loss_speed.py`` this is what keeps CSL within a small factor of plain BCE. With
``detach_focus=False`` the same expression goes through ordinary autograd instead.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PartialLoss", "partial_focal", "check_float", "check_int", "prior_buffer"]

REDUCTIONS = ("sum", "mean")


def check_float(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                low_open: bool = False) -> float:
    """Return ``value`` as a float, or raise ValueError naming the parameter."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"parameter {name!r} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"parameter {name!r} must be finite, got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"parameter {name!r} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"parameter {name!r} must be <= {high}, got {value!r}")
    return value


def check_int(name: str, value: Any, *, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"parameter {name!r} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"parameter {name!r} must be >= {low}, got {value!r}")
    return value


def prior_buffer(prior: Any, name: str = "prior") -> Tensor:
    """Validate a label prior (one probability per class) and return it as float32 [C]."""
    try:
        t = torch.as_tensor(prior, dtype=torch.float32).detach().clone()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{name!r} must be a 1-D sequence of probabilities: {exc}") from None
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{name!r} must be 1-D with one value per class, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()) or bool((t < 0).any()) or bool((t > 1).any()):
        raise ValueError(f"{name!r} must hold probabilities in [0, 1]")
    return t


class PartialLoss(nn.Module):
    """Base of every loss: reduction, epoch bookkeeping and input checks.

    ``reduction="sum"`` sums over labels and batch; ``"mean"`` divides that sum by B (not by
    B * C: the number of classes is a property of the dataset, and dividing by it would make
    the learning rate depend on it).
    """

    def __init__(self, reduction: str = "sum") -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"parameter 'reduction' must be one of {list(REDUCTIONS)}, got {reduction!r}")
        self.reduction = reduction
        self.epoch = 0
        self.total_epochs: int | None = None     # None until the trainer calls set_epoch

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        """Tell the loss where training is; epochs count from 0. A no-op for most losses."""
        total_epochs = check_int("total_epochs", total_epochs, low=1)
        epoch = check_int("epoch", epoch, low=0)
        self.epoch, self.total_epochs = epoch, total_epochs

    def _check(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Shape and dtype checks (metadata only, no host sync); returns float32 logits."""
        if logits.dim() != 2:
            raise ValueError(f"logits must be [B, C], got shape {tuple(logits.shape)}")
        if targets.shape != logits.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} != logits shape {tuple(logits.shape)}")
        if targets.is_floating_point() or targets.dtype == torch.bool:
            # The reference code's float 1/0/-1 targets mean something else (0 = negative):
            # refuse floats rather than silently misread them.
            raise ValueError(f"targets must be an integer tensor (int8: 1, -1, 0), got {targets.dtype}")
        if not logits.is_floating_point():
            raise ValueError(f"logits must be floating point, got {logits.dtype}")
        return logits.float()

    def _scale(self, batch: int) -> float:
        return 1.0 if self.reduction == "sum" else 1.0 / max(batch, 1)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class _PrecomputedGrad(torch.autograd.Function):
    """Return ``value`` in forward; in backward, ``grad_out * grad`` w.r.t. ``x``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, value: Tensor, grad: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(grad)
        ctx.dtype = x.dtype
        return value

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return (grad * grad_out).to(ctx.dtype), None, None


def _power(base: Tensor, gamma: float, cache: dict[float, Tensor]) -> Tensor | None:
    """``base ** gamma``; None for gamma = 0 (a weight of one). Small integers by squaring:
    ``torch.pow`` with a float exponent costs about ten multiplies on CPU."""
    if gamma == 0.0:
        return None
    if gamma in cache:
        return cache[gamma]
    if gamma == 1.0:
        out = base
    elif gamma == int(gamma) and gamma <= 16:
        n, out, sq = int(gamma), None, base
        while n:
            if n & 1:
                out = sq if out is None else out * sq
            n >>= 1
            if n:
                sq = sq * sq
    else:
        out = base.pow(gamma)
    cache[gamma] = out
    return out


def _focus_weights(base: Tensor, pos: Tensor, neg: Tensor, una: Tensor | None,
                   gammas: tuple[float, float, float], inplace: bool) -> Tensor:
    """w = pos * base^g+ + neg * base^g- + una * base^gu (``una`` already holds omega)."""
    cache: dict[float, Tensor] = {}
    p_pos, p_neg = _power(base, gammas[0], cache), _power(base, gammas[1], cache)
    w = pos if p_pos is None else pos * p_pos
    w = w + neg if p_neg is None else torch.addcmul(w, neg, p_neg)      # always a new tensor
    if una is not None:
        p_una = _power(base, gammas[2], cache)
        if inplace:
            w = w.add_(una) if p_una is None else w.addcmul_(una, p_una)
        else:
            w = w + (una if p_una is None else una * p_una)
    return w


def partial_focal(
    logits: Tensor,
    targets: Tensor,
    *,
    gamma_pos: float = 0.0,
    gamma_neg: float = 0.0,
    gamma_unann: float = 0.0,
    clip: float = 0.0,
    unann_weight: Tensor | float = 1.0,
    row_weight: Tensor | None = None,
    scale: float = 1.0,
    detach_focus: bool = True,
) -> Tensor:
    """Paper 1, eq. (3), summed over the batch and multiplied by ``scale``; a scalar loss.

        positives:             -(1 - p)^gamma_pos   log p                      (eq. 2)
        annotated negatives:   -p_m^gamma_neg       log(1 - p_m)
        un-annotated:          -omega p_m^gamma_unann log(1 - p_m)
        p = sigmoid(z), p_m = max(p - clip, 0) (ASL's probability margin; p_m = p for clip 0)

    ``unann_weight`` is omega (a float, or a tensor broadcastable to [B, C]: eq. (9), appendix B);
    ``row_weight`` ([B, 1]) scales whole images (wCE's g(p) / C). ``logits`` is float32 here.
    The float masks are built in place: on CPU this kernel is memory-bound, and every fresh
    [B, C] temporary costs about as much as the arithmetic on it.
    """
    gammas = (gamma_pos, gamma_neg, gamma_unann)
    neg = targets.to(torch.float32)
    pos = neg.clamp(min=0.0)                 # 1 on positives
    neg.neg_().add_(pos)                     # 1 on annotated negatives
    una: Tensor | None = None
    if isinstance(unann_weight, Tensor) or unann_weight != 0.0:
        una = torch.add(pos, neg).neg_().add_(1.0)                      # 1 on un-annotated
        if isinstance(unann_weight, Tensor) or unann_weight != 1.0:
            una.mul_(unann_weight)
    if row_weight is not None:
        pos, neg = pos * row_weight, neg * row_weight
        if una is not None:
            una.mul_(row_weight)
        pos_ind = (targets == 1).to(torch.float32)
    else:
        pos_ind = pos
    sign = pos_ind.mul(-2.0).add_(1.0)       # -1 on positives: u = -z there

    if not detach_focus:
        # Ordinary autograd: the focusing weights carry gradient too.
        u = logits * sign                    # multiply, not subtract: keeps +-inf signs right
        r = torch.sigmoid(u)
        if clip > 0.0:
            pm = (r - clip).clamp(min=0.0)
            base = pos_ind * r + (1.0 - pos_ind) * pm
            nll = pos_ind * F.softplus(u) - (1.0 - pos_ind) * torch.log1p(-pm)
        else:
            base, nll = r, F.softplus(u)
        w = _focus_weights(base, pos, neg, una, gammas, inplace=False)
        return (w * nll).sum() * scale

    with torch.no_grad():
        u = logits.detach() * sign
        r = torch.sigmoid(u)                 # the probability of the wrong answer
        if clip > 0.0:
            # Negative side uses p_m; the positive side keeps p (ASL clips negatives only).
            pm = (r - clip).clamp_(min=0.0)
            q = 1.0 - pm                     # 1 - p_m >= clip > 0: the log below is safe
            base = torch.addcmul(pm, pos_ind, r - pm)
            nll = torch.where(pos_ind > 0, F.softplus(u), q.log().neg_())
        else:
            base, nll = r, F.softplus(u)
        del u
        w = _focus_weights(base, pos, neg, una, gammas, inplace=True)
        del base, una
        value = torch.dot(w.reshape(-1), nll.reshape(-1))
        if clip > 0.0:
            # d/dz of -log(1 - p + clip) is p (1 - p) / q where p > clip, else 0.
            dneg = r * (1.0 - r) / q * torch.sign(pm)
            grad = w.mul_(torch.addcmul(dneg, pos_ind, -r - dneg))
        else:
            grad = w.mul_(r).mul_(sign)
        if scale != 1.0:
            value, grad = value * scale, grad.mul_(scale)
    return _PrecomputedGrad.apply(logits, value, grad)
