"""What every converter of real data shares: problem reports, image fetching, split merging.

Real annotation files are never clean: unknown class ids, rows that contradict each other,
images that were never downloaded. A converter must neither crash on the first such row of a
40-million-row file nor quietly fold it into the labels. So every converter counts problems by
kind in a `ConversionReport`, keeps a few examples of each (file and line, or image id) for the
person who has to fix the data, prints a summary at the end, and in strict mode raises on the
first problem instead.

Images are fetched and (optionally) resized inside the task that builds their shard
(`fetch_records`, run by `convert.build_shard` in-process or as a Ray task): a few reads in
flight on threads hide network latency, decoding stays in order. Whatever goes wrong with one
image (not there, not an image, a decompression bomb, a host that does not answer) is a
problem of that image, counted and skipped; one bad file among millions must not cost the whole
conversion. A remote read gets a few tries with backoff first, since a dropped connection says
nothing about the image (S3 is left to botocore's own standard-mode retries; `anon` reads a
public bucket unsigned). Without a resize the original bytes are kept: re-encoding a JPEG costs
quality and CPU for nothing. `convert_images` cuts a converter's image tasks into shard jobs
and runs them (`convert.run_conversion`: resumable, Ray or in-process).

Image locations come from the annotation files, which are input like any other: a `file_name`
of `../../home/me/.ssh/id_rsa` or `/etc/shadow` must not pack a file from outside `--images`.
`image_url` therefore accepts only relative, '/'-separated names without '..', ':' (a scheme, or
fsspec's `::` chaining) or control characters, and raises `BadImageName` for the image.

Credentials ride in URLs (`https://user:password@host/...`, signed `?X-Amz-Signature=` query
strings). Every location that goes into a report, a manifest or an error message passes
through `storage.redact` first.

`merge_target` lets a converter write one split into a root that already holds others
(`--split val` after `--split train`): the existing manifest's other splits are kept, and a
different class list is refused rather than silently producing a root whose label indices
mean two things.
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import re
import reprlib
import time
import zlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

from ..format import ClassInfo, LabelError, Manifest, ManifestError, Record, validate_key
from ..storage import exists, get_fs, is_remote, join, read_bytes, read_manifest, redact
from ..writer import check_split_name

__all__ = [
    "ConversionError",
    "ConversionReport",
    "BadImageName",
    "short_repr",
    "input_fault",
    "check_images",
    "image_url",
    "fetch_image",
    "read_image_bytes",
    "decode_image",
    "load_image",
    "resize_short_edge",
    "merge_target",
    "ImageTask",
    "fetch_records",
    "input_identity",
    "convert_images",
]

_PIL_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}

# A remote image read: tries in all, and the first pause (doubled after each failure).
FETCH_ATTEMPTS = 3
FETCH_BACKOFF_S = 0.5

_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")

_short = reprlib.Repr()
_short.maxstring = _short.maxother = 80
_short.maxlist = _short.maxdict = _short.maxtuple = 4
_short.maxlevel = 2


def short_repr(value: object) -> str:
    """`repr` bounded in length and depth: for quoting a bad value of a huge input file."""
    return _short.repr(value)


class ConversionError(ValueError):
    """A problem in the input that stops the conversion (in strict mode, the first problem of
    any kind); the message names file and line or image, and what."""


class BadImageName(ValueError):
    """An image's file name or id would point outside the images location (or is no name)."""


