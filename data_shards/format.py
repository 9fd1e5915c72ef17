"""The shard format: one small spec that writers, readers and outside tools share.

A dataset is a root (local folder or fsspec URL) holding `dataset.json` and WebDataset tar
shards. A sample is a group of tar members sharing a key: `<key>.jpg` (or `.png`/`.webp`) and
`<key>.json` with sparse labels `{"pos": [...], "neg": [...]}`. Sparse lists are the point:
at OpenImages density (about 7 annotated of 9,600 classes) a dense int8 label vector is 9.6 kB
per sample, the sparse JSON a few dozen bytes.

`dataset.json` is a versioned pydantic model so that a manifest from a newer writer, or a
hand-edited one with a typo, fails loudly with the field that is wrong instead of being half
understood. It is written last (see `writer.py`): its presence means every shard it lists is
complete.

In memory the paper's encoding is used: 1 positive, -1 annotated negative, 0 un-annotated.
"""

from __future__ import annotations

import json
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

__all__ = [
    "FORMAT",
    "VERSION",
    "MANIFEST_NAME",
    "IMAGE_EXTS",
    "ClassInfo",
    "ShardInfo",
    "SplitInfo",
    "SplitStats",
    "SplitTruth",
    "Manifest",
    "Record",
    "LabelError",
    "ManifestError",
    "validate_key",
    "validate_labels",
    "encode_labels",
    "decode_labels",
    "parse_manifest",
    "parse_json",
    "check_shard_path",
    "printable",
    "targets_from_sparse",
    "MAX_LABEL_BYTES",
    "MAX_MANIFEST_BYTES",
]

FORMAT = "csl-shards"
VERSION = 1
MANIFEST_NAME = "dataset.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
# A label member lists class ids: 9,600 classes at 6 bytes each is under 64 kB.
MAX_LABEL_BYTES = 1 << 20
# 9,000 shards at ~150 bytes plus 2 x 9,600 counts and 9,600 class names: a few MB.
MAX_MANIFEST_BYTES = 256 << 20
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class LabelError(ValueError):
    """A sample's labels break the contract; the message names the sample."""


