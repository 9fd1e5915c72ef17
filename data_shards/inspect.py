"""`csl shards inspect` and `csl shards verify`: what is really in the shards.

Both read the shards themselves, not just the manifest: a manifest can be right about a shard
that was later truncated, replaced or edited. They read with the training stream's own reader
and sample rule (`shard_reader.iter_groups` and `sample_parts`: same grouping, duplicate rule,
size caps, never unpickling), and verify decodes images with the stream's own `decode_image`
(JPEG, PNG and WebP only, draft mode at the training size), so "ok" means training reads every
listed sample. A shard's member count is compared with the manifest the way the stream plans:
every member group is a sample position.

Each shard is streamed once through a hashing reader, so verification costs one sequential
read per shard (S3 or local) and memory of one sample. One shard is one unit of work: a Ray
task (`workers` N at a time, or None: one per CPU of the local Ray or of the cluster at
RAY_ADDRESS), or with `workers=0` a thread of this process (cheap for small datasets, no
Ray). Either way a bounded window of shards is in flight and reports are consumed in manifest
order, then dropped: per-class counts are running totals per split, so memory does not grow
with the number of shards (a 9,600-class report is two 77 kB arrays, `window` of them at most).
`sample` checks a deterministic fraction of the shards (each whole, so its size and sha256 are
still checked; at least one per split) for a quick look; the per-class totals are then not
compared with the manifest. Problems are kept up to `MAX_PROBLEMS` (with the total count);
names from the tars are printed with control characters escaped.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Callable, Iterator

import numpy as np

from .decode import ImageDecodeError, decode_image
from .format import Manifest, ShardInfo, printable
from .shard_reader import SampleError, ShardReadError, iter_groups, open_shard, sample_parts
from .storage import join, read_manifest

__all__ = ["ShardReport", "scan_shard", "sampled_shards", "inspect_dataset", "verify_dataset", "MAX_PROBLEMS"]

MAX_PROBLEMS = 1000
VERIFY_SIZE = 224  # decode size for verify: the presets' training size


class _HashingReader(io.RawIOBase):
    def __init__(self, f: IO[bytes]):
        self._f = f
        self.sha = hashlib.sha256()
        self.nbytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        data = self._f.read(len(b))
        n = len(data)
        b[:n] = data
        self.sha.update(data)
        self.nbytes += n
        return n

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


@dataclass
class ShardReport:
    shard: str
    positions: int = 0  # member groups: what the stream plans over
    samples: int = 0  # of them, usable
    bytes: int = 0
    sha256: str = ""
    pos: np.ndarray | None = None
    neg: np.ndarray | None = None
    problems: list[dict[str, str]] = field(default_factory=list)
    missing: bool = False

    def problem(self, key: str, what: str) -> None:
        self.problems.append({"shard": printable(self.shard), "key": printable(key), "what": printable(what)})


def scan_shard(root: str, info: ShardInfo, num_classes: int, decode_size: int | None) -> ShardReport:
    """Read one shard end to end; never raises for bad content, records problems instead."""
    rep = ShardReport(shard=info.path, pos=np.zeros(num_classes, np.int64), neg=np.zeros(num_classes, np.int64))
    assert rep.pos is not None and rep.neg is not None
    url = join(root, *info.path.split("/"))
    try:
        raw_file = open_shard(url, retries=3)
    except ShardReadError as e:
        rep.missing = e.missing
        rep.problem("-", "shard file missing" if rep.missing else str(e).split(": ", 1)[-1])
        return rep
    try:
        with raw_file:
            hr = _HashingReader(raw_file)
            reader = io.BufferedReader(hr, buffer_size=1 << 20)
            seen: set[str] = set()
            try:
                for i, raw in iter_groups(reader):
                    rep.positions = i + 1
                    key = raw.key or f"#{i}"
                    if key in seen:
                        rep.problem(key, "key appears twice in the shard (read as two samples)")
                    seen.add(key)
                    try:
                        image, pos, neg = sample_parts(raw, num_classes, f"{info.path}:{key}")
                        if decode_size:
                            decode_image(image, decode_size)
                    except SampleError as e:
                        rep.problem(key, str(e).split(": ", 1)[-1])
                        continue
                    except ImageDecodeError as e:
                        rep.problem(key, f"image does not decode ({str(e).split(' <')[0]})")
                        continue
                    rep.pos[pos] += 1
                    rep.neg[neg] += 1
                    rep.samples += 1
            except (tarfile.TarError, EOFError) as e:
                rep.problem("-", f"corrupt or truncated tar after {rep.positions} samples ({e})")
            hr.drain()
            rep.bytes, rep.sha256 = hr.nbytes, hr.sha.hexdigest()
    except OSError as e:
        rep.problem("-", f"cannot read shard ({e})")
    return rep


@dataclass
class _SplitTotals:
    num_classes: int
    shards: int = 0
    positions: int = 0
    samples: int = 0
    bytes: int = 0
    pos: np.ndarray = field(init=False)
    neg: np.ndarray = field(init=False)
    clean: bool = True

    def __post_init__(self) -> None:
        self.pos = np.zeros(self.num_classes, np.int64)
        self.neg = np.zeros(self.num_classes, np.int64)


class _Problems:
    def __init__(self) -> None:
        self.kept: list[dict[str, str]] = []
        self.total = 0

    def add(self, p: dict[str, str]) -> None:
        self.total += 1
        if len(self.kept) < MAX_PROBLEMS:
            self.kept.append(p)


def sampled_shards(manifest: Manifest, split: str, fraction: float) -> list[ShardInfo]:
    """A deterministic `fraction` of a split's shards (by a hash of each path), at least one."""
    shards = manifest.splits[split].shards
    if fraction >= 1:
        return list(shards)
    if not 0 < fraction:
        raise ValueError(f"sample fraction must be in (0, 1], got {fraction}")
    pick = [s for s in shards if int(hashlib.sha256(s.path.encode()).hexdigest()[:8], 16) / 2**32 < fraction]
    return pick or list(shards[:1])


