"""What every converter of real data shares: problem reports, image fetching, split merging.

Real annotation files are never clean: unknown class ids, rows that contradict each other,
images that were never downloaded. A converter must neither crash on the first such row of a
40-million-row file nor quietly fold it into the labels. So every converter counts problems by
kind in a `ConversionReport`, keeps a few examples of each (file and line, or image id) for the
person who has to fix the data, prints a summary at the end, and in strict mode raises on the
first problem instead.

Images are fetched and (optionally) resized in pool workers through `fetch_image`: it takes a
plain tuple and returns a plain tuple so that it pickles cheaply and a missing file is a value,
not an exception that would tear down the pool. Without a resize the original bytes are kept:
re-encoding a JPEG costs quality and CPU for nothing.

`merge_target` lets a converter write one split into a root that already holds others
(`--split val` after `--split train`): the existing manifest's other splits are kept, and a
different class list is refused rather than silently producing a root whose label indices
mean two things.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from contextlib import closing
from typing import Iterable, Iterator, Sequence

from ..format import ClassInfo, LabelError, Manifest, ManifestError, Record, validate_key
from ..storage import exists, is_remote, join, read_bytes, read_manifest
from ..writer import parallel_map, write_dataset

__all__ = [
    "ConversionError",
    "ConversionReport",
    "image_url",
    "fetch_image",
    "load_image",
    "resize_short_edge",
    "merge_target",
    "ImageTask",
    "image_records",
    "write_split",
]

_PIL_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


class ConversionError(ValueError):
    """A problem in the input found in strict mode; the message names file, line and what."""


@dataclass
class ConversionReport:
    """Counters of a conversion and examples of each kind of problem.

    `counts` holds plain tallies (rows read, images written); `problem_counts` the problems by
    kind. Only problems make `strict` raise.
    """

    source: str
    strict: bool = False
    max_examples: int = 5
    counts: dict[str, int] = field(default_factory=dict)
    problem_counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def problem(self, kind: str, where: str, what: str) -> None:
        """Record one problem; in strict mode raise it instead."""
        if self.strict:
            raise ConversionError(f"{where}: {what} ({kind}; strict mode stops at the first problem)")
        self.problem_counts[kind] = self.problem_counts.get(kind, 0) + 1
        ex = self.examples.setdefault(kind, [])
        if len(ex) < self.max_examples:
            ex.append(f"{where}: {what}")

    @property
    def problems(self) -> int:
        return sum(self.problem_counts.values())

    def get(self, name: str) -> int:
        return self.counts.get(name, self.problem_counts.get(name, 0))

    def summary(self) -> str:
        lines = [f"{self.source} conversion: " + ", ".join(f"{k} {v}" for k, v in self.counts.items())]
        if not self.problem_counts:
            lines.append("no problems found")
            return "\n".join(lines)
        lines.append(f"{self.problems} problem(s), not mixed into the labels:")
        for kind, n in sorted(self.problem_counts.items(), key=lambda kv: -kv[1]):
            lines.append(f"  {kind}: {n}")
            for ex in self.examples.get(kind, []):
                lines.append(f"    e.g. {ex}")
        lines.append("(use strict mode to stop at the first problem)")
        return "\n".join(lines)


def image_url(images: str, **fields: str) -> str:
    """The location of one image: a template with `{id}`/`{file_name}`, or a folder/prefix."""
    if "{" in images:
        try:
            return images.format(**fields)
        except (KeyError, IndexError) as e:
            raise ValueError(
                f"image template {images!r}: unknown field {e}; available: "
                + ", ".join("{" + k + "}" for k in fields)
            ) from None
    name = fields.get("file_name") or f"{fields['id']}.jpg"
    if is_remote(images):
        return images.rstrip("/") + "/" + name
    return os.path.join(images, name)


def resize_short_edge(data: bytes, short_edge: int, quality: int = 90) -> tuple[bytes, str]:
    """Downscale so the short edge is `short_edge` (never upscale); JPEG-encode the result.

    An image already small enough keeps its original bytes when it is a JPEG (a second lossy
    encode would only cost quality); other formats are re-encoded so a resized dataset is
    uniformly JPEG.
    """
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as im:
        fmt = im.format
        w, h = im.size
        if min(w, h) <= short_edge and fmt == "JPEG":
            return data, "jpg"
        if min(w, h) > short_edge:
            # draft() lets libjpeg decode at 1/2, 1/4, 1/8 scale: most of a big downscale's cost.
            im.draft("RGB", (max(1, w * short_edge // min(w, h)), max(1, h * short_edge // min(w, h))))
        img = ImageOps.exif_transpose(im)
        if img.mode != "RGB":
            img = img.convert("RGB")
        scale = short_edge / min(w, h)
        if scale < 1:
            # The target comes from the original size: draft() may have rounded the decoded one.
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            if (img.size[0] > img.size[1]) != (w > h):  # exif_transpose turned it by 90 degrees
                size = (size[1], size[0])
            img = img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        return buf.getvalue(), "jpg"


def load_image(url: str, resize: int | None = None) -> tuple[bytes, str]:
    """Read an image through fsspec; raises FileNotFoundError or ValueError (not an image)."""
    from PIL import Image, UnidentifiedImageError

    data = read_bytes(url)
    if resize:
        try:
            return resize_short_edge(data, resize)
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ValueError(f"not a readable image ({e})") from None
    try:
        # Only the header is parsed: cheap, and enough to reject HTML error pages and truncations
        # of the first bytes; the pixels are decoded by the trainer.
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"not a readable image ({e})") from None
    if fmt not in _PIL_EXT:
        raise ValueError(f"image format {fmt} is not one of JPEG, PNG, WEBP")
    return data, _PIL_EXT[fmt]


def fetch_image(task: tuple) -> tuple:
    """Pool worker: `(url, resize, *payload)` -> `(status, bytes_or_message, ext, *payload)`.

    status is "ok", "missing" or "bad"; the payload (labels, line numbers) rides along so that
    the ordered pool output needs no lookup table in the parent.
    """
    url, resize, *payload = task
    try:
        data, ext = load_image(url, resize)
    except FileNotFoundError:
        return ("missing", f"image not found: {url}", "", *payload)
    except ValueError as e:
        return ("bad", f"{url}: {e}", "", *payload)
    return ("ok", data, ext, *payload)


def merge_target(out: str, classes: Sequence[ClassInfo], split: str) -> Manifest | None:
    """The root's existing manifest (for `write_dataset(keep=...)`), or None for a new root."""
    try:
        if not exists(join(out, "dataset.json")):
            return None
        old = read_manifest(out)
    except FileNotFoundError:
        return None
    except ManifestError as e:
        raise ManifestError(f"{e}; cannot add split {split!r} to it (remove it or write elsewhere)") from None
    if [c.id for c in old.classes] != [c.id for c in classes]:
        raise ManifestError(
            f"{join(out, 'dataset.json')}: existing dataset has {old.num_classes} classes that differ from "
            f"the {len(classes)} classes of this conversion; cannot add split {split!r} to it"
        )
    return old