def input_fault(e: BaseException) -> str | None:
    """What is wrong with an input file's content, for an exception raised while reading it;
    None when the exception is not about the content (a network failure, a missing file).

    gzip raises EOFError on a truncated file (which click would turn into a bare "Aborted"),
    bz2 a plain OSError; both mean a bad file, not a failed run.
    """
    if isinstance(e, UnicodeDecodeError):
        return f"not UTF-8 text ({e.reason} at byte 0x{e.object[e.start]:02x})"
    if isinstance(e, (EOFError, zlib.error, lzma.LZMAError, gzip.BadGzipFile)):
        return f"truncated or corrupt compressed file ({type(e).__name__}: {e})"
    if type(e) is OSError and e.errno is None and "data stream" in str(e):  # bz2
        return f"truncated or corrupt compressed file ({e})"
    return None


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
        """Record one problem; in strict mode raise it instead. URLs in it lose their credentials."""
        if self.strict:
            raise ConversionError(redact(f"{where}: {what} ({kind}; strict mode stops at the first problem)"))
        self.problem_counts[kind] = self.problem_counts.get(kind, 0) + 1
        ex = self.examples.setdefault(kind, [])
        if len(ex) < self.max_examples:
            ex.append(redact(f"{where}: {what}"))

    @property
    def problems(self) -> int:
        return sum(self.problem_counts.values())

    def get(self, name: str) -> int:
        return self.counts.get(name, self.problem_counts.get(name, 0))

    def brief(self) -> str:
        """The problems on one line, for an error message."""
        if not self.problem_counts:
            return "no problems found"
        kinds = sorted(self.problem_counts.items(), key=lambda kv: -kv[1])
        first = self.examples.get(kinds[0][0], [""])[0]
        return f"{self.problems} problem(s): " + ", ".join(f"{k} {v}" for k, v in kinds) + (f"; e.g. {first}" if first else "")

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


def _check_name(field_name: str, value: str, remote: bool) -> None:
    why = None
    if not isinstance(value, str) or not value:
        why = "is not a file name"
    elif value.startswith("/") or "\\" in value or ":" in value or _CONTROL_RE.search(value):
        why = "must be a relative '/'-separated name without ':', '\\' or control characters"
    elif ".." in value.split("/"):
        why = "has a '..' component: it would leave the images location"
    elif remote and any(ch in value for ch in "?#%"):
        # In a URL these would start a query or fragment, or %2e%2e decode to '..'.
        why = "has '?', '#' or '%', which would change the meaning of the image URL"
    if why:
        raise BadImageName(f"{field_name} {short_repr(value)} {why}")


def image_url(images: str, **fields: str) -> str:
    """The location of one image: a template with `{id}`/`{file_name}`, or a folder/prefix.

    Raises `BadImageName` when a field value could leave `images` (see the module docstring),
    ValueError for a template naming a field that is not there.
    """
    remote = is_remote(images)
    for k, v in fields.items():
        _check_name(k, v, remote)
    if "{" in images:
        try:
            return images.format(**fields)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"image template {redact(images)!r}: bad or unknown field ({e}); available: "
                + ", ".join("{" + k + "}" for k in fields)
            ) from None
    name = fields.get("file_name") or f"{fields['id']}.jpg"
    if is_remote(images):
        return images.rstrip("/") + "/" + name
    return os.path.join(images, name)


def check_images(images: str, **example: str) -> None:
    """Fail before the output root is touched when `images` cannot work for any image: a bad
    template, a protocol fsspec does not know or lacks the package for, a folder not there."""
    url = image_url(images, **example)
    try:
        get_fs(url)
    except ValueError as e:
        raise ValueError(f"--images {redact(images)!r}: {redact(str(e))}") from None
    if "://" not in images and "{" not in images and not os.path.isdir(images):
        raise FileNotFoundError(f"--images {images!r}: no such folder")


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


def _transient(e: Exception) -> bool:
    """Worth another try: not an answer about the object itself (gone, forbidden, bad request)."""
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    status = getattr(e, "status", None) or getattr(e, "code", None)  # aiohttp / urllib HTTP errors
    return not (isinstance(status, int) and 400 <= status < 500 and status not in (408, 429))


