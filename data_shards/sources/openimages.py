"""OpenImages V6 converter: the human-verified image-level label CSV to shards.

Input: `ImageID,Source,LabelName,Confidence` rows (Confidence 1 a verified positive, 0 a
verified negative), tens of millions of them. The CSV is streamed with `csv.reader` and rows
are grouped by consecutive ImageID (the official file is sorted by ImageID), so labels in
memory are those of one image plus the shard jobs in flight (ids and labels only: the images
are read by the tasks that build the shards, `convert.py`), never the file.

Detecting an ImageID that comes back after another one ("ungrouped rows") needs a memory of
the ids already seen, but only once the file turns out unsorted: while every ImageID is
greater than the one before (the official file is sorted) nothing is kept and memory stays
flat. The first id that is not re-reads the rows before it once (ids only) and from then on
`_SeenIds` keeps 64-bit hashes in a sorted numpy array (8 bytes per image, about 72 MB at 9 M;
a dict of 9 M strings would cost about 1 GB).
A reappearing group is dropped and each of its rows counted: emitting it would write the
same key twice with half of its labels each time.

Every other irregularity is counted in the `ConversionReport` with file:line examples and
never reaches the labels: a row with the wrong number of columns, a confidence other than 0 or
1, a LabelName outside the class list (`skip_unknown=True` turns these into a plain count: the
verified CSV covers ~20 k classes, the trainable list 9.6 k), an exact duplicate row (kept
once), a class both 1 and 0 for one image (dropped for that image), a missing or unreadable
image. `strict=True` raises `ConversionError` at the first of them instead.

A file that cannot be read as UTF-8 CSV (a bad byte, a truncated .gz, a field over the csv
module's 128 KiB limit, an unterminated quote running to the end) stops the conversion with a
`ConversionError` naming file:line: past such a point the rows cannot be trusted, and the
person fixing the file needs the place. An ImageID that would leave `--images` (`../x`) is a
"bad file name" problem of that image.

Classes: a descriptions CSV (`LabelName,DisplayName`, header optional: a MID never contains a
comma) or one MID per line, names then from `descriptions` or the MID itself. The class file's
order is the class index order. Display names repeat in the official vocabulary; classes are
keyed by MID only.
"""

from __future__ import annotations

import csv
from contextlib import closing, contextmanager
from typing import Callable, Iterator

import fsspec
import numpy as np

from ..format import ClassInfo, Manifest
from ..storage import redact, storage_options
from .common import (
    BadImageName,
    ConversionError,
    ConversionReport,
    ImageTask,
    check_images,
    convert_images,
    image_url,
    input_fault,
    input_identity,
)

__all__ = ["load_classes", "read_label_groups", "build_openimages"]

_COLUMNS = ("ImageID", "Source", "LabelName", "Confidence")


def _open_text(url: str):
    # compression="infer" so that a .csv.gz or .csv.bz2 downloaded as is also streams.
    return fsspec.open(url, "rt", encoding="utf-8-sig", newline="", compression="infer", **storage_options(url))


def _first_bad_utf8_line(url: str) -> int | None:
    # A text stream decodes 8 KiB chunks, so its error can come lines before the bad byte; on
    # that (rare) path the file is read again line by line to name the right one.
    try:
        with fsspec.open(url, "rb", compression="infer", **storage_options(url)) as f:
            for n, raw in enumerate(f, 1):
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    return n
    except Exception:
        return None
    return None


@contextmanager
def _naming_errors(url: str, lines_read: Callable[[], int]) -> Iterator[None]:
    """A failure to read the text input `url` becomes a ConversionError naming file:line."""
    try:
        yield
    except csv.Error as e:  # found on the last line read
        raise ConversionError(f"{redact(url)}:{lines_read()}: not a readable CSV row ({e})") from None
    except UnicodeDecodeError as e:
        line = _first_bad_utf8_line(url) or lines_read() + 1
        raise ConversionError(f"{redact(url)}:{line}: {input_fault(e)}") from None
    except Exception as e:  # raised reading the next line
        fault = input_fault(e)
        if fault is None:
            raise
        raise ConversionError(f"{redact(url)}:{lines_read() + 1}: {fault}") from None


def _text_lines(url: str) -> Iterator[str]:
    n = 0
    with _open_text(url) as f, _naming_errors(url, lambda: n):
        for n, line in enumerate(f, 1):  # noqa: B007 (n is read by the lambda)
            yield line


def _csv_rows(url: str) -> Iterator[tuple[int, list[str]]]:
    """(line, row) of a CSV file, the line being the row's last; read errors name file:line."""
    with _open_text(url) as f:
        reader = csv.reader(f)
        with _naming_errors(url, lambda: reader.line_num):
            for row in reader:
                yield reader.line_num, row