def _scan_all(
    root: str, manifest: Manifest, decode_size: int | None, threads: int, progress: Callable[..., None] | None,
    workers: int | None = 0, sample: float = 1.0,
) -> Iterator[tuple[str, ShardInfo, ShardReport]]:
    """(split, shard, report) in manifest order with a bounded window in flight; a report is
    dropped by the caller after use."""
    jobs = [(split, s) for split in manifest.splits for s in sampled_shards(manifest, split, sample)]
    c = manifest.num_classes
    started = False
    if workers == 0:
        ex = ThreadPoolExecutor(max_workers=max(1, threads))
        submit, result, window = (lambda s: ex.submit(scan_shard, root, s, c, decode_size)), (lambda f: f.result()), 2 * threads
    else:
        import ray

        from trainer.launch import ensure_ray  # the project's one place that starts Ray

        started = ensure_ray()
        task = ray.remote(num_cpus=1)(scan_shard)
        # Reports are consumed in manifest order: twice the workers in flight, so that a worker
        # that finished ahead of the oldest shard already has its next one.
        window = 2 * (workers or max(1, int(ray.cluster_resources().get("CPU", 1))))
        submit, result = (lambda s: task.remote(root, s, c, decode_size)), ray.get
    pending: deque = deque()
    try:
        it = iter(jobs)
        for split, shard in it:
            pending.append((split, shard, submit(shard)))
            if len(pending) >= window:
                break
        while pending:
            split, shard, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt[0], nxt[1], submit(nxt[1])))
            rep = result(fut)
            if progress:
                progress(1, rep.positions)
            yield split, shard, rep
    finally:
        if workers == 0:
            ex.shutdown(wait=True, cancel_futures=True)
        elif started:
            import ray

            ray.shutdown()


def _totals(manifest: Manifest) -> dict[str, _SplitTotals]:
    return {split: _SplitTotals(manifest.num_classes) for split in manifest.splits}


def _add(t: _SplitTotals, rep: ShardReport) -> None:
    assert rep.pos is not None and rep.neg is not None
    t.shards += 1
    t.positions += rep.positions
    t.samples += rep.samples
    t.bytes += rep.bytes
    t.pos += rep.pos
    t.neg += rep.neg
    t.clean = t.clean and not rep.problems


def inspect_dataset(
    root: str, threads: int = 4, progress: Callable[..., None] | None = None, top: int = 10,
    workers: int | None = 0, sample: float = 1.0,
) -> dict:
    """Per split: samples, shards, bytes, per-class pos/neg counts read from the shards
    (`progress(shards, samples)` after each shard; workers and sample as in the module docstring)."""
    manifest = read_manifest(root)
    totals, problems = _totals(manifest), {split: _Problems() for split in manifest.splits}
    for split, _, rep in _scan_all(root, manifest, None, threads, progress, workers, sample):
        _add(totals[split], rep)
        for p in rep.problems:
            problems[split].add(p)
    names = [c.name for c in manifest.classes]
    splits = {}
    for split, t in totals.items():
        order = np.argsort(-(t.pos + t.neg), kind="stable")[:top]
        splits[split] = {
            "samples": t.samples,
            "shards": t.shards,
            "bytes": t.bytes,
            "pos": t.pos.tolist(),
            "neg": t.neg.tolist(),
            "top": [{"class": int(c), "name": names[c], "pos": int(t.pos[c]), "neg": int(t.neg[c])} for c in order],
            "problems": problems[split].kept,
            "problem_count": problems[split].total,
        }
    return {"classes": manifest.num_classes, "splits": splits}


def verify_dataset(
    root: str, threads: int = 4, progress: Callable[..., None] | None = None, image_size: int = VERIFY_SIZE,
    workers: int | None = 0, sample: float = 1.0,
) -> dict:
    """Check every shard (or a `sample` of them) against the manifest and every sample in it
    against the contract, decoding as training does at `image_size`."""
    manifest = read_manifest(root)
    totals, problems = _totals(manifest), _Problems()
    for split, shard, rep in _scan_all(root, manifest, image_size, threads, progress, workers, sample):
        if rep.sha256:  # read to the end
            if rep.bytes != shard.bytes:
                rep.problem("-", f"size {rep.bytes} bytes, manifest says {shard.bytes}")
            if rep.sha256 != shard.sha256:
                rep.problem("-", "sha256 differs from the manifest")
        if not rep.missing and rep.positions != shard.samples:
            rep.problem("-", f"holds {rep.positions} samples, manifest says {shard.samples}")
        for p in rep.problems:
            problems.add(p)
        _add(totals[split], rep)
    checked, shards = 0, 0
    for split, t in totals.items():
        info = manifest.splits[split]
        checked += t.samples
        shards += t.shards
        if sample < 1:
            continue  # sums over a sample say nothing about the split's totals
        listed = sum(s.samples for s in info.shards)
        if listed != info.samples:
            problems.add({"shard": "-", "key": "-", "what": f"split {split}: shards sum to {listed}, manifest says {info.samples}"})
        stats = manifest.stats.get(split)
        if stats is not None and t.clean and (t.pos.tolist() != stats.pos or t.neg.tolist() != stats.neg):
            problems.add({"shard": "-", "key": "-", "what": f"split {split}: per-class counts differ from stats"})
    return {"ok": problems.total == 0, "samples": checked, "shards": shards, "sampled": sample < 1,
            "problems": problems.kept, "problem_count": problems.total}
