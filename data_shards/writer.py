"""Writing shards: records in, complete tar shards and a manifest out.

Guarantees, in the order a crash could break them:
1. A shard is assembled in a local temporary file, hashed while it is written, and only then
   published under its final name (rename, or one upload): no half shard is ever visible.
2. The root's manifest is never deleted and never lies. Split names are checked before
   anything is written. Splits that are not being written stay listed throughout. A split that
   is being rewritten is dropped from the manifest (by an atomic replace) just before its first
   new shard overwrites an old one, so a failure, a `--strict` stop or a kill part-way leaves
   every other split readable, and leaves the old split whole if no shard was published yet.
3. The new `dataset.json` is published last, by one atomic replace (or one upload), once every
   shard is published; a split with no samples is an error and publishes nothing. Shard files
   the new manifest does not list (left by an older, larger conversion or by a kill) are
   removed after it.

Tars are written with the standard `tarfile` module with fixed metadata (mtime 0, uid 0), so
the same records give byte-identical shards and the same sha256.

`write_dataset` writes records it is handed, in one process: for tests, benchmarks and small
tools. Converters build each shard in its own task instead (`convert.py`, one `ShardWriter`
per shard at a given `first_index`), so no process handles every image.
`parallel_map`'s worker processes die with their parent (Linux `PR_SET_PDEATHSIG`): a killed
map leaves no workers behind.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import tarfile
import tempfile
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np

from .format import (
    IMAGE_EXTS,
    ClassInfo,
    Manifest,
    ManifestError,
    Record,
    ShardInfo,
    SplitInfo,
    SplitStats,
    SplitTruth,
    encode_labels,
    validate_key,
    validate_labels,
)
from .storage import exists, get_fs, is_remote, join, publish_file, read_manifest, remove, write_manifest

__all__ = ["EmptySplitError", "carry_other_splits", "ShardWriter", "write_dataset", "parallel_map", "shard_name", "check_split_name",
           "stale_shards", "current_manifest", "without_split"]

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

_SHARD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)-\d{6}\.tar$")
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")


class EmptySplitError(ValueError):
    """A split with no samples to write: nothing is published."""


def check_split_name(split: str) -> str:
    if not isinstance(split, str) or not _SPLIT_RE.match(split):
        raise ValueError(f"split name {split!r}: use 1-64 letters, digits and '_' only")
    return split


def shard_name(split: str, index: int) -> str:
    return f"{split}/{split}-{index:06d}.tar"


class _HashingFile(io.RawIOBase):
    """File wrapper that hashes and counts what passes through it."""

    def __init__(self, f: io.BufferedWriter):
        self._f = f
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.nbytes

    def write(self, b) -> int:  # type: ignore[override]
        self.sha.update(b)
        self.nbytes += len(b)
        return self._f.write(b)


class ShardWriter:
    """Writes one split's shards, rolling by sample count and by a byte cap."""

    def __init__(
        self,
        root: str,
        split: str,
        num_classes: int,
        max_samples: int = 1000,
        max_bytes: int = 1 << 30,
        before_publish: Callable[[], None] | None = None,
        first_index: int = 0,
    ):
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        check_split_name(split)
        self.root, self.split, self.num_classes = root, split, num_classes
        self.first_index = first_index  # the file number of this writer's first shard (a conversion task's shard)
        self._before_publish = before_publish  # called once, before the first shard is published
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.shards: list[ShardInfo] = []
        self.pos_counts = np.zeros(num_classes, dtype=np.int64)
        self.neg_counts = np.zeros(num_classes, dtype=np.int64)
        self.true_counts = np.zeros(num_classes, dtype=np.int64)
        self.samples = 0
        self.samples_with_truth = 0
        self._keys_in_shard: set[str] = set()
        self._tar: tarfile.TarFile | None = None
        self._tmp_path = ""
        self._raw: io.BufferedWriter | None = None
        self._hash: _HashingFile | None = None
        self._count = 0
        self._staging = None if not is_remote(root) else tempfile.mkdtemp(prefix="csl-shard-")

    def _open(self) -> None:
        final = join(self.root, shard_name(self.split, self.first_index + len(self.shards)))
        folder = self._staging or os.path.dirname(os.path.abspath(final))
        os.makedirs(folder, exist_ok=True)
        fd, self._tmp_path = tempfile.mkstemp(prefix=".tmp-", suffix=".tar", dir=folder)
        self._raw = os.fdopen(fd, "wb", buffering=1 << 20)
        self._hash = _HashingFile(self._raw)
        self._tar = tarfile.open(fileobj=self._hash, mode="w", format=tarfile.USTAR_FORMAT)  # type: ignore[arg-type]
        self._count = 0
        self._keys_in_shard = set()

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        assert self._tar is not None
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, rec: Record) -> None:
        where = f"sample {rec.key!r}"
        validate_key(rec.key)
        pos, neg, true = validate_labels(rec.pos, rec.neg, self.num_classes, where, rec.true)
        ext = rec.ext.lower().lstrip(".")
        if ext not in IMAGE_EXTS:
            raise ValueError(f"{where}: image extension {rec.ext!r} not one of {IMAGE_EXTS}")
        if self._tar is None:
            self._open()
        if rec.key in self._keys_in_shard:
            raise ValueError(f"{where}: duplicate key in shard {shard_name(self.split, self.first_index + len(self.shards))}")
        self._keys_in_shard.add(rec.key)
        rec = Record(rec.key, rec.image, pos, neg, ext, true, rec.source, rec.extra)
        self._add(f"{rec.key}.{ext}", rec.image)
        self._add(f"{rec.key}.json", encode_labels(rec))
        for member_ext, data in rec.extra.items():
            self._add(f"{rec.key}.{member_ext}", data)
        self.pos_counts[pos] += 1
        self.neg_counts[neg] += 1
        if true is not None:
            self.true_counts[true] += 1
            self.samples_with_truth += 1
        self.samples += 1
        self._count += 1
        assert self._hash is not None
        if self._count >= self.max_samples or self._hash.nbytes >= self.max_bytes:
            self._finish_shard()

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._raw is not None and self._hash is not None
        self._tar.close()
        self._raw.flush()
        os.fsync(self._raw.fileno())
        self._raw.close()
        os.chmod(self._tmp_path, 0o644)
        rel = shard_name(self.split, self.first_index + len(self.shards))
        if self._before_publish is not None:
            self._before_publish()
            self._before_publish = None
        publish_file(self._tmp_path, join(self.root, rel))
        self.shards.append(
            ShardInfo(path=rel, samples=self._count, bytes=self._hash.nbytes, sha256=self._hash.sha.hexdigest())
        )
        self._tar = None

    def abort(self) -> None:
        """Drop the shard in progress; published shards stay but no manifest will list them."""
        if self._raw is not None and not self._raw.closed:
            self._raw.close()
        if self._tmp_path and os.path.exists(self._tmp_path):
            os.unlink(self._tmp_path)
        self._tar = None

    def close(self) -> tuple[SplitInfo, SplitStats, SplitTruth | None]:
        if self._tar is not None:
            self._finish_shard()
        if self._staging:
            os.rmdir(self._staging)
        info = SplitInfo(samples=self.samples, shards=self.shards)
        stats = SplitStats(pos=self.pos_counts.tolist(), neg=self.neg_counts.tolist())
        truth = None
        if self.samples and self.samples_with_truth == self.samples:
            truth = SplitTruth(freq=(self.true_counts / self.samples).tolist())
        return info, stats, truth


