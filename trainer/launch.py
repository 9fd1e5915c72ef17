"""The Ray driver: one `TorchTrainer` per `csl train`, resumable by run name.

The run folder is `{run.storage}/{run.name}` (a local folder or an fsspec URL). Ray Train V2
keeps its checkpoint bookkeeping there (`checkpoint_manager_snapshot.json`), so starting the
same command again, with the same run name, finds the latest *complete* checkpoint: Ray
registers a checkpoint only after every rank has reported it, so a checkpoint half written by
a dying worker is never resumed from. After a worker failure inside one run, Ray restarts the
worker group (up to `cluster.max_failures` times) and the loop resumes the same way.

Everything the workers need crosses the Ray boundary as plain data (the config as a dict and
the run folder as a string); the worker rebuilds the typed config (see `loop.py`).

Remote storage goes through our own fsspec filesystem wrapped for pyarrow, so Ray sees the
same endpoint and credentials as the data reader (e.g. a MinIO or the test server).
"""

from __future__ import annotations

import os
import time
from typing import Any

from data_shards.partition import num_batches
from data_shards.storage import exists, get_fs, is_remote, join, read_manifest, redact

from .checkpoint import MODEL_FILE, latest_checkpoint, read_state
from .config import Config, ConfigError

__all__ = ["run_dir_of", "launch", "check_inputs", "check_resumable", "ensure_ray"]


def run_dir_of(cfg: Config) -> str:
    storage = cfg.run.storage if is_remote(cfg.run.storage) else os.path.abspath(cfg.run.storage)
    return join(storage, cfg.run.name)


def _storage_for_ray(run_storage: str) -> tuple[str, Any]:
    if not is_remote(run_storage):
        return os.path.abspath(run_storage), None
    import pyarrow.fs as pafs

    fs, path = get_fs(run_storage)
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def check_inputs(cfg: Config) -> None:
    """Fail fast, before any worker starts, on what the config alone cannot know.

    The data root, its splits and the prior file exist; every rank gets the same number of
    batches of each split (the stream's plan) and an epoch at least one optimizer step; the
    model is known and its weights file exists; the loss takes its parameters and has what it
    needs (a prior, the EMA model).
    """
    manifest = read_manifest(cfg.data.root)  # names the path when missing
    workers, batch_size, accum = cfg.cluster.workers, cfg.data.batch_size, cfg.train.grad_accum
    root = redact(cfg.data.root)
    for split in (cfg.data.train_split, cfg.data.val_split):
        samples = sum(s.samples for s in manifest.split(split).shards)
        try:
            batches = num_batches(samples, workers, batch_size)
        except ValueError as e:
            raise ValueError(f"split {split!r} of {root} with cluster.workers={workers} and "
                             f"data.batch_size={batch_size}: {e}") from None
        if split == cfg.data.train_split and batches < accum:
            raise ValueError(f"split {split!r} of {root} gives {batches} batches per rank and epoch, fewer "
                             f"than train.grad_accum={accum}: one epoch would make no optimizer step")
    from .models import MODELS

    if cfg.model.name not in MODELS and not cfg.model.name.startswith("timm:"):
        raise ConfigError(f"config key 'model.name': unknown model {cfg.model.name!r} "
                          f"(known: {', '.join(MODELS)}, or timm:<name>)")
    if cfg.model.pretrained and not exists(cfg.model.pretrained):
        raise FileNotFoundError(f"model.pretrained {redact(cfg.model.pretrained)!r}: file not found")
    if cfg.loss.name == "pseudo" and cfg.train.ema_decay == 0:
        raise ConfigError("loss 'pseudo' takes its pseudo-labels from the EMA model: set train.ema_decay > 0")
    from .losses import build_loss

    if cfg.prior.path:
        from .priors import read_priors

        read_priors(cfg.prior.path, manifest)
    elif cfg.loss.name == "csl-soft":
        raise ValueError("loss 'csl-soft' needs prior.path (a priors CSV from `csl prior`)")
    build_loss(cfg.loss.name, prior=None, **cfg.loss.params())  # bad loss params: exit 2 now


# Settings a resumed run must share with its checkpoint: they fix the LR schedule (OneCycle is
# built for a total step count), the optimizer state's shape, the model and the data order.
_TRAJECTORY = {
    "data": ("batch_size", "image_size", "shuffle_buffer", "train_split"),
    "model": ("name", "head", "bottleneck_dim"),
    "loss": None,
    "optim": None,
    "train": ("epochs", "seed", "max_steps", "grad_accum", "precision", "ema_decay", "ema_warmup_steps"),
    "deepspeed": None,
}


