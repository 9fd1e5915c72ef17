"""partial_map against scikit-learn per class; sparse/dense/accumulator agree; spearman vs scipy."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.metrics import average_precision_score

from trainer.metrics import PartialAPAccumulator, partial_map, partial_map_sparse, spearman


def _data(seed=0, n=300, c=12, ties=False):
    rng = np.random.default_rng(seed)
    scores = rng.random((n, c))
    if ties:
        scores = np.round(scores * 5) / 5
    targets = rng.choice([1, -1, 0], size=(n, c), p=[0.2, 0.4, 0.4]).astype(np.int8)
    targets[:, 0] = np.where(targets[:, 0] == 1, -1, targets[:, 0])   # no positive: skipped
    targets[:, 1] = 0                                                  # nothing annotated
    targets[:, 2] = np.where(targets[:, 2] == -1, 1, targets[:, 2])    # no negative: skipped
    return scores, targets


def _sklearn(scores, targets):
    aps = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        m = targets[:, c] != 0
        y = targets[m, c] > 0
        if y.any() and (~y).any():
            aps[c] = 100 * average_precision_score(y, scores[m, c])
    return aps


@pytest.mark.parametrize("ties", [False, True])
def test_matches_sklearn_per_class(ties):
    scores, targets = _data(1, ties=ties)
    out = partial_map(scores, targets)
    expected = _sklearn(scores, targets)
    np.testing.assert_allclose(out["ap"], expected, rtol=1e-12, atol=1e-10, equal_nan=True)
    assert out["num_valid"] == int(np.isfinite(expected).sum()) == scores.shape[1] - 3
    assert out["map_c"] == pytest.approx(np.nanmean(expected), rel=1e-12)
    pos = (targets > 0).sum(0)
    ok = np.isfinite(expected)
    assert out["map_o"] == pytest.approx((expected[ok] * pos[ok]).sum() / pos[ok].sum(), rel=1e-12)


def test_sparse_dense_accumulator_agree():
    scores, targets = _data(2)
    dense = partial_map(torch.from_numpy(scores).float(), torch.from_numpy(targets))
    rows, cols = np.nonzero(targets)
    sparse = partial_map_sparse(cols, scores[rows, cols].astype(np.float32), targets[rows, cols], 12)
    acc = PartialAPAccumulator(12)
    for i in range(0, 300, 64):
        acc.update(torch.from_numpy(scores[i:i + 64]).float(), torch.from_numpy(targets[i:i + 64]))
    half = PartialAPAccumulator(12)          # as if gathered from a second rank
    half.merge(acc.state())
    for out in (sparse, acc.compute(), half.compute()):
        np.testing.assert_allclose(out["ap"], dense["ap"], equal_nan=True)
        assert out["map_c"] == pytest.approx(dense["map_c"])


def test_empty_and_errors():
    out = PartialAPAccumulator(4).compute()
    assert out["num_valid"] == 0 and np.isnan(out["map_c"]) and np.isnan(out["ap"]).all()
    with pytest.raises(ValueError, match="same length"):
        partial_map_sparse([0, 1], [0.1], [1, -1], 3)
    with pytest.raises(ValueError, match="class indices"):
        partial_map_sparse([5], [0.1], [1], 3)
    with pytest.raises(ValueError, match=r"\[N, C\]"):
        partial_map(np.zeros((3, 2)), np.zeros((3, 3)))


def test_large_is_fast():
    rng = np.random.default_rng(0)
    n, c = 20_000, 9_600
    scores = rng.random((n, c), dtype=np.float32)
    targets = np.zeros((n, c), dtype=np.int8)
    rows = np.repeat(np.arange(n), 8)
    cols = rng.integers(0, c, size=rows.size)
    targets[rows, cols] = rng.choice(np.array([1, -1], dtype=np.int8), size=rows.size)
    start = time.perf_counter()
    out = partial_map(scores, targets)
    assert time.perf_counter() - start < 10
    assert out["num_valid"] > 9_000


def test_spearman_matches_scipy():
    rng = np.random.default_rng(3)
    a, b = rng.random(50), rng.random(50)
    a[:10] = 0.5                       # ties
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, rel=1e-12)
    assert spearman(a, a) == pytest.approx(1.0)