def _read_descriptions(url: str) -> list[tuple[str, str]]:
    out = []
    for i, row in _csv_rows(url):
        if i == 1 and [c.strip() for c in row] == ["LabelName", "DisplayName"]:
            continue
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2 or not row[0].strip():
            raise ValueError(f"{redact(url)}:{i}: expected 'LabelName,DisplayName', got {row!r}"[:300])
        out.append((row[0].strip(), row[1].strip()))
    return out


def load_classes(classes_file: str, descriptions: str | None = None) -> list[ClassInfo]:
    """Classes in file order from a descriptions CSV or a one-MID-per-line list."""
    with closing(_text_lines(classes_file)) as lines:
        first = next(lines, "")
    if "," in first:
        pairs = _read_descriptions(classes_file)
    else:
        mids = [line.strip() for line in _text_lines(classes_file) if line.strip()]
        names = dict(_read_descriptions(descriptions)) if descriptions else {}
        pairs = [(m, names.get(m, m)) for m in mids]
    name = redact(classes_file)
    if not pairs:
        raise ValueError(f"{name}: no classes found")
    seen: set[str] = set()
    for mid, _ in pairs:
        if mid in seen:
            raise ValueError(f"{name}: class {mid!r} is listed twice"[:300])
        seen.add(mid)
    return [ClassInfo(id=m, name=n) for m, n in pairs]


class _SeenIds:
    """Membership of ImageIDs already emitted, at 8 bytes per id (see the module docstring)."""

    _BATCH = 1 << 16

    def __init__(self, earlier: Callable[[], Iterator[str]] | None = None) -> None:
        """`earlier` yields every id added so far (a re-read of the input): given, nothing is
        stored until the first id that is not greater than all before it."""
        self._sorted = np.empty(0, dtype=np.int64)
        self._recent: set[int] = set()
        self._max: str | None = None
        self._earlier = earlier

    def add(self, image_id: str) -> bool:
        """Remember `image_id`; True if it had been added before."""
        if self._earlier is not None:
            if self._max is None or image_id > self._max:
                self._max = image_id
                return False
            earlier, self._earlier = self._earlier, None
            for prev in earlier():
                self._remember(hash(prev))
        # str hash is salted per process but stable within it, which is all this needs; a
        # false "seen" needs a 64-bit collision (about n^2 / 2^65: 2e-6 at 9 M ids).
        h = hash(image_id)
        seen = False
        if self._max is not None and image_id <= self._max:
            if h in self._recent:
                seen = True
            elif self._sorted.size:
                i = int(np.searchsorted(self._sorted, h))
                seen = i < self._sorted.size and int(self._sorted[i]) == h
        if self._max is None or image_id > self._max:
            self._max = image_id
        if not seen:
            self._remember(h)
        return seen

    def _remember(self, h: int) -> None:
        self._recent.add(h)
        if len(self._recent) >= self._BATCH:
            new = np.fromiter(self._recent, dtype=np.int64, count=len(self._recent))
            new.sort()
            self._sorted = _merge_sorted(self._sorted, new)
            self._recent.clear()


def _ids_before(labels_csv: str, header: bool, ncols: int, col: int, stop: int) -> Iterator[str]:
    """The ImageIDs of the usable rows before line `stop`: what `read_label_groups` added."""
    with closing(_csv_rows(labels_csv)) as rows:
        for line, row in rows:
            if line >= stop:
                return
            if header:
                header = False
                continue
            if row and len(row) == ncols and row[col].strip():
                yield row[col].strip()


