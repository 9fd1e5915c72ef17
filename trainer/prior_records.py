"""Per-shard records of the prior pass: what makes it resumable.

A pass over 9M images in thousands of shards runs for hours; a crash, a preempted node or one
unreadable shard must cost the shards in flight, never the pass. So each shard's result (the
float64 per-class sums of sigmoid outputs, the int64 per-class positive-annotation counts, the
scored and corrupt sample counts) is published as one small object the moment an actor
finishes it, and a rerun folds the published ones instead of scoring them again.

Layout, beside the outputs (`priors.csv` -> `priors.shards/`, local or any fsspec URL):

    priors.shards/identity.json       what the records were computed from (written first)
    priors.shards/shard-000042.npz    one per finished shard, named by its index in the split

A record is an uncompressed `.npz` (`sum` float64 [C], `pos` int64 [C], scalars `shard`,
`count`, `corrupt`, and `identity`, the digest of identity.json), about 16 bytes per class:
150 KB at 9,600 classes, 1.4 GB for 9,000 shards. It is read with `allow_pickle=False`, so a
tampered record can be wrong but never runs code. Each is published atomically
(`write_bytes_atomic`: a rename locally, a single PUT on S3), so a record either is complete or
is absent; a record that still fails to decode, or disagrees with the manifest, is logged and
scored again (one unit of work, overwritten when it finishes).

Identity. A record is only reusable for the same model over the same samples: the resolved
checkpoint, the weights used (ema/model) and their file's size and modification stamp (mtime,
or the S3 ETag: a checkpoint rewritten in place changes it), the split name and the digest of
its shard list (relative path, sha256, samples: moving the dataset to another root keeps the
records valid), the image size and the class ids. A rerun whose identity differs from the
folder's is refused with a ValueError naming the fields that changed, instead of silently
ignoring the records: at 9M images those records are hours of GPU time, and a changed
`--weights` or checkpoint is more often a slip than an intent; `fresh=True` (`csl prior
--fresh`) discards them, another `--out` keeps them. The digest is also stamped into every
record, so a stray record of another pass is never folded even without identity.json.

After the final outputs are written, the pass removes the folder: the CSV and JSON hold the
result, the records would only cost space (1.4 GB per pass at OpenImages scale), and a stale
folder would make the next pass with a new checkpoint refuse to start. So a folder exists only
while a pass is unfinished, which is exactly when its refusal is useful.

Memory: the driver lists the folder (names only) and folds records in chunks of `READ_CHUNK`
(fetched concurrently by s3fs), never all of them at once.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np

from data_shards.format import ShardInfo
from data_shards.storage import get_fs, join, read_json, redact, write_bytes_atomic

__all__ = ["IDENTITY_FILE", "ShardRecord", "records_dir", "record_url", "pass_identity", "identity_digest",
           "file_stamp", "encode_record", "decode_record", "open_records", "iter_records", "remove_records"]

log = logging.getLogger(__name__)

IDENTITY_FILE = "identity.json"
FORMAT = "csl-prior-records"
VERSION = 1
READ_CHUNK = 32
_RECORD_RE = re.compile(r"^shard-(\d{6,})\.npz$")


@dataclass(slots=True)
class ShardRecord:
    shard: int
    sum: np.ndarray  # float64 [C]
    pos: np.ndarray  # int64 [C]
    count: int
    corrupt: int


def records_dir(out: str) -> str:
    """`priors.csv` -> `priors.shards` (beside the outputs, on the same storage)."""
    stem = out[: -len(".csv")] if out.endswith(".csv") else out
    return stem + ".shards"


def record_url(folder: str, shard: int) -> str:
    return join(folder, f"shard-{shard:06d}.npz")


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def file_stamp(url: str) -> dict[str, Any]:
    """Size and modification stamp of a file, from one metadata call (never its bytes)."""
    fs, path = get_fs(url)
    info = fs.info(path)
    stamp = info.get("ETag") or info.get("mtime") or info.get("LastModified") or info.get("created")
    return {"size": int(info.get("size") or 0), "modified": str(stamp)}


def pass_identity(*, checkpoint: str, weights: str, weights_file: dict[str, Any], split: str,
                  shards: Sequence[ShardInfo], image_size: int, class_ids: Sequence[str]) -> dict[str, Any]:
    """Everything a shard's sums depend on; equal identities make records interchangeable."""
    return {"format": FORMAT, "version": VERSION, "checkpoint": redact(checkpoint), "weights": weights,
            "weights_file": weights_file, "split": split, "shards": len(shards),
            "shard_list_sha256": _sha256_json([[s.path, s.sha256, s.samples] for s in shards]),
            "image_size": int(image_size), "classes": len(class_ids), "class_ids_sha256": _sha256_json(list(class_ids))}


def identity_digest(identity: dict[str, Any]) -> str:
    return _sha256_json(identity)


