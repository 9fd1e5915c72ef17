"""COCO converter: a fully labelled instances JSON, partially annotated by a simulated scheme.

COCO is the dataset both papers use to study annotation schemes (paper 1, sec. 5.1: FPC and
RPA; paper 2, sec. V.A: PAL, PPL, SPL): its image-level labels are complete, so any partial
annotation can be simulated from the full label matrix and the truth stays known. Each record
carries `true` (the full positive set), so the manifest gets `truth.<split>.freq`.

Classes are the categories sorted by id (`ClassInfo(id=str(category id), name)`); images are
taken in id order so that the simulated annotation, a function of (matrix, seed), is
reproducible. Images without annotations are kept with no positive: in COCO they are real
"none of the 80" images, and dropping them would bias every class frequency upwards.

The instances JSON is loaded whole (train2017 is ~450 MB of JSON, a few GB of Python objects
at peak): COCO-size data is what the dense simulators are for (see `simulate.py`).
The simulation runs over all images of the JSON; an image missing on disk (or with a file name
that would leave `--images`) is then reported and skipped, so with missing images the written
FPC counts can fall short of N.

The JSON is input from outside and checked as such: a file that does not parse (bad UTF-8, a
nesting deeper than the parser's recursion limit, an integer past Python's digit limit, a
truncated .gz) or whose top level has the wrong shape is a one-line ValueError naming the file;
an entry of the wrong type (an id that is a list, a name that is a dict) is a problem of that
entry, counted with its id, or, for a category, a ValueError (a class list with a hole in it
would shift every label).
"""

from __future__ import annotations

import json
import posixpath
import sys
from typing import Any, Iterator

import fsspec
import numpy as np

from ..format import ClassInfo, Manifest
from ..simulate import parse_scheme, simulate
from ..storage import redact, storage_options
from .common import (
    BadImageName,
    ConversionReport,
    ImageTask,
    check_images,
    convert_images,
    image_url,
    input_fault,
    short_repr,
    input_identity,
)

__all__ = [
    "load_json",
    "categories",
    "image_key",
    "image_tasks",
    "read_images",
    "annotated_classes",
    "coco_full_matrix",
    "build_coco",
]


def _is_id(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)  # JSON true would pass for id 1


