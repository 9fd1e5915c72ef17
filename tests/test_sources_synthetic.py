"""Synthetic source: determinism, truth, the OpenImages-like annotation bias, the written root."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_shards.sources import synthetic as S
from data_shards.storage import read_manifest


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def _matrices(recs, c):
    t = np.zeros((len(recs), c), bool)
    p = np.zeros((len(recs), c), int)
    n = np.zeros((len(recs), c), int)
    for i, r in enumerate(recs):
        t[i, r.true] = True
        p[i, r.pos] = 1
        n[i, r.neg] = 1
    return t, p, n


def test_classes_and_groups():
    cls = S.synthetic_classes()
    groups = S.class_groups()
    assert 30 <= len(cls) <= 40 and len(groups) == len(cls)
    assert len({c.id for c in cls}) == len(cls)
    assert cls[0].id == "syn:circle"
    assert set(groups) == {"object", "colour", "scene", "concept"}


def test_deterministic_across_worker_counts():
    a = list(S.synthetic_records("train", 70, scheme="openimages", seed=3, workers=0))
    b = list(S.synthetic_records("train", 70, scheme="openimages", seed=3, workers=2))
    assert [r.key for r in a] == [r.key for r in b]
    assert all(x.image == y.image and x.pos == y.pos and x.neg == y.neg and x.true == y.true for x, y in zip(a, b))
    c = list(S.synthetic_records("train", 5, seed=4))
    assert c[0].image != a[0].image
    # Images do not depend on the scheme, only labels do.
    d = list(S.synthetic_records("train", 5, scheme="full", seed=3))
    assert [r.image for r in d] == [r.image for r in a[:5]]


def test_truth_matrix_matches_records_and_images_decode():
    recs = list(S.synthetic_records("val", 40, image_size=48, scheme="full", seed=1))
    c = len(S.synthetic_classes())
    t, p, n = _matrices(recs, c)
    assert np.array_equal(t, S.synthetic_truth("val", 40, seed=1))
    assert np.array_equal(p.astype(bool), t) and np.array_equal(n.astype(bool), ~t)  # full scheme
    groups = np.array(S.class_groups())
    assert (t[:, groups == "scene"].sum(1) == 1).all()
    objects = t[:, groups == "object"].sum(1)
    assert objects.min() >= 1
    for r in recs[:5]:
        im = Image.open(io.BytesIO(r.image))
        assert im.format == "JPEG" and im.size == (48, 48) and im.mode == "RGB"


def test_openimages_scheme_bias():
    recs = list(S.synthetic_records("train", 1500, scheme="openimages", seed=0))
    c = len(S.synthetic_classes())
    t, p, n = _matrices(recs, c)
    groups = np.array(S.class_groups())
    assert not (p.astype(bool) & ~t).any() and not (n.astype(bool) & t).any()
    rate = p.sum(0) / np.maximum(t.sum(0), 1)
    obj = rate[groups == "object"].mean()
    common = rate[(groups == "colour") | (groups == "scene")].mean()
    assert obj > 0.7 and common < 0.25 and obj > 4 * common
    negs = n.sum(1)
    assert negs.min() >= 1 and negs.max() <= 4
    freq = t.mean(0)
    assert freq[groups == "object"].min() < 0.06 and freq[groups == "object"].max() > 0.25
    # Annotation counts misrepresent the truth: the rank correlation is far from 1.
    assert _spearman(p.sum(0), freq) < 0.5


def test_other_schemes_go_through_simulate():
    recs = list(S.synthetic_records("train", 64, scheme="fpc:5", seed=2))
    c = len(S.synthetic_classes())
    t, p, n = _matrices(recs, c)
    assert np.array_equal(p.sum(0), np.minimum(5, t.sum(0)))
    assert np.array_equal(n.sum(0), np.minimum(5, (~t).sum(0)))


def test_bad_arguments_raise_at_call():
    with pytest.raises(ValueError, match="valid forms"):
        S.synthetic_records("train", 10, scheme="fpc:x")
    with pytest.raises(ValueError, match="image_size"):
        S.synthetic_records("train", 10, image_size=8)
    with pytest.raises(ValueError, match="number of images"):
        S.synthetic_records("train", -1)


def test_build_synthetic_root(tmp_path):
    root = str(tmp_path / "syn")
    m = S.build_synthetic(root, train=120, val=50, image_size=32, shard_samples=50, workers=0, progress=False)
    assert read_manifest(root) == m
    assert m.splits["train"].samples == 120 and len(m.splits["train"].shards) == 3
    assert m.meta["schemes"] == {"train": "openimages", "val": "full"}
    truth = np.array(m.truth["train"].freq)
    t = S.synthetic_truth("train", 120, seed=0)
    assert np.allclose(truth, t.mean(0))
    # val is fully annotated: positive counts are the truth.
    assert np.allclose(np.array(m.stats["val"].pos) / 50, m.truth["val"].freq)
    import webdataset as wds

    urls = [str(tmp_path / "syn" / s.path) for s in m.splits["val"].shards]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == 50
    labels = json.loads(samples[0]["json"])
    assert set(labels) >= {"pos", "neg", "true"}
    assert Image.open(io.BytesIO(samples[0]["jpg"])).size == (32, 32)
    with tarfile.open(urls[0]) as tf:
        assert tf.getnames()[:2] == ["val_00000000.jpg", "val_00000000.json"]
