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

The console shows the driver's own lines (progress, checkpoints, evaluations, failures) and
leaves worker output to files unless `verbose`; `console.py` says how and why.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from data_shards.format import MANIFEST_NAME
from data_shards.partition import num_batches, valid_world_sizes
from data_shards.storage import exists, get_fs, is_remote, join, read_bytes, read_manifest, redact

from .checkpoint import latest_checkpoint, read_state, weights_url
from .config import Config, ConfigError
from .preflight import check_nodes

__all__ = ["run_dir_of", "training_done", "launch", "check_inputs", "check_resumable", "ensure_ray"]


def run_dir_of(cfg: Config) -> str:
    storage = cfg.run.storage if is_remote(cfg.run.storage) else os.path.abspath(cfg.run.storage)
    return join(storage, cfg.run.name)


def training_done(cfg: Config) -> dict[str, Any] | None:
    """The final eval of a finished training run, or None if it has not finished."""
    path = join(run_dir_of(cfg), "eval.json")
    return json.loads(read_bytes(path)) if exists(path) else None


def _storage_for_ray(run_storage: str) -> tuple[str, Any]:
    if not is_remote(run_storage):
        return os.path.abspath(run_storage), None
    import pyarrow.fs as pafs

    fs, path = get_fs(run_storage)
    return path, pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def check_inputs(cfg: Config, geometry: Any = None) -> Any:
    """Fail fast, before any worker starts, on what the config alone cannot know; returns the
    data's manifest.

    The data root, its splits and the prior file exist; every rank gets the same number of
    batches of each split (the stream's plan) and an epoch at least one optimizer step; the
    model is known and its weights file exists; the loss takes its parameters and has what it
    needs (a prior, the EMA model).
    """
    from .elastic import geometry_of

    manifest = read_manifest(cfg.data.root)  # names the path when missing
    workers, batch_size, accum = cfg.cluster.workers, cfg.data.batch_size, cfg.train.grad_accum
    root = redact(cfg.data.root)
    g = geometry or geometry_of(cfg)  # a resumed run's geometry is its checkpoint's; ConfigError on data.lanes
    lo = cfg.cluster.min_workers or workers
    if g.lanes % lo:
        raise ConfigError(f"config key 'cluster.min_workers': {lo} does not divide the run's {g.lanes} data lanes "
                          f"(data.lanes); sizes that do: {', '.join(map(str, valid_world_sizes(g.lanes)))}")
    for split in (cfg.data.train_split, cfg.data.val_split):
        samples = sum(s.samples for s in manifest.split(split).shards)
        # the train split is cut into lanes (the same at every world size), val into ranks
        lanes, b = (g.lanes, g.lane_batch) if split == cfg.data.train_split else (workers, batch_size)
        try:
            batches = num_batches(samples, lanes, b)
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
    return manifest


# Settings a resumed run must share with its checkpoint: they fix the LR schedule (OneCycle is
# built for a total step count), the optimizer state's shape, the model and the data order.
_TRAJECTORY = {
    "data": ("batch_size", "image_size", "shuffle_buffer", "train_split", "lanes"),
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
    """Refuse, before any worker starts, a resume whose trajectory would change.

    Another `cluster.workers` is allowed when it divides the run's data lanes: the data cursor
    and the global batch are the run's at that size (`elastic.py`); any other size is refused
    naming those that work.
    """
    state = read_state(checkpoint)
    changed = _trajectory_changes(Config.model_validate(state["config"]), cfg)
    if changed:
        raise ValueError(
            f"run {cfg.run.name!r}: resuming with changed settings ({'; '.join(changed)}); the checkpoint's LR "
            f"schedule, optimizer state and data order were built for the old ones. Resume with the same settings, or "
            f"start a new run.name with model.pretrained={weights_url(checkpoint, 'auto')}"
        )
    from .elastic import fit, geometry_from_state

    g = geometry_from_state(state)
    try:
        fit(g, cfg.cluster.workers)
    except ValueError as e:
        raise ValueError(
            f"run {cfg.run.name!r}: checkpoint {checkpoint} cannot continue with cluster.workers={cfg.cluster.workers}: "
            f"{e}; or start a new run.name with model.pretrained={weights_url(checkpoint, 'auto')} (weights only, fresh optimizer)"
        ) from None


# What a local cluster started by `ensure_ray` leaves off: services only a multi-node or monitored
# cluster uses, whose CPU on a small machine would come out of training. Each is an environment
# default, so a user's own setting wins.
LOCAL_RAY_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # one machine: no spot nodes to be preempted
    "RAY_TRAIN_METRICS_ENABLED": "0",  # Train's Prometheus metrics: nothing scrapes a local cluster
    "RAY_enable_metrics_collection": "0",  # the same for Ray core's metrics agent
    "RAY_event_stats": "0",  # per-handler event-loop statistics, a debugging aid
}


def ensure_ray(verbose: bool = False) -> bool:
    """Join the cluster at RAY_ADDRESS, else start a local one; True if this call started Ray.

    The local cluster keeps Ray's dashboard process (on 127.0.0.1): Ray Train's placement
    group cleaner polls the state API it serves, and without it warns every second and
    cannot clean up after a crashed controller. It leaves off what only a multi-node or
    monitored cluster uses (`LOCAL_RAY_ENV`, set in this process's environment, which Ray's
    processes and the Train controller inherit). A cluster at RAY_ADDRESS is the operator's.
    Unless `verbose`, workers' output stays in their log files and Ray's own records keep one
    line each on this console (see `console.py`).
    """
    import ray

    if ray.is_initialized():
        return False
    if not verbose:
        from .console import quiet_ray_logging

        quiet_ray_logging()  # before init: it logs too (token auth, "Started a local Ray instance")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=verbose)
    else:
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)
        ray.init(log_to_driver=verbose, dashboard_host="127.0.0.1")
    return True


