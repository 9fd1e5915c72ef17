"""The per-worker training loop: stream -> model -> loss -> DeepSpeed step, with exact resume.

Shape (torchtitan's): `train_loop_per_worker` is the Ray glue; `run_training` is the loop and
takes its Ray calls through a small `Hooks` object, so it also runs in a plain process.

Exactness. A checkpoint (layout, writing and reading: `checkpoint.py`) holds, besides
DeepSpeed's model/optimizer/scheduler state: the optimizer step, the epoch, the stream cursor
(epoch, batches consumed) and the EMA weights. The stream
cursor is rank-independent (every rank yields the same number of batches), so rank 0's copy is
valid for all ranks. Flips are a function of (seed, epoch, sample), so a resumed run consumes
the same pixels in the same order and, with gloo's fixed reduction order, reaches the same
weights as an uninterrupted one.

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
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

from data_shards.storage import get_fs, is_remote, join, read_manifest, write_bytes_atomic

from .checkpoint import RUNNING_PRIOR_FILE, checkpoint_name, restore_checkpoint, save_checkpoint
from .config import Config
from .priors import RunningPrior, write_priors

__all__ = ["Hooks", "run_training", "train_loop_per_worker", "evaluate"]



@dataclass
class Hooks:
    """What the loop needs from its launcher (Ray Train, or a plain process in tests)."""

    report: Callable[[dict[str, Any], Optional[str], Optional[str]], None]
    restore_dir: Callable[[], Any]  # a context manager yielding a local checkpoint dir, or None


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


def _fault_hook(rank: int) -> Callable[[int], None]:
    """Fault injection for failure tests: `CSL_FAULT_INJECT=RANK:STEP:MARKER` makes that rank
    SIGKILL itself after optimizer step STEP, once (the marker file records that it fired, so
    the restarted worker trains on). It waits `CSL_FAULT_DELAY_S` (3 s) first: Ray's
    controller registers a reported checkpoint at its next poll of the workers (every 2 s),
    and a kill inside that window rightly loses the checkpoint, which would make a test's
    expected resume point a race. Unset, it costs one comparison per step."""
    spec = os.environ.get("CSL_FAULT_INJECT")
    if not spec:
        return lambda step: None
    f_rank, f_step, marker = spec.split(":", 2)

    def hook(step: int) -> None:
        if rank == int(f_rank) and step == int(f_step) and not os.path.exists(marker):
            time.sleep(float(os.environ.get("CSL_FAULT_DELAY_S", "3")))
            with open(marker, "w") as f:
                f.write(f"rank {rank} killed at step {step}\n")
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _key_recorder(rank: int) -> Callable[[int, int, list[str]], None]:
    """For exactly-once tests: `CSL_RECORD_KEYS=DIR` appends `pid epoch step key` lines per
    rank to DIR/rank{r}.txt, so a test can rebuild which samples fed which optimizer step."""
    folder = os.environ.get("CSL_RECORD_KEYS")
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


def _log_sync(stream, device: torch.device, world_size: int, rank: int, due: bool = False) -> tuple[int, bool]:
    """(samples skipped as corrupt so far, summed over ranks; rank 0's `due`), in one collective
    at log steps: every rank then decides a time-based checkpoint by rank 0's clock alone."""
    n = torch.tensor([stream.corrupt_samples, int(due and rank == 0)], dtype=torch.int64, device=device)
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(n)
    skipped, due_all = n.tolist()
    return skipped, bool(due_all)


def run_training(cfg: Config, run_dir: str, rank: int, world_size: int, hooks: Hooks) -> dict[str, Any]:
    from data_shards.stream import ShardStream

    from .engine import setup_engine
    from .losses import build_loss
    from .models import build_model

    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    manifest = read_manifest(cfg.data.root)
    num_classes = manifest.num_classes

    common = dict(batch_size=cfg.data.batch_size, image_size=cfg.data.image_size, rank=rank,
                  world_size=world_size, seed=cfg.train.seed, corrupt=cfg.data.corrupt, manifest=manifest)
    stream = ShardStream(cfg.data.root, cfg.data.train_split, num_workers=cfg.data.workers, shuffle=True,
                         train_transform=True, shuffle_buffer=cfg.data.shuffle_buffer, **common)
    val_stream = ShardStream(cfg.data.root, cfg.data.val_split, num_workers=cfg.data.workers, shuffle=False,
                             train_transform=False, **common)
    accum = cfg.train.grad_accum
    steps_per_epoch = len(stream) // accum
    if steps_per_epoch < 1:
        raise ValueError(f"{len(stream)} batches per epoch is fewer than train.grad_accum={accum}")
    total_steps = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)

    model = build_model(cfg.model, num_classes)
    engine = setup_engine(model, cfg, world_size, total_steps)
    device, dtype = engine.device, engine.input_dtype
    loss_fn = build_loss(cfg.loss.name, prior=_load_prior(cfg, manifest), **cfg.loss.params()).to(device)
    needs_pseudo = cfg.loss.name == "pseudo"
    # The public reference code's prior estimator (a mean of the training outputs), kept for
    # comparison with the prior pass; per-rank sums, reduced only when a checkpoint is written.
    running = RunningPrior(num_classes, device=device)

    step = 0
    with hooks.restore_dir() as ckpt:
        if ckpt is not None:
            state = restore_checkpoint(engine, ckpt)
            step = state["step"]
            stream.load_state_dict(state["stream"])
            if rank == 0 and state.get("running_prior"):  # the global sums; other ranks add theirs
                rp = state["running_prior"]
                running.load_state_dict({"acc": torch.tensor(rp["acc"]), "count": rp["count"], "weight": 0.0, "decay": None})
            if rank == 0:
                print(f"[rank 0] resumed at step {step}: epoch {stream.epoch}, batch {state['stream']['batch']}", flush=True)
    # The cursor knows where we are: a checkpoint that closed epoch e resumes at (e + 1, 0).
    epoch = stream.epoch
    if step >= total_steps:
        # The same command again after the run finished: nothing to train, and eval.json stays.
        if rank == 0:
            print(f"[rank 0] run already finished at step {step} of {total_steps}: nothing to do", flush=True)
        return {}

    log = _RunLog(run_dir, step) if rank == 0 else None

    def checkpoint(metrics: dict[str, Any]) -> None:
        local = tempfile.mkdtemp(prefix=f"csl-ckpt-{rank}-")
        try:
            total = RunningPrior(num_classes, device=device)
            total.load_state_dict(running.state_dict())
            total.all_reduce()  # collective
            state = None
            if rank == 0:
                if total.count:
                    write_priors(os.path.join(local, RUNNING_PRIOR_FILE), manifest, total.value().cpu().numpy())
                state = {"step": step, "stream": stream.state_dict(), "world_size": world_size,
                         "running_prior": {"acc": total.acc.tolist(), "count": total.count},
                         "classes": [c.model_dump() for c in manifest.classes], "config": cfg.model_dump(mode="json")}
                assert log is not None
                log.flush()
            save_checkpoint(engine, local, rank, state)  # collective
            hooks.report({**metrics, "step": step, "epoch": epoch}, local, checkpoint_name(step))
        finally:
            shutil.rmtree(local, ignore_errors=True)

    fault, record_keys = _fault_hook(rank), _key_recorder(rank)
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    t_log, samples_since = time.perf_counter(), 0
    t_start, start_step = t_log, step
    last_ckpt_step = step
    # Time-based checkpoints: rank 0's clock, shared at log steps (see _log_sync), so every
    # rank reaches the collective save and the report barrier at the same step.
    every_s, t_ckpt, time_due = cfg.checkpoint.every_minutes * 60, t_log, False
    last_eval: dict[str, Any] = {}
    done = step >= total_steps
    micro = 0
    while not done and epoch < cfg.train.epochs:
        stream.set_epoch(epoch)  # keeps the cursor when resuming inside this epoch
        loss_fn.set_epoch(epoch, cfg.train.epochs)
        for batch in stream:
            x = batch["image"].to(device, dtype=dtype, non_blocking=True)
            target = batch["target"].to(device, non_blocking=True)
            extra = {}
            if needs_pseudo:
                extra["pseudo"] = engine.ema_predict(x)
            logits = engine.forward(x)
            loss = loss_fn(logits.float(), target, **extra)
            running.update(logits.detach().float().sigmoid())
            engine.backward(loss)
            engine.step()
            micro += 1
            loss_sum += loss.detach()
            loss_count += 1
            samples_since += x.shape[0]
            record_keys(epoch, step + 1, batch["key"])  # the optimizer step this batch feeds
            if micro % accum:
                continue
            step += 1
            engine.update_ema(step)
            fault(step)
            if step % cfg.train.log_every == 0 or step == total_steps:
                now = time.perf_counter()
                rate = samples_since * world_size / max(now - t_log, 1e-9)
                skipped, time_due = _log_sync(stream, device, world_size, rank,
                                              every_s > 0 and now - t_ckpt >= every_s)
                rec = {"step": step, "time": round(time.time(), 3), "epoch": epoch, "epoch_progress": round((stream.state_dict()["batch"] or len(stream)) / len(stream), 4),
                       "loss": float(loss_sum.item()) / max(loss_count, 1), "lr": float(engine.lr),
                       "samples_per_s": round(rate, 2), "skipped_samples": skipped}
                loss_sum.zero_()
                loss_count, samples_since, t_log = 0, 0, now
                if log is not None:
                    log.write(rec)
                    eta = (total_steps - step) * (now - t_start) / max(step - start_step, 1)
                    skip_note = f" | {skipped} corrupt samples skipped" if skipped else ""
                    print(f"step {step}/{total_steps} | epoch {epoch} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
                          f"{rate:.0f} samples/s | ETA {eta / 60:.1f} min{skip_note}", flush=True)
            step_due = bool(cfg.checkpoint.every_steps) and step % cfg.checkpoint.every_steps == 0
            if (step_due or time_due) and step < total_steps:
                checkpoint({"loss": None})
                last_ckpt_step, t_ckpt = step, time.perf_counter()
            time_due = False
            if step >= total_steps:
                done = True
                break
        last_eval = _validate(engine, val_stream, world_size, device, dtype)
        skipped, _ = _log_sync(stream, device, world_size, rank)
        if log is not None:
            log.write({"step": step, "time": round(time.time(), 3), "epoch": epoch,
                       **{f"val_{k}": v for k, v in last_eval.items()}, "skipped_samples": skipped})
        last_eval["skipped_samples"] = skipped
        if step > last_ckpt_step or done:
            checkpoint(last_eval)
            last_ckpt_step, t_ckpt = step, time.perf_counter()
        if not done:
            epoch += 1
    if log is not None:
        write_bytes_atomic(join(run_dir, "eval.json"), json.dumps({"step": step, "epoch": epoch, **last_eval}, indent=1).encode())
        log.close()
    return last_eval


