"""The loss zoo: every partial-label loss behind one constructor.

    loss_fn = build_loss("csl", prior=prior, likelihood_topk=5, prior_threshold=0.5)
    loss = loss_fn(logits, targets)      # logits [B, C] float; targets [B, C] int8 in {1, -1, 0}

Each loss is a plain ``nn.Module`` (no engine, no Ray) with typed keyword-only constructor
arguments, ``reduction`` "sum" (over labels and batch) or "mean" (that sum / B), and
``set_epoch(epoch, total_epochs)`` (epochs from 0; a no-op where unused). The registry is a plain
dict from name to class; ``build_loss`` validates the name and parameter names against the
class signature so a typo in a config fails at start-up with the valid choices listed, not
deep in a worker.

Where each equation lives: ``selective`` (paper 1: pasl, csl, csl-soft), ``baselines`` (ignore,
negative, wce, focal, asl, an-ls), ``pseudo`` (paper 2), ``robust`` (hill, splc, ll-r, ll-ct),
``base`` (the shared eq. (3) kernel and its single-pass gradient).
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from .base import PartialLoss, partial_focal
from .baselines import (AsymmetricLoss, FocalLoss, IgnoreBCE, LabelSmoothingNegative, NegativeBCE,
                        WeightedPartialBCE)
from .pseudo import PseudoLabelLoss
from .robust import HillLoss, LargeLossCorrect, LargeLossReject, SPLCLoss
from .selective import ClassAwareSelectiveLoss, PartialASL, SoftSelectiveLoss

__all__ = ["LOSSES", "build_loss", "loss_params", "PartialLoss", "partial_focal",
           "IgnoreBCE", "NegativeBCE", "WeightedPartialBCE", "FocalLoss", "AsymmetricLoss",
           "LabelSmoothingNegative", "PartialASL", "ClassAwareSelectiveLoss", "SoftSelectiveLoss",
           "PseudoLabelLoss", "HillLoss", "SPLCLoss", "LargeLossReject", "LargeLossCorrect"]

LOSSES: dict[str, type[PartialLoss]] = {
    "ignore": IgnoreBCE,
    "negative": NegativeBCE,
    "wce": WeightedPartialBCE,
    "focal": FocalLoss,
    "asl": AsymmetricLoss,
    "pasl": PartialASL,
    "csl": ClassAwareSelectiveLoss,
    "csl-soft": SoftSelectiveLoss,
    "pseudo": PseudoLabelLoss,
    "an-ls": LabelSmoothingNegative,
    "hill": HillLoss,
    "splc": SPLCLoss,
    "ll-r": LargeLossReject,
    "ll-ct": LargeLossCorrect,
}


def loss_params(name: str) -> list[str]:
    """The keyword parameters ``build_loss(name, ...)`` accepts (``prior`` included)."""
    cls = _lookup(name)
    sig = inspect.signature(cls.__init__)
    params = [p for p in sig.parameters if p != "self"]
    return params if "prior" in params else ["prior", *params]


def _lookup(name: str) -> type[PartialLoss]:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def build_loss(name: str, *, prior: Any = None, **params: Any) -> nn.Module:
    """Build the loss registered as ``name``.

    ``prior`` (per-class label prior, [C]) is used by ``csl`` and required by ``csl-soft``; it
    is an error for a loss that would silently ignore it.
    """
    cls = _lookup(name)
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(map(repr, unknown))} for loss {name!r}; "
                         f"valid parameters: {', '.join(accepted)}")
    if "prior" in accepted:
        params["prior"] = prior
    elif prior is not None:
        raise ValueError(f"loss {name!r} does not use a prior; losses that do: "
                         f"{', '.join(n for n in sorted(LOSSES) if 'prior' in inspect.signature(LOSSES[n].__init__).parameters)}")
    return cls(**params)
