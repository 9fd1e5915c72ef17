"""`csl shards …`: make, convert, inspect and verify datasets.

Converters print a problem summary at the end (unknown classes, bad rows, missing images) and
exit 0 unless `--strict`, where the first problem is an error (exit 2). Source modules are
imported inside each command so one converter's dependencies never slow another down.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

import click
from tqdm import tqdm

__all__ = ["shards_app"]

@click.group("shards")
def shards_app() -> None:
    """Make, convert, inspect and verify WebDataset shard datasets."""


def _resize_of(resize: int, keep_originals: bool) -> Optional[int]:
    return None if keep_originals else resize


def _done(out: str, m, split: str | None = None, report=None) -> None:
    if report is not None:
        click.echo(report.summary(), err=True)
    splits = [split] if split else list(m.splits)
    click.echo(f"wrote {_shown(out)}: {m.num_classes} classes, "
               + ", ".join(f"{k} {m.splits[k].samples} samples in {len(m.splits[k].shards)} shards" for k in splits))


_out = click.option("--out", required=True, help="dataset root: a folder or an fsspec URL (s3://...)")
_shard_samples = click.option("--shard-samples", default=1000, show_default=True, type=click.IntRange(min=1), help="samples per shard")
_workers_opt = click.option(
    "--workers", type=click.IntRange(min=0), default=None,
    help="shard tasks at a time on Ray: a local Ray, or the cluster at RAY_ADDRESS (default: one per CPU of the "
         "cluster; 0: build shards in this process, no Ray)")
_resize = click.option(
    "--resize", type=click.IntRange(min=8), default=256, show_default=True,
    help="downscale images to this short edge (never upscaled). 256 is what the CSL reference's OpenImages data "
         "uses and covers the presets' 224-px training; originals (often 1024 px and more) cost many times the "
         "bytes to store and read and the decode time, every epoch. Use 512 for 448-px training")
_keep_originals = click.option("--keep-originals", is_flag=True, help="store the images as they are, not resized")
_anon = click.option("--anon", is_flag=True, help="read s3:// images unsigned, without credentials (public buckets, "
                     "e.g. OpenImages' own); the endpoint still comes from AWS_ENDPOINT_URL")
_overwrite = click.option("--overwrite", is_flag=True, help="discard an unfinished conversion of this split in --out "
                          "and start afresh (by default a rerun resumes it, keeping every published shard)")
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
@_overwrite
def synthetic(out, train, val, image_size, scheme, val_scheme, seed, shard_samples, workers, overwrite) -> None:
    """Synthetic shapes/colours/scenes data with a known full ground truth."""
    from .sources.synthetic import build_synthetic

    m = build_synthetic(out, train=train, val=val, image_size=image_size, scheme=scheme, val_scheme=val_scheme,
                        seed=seed, shard_samples=shard_samples, workers=workers, overwrite=overwrite)
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
@_keep_originals
@_anon
@_overwrite
def openimages(labels, classes, images, out, split, descriptions, strict, resize, shard_samples, workers, limit, skip_unknown,
               keep_originals, anon, overwrite) -> None:
    """Convert OpenImages V6 image-level labels and images to shards (resumable: rerun after a stop)."""
    from .sources.openimages import build_openimages

    m, report = build_openimages(labels, classes, images, out, split=split, descriptions=descriptions, strict=strict,
                                 resize=_resize_of(resize, keep_originals), shard_samples=shard_samples, workers=workers,
                                 limit=limit, skip_unknown=skip_unknown, anon=anon, overwrite=overwrite)
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
@_keep_originals
@_anon
@_overwrite
def coco(instances, images, out, split, scheme, seed, strict, resize, shard_samples, workers, keep_originals, anon,
         overwrite) -> None:
    """Convert COCO instances, simulating partial annotation with SCHEME."""
    from .sources.coco import build_coco

    m, report = build_coco(instances, images, out, split=split, scheme=scheme, seed=seed,
                           resize=_resize_of(resize, keep_originals), shard_samples=shard_samples, workers=workers,
                           strict=strict, anon=anon, overwrite=overwrite)
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
@_keep_originals
@_anon
@_overwrite
def lvis(annotations, images, out, split, strict, resize, shard_samples, workers, keep_originals, anon, overwrite) -> None:
    """Convert LVIS v1 (verified negatives kept; not-exhaustive classes never negative)."""
    from .sources.lvis import build_lvis

    m, report = build_lvis(annotations, images, out, split=split, resize=_resize_of(resize, keep_originals),
                           shard_samples=shard_samples, workers=workers, strict=strict, anon=anon, overwrite=overwrite)
    _done(out, m, split, report)


def _shown(url: str) -> str:
    from .storage import redact

    return redact(url)


class _Bars:
    """Shards and samples bars, with rate and ETA, for inspect and verify."""

    def __init__(self, root: str, m, what: str, sample: float):
        from .inspect import sampled_shards

        shards = [s for split in m.splits for s in sampled_shards(m, split, sample)]
        kw = {"file": sys.stderr, "disable": len(shards) < 2, "dynamic_ncols": True}
        self.shards = tqdm(total=len(shards), desc=f"{what} {_shown(root)}", unit="shard", position=0, **kw)
        self.samples = tqdm(total=sum(s.samples for s in shards), desc="samples", unit="img", position=1, **kw)

    def update(self, shards: int, samples: int = 0) -> None:
        self.shards.update(shards)
        self.samples.update(samples)

    def __enter__(self) -> "_Bars":
        return self

    def __exit__(self, *exc) -> None:
        self.samples.close()
        self.shards.close()


_scan_workers = click.option(
    "--workers", type=click.IntRange(min=0), default=None,
    help="Ray workers to check shards with, one task per shard, twice that many in flight (a local Ray, or "
         "RAY_ADDRESS; default: one per CPU); 0: threads of this process (--threads)")
_sample = click.option("--sample", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True,
                       help="check this fraction of the shards (whole shards, picked by path; at least one per split)")


@shards_app.command("inspect")
@click.argument("root")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--top", default=10, show_default=True, type=click.IntRange(min=0), help="top classes by annotation count")
@click.option("--threads", default=4, show_default=True, type=click.IntRange(min=1), help="with --workers 0")
@_scan_workers
@_sample
def inspect(root: str, as_json: bool, top: int, threads: int, workers: Optional[int], sample: float) -> None:
    """Per split: samples, shards, bytes, per-class positive/negative counts, read from the shards."""
    from .inspect import inspect_dataset
    from .storage import read_manifest

    m = read_manifest(root)
    with _Bars(root, m, "inspect", sample) as bar:
        res = inspect_dataset(root, threads=threads, progress=bar.update, top=top, workers=workers, sample=sample)
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
@click.option("--threads", default=4, show_default=True, type=click.IntRange(min=1), help="with --workers 0")
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(min=8),
              help="decode images as training does at this size (JPEG draft mode)")
@_scan_workers
@_sample
def verify(root: str, as_json: bool, threads: int, image_size: int, workers: Optional[int], sample: float) -> None:
    """Check every shard (count, size, sha256) and every sample (decodes, valid labels), reading as training
    reads. Exit 1 on problems."""
    import time

    from .inspect import MAX_PROBLEMS, verify_dataset
    from .storage import read_manifest

    m = read_manifest(root)
    t0 = time.time()
    with _Bars(root, m, "verify", sample) as bar:
        res = verify_dataset(root, threads=threads, progress=bar.update, image_size=image_size, workers=workers,
                             sample=sample)
    took = f" in {time.time() - t0:.1f}s"
    if as_json:
        click.echo(json.dumps(res))
    elif res["ok"]:
        what = f"a sample of {res['shards']} of {sum(len(s.shards) for s in m.splits.values())}" if res["sampled"] \
            else f"{res['shards']}"
        click.echo(f"ok: {_shown(root)}: {res['samples']} samples in {what} shards verified{took}")
    else:
        click.echo(f"{res['problem_count']} problems in {_shown(root)}"
                   + (f" (the first {MAX_PROBLEMS} listed)" if res["problem_count"] > MAX_PROBLEMS else "") + ":")
        for p in res["problems"]:  # control characters from tar names are already escaped
            click.echo(f"  {p['shard']}  {p['key']}  {p['what']}")
    if not res["ok"]:
        sys.exit(1)