def load_json(url: str) -> dict[str, Any]:
    """The COCO/LVIS JSON at `url`; any reason it cannot be read is a ValueError naming the file.

    Read as bytes and decoded explicitly, so that a bad byte is reported at its offset in the
    file (a text stream reports it within whatever chunk it was decoding).
    """
    name = redact(url)
    try:
        with fsspec.open(url, "rb", compression="infer", **storage_options(url)) as f:
            raw = f.read()
        text = raw.decode("utf-8")
        del raw  # the parse below needs GBs of its own (see the module docstring)
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{name}: not UTF-8 ({e.reason} at byte offset {e.start})") from None
    except RecursionError:
        raise ValueError(f"{name}: JSON nested deeper than the parser's limit (about {sys.getrecursionlimit()} levels)") from None
    except ValueError as e:  # e.g. an integer longer than sys.get_int_max_str_digits()
        raise ValueError(f"{name}: not readable as JSON ({str(e).split(';')[0]})") from None
    except Exception as e:
        fault = input_fault(e)
        if fault is None:
            raise
        raise ValueError(f"{name}: {fault}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("categories"), list):
        raise ValueError(f"{name}: expected an object with 'images' and 'categories' lists")
    if not isinstance(data.get("annotations", []), list):
        raise ValueError(f"{name}: 'annotations' is {short_repr(data['annotations'])}, not a list")
    return data


def categories(data: dict[str, Any], where: str) -> tuple[list[ClassInfo], dict[int, int]]:
    """Classes sorted by category id, and category id -> class index."""
    cats: dict[int, str] = {}
    for c in data["categories"]:
        if not isinstance(c, dict) or not _is_id(c.get("id")):
            raise ValueError(f"{where}: category without an integer id: {short_repr(c)}")
        if c["id"] in cats:
            raise ValueError(f"{where}: category id {c['id']} is listed twice")
        name = c.get("name", str(c["id"]))
        if not isinstance(name, str):
            raise ValueError(f"{where}: category id {c['id']}: name {short_repr(name)} is not a string")
        cats[c["id"]] = name
    if not cats:
        raise ValueError(f"{where}: no categories")
    ids = sorted(cats)
    return [ClassInfo(id=str(i), name=cats[i]) for i in ids], {cid: j for j, cid in enumerate(ids)}


def image_key(img: dict[str, Any]) -> tuple[str, str]:
    """(file name, sample key): `file_name`, else the basename of `coco_url` (LVIS v1).

    Raises `BadImageName` when either is there but not a string.
    """
    name, url = img.get("file_name"), img.get("coco_url", "")
    if name is not None and not isinstance(name, str):
        raise BadImageName(f"file_name {short_repr(name)} is not a string")
    if not isinstance(url, str):
        raise BadImageName(f"coco_url {short_repr(url)} is not a string")
    name = name or posixpath.basename(url)
    if not name:
        name = f"{int(img['id']):012d}.jpg"
    return name, posixpath.splitext(posixpath.basename(name))[0]


def image_tasks(
    imgs: list[dict[str, Any]], images: str, where: str, report: ConversionReport
) -> Iterator[tuple[int, str, str, str]]:
    """(row, url, key, where) of each image whose location stays inside `images`; the others
    are reported ("bad file name") and skipped."""
    for i, img in enumerate(imgs):
        at = f"{where}: image id {img['id']}"
        try:
            name, key = image_key(img)
            url = image_url(images, id=str(img["id"]), file_name=name)
        except BadImageName as e:
            report.problem("bad file name", at, str(e))
            continue
        yield i, url, key, at


def read_images(data: dict[str, Any], where: str, report: ConversionReport) -> list[dict[str, Any]]:
    """Images in id order, each id once; bad and duplicate entries reported."""
    out: dict[int, dict[str, Any]] = {}
    for img in data["images"]:
        if not isinstance(img, dict) or not _is_id(img.get("id")):
            report.problem("bad image entry", where, f"image without an integer id: {short_repr(img)}")
            continue
        if img["id"] in out:
            report.problem("duplicate image", f"{where}: image id {img['id']}", "listed twice; first kept")
            continue
        out[img["id"]] = img
    report.count("images read", len(out))
    return [out[i] for i in sorted(out)]


def annotated_classes(
    data: dict[str, Any], row: dict[int, int], cat_index: dict[int, int], where: str, report: ConversionReport
) -> Iterator[tuple[int, int]]:
    """(image row, class index) of every usable annotation."""
    for ann in data.get("annotations", []):
        report.count("annotations read")
        if not isinstance(ann, dict):
            report.problem("bad annotation", where, f"not an object: {short_repr(ann)}")
            continue
        at = f"{where}: annotation id {short_repr(ann.get('id'))}"
        image_id, category_id = ann.get("image_id"), ann.get("category_id")
        if not _is_id(image_id) or not _is_id(category_id):
            what = f"image_id {short_repr(image_id)} and category_id {short_repr(category_id)} must be integers"
            report.problem("bad annotation", at, what)
            continue
        r = row.get(image_id)
        if r is None:
            report.problem("annotation of unknown image", at, f"image_id {image_id!r} is not in 'images'")
            continue
        c = cat_index.get(category_id)
        if c is None:
            report.problem("unknown category", at, f"category_id {category_id!r} is not in 'categories'")
            continue
        yield r, c


def coco_full_matrix(
    data: dict[str, Any], where: str, report: ConversionReport
) -> tuple[list[ClassInfo], list[dict[str, Any]], np.ndarray]:
    """Classes, images in id order, and the full label matrix bool [N, C]."""
    classes, cat_index = categories(data, where)
    images = read_images(data, where, report)
    row = {img["id"]: i for i, img in enumerate(images)}
    full = np.zeros((len(images), len(classes)), dtype=bool)
    for r, c in annotated_classes(data, row, cat_index, where, report):
        full[r, c] = True
    return classes, images, full


def build_coco(
    instances: str,
    images: str,
    out: str,
    *,
    split: str = "train",
    scheme: str = "full",
    seed: int = 0,
    resize: int | None = None,
    shard_samples: int = 1000,
    workers: int | None = 0,
    strict: bool = False,
    progress: bool = True,
    anon: bool = False,
    overwrite: bool = False,
) -> tuple[Manifest, ConversionReport]:
    """Convert a COCO instances JSON, annotating it with `scheme` (see `simulate.py`).

    `images` is a folder/URL prefix (joined with each image's `file_name`) or a template with
    `{file_name}` and/or `{id}`.
    """
    sch = parse_scheme(scheme)
    if sch.kind == "openimages":
        raise ValueError("annotation scheme 'openimages' is for synthetic data only; for COCO use full, fpc:N, rpa:P, pal:Q, ppl:Q or spl")
    if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int) or resize < 1):
        raise ValueError(f"resize must be a positive short-edge size in pixels, got {resize!r}")
    check_images(images, id="1", file_name="x.jpg")  # a bad template fails before the root is touched
    report = ConversionReport("coco", strict=strict)
    where = redact(instances)
    data = load_json(instances)
    classes, imgs, full = coco_full_matrix(data, where, report)
    labels = simulate(full, sch, seed)

    def tasks() -> Iterator[ImageTask]:
        for i, url, key, at in image_tasks(imgs, images, where, report):
            pos = np.flatnonzero(labels[i] == 1).tolist()
            neg = np.flatnonzero(labels[i] == -1).tolist()
            yield url, key, pos, neg, np.flatnonzero(full[i]).tolist(), at

    split_meta = {"instances": instances, "images": images, "scheme": str(sch), "seed": seed, "resize": resize}
    settings = {"instances": instances, "instances file": input_identity(instances), "images": images, "scheme": str(sch), "seed": seed}
    manifest = convert_images(
        out, classes, split, tasks(), resize=resize, anon=anon, shard_samples=shard_samples, source="coco",
        split_meta=split_meta, settings=settings, report=report, workers=workers, overwrite=overwrite,
        progress=progress, total=len(imgs),
    )
    return manifest, report
