"""Hostile input to the converters (issue 16): every bad file ends in one line naming file and
line (or image id) with exit code 2, or in a problem counted with its id while the good images
are still written; nothing is read from outside `--images`; no credential from an image URL
reaches the output root, the report or an error message.

All inputs are built in tmp_path; images are tiny JPEGs made here; remote images come from a
local HTTP server on 127.0.0.1. Conversions run in-process (`--workers 0`), no Ray.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import os
import socket
import struct
import tarfile
import threading
import zlib
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from data_shards.sources import common
from data_shards.sources.coco import build_coco
from data_shards.sources.common import ConversionError, fetch_image, image_url
from data_shards.sources.lvis import build_lvis
from data_shards.sources.openimages import build_openimages
from trainer.cli import main

CAR, PERSON = "/m/0k4j", "/m/01g317"
HEADER = "ImageID,Source,LabelName,Confidence"


# ---------------------------------------------------------------- helpers


def csl(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    cap = capsys.readouterr()
    return e.value.code, cap.out, cap.err


def error_line(err: str) -> str:
    """The CLI's error line; anything else on stderr is the progress bar."""
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("csl")]
    assert len(lines) == 1, err
    return lines[0]


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 6), (seed * 40 % 256, 80, 160)).save(buf, format="JPEG")
    return buf.getvalue()