def _validate(engine, val_stream, world_size: int, device, dtype) -> dict[str, Any]:
    engine.sync_buffers()  # DeepSpeed never broadcasts BatchNorm statistics: one set for all ranks
    out: dict[str, Any] = {}
    model_res = _gather_map(evaluate(engine.module, val_stream, device, dtype), world_size)
    out.update({f"{k}": v for k, v in model_res.items()})
    ema = engine.ema_module()
    if ema is not None:
        ema_res = _gather_map(evaluate(ema, val_stream, device, dtype), world_size)
        out.update({f"ema_{k}": v for k, v in ema_res.items()})
    return out


def tune_malloc() -> bool:
    """Make glibc keep freed memory for reuse (True if it took; False off glibc).

    A training step frees and reallocates the same activation and gradient buffers. glibc
    returns freed memory at the top of its heaps to the kernel (and serves blocks above a
    moving threshold by fresh mmap), so every step faults the same pages in again: 3,000-
    6,000 page faults and 7-12 ms of system time per step of the synthetic benchmark's
    workers (``getrusage``, scratch). A fixed mmap threshold at glibc's maximum (32 MiB) and
    a trim threshold of 1 GiB keep those pages mapped: about 20-50 faults per step; thread
    arenas (Ray Train runs the loop in a thread) also need the 64 MiB top pad, or they unmap
    emptied heaps. `bench/train_throughput.py`'s csl run, interleaved, 3 rounds: 517 samples/s
    (median) against 465 with ``cluster.tune_malloc=false``. The price is that a worker's
    resident memory stays at its peak, which it reaches every step anyway. Process-wide, so
    DataLoader workers forked later inherit it.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # from glibc's malloc.h
    return all(mallopt(opt, value) for opt, value in
               ((m_mmap_threshold, 32 << 20), (m_trim_threshold, 1 << 30), (m_top_pad, 64 << 20)))


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    """Ray Train entry point: rebuild the typed config, then run the loop."""
    import contextlib

    import ray.train

    cfg = Config.model_validate(payload["config"])
    if cfg.cluster.tune_malloc:
        tune_malloc()
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

    run_training(cfg, payload["run_dir"], ctx.get_world_rank(), ctx.get_world_size(), Hooks(report, restore_dir))