def _merge_sorted(old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """Merge two sorted int64 arrays into one new array: the result plus a 1-byte mask beside
    `old` at the peak (concatenate-then-sort would hold three copies)."""
    out = np.empty(old.size + new.size, dtype=np.int64)
    at = np.searchsorted(old, new) + np.arange(new.size)
    mask = np.ones(out.size, dtype=bool)
    mask[at] = False
    out[at] = new
    out[mask] = old
    return out


def _parse_confidence(text: str) -> int | None:
    t = text.strip()
    if t in ("1", "0"):
        return int(t)
    try:
        v = float(t)
    except ValueError:
        return None
    return int(v) if v in (0.0, 1.0) else None


def read_label_groups(
    labels_csv: str,
    class_index: dict[str, int],
    report: ConversionReport,
    *,
    skip_unknown: bool = False,
) -> Iterator[tuple[str, list[int], list[int], int]]:
    """Stream the label CSV as `(image_id, pos, neg, first_line)` per image, problems reported.

    A file that cannot be read on (see the module docstring) raises ConversionError at file:line.
    """
    name = redact(labels_csv)
    header, ncols, line = False, len(_COLUMNS), 0
    seen = _SeenIds(lambda: _ids_before(labels_csv, header, ncols, cols["ImageID"], line))
    cur: str | None = None
    cur_line = 0
    dropped = False  # the current group is a reappearance: its rows are not used
    labels: dict[int, int] = {}  # class -> confidence
    bad: set[int] = set()  # classes with contradictory rows in the current group

    def flush() -> tuple[str, list[int], list[int], int] | None:
        if cur is None or dropped:
            return None
        pos = sorted(c for c, v in labels.items() if v == 1 and c not in bad)
        neg = sorted(c for c, v in labels.items() if v == 0 and c not in bad)
        if not pos and not neg:
            report.count("images without usable labels")
            return None
        return cur, pos, neg, cur_line

    with closing(_csv_rows(labels_csv)) as rows:
        cols = {c: i for i, c in enumerate(_COLUMNS)}
        first = True
        for line, row in rows:
            if first:
                first = False
                names = [c.strip() for c in row]
                if set(_COLUMNS) <= set(names):
                    cols = {c: names.index(c) for c in _COLUMNS}
                    ncols, header = len(names), True
                    continue
                if any(n in _COLUMNS for n in names):
                    raise ConversionError(f"{name}:{line}: header {row!r} lacks columns {', '.join(_COLUMNS)}"[:300])
                report.problem("missing header", f"{name}:{line}", f"no header row; assuming {','.join(_COLUMNS)}")
                ncols = len(_COLUMNS)
            if not row:
                continue
            report.count("rows read")
            where = f"{name}:{line}"
            if len(row) != ncols:
                report.problem("malformed row", where, f"{len(row)} columns, expected {ncols}: {row!r}"[:200])
                continue
            image_id = row[cols["ImageID"]].strip()
            if not image_id:
                report.problem("malformed row", where, "empty ImageID")
                continue
            if image_id != cur:
                group = flush()
                if group is not None:
                    yield group
                cur, cur_line, labels, bad = image_id, line, {}, set()
                dropped = seen.add(image_id)
            if dropped:
                report.problem("ungrouped rows", where, f"ImageID {image_id} reappears after other images; row dropped")
                continue
            conf = _parse_confidence(row[cols["Confidence"]])
            if conf is None:
                report.problem("bad confidence", where, f"Confidence {row[cols['Confidence']]!r} is not 0 or 1")
                continue
            mid = row[cols["LabelName"]].strip()
            c = class_index.get(mid)
            if c is None:
                if skip_unknown:
                    report.count("rows of other classes skipped")
                else:
                    report.problem("unknown class", where, f"LabelName {mid!r} is not in the class list")
                continue
            if c in labels:
                if labels[c] == conf:
                    report.problem("duplicate row", where, f"{image_id} {mid} {conf} repeated; kept once")
                elif c not in bad:
                    bad.add(c)
                    report.problem("contradictory rows", where, f"{image_id} {mid} is both 1 and 0; label dropped")
                continue
            labels[c] = conf
        group = flush()
        if group is not None:
            yield group


def build_openimages(
    labels_csv: str,
    classes_file: str,
    images: str,
    out: str,
    *,
    split: str = "train",
    descriptions: str | None = None,
    strict: bool = False,
    resize: int | None = None,
    shard_samples: int = 1000,
    workers: int | None = 0,
    progress: bool = True,
    limit: int | None = None,
    skip_unknown: bool = False,
    anon: bool = False,
    overwrite: bool = False,
) -> tuple[Manifest, ConversionReport]:
    """Convert one split of OpenImages; `images` is a folder/URL prefix or a `{id}` template.

    workers: 0 in-process, N Ray tasks at a time, None all the cluster's CPUs (`convert.py`);
    a rerun resumes what a stopped one published; `anon` reads public S3 buckets unsigned.
    """
    if resize is not None and (isinstance(resize, bool) or not isinstance(resize, int) or resize < 1):
        raise ValueError(f"resize must be a positive short-edge size in pixels, got {resize!r}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    classes = load_classes(classes_file, descriptions)
    index = {c.id: i for i, c in enumerate(classes)}
    report = ConversionReport("openimages", strict=strict)
    check_images(images, id="x")  # a bad template fails here, before the root is touched
    name = redact(labels_csv)

    def tasks() -> Iterator[ImageTask]:
        with closing(read_label_groups(labels_csv, index, report, skip_unknown=skip_unknown)) as groups:
            for n, (image_id, pos, neg, line) in enumerate(groups):
                if limit is not None and n >= limit:
                    return
                where = f"{name}:{line} ImageID {image_id}"
                try:
                    url = image_url(images, id=image_id)
                except BadImageName as e:
                    report.problem("bad file name", where, str(e))
                    continue
                yield url, image_id, pos, neg, None, where

    split_meta = {"labels": labels_csv, "classes": classes_file, "images": images, "resize": resize}
    settings = {"labels": labels_csv, "labels file": input_identity(labels_csv), "images": images, "limit": limit,
                "skip_unknown": skip_unknown}
    manifest = convert_images(
        out, classes, split, tasks(), resize=resize, anon=anon, shard_samples=shard_samples, source="openimages",
        split_meta=split_meta, settings=settings, report=report, workers=workers, overwrite=overwrite,
        progress=progress, total=limit,
    )
    return manifest, report
