"""Label priors: reading and writing the per-class prior CSV the Selective loss consumes.

Our format is `class_id,name,prior` (one row per class, any order, matched to the dataset by
class id). The public reference code writes `Classes,avg_pred`, where `Classes` holds class
names or ids; those are matched by id first, then by display name, and display names that
repeat (OpenImages has some) are an error rather than a guess. Every class of the dataset must
get exactly one prior in [0, 1]; a file that misses or repeats classes is rejected with the
row that is wrong.

The distributed estimation pass (an Ignore-mode model over the training shards) writes these
files; it lives beside this module.
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from typing import Sequence

import numpy as np

from data_shards.format import Manifest
from data_shards.storage import read_bytes, write_bytes_atomic

__all__ = ["read_priors", "write_priors"]


def read_priors(path: str, manifest: Manifest) -> np.ndarray:
    """float32 [C] priors in the dataset's class order."""
    try:
        text = read_bytes(path).decode("utf-8-sig")
    except FileNotFoundError:
        raise FileNotFoundError(f"priors file not found: {path}") from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        raise ValueError(f"{path}: empty priors file")
    header = [h.strip() for h in rows[0]]
    if header[:3] == ["class_id", "name", "prior"]:
        key_col, val_col = 0, 2
    elif header[:2] == ["Classes", "avg_pred"]:
        key_col, val_col = 0, 1
    else:
        raise ValueError(f"{path}: header {header!r} is neither 'class_id,name,prior' nor 'Classes,avg_pred'")
    ids = {c.id: i for i, c in enumerate(manifest.classes)}
    name_counts = Counter(c.name for c in manifest.classes)
    names = {c.name: i for i, c in enumerate(manifest.classes) if name_counts[c.name] == 1}
    out = np.full(manifest.num_classes, np.nan, dtype=np.float64)
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not x.strip() for x in row):
            continue
        if len(row) <= val_col:
            raise ValueError(f"{path}:{line}: expected {len(header)} columns, got {len(row)}")
        key = row[key_col].strip()
        idx = ids.get(key, names.get(key))
        if idx is None:
            hint = " (display name repeats in the dataset: use the class id)" if name_counts.get(key, 0) > 1 else ""
            raise ValueError(f"{path}:{line}: class {key!r} is not in the dataset{hint}")
        try:
            value = float(row[val_col])
        except ValueError:
            raise ValueError(f"{path}:{line}: prior {row[val_col]!r} is not a number") from None
        if not (0.0 <= value <= 1.0) or math.isnan(value):
            raise ValueError(f"{path}:{line}: prior {value} is outside [0, 1]")
        if not np.isnan(out[idx]):
            raise ValueError(f"{path}:{line}: class {key!r} appears twice")
        out[idx] = value
    missing = np.flatnonzero(np.isnan(out))
    if missing.size:
        first = manifest.classes[int(missing[0])]
        raise ValueError(f"{path}: {missing.size} classes have no prior (first: {first.id} {first.name!r})")
    return out.astype(np.float32)


def write_priors(path: str, manifest: Manifest, priors: Sequence[float] | np.ndarray) -> None:
    """Write `class_id,name,prior` atomically (a half-written priors file is never read)."""
    priors = np.asarray(priors, dtype=np.float64)
    if priors.shape != (manifest.num_classes,):
        raise ValueError(f"priors has shape {priors.shape}, expected ({manifest.num_classes},)")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["class_id", "name", "prior"])
    for c, p in zip(manifest.classes, priors):
        w.writerow([c.id, c.name, f"{p:.8g}"])
    write_bytes_atomic(path, buf.getvalue().encode())