def read_image_bytes(url: str, anon: bool = False) -> bytes:
    """The bytes of one image; a remote read (other than S3) is retried with backoff; S3
    (`anon`: unsigned, for public buckets) is left to botocore's standard-mode retries.

    An S3 image is one GET: s3fs's default first asks for the size (a HEAD) to split big
    objects into parallel ranges, which for images doubles the requests (and a public bucket
    may allow GetObject only)."""
    if url.startswith(("s3://", "s3a://")):
        fs, path = get_fs(url, anon)
        return fs.cat_file(path, max_concurrency=1)
    attempts = FETCH_ATTEMPTS if is_remote(url) else 1
    for attempt in range(attempts - 1):
        try:
            return read_bytes(url, anon)
        except Exception as e:
            if not _transient(e):
                raise
        time.sleep(FETCH_BACKOFF_S * 2**attempt)
    return read_bytes(url, anon)


def decode_image(data: bytes, resize: int | None = None) -> tuple[bytes, str]:
    """Check (and optionally resize) encoded image bytes; ValueError when they are no usable image.

    Any exception of the decoder is a property of these bytes, including PIL's
    DecompressionBombError for an image declaring more than 2 x `Image.MAX_IMAGE_PIXELS`.
    """
    from PIL import Image

    try:
        if resize:
            return resize_short_edge(data, resize)
        # Only the header is parsed: cheap, and enough to reject HTML error pages, truncations
        # of the first bytes and decompression bombs; the pixels are decoded by the trainer.
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
    except Image.DecompressionBombError as e:
        raise ValueError(f"decompression bomb refused ({e})") from None
    except Exception as e:
        raise ValueError(f"not a readable image ({type(e).__name__}: {e})") from None
    if fmt not in _PIL_EXT:
        raise ValueError(f"image format {fmt} is not one of JPEG, PNG, WEBP")
    return data, _PIL_EXT[fmt]


def load_image(url: str, resize: int | None = None) -> tuple[bytes, str]:
    """Read an image through fsspec; raises FileNotFoundError, ValueError (not a usable
    image) or whatever the read raised after its retries."""
    return decode_image(read_image_bytes(url), resize)


def fetch_image(task: tuple) -> tuple:
    """Pool worker: `(url, resize, *payload)` -> `(status, bytes_or_message, ext, *payload)`.

    status is "ok", "missing", "bad" (not a usable image) or "unreachable" (the read failed);
    messages carry no credentials. The payload (labels, line numbers) rides along so that the
    ordered pool output needs no lookup table in the parent.
    """
    url, resize, *payload = task
    try:
        data = read_image_bytes(url)
    except FileNotFoundError:
        return ("missing", f"image not found: {redact(url)}", "", *payload)
    except Exception as e:
        status = "unreachable" if is_remote(url) else "bad"
        why = redact(f"{type(e).__name__}: {e}")
        tries = f" after {FETCH_ATTEMPTS} tries" if status == "unreachable" and _transient(e) else ""
        return (status, f"{redact(url)}: cannot read{tries} ({why})"[:500], "", *payload)
    try:
        data, ext = decode_image(data, resize)
    except Exception as e:
        return ("bad", redact(f"{url}: {e}")[:500], "", *payload)
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


_FETCH_PROBLEMS = {"missing": "missing image", "bad": "unreadable image", "unreachable": "unreachable image"}

ImageTask = tuple[str, str, list[int], list[int], "list[int] | None", str]
"""(image url, sample key, pos, neg, true or None, where: file:line or image id for reports)."""

_READ_AHEAD = 16  # image reads in flight inside one shard task: hides S3/HTTP latency behind the decode
_READ_THREADS = 8


def _read_one(url: str, anon: bool) -> tuple[str, object]:
    try:
        return "ok", read_image_bytes(url, anon)
    except FileNotFoundError:
        return "missing", f"image not found: {redact(url)}"
    except Exception as e:
        status = "unreachable" if is_remote(url) else "bad"
        why = redact(f"{type(e).__name__}: {e}")
        tries = f" after {FETCH_ATTEMPTS} tries" if status == "unreachable" and _transient(e) else ""
        return status, f"{redact(url)}: cannot read{tries} ({why})"[:500]


