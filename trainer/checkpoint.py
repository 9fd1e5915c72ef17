"""The checkpoint layout: what a checkpoint folder holds, how it is written, found and read.

A run folder `{run.storage}/{run.name}` (local or s3://) holds Ray Train's bookkeeping
(`checkpoint_manager_snapshot.json`, naming the latest checkpoint it registered as complete,
i.e. once every rank reported) and checkpoint folders `checkpoint_{step:08d}/`:

| file | written by | read by | bytes/param |
|---|---|---|---|
| `ds/...` | every rank (DeepSpeed: module + per-rank optimizer state) | resume only | 12 fp32, 14 bf16 |
| `ema.safetensors` | rank 0, fp32, when `train.ema_decay > 0`: the EMA, stored once | resume, readers | 4 |
| `model.safetensors` | rank 0, fp32 masters consolidated from the ZeRO partitions: when there is no EMA, and in the run's final checkpoint | readers | 4 |
| `portable.safetensors` | rank 0, when resized or `checkpoint.portable`: fp32 masters, buffers, optimizer state by parameter name | resume at another world size | 12 with Adam |
| `csl_state.json` | rank 0: step, stream cursor, world size, run geometry, running-prior sums, classes, config, `final` | all | - |
| `running_prior.csv` | rank 0: the reference code's running prior (comparison only) | prior pass | - |

So a checkpoint is 18 bytes per parameter in bf16 training (14 + one 4-byte weights file),
with or without an EMA; only the run's last checkpoint adds the raw weights beside the EMA (22).
Readers (eval, predict, export, the prior pass's actors) fetch `csl_state.json` and the ONE
weights file they use, by URL: never the folder, never DeepSpeed's state. At 9,600 classes
with TResNet-M (53 M parameters) that is ~213 MB per reader, which matters when 88 prior-pass
actors start; a 64-GPU run's periodic checkpoint is ~0.95 GB plus DeepSpeed's per-rank files.

Why the raw weights skip the periodic checkpoints of an EMA run: the EMA is what evaluation,
the prior pass and export use by default (`--weights auto`), and the raw fp32 masters are
already in DeepSpeed's optimizer files for resume; a second copy would cost 4 bytes per
parameter at every save and a gather of every ZeRO partition. The final checkpoint keeps them
for `--weights model` (comparing raw and EMA, as the reference code does), consolidated once.

Why `portable.safetensors` rather than DeepSpeed's universal checkpoint: under ZeRO 1-3 the
`ds/` files are cut by rank, and another world size needs the state re-cut. The universal
conversion reads and writes every file with `torch.load(weights_only=False)` (the run folder
may be a shared bucket: we load nothing that way) and has no path for ZeRO-0's plain optimizer.
Ours gathers the state by parameter name with DeepSpeed's `safe_get_full_*` API (every stage
and precision) in a job at the old size, and loads it with `safe_set_full_*` at the new one;
safetensors holds no code. `elastic.py` says when it is written and what it costs.

Why DeepSpeed's folder is written locally, then reported: `save_checkpoint` is collective and
writes per-rank files; `ray.train.report(checkpoint=...)` uploads every rank's files into one
folder and registers it only after all ranks reported, so a partial checkpoint is never
resumed from.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from data_shards.storage import exists, get_fs, join, read_bytes, read_json, write_bytes_atomic

if TYPE_CHECKING:
    import torch

__all__ = [
    "DS_TAG",
    "EMA_FILE",
    "MODEL_FILE",
    "PORTABLE_FILE",
    "RUNNING_PRIOR_FILE",
    "SNAPSHOT",
    "STATE_FILE",
    "checkpoint_name",
    "has_ema",
    "weights_url",
    "latest_checkpoint",
    "read_state",
    "read_weights",
    "portable_weights",
    "read_portable",
    "restore_portable",
    "save_portable",
    "resolve_checkpoint",
    "save_checkpoint",
    "restore_checkpoint",
    "write_weights_checkpoint",
]

STATE_FILE = "csl_state.json"
EMA_FILE = "ema.safetensors"
MODEL_FILE = "model.safetensors"
PORTABLE_FILE = "portable.safetensors"
RUNNING_PRIOR_FILE = "running_prior.csv"
DS_TAG = "ds"
SNAPSHOT = "checkpoint_manager_snapshot.json"


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def latest_checkpoint(run_dir: str) -> str | None:
    """The latest checkpoint Ray registered as complete in a run folder, or None."""
    try:
        snap = read_json(join(run_dir, SNAPSHOT), "Ray Train's checkpoint snapshot")
    except FileNotFoundError:
        return None
    latest = (snap.get("latest_checkpoint_result") or {}).get("checkpoint_dir_name")
    return join(run_dir, latest) if latest else None


def resolve_checkpoint(path: str) -> str:
    """A run folder (its latest complete checkpoint) or one checkpoint folder."""
    fs, p = get_fs(path)
    if not fs.exists(p):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if fs.exists(join(p, STATE_FILE)):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path}: neither a checkpoint folder (no {STATE_FILE}) nor a run folder with a complete checkpoint")
    return latest


def read_state(ckpt: str) -> dict[str, Any]:
    """A checkpoint's `csl_state.json` (one small read)."""
    return read_json(join(ckpt, STATE_FILE), "the checkpoint state")