ImageTask = tuple[str, str, list[int], list[int], "list[int] | None", str]
"""(image url, sample key, pos, neg, true or None, where: file:line or image id for reports)."""


def image_records(
    tasks: Iterable[ImageTask],
    *,
    resize: int | None,
    workers: int,
    report: ConversionReport,
    desc: str,
    progress: bool,
    total: int | None = None,
) -> Iterator[Record]:
    """Fetch (and resize) the images of `tasks` in a process pool; yield complete records.

    A missing or unreadable image is a problem in the report and its sample is skipped. The
    pool is ordered and bounded (`parallel_map`), so memory holds a window of images, not the
    dataset, and the output order is the input order.
    """
    from tqdm import tqdm

    def pool_tasks() -> Iterator[tuple]:
        for url, key, pos, neg, true, where in tasks:
            try:
                validate_key(key)
            except LabelError as e:
                report.problem("bad sample key", where, str(e))
                continue
            yield (url, resize, key, pos, neg, true, where)

    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar, closing(
        parallel_map(fetch_image, pool_tasks(), workers)
    ) as results:
        for status, data, ext, key, pos, neg, true, where in results:
            bar.update(1)
            if status == "missing":
                report.problem("missing image", where, data)
                continue
            if status == "bad":
                report.problem("unreadable image", where, data)
                continue
            report.count("images written")
            yield Record(key=key, image=data, pos=pos, neg=neg, ext=ext, true=true)


def write_split(
    out: str,
    classes: Sequence[ClassInfo],
    split: str,
    records: Iterable[Record],
    *,
    shard_samples: int,
    source: str,
    split_meta: dict[str, object],
) -> Manifest:
    """Write one split into `out`, keeping the other splits of an existing root there.

    The manifest's meta records, per split, how it was converted (`conversions.<split>`).
    """
    keep = merge_target(out, classes, split)
    conversions = dict(keep.meta.get("conversions", {})) if keep is not None else {}  # type: ignore[call-overload]
    conversions[split] = split_meta
    meta = {"source": source, "conversions": conversions}
    return write_dataset(out, classes, {split: records}, shard_samples=shard_samples, meta=meta, keep=keep)
