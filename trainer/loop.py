"""The per-worker training loop: stream -> device -> model -> loss -> DeepSpeed step, with exact resume.

Shape (torchtitan's): `train_loop_per_worker` is the Ray glue; `run_training` sets up and runs
the epochs; `train_step` is one micro-batch; `maybe_log` and `maybe_checkpoint` run after each
optimizer step. The loop takes its Ray calls through a small `Hooks` object, so it also runs in
a plain process (tests/test_loop.py). Debug aids (fault injection, key recording) come from the
config's `debug` section, never from the environment.

Batches reach the model through `prefetch.DevicePrefetcher`: uint8 from the stream (pinned on
CUDA), copied with `non_blocking=True` and normalised on the device, the next batch's copy in
flight during this step.

Exactness. A checkpoint (layout, writing and reading: `checkpoint.py`) holds, besides
DeepSpeed's model/optimizer/scheduler state: the optimizer step, the epoch, the stream cursor
(epoch, batches consumed; the prefetcher's, which does not count the batch it holds ahead) and
the EMA weights. The cursor is rank-independent (every rank yields the same number of
batches), so rank 0's copy is valid for all ranks. Flips are a function of (seed, epoch,
sample), so a resumed run consumes the same pixels in the same order and, with gloo's fixed
reduction order, reaches the same weights as an uninterrupted one.

Checkpoint protocol (Ray Train V2): every rank calls DeepSpeed's collective `save_checkpoint`
into its own local folder, then `ray.train.report(..., checkpoint=...)`, which uploads every
rank's files into one checkpoint folder and registers it only after all ranks reported: a
partial checkpoint is never resumed from. `report` is a barrier, so it is called at the same
steps on every rank (equal batch counts make that automatic).

Host syncs: the loss is accumulated as a tensor and read once every `train.log_every` steps.

Skipped samples (`data.corrupt=skip`): a batch can come out smaller, or empty when every sample
in it was unreadable. An empty batch still goes through forward and backward (zero rows, zero
loss, zero gradients), so every rank takes the same steps and the collectives stay matched;
the skipped count, summed over ranks at log steps, is in `metrics.jsonl` and `eval.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from data_shards.storage import get_fs, is_remote, join, read_manifest, write_bytes_atomic

from .checkpoint import (RUNNING_PRIOR_FILE, checkpoint_name, portable_weights, read_portable, read_state,
                         restore_checkpoint, restore_portable, save_checkpoint, save_portable)
from .config import Config, DebugConfig
from .priors import RunningPrior, write_priors

__all__ = ["Hooks", "evaluate", "maybe_checkpoint", "maybe_log", "run_training", "train_loop_per_worker",
           "train_step"]


@dataclass
class Hooks:
    """What the loop needs from its launcher (Ray Train, or a plain process in tests)."""

    report: Callable[[dict[str, Any], Optional[str], Optional[str]], None]
    restore_dir: Callable[[], Any]  # a context manager yielding a local checkpoint dir, or None
    progress: Callable[[dict[str, Any]], None] = field(default=lambda rec: None)  # rank 0's log records, to the console


class _RunLog:
    """metrics.jsonl and TensorBoard for rank 0; remote run folders get periodic uploads.

    On resume, lines past the resumed step are dropped: they came from steps that are being
    redone, and a log with two different values for one step would lie.
    """

    def __init__(self, run_dir: str, resume_step: int):
        self.run_dir = run_dir
        self.remote = is_remote(run_dir)
        self.local_dir = tempfile.mkdtemp(prefix="csl-log-") if self.remote else run_dir
        os.makedirs(self.local_dir, exist_ok=True)
        self.path = os.path.join(self.local_dir, "metrics.jsonl")
        lines: list[str] = []
        fs, remote_path = get_fs(join(run_dir, "metrics.jsonl"))
        if fs.exists(remote_path):
            with fs.open(remote_path, "r") as f:
                lines = [ln for ln in f.read().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
        with open(self.path, "w") as f:
            f.writelines(ln + "\n" for ln in lines)
        self._file = open(self.path, "a", buffering=1)
        self._tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(self.local_dir, "tb"), purge_step=resume_step + 1)
        except ImportError:  # tensorboard is a declared dependency; keep logging without it
            self._tb = None

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "epoch", "time"):
                    self._tb.add_scalar(k, v, record["step"])

    def flush(self) -> None:
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()
        if self.remote:
            fs, path = get_fs(self.run_dir)
            fs.put(self.path, path + "/metrics.jsonl")
            tb = os.path.join(self.local_dir, "tb")
            if os.path.isdir(tb):
                fs.put(tb, path + "/tb", recursive=True)

    def close(self) -> None:
        self.flush()
        self._file.close()
        if self._tb is not None:
            self._tb.close()


_HOLD_S = 600.0  # debug.fault_action=hold: long enough for any node-loss test, bounded if nothing comes


def _fault_hook(debug: DebugConfig, rank: int) -> Callable[[int], None]:
    """`debug.fault_step`: that rank SIGKILLs itself (or holds, `debug.fault_action`) right after
    that optimizer step, once (the marker file records that it fired, so the restarted worker
    trains on), after `debug.fault_delay_s` (see its description). Off, it costs one
    comparison per step."""
    if debug.fault_step is None or rank != debug.fault_rank:
        return lambda step: None
    marker = debug.fault_marker
    assert marker, "DebugConfig requires fault_marker with fault_step"

    def hook(step: int) -> None:
        if step == debug.fault_step and not os.path.exists(marker):
            time.sleep(debug.fault_delay_s)
            hold = debug.fault_action == "hold"
            with open(marker, "w") as f:
                f.write(f"rank {rank} {'held' if hold else 'killed'} at step {step}\n")
            if hold:
                time.sleep(_HOLD_S)
                return
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _key_recorder(debug: DebugConfig, rank: int) -> Callable[[int, int, list[str]], None]:
    """`debug.record_keys=DIR`: `pid epoch step key` lines per rank in DIR/rank{r}.txt, so a test
    can rebuild which samples fed which optimizer step."""
    folder = debug.record_keys
    if not folder:
        return lambda epoch, step, keys: None
    os.makedirs(folder, exist_ok=True)
    path, pid = os.path.join(folder, f"rank{rank}.txt"), os.getpid()

    def record(epoch: int, step: int, keys: list[str]) -> None:
        with open(path, "a") as f:
            f.writelines(f"{pid} {epoch} {step} {k}\n" for k in keys)

    return record


def _load_prior(cfg: Config, manifest) -> Optional[torch.Tensor]:
    if not cfg.prior.path:
        return None
    from .priors import read_priors

    return torch.from_numpy(read_priors(cfg.prior.path, manifest))


@torch.no_grad()
def evaluate(module: torch.nn.Module, stream, device: torch.device, dtype: torch.dtype) -> Any:
    """Collect (class, score, label) of annotated entries only; never a dense N x C matrix."""
    from .metrics import PartialAPAccumulator

    acc = PartialAPAccumulator(stream.num_classes)
    was_training = module.training
    module.eval()
    for batch in stream:
        logits = module(batch["image"].to(device, dtype=dtype, non_blocking=True))
        acc.update(logits.float().sigmoid(), batch["target"].to(device))
    module.train(was_training)
    return acc


def _gather_map(acc, world_size: int) -> dict[str, float]:
    if world_size > 1:
        import torch.distributed as dist

        from .metrics import PartialAPAccumulator

        parts: list[Any] = [None] * world_size
        dist.all_gather_object(parts, acc.state())
        acc = PartialAPAccumulator(acc.num_classes)
        for part in parts:
            acc.merge(part)
    res = acc.compute()
    return {"map_c": float(res["map_c"]), "map_o": float(res["map_o"]), "num_valid": int(res["num_valid"])}


def _log_sync(skipped_here: int, device: torch.device, world_size: int, rank: int, due: bool = False) -> tuple[int, bool]:
    """(samples skipped as corrupt so far, summed over ranks; rank 0's `due`), in one collective
    at log steps: every rank then decides a time-based checkpoint by rank 0's clock alone."""
    n = torch.tensor([skipped_here, int(due and rank == 0)], dtype=torch.int64, device=device)
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(n)
    skipped, due_all = n.tolist()
    return skipped, bool(due_all)


@dataclass
class _Run:
    """One rank's run: what `train_step`, `maybe_log` and `maybe_checkpoint` share."""

    cfg: Config
    rank: int
    world_size: int
    hooks: Hooks
    engine: Any
    loss_fn: Any
    loader: Any  # DevicePrefetcher over the train stream: its cursor is what a checkpoint holds
    manifest: Any
    running: RunningPrior
    total_steps: int
    log: Optional[_RunLog]
    step: int
    epoch: int
    fault: Callable[[int], None]
    record_keys: Callable[[int, int, list[str]], None]
    geometry: Any = None  # elastic.Geometry: saved in every checkpoint
    loss_scale: float = 1.0  # elastic.Shape.loss_scale, for a sum-reduced loss at another per-worker batch
    portable: bool = False  # also write portable.safetensors (elastic groups)
    # between log steps: the loss stays a device tensor until a log step reads it
    loss_sum: torch.Tensor = field(init=False)
    loss_count: int = 0
    samples: int = 0
    t_log: float = field(init=False)
    t_start: float = field(init=False)
    start_step: int = field(init=False)
    # checkpoints: rank 0's clock, shared at log steps, decides time-based ones for every rank
    t_ckpt: float = field(init=False)
    last_ckpt_step: int = field(init=False)
    time_due: bool = False

    def __post_init__(self) -> None:
        self.loss_sum = torch.zeros((), device=self.engine.device)
        self.t_log = self.t_start = self.t_ckpt = time.perf_counter()
        self.start_step = self.last_ckpt_step = self.step


def train_step(run: _Run, batch: dict[str, Any]) -> bool:
    """One micro-batch on the device: forward, loss in fp32, backward, DeepSpeed step. Returns
    whether an optimizer step happened (every `train.grad_accum` micro-batches); no host sync."""
    engine = run.engine
    x, target = batch["image"], batch["target"]
    extra = {"pseudo": engine.ema_predict(x)} if run.cfg.loss.name == "pseudo" else {}
    logits = engine.forward(x)
    loss = run.loss_fn(logits, target, **extra)
    if run.loss_scale != 1.0:
        loss = loss * run.loss_scale
    run.running.update(logits.detach().sigmoid())
    engine.backward(loss)
    stepped = engine.step()
    run.loss_sum += loss.detach()
    run.loss_count += 1
    run.samples += x.shape[0]
    run.record_keys(run.epoch, run.step + 1, batch["key"])  # the optimizer step this batch feeds
    if stepped:
        run.step += 1
        engine.update_ema(run.step)
        run.fault(run.step)
    return stepped


def maybe_log(run: _Run) -> None:
    """At log steps (and the last step): one host read of the loss, one collective for the skip
    count and rank 0's checkpoint clock, a metrics record and a console line on rank 0."""
    step, cfg = run.step, run.cfg
    if step % cfg.train.log_every and step != run.total_steps:
        return
    now = time.perf_counter()
    rate = run.samples * run.world_size / max(now - run.t_log, 1e-9)
    every_s = cfg.checkpoint.every_minutes * 60
    cursor = run.loader.state_dict()
    skipped, run.time_due = _log_sync(cursor["corrupt"], run.engine.device, run.world_size, run.rank,
                                      every_s > 0 and now - run.t_ckpt >= every_s)
    rec = {"step": step, "time": round(time.time(), 3), "epoch": run.epoch,
           "epoch_progress": round((cursor["batch"] or len(run.loader)) / len(run.loader), 4),
           "loss": float(run.loss_sum.item()) / max(run.loss_count, 1), "lr": float(run.engine.lr),
           "samples_per_s": round(rate, 2), "skipped_samples": skipped}
    run.loss_sum.zero_()
    run.loss_count, run.samples, run.t_log = 0, 0, now
    if run.log is not None:
        run.log.write(rec)
        eta = (run.total_steps - step) * (now - run.t_start) / max(step - run.start_step, 1)
        skip_note = f" | {skipped} corrupt samples skipped" if skipped else ""
        print(f"step {step}/{run.total_steps} | epoch {run.epoch} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
              f"{rate:.0f} samples/s | ETA {eta / 60:.1f} min{skip_note}", flush=True)
        run.hooks.progress({**rec, "total_steps": run.total_steps, "eta_s": round(eta, 1)})


def maybe_checkpoint(run: _Run) -> None:
    """Every `checkpoint.every_steps` steps, or when rank 0's clock said so at the last log step;
    never at the last step (the end of the epoch checkpoints after validation)."""
    every = run.cfg.checkpoint.every_steps
    step_due = bool(every) and run.step % every == 0
    if (step_due or run.time_due) and run.step < run.total_steps:
        _checkpoint(run, {"loss": None})
    run.time_due = False


def _checkpoint(run: _Run, metrics: dict[str, Any], final: bool = False) -> None:
    """Collective: every rank saves and reports; rank 0 adds the state file and the running prior.
    `final`: the run's last checkpoint, which also keeps the raw weights of an EMA run."""
    num_classes = run.manifest.num_classes
    local = tempfile.mkdtemp(prefix=f"csl-ckpt-{run.rank}-")
    try:
        total = RunningPrior(num_classes, device=run.engine.device)
        total.load_state_dict(run.running.state_dict())
        total.all_reduce()  # collective
        state = None
        if run.rank == 0:
            if total.count:
                write_priors(os.path.join(local, RUNNING_PRIOR_FILE), run.manifest, total.value().cpu().numpy())
            state = {"step": run.step, "stream": run.loader.state_dict(), "world_size": run.world_size,
                     "geometry": run.geometry.to_dict(),
                     "running_prior": {"acc": total.acc.tolist(), "count": total.count},
                     "classes": [c.model_dump() for c in run.manifest.classes],
                     "config": run.cfg.model_dump(mode="json")}
            assert run.log is not None
            run.log.flush()
        save_checkpoint(run.engine, local, run.rank, state, final=final)  # collective
        if run.portable:
            save_portable(run.engine, local, run.rank)  # collective
        run.hooks.report({**metrics, "step": run.step, "epoch": run.epoch}, local, checkpoint_name(run.step))
    finally:
        shutil.rmtree(local, ignore_errors=True)
    run.last_ckpt_step, run.t_ckpt = run.step, time.perf_counter()


def _end_epoch(run: _Run, val_loader: Any, done: bool) -> dict[str, Any]:
    """Validation, its record, and a checkpoint unless the last step already wrote one."""
    result = _validate(run.engine, val_loader, run.world_size)
    skipped, _ = _log_sync(run.loader.state_dict()["corrupt"], run.engine.device, run.world_size, run.rank)
    if run.log is not None:
        run.log.write({"step": run.step, "time": round(time.time(), 3), "epoch": run.epoch,
                       **{f"val_{k}": v for k, v in result.items()}, "skipped_samples": skipped})
    result["skipped_samples"] = skipped
    if run.step > run.last_ckpt_step or done:
        _checkpoint(run, result, final=done)
    return result


def run_training(cfg: Config, run_dir: str, rank: int, world_size: int, hooks: Hooks,
                 geometry: dict[str, int] | None = None) -> dict[str, Any]:
    """Train (or resume) one rank of the run; returns the last validation metrics ({} when the
    run had already finished). `geometry` (`elastic.Geometry`, as a dict): the run's, fixed at its
    start; None: the config's (a new run at its own size)."""
    from data_shards.stream import ShardStream

    from .elastic import Geometry, fit, geometry_of
    from .engine import setup_engine
    from .losses import build_loss
    from .models import build_model
    from .prefetch import DevicePrefetcher

    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    manifest = read_manifest(cfg.data.root)
    num_classes = manifest.num_classes

    g = Geometry(**geometry) if geometry else geometry_of(cfg)
    shape = fit(g, world_size)  # the per-worker batch and accumulation that keep the run's global batch
    # uint8 batches: page-locked where bound for a GPU (DeepSpeed takes one when present), else
    # lent straight from the shared slot, since normalising on the CPU is the one copy needed
    cuda = torch.cuda.is_available()
    common = dict(batch_size=shape.batch_size, image_size=cfg.data.image_size, rank=rank,
                  world_size=world_size, seed=cfg.train.seed, corrupt=cfg.data.corrupt, manifest=manifest,
                  num_workers=cfg.data.workers, output="uint8", pin_memory=cuda, zero_copy=not cuda)
    stream = ShardStream(cfg.data.root, cfg.data.train_split, shuffle=True, train_transform=True,
                         augment=cfg.data.augment.spec(), shuffle_buffer=cfg.data.shuffle_buffer, lanes=g.lanes,
                         lanes_per_batch=shape.lanes_per_batch, **common)
    val_stream = ShardStream(cfg.data.root, cfg.data.val_split, shuffle=False, train_transform=False, **common)
    accum = shape.grad_accum
    steps_per_epoch = len(stream) // accum
    if steps_per_epoch < 1:
        raise ValueError(f"{len(stream)} batches per epoch is fewer than train.grad_accum={accum}")
    total_steps = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)

    model = build_model(cfg.model, num_classes)
    step = 0
    with hooks.restore_dir() as ckpt:
        saved_ws = int(read_state(ckpt)["world_size"]) if ckpt is not None else g.world_size
        portable = None
        if ckpt is not None and saved_ws != world_size and cfg.deepspeed.zero_stage > 0:
            # ZeRO state is cut by rank: the state by parameter name instead (elastic.py); the
            # weights go in before DeepSpeed partitions and casts them
            portable = read_portable(ckpt)
            model.load_state_dict(portable_weights(portable[0]))
        engine = setup_engine(model, cfg, world_size, total_steps, micro_batch=shape.batch_size,
                              grad_accum=shape.grad_accum)
        loss_fn = build_loss(cfg.loss.name, prior=_load_prior(cfg, manifest), **cfg.loss.params()).to(engine.device)
        # The public reference code's prior estimator (a mean of the training outputs), kept for
        # comparison with the prior pass; per-rank sums, reduced only when a checkpoint is written.
        running = RunningPrior(num_classes, device=engine.device)
        if ckpt is not None:
            state = restore_portable(engine, ckpt, *portable) if portable else restore_checkpoint(engine, ckpt)
            step = state["step"]
            stream.load_state_dict(state["stream"])
            if rank == 0 and state.get("running_prior"):  # the global sums; other ranks add theirs
                rp = state["running_prior"]
                running.load_state_dict({"acc": torch.tensor(rp["acc"]), "count": rp["count"], "weight": 0.0, "decay": None})
            if rank == 0:
                print(f"[rank 0] resumed at step {step}: epoch {stream.epoch}, batch {state['stream']['batch']}", flush=True)
    if rank == 0 and saved_ws != world_size:
        print(f"[rank 0] {shape.describe(g, saved_ws)}", flush=True)
    if step >= total_steps:
        # The same command again after the run finished: nothing to train, and eval.json stays.
        if rank == 0:
            print(f"[rank 0] run already finished at step {step} of {total_steps}: nothing to do", flush=True)
        return {}

    nhwc = cfg.model.channels_last
    # The cursor knows where we are: a checkpoint that closed epoch e resumes at (e + 1, 0).
    run = _Run(cfg=cfg, rank=rank, world_size=world_size, hooks=hooks, engine=engine, loss_fn=loss_fn,
               loader=DevicePrefetcher(stream, engine.device, channels_last=nhwc), manifest=manifest,
               running=running, total_steps=total_steps, log=_RunLog(run_dir, step) if rank == 0 else None,
               step=step, epoch=stream.epoch, fault=_fault_hook(cfg.debug, rank),
               record_keys=_key_recorder(cfg.debug, rank), geometry=g,
               loss_scale=shape.loss_scale if getattr(loss_fn, "reduction", "sum") == "sum" else 1.0,
               portable=cfg.checkpoint.portable or _elastic(cfg))
    val_loader = DevicePrefetcher(val_stream, engine.device, channels_last=nhwc)
    last_eval: dict[str, Any] = {}
    done = False
    while not done and run.epoch < cfg.train.epochs:
        stream.set_epoch(run.epoch)  # keeps the cursor when resuming inside this epoch
        loss_fn.set_epoch(run.epoch, cfg.train.epochs)
        for batch in run.loader:
            if not train_step(run, batch):
                continue
            maybe_log(run)
            maybe_checkpoint(run)
            if run.step >= total_steps:
                done = True
                break
        last_eval = _end_epoch(run, val_loader, done)
        if not done:
            run.epoch += 1
    if run.log is not None:
        write_bytes_atomic(join(run_dir, "eval.json"),
                           json.dumps({"step": run.step, "epoch": run.epoch, **last_eval}, indent=1).encode())
        run.log.close()
    return last_eval