def stale_shards(root: str, split: str, keep: set[str]) -> list[str]:
    fs, path = get_fs(join(root, split))
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    out = []
    for full in names:
        base = full.rstrip("/").rsplit("/", 1)[-1]
        m = _SHARD_RE.match(base)
        if (m and m.group("split") == split and f"{split}/{base}" not in keep) or base.startswith(".tmp-"):
            out.append(join(root, split, base))
    return out


def carry_other_splits(keep: Manifest, infos: dict[str, SplitInfo], stats: dict[str, SplitStats],
                       truths: dict[str, SplitTruth]) -> None:
    """Add to a new manifest's parts every split of `keep` (the root's manifest) that is not
    being written, with its stats and truth: converting one split never loses the others."""
    for split in [s for s in keep.splits if s not in infos]:
        infos[split] = keep.splits[split]
        if split in keep.stats:
            stats[split] = keep.stats[split]
        if split in keep.truth:
            truths[split] = keep.truth[split]


def write_dataset(
    root: str,
    classes: Sequence[ClassInfo],
    splits: dict[str, Iterable[Record]],
    *,
    shard_samples: int = 1000,
    max_bytes: int = 1 << 30,
    truth: dict[str, list[float]] | None = None,
    meta: dict[str, object] | None = None,
    keep: Manifest | None = None,
) -> Manifest:
    """Write every split's records as shards, then `dataset.json`, then tidy stale shards.

    `truth` overrides the per-class frequency computed from records' `true` lists (for sources
    that know it analytically); without either, the split has no truth entry.
    `keep` (usually the root's previous manifest) carries its splits that are not written here
    into the new manifest, so one split can be converted at a time; its meta is the base that
    `meta` updates. Without `keep`, the new manifest lists only the splits written here.
    See the module docstring for what a failure or a kill leaves behind.
    """
    for split in splits:
        check_split_name(split)
    if keep is not None and [c.id for c in keep.classes] != [c.id for c in classes]:
        raise ValueError("write_dataset: the kept manifest's classes differ from the classes being written")
    listed = keep if keep is not None else current_manifest(root)
    num_classes = len(classes)
    infos: dict[str, SplitInfo] = {}
    stats: dict[str, SplitStats] = {}
    truths: dict[str, SplitTruth] = {}

    def unlist(split: str) -> Callable[[], None]:
        def drop() -> None:
            nonlocal listed
            if listed is not None and split in listed.splits:
                listed = without_split(listed, split)
                if listed.splits:
                    write_manifest(root, listed)
                else:
                    remove(join(root, "dataset.json"))
                log.info("split %r unlisted from %s while it is rewritten", split, root)
        return drop

    for split, records in splits.items():
        w = ShardWriter(root, split, num_classes, shard_samples, max_bytes, before_publish=unlist(split))
        try:
            for rec in records:
                w.write(rec)
        except BaseException:
            w.abort()
            raise
        infos[split], stats[split], t = w.close()
        if infos[split].samples == 0:
            raise EmptySplitError(f"split {split!r}: no samples to write (every input row or image was skipped, or "
                                  f"the input is empty); {join(root, 'dataset.json')} was left as it was")
        if truth and split in truth:
            t = SplitTruth(freq=list(truth[split]))
        if t is not None:
            truths[split] = t
    if keep is not None:
        carry_other_splits(keep, infos, stats, truths)
        meta = {**keep.meta, **(meta or {})}
    manifest = Manifest(classes=list(classes), splits=infos, stats=stats, truth=truths, meta=meta or {})
    write_manifest(root, manifest)
    for split, info in infos.items():
        for url in stale_shards(root, split, {s.path for s in info.shards}):
            log.info("removing stale shard %s", url)
            remove(url)
    return manifest