class ManifestError(ValueError):
    """`dataset.json` is missing, unreadable or does not match the schema."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassInfo(_Strict):
    id: str
    name: str


def printable(text: str) -> str:
    """`text` with control characters escaped (`\\x1b`): names read from tars reach terminals."""
    return _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def check_shard_path(path: str) -> str:
    """A shard path must name a file inside the root: relative, '/'-separated, normalised.

    Readers join it to the root; `../x`, `/dev/zero` or `s3://other/x` would read outside it.
    """
    if (not path or path.startswith("/") or "\\" in path or ":" in path or _CONTROL_RE.search(path)
            or posixpath.normpath(path) != path or path.split("/", 1)[0] == ".."):
        raise ValueError(f"shard path {path!r} must be relative to the dataset root, normalised, '/'-separated, "
                         "and stay inside it")
    return path


class ShardInfo(_Strict):
    path: str = Field(description="relative to the dataset root, '/'-separated")
    samples: StrictInt = Field(ge=0)
    bytes: StrictInt = Field(ge=0)
    sha256: str

    @field_validator("path")
    @classmethod
    def _inside_root(cls, v: str) -> str:
        return check_shard_path(v)


class SplitInfo(_Strict):
    samples: StrictInt = Field(ge=0)
    shards: list[ShardInfo]


class SplitStats(_Strict):
    pos: list[StrictInt]
    neg: list[StrictInt]


class SplitTruth(_Strict):
    freq: list[float]


class Manifest(_Strict):
    format: Literal["csl-shards"] = FORMAT
    version: Literal[1] = VERSION
    classes: list[ClassInfo]
    splits: dict[str, SplitInfo]
    stats: dict[str, SplitStats] = Field(default_factory=dict)
    truth: dict[str, SplitTruth] = Field(default_factory=dict)
    meta: dict[str, object] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _shards_listed_once(self) -> "Manifest":
        # One file listed twice (in one split or two) would be read twice per epoch.
        seen: dict[str, str] = {}
        for name, info in self.splits.items():
            for shard in info.shards:
                if shard.path in seen:
                    raise ValueError(f"shard {shard.path!r} is listed in split {seen[shard.path]!r} and again in "
                                     f"split {name!r}; each shard belongs to one split, once")
                seen[shard.path] = name
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            raise ManifestError(
                f"split {name!r} not in dataset (splits: {', '.join(sorted(self.splits)) or 'none'})"
            )
        return self.splits[name]

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)


def parse_json(data: str | bytes, where: str, what: str, error: type[ValueError], max_bytes: int) -> Any:
    """`json.loads` for untrusted bytes: size, encoding and nesting guarded, errors name `where`.

    json's parser recurses per nesting level (a document 100,000 levels deep raises
    RecursionError) and refuses integers over 4,300 digits with a message naming nothing.
    """
    if len(data) > max_bytes:
        raise error(f"{where}: {what} is {len(data)} bytes, over the {max_bytes}-byte limit")
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as e:
        raise error(f"{where}: {what} is not UTF-8 (byte {e.start}: {e.reason})") from None
    try:
        return json.loads(text)
    except RecursionError:
        raise error(f"{where}: {what} is nested too deeply to be valid") from None
    except ValueError as e:  # JSONDecodeError, and the int-digit limit
        raise error(f"{where}: {what} is not valid JSON ({' '.join(str(e).split())[:200]})") from None


def parse_manifest(text: str | bytes, where: str = MANIFEST_NAME) -> Manifest:
    """Parse and validate a manifest, naming the first bad field and the file."""
    raw = parse_json(text, where, "the manifest", ManifestError, MAX_MANIFEST_BYTES)
    if isinstance(raw, dict):
        if raw.get("format") not in (None, FORMAT):
            raise ManifestError(f"{where}: format {raw.get('format')!r} is not {FORMAT!r}")
        if raw.get("version") not in (None, VERSION):
            raise ManifestError(
                f"{where}: version {raw.get('version')!r} is not supported (this reader knows {VERSION})"
            )
    try:
        m = Manifest.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        raise ManifestError(f"{where}: field '{loc}': {err['msg']}"[:500]) from None
    c = m.num_classes
    for split, st in m.stats.items():
        if len(st.pos) != c or len(st.neg) != c:
            raise ManifestError(f"{where}: stats.{split} has {len(st.pos)}/{len(st.neg)} entries, expected {c}")
    for split, tr in m.truth.items():
        if len(tr.freq) != c:
            raise ManifestError(f"{where}: truth.{split}.freq has {len(tr.freq)} entries, expected {c}")
    return m


@dataclass
class Record:
    """One sample on its way into a shard."""

    key: str
    image: bytes
    pos: list[int]
    neg: list[int]
    ext: str = "jpg"
    true: list[int] | None = None
    source: str | None = None
    extra: dict[str, bytes] = field(default_factory=dict)


def validate_key(key: str) -> str:
    # WebDataset splits a member name at the first dot; '/' would make a folder.
    if not key or not _KEY_RE.match(key):
        raise LabelError(f"sample key {key!r}: use letters, digits, '_' and '-' only")
    return key


def _check_list(name: str, values: Sequence[int], num_classes: int, where: str) -> list[int]:
    out = []
    prev = -1
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise LabelError(f"{where}: {name} has a non-integer class id {v!r}")
        v = int(v)
        if v < 0 or v >= num_classes:
            raise LabelError(f"{where}: {name} class id {v} out of range [0, {num_classes})")
        if v <= prev:
            raise LabelError(f"{where}: {name} is not ascending and unique at class id {v}")
        prev = v
        out.append(v)
    return out


def validate_labels(
    pos: Sequence[int],
    neg: Sequence[int],
    num_classes: int,
    where: str,
    true: Sequence[int] | None = None,
) -> tuple[list[int], list[int], list[int] | None]:
    """Check the contract: ascending, unique, in range, pos and neg disjoint."""
    p = _check_list("pos", pos, num_classes, where)
    n = _check_list("neg", neg, num_classes, where)
    both = set(p).intersection(n)
    if both:
        raise LabelError(f"{where}: class ids {sorted(both)[:5]} are both pos and neg")
    t = None if true is None else _check_list("true", true, num_classes, where)
    return p, n, t


def encode_labels(rec: Record) -> bytes:
    obj: dict[str, object] = {"pos": rec.pos, "neg": rec.neg}
    if rec.true is not None:
        obj["true"] = rec.true
    if rec.source is not None:
        obj["source"] = rec.source
    return json.dumps(obj, separators=(",", ":")).encode()


def decode_labels(
    data: bytes, num_classes: int, where: str
) -> tuple[list[int], list[int], list[int] | None]:
    """Parse a `<key>.json` member and validate it. JSON only: nothing is ever unpickled."""
    obj = parse_json(data, where, "the labels member", LabelError, MAX_LABEL_BYTES)
    if not isinstance(obj, dict) or not isinstance(obj.get("pos"), list) or not isinstance(obj.get("neg"), list):
        raise LabelError(f"{where}: labels need lists 'pos' and 'neg'")
    true = obj.get("true")
    if true is not None and not isinstance(true, list):
        raise LabelError(f"{where}: 'true' must be a list")
    return validate_labels(obj["pos"], obj["neg"], num_classes, where, true)


def targets_from_sparse(
    pos_lists: Sequence[Sequence[int]], neg_lists: Sequence[Sequence[int]], num_classes: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Dense int8 targets [B, C] in {1, -1, 0}, built per batch from sparse lists (into `out`,
    an int8 [B, C] array, when given)."""
    if out is None:
        out = np.zeros((len(pos_lists), num_classes), dtype=np.int8)
    else:
        out[...] = 0
    for i, (p, n) in enumerate(zip(pos_lists, neg_lists)):
        out[i, p] = 1
        out[i, n] = -1
    return out