def _elastic(cfg: Config) -> bool:
    """An elastic group at ZeRO >= 1: Ray restarts it at another size without asking the driver,
    so its checkpoints carry the portable state from the start."""
    return (cfg.cluster.min_workers or cfg.cluster.workers) < cfg.cluster.workers and cfg.deepspeed.zero_stage > 0


def _validate(engine, val_loader, world_size: int) -> dict[str, Any]:
    engine.sync_buffers()  # DeepSpeed never broadcasts BatchNorm statistics: one set for all ranks
    out: dict[str, Any] = {}
    model_res = _gather_map(evaluate(engine.module, val_loader, engine.device, engine.input_dtype), world_size)
    out.update(model_res)
    ema = engine.ema_module()
    if ema is not None:  # fp32 weights: fp32 inputs, whatever the compute precision
        ema_res = _gather_map(evaluate(ema, val_loader, engine.device, torch.float32), world_size)
        out.update({f"ema_{k}": v for k, v in ema_res.items()})
    return out


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    """Ray Train entry point: rebuild the typed config, then run the loop."""
    import contextlib

    import ray.train

    cfg = Config.model_validate(payload["config"])
    ctx = ray.train.get_context()

    @contextlib.contextmanager
    def restore_dir():
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield d

    def report(metrics: dict[str, Any], local_dir: Optional[str], name: Optional[str]) -> None:
        clean = {k: v for k, v in metrics.items() if v is not None}
        checkpoint = ray.train.Checkpoint.from_directory(local_dir) if local_dir else None
        ray.train.report(clean, checkpoint=checkpoint, checkpoint_dir_name=name)

    from .console import progress_sink

    hooks = Hooks(report, restore_dir, progress_sink(payload.get("console")))
    run_training(cfg, payload["run_dir"], ctx.get_world_rank(), ctx.get_world_size(), hooks, payload.get("geometry"))
