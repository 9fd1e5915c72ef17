"""Reading one shard: its samples start..stop-1, each exactly once, never unpickling anything.

Each DataLoader worker streams the shards of its plan in order through fsspec
(`storage.open_file`: local paths, s3:// through s3fs with botocore retries, any other URL) and
the standard `tarfile` stream reader, grouping consecutive members by key the way webdataset
does (`<key>.<ext>`, key up to the first dot of the base name). Only the image (`.jpg`,
`.jpeg`, `.png`, `.webp`) and `.json` members are read; everything else is skipped unread and
nothing is ever unpickled, whatever a member's extension. webdataset's own pipeline is not used
because its decoders would unpickle `.pyd`/`.pkl` members and its error handling cannot say
which planned sample was lost; a sample's index is its order of appearance in the shard, which
is what the plan addresses. Opening a shard retries transient OSErrors with back-off, and an
OSError in the middle of a stream reopens the shard and skips to where it was.
"""

from __future__ import annotations

import logging
import tarfile
import time
from dataclasses import dataclass
from typing import Any, Iterator

from .format import IMAGE_EXTS
from .storage import open_file

__all__ = ["RawSample", "ShardReadError", "iter_shard"]

log = logging.getLogger(__name__)

_WANTED = frozenset(IMAGE_EXTS) | {"json"}
_RETRY_BASE_S = 0.5  # first back-off; doubles per attempt, capped at 8 s


class ShardReadError(OSError):
    """A shard that cannot be opened or read after retries."""


@dataclass(slots=True)
class RawSample:
    key: str | None
    members: dict[str, bytes]
    error: str | None = None
    logged: bool = False


def _split_name(name: str) -> tuple[str | None, str]:
    # Same rule as webdataset's base_plus_ext: the key runs to the first dot of the base name.
    base_at = name.rfind("/") + 1
    dot = name.find(".", base_at)
    if dot <= base_at:
        return None, ""
    return name[:dot], name[dot + 1 :].lower()


def _open(url: str, retries: int) -> Any:
    for attempt in range(retries + 1):
        try:
            return open_file(url)
        except (FileNotFoundError, PermissionError) as e:
            raise ShardReadError(f"shard {url}: cannot open ({type(e).__name__}: {e})") from None
        except OSError as e:
            if attempt == retries:
                raise ShardReadError(f"shard {url}: cannot open after {retries + 1} attempts ({e})") from e
            time.sleep(min(_RETRY_BASE_S * 2**attempt, 8.0))
    raise AssertionError("unreachable")


def _groups(f: Any, start: int, stop: int, max_member_bytes: int) -> Iterator[tuple[int, RawSample]]:
    """(index, raw) for member groups start..stop-1; groups before start are skipped unread."""
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
            if cur is not None and g >= start:
                yield g, cur
            g, cur = g + 1, RawSample(key, {})
            if g >= stop:
                return
        if g < start or ext not in _WANTED:
            continue  # tarfile skips the data of members we do not extract
        if ext in cur.members:
            cur.error = f"duplicate member {ti.name!r}"
        elif ti.size > max_member_bytes:
            cur.error = f"member {ti.name!r} is {ti.size} bytes (limit {max_member_bytes})"
        else:
            fobj = tf.extractfile(ti)
            assert fobj is not None
            cur.members[ext] = fobj.read()
    if cur is not None and start <= g < stop:
        yield g, cur


def iter_shard(
    url: str, start: int, stop: int, *, max_member_bytes: int = 64 << 20, retries: int = 3
) -> Iterator[tuple[int, RawSample]]:
    """Samples start..stop-1 of a shard, each exactly once and in order.

    Samples a corrupt or truncated tar lost (or that the shard simply lacks) come out with
    `error` set, so the caller's policy sees every planned sample.
    """
    nxt, attempt, lost = start, 0, None
    last_key: str | None = None
    while nxt < stop:
        f = _open(url, retries)
        try:
            for i, raw in _groups(f, nxt, stop, max_member_bytes):
                nxt, last_key = i + 1, raw.key
                yield i, raw
            if nxt < stop:
                lost = f"tar ends after {nxt} samples (after key {last_key!r}), manifest says at least {stop}"
            break
        except tarfile.TarError as e:
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
