"""Label priors: reading and writing the per-class prior CSV the Selective loss consumes.

Our format is `class_id,name,prior` (one row per class, any order, matched to the dataset by
class id). The public reference code writes `Classes,avg_pred`, where `Classes` holds class
names or ids; those are matched by id first, then by display name, and display names that
repeat (OpenImages has some) are an error rather than a guess. Every class of the dataset must
get exactly one prior in [0, 1]; a file that misses or repeats classes is rejected with the
row that is wrong.

The distributed estimation pass (an Ignore-mode model over the training shards, paper 1
eq. 10-11) writes these files; it lives beside this module in `prior_pass.py`.

`RunningPrior` is the other estimator the paper's public reference code uses: a running mean of
the Ignore model's sigmoid outputs *during training* (its `ComputePrior`: a cumulative sum over
every training batch since step 0, divided by the sample count). It is cheap (no extra pass) but
biased: early, untrained outputs (about 0.5 everywhere at initialisation) stay in the mean, and
the inputs are augmented training views. `decay` turns it into an exponential moving average
of per-batch means (bias-corrected, as Adam's moments are) that forgets the early steps. It
keeps its state on the model's device and never reads it back during `update`, so a training
step stays free of host syncs; `value()` is the one sync, for checkpoints.
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from data_shards.format import Manifest
from data_shards.storage import read_bytes, write_bytes_atomic

if TYPE_CHECKING:
    import torch

__all__ = ["read_priors", "write_priors", "RunningPrior"]


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


class RunningPrior:
    """Online prior from the training outputs: `update(probs)` per batch, `value()` at the end.

    decay=None: the reference code's cumulative mean over every sample seen (sum / count).
    decay in (0, 1): an exponential moving average of per-batch means, bias-corrected.
    The state is a float64 [C] tensor on `device` plus host-side counters (batch sizes are
    known on the host), so `update` queues device work only.
    """

    def __init__(self, num_classes: int, *, decay: float | None = None, device: Any = None):
        import torch

        if num_classes < 1:
            raise ValueError(f"RunningPrior: num_classes must be >= 1, got {num_classes}")
        if decay is not None and not 0.0 < decay < 1.0:
            raise ValueError(f"RunningPrior: decay must be in (0, 1) or None, got {decay}")
        self.num_classes, self.decay = num_classes, decay
        self.acc = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.count = 0  # samples seen
        self.weight = 0.0  # EMA mode: total weight of the average (1 - decay^steps)

    def update(self, probs: "torch.Tensor") -> None:
        """Add a batch of sigmoid outputs, float [B, C] (any device/dtype; no host sync)."""
        if probs.dim() != 2 or probs.shape[1] != self.num_classes:
            raise ValueError(f"RunningPrior.update: expected probs [B, {self.num_classes}], got {tuple(probs.shape)}")
        b = probs.shape[0]
        if b == 0:
            return
        p = probs.detach().to(self.acc.device)
        if self.decay is None:
            self.acc += p.sum(0, dtype=self.acc.dtype)
        else:
            self.acc.mul_(self.decay).add_(p.mean(0, dtype=self.acc.dtype), alpha=1.0 - self.decay)
            self.weight = self.weight * self.decay + (1.0 - self.decay)
        self.count += b

    def value(self) -> "torch.Tensor":
        """float64 [C] prior on the state's device (a host sync if you move it)."""
        if self.count == 0:
            raise ValueError("RunningPrior.value: no samples seen yet")
        return self.acc / (self.count if self.decay is None else self.weight)

    def all_reduce(self) -> None:
        """Combine the ranks' states in place (collective: every rank calls it).

        Cumulative mode sums sums and counts: exact. EMA mode averages the ranks' averages,
        which equals the EMA of global batch means when ranks take equal batches (ours do).
        """
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        n = torch.tensor([float(self.count)], dtype=torch.float64, device=self.acc.device)
        dist.all_reduce(self.acc)
        dist.all_reduce(n)
        self.count = int(n.item())
        if self.decay is not None:
            self.acc /= dist.get_world_size()

    def state_dict(self) -> dict[str, Any]:
        return {"acc": self.acc.detach().cpu().clone(), "count": self.count, "weight": self.weight, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        acc = state["acc"]
        if tuple(acc.shape) != (self.num_classes,):
            raise ValueError(f"RunningPrior.load_state_dict: state has {tuple(acc.shape)} classes, expected ({self.num_classes},)")
        if state.get("decay") != self.decay:
            raise ValueError(f"RunningPrior.load_state_dict: state has decay {state.get('decay')}, this one {self.decay}")
        self.acc.copy_(acc.to(self.acc.dtype))
        self.count, self.weight = int(state["count"]), float(state["weight"])
