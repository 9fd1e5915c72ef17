"""Reading shards: the project's one tar reader and one sample validator.

Training (`stream.py`), the prior pass, `verify` and `inspect` all read tars here, so "ok" from
verify means the stream reads every listed sample, with the same grouping, the same duplicate
rule, the same size caps and the same formats.

Each reader streams a shard through fsspec (`storage.open_file`: local paths, s3:// through
s3fs with botocore retries, any other URL) and the standard `tarfile` stream reader, grouping
consecutive members by key the way webdataset does (`<key>.<ext>`, the key running to the
first dot of the base name; a key that comes back later is a new sample). Only the image
(`.jpg`, `.jpeg`, `.png`, `.webp`) and `.json` members are read, each under a size cap;
everything else is skipped unread and nothing is ever unpickled, whatever a member's extension.
webdataset's own pipeline is not used because its decoders would unpickle `.pyd`/`.pkl`
members and its error handling cannot say which planned sample was lost; a sample's index is
its order of appearance in the shard, which is what the plan addresses. Opening a shard retries
transient OSErrors with back-off, and an OSError in the middle of a stream reopens the shard
and skips to where it was. A local shard must be a regular file: a manifest (or a symlink)
pointing at a device would otherwise stream forever.
"""

from __future__ import annotations

import logging
import os
import stat
import tarfile
import time
from dataclasses import dataclass
from typing import IO, Any, Callable, Iterator

from .format import IMAGE_EXTS, MAX_LABEL_BYTES, LabelError, decode_labels
from .storage import is_remote, open_file

__all__ = ["RawSample", "SampleError", "ShardReadError", "iter_groups", "iter_shard", "open_shard", "sample_parts"]

log = logging.getLogger(__name__)

_WANTED = frozenset(IMAGE_EXTS) | {"json"}
_RETRY_BASE_S = 0.5  # first back-off; doubles per attempt, capped at 8 s
MAX_MEMBER_BYTES = 64 << 20


class ShardReadError(OSError):
    """A shard that cannot be opened or read after retries; `missing`: the file does not exist."""

    def __init__(self, message: str, *, missing: bool = False):
        super().__init__(message)
        self.missing = missing


class SampleError(ValueError):
    """A sample that cannot be used: a member missing or too large, labels that break the
    contract, or a sample the tar lost. The message names the shard and key."""


@dataclass(slots=True)
class RawSample:
    key: str | None
    members: dict[str, bytes]
    error: str | None = None
    logged: bool = False
    last: bool = False  # the tar ends after this sample


def _split_name(name: str) -> tuple[str | None, str]:
    # Same rule as webdataset's base_plus_ext: the key runs to the first dot of the base name.
    base_at = name.rfind("/") + 1
    dot = name.find(".", base_at)
    if dot <= base_at:
        return None, ""
    return name[:dot], name[dot + 1 :].lower()


def open_shard(url: str, retries: int = 3) -> Any:
    """Open a shard for streaming, retrying transient errors; ShardReadError names it."""
    if not is_remote(url):
        try:
            mode = os.stat(url).st_mode
        except FileNotFoundError as e:
            raise ShardReadError(f"shard {url}: cannot open (FileNotFoundError: {e})", missing=True) from None
        except OSError:
            mode = stat.S_IFREG  # let the open below report it
        if not stat.S_ISREG(mode):
            raise ShardReadError(f"shard {url}: not a regular file")
    for attempt in range(retries + 1):
        try:
            return open_file(url)
        except FileNotFoundError as e:
            raise ShardReadError(f"shard {url}: cannot open (FileNotFoundError: {e})", missing=True) from None
        except (PermissionError, IsADirectoryError) as e:
            raise ShardReadError(f"shard {url}: cannot open ({type(e).__name__}: {e})") from None
        except OSError as e:
            if attempt == retries:
                raise ShardReadError(f"shard {url}: cannot open after {retries + 1} attempts ({e})") from e
            time.sleep(min(_RETRY_BASE_S * 2**attempt, 8.0))
    raise AssertionError("unreachable")


