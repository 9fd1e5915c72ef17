"""LVIS v1 converter: federated annotation, already partial, taken as it is.

LVIS was annotated per category on a subset of images ("federated"), which makes it a real
partially annotated dataset (paper 1, sec. 3.3 cites its "Person"/"Shirt" counts). For each
image:
- positives: the categories of its instance annotations;
- negatives: its `neg_category_ids`, categories verified absent by annotators;
- `not_exhaustive_category_ids`: categories whose instances were not all annotated. They are
  positives only where an instance exists and never negatives: a category listed both as
  negative and not exhaustive is a contradiction in the file, reported, and left un-annotated.
  A category both annotated and listed as negative is reported and dropped for that image.
Nothing is simulated and no truth is written: the full labels are unknown.

Classes are the categories sorted by id (`str(id)`, name); an image's file is its
`file_name` if present, else the basename of `coco_url` (LVIS v1 has only the latter). Bad
input is handled as in `coco.py`; a category id list holding a non-integer is a problem of its
image.
"""

from __future__ import annotations

from typing import Any, Iterator


from ..format import ClassInfo, Manifest
from ..storage import redact
from .coco import annotated_classes, categories, image_tasks, load_json, read_images
from .common import ConversionReport, ImageTask, check_images, convert_images, short_repr, input_identity

__all__ = ["lvis_labels", "build_lvis"]


def _cat_list(
    img: dict[str, Any], field: str, cat_index: dict[int, int], where: str, report: ConversionReport
) -> set[int]:
    out = set()
    values = img.get(field, [])
    if not isinstance(values, list):
        report.problem("bad image entry", where, f"{field} is not a list")
        return out
    for cid in values:
        if isinstance(cid, bool) or not isinstance(cid, int):
            report.problem("bad image entry", where, f"{field} has {short_repr(cid)}, not an integer category id")
            continue
        c = cat_index.get(cid)
        if c is None:
            report.problem("unknown category", where, f"{field} has category id {cid!r} not in 'categories'")
        else:
            out.add(c)
    return out


def lvis_labels(
    data: dict[str, Any], where: str, report: ConversionReport
) -> tuple[list[ClassInfo], list[dict[str, Any]], list[tuple[list[int], list[int]]]]:
    """Classes, images in id order, and each image's (pos, neg) class indices."""
    classes, cat_index = categories(data, where)
    images = read_images(data, where, report)
    row = {img["id"]: i for i, img in enumerate(images)}
    pos_sets: list[set[int]] = [set() for _ in images]
    for r, c in annotated_classes(data, row, cat_index, where, report):
        pos_sets[r].add(c)
    labels = []
    for img, pos in zip(images, pos_sets):
        at = f"{where}: image id {img['id']}"
        neg = _cat_list(img, "neg_category_ids", cat_index, at, report)
        not_exh = _cat_list(img, "not_exhaustive_category_ids", cat_index, at, report)
        for c in sorted(neg & not_exh):
            report.problem("negative not exhaustive", at, f"category {classes[c].id} is both negative and not exhaustive; left un-annotated")
        for c in sorted(neg & pos):
            report.problem("contradictory labels", at, f"category {classes[c].id} is annotated and listed as negative; dropped")
        labels.append((sorted(pos - neg), sorted(neg - not_exh - pos)))
    return classes, images, labels


def build_lvis(
    annotations: str,
    images: str,
    out: str,
    *,
    split: str = "train",
    resize: int | None = None,
    shard_samples: int = 1000,
    workers: int | None = 0,
    strict: bool = False,
    progress: bool = True,
    anon: bool = False,
    overwrite: bool = False,
) -> tuple[Manifest, ConversionReport]:
    """Convert an LVIS v1 annotation JSON; `images` as in `build_coco`."""
    if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int) or resize < 1):
        raise ValueError(f"resize must be a positive short-edge size in pixels, got {resize!r}")
    check_images(images, id="1", file_name="x.jpg")
    report = ConversionReport("lvis", strict=strict)
    where = redact(annotations)
    data = load_json(annotations)
    classes, imgs, labels = lvis_labels(data, where, report)

    def tasks() -> Iterator[ImageTask]:
        for i, url, key, at in image_tasks(imgs, images, where, report):
            pos, neg = labels[i]
            yield url, key, pos, neg, None, at

    split_meta = {"annotations": annotations, "images": images, "resize": resize}
    settings = {"annotations": annotations, "annotations file": input_identity(annotations), "images": images}
    manifest = convert_images(
        out, classes, split, tasks(), resize=resize, anon=anon, shard_samples=shard_samples, source="lvis",
        split_meta=split_meta, settings=settings, report=report, workers=workers, overwrite=overwrite,
        progress=progress, total=len(imgs),
    )
    return manifest, report
