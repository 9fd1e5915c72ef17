"""Partial-annotation simulators: a fully labelled matrix in, a partially annotated one out.

Both papers study how the *way* a dataset was partially annotated changes what a loss should do
with un-annotated labels. To reproduce that on fully labelled data (COCO, the synthetic set)
we need the annotation procedures as code. Each scheme is a pure numpy function of
`(full, seed)`: `full` is a bool matrix [N, C] (True = the class is present), the result an
int8 matrix [N, C] in the paper's encoding (1 positive, -1 annotated negative, 0 un-annotated).
Same inputs, same output, whatever the caller's process layout.

Schemes (text form, as on the command line):

- `full`: every label annotated: positives are the true classes, every other class a negative.
- `fpc:N` (paper 1, sec. 5.1, "fixed per class"): for each class, N positives and N negatives
  sampled uniformly among the images where the class is present / absent (all of them when
  there are fewer). The annotation counts then say nothing about class frequencies.
- `rpa:P` (paper 1, sec. 5.1, "random per annotation"): each label of the full annotation
  (positive or negative) is dropped independently with probability P. This keeps the class
  distribution: positive counts stay proportional to true frequencies.
- `pal:Q` (paper 2, sec. V.A, PAL_Q): "randomly keep a certain proportion of labels, regardless
  of whether they are positive or negative", so an image may keep negatives but no positive.
  Q is the proportion *kept* (the paper's PAL_0.3 keeps 30 %). Following the per-image
  protocol the paper cites ([6], and Durand et al.), each image keeps exactly round(Q * C)
  labels chosen uniformly among its C labels.
- `ppl:Q` (paper 2, sec. V.A, PPL_Q, eq. 3): all negatives discarded, a proportion Q of each
  image's positives kept (round(Q * k) of its k positives). The paper runs AN, WAN and ROLE
  "without any modification in the PPL setting" and notes they need at least one positive per
  image, so PPL keeps at least one positive in every image that has one.
- `spl` (paper 2, sec. V.A, eq. 4): exactly one positive per image, chosen uniformly among the
  image's true positives; everything else un-annotated. An image with no true positive cannot
  satisfy eq. 4 and stays fully un-annotated (the caller may drop it).

`openimages` is also a valid scheme name (the OpenImages-like bias of paper 1, sec. 3.3), but it
needs to know what kind of class each column is, so only the synthetic source implements it;
`simulate` rejects it with a message saying so.

Cost: everything is dense [N, C]. That is right for COCO-size data (82k x 80 = 6.6 M cells,
milliseconds) and fine up to a few hundred million cells; at OpenImages scale (9 M x 9,600 =
86 G cells) a dense matrix does not fit in memory, and such data is partially annotated
already, so there is nothing to simulate. `fpc` loops over classes (C small numpy calls).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Scheme", "SCHEME_FORMS", "parse_scheme", "simulate"]

SCHEME_FORMS = "full, fpc:N (N >= 1 integer), rpa:P (0 <= P <= 1), pal:Q (0 < Q <= 1), ppl:Q (0 < Q <= 1), spl, openimages"


@dataclass(frozen=True)
class Scheme:
    """A parsed scheme: `kind` is one of full/fpc/rpa/pal/ppl/spl/openimages."""

    kind: str
    value: float | int | None = None

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{self.value}"


def _bad(text: str, why: str) -> ValueError:
    return ValueError(f"annotation scheme {text!r}: {why}; valid forms: {SCHEME_FORMS}")


def parse_scheme(text: str | Scheme) -> Scheme:
    """Parse `full`, `fpc:N`, `rpa:P`, `pal:Q`, `ppl:Q`, `spl` or `openimages`."""
    if isinstance(text, Scheme):
        return text
    if not isinstance(text, str):
        raise _bad(repr(text), "not a string")
    s = text.strip().lower()
    kind, sep, arg = s.partition(":")
    if kind in ("full", "spl", "openimages"):
        if sep:
            raise _bad(text, f"{kind} takes no parameter")
        return Scheme(kind)
    if kind not in ("fpc", "rpa", "pal", "ppl"):
        raise _bad(text, f"unknown scheme {kind!r}")
    if not sep or not arg:
        raise _bad(text, f"{kind} needs a parameter")
    if kind == "fpc":
        try:
            n = int(arg)
        except ValueError:
            raise _bad(text, f"N must be an integer, got {arg!r}") from None
        if n < 1:
            raise _bad(text, f"N must be >= 1, got {n}")
        return Scheme("fpc", n)
    try:
        v = float(arg)
    except ValueError:
        raise _bad(text, f"parameter must be a number, got {arg!r}") from None
    if not math.isfinite(v):
        raise _bad(text, f"parameter must be finite, got {arg!r}")
    if kind == "rpa" and not 0.0 <= v <= 1.0:
        raise _bad(text, f"P is a drop probability in [0, 1], got {v}")
    if kind in ("pal", "ppl") and not 0.0 < v <= 1.0:
        raise _bad(text, f"Q is the proportion kept, in (0, 1], got {v}")
    return Scheme(kind, v)


def _round_half_up(x: np.ndarray) -> np.ndarray:
    # np.round rounds half to even (round(0.5 * 3) = 2 but round(0.5 * 5) = 2): half-up is
    # what "keep 50 % of 5" means to a reader.
    return np.floor(x + 0.5).astype(np.int64)


def _keep_k_per_row(cand: np.ndarray, k: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Bool mask keeping k[i] entries chosen uniformly among the True entries of row i."""
    # Random keys, candidates first; the k smallest keys of a row are a uniform k-subset.
    keys = rng.random(cand.shape)
    keys[~cand] = 2.0
    order = np.argsort(keys, axis=1, kind="stable")
    ranks = np.empty_like(order)
    rows = np.arange(cand.shape[0])[:, None]
    ranks[rows, order] = np.arange(cand.shape[1])[None, :]
    return (ranks < k[:, None]) & cand


