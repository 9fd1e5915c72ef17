"""`csl shards inspect` and `csl shards verify`: what is really in the shards.

Both read the shards themselves, not just the manifest: a manifest can be right about a shard
that was later truncated, replaced or edited. Each shard is streamed once through a hashing
reader into `tarfile`'s streaming mode, so verification costs one sequential read per shard
(S3 or local) and memory of one sample, never of one shard. Shards are processed by a thread
pool: the work is I/O and zlib/PIL code that releases the GIL.

Nothing is ever unpickled: only `.json` label members are parsed, image members are decoded by
PIL (verify) or skipped (inspect), and every other member is ignored.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Callable, Iterator

import numpy as np
from PIL import Image

from .format import IMAGE_EXTS, LabelError, Manifest, ShardInfo, decode_labels
from .storage import join, open_file, read_manifest

__all__ = ["ShardReport", "scan_shard", "inspect_dataset", "verify_dataset", "iter_tar_samples"]


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


def iter_tar_samples(fileobj: IO[bytes]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group consecutive tar members by key (`<key>.<ext>`, split at the first dot)."""
    key: str | None = None
    members: dict[str, bytes] = {}
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for info in tar:
            if not info.isreg():
                continue
            base = info.name.rsplit("/", 1)[-1]
            if "." not in base:
                continue
            k, ext = base.split(".", 1)
            if k != key and key is not None:
                yield key, members
                members = {}
            key = k
            f = tar.extractfile(info)
            members[ext.lower()] = f.read() if f is not None else b""
    if key is not None:
        yield key, members


@dataclass
class ShardReport:
    shard: str
    samples: int = 0
    bytes: int = 0
    sha256: str = ""
    pos: np.ndarray | None = None
    neg: np.ndarray | None = None
    problems: list[dict[str, str]] = field(default_factory=list)

    def problem(self, key: str, what: str) -> None:
        self.problems.append({"shard": self.shard, "key": key, "what": what})


def scan_shard(root: str, info: ShardInfo, num_classes: int, decode_images: bool) -> ShardReport:
    """Read one shard end to end; never raises for bad content, records problems instead."""
    rep = ShardReport(shard=info.path, pos=np.zeros(num_classes, np.int64), neg=np.zeros(num_classes, np.int64))
    assert rep.pos is not None and rep.neg is not None
    try:
        with open_file(join(root, info.path)) as raw:
            hr = _HashingReader(raw)
            reader = io.BufferedReader(hr, buffer_size=1 << 20)
            seen: set[str] = set()
            try:
                for key, members in iter_tar_samples(reader):
                    where = f"{info.path}:{key}"
                    if key in seen:
                        rep.problem(key, "duplicate key")
                    seen.add(key)
                    image_ext = next((e for e in IMAGE_EXTS if e in members), None)
                    if "json" not in members:
                        rep.problem(key, "no .json labels member")
                        continue
                    if image_ext is None:
                        rep.problem(key, "no image member (.jpg/.png/.webp)")
                        continue
                    try:
                        pos, neg, _ = decode_labels(members["json"], num_classes, where)
                    except LabelError as e:
                        rep.problem(key, str(e).split(": ", 1)[-1])
                        continue
                    if decode_images:
                        try:
                            with Image.open(io.BytesIO(members[image_ext])) as im:
                                im.convert("RGB").load()
                        except Exception as e:  # PIL raises many types for bad bytes
                            rep.problem(key, f"image does not decode ({type(e).__name__}: {str(e).split(' <')[0]})")
                            continue
                    rep.pos[pos] += 1
                    rep.neg[neg] += 1
                    rep.samples += 1
            except (tarfile.TarError, EOFError) as e:
                rep.problem("-", f"corrupt or truncated tar after {rep.samples} samples ({e})")
            hr.drain()
            rep.bytes, rep.sha256 = hr.nbytes, hr.sha.hexdigest()
    except FileNotFoundError:
        rep.problem("-", "shard file missing")
    except OSError as e:
        rep.problem("-", f"cannot read shard ({e})")
    return rep


def _scan_all(
    root: str, manifest: Manifest, decode_images: bool, threads: int, progress: Callable[[int], None] | None
) -> dict[str, list[ShardReport]]:
    out: dict[str, list[ShardReport]] = {}
    with ThreadPoolExecutor(max_workers=max(1, threads)) as ex:
        for split, info in manifest.splits.items():
            reports = []
            for rep in ex.map(lambda s: scan_shard(root, s, manifest.num_classes, decode_images), info.shards):
                reports.append(rep)
                if progress:
                    progress(1)
            out[split] = reports
    return out


def inspect_dataset(
    root: str, threads: int = 4, progress: Callable[[int], None] | None = None, top: int = 10
) -> dict:
    """Per split: samples, shards, bytes, per-class pos/neg counts read from the shards."""
    manifest = read_manifest(root)
    scans = _scan_all(root, manifest, decode_images=False, threads=threads, progress=progress)
    names = [c.name for c in manifest.classes]
    splits = {}
    for split, reports in scans.items():
        pos = np.sum([r.pos for r in reports], axis=0) if reports else np.zeros(manifest.num_classes, np.int64)
        neg = np.sum([r.neg for r in reports], axis=0) if reports else np.zeros(manifest.num_classes, np.int64)
        order = np.argsort(-(pos + neg), kind="stable")[:top]
        splits[split] = {
            "samples": int(sum(r.samples for r in reports)),
            "shards": len(reports),
            "bytes": int(sum(r.bytes for r in reports)),
            "pos": pos.astype(int).tolist(),
            "neg": neg.astype(int).tolist(),
            "top": [{"class": int(c), "name": names[c], "pos": int(pos[c]), "neg": int(neg[c])} for c in order],
            "problems": [p for r in reports for p in r.problems],
        }
    return {"classes": manifest.num_classes, "splits": splits}


def verify_dataset(root: str, threads: int = 4, progress: Callable[[int], None] | None = None) -> dict:
    """Check every shard against the manifest and every sample against the contract."""
    manifest = read_manifest(root)
    scans = _scan_all(root, manifest, decode_images=True, threads=threads, progress=progress)
    problems: list[dict[str, str]] = []
    checked = 0
    for split, reports in scans.items():
        info = manifest.splits[split]
        for shard, rep in zip(info.shards, reports):
            problems.extend(rep.problems)
            if any(p["what"] == "shard file missing" for p in rep.problems):
                continue
            if rep.bytes != shard.bytes:
                rep.problem("-", f"size {rep.bytes} bytes, manifest says {shard.bytes}")
                problems.append(rep.problems[-1])
            if rep.sha256 != shard.sha256:
                rep.problem("-", "sha256 differs from the manifest")
                problems.append(rep.problems[-1])
            if rep.samples != shard.samples:
                rep.problem("-", f"{rep.samples} valid samples, manifest says {shard.samples}")
                problems.append(rep.problems[-1])
            checked += rep.samples
        total = sum(s.samples for s in info.shards)
        if total != info.samples:
            problems.append({"shard": "-", "key": "-", "what": f"split {split}: shards sum to {total}, manifest says {info.samples}"})
        stats = manifest.stats.get(split)
        if stats is not None and reports and not any(r.problems for r in reports):
            pos = np.sum([r.pos for r in reports], axis=0)
            neg = np.sum([r.neg for r in reports], axis=0)
            if pos.tolist() != stats.pos or neg.tolist() != stats.neg:
                problems.append({"shard": "-", "key": "-", "what": f"split {split}: per-class counts differ from stats"})
    return {"ok": not problems, "samples": checked, "problems": problems}
