"""Partial-label metrics: mAP over annotated entries only, and Spearman correlation.

Paper 1 reports mAP(C), the mean over classes of each class's average precision, and mAP(O),
which "considers the number of samples in each class": here the class APs weighted by each
class's annotated positive count. With partial labels a class's AP can only be computed over
the images where that class is annotated, so un-annotated entries are dropped, not counted as
negatives, and classes without at least one annotated positive and one annotated negative are
skipped (their AP is NaN and they are left out of both means). Values are in percent.

The core works on *annotated entries only*, as flat arrays (class, score, label): at OpenImages
scale (125k x 9,600 test images, ~7 annotated labels each) that is under a million entries
where a dense matrix would be 1.2 billion. ``PartialAPAccumulator`` keeps exactly those entries
during evaluation, so ranks can gather them (``state()``) and one rank can ``compute()``.

AP is non-interpolated and handles tied scores like scikit-learn's ``average_precision_score``:
sum over distinct thresholds of (recall step) x (precision at that threshold), so one sort by
(class, -score) and a few cumulative sums give every class at once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["partial_map", "partial_map_sparse", "PartialAPAccumulator", "spearman"]


def partial_map_sparse(classes: Any, scores: Any, labels: Any, num_classes: int) -> dict[str, Any]:
    """mAP from annotated entries given as flat arrays.

    ``classes`` int class index per entry, ``scores`` float, ``labels`` +1 / -1 (0 entries are
    dropped). Returns ``map_c``, ``map_o`` (percent; NaN when no class is valid), ``ap`` (per
    class, percent, NaN where skipped), ``num_valid`` and per-class ``pos`` / ``neg`` counts.
    """
    classes = np.asarray(classes).reshape(-1).astype(np.int64, copy=False)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if not (classes.shape == scores.shape == labels.shape):
        raise ValueError(f"classes, scores and labels must have the same length, got "
                         f"{classes.shape[0]}, {scores.shape[0]}, {labels.shape[0]}")
    if classes.size and (classes.min() < 0 or classes.max() >= num_classes):
        raise ValueError(f"class indices must be in [0, {num_classes}), got {classes.min()}..{classes.max()}")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    keep = labels != 0
    classes, scores, positive = classes[keep], scores[keep], labels[keep] > 0

    pos = np.bincount(classes, weights=positive, minlength=num_classes)
    count = np.bincount(classes, minlength=num_classes)
    neg = count - pos
    ap = np.full(num_classes, np.nan)
    valid = (pos > 0) & (neg > 0)
    if classes.size:
        order = np.lexsort((-scores, classes))           # by class, then score descending
        c, s, y = classes[order], scores[order], positive[order].astype(np.float64)
        tp = np.cumsum(y)
        seen = np.arange(1, c.size + 1, dtype=np.float64)
        starts = np.concatenate(([0], np.cumsum(count)[:-1]))   # first sorted index per class
        first = starts[c]
        tp_before = np.where(first > 0, tp[np.maximum(first - 1, 0)], 0.0)
        tp_c = tp - tp_before                             # true positives so far in the class
        n_c = seen - first                                # entries so far in the class
        # A threshold ends where the class or the score changes: ties form one step.
        end = np.ones(c.size, dtype=bool)
        end[:-1] = (c[1:] != c[:-1]) | (s[1:] != s[:-1])
        tp_end, n_end, c_end = tp_c[end], n_c[end], c[end]
        prev = np.concatenate(([0.0], tp_end[:-1]))
        prev[np.concatenate(([True], c_end[1:] != c_end[:-1]))] = 0.0
        contrib = (tp_end - prev) * (tp_end / n_end)
        summed = np.bincount(c_end, weights=contrib, minlength=num_classes)
        ap[valid] = 100.0 * summed[valid] / pos[valid]
    num_valid = int(valid.sum())
    map_c = float(np.mean(ap[valid])) if num_valid else float("nan")
    map_o = float(np.sum(ap[valid] * pos[valid]) / pos[valid].sum()) if num_valid else float("nan")
    return {"map_c": map_c, "map_o": map_o, "ap": ap, "num_valid": num_valid,
            "pos": pos.astype(np.int64), "neg": neg.astype(np.int64)}


def partial_map(scores: Any, targets: Any) -> dict[str, Any]:
    """mAP(C) / mAP(O) of dense ``scores`` [N, C] against ``targets`` [N, C] in {1, -1, 0}."""
    scores, targets = _numpy(scores), _numpy(targets)
    if scores.ndim != 2 or scores.shape != targets.shape:
        raise ValueError(f"scores and targets must both be [N, C], got {scores.shape} and {targets.shape}")
    rows, cols = np.nonzero(targets)
    return partial_map_sparse(cols, scores[rows, cols], targets[rows, cols], scores.shape[1])


class PartialAPAccumulator:
    """Collects annotated (class, score, label) entries batch by batch; never a dense matrix.

    ``update`` takes torch tensors or arrays [B, C]; ``state()`` returns the three flat arrays
    (gather them across ranks and pass to ``merge``); ``compute()`` gives ``partial_map``'s dict.
    """

    def __init__(self, num_classes: int) -> None:
        self.num_classes = int(num_classes)
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def update(self, scores: Any, targets: Any) -> None:
        scores, targets = _numpy(scores), _numpy(targets)
        if scores.ndim != 2 or scores.shape != targets.shape or scores.shape[1] != self.num_classes:
            raise ValueError(f"expected scores and targets [B, {self.num_classes}], got "
                             f"{scores.shape} and {targets.shape}")
        rows, cols = np.nonzero(targets)
        self._parts.append((cols.astype(np.int32), scores[rows, cols].astype(np.float32),
                            targets[rows, cols].astype(np.int8)))

    def state(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self._parts:
            return np.zeros(0, np.int32), np.zeros(0, np.float32), np.zeros(0, np.int8)
        return tuple(np.concatenate(p) for p in zip(*self._parts))  # type: ignore[return-value]

    def merge(self, state: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        self._parts.append(tuple(np.asarray(a) for a in state))  # type: ignore[arg-type]

    def reset(self) -> None:
        self._parts.clear()

    def compute(self) -> dict[str, Any]:
        return partial_map_sparse(*self.state(), self.num_classes)


def spearman(a: Any, b: Any) -> float:
    """Spearman rank correlation (ties get average ranks), as paper 1 sec. 5.2 uses it."""
    a, b = np.asarray(a, dtype=np.float64).reshape(-1), np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape or a.size < 2:
        raise ValueError(f"spearman needs two equal-length sequences of 2+ values, got {a.size} and {b.size}")
    ra, rb = _average_ranks(a), _average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    xs = x[order]
    start = np.concatenate(([True], xs[1:] != xs[:-1]))
    group = np.cumsum(start) - 1
    first = np.flatnonzero(start)
    last = np.concatenate((first[1:], [x.size])) - 1
    ranks = np.empty(x.size)
    ranks[order] = ((first + last) / 2.0 + 1.0)[group]
    return ranks


def _numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach()
        if a.dtype.is_floating_point and a.element_size() < 4:
            a = a.float()                   # numpy has no bfloat16
        a = a.cpu().numpy()
    return np.asarray(a)