def fetch_records(entries: list[ImageTask], opts: dict, report: ConversionReport) -> Iterator[Record]:
    """A shard task's records: its images read a few at a time in threads (I/O), decoded and
    resized here in order; a missing, unreachable or unusable image is a reported problem."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    resize, anon = opts.get("resize"), bool(opts.get("anon"))
    with ThreadPoolExecutor(max_workers=min(_READ_THREADS, max(1, len(entries)))) as ex:
        it = iter(entries)
        window: deque = deque()
        for e in it:
            window.append((e, ex.submit(_read_one, e[0], anon)))
            if len(window) >= _READ_AHEAD:
                break
        while window:
            (url, key, pos, neg, true, where), fut = window.popleft()
            nxt = next(it, None)
            if nxt is not None:
                window.append((nxt, ex.submit(_read_one, nxt[0], anon)))
            status, data = fut.result()
            ext = ""
            if status == "ok":
                try:
                    data, ext = decode_image(data, resize)  # type: ignore[arg-type]
                except Exception as err:
                    status, data = "bad", redact(f"{url}: {err}")[:500]
            if status != "ok":
                report.problem(_FETCH_PROBLEMS[status], where, str(data))
                continue
            report.count("images written")
            yield Record(key=key, image=data, pos=pos, neg=neg, ext=ext, true=true)  # type: ignore[arg-type]


def input_identity(url: str) -> str:
    """Size and modification stamp (mtime, or the object's ETag) of an input file: what a
    resumed conversion compares to notice that its input was replaced."""
    try:
        fs, path = get_fs(url)
        info = fs.info(path)
    except Exception:  # reading the file itself will say what is wrong with it
        return "not readable"
    stamp = info.get("ETag") or info.get("mtime") or info.get("LastModified") or info.get("last_modified") or ""
    return f"{info.get('size')} bytes, {str(stamp).strip(chr(34))}"


def convert_images(
    out: str,
    classes: Sequence[ClassInfo],
    split: str,
    tasks: Iterable[ImageTask],
    *,
    resize: int | None,
    anon: bool = False,
    shard_samples: int,
    source: str,
    split_meta: dict[str, object],
    settings: dict[str, object],
    report: ConversionReport,
    workers: int | None = 0,
    overwrite: bool = False,
    progress: bool = True,
    total: int | None = None,
) -> Manifest:
    """Convert one split of image tasks into `out`, keeping the other splits of an existing root.

    The tasks are cut into shard jobs of `shard_samples` images (`convert.cut_jobs`; a bad
    sample key is reported and dropped here, on the driver, so the cut stays deterministic);
    each job is built by `convert.build_shard` (in-process, or as a Ray task with workers != 0).
    The manifest's meta records, per split, how it was converted (`conversions.<split>`), its
    strings redacted, so no credential in an input URL reaches `dataset.json`.
    """
    from ..convert import SplitPlan, cut_jobs, run_conversion

    check_split_name(split)
    keep = merge_target(out, classes, split)
    conversions = dict(keep.meta.get("conversions", {})) if keep is not None else {}  # type: ignore[call-overload]
    conversions[split] = {k: redact(v) if isinstance(v, str) else v for k, v in split_meta.items()}
    meta = {**(keep.meta if keep is not None else {}), "source": source, "conversions": conversions}

    def entries() -> Iterator[ImageTask]:
        for url, key, pos, neg, true, where in tasks:
            try:
                validate_key(key)
            except LabelError as e:
                report.problem("bad sample key", where, str(e))
                continue
            yield url, key, pos, neg, true, where

    plan_settings = {k: redact(v) if isinstance(v, str) else v for k, v in settings.items()}
    plan_settings.update({"source": source, "resize": resize, "shard_samples": shard_samples})
    plan = SplitPlan(jobs=cut_jobs(split, entries(), shard_samples, fetch_records), settings=plan_settings, images=total)
    return run_conversion(out, classes, {split: plan}, source=source, opts={"resize": resize, "anon": anon},
                          meta=meta, report=report, keep=keep, workers=workers, overwrite=overwrite, progress=progress)
