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
The simulation runs over all images of the JSON; an image missing on disk is then reported and
skipped, so with missing images the written FPC counts can fall short of N.
"""

from __future__ import annotations

import json
import posixpath
from typing import Any, Iterator

import fsspec
import numpy as np

from ..format import ClassInfo, Manifest
from ..simulate import parse_scheme, simulate
from ..storage import storage_options
from .common import ConversionReport, ImageTask, image_records, image_url, write_split

__all__ = ["load_json", "categories", "image_key", "read_images", "annotated_classes", "coco_full_matrix", "build_coco"]


def load_json(url: str) -> dict[str, Any]:
    with fsspec.open(url, "rt", encoding="utf-8", compression="infer", **storage_options(url)) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{url}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("categories"), list):
        raise ValueError(f"{url}: expected an object with 'images' and 'categories' lists")
    return data


def categories(data: dict[str, Any], where: str) -> tuple[list[ClassInfo], dict[int, int]]:
    """Classes sorted by category id, and category id -> class index."""
    cats: dict[int, str] = {}
    for c in data["categories"]:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int):
            raise ValueError(f"{where}: category without an integer id: {str(c)[:100]}")
        if c["id"] in cats:
            raise ValueError(f"{where}: category id {c['id']} is listed twice")
        cats[c["id"]] = str(c.get("name", c["id"]))
    if not cats:
        raise ValueError(f"{where}: no categories")
    ids = sorted(cats)
    return [ClassInfo(id=str(i), name=cats[i]) for i in ids], {cid: j for j, cid in enumerate(ids)}


def image_key(img: dict[str, Any]) -> tuple[str, str]:
    """(file name, sample key): `file_name`, else the basename of `coco_url` (LVIS v1)."""
    name = img.get("file_name") or posixpath.basename(str(img.get("coco_url", "")))
    if not name:
        name = f"{int(img['id']):012d}.jpg"
    return name, posixpath.splitext(posixpath.basename(name))[0]


def read_images(data: dict[str, Any], where: str, report: ConversionReport) -> list[dict[str, Any]]:
    """Images in id order, each id once; bad and duplicate entries reported."""
    out: dict[int, dict[str, Any]] = {}
    for img in data["images"]:
        if not isinstance(img, dict) or not isinstance(img.get("id"), int):
            report.problem("bad image entry", where, f"image without an integer id: {str(img)[:100]}")
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
            report.problem("bad annotation", where, f"not an object: {str(ann)[:100]}")
            continue
        at = f"{where}: annotation id {ann.get('id')}"
        r = row.get(ann.get("image_id"))  # type: ignore[arg-type]
        if r is None:
            report.problem("annotation of unknown image", at, f"image_id {ann.get('image_id')!r} is not in 'images'")
            continue
        c = cat_index.get(ann.get("category_id"))  # type: ignore[arg-type]
        if c is None:
            report.problem("unknown category", at, f"category_id {ann.get('category_id')!r} is not in 'categories'")
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
    workers: int = 0,
    strict: bool = False,
    progress: bool = True,
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
    image_url(images, id="1", file_name="x.jpg")  # a bad template fails before the root is touched
    report = ConversionReport("coco", strict=strict)
    data = load_json(instances)
    classes, imgs, full = coco_full_matrix(data, instances, report)
    labels = simulate(full, sch, seed)

    def tasks() -> Iterator[ImageTask]:
        for i, img in enumerate(imgs):
            name, key = image_key(img)
            url = image_url(images, id=str(img["id"]), file_name=name)
            pos = np.flatnonzero(labels[i] == 1).tolist()
            neg = np.flatnonzero(labels[i] == -1).tolist()
            yield url, key, pos, neg, np.flatnonzero(full[i]).tolist(), f"{instances}: image id {img['id']}"

    records = image_records(
        tasks(), resize=resize, workers=workers, report=report, desc=f"coco {split}", progress=progress, total=len(imgs)
    )
    split_meta = {"instances": instances, "images": images, "scheme": str(sch), "seed": seed, "resize": resize}
    manifest = write_split(out, classes, split, records, shard_samples=shard_samples, source="coco", split_meta=split_meta)
    return manifest, report
