"""COCO and LVIS converters on small JSON fixtures written here, with the real photos."""

from __future__ import annotations

import json
import shutil
import tarfile

import numpy as np
import pytest

from data_shards.sources.coco import build_coco
from data_shards.sources.common import ConversionError
from data_shards.sources.lvis import build_lvis


def _images_dir(tmp_path, openimages_dir, n: int) -> tuple[str, list[str]]:
    # COCO-style file names for a few real photos: linked, not committed anywhere.
    src = sorted((openimages_dir / "images").glob("*.jpg"))[:n]
    d = tmp_path / "imgs"
    d.mkdir()
    names = []
    for i, p in enumerate(src, 1):
        name = f"{i:012d}.jpg"
        try:
            (d / name).symlink_to(p)
        except OSError:
            shutil.copy(p, d / name)
        names.append(name)
    return str(d), names


def _labels(root: str, m, split: str = "train") -> dict[str, dict]:
    out = {}
    for shard in m.splits[split].shards:
        with tarfile.open(f"{root}/{shard.path}") as tf:
            for mem in tf.getmembers():
                if mem.name.endswith(".json"):
                    out[mem.name[:-5]] = json.loads(tf.extractfile(mem).read())
    return out


def _coco_json(tmp_path, names: list[str]) -> str:
    cats = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]
    images = [{"id": i, "file_name": n, "width": 10, "height": 10} for i, n in enumerate(names, 1)]
    images.append({"id": 99, "file_name": "000000000099.jpg"})  # not on disk
    anns = []
    rng = np.random.default_rng(0)
    for img in images[:-2]:  # the second-to-last image has no annotation at all
        for cid in rng.choice([1, 3, 18, 90], size=int(rng.integers(1, 4)), replace=False):
            anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": int(cid)})
    anns.append({"id": 500, "image_id": 1, "category_id": 1})  # second instance, same class
    anns.append({"id": 501, "image_id": 1234, "category_id": 1})  # unknown image
    anns.append({"id": 502, "image_id": 2, "category_id": 77})  # unknown category
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return str(path)


def test_coco_full_and_fpc(tmp_path, openimages_dir):
    img_dir, names = _images_dir(tmp_path, openimages_dir, 8)
    inst = _coco_json(tmp_path, names)
    root = str(tmp_path / "coco")
    m, rep = build_coco(inst, img_dir, root, shard_samples=3, workers=0, progress=False)
    assert [c.id for c in m.classes] == ["1", "3", "18", "90"]
    assert rep.problem_counts == {"annotation of unknown image": 1, "unknown category": 1, "missing image": 1}
    assert m.splits["train"].samples == 8
    labs = _labels(root, m)
    empty = labs[names[-1][:-4]]
    assert empty == {"pos": [], "neg": [0, 1, 2, 3], "true": []}  # kept, with no positive
    for lab in labs.values():
        assert lab["pos"] == lab["true"] and sorted(lab["pos"] + lab["neg"]) == [0, 1, 2, 3]
    t = np.zeros((8, 4))
    for i, lab in enumerate(labs.values()):
        t[i, lab["true"]] = 1
    assert np.allclose(m.truth["train"].freq, t.mean(0))

    m2, _ = build_coco(inst, img_dir, str(tmp_path / "fpc"), scheme="fpc:2", seed=1, progress=False)
    assert m2.stats["train"].pos == np.minimum(2, t.sum(0)).astype(int).tolist()
    assert m2.truth["train"].freq == m.truth["train"].freq
    assert m2.meta["conversions"]["train"]["scheme"] == "fpc:2"


def test_coco_strict_and_bad_scheme(tmp_path, openimages_dir):
    img_dir, names = _images_dir(tmp_path, openimages_dir, 3)
    inst = _coco_json(tmp_path, names)
    with pytest.raises(ConversionError, match="annotation id 501"):
        build_coco(inst, img_dir, str(tmp_path / "o"), strict=True, progress=False)
    with pytest.raises(ValueError, match="synthetic data only"):
        build_coco(inst, img_dir, str(tmp_path / "o"), scheme="openimages", progress=False)
    with pytest.raises(ValueError, match="valid forms"):
        build_coco(inst, img_dir, str(tmp_path / "o"), scheme="fpc", progress=False)


def test_lvis_negatives_and_not_exhaustive(tmp_path, openimages_dir):
    img_dir, names = _images_dir(tmp_path, openimages_dir, 4)
    cats = [{"id": i, "name": f"c{i}"} for i in (1, 2, 3, 4, 5)]
    images = [
        # LVIS v1 has no file_name: the file comes from coco_url's basename.
        {"id": 1, "coco_url": f"http://images.cocodataset.org/train2017/{names[0]}", "neg_category_ids": [3, 4], "not_exhaustive_category_ids": [2]},
        {"id": 2, "coco_url": f"http://x/{names[1]}", "neg_category_ids": [1], "not_exhaustive_category_ids": [5]},
        {"id": 3, "coco_url": f"http://x/{names[2]}", "neg_category_ids": [5, 2], "not_exhaustive_category_ids": [2]},
        {"id": 4, "coco_url": f"http://x/{names[3]}", "neg_category_ids": [1, 9], "not_exhaustive_category_ids": []},
    ]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1},
        {"id": 2, "image_id": 1, "category_id": 2},
        {"id": 3, "image_id": 3, "category_id": 1},
        {"id": 4, "image_id": 4, "category_id": 1},
    ]
    path = tmp_path / "lvis_v1_train.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    root = str(tmp_path / "lvis")
    m, rep = build_lvis(str(path), img_dir, root, progress=False)
    assert rep.problem_counts == {"negative not exhaustive": 1, "contradictory labels": 1, "unknown category": 1}
    labs = _labels(root, m)
    k = [n[:-4] for n in names]
    assert labs[k[0]] == {"pos": [0, 1], "neg": [2, 3]}  # not-exhaustive class 2 positive only because annotated
    assert labs[k[1]] == {"pos": [], "neg": [0]}  # not-exhaustive class 5 is not a negative
    assert labs[k[2]] == {"pos": [0], "neg": [4]}  # class 2: negative and not exhaustive -> neither
    assert labs[k[3]] == {"pos": [], "neg": []}  # annotated and negative -> dropped
    assert m.truth == {} and m.stats["train"].neg == [1, 0, 1, 1, 1]
    with pytest.raises(ConversionError, match=r"image id 3: category 2 is both negative and not exhaustive"):
        build_lvis(str(path), img_dir, str(tmp_path / "o"), strict=True, progress=False)