def current_manifest(root: str) -> Manifest | None:
    """The manifest now at `root`, or None where there is none (or none that parses)."""
    try:
        if not exists(join(root, "dataset.json")):
            return None
        return read_manifest(root)
    except (FileNotFoundError, ManifestError):
        return None


def without_split(m: Manifest, split: str) -> Manifest:
    return m.model_copy(update={
        "splits": {k: v for k, v in m.splits.items() if k != split},
        "stats": {k: v for k, v in m.stats.items() if k != split},
        "truth": {k: v for k, v in m.truth.items() if k != split},
    })


def _die_with_parent(parent: int) -> None:
    """Pool initializer: a worker gets SIGKILL when the process that started it dies."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: workers still exit when the pool shuts down
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def parallel_map(
    fn: Callable[[T], R], items: Iterable[T], workers: int = 0, window: int | None = None
) -> Iterator[R]:
    """Ordered map over a process pool with a bounded number of items in flight.

    `Pool.imap` reads its whole input ahead, which for a tens-of-millions-row source means
    unbounded memory; here at most `window` items are pending. workers=0 runs in-process.
    """
    if workers <= 0:
        for item in items:
            yield fn(item)
        return
    window = window or workers * 4
    pending: deque[Future[R]] = deque()
    with ProcessPoolExecutor(max_workers=workers, initializer=_die_with_parent,
                             initargs=(os.getpid(),)) as ex:
        for item in items:
            pending.append(ex.submit(fn, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
