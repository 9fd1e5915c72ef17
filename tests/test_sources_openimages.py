"""OpenImages converter: every kind of bad row counted (or raised in strict mode), real
class vocabulary and photos, S3 images, resize, and merging splits into one root."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from PIL import Image

from data_shards.format import ManifestError
from data_shards.sources.common import ConversionError
from data_shards.sources.openimages import _SeenIds, build_openimages, load_classes
from data_shards.storage import read_manifest

PERSON, MAN, WOMAN, FACE, CAR = "/m/01g317", "/m/04yx4", "/m/03bt1vf", "/m/0dzct", "/m/0k4j"


def _photos(openimages_dir) -> list[str]:
    return sorted(p.stem for p in (openimages_dir / "images").glob("*.jpg"))


def _write_csv(path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _bad_csv(tmp_path, ids: list[str]) -> tuple[str, dict[str, int]]:
    a, b, c, d, e, f, g, h, k = ids
    lines = [
        "ImageID,Source,LabelName,Confidence",  # 1
        f"{a},verification,{PERSON},1",  # 2
        f"{a},verification,{CAR},0",  # 3
        f"{a},verification,{PERSON},1",  # 4 duplicate
        f"{b},crowdsource,{MAN},1",  # 5
        f"{b},verification,{MAN},0",  # 6 contradictory
        f"{b},verification,{FACE},1",  # 7
        f"{c},verification,/m/not_a_class,1",  # 8 unknown class
        f"{c},verification,{WOMAN},0.5",  # 9 bad confidence
        f"{c},verification,{CAR},x",  # 10 bad confidence
        f"{c},verification,{FACE},1",  # 11
        f"{d},verification,{PERSON}",  # 12 malformed
        f"{d},verification,{WOMAN},1",  # 13
        f"{a},verification,{FACE},1",  # 14 ungrouped
        f"{a},verification,{MAN},0",  # 15 ungrouped
        f"no_such_image,verification,{CAR},1",  # 16 missing image
        f"{e},verification,{CAR},1",
        f"{f},verification,{CAR},1",
        f"{g},verification,{PERSON},0",
        f"{h},verification,{WOMAN},1",
        f"{k},verification,{WOMAN},1",
    ]
    expect = {
        "duplicate row": 1,
        "contradictory rows": 1,
        "unknown class": 1,
        "bad confidence": 2,
        "malformed row": 1,
        "ungrouped rows": 2,
        "missing image": 1,
    }
    return _write_csv(tmp_path / "labels.csv", lines), expect


def _samples(root: str, m) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for shard in m.splits["train"].shards:
        with tarfile.open(f"{root}/{shard.path}") as tf:
            for member in tf.getmembers():
                key, ext = member.name.split(".", 1)
                out.setdefault(key, {})[ext] = tf.extractfile(member).read()
    return out


def test_counts_every_problem_and_keeps_good_labels(tmp_path, openimages_dir):
    ids = _photos(openimages_dir)
    assert len(ids) == 9
    csv_path, expect = _bad_csv(tmp_path, ids)
    descr = str(openimages_dir / "oidv6-class-descriptions.csv")
    root = str(tmp_path / "oi")
    m, report = build_openimages(
        csv_path, descr, str(openimages_dir / "images"), root, shard_samples=4, workers=0, progress=False
    )
    assert report.problem_counts == expect
    assert report.problems == sum(expect.values())
    assert report.get("rows read") == 20 and report.get("images written") == 9
    assert "e.g. " + csv_path + ":9" in report.summary()
    assert m.num_classes == 19994 and m.splits["train"].samples == 9
    cls = [c.id for c in m.classes]
    samples = _samples(root, m)
    lab = {k: json.loads(v["json"]) for k, v in samples.items()}
    a, b, c, d = ids[:4]
    assert lab[a] == {"pos": [cls.index(PERSON)], "neg": [cls.index(CAR)]}  # ungrouped rows not mixed in
    assert lab[b] == {"pos": [cls.index(FACE)], "neg": []}  # contradictory MAN dropped
    assert lab[c] == {"pos": [cls.index(FACE)], "neg": []}
    assert lab[d] == {"pos": [cls.index(WOMAN)], "neg": []}
    # Without resize the original bytes are kept.
    assert samples[a]["jpg"] == (openimages_dir / "images" / f"{a}.jpg").read_bytes()
    assert sum(m.stats["train"].pos) == 8 and sum(m.stats["train"].neg) == 2
    assert m.truth == {}


def test_strict_raises_naming_file_and_line(tmp_path, openimages_dir):
    csv_path, _ = _bad_csv(tmp_path, _photos(openimages_dir))
    descr = str(openimages_dir / "oidv6-class-descriptions.csv")
    with pytest.raises(ConversionError, match=r"labels\.csv:4: .*PERSON|labels\.csv:4: .*repeated"):
        build_openimages(csv_path, descr, str(openimages_dir / "images"), str(tmp_path / "oi"), strict=True, progress=False)


def test_strict_missing_image_and_header(tmp_path, openimages_dir):
    descr = str(openimages_dir / "oidv6-class-descriptions.csv")
    p = _write_csv(tmp_path / "a.csv", ["ImageID,Source,LabelName,Confidence", f"nope,v,{CAR},1"])
    with pytest.raises(ConversionError, match=r"a\.csv:2 ImageID nope: image not found"):
        build_openimages(p, descr, str(openimages_dir / "images"), str(tmp_path / "o1"), strict=True, progress=False)
    p = _write_csv(tmp_path / "b.csv", [f"nope,v,{CAR},1"])
    with pytest.raises(ConversionError, match=r"b\.csv:1: no header"):
        build_openimages(p, descr, str(openimages_dir / "images"), str(tmp_path / "o2"), strict=True, progress=False)


def test_mid_list_classes_with_descriptions(tmp_path, openimages_dir):
    descr = str(openimages_dir / "oidv6-class-descriptions.csv")
    mids = _write_csv(tmp_path / "trainable.txt", [CAR, PERSON, "/m/unnamed"])
    cls = load_classes(mids, descr)
    assert [(c.id, c.name) for c in cls] == [(CAR, "Car"), (PERSON, "Person"), ("/m/unnamed", "/m/unnamed")]
    dup = _write_csv(tmp_path / "dup.txt", [CAR, CAR])
    with pytest.raises(ValueError, match="listed twice"):
        load_classes(dup)


def test_s3_images_resize_and_split_merge(tmp_path, openimages_dir, s3_bucket):
    import s3fs

    ids = _photos(openimages_dir)
    fs = s3fs.S3FileSystem()
    for i in ids[:4]:
        fs.put_file(str(openimages_dir / "images" / f"{i}.jpg"), f"{s3_bucket[5:]}/imgs/{i}.jpg")
    mids = _write_csv(tmp_path / "classes.txt", [PERSON, CAR])
    train = _write_csv(
        tmp_path / "train.csv", ["ImageID,Source,LabelName,Confidence"] + [f"{i},v,{PERSON},1" for i in ids[:3]]
    )
    val = _write_csv(tmp_path / "val.csv", ["ImageID,Source,LabelName,Confidence", f"{ids[3]},v,{CAR},0"])
    root = f"{s3_bucket}/ds"
    template = f"{s3_bucket}/imgs/{{id}}.jpg"
    m, rep = build_openimages(train, mids, template, root, resize=100, workers=0, progress=False)
    assert rep.problems == 0 and m.splits["train"].samples == 3
    m2, _ = build_openimages(val, mids, template, root, split="val", resize=100, progress=False)
    assert set(m2.splits) == {"train", "val"} and m2.splits["train"] == m.splits["train"]
    assert read_manifest(root) == m2
    assert set(m2.meta["conversions"]) == {"train", "val"}
    with fs.open(f"{root[5:]}/{m2.splits['train'].shards[0].path}", "rb") as f:
        with tarfile.open(fileobj=io.BytesIO(f.read())) as tf:
            jpgs = [tf.extractfile(x).read() for x in tf.getmembers() if x.name.endswith(".jpg")]
    assert len(jpgs) == 3
    for data in jpgs:
        assert min(Image.open(io.BytesIO(data)).size) == 100
    # A different class list cannot join the root.
    other = _write_csv(tmp_path / "other.txt", [CAR])
    with pytest.raises(ManifestError, match="differ"):
        build_openimages(val, other, template, root, split="test", progress=False)
    assert read_manifest(root) == m2


def test_resize_short_edge_coco_photo(tmp_path, openimages_dir):
    mids = _write_csv(tmp_path / "classes.txt", [PERSON])
    csv_path = _write_csv(tmp_path / "l.csv", ["ImageID,Source,LabelName,Confidence", f"000000000885,v,{PERSON},1"])
    root = str(tmp_path / "r")
    m, _ = build_openimages(csv_path, mids, str(openimages_dir / "images"), root, resize=128, progress=False)
    data = _samples(root, m)["000000000885"]["jpg"]
    assert Image.open(io.BytesIO(data)).size == (192, 128)


def test_seen_ids_finds_reappearance_out_of_order():
    s = _SeenIds()
    s._BATCH = 4  # exercise the merge into the sorted array
    ids = [f"{i:04x}" for i in range(0, 40, 3)] + ["0001", "0004"]
    assert not any(s.add(i) for i in ids)
    assert s.add("0003") and s.add("0000") and s.add("0001") and s.add("0024")
    assert not s.add("0002") and s.add("0002")