def _trajectory_changes(old: Config, new: Config) -> list[str]:
    # Only OneCycle is built for a total step count: with a constant LR, training longer (more
    # epochs, a higher max_steps) continues the same trajectory.
    extendable = {"epochs", "max_steps"} if old.optim.schedule == new.optim.schedule == "constant" else set()
    out = []
    for section, keys in _TRAJECTORY.items():
        a, b = getattr(old, section).model_dump(), getattr(new, section).model_dump()
        for k in keys or sorted(set(a) | set(b)):
            if section == "train" and k in extendable:
                continue
            if a.get(k) != b.get(k):
                out.append(f"{section}.{k}: {a.get(k)!r} -> {b.get(k)!r}")
    return out


def check_resumable(cfg: Config, checkpoint: str) -> None:
    """Refuse, before any worker starts, a resume whose optimizer state cannot be exact.

    ZeRO partitions optimizer state by rank and the data cursor is planned per world size:
    loading them into another world size would silently mix state. The consolidated weights
    in the checkpoint are the way to continue with another size, as a new run.
    """
    state = read_state(checkpoint)
    changed = _trajectory_changes(Config.model_validate(state["config"]), cfg)
    if changed:
        raise ValueError(
            f"run {cfg.run.name!r}: resuming with changed settings ({'; '.join(changed)}); the checkpoint's LR "
            f"schedule, optimizer state and data order were built for the old ones. Resume with the same settings, or "
            f"start a new run.name with model.pretrained={join(checkpoint, MODEL_FILE)}"
        )
    if state["world_size"] != cfg.cluster.workers:
        raise ValueError(
            f"run {cfg.run.name!r}: checkpoint {checkpoint} was written by {state['world_size']} workers, this run has "
            f"cluster.workers={cfg.cluster.workers}; resume with cluster.workers={state['world_size']}, or start a new "
            f"run.name with model.pretrained={join(checkpoint, MODEL_FILE)} (weights only, fresh optimizer)"
        )


# What a local cluster started by `ensure_ray` leaves off; each is an environment default, so
# a user's own setting wins. On 2 cores, Ray's own processes (GCS, raylet, dashboard, log
# monitor, six Train actors) take 13-14% of one core from the training ranks. Scratch, 2026-11-22,
# interleaved: during the benchmark's csl run these four take them from 14.2 / 13.2 / 14.0% to
# 11.0 / 11.6 / 11.7% of a core (per-process /proc CPU over 100 steps), and an idle 2-worker
# Train job from 15.2 / 13.9% to 12.7 / 11.7% (/proc/stat over 20 s).
LOCAL_RAY_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # one machine: no spot nodes to be preempted
    "RAY_TRAIN_METRICS_ENABLED": "0",  # Train's Prometheus metrics: nothing scrapes a local cluster
    "RAY_enable_metrics_collection": "0",  # the same for Ray core's metrics agent
    "RAY_event_stats": "0",  # per-handler event-loop statistics, a debugging aid
}


def ensure_ray() -> bool:
    """Join the cluster at RAY_ADDRESS, else start a local one; True if this call started Ray.

    The local cluster keeps Ray's dashboard process (on 127.0.0.1): Ray Train's placement
    group cleaner polls the state API it serves, and without it warns every second and
    cannot clean up after a crashed controller. It leaves off what only a multi-node or
    monitored cluster uses (`LOCAL_RAY_ENV`, set in this process's environment, which Ray's
    processes and the Train controller inherit). A cluster at RAY_ADDRESS is the operator's.
    """
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)
        ray.init(log_to_driver=True, dashboard_host="127.0.0.1")
    return True


def launch(cfg: Config) -> dict[str, Any]:
    """Run (or resume) training; returns the final metrics reported by rank 0."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from .loop import train_loop_per_worker

    check_inputs(cfg)
    run_dir = run_dir_of(cfg)
    resume_from = latest_checkpoint(run_dir)
    if resume_from:
        check_resumable(cfg, resume_from)
        print(f"resuming run {cfg.run.name!r} from {resume_from}", flush=True)
    else:
        print(f"starting run {cfg.run.name!r} in {run_dir}", flush=True)
    cfg.save_resolved(join(run_dir, "config.yaml"))

    ensure_ray()
    storage_path, storage_fs = _storage_for_ray(cfg.run.storage)
    use_gpu = cfg.cluster.gpus_per_worker > 0
    resources = {"CPU": cfg.cluster.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.cluster.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "run_dir": run_dir},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.cluster.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.cluster.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
        ),
    )
    t0 = time.time()
    result = trainer.fit()
    if result.error is not None:
        raise RuntimeError(f"training run {cfg.run.name!r} failed: {result.error}") from result.error
    print(f"run {cfg.run.name!r} finished in {time.time() - t0:.0f}s; checkpoint {result.checkpoint.path if result.checkpoint else None}", flush=True)
    return dict(result.metrics or {})
