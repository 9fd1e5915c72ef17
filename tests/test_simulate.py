"""Partial-annotation simulators: shapes, value sets, the properties each paper defines."""

from __future__ import annotations

import numpy as np
import pytest

from data_shards.simulate import Scheme, parse_scheme, simulate


@pytest.fixture
def full() -> np.ndarray:
    rng = np.random.default_rng(0)
    # Class frequencies from 1 % to 60 % so FPC meets both "enough" and "too few" positives.
    freq = np.linspace(0.01, 0.6, 20)
    m = rng.random((2000, 20)) < freq
    m[:7] = False  # a few images with no positive at all
    return m


ALL = ["full", "fpc:30", "rpa:0.5", "pal:0.3", "ppl:0.6", "spl"]


@pytest.mark.parametrize("scheme", ALL)
def test_shape_values_consistency_determinism(full, scheme):
    out = simulate(full, scheme, seed=3)
    assert out.shape == full.shape and out.dtype == np.int8
    assert set(np.unique(out).tolist()) <= {-1, 0, 1}
    # Annotations never contradict the truth.
    assert not (out == 1)[~full].any()
    assert not (out == -1)[full].any()
    assert np.array_equal(out, simulate(full, scheme, seed=3))
    if scheme != "full":
        assert not np.array_equal(out, simulate(full, scheme, seed=4))


def test_full():
    m = np.array([[True, False], [False, False]])
    assert simulate(m, "full", 0).tolist() == [[1, -1], [-1, -1]]


def test_fpc_counts_exact(full):
    ns = 30
    out = simulate(full, "fpc:30", seed=1)
    true_pos = full.sum(0)
    true_neg = (~full).sum(0)
    assert np.array_equal((out == 1).sum(0), np.minimum(ns, true_pos))
    assert np.array_equal((out == -1).sum(0), np.minimum(ns, true_neg))
    assert true_pos.min() < ns  # the fixture exercises the "fewer than N" branch


def test_rpa_rate_and_preserved_distribution(full):
    out = simulate(full, "rpa:0.3", seed=2)
    kept = (out != 0).mean()
    assert abs(kept - 0.7) < 0.01
    # RPA preserves the class distribution (paper 1, sec. 5.1).
    est = (out == 1).sum(0) / np.maximum((out != 0).sum(0), 1)
    assert np.abs(est - full.mean(0)).max() < 0.06
    assert (simulate(full, "rpa:0", 0) != 0).all()
    assert (simulate(full, "rpa:1", 0) == 0).all()


def test_pal_keeps_proportion_per_image_regardless_of_sign(full):
    out = simulate(full, "pal:0.3", seed=5)
    assert ((out != 0).sum(1) == 6).all()  # round(0.3 * 20)
    # "an image may correspond to several negative labels but zero positive labels"
    has_pos = full.any(1)
    assert ((out == 1).sum(1)[has_pos] == 0).any()
    assert (out == -1).any()


def test_ppl_positives_only_with_at_least_one(full):
    out = simulate(full, "ppl:0.3", seed=6)
    assert not (out == -1).any()
    k = full.sum(1)
    kept = (out == 1).sum(1)
    expect = np.where(k > 0, np.maximum(1, np.floor(0.3 * k + 0.5)), 0)
    assert np.array_equal(kept, expect)


def test_spl_one_positive_uniform(full):
    out = simulate(full, "spl", seed=7)
    assert not (out == -1).any()
    kept = (out == 1).sum(1)
    assert np.array_equal(kept, full.any(1).astype(int))
    # The kept positive is uniform among the image's positives, not always the first one.
    rows = np.flatnonzero(full.sum(1) >= 2)
    first = full[rows].argmax(1)
    chosen = out[rows].argmax(1)
    expect = (1.0 / full[rows].sum(1)).mean()
    assert abs((first == chosen).mean() - expect) < 0.03


@pytest.mark.parametrize(
    "text", ["", "fpc", "fpc:0", "fpc:2.5", "rpa:1.5", "rpa:x", "pal:0", "ppl:1.2", "spl:3", "partial", "rpa:nan"]
)
def test_bad_scheme_strings(text):
    with pytest.raises(ValueError, match="valid forms"):
        parse_scheme(text)


def test_parse_roundtrip():
    assert parse_scheme("FPC:1000") == Scheme("fpc", 1000)
    assert str(parse_scheme("rpa:0.5")) == "rpa:0.5"
    assert parse_scheme(" spl ") == Scheme("spl")


def test_openimages_not_simulable_and_bad_matrix(full):
    with pytest.raises(ValueError, match="synthetic"):
        simulate(full, "openimages", 0)
    with pytest.raises(ValueError, match="2-D"):
        simulate(full[0], "full", 0)
    with pytest.raises(ValueError, match="boolean"):
        simulate(np.full((2, 2), 3), "full", 0)