def encode_record(rec: ShardRecord, digest: str) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, sum=np.asarray(rec.sum, dtype=np.float64), pos=np.asarray(rec.pos, dtype=np.int64),
             shard=np.int64(rec.shard), count=np.int64(rec.count), corrupt=np.int64(rec.corrupt),
             identity=np.str_(digest))
    return buf.getvalue()


def decode_record(data: bytes, where: str, *, digest: str, num_classes: int, shard_samples: Sequence[int]) -> ShardRecord:
    """A record back, or ValueError naming `where` and what is wrong (never unpickles)."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("sum", "pos", "shard", "count", "corrupt", "identity")}
    except Exception as e:  # a zip, npy or missing-key error: all mean "not a record"
        raise ValueError(f"{where}: not a prior-pass record ({type(e).__name__}: {e})") from None
    if str(arrays["identity"]) != digest:
        raise ValueError(f"{where}: written by another pass (identity {str(arrays['identity'])[:12]}...)")
    s, p = arrays["sum"], arrays["pos"]
    if s.dtype != np.float64 or s.shape != (num_classes,) or p.dtype != np.int64 or p.shape != (num_classes,):
        raise ValueError(f"{where}: sum {s.dtype}{s.shape} / pos {p.dtype}{p.shape}, expected float64/int64 ({num_classes},)")
    shard, count, corrupt = (int(arrays[k]) for k in ("shard", "count", "corrupt"))
    if not 0 <= shard < len(shard_samples) or count < 0 or corrupt < 0 or count + corrupt != shard_samples[shard]:
        raise ValueError(f"{where}: shard {shard} with {count} + {corrupt} corrupt samples does not match the manifest")
    if not np.isfinite(s).all() or (s < 0).any() or (s > count).any() or (p < 0).any() or (p > count).any():
        raise ValueError(f"{where}: sums or counts outside [0, {count}]")
    return ShardRecord(shard, s, p, count, corrupt)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 48 else text[:45] + "..."


def open_records(folder: str, identity: dict[str, Any], *, fresh: bool = False) -> None:
    """Make `folder` hold records of this pass: discard it when `fresh`, refuse another pass's."""
    if fresh:
        remove_records(folder)
    try:
        stored = read_json(join(folder, IDENTITY_FILE), "the prior records' identity")
    except FileNotFoundError:
        stored = None
    except ValueError:
        stored = {"format": "unreadable"}
    if stored is None:
        write_bytes_atomic(join(folder, IDENTITY_FILE), json.dumps(identity, indent=1).encode())
        return
    if stored != identity:
        keys = [k for k in identity if stored.get(k) != identity[k]] + [k for k in stored if k not in identity]
        changed = ", ".join(f"{k} {_short(stored.get(k))} -> {_short(identity.get(k))}" for k in keys)
        raise ValueError(f"{redact(folder)} holds the records of an unfinished prior pass that differs from this one "
                         f"({changed}); rerun with --fresh (fresh=True) to discard them, or choose another --out")


def _record_names(folder: str) -> list[tuple[int, str]]:
    fs, path = get_fs(folder)
    fs.invalidate_cache(path)
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        base = name.rstrip("/").rsplit("/", 1)[-1]
        m = _RECORD_RE.match(base)
        if m and base == f"shard-{int(m.group(1)):06d}.npz":  # one name per shard: never folded twice
            out.append((int(m.group(1)), record_url(folder, int(m.group(1)))))
    return sorted(out)


def iter_records(folder: str, *, digest: str, num_classes: int, shard_samples: Sequence[int],
                 chunk: int = READ_CHUNK) -> Iterator[ShardRecord]:
    """The valid records in `folder`, `chunk` at a time; invalid ones are logged and skipped
    (their shards are scored again and the record overwritten)."""
    names = [(i, url) for i, url in _record_names(folder) if i < len(shard_samples)]
    fs, _ = get_fs(folder)
    for k in range(0, len(names), chunk):
        part = names[k : k + chunk]
        paths = [get_fs(url)[1] for _, url in part]
        blobs = fs.cat(paths, on_error="return")  # a dict; s3fs fetches the chunk concurrently
        for (i, url), path in zip(part, paths):
            data = blobs.get(path)
            if not isinstance(data, bytes):
                log.warning("prior records: %s unreadable (%s); scoring shard %d again", redact(url), data, i)
                continue
            try:
                rec = decode_record(data, redact(url), digest=digest, num_classes=num_classes, shard_samples=shard_samples)
            except ValueError as e:
                log.warning("prior records: %s; scoring shard %d again", e, i)
                continue
            if rec.shard != i:
                log.warning("prior records: %s holds shard %d; scoring shard %d again", redact(url), rec.shard, i)
                continue
            yield rec


def remove_records(folder: str) -> None:
    """Delete the folder and everything in it (a missing folder is fine)."""
    fs, path = get_fs(folder)
    fs.invalidate_cache(path)
    if fs.exists(path):
        fs.rm(path, recursive=True)