def simulate(full: np.ndarray, scheme: str | Scheme, seed: int) -> np.ndarray:
    """Partially annotate a full label matrix: bool [N, C] -> int8 [N, C] in {1, -1, 0}."""
    sch = parse_scheme(scheme)
    full = np.asarray(full)
    if full.ndim != 2:
        raise ValueError(f"simulate: full label matrix must be 2-D [N, C], got shape {full.shape}")
    if full.dtype != np.bool_:
        if not np.isin(full, (0, 1)).all():
            raise ValueError("simulate: full label matrix must be boolean (or 0/1)")
        full = full.astype(bool)
    n, c = full.shape
    rng = np.random.default_rng(seed)
    dense = np.where(full, 1, -1).astype(np.int8)

    if sch.kind == "full":
        return dense
    if sch.kind == "openimages":
        raise ValueError(
            "annotation scheme 'openimages' needs class groups (objects, colours, scenes): "
            "only the synthetic source implements it; use full, fpc:N, rpa:P, pal:Q, ppl:Q or spl"
        )
    if sch.kind == "rpa":
        keep = rng.random((n, c)) >= float(sch.value)  # type: ignore[arg-type]
        return np.where(keep, dense, 0).astype(np.int8)
    if sch.kind == "fpc":
        ns = int(sch.value)  # type: ignore[arg-type]
        out = np.zeros((n, c), dtype=np.int8)
        for j in range(c):
            col = full[:, j]
            pos = np.flatnonzero(col)
            neg = np.flatnonzero(~col)
            out[rng.choice(pos, size=min(ns, pos.size), replace=False), j] = 1
            out[rng.choice(neg, size=min(ns, neg.size), replace=False), j] = -1
        return out
    if sch.kind == "pal":
        k = np.full(n, int(_round_half_up(np.array(float(sch.value) * c))))  # type: ignore[arg-type]
        keep = _keep_k_per_row(np.ones((n, c), dtype=bool), k, rng)
        return np.where(keep, dense, 0).astype(np.int8)
    if sch.kind == "ppl":
        npos = full.sum(axis=1)
        k = np.where(npos > 0, np.maximum(1, _round_half_up(float(sch.value) * npos)), 0)  # type: ignore[arg-type]
        keep = _keep_k_per_row(full, k, rng)
        return keep.astype(np.int8)
    if sch.kind == "spl":
        keep = _keep_k_per_row(full, np.ones(n, dtype=np.int64), rng)
        return keep.astype(np.int8)
    raise AssertionError(f"unhandled scheme {sch}")