def has_ema(ckpt: str) -> bool:
    return exists(join(ckpt, EMA_FILE))



def weights_url(ckpt: str, weights: str) -> str:
    """The URL of a checkpoint's EMA ("ema"), raw fp32 ("model") or default ("auto": the EMA
    where there is one) weights; a missing one is refused saying why (no EMA in the run, or raw
    weights kept only in the final checkpoint)."""
    if weights == "auto":
        weights = "ema" if has_ema(ckpt) else "model"
    url = join(ckpt, {"ema": EMA_FILE, "model": MODEL_FILE}[weights])
    if exists(url):
        return url
    if weights == "ema":
        raise FileNotFoundError(f"{ckpt}: no EMA weights (the run had train.ema_decay=0); use weights=model")
    if has_ema(ckpt):
        raise FileNotFoundError(f"{ckpt}: no raw weights here: an EMA run keeps them ({MODEL_FILE}) only in its final "
                                f"checkpoint; use weights=ema, or the run's last checkpoint")
    raise FileNotFoundError(f"{ckpt}: {MODEL_FILE} is missing")


def read_weights(ckpt: str, weights: str) -> dict[str, torch.Tensor]:
    """The EMA ("ema") or raw fp32 ("model") weights of a checkpoint: one file, one read."""
    from safetensors.torch import load

    return load(read_bytes(weights_url(ckpt, weights)))


def save_checkpoint(engine: Any, local_dir: str, rank: int, state: dict[str, Any] | None, *, final: bool = False) -> None:
    """Collective: every rank writes its DeepSpeed files into `local_dir`; rank 0 adds the EMA,
    the consolidated raw weights where they are kept (no EMA, or `final`) and, last,
    `csl_state.json` (`state`, rank 0's)."""
    engine.save(local_dir, DS_TAG)
    ema = engine.ema_module() is not None  # the same on every rank: one config
    full = engine.consolidated_state_dict() if final or not ema else None  # collective: gathers ZeRO partitions
    if rank != 0:
        return
    from safetensors.torch import save_file

    assert state is not None, "rank 0 writes the state file"
    if full is not None:
        save_file(full, os.path.join(local_dir, MODEL_FILE))
    if ema:
        engine.save_ema(os.path.join(local_dir, EMA_FILE))
    write_bytes_atomic(os.path.join(local_dir, STATE_FILE), json.dumps({**state, "final": final}).encode())


def restore_checkpoint(engine: Any, local_dir: str) -> dict[str, Any]:
    """Collective: DeepSpeed state and the EMA back into `engine`; returns `csl_state.json`."""
    ema = os.path.join(local_dir, EMA_FILE)
    engine.load(local_dir, DS_TAG, ema_path=ema if os.path.exists(ema) else None)
    return read_state(local_dir)


def write_weights_checkpoint(folder: str, state_dict: dict[str, Any], config: dict[str, Any], classes: list[Any],
                             *, ema_state_dict: dict[str, Any] | None = None, step: int = 0) -> str:
    """A checkpoint folder from weights alone (no DeepSpeed state: readable, not resumable), for
    an Ignore model trained elsewhere, tests and benches."""
    from safetensors.torch import save

    from .config import Config

    cfg = Config.model_validate(config)
    state = {"step": step, "stream": {}, "world_size": 1, "classes": [c.model_dump() for c in classes],
             "config": cfg.model_dump(mode="json")}
    tensors = {k: v.detach().float().contiguous() if v.is_floating_point() else v.detach().contiguous()
               for k, v in state_dict.items()}
    write_bytes_atomic(join(folder, MODEL_FILE), save(tensors))
    if ema_state_dict is not None:
        write_bytes_atomic(join(folder, EMA_FILE), save({k: v.detach().contiguous() for k, v in ema_state_dict.items()}))
    write_bytes_atomic(join(folder, STATE_FILE), json.dumps(state).encode())
    return folder


def save_portable(engine: Any, local_dir: str, rank: int) -> None:
    """Collective: the world-size-free training state (`Engine.portable_state`); rank 0 writes it."""
    tensors, meta = engine.portable_state()
    if rank != 0:
        return
    from safetensors.torch import save_file

    save_file(tensors, os.path.join(local_dir, PORTABLE_FILE), metadata={"csl_portable": json.dumps(meta)})


def read_portable(local_dir: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, meta) of a local checkpoint's `portable.safetensors`."""
    from safetensors import safe_open

    if not os.path.exists(os.path.join(local_dir, PORTABLE_FILE)):
        raise FileNotFoundError(f"checkpoint {local_dir} has no {PORTABLE_FILE}: its ZeRO state is cut for the world "
                                "size that wrote it; resume with `csl train` (which converts it) or at that size")
    with safe_open(os.path.join(local_dir, PORTABLE_FILE), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["csl_portable"])


def portable_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The module state dict inside a portable state: load it before `setup_engine`."""
    return {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(("master/", "buffer/"))}


def restore_portable(engine: Any, local_dir: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Collective: the portable state and the EMA into `engine` (at any world size); returns
    `csl_state.json`."""
    engine.load_portable_state(tensors, meta)
    ema = os.path.join(local_dir, EMA_FILE)
    if engine.ema_module() is not None and os.path.exists(ema):
        engine.load_ema(ema)
    return read_state(local_dir)
