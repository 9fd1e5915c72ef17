"""`csl shards …`: make, convert, inspect and verify datasets.

Converters print a problem summary at the end (unknown classes, bad rows, missing images) and
exit 0 unless `--strict`, where the first problem is an error (exit 2). Source modules are
imported inside each command so one converter's dependencies never slow another down.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional

import click
from tqdm import tqdm

__all__ = ["shards_app"]

@click.group("shards")
def shards_app() -> None:
    """Make, convert, inspect and verify WebDataset shard datasets."""


def _workers(n: Optional[int]) -> int:
    return (os.cpu_count() or 1) if n is None else n


def _done(out: str, m, split: str | None = None, report=None) -> None:
    if report is not None:
        click.echo(report.summary(), err=True)
    splits = [split] if split else list(m.splits)
    click.echo(f"wrote {_shown(out)}: {m.num_classes} classes, "
               + ", ".join(f"{k} {m.splits[k].samples} samples in {len(m.splits[k].shards)} shards" for k in splits))


_out = click.option("--out", required=True, help="dataset root: a folder or an fsspec URL (s3://...)")
_shard_samples = click.option("--shard-samples", default=1000, show_default=True, type=click.IntRange(min=1), help="samples per shard")
_workers_opt = click.option("--workers", type=click.IntRange(min=0), default=None, help="processes for image work (default: all cores; 0: in-process)")
_resize = click.option("--resize", type=click.IntRange(min=8), default=None, help="resize images to this short edge (reference data: 256)")
_strict = click.option("--strict", is_flag=True, help="make every data problem an error")
_split = click.option("--split", default="train", show_default=True, help="split name to write")


@shards_app.command("synthetic")
@_out
@click.option("--train", default=4000, show_default=True, type=click.IntRange(min=0), help="training samples")
@click.option("--val", default=1000, show_default=True, type=click.IntRange(min=0), help="validation samples")
@click.option("--image-size", default=64, show_default=True, type=click.IntRange(min=16), help="side of the drawn images, px")
@click.option("--scheme", default="openimages", show_default=True, help="annotation scheme: openimages, full, fpc:N, rpa:P, pal:Q, ppl:Q, spl")
@click.option("--val-scheme", default="full", show_default=True, help="annotation scheme of the val split")
@click.option("--seed", default=0, show_default=True, type=int, help="same seed, same bytes")
@click.option("--shard-samples", default=500, show_default=True, type=click.IntRange(min=1), help="samples per shard")
@_workers_opt
def synthetic(out, train, val, image_size, scheme, val_scheme, seed, shard_samples, workers) -> None:
    """Synthetic shapes/colours/scenes data with a known full ground truth."""
    from .sources.synthetic import build_synthetic

    m = build_synthetic(out, train=train, val=val, image_size=image_size, scheme=scheme, val_scheme=val_scheme,
                        seed=seed, shard_samples=shard_samples, workers=_workers(workers))
    _done(out, m)


@shards_app.command("openimages")
@click.option("--labels", required=True, help="human-verified image-level labels CSV (ImageID,Source,LabelName,Confidence)")
@click.option("--classes", required=True, help="trainable classes (one MID per line) or the class-descriptions CSV")
@click.option("--images", required=True, help="image folder or URL prefix, or a template with {id}")
@_out
@_split
@click.option("--descriptions", default=None, help="class-descriptions CSV for display names")
@_strict
@_resize
@_shard_samples
@_workers_opt
@click.option("--limit", type=click.IntRange(min=1), default=None, help="stop after this many images")
@click.option("--skip-unknown", is_flag=True, help="rows of classes outside --classes are skipped, not problems "
              "(the verified-label CSV covers ~20k classes, the trainable list 9,600)")
def openimages(labels, classes, images, out, split, descriptions, strict, resize, shard_samples, workers, limit, skip_unknown) -> None:
    """Convert OpenImages V6 image-level labels and images to shards."""
    from .sources.openimages import build_openimages

    m, report = build_openimages(labels, classes, images, out, split=split, descriptions=descriptions, strict=strict,
                                 resize=resize, shard_samples=shard_samples, workers=_workers(workers), limit=limit,
                                 skip_unknown=skip_unknown)
    _done(out, m, split, report)


@shards_app.command("coco")
@click.option("--instances", required=True, help="COCO instances JSON")
@click.option("--images", required=True, help="image folder or URL prefix")
@_out
@_split
@click.option("--scheme", default="full", show_default=True, help="full, fpc:N, rpa:P, pal:Q, ppl:Q, spl")
@click.option("--seed", default=0, show_default=True, type=int)
@_strict
@_resize
@_shard_samples
@_workers_opt
def coco(instances, images, out, split, scheme, seed, strict, resize, shard_samples, workers) -> None:
    """Convert COCO instances, simulating partial annotation with SCHEME."""
    from .sources.coco import build_coco

    m, report = build_coco(instances, images, out, split=split, scheme=scheme, seed=seed, resize=resize,
                           shard_samples=shard_samples, workers=_workers(workers), strict=strict)
    _done(out, m, split, report)


@shards_app.command("lvis")
@click.option("--annotations", required=True, help="LVIS v1 annotations JSON")
@click.option("--images", required=True, help="image folder or URL prefix")
@_out
@_split
@_strict
@_resize
@_shard_samples
@_workers_opt
def lvis(annotations, images, out, split, strict, resize, shard_samples, workers) -> None:
    """Convert LVIS v1 (verified negatives kept; not-exhaustive classes never negative)."""
    from .sources.lvis import build_lvis

    m, report = build_lvis(annotations, images, out, split=split, resize=resize, shard_samples=shard_samples,
                           workers=_workers(workers), strict=strict)
    _done(out, m, split, report)


def _shown(url: str) -> str:
    from .storage import redact

    return redact(url)


def _bar(root: str, total: int, what: str):
    return tqdm(total=total, desc=f"{what} {_shown(root)}", unit="shard", file=sys.stderr, disable=total < 2)


@shards_app.command("inspect")
@click.argument("root")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--top", default=10, show_default=True, type=click.IntRange(min=0), help="top classes by annotation count")
@click.option("--threads", default=4, show_default=True, type=click.IntRange(min=1))
def inspect(root: str, as_json: bool, top: int, threads: int) -> None:
    """Per split: samples, shards, bytes, per-class positive/negative counts, read from the shards."""
    from .inspect import inspect_dataset
    from .storage import read_manifest

    m = read_manifest(root)
    with _bar(root, sum(len(s.shards) for s in m.splits.values()), "inspect") as bar:
        res = inspect_dataset(root, threads=threads, progress=bar.update, top=top)
    if as_json:
        keep = ("samples", "shards", "bytes", "pos", "neg", "problems")
        click.echo(json.dumps({"classes": res["classes"],
                               "splits": {k: {kk: v[kk] for kk in keep} for k, v in res["splits"].items()}}))
        return
    click.echo(f"{_shown(root)}: {res['classes']} classes")
    for split, s in res["splits"].items():
        n = max(s["samples"], 1)
        click.echo(f"\n[{split}] {s['samples']} samples, {s['shards']} shards, {s['bytes'] / 1e6:.1f} MB, "
                   f"{(sum(s['pos']) + sum(s['neg'])) / n:.2f} annotated labels per sample "
                   f"({sum(s['pos']) / n:.2f} pos, {sum(s['neg']) / n:.2f} neg)")
        click.echo(f"  {'class':<32} {'pos':>8} {'neg':>8}")
        for t in s["top"]:
            click.echo(f"  {t['name'][:32]:<32} {t['pos']:>8} {t['neg']:>8}")
        if s["problem_count"]:
            click.echo(f"  {s['problem_count']} unreadable samples or shards (run `csl shards verify`)")


@shards_app.command("verify")
@click.argument("root")
@click.option("--json", "as_json", is_flag=True, help='print {"ok": bool, "problems": [...]}')
@click.option("--threads", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(min=8),
              help="decode images as training does at this size (JPEG draft mode)")
def verify(root: str, as_json: bool, threads: int, image_size: int) -> None:
    """Check every shard (count, size, sha256) and every sample (decodes, valid labels), reading as training
    reads. Exit 1 on problems."""
    from .inspect import MAX_PROBLEMS, verify_dataset
    from .storage import read_manifest

    m = read_manifest(root)
    with _bar(root, sum(len(s.shards) for s in m.splits.values()), "verify") as bar:
        res = verify_dataset(root, threads=threads, progress=bar.update, image_size=image_size)
    if as_json:
        click.echo(json.dumps(res))
    elif res["ok"]:
        click.echo(f"ok: {_shown(root)}: {res['samples']} samples in {sum(len(s.shards) for s in m.splits.values())} shards verified")
    else:
        click.echo(f"{res['problem_count']} problems in {_shown(root)}"
                   + (f" (the first {MAX_PROBLEMS} listed)" if res["problem_count"] > MAX_PROBLEMS else "") + ":")
        for p in res["problems"]:  # control characters from tar names are already escaped
            click.echo(f"  {p['shard']}  {p['key']}  {p['what']}")
    if not res["ok"]:
        sys.exit(1)