def png_bomb(w: int = 30000, h: int = 30000) -> bytes:
    """A PNG declaring w x h pixels in a few bytes: PIL refuses it at open (over 2x the limit)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def image_dir(tmp_path: Path, names: list[str]) -> Path:
    d = tmp_path / "imgs"
    d.mkdir(exist_ok=True)
    for i, n in enumerate(names):
        (d / n).write_bytes(jpeg(i))
    return d


def classes_file(tmp_path: Path) -> str:
    p = tmp_path / "classes.txt"
    p.write_text(f"{PERSON}\n{CAR}\n")
    return str(p)


def labels_csv(tmp_path: Path, ids: list[str], name: str = "labels.csv") -> str:
    p = tmp_path / name
    p.write_text("\n".join([HEADER] + [f"{i},v,{PERSON},1" for i in ids]) + "\n")
    return str(p)


def written_keys(root: Path) -> set[str]:
    keys = set()
    for tar in root.glob("*/*.tar"):
        with tarfile.open(tar) as tf:
            keys |= {m.name.split(".", 1)[0] for m in tf.getmembers()}
    return keys


def coco_json(tmp_path: Path, images: list, annotations: list | None = None, categories: list | None = None, name: str = "instances.json") -> str:
    cats = categories if categories is not None else [{"id": 1, "name": "person"}, {"id": 2, "name": "car"}]
    anns = annotations if annotations is not None else [
        {"id": k + 1, "image_id": img["id"], "category_id": 1} for k, img in enumerate(images) if isinstance(img, dict)
    ]
    p = tmp_path / name
    p.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return str(p)


def good_coco_images(tmp_path: Path, n: int = 2) -> tuple[Path, list[dict]]:
    names = [f"{i:012d}.jpg" for i in range(1, n + 1)]
    return image_dir(tmp_path, names), [{"id": i, "file_name": nm} for i, nm in enumerate(names, 1)]


class _Handler(SimpleHTTPRequestHandler):
    """Serves a folder; drops the connection for paths with 'drop'; logs nothing (the request
    line carries the query string, which must not reach captured output)."""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.server.paths.append(self.path)  # type: ignore[attr-defined]
        if "drop" in self.path:
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def http_images(tmp_path):
    """(base URL, folder, requested paths) of a local HTTP server serving `folder`."""
    folder = tmp_path / "served"
    folder.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(folder)))
    server.paths = []  # type: ignore[attr-defined]
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield f"127.0.0.1:{server.server_address[1]}", folder, server.paths  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setattr(common, "FETCH_BACKOFF_S", 0.01)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- item 4: COCO/LVIS JSON


@pytest.mark.parametrize(
    "content, expect",
    [
        pytest.param(b'{"images": [], "categories": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested deeper", id="deep"),
        pytest.param(b'{"images": [{"id": ' + b"7" * 5000 + b'}], "categories": []}', "5000 digits", id="long-int"),
        pytest.param(b'{"images": [], "categories": [{"id": 1, "name": "caf\xe9"}]}', "not UTF-8 (invalid continuation byte at byte offset 52)", id="utf8"),
        pytest.param(b'{"images": [], "categories": [{"id": 1, "name": {"x": 1}}]}', "category id 1: name {'x': 1} is not a string", id="cat-name-dict"),
        pytest.param(b'{"images": [], "categories": [{"id": true}]}', "category without an integer id", id="cat-id-bool"),
        pytest.param(b'{"images": [], "categories": [{"id": 1}], "annotations": {"0": 1}}', "'annotations' is {'0': 1}, not a list", id="anns-dict"),
        pytest.param(b'{"images": {}, "categories": []}', "expected an object with 'images' and 'categories' lists", id="images-dict"),
        pytest.param(b"[1, 2]", "expected an object", id="top-list"),
        pytest.param(b'{"images": [', "not valid JSON", id="truncated"),
    ],
)
@pytest.mark.parametrize("source", ["coco", "lvis"])
def test_bad_json_is_one_line_naming_the_file(tmp_path, capsys, content, expect, source):
    p = tmp_path / "ann.json"
    p.write_bytes(content)
    flag = "--instances" if source == "coco" else "--annotations"
    (tmp_path / "imgs").mkdir()
    code, _, err = csl(capsys, "shards", source, flag, str(p), "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "o"))
    assert code == 2
    line = error_line(err)
    assert str(p) in line and expect in line
    assert not (tmp_path / "o").exists()


def test_truncated_gz_json_names_the_file(tmp_path, capsys):
    p = tmp_path / "instances.json.gz"
    p.write_bytes(gzip.compress(json.dumps({"images": [{"id": i} for i in range(2000)], "categories": []}).encode())[:300])
    (tmp_path / "imgs").mkdir()
    code, _, err = csl(capsys, "shards", "coco", "--instances", str(p), "--images", str(tmp_path / "imgs"), "--out", str(tmp_path / "o"))
    assert code == 2
    line = error_line(err)
    assert str(p) in line and "truncated or corrupt compressed file" in line


def test_coco_wrong_types_are_counted_with_their_ids(tmp_path):
    img_dir, images = good_coco_images(tmp_path, 3)
    images += [
        {"id": "4", "file_name": "x.jpg"},  # id a string
        {"id": True, "file_name": "x.jpg"},  # id a bool (== 1 in Python)
        {"id": [5], "file_name": "x.jpg"},
        "not an object",
        {"id": 6, "file_name": 12345},  # file_name an int
        {"id": 7, "file_name": {"a": 1}},
    ]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1},
        {"id": 2, "image_id": 2, "category_id": 2},
        {"id": 3, "image_id": 3, "category_id": 1},
        {"id": 10, "image_id": [1], "category_id": 1},
        {"id": 11, "image_id": {"id": 1}, "category_id": 1},
        {"id": 12, "image_id": "1", "category_id": 1},
        {"id": 13, "image_id": True, "category_id": 1},
        {"id": 14, "image_id": 1, "category_id": [1]},
        {"id": 15, "image_id": 1, "category_id": {"a": 1}},
        {"id": 16, "image_id": 1, "category_id": "1"},
        {"id": 17, "image_id": 1, "category_id": False},
        {"id": [18], "image_id": 2, "category_id": None},
        ["not", "an", "object"],
    ]
    inst = coco_json(tmp_path, images, anns)
    root = tmp_path / "o"
    m, rep = build_coco(inst, str(img_dir), str(root), progress=False)
    assert rep.problem_counts == {"bad image entry": 4, "bad annotation": 10, "bad file name": 2}
    assert m.splits["train"].samples == 3
    assert written_keys(root) == {"000000000001", "000000000002", "000000000003"}
    text = rep.summary()
    assert "annotation id 10: image_id [1]" in text and "image id 6: file_name 12345 is not a string" in text
    assert m.stats["train"].pos == [2, 1]  # only the three good annotations count
    with pytest.raises(ConversionError, match=r"instances\.json: image without an integer id: \{'file_name': 'x.jpg', 'id': '4'\}"):
        build_coco(inst, str(img_dir), str(tmp_path / "s"), strict=True, progress=False)


def test_lvis_wrong_types_are_counted_with_their_ids(tmp_path):
    img_dir, _ = good_coco_images(tmp_path, 3)
    images = [
        {"id": 1, "coco_url": "http://x/000000000001.jpg", "neg_category_ids": [2, [3]], "not_exhaustive_category_ids": []},
        {"id": 2, "coco_url": "http://x/000000000002.jpg", "neg_category_ids": [{"id": 2}, True, "2"]},
        {"id": 3, "coco_url": "http://x/000000000003.jpg", "neg_category_ids": {"2": 1}, "not_exhaustive_category_ids": [None]},
        {"id": 4, "coco_url": ["http://x/a.jpg"]},  # not a string
        {"id": 5, "coco_url": "http://x/.."},  # basename '..'
    ]
    anns = [{"id": 1, "image_id": 1, "category_id": 1}, {"id": 2, "image_id": 3, "category_id": 1}]
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]
    ann = coco_json(tmp_path, images, anns, cats, name="lvis.json")
    root = tmp_path / "o"
    m, rep = build_lvis(ann, str(img_dir), str(root), progress=False)
    assert rep.problem_counts == {"bad image entry": 6, "bad file name": 2}
    assert m.splits["train"].samples == 3
    text = rep.summary()
    assert "lvis.json: image id 1: neg_category_ids has [3], not an integer category id" in text
    assert "image id 4: coco_url ['http://x/a.jpg'] is not a string" in text
    assert m.stats["train"].neg == [0, 1, 0]  # image 1's verified negative 2 kept


# ---------------------------------------------------------------- item 5a: bad and unreachable images


@pytest.mark.parametrize("workers, resize", [(0, None), (0, 16)])
def test_decompression_bomb_and_junk_are_skipped_by_id(tmp_path, workers, resize):
    d = image_dir(tmp_path, ["good1.jpg", "good2.jpg"])
    (d / "bomb.jpg").write_bytes(png_bomb())
    (d / "html.jpg").write_bytes(b"<html>403 Forbidden</html>")
    (d / "gif.jpg").write_bytes(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;")
    (d / "dir.jpg").mkdir()  # a folder where a file should be: the read fails
    csv_path = labels_csv(tmp_path, ["good1", "bomb", "html", "gif", "dir", "gone", "good2"])
    root = tmp_path / "o"
    m, rep = build_openimages(csv_path, classes_file(tmp_path), str(d), str(root), workers=workers, resize=resize, progress=False)
    assert rep.problem_counts == {"unreadable image": 4, "missing image": 1}
    assert m.splits["train"].samples == 2 and written_keys(root) == {"good1", "good2"}
    text = rep.summary()
    assert "labels.csv:3 ImageID bomb:" in text and "decompression bomb" in text
    assert "ImageID html:" in text and "ImageID dir:" in text


def test_bomb_refused_in_strict_mode_naming_the_image(tmp_path):
    d = image_dir(tmp_path, ["good1.jpg"])
    (d / "bomb.png").write_bytes(png_bomb())
    img_dir, images = d, [{"id": 1, "file_name": "good1.jpg"}, {"id": 2, "file_name": "bomb.png"}]
    inst = coco_json(tmp_path, images)
    with pytest.raises(ConversionError, match=r"image id 2: .*bomb\.png: decompression bomb"):
        build_coco(inst, str(img_dir), str(tmp_path / "o"), strict=True, progress=False)


def test_unreachable_images_are_retried_then_skipped(tmp_path, http_images, fast_retries):
    host, folder, paths = http_images
    for i, name in enumerate(["a1", "a2"]):
        (folder / f"{name}.jpg").write_bytes(jpeg(i))
    csv_path = labels_csv(tmp_path, ["a1", "drop1", "gone", "a2"])
    root = tmp_path / "o"
    m, rep = build_openimages(csv_path, classes_file(tmp_path), f"http://{host}/{{id}}.jpg", str(root), progress=False)
    assert rep.problem_counts == {"unreachable image": 1, "missing image": 1}
    assert m.splits["train"].samples == 2 and written_keys(root) == {"a1", "a2"}
    # A dropped connection is retried (aiohttp may itself retry a dropped idempotent request once).
    assert common.FETCH_ATTEMPTS <= paths.count("/drop1.jpg") <= 2 * common.FETCH_ATTEMPTS
    assert paths.count("/gone.jpg") == 1  # a 404 is an answer: not retried
    assert f"ImageID drop1: http://{host}/drop1.jpg: cannot read after 3 tries" in rep.summary()


def test_closed_port_is_an_unreachable_image_not_an_abort(tmp_path, capsys, fast_retries):
    port = closed_port()
    url = f"http://127.0.0.1:{port}/x.jpg"
    status, message, ext, key = fetch_image((url, None, "k"))
    assert (status, ext, key) == ("unreachable", "", "k")
    assert message.startswith(f"{url}: cannot read after 3 tries")
    # Through the CLI every image is unreachable: nothing to write, and the error says why.
    code, _, err = csl(capsys, "shards", "openimages", "--labels", labels_csv(tmp_path, ["a", "b"]), "--classes",
                       classes_file(tmp_path), "--images", f"http://127.0.0.1:{port}/{{id}}.jpg", "--out",
                       str(tmp_path / "o"), "--workers", "0")
    assert code == 2
    line = error_line(err)
    assert "unreachable image 2" in line and f"labels.csv:2 ImageID a: http://127.0.0.1:{port}/a.jpg: cannot read" in line


# ---------------------------------------------------------------- item 5b: paths outside --images


def test_file_names_cannot_leave_the_images_folder(tmp_path):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(jpeg(9))
    d = image_dir(tmp_path, ["ok.jpg"])
    (d / "sub").mkdir()
    (d / "sub" / "x.jpg").write_bytes(jpeg(3))
    bad = ["../secret.jpg", "sub/../../secret.jpg", str(secret), "sub\\..\\..\\secret.jpg", f"file://{secret}", "simplecache::" + str(secret)]
    images = [{"id": 1, "file_name": "ok.jpg"}, {"id": 2, "file_name": "sub/x.jpg"}]
    images += [{"id": 10 + i, "file_name": n} for i, n in enumerate(bad)]
    inst = coco_json(tmp_path, images)
    for template in (str(d), str(d) + "/{file_name}"):
        root = tmp_path / ("o" if "{" not in template else "t")
        m, rep = build_coco(inst, template, str(root), progress=False)
        assert rep.problem_counts == {"bad file name": len(bad)}, template
        assert m.splits["train"].samples == 2 and written_keys(root) == {"ok", "x"}
        assert "image id 10: file_name '../secret.jpg' has a '..' component" in rep.summary()
        for tar in root.glob("*/*.tar"):
            assert jpeg(9) not in tar.read_bytes()


def test_image_ids_cannot_leave_the_images_prefix(tmp_path):
    d = image_dir(tmp_path, ["ok.jpg"])
    csv_path = labels_csv(tmp_path, ["ok", "../ok", "/etc/passwd", "a:b"])
    m, rep = build_openimages(csv_path, classes_file(tmp_path), str(d), str(tmp_path / "o"), progress=False)
    assert rep.problem_counts == {"bad file name": 3}
    assert m.splits["train"].samples == 1
    assert "labels.csv:3 ImageID ../ok: id '../ok' has a '..' component" in rep.summary()
    with pytest.raises(ValueError, match="'..'"):
        image_url("s3://bucket/imgs/{id}.jpg", id="..")
    with pytest.raises(ValueError, match="change the meaning"):
        image_url("https://host/imgs/", file_name="%2e%2e/x.jpg", id="1")
    assert image_url("https://host/imgs/", file_name="train/1.jpg", id="1") == "https://host/imgs/train/1.jpg"


# ---------------------------------------------------------------- item 5c: nothing to write


def _empty_split_message(line: str) -> bool:
    return "no samples" in line


@pytest.mark.parametrize("content", ["", HEADER + "\n", "\n\n"], ids=["empty", "header-only", "blank"])
def test_empty_csv_is_an_error_and_publishes_nothing(tmp_path, capsys, content):
    # Relies on data_shards/writer.py raising EmptySplitError (a ValueError) for a split with
    # no samples, before any manifest is published.
    (tmp_path / "labels.csv").write_text(content)
    d = image_dir(tmp_path, ["a.jpg"])
    root = tmp_path / "o"
    code, _, err = csl(capsys, "shards", "openimages", "--labels", str(tmp_path / "labels.csv"), "--classes",
                       classes_file(tmp_path), "--images", str(d), "--out", str(root), "--workers", "0")
    assert code == 2
    assert _empty_split_message(error_line(err))
    assert not (root / "dataset.json").exists()


def test_all_images_missing_is_an_error_naming_them(tmp_path, capsys):
    d = image_dir(tmp_path, [])
    csv_path = labels_csv(tmp_path, ["a", "b"])
    root = tmp_path / "o"
    code, _, err = csl(capsys, "shards", "openimages", "--labels", csv_path, "--classes", classes_file(tmp_path),
                       "--images", str(d), "--out", str(root), "--workers", "0")
    assert code == 2
    line = error_line(err)
    assert _empty_split_message(line) and "missing image 2" in line and "labels.csv:2 ImageID a" in line
    assert not (root / "dataset.json").exists()
    # COCO: an instances file without images.
    inst = coco_json(tmp_path, [], [])
    code, _, err = csl(capsys, "shards", "coco", "--instances", inst, "--images", str(d), "--out", str(root))
    assert code == 2 and _empty_split_message(error_line(err))
    assert not (root / "dataset.json").exists()


def test_missing_images_folder_is_an_error(tmp_path, capsys):
    code, _, err = csl(capsys, "shards", "openimages", "--labels", labels_csv(tmp_path, ["a"]), "--classes",
                       classes_file(tmp_path), "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert code == 2 and str(tmp_path / "nope") in error_line(err)


# ---------------------------------------------------------------- item 5d: unreadable CSV


def _run_oi(capsys, tmp_path, labels: str, classes: str | None = None, *extra: str) -> str:
    # --overwrite: these runs reuse one output after changing the input, which a plain rerun refuses
    d = image_dir(tmp_path, ["a.jpg"])
    code, _, err = csl(capsys, "shards", "openimages", "--labels", labels, "--classes", classes or classes_file(tmp_path),
                       "--images", str(d), "--out", str(tmp_path / "o"), "--workers", "0", "--overwrite", *extra)
    assert code == 2
    assert not (tmp_path / "o" / "dataset.json").exists()
    return error_line(err)


def test_truncated_gz_csv_names_file_and_line(tmp_path, capsys):
    rows = "\n".join([HEADER] + [f"img{i:05d},v,{PERSON},1" for i in range(5000)]) + "\n"
    data = gzip.compress(rows.encode())
    p = tmp_path / "labels.csv.gz"
    p.write_bytes(data[: len(data) // 2])
    line = _run_oi(capsys, tmp_path, str(p))
    assert f"{p}:" in line and "truncated or corrupt compressed file" in line
    n = int(line.split(f"{p}:")[1].split(":")[0])
    assert 100 < n < 5001  # the line after the last one read
    # Not gzip at all, under a .gz name.
    p.write_bytes(b"ImageID,Source\n")
    assert f"{p}:1: truncated or corrupt compressed file" in _run_oi(capsys, tmp_path, str(p))


def test_over_long_csv_field_names_file_and_line(tmp_path, capsys):
    p = tmp_path / "labels.csv"
    p.write_text(f"{HEADER}\na,v,{PERSON},1\nb,v,{'x' * 200_000},1\nc,v,{PERSON},1\n")
    line = _run_oi(capsys, tmp_path, str(p))
    assert f"{p}:3: not a readable CSV row (field larger than field limit" in line
    # An unterminated quote swallows the rest of the file: named where the limit is passed.
    p.write_text(f'{HEADER}\na,v,{PERSON},1\nb,v,"{PERSON},1\n' + "y" * 200_000 + "\n")
    assert f"{p}:4: not a readable CSV row" in _run_oi(capsys, tmp_path, str(p))


def test_non_utf8_csv_names_the_right_line(tmp_path, capsys):
    # Far past the first 8 KiB chunk: a text stream would report an earlier line.
    rows = [HEADER] + [f"img{i:05d},v,{PERSON},1" for i in range(600)]
    rows[500] = f"img\xe9,v,{PERSON},1"
    p = tmp_path / "labels.csv"
    p.write_bytes("\n".join(rows).encode("latin-1") + b"\n")
    assert f"{p}:501: not UTF-8 text" in _run_oi(capsys, tmp_path, str(p))
    # The classes file and the descriptions file get the same treatment.
    c = tmp_path / "classes.txt"
    c.write_bytes(f"{PERSON}\n/m/caf\xe9\n".encode("latin-1"))
    good = labels_csv(tmp_path, ["a"], name="ok.csv")
    assert f"{c}:2: not UTF-8 text" in _run_oi(capsys, tmp_path, good, str(c))
    c.write_text(f"{PERSON}\n")
    descr = tmp_path / "descr.csv"
    descr.write_bytes(f"LabelName,DisplayName\n{PERSON},Caf\xe9\n".encode("latin-1"))
    assert f"{descr}:2: not UTF-8 text" in _run_oi(capsys, tmp_path, good, str(c), "--descriptions", str(descr))


def test_truncated_gz_classes_file_names_it(tmp_path, capsys):
    c = tmp_path / "classes.txt.gz"
    c.write_bytes(gzip.compress("\n".join(f"/m/{i:06d}" for i in range(20000)).encode())[:500])
    good = labels_csv(tmp_path, ["a"])
    line = _run_oi(capsys, tmp_path, good, str(c))
    assert f"{c}:" in line and "truncated or corrupt compressed file" in line


# ---------------------------------------------------------------- item 6: credentials


SECRETS = ("s3cr3t", "deadbeef")


def _no_secrets(root: Path, *texts: str) -> None:
    for text in texts:
        for s in SECRETS:
            assert s not in text
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files
    for p in files:
        data = p.read_bytes()
        for s in SECRETS:
            assert s.encode() not in data, p


def test_credentials_in_image_urls_are_never_written_or_printed(tmp_path, capsys, http_images, fast_retries):
    host, folder, _ = http_images
    for i, name in enumerate(["a1", "a2"]):
        (folder / f"{name}.jpg").write_bytes(jpeg(i))
    secret_url = f"http://user:s3cr3t@{host}/{{id}}.jpg?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIA"
    csv_path = labels_csv(tmp_path, ["a1", "gone", "drop1", "a2"])
    root = tmp_path / "oi"
    code, out, err = csl(capsys, "shards", "openimages", "--labels", csv_path, "--classes", classes_file(tmp_path),
                         "--images", secret_url, "--out", str(root), "--workers", "0")
    assert code == 0, err
    assert "missing image: 1" in err and "unreachable image: 1" in err and f"http://{host}/gone.jpg?<redacted>" in err
    meta = json.loads((root / "dataset.json").read_text())["meta"]["conversions"]["train"]
    assert meta["images"] == f"http://{host}/{{id}}.jpg?<redacted>"
    _no_secrets(root, out, err)

    # COCO, with a file-name template, and the strict-mode error.
    inst = coco_json(tmp_path, [{"id": 1, "file_name": "a1.jpg"}, {"id": 2, "file_name": "gone.jpg"}])
    coco_url = f"http://user:s3cr3t@{host}/{{file_name}}?X-Amz-Signature=deadbeef"
    root2 = tmp_path / "coco"
    code, out, err = csl(capsys, "shards", "coco", "--instances", inst, "--images", coco_url, "--out", str(root2), "--workers", "0")
    assert code == 0 and "missing image: 1" in err
    _no_secrets(root2, out, err)
    code, out, err = csl(capsys, "shards", "coco", "--instances", inst, "--images", coco_url, "--out", str(tmp_path / "s"),
                         "--workers", "0", "--strict")
    assert code == 2 and "image id 2" in error_line(err)
    _no_secrets(root2, out, err)

    # A bad template names the template without its credentials.
    code, out, err = csl(capsys, "shards", "coco", "--instances", inst, "--images", coco_url.replace("{file_name}", "{nope}"),
                         "--out", str(tmp_path / "t"))
    assert code == 2 and "unknown field" in error_line(err)
    for s in SECRETS:
        assert s not in out + err


def test_report_and_errors_redact_every_url():
    rep = common.ConversionReport("x")
    rep.problem("missing image", "https://u:pw@h/labels.csv?sig=deadbeef:3", "image not found: s3://b/k?X-Amz-Signature=deadbeef")
    assert "deadbeef" not in rep.summary() and "pw@" not in rep.summary() and "deadbeef" not in rep.brief()
    strict = common.ConversionReport("x", strict=True)
    with pytest.raises(ConversionError) as e:
        strict.problem("k", "https://u:s3cr3t@h/a", "b")
    assert "s3cr3t" not in str(e.value)


# ---------------------------------------------------------------- item 1: the other split survives


@pytest.mark.parametrize("how", ["bad split name", "strict failure", "bad image under strict"])
def test_a_failed_split_conversion_keeps_the_other_split(tmp_path, capsys, how):
    from data_shards.inspect import verify_dataset
    from data_shards.storage import read_manifest

    ids = [f"i{n}" for n in range(6)]
    imgs = image_dir(tmp_path, [f"{i}.jpg" for i in ids])
    out = str(tmp_path / "out")
    rc, _, err = csl(capsys, "shards", "openimages", "--labels", labels_csv(tmp_path, ids), "--classes",
                     classes_file(tmp_path), "--images", str(imgs), "--out", out, "--split", "train",
                     "--shard-samples", "2", "--workers", "0")
    assert rc == 0, err
    before = Path(out, "dataset.json").read_bytes()
    val_ids = [f"v{n}" for n in range(5)]
    for i, v in enumerate(val_ids):
        (imgs / f"{v}.jpg").write_bytes(jpeg(i))
    labels = labels_csv(tmp_path, val_ids, name="val.csv")
    split = "val"
    if how == "bad split name":
        split = "va/l"
    elif how == "strict failure":  # a bad row after two shards' worth of good ones
        with open(labels, "a") as f:
            f.write(f"v9,v,{PERSON},0.5\n")
    else:
        (imgs / "v3.jpg").write_bytes(b"<html>not an image</html>")
    rc, _, err = csl(capsys, "shards", "openimages", "--labels", labels, "--classes", classes_file(tmp_path),
                     "--images", str(imgs), "--out", out, "--split", split, "--shard-samples", "1",
                     "--workers", "0", "--strict")
    assert rc == 2, err
    m = read_manifest(out)
    assert m.splits["train"].samples == 6
    if how == "bad split name":
        assert Path(out, "dataset.json").read_bytes() == before
    assert verify_dataset(out)["ok"]
