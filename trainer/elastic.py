"""Continuing a run at another world size: the run's geometry, what each size runs to keep it,
and the one conversion of ZeRO state that another size needs.

The geometry is fixed when a run starts and saved in every checkpoint: its data lanes (the
canonical ranks of `data_shards/partition.py`, `data.lanes`, default the starting world size),
the samples per lane batch, and the lane batches per optimizer step (`train.grad_accum`).
Global batch = lanes x lane batch x grad_accum = the starting `data.batch_size x
cluster.workers x train.grad_accum`, so existing configs keep their meaning. At world size W
(a divisor of the lanes, else refused naming those that work) `fit` picks the per-worker batch
(the largest multiple of the lane batch that is no larger than the run's `data.batch_size`, so
memory per GPU never grows) and the accumulation that make up the rest; the step count, the LR
schedule and the epoch boundaries are the run's at every size. A loss with `reduction="sum"`
is scaled by the ratio of per-worker batches so that the gradient of a global batch is the same
sum over the same samples (DeepSpeed divides by ranks x accumulation).

Model state. ZeRO 0 keeps the whole optimizer in DeepSpeed's rank-0 file, and DeepSpeed loads
it at any world size (exactly: measured against the state gathered by name). ZeRO 1-3 cut it
by rank and DeepSpeed refuses another size. Such a checkpoint is converted once, when a run
resumes at another size and the checkpoint has no `portable.safetensors` (`checkpoint.py`):
a Ray Train job of `old world size` CPU workers restores it at its own size (the exact
same-size path, every file read with weights_only=True) and gathers the state by parameter
name (`Engine.portable_state`); rank 0 writes it with one atomic put into the checkpoint
folder, so a crash leaves either no file (converted again next time) or a whole one. An
elastic group (`cluster.min_workers`) cannot stop for that: Ray restarts it inside `fit()`, so
its checkpoints carry `portable.safetensors` from the start (`checkpoint.portable`).

Cost at 9M images x 9,600 classes (TResNet-M, 53 M parameters, Adam, bf16) on 64 GPUs: the
portable file is 12 bytes/parameter (~0.64 GB) written by rank 0; the conversion job reads
DeepSpeed's files once per old rank (each worker fetches the checkpoint folder, ~1 GB of ds/
state in all at 14 bytes/parameter) and needs 64 CPU slots with ~2 GB of memory each (the
model, its partition and the gathered tensors). The lane plan costs each DataLoader worker one
int64 window order per (lane, lane worker) it reads: 9M / (64 lanes x 8 workers) = 17.6k
positions, 140 kB, plus the shard permutation (a few thousand shards); nothing per sample is
held beyond that, on any rank or on the driver.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

from data_shards.partition import lane_layout, num_batches
from data_shards.storage import get_fs, join, write_bytes_atomic

from .config import Config, ConfigError

__all__ = ["Geometry", "Shape", "convert_checkpoint", "fit", "geometry_from_state", "geometry_of",
           "needs_conversion", "total_steps"]


@dataclass(frozen=True)
class Geometry:
    """What fixes a run's data order and schedule at every world size."""

    lanes: int
    lane_batch: int  # samples per lane per lane batch
    lane_steps: int  # lane batches per optimizer step (the run's train.grad_accum)
    batch_size: int  # the run's per-worker micro-batch: the ceiling at other sizes
    world_size: int  # the size the run started at

    @property
    def global_batch(self) -> int:
        return self.lanes * self.lane_batch * self.lane_steps

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Shape:
    """What one world size runs to keep a geometry."""

    world_size: int
    batch_size: int  # per worker per micro-step
    grad_accum: int
    lanes_per_batch: int
    loss_scale: float  # for reduction="sum": the run's per-worker batch / this one

    def describe(self, g: Geometry, old_world_size: int) -> str:
        return (f"world size {old_world_size} -> {self.world_size}: per-worker batch {self.batch_size}, "
                f"grad_accum {self.grad_accum} (global batch {g.global_batch} as the run's, "
                f"{g.lanes} data lanes)")