def iter_groups(
    f: IO[bytes], start: int = 0, stop: int | None = None, max_member_bytes: int = MAX_MEMBER_BYTES
) -> Iterator[tuple[int, RawSample]]:
    """(index, raw) for every member group of a tar stream, in order.

    Members of groups outside [start, stop) are not read (their `members` stay empty), so a
    caller can count or skip groups for the price of their headers. Raises tarfile.TarError or
    EOFError on a corrupt or truncated tar, OSError on a read failure.
    """
    tf = tarfile.open(fileobj=f, mode="r|")
    g, cur = -1, None
    for ti in tf:
        tf.members = []  # a streaming TarFile otherwise keeps every header it has seen
        if not ti.isreg():
            continue
        key, ext = _split_name(ti.name)
        if key is None:
            continue
        if cur is None or key != cur.key:
            if cur is not None:
                yield g, cur
            g, cur = g + 1, RawSample(key, {})
        if g < start or (stop is not None and g >= stop) or ext not in _WANTED:
            continue  # tarfile skips the data of members we do not extract
        cap = MAX_LABEL_BYTES if ext == "json" else max_member_bytes
        if ext in cur.members:
            cur.error = cur.error or f"duplicate member {ti.name!r}"
        elif ti.size > cap:
            cur.error = cur.error or f"member {ti.name!r} is {ti.size} bytes (limit {cap})"
        else:
            fobj = tf.extractfile(ti)
            assert fobj is not None
            cur.members[ext] = fobj.read()
    if cur is not None:
        cur.last = True
        yield g, cur


def sample_parts(raw: RawSample, num_classes: int, where: str) -> tuple[bytes, list[int], list[int]]:
    """(image bytes, pos, neg) of a sample, or SampleError: the one rule for a usable sample."""
    if raw.error:
        raise SampleError(f"{where}: {raw.error}")
    images = [e for e in IMAGE_EXTS if e in raw.members]
    if len(images) != 1 or "json" not in raw.members:
        have = ", ".join(sorted(raw.members)) or "none"
        raise SampleError(f"{where}: needs one image member (.jpg/.png/.webp) and a .json member (has: {have})")
    try:
        pos, neg, _ = decode_labels(raw.members["json"], num_classes, where)
    except LabelError as e:
        raise SampleError(str(e)) from None
    return raw.members[images[0]], pos, neg


def iter_shard(
    url: str, start: int, stop: int, *, max_member_bytes: int = MAX_MEMBER_BYTES, retries: int = 3,
    at_end: Callable[[str], None] | None = None,
) -> Iterator[tuple[int, RawSample]]:
    """Samples start..stop-1 of a shard, each exactly once and in order.

    Samples a corrupt or truncated tar lost (or that the shard simply lacks) come out with
    `error` set, so the caller's policy sees every planned sample. With `at_end` (the caller
    expects `stop` to be the shard's last sample), a shard holding more samples than that is
    reported through `at_end(message)` instead of being read as a silent prefix.
    """
    nxt, attempt, lost = start, 0, None
    last_key: str | None = None
    while nxt < stop:
        f = open_shard(url, retries)
        try:
            groups = iter_groups(f, nxt, stop, max_member_bytes)
            for i, raw in groups:
                if i < nxt:
                    continue
                if i == stop - 1 and at_end is not None and not raw.last:
                    # checked before the yield: a consumer may never ask for more after this one
                    at_end(f"shard {url}: holds more than the {stop} samples the manifest lists; "
                           "the manifest does not match the shard")
                nxt, last_key = i + 1, raw.key
                yield i, raw
                if nxt == stop:
                    break
            if nxt < stop:
                lost = f"tar ends after {nxt} samples (after key {last_key!r}), manifest says at least {stop}"
            break
        except (tarfile.TarError, EOFError) as e:
            lost = f"tar is corrupt or truncated after sample {nxt} (after key {last_key!r}): {e}"
            break
        except OSError as e:
            attempt += 1
            if attempt > retries:
                raise ShardReadError(f"shard {url}: read failed after {retries} retries at sample {nxt} ({e})") from e
            log.warning("shard %s: read error at sample %d (%s); reopening", url, nxt, e)
            time.sleep(min(_RETRY_BASE_S * 2**attempt, 8.0))
        finally:
            f.close()
    if nxt < stop:
        log.warning("shard %s: %s; %d planned samples lost", url, lost, stop - nxt)
        for i in range(nxt, stop):
            yield i, RawSample(None, {}, lost, logged=True)