def _train_worker(payload: dict[str, Any]) -> None:
    """Ray Train's entry point: this rank's Python logging to its file, then the loop."""
    import ray.train

    from .console import worker_logging
    from .loop import train_loop_per_worker

    with worker_logging(payload["run_dir"], ray.train.get_context().get_world_rank()):
        train_loop_per_worker(payload)


def _log_places(run_dir: str) -> tuple[str, str]:
    """(the driver's Ray log file, the console line that says where the logs are) for this run."""
    from .console import ray_log_dir

    if is_remote(run_dir):  # an object store takes no appends: Ray's own log folders
        here, name = ray_log_dir(), run_dir.rstrip("/").rsplit("/", 1)[-1]
        return (os.path.join(here, f"csl-driver-{name}.log"),
                f"logs: in Ray's log folder on each node ({here} here, with csl-driver-{name}.log from this driver)")
    logs = os.path.join(run_dir, "logs")
    return os.path.join(logs, "driver.log"), f"logs: {logs} (rank*.log from the workers, driver.log from Ray here)"


def _trainer(cfg: Config, run_dir: str, console_channel: Any, geometry: dict[str, int]) -> Any:
    import ray.train
    from ray.train.torch import TorchTrainer

    from .console import console_callback

    storage_path, storage_fs = _storage_for_ray(cfg.run.storage)
    use_gpu = cfg.cluster.gpus_per_worker > 0
    resources = {"CPU": cfg.cluster.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = cfg.cluster.gpus_per_worker
    return TorchTrainer(
        _train_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "run_dir": run_dir, "console": console_channel,
                           "geometry": geometry},
        scaling_config=ray.train.ScalingConfig(
            # (min, max): Ray Train's elastic group, restarted at the size it can get
            num_workers=(lo, cfg.cluster.workers) if (lo := cfg.cluster.min_workers or cfg.cluster.workers) < cfg.cluster.workers
            else cfg.cluster.workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.cluster.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            callbacks=[console_callback(console_channel)],
        ),
    )


def launch(cfg: Config, verbose: bool = False) -> dict[str, Any]:
    """Run (or resume) training; returns the final metrics reported by rank 0."""
    from ray.train import TrainingFailedError  # imports Ray Data, which sets up its logger: quieted below

    from .console import DriverConsole, driver_log, failure_summary, quiet_ray_logging
    from .elastic import convert_checkpoint, geometry_from_state, geometry_of, needs_conversion, total_steps

    run_dir = run_dir_of(cfg)
    resume_from = latest_checkpoint(run_dir)
    start_step, state, geometry = 0, {}, None
    if resume_from:  # the run's geometry is its checkpoint's: sizes are checked against it
        check_resumable(cfg, resume_from)
        state = read_state(resume_from)
        start_step, geometry = int(state["step"]), geometry_from_state(state)
    manifest = check_inputs(cfg, geometry)
    geometry = geometry or geometry_of(cfg)
    if resume_from and start_step >= total_steps(cfg, geometry, manifest.split(cfg.data.train_split).samples):
        # The same command after the run finished (a rerun pipeline, a restarted job): nothing
        # to train, so no cluster is joined and no worker started; eval.json stays as it was.
        print(f"run {cfg.run.name!r} already finished at step {start_step}: nothing to do", flush=True)
        return training_done(cfg) or {}
    if resume_from:
        old, new = int(state["world_size"]), cfg.cluster.workers
        size = f" at {new} workers (written by {old})" if old != new else ""
        print(f"resuming run {cfg.run.name!r} from {resume_from} (step {start_step}){size}", flush=True)
    else:
        print(f"starting run {cfg.run.name!r} in {run_dir}", flush=True)
    cfg.save_resolved(join(run_dir, "config.yaml"))

    ensure_ray(verbose)
    if not verbose:
        quiet_ray_logging()  # again, for the loggers imported since Ray started
    if resume_from and needs_conversion(cfg, state, resume_from, cfg.cluster.workers):
        seconds = convert_checkpoint(Config.model_validate(state["config"]), resume_from, int(state["world_size"]))
        print(f"converted {resume_from} to the world-size-free layout in {seconds:.1f}s", flush=True)
    check_nodes(read=[("data.root", join(cfg.data.root, MANIFEST_NAME))], write=[("run.storage", run_dir)])
    driver_log_path, where = _log_places(run_dir)
    print(where, flush=True)
    console = DriverConsole(run_dir, start_step=start_step, max_failures=cfg.cluster.max_failures)
    t0 = time.time()
    with driver_log(driver_log_path):
        try:
            result = _trainer(cfg, run_dir, console.start(), geometry.to_dict()).fit()
        except TrainingFailedError as e:  # its text holds every rank's traceback: one line here
            raise RuntimeError(f"training run {cfg.run.name!r} failed: {failure_summary(e)} "
                               f"(in full: {driver_log_path})") from e
        finally:
            console.close()
    if result.error is not None:
        raise RuntimeError(f"training run {cfg.run.name!r} failed: {result.error}") from result.error
    if resume_from and not console.checkpoints:  # the loop found nothing to train and wrote nothing
        print(f"run {cfg.run.name!r} already finished at step {start_step}: nothing to do", flush=True)
    else:
        last = join(run_dir, os.path.basename(result.checkpoint.path)) if result.checkpoint else None
        print(f"run {cfg.run.name!r} finished in {time.time() - t0:.0f}s; checkpoint {last}", flush=True)
    return dict(result.metrics or {})