def geometry_of(cfg: Config) -> Geometry:
    """A new run's geometry, from its config."""
    w, b, accum = cfg.cluster.workers, cfg.data.batch_size, cfg.train.grad_accum
    lanes = cfg.data.lanes or w
    if lanes % w or (b * w) % lanes:
        raise ConfigError(f"config key 'data.lanes': {lanes} must be a multiple of cluster.workers={w} and divide "
                          f"the {b * w} samples of a global micro-step (data.batch_size x cluster.workers)")
    return Geometry(lanes=lanes, lane_batch=b * w // lanes, lane_steps=accum, batch_size=b, world_size=w)


def geometry_from_state(state: dict[str, Any]) -> Geometry:
    """A checkpoint's geometry; checkpoints from before lanes had one lane per rank."""
    if state.get("geometry"):
        return Geometry(**state["geometry"])
    cfg, w = state["config"], int(state["world_size"])
    b = cfg["data"]["batch_size"]
    return Geometry(lanes=w, lane_batch=b, lane_steps=cfg["train"]["grad_accum"], batch_size=b, world_size=w)


def fit(g: Geometry, world_size: int) -> Shape:
    """The per-worker batch and accumulation that keep `g` at `world_size`; ValueError (naming
    the sizes that work) when it cannot."""
    lane_layout(g.lanes, world_size)
    m = g.lanes // world_size
    q = max(d for d in range(1, m + 1) if m % d == 0 and (d == 1 or d * g.lane_batch <= g.batch_size))
    batch = q * g.lane_batch
    return Shape(world_size=world_size, batch_size=batch, grad_accum=(m // q) * g.lane_steps, lanes_per_batch=q,
                 loss_scale=g.batch_size / batch)


def total_steps(cfg: Config, g: Geometry, samples: int) -> int:
    """Optimizer steps of the whole run: the same at every world size."""
    per_epoch = num_batches(samples, g.lanes, g.lane_batch) // g.lane_steps
    if per_epoch < 1:
        raise ValueError(f"{samples} samples give fewer lane batches per epoch than train.grad_accum={g.lane_steps}")
    total = per_epoch * cfg.train.epochs
    return min(total, cfg.train.max_steps) if cfg.train.max_steps else total


def needs_conversion(cfg: Config, state: dict[str, Any], ckpt: str, world_size: int) -> bool:
    """Whether resuming `ckpt` at `world_size` needs `convert_checkpoint` first."""
    from .checkpoint import PORTABLE_FILE

    from data_shards.storage import exists

    return (int(state["world_size"]) != world_size and cfg.deepspeed.zero_stage > 0
            and not exists(join(ckpt, PORTABLE_FILE)))


def _convert_worker(payload: dict[str, Any]) -> None:
    import ray.train

    from data_shards.storage import read_manifest

    from .checkpoint import PORTABLE_FILE, read_state, restore_checkpoint, save_portable
    from .engine import setup_engine
    from .models import build_model

    ctx = ray.train.get_context()
    rank, ws = ctx.get_world_rank(), ctx.get_world_size()
    cfg, ckpt = Config.model_validate(payload["config"]), payload["checkpoint"]
    local = tempfile.mkdtemp(prefix=f"csl-convert-{rank}-")
    try:
        fs, path = get_fs(ckpt)
        fs.get(path.rstrip("/") + "/", local + "/", recursive=True)
        state = read_state(local)
        g = geometry_from_state(state)
        shape = fit(g, ws)
        samples = sum(s.samples for s in read_manifest(cfg.data.root).split(cfg.data.train_split).shards)
        model = build_model(cfg.model, len(state["classes"]))
        engine = setup_engine(model, cfg, ws, total_steps(cfg, g, samples), micro_batch=shape.batch_size,
                              grad_accum=shape.grad_accum)
        restore_checkpoint(engine, local)  # collective: the exact same-size path
        save_portable(engine, local, rank)  # collective gather; rank 0 writes
        if rank == 0:
            with open(os.path.join(local, PORTABLE_FILE), "rb") as f:
                write_bytes_atomic(join(ckpt, PORTABLE_FILE), f.read())
    finally:
        shutil.rmtree(local, ignore_errors=True)


def convert_checkpoint(cfg: Config, ckpt: str, world_size: int) -> float:
    """Driver: write `portable.safetensors` into `ckpt` with a CPU Ray Train job at the
    checkpoint's own `world_size`; returns the seconds it took."""
    import ray.train
    from ray.train.torch import TorchTrainer

    t0 = time.perf_counter()
    scratch = tempfile.mkdtemp(prefix="csl-convert-")
    try:
        TorchTrainer(
            _convert_worker,
            train_loop_config={"config": cfg.model_dump(mode="json"), "checkpoint": ckpt},
            scaling_config=ray.train.ScalingConfig(num_workers=world_size, use_gpu=False,
                                                   resources_per_worker={"CPU": 1}),
            run_config=ray.train.RunConfig(name="convert", storage_path=scratch,
                                           failure_config=ray.train.FailureConfig(max_failures=1)),
        ).fit()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return time.perf_counter() - t0
