"""Steady-state samples/s of `csl train` against a plain PyTorch loop, and start/resume latency.

    .venv/bin/python bench/train_throughput.py [--steps 200] [--rounds 2] [--resume-steps 120]

What runs, all on one synthetic dataset built once in a temp folder (4,000 train / 200 val
images at 64 px, 250 samples per shard) and the `synthetic-cpu` preset (small-cnn, loss `csl`
with the preset's parameters and no prior, Adam at the preset's LR with OneCycle, EMA 0.99,
fp32, ZeRO-0, channels_last):

* ``csl``: `csl train` as a user runs it (a subprocess that starts its own local Ray), with
  `cluster.workers=2 data.workers=0 data.batch_size=32`: two Ray Train workers of one CPU each,
  DeepSpeed on gloo (its own gradient all-reduce), reading uint8 batches through `ShardStream`
  in the worker process and normalising them where the model runs (`trainer/prefetch.py`).
  Its rate is `samples_per_s` of `metrics.jsonl` (global: all ranks), one record every 5 steps.
* ``plain``: one process, no Ray, no DeepSpeed, no process group: the same model
  (`build_model`, NHWC activations as the engine sets them), loss (`build_loss`), optimizer
  (Adam over `param_groups`, OneCycle) and EMA (`ModelEMA`), batch 32, reading the same shards
  through `ShardStream(num_workers=0)` with the same train transforms and normalising as csl
  does. Run with 1 torch thread and with 2, and as two 1-thread copies at once (both cores
  busy, as under csl: what two processes sharing the machine's caches and memory cost each
  other, which is not Ray's or DeepSpeed's overhead).
* ``plain-wds``: the plain loop reading with `webdataset.WebDataset` + PIL decode + numpy
  flip/normalise instead of `ShardStream`: a reference for the data path.

Steady state: the first 20% of steps are skipped (Ray/DeepSpeed start-up, allocator warm-up,
shuffle-buffer fill), and so is every 5-step window that holds an epoch start, a validation
or a checkpoint; the median of the remaining windows' rates is the run's rate. Contenders
alternate within a round, the first one rotating between rounds, and the medians over rounds
are reported, so a noisy neighbour on this shared 2-core machine hits all of them alike.
Ray starts its workers at niceness 15 (raylet's `worker_niceness`), so the plain loop runs at
niceness 15 too: against a neighbour at niceness 0 both then get the same share.

Samples per CPU-second, for reading: under a heavy neighbour the wall-clock rates say as much
about the neighbour as about us, so each window's samples are also divided by the CPU time
the contender was actually granted: `process_time()` for the plain loop, and for csl the
CPU time of every process in its session (both workers, driver, GCS, raylet, controller and
Ray's other actors), read from /proc as each `step N/T` line arrives. It leaves out time spent
waiting for a core or in a collective for a descheduled peer; the report stays on wall time.

Per core. The csl run uses 2 workers x 1 torch thread on the machine's 2 cores (Ray sets
OMP_NUM_THREADS to the worker's CPU count, 1; measured: one busy compute thread per worker),
so its per-core rate is its global rate / 2. The plain loop with 1 thread uses 1 core. The
report compares these two: csl per core / plain(1 thread) per core (a figure to read, no
longer a bar: this CPU path is not what the project is tuned for). It charges csl for Ray's
and DeepSpeed's per-step work (the gradient average, its two gloo barriers and the wait for the
slower rank, DeepSpeed's step, the Ray actor's threads) and for the Ray processes (GCS, raylet,
dashboard, log monitor, Train's controller and helper actors; the local cluster `csl` starts,
with `trainer.launch.LOCAL_RAY_ENV`) sharing the two cores.
Plain with 2 threads is shown for reading: intra-op threading of a small CNN at batch 32
does not scale linearly, which is why data parallelism with 1 thread per worker is the
configuration to beat.

Start and resume latency. `metrics.jsonl` has no wall-clock field, so these are read from
`csl train`'s stdout: rank 0 prints `step N/T` after each logged step (`train.log_every=1`
here), forwarded to the driver by Ray's log monitor; the timestamp is when the line arrives
here (Ray's forwarding adds well under a second, the same for every run). Start-to-first-
step is from spawning `csl train` to `step 1/T`; it includes Python imports, starting a local
Ray, the worker group, DeepSpeed initialisation and the first batch. Resume: one run of
`--resume-steps` steps checkpoints every 20 steps (all kept); copies of its run folder are cut
back to the checkpoint at step 20 (early) and at step `--resume-steps - 20` (late) by deleting
later checkpoint folders and rewriting Ray's `checkpoint_manager_snapshot.json`, so the
command line is identical to the original's (a different `train.max_steps` would change the
OneCycle length the optimizer state was saved with). Each copy is relaunched with the same
command and stopped (its process group killed) once `step N+1/T` arrives. Bar: the two
latencies within 20% of each other (max/min <= 1.2): resume cost does not grow with progress.
Also printed: the part after Ray Train reports the worker group started (checkpoint download,
DeepSpeed initialisation and load, stream repositioning, first step), the only part that
could depend on the checkpoint; the part before it is Python and Ray start-up, which on a
loaded machine swings by tens of seconds from run to run.

Caveats: a noisy, shared 2-core machine (the load average is printed); Ray and DeepSpeed
start-up are excluded from the steady state by construction and reported only as latency;
one start measurement per invocation; Ray's log monitor adds a small, constant delay to the
latencies. Exit code 1 if the resume bar fails.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
CSL = str(Path(sys.executable).with_name("csl"))
BATCH = 32
WINDOW = 5  # steps per rate window (= train.log_every of the throughput runs)
WARMUP = 0.2  # fraction of steps skipped as warm-up
RESUME_EVERY = 20
RAY_WORKER_NICENESS = 15  # Ray's default for its worker processes
STEP_LINE = re.compile(r"\bstep (\d+)/(\d+) \|")


# ---------------------------------------------------------------------------------------
# csl train as a subprocess


def _csl_args(data: str, storage: str, name: str, steps: int, log_every: int, every: int, keep: int,
              verbose: bool = False) -> list[str]:
    # --verbose: Ray's own lines ("Started training worker group") reach the console, for the
    # latency runs' marks; throughput runs stay quiet, as a user's run is.
    return [CSL, "train", *(["--verbose"] if verbose else []), "--config", "synthetic-cpu", f"data.root={data}", "cluster.workers=2", "data.workers=0",
            f"data.batch_size={BATCH}", f"train.log_every={log_every}", f"checkpoint.every_steps={every}",
            f"checkpoint.keep={keep}", f"train.max_steps={steps}", "train.epochs=1000",
            f"run.storage={storage}", f"run.name={name}"]


def _session_cpu_s(sid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of session `sid`."""
    tick, total = os.sysconf("SC_CLK_TCK"), 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[3]) == sid:  # field 6 of stat: the session id
            total += int(fields[11]) + int(fields[12])
    return total / tick


def _spawn(args: list[str], log_path: Path, stop_at: Callable[[int], bool] | None = None) -> dict[str, Any]:
    """Run `args`, timestamping each stdout/stderr line on arrival. `stop_at(step)` true: kill
    the process group (csl and the Ray it started) and return. Returns {rc, step_times (s since
    launch), step_cpu (CPU s of the whole session, Ray included), marks (first line of each
    phase)}."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONUNBUFFERED"] = "1"
    t0 = time.perf_counter()
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                         env=env, cwd=REPO, start_new_session=True)
    step_times: dict[int, float] = {}
    step_cpu: dict[int, float] = {}
    marks: dict[str, float] = {}
    phases = {"cli": ("starting run", "resuming run"), "group": ("Started training worker group",),
              "restored": ("] resumed at step",)}
    stopped = False
    assert p.stdout is not None
    with open(log_path, "w") as log:
        for line in p.stdout:
            t = time.perf_counter() - t0
            log.write(f"{t:8.3f} {line}")
            for phase, needles in phases.items():
                if phase not in marks and any(n in line for n in needles):
                    marks[phase] = t
            m = STEP_LINE.search(line)
            if m and int(m.group(1)) not in step_times:
                step = int(m.group(1))
                step_times[step] = t
                step_cpu[step] = _session_cpu_s(p.pid)
                if stop_at is not None and stop_at(step):
                    stopped = True
                    os.killpg(p.pid, signal.SIGKILL)
                    break
    rc = p.wait()
    if stopped:
        try:  # Ray's own processes share the session; anything left of it goes too
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    elif rc != 0:
        raise RuntimeError(f"{shlex.join(args)} exited {rc}; log: {log_path}")
    return {"rc": rc, "step_times": step_times, "step_cpu": step_cpu, "marks": marks, "wall": time.perf_counter() - t0}


def _steady_rate(rates: list[tuple[int, float]], total: int, tainted: Callable[[int, int], bool]) -> float:
    """Median rate of windows (end_step, rate) past warm-up whose span (prev, end] is clean."""
    keep, prev = [], 0
    for end, rate in rates:
        if end > WARMUP * total and not tainted(prev, end):
            keep.append(rate)
        prev = end
    if not keep:
        raise RuntimeError("no steady-state window left: raise --steps")
    return statistics.median(keep)


def csl_throughput(data: str, storage: str, name: str, steps: int, every: int, logs: Path) -> tuple[float, float]:
    run = _spawn(_csl_args(data, storage, name, steps, WINDOW, every, 2), logs / f"{name}.log")
    recs = [json.loads(ln) for ln in (Path(storage) / name / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    rates, val_after = [], set()
    for i, r in enumerate(recs):
        if "samples_per_s" in r:
            rates.append((r["step"], r["samples_per_s"]))
        elif i + 1 < len(recs):  # a validation record: the next window holds it (and its checkpoint)
            val_after.add(recs[i + 1]["step"])

    def tainted(prev: int, end: int) -> bool:
        ckpt = every and any(s % every == 0 for s in range(max(prev, 1), end))  # checkpoint after step s, prev <= s < end
        return bool(ckpt) or end in val_after

    # Samples per CPU-second of the whole session (workers, driver, GCS, raylet, controller) over
    # the same windows, from the session's CPU time read as each step line arrives.
    cpu = run["step_cpu"]
    samples = WINDOW * BATCH * 2
    cpu_rates = [(end, samples / (cpu[end] - cpu[end - WINDOW])) for end, _ in rates
                 if end - WINDOW in cpu and end in cpu and cpu[end] > cpu[end - WINDOW]]
    return _steady_rate(rates, steps, tainted), _steady_rate(cpu_rates, steps, tainted)


# ---------------------------------------------------------------------------------------
# the plain loop (run in a child process so that its thread count and niceness are its own)


def _wds_batches(data: str, epoch: int, image_size: int, num_classes: int):
    import io

    import numpy as np
    import torch
    import webdataset as wds
    from PIL import Image

    from data_shards.decode import IMAGENET_MEAN, IMAGENET_STD

    urls = sorted(str(p) for p in Path(data, "train").glob("*.tar"))
    rng = np.random.default_rng(epoch)
    rng.shuffle(urls)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).shuffle(1000, rng=__import__("random").Random(epoch))
    imgs, tgts = [], []
    for s in ds:
        im = Image.open(io.BytesIO(s["jpg"])).convert("RGB")
        if im.size != (image_size, image_size):
            im = im.resize((image_size, image_size), Image.Resampling.BILINEAR)
        a = np.asarray(im)
        if rng.random() < 0.5:
            a = a[:, ::-1]
        lab = json.loads(s["json"])
        t = np.zeros(num_classes, dtype=np.int8)
        t[lab["pos"]] = 1
        t[lab["neg"]] = -1
        imgs.append(a)
        tgts.append(t)
        if len(imgs) == BATCH:
            x = torch.from_numpy(np.ascontiguousarray(np.stack(imgs))).permute(0, 3, 1, 2).float().div_(255)
            yield {"image": (x - mean) / std, "target": torch.from_numpy(np.stack(tgts))}
            imgs, tgts = [], []


def plain_worker(data: str, steps: int, threads: int, reader: str) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    from data_shards.decode import normalize
    from data_shards.storage import read_manifest
    from data_shards.stream import ShardStream
    from trainer.config import load_config
    from trainer.engine import ModelEMA, channels_last_activations
    from trainer.losses import build_loss
    from trainer.models import build_model, param_groups

    cfg = load_config("synthetic-cpu", [f"data.root={data}", f"data.batch_size={BATCH}"])
    torch.manual_seed(cfg.train.seed)
    manifest = read_manifest(data)
    model = build_model(cfg.model, manifest.num_classes)
    nhwc = cfg.model.channels_last
    if nhwc:  # as the engine does
        channels_last_activations(model)
    loss_fn = build_loss(cfg.loss.name, prior=None, **cfg.loss.params())
    opt = torch.optim.Adam(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.optim.lr, total_steps=steps, pct_start=cfg.optim.pct_start)
    ema = ModelEMA(model, cfg.train.ema_decay)
    stream = ShardStream(data, "train", batch_size=BATCH, image_size=cfg.data.image_size, seed=cfg.train.seed,
                         num_workers=0, shuffle=True, train_transform=True, shuffle_buffer=cfg.data.shuffle_buffer,
                         manifest=manifest, output="uint8")
    model.train()
    loss_sum = torch.zeros(())
    ends, cpu_ends, epoch_starts, step, epoch = [], [], set(), 0, 0
    t0 = time.perf_counter()
    while step < steps:
        stream.set_epoch(epoch)
        loss_fn.set_epoch(epoch, cfg.train.epochs)
        batches = stream if reader == "stream" else _wds_batches(data, epoch, cfg.data.image_size, manifest.num_classes)
        epoch_starts.add(step + 1)
        for batch in batches:
            x = batch["image"]
            logits = model(normalize(x, channels_last=nhwc) if x.dtype == torch.uint8 else x)
            loss = loss_fn(logits.float(), batch["target"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            ema.update(model)
            loss_sum += loss.detach()
            step += 1
            ends.append(time.perf_counter() - t0)
            cpu_ends.append(time.process_time())
            if step >= steps:
                break
        epoch += 1
    rates, cpu_rates = [], []
    for end in range(2 * WINDOW, steps + 1, WINDOW):
        rates.append((end, WINDOW * BATCH / (ends[end - 1] - ends[end - WINDOW - 1])))
        cpu_rates.append((end, WINDOW * BATCH / max(cpu_ends[end - 1] - cpu_ends[end - WINDOW - 1], 1e-9)))
    tainted = lambda prev, end: any(prev < s <= end for s in epoch_starts)  # noqa: E731
    return {"rate": _steady_rate(rates, steps, tainted), "cpu_rate": _steady_rate(cpu_rates, steps, tainted),
            "threads": torch.get_num_threads(), "loss": float(loss_sum) / steps}


def plain_throughput(data: str, steps: int, threads: int, reader: str, copies: int = 1) -> tuple[float, float]:
    """(samples/s, samples per CPU-s) of the plain loop; `copies` > 1 runs that many identical
    loops at once, one per core, and returns the sum of their rates and the mean per CPU-s."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    cmd = [sys.executable, __file__, "--plain-worker", json.dumps({"data": data, "steps": steps, "threads": threads, "reader": reader})]
    # Ray runs its workers at niceness 15 (raylet's worker_niceness): the plain loop gets the same
    # priority, so a busy neighbour at niceness 0 takes the same share from both.
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                              preexec_fn=lambda: os.nice(max(0, RAY_WORKER_NICENESS - os.nice(0))))
             for _ in range(copies)]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"plain loop ({reader}, {threads} threads) failed:\n{stderr[-3000:]}")
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
        assert outs[-1]["threads"] == threads, outs[-1]
    return sum(o["rate"] for o in outs), statistics.mean(o["cpu_rate"] for o in outs)


# ---------------------------------------------------------------------------------------
# resume


def cut_run(src: Path, dst: Path, step: int) -> None:
    """Copy a run folder, keeping checkpoints up to `step` and making `step` Ray's latest."""
    shutil.copytree(src, dst)
    snap_path = dst / "checkpoint_manager_snapshot.json"
    snap = json.loads(snap_path.read_text())
    name = f"checkpoint_{step:08d}"
    keep = [i for i, r in enumerate(snap["checkpoint_results"]) if r["checkpoint_dir_name"] <= name]
    chosen = [snap["checkpoint_results"][i] for i in keep if snap["checkpoint_results"][i]["checkpoint_dir_name"] == name]
    if not chosen:
        raise RuntimeError(f"{src} has no registered {name}")
    for d in dst.glob("checkpoint_*"):
        if d.is_dir() and d.name > name:
            shutil.rmtree(d)
    indices = snap.get("checkpoint_report_indices")
    if isinstance(indices, list) and len(indices) == len(snap["checkpoint_results"]):
        snap["checkpoint_report_indices"] = [indices[i] for i in keep]
    snap["checkpoint_results"] = [snap["checkpoint_results"][i] for i in keep]
    snap["latest_checkpoint_result"] = chosen[0]
    snap_path.write_text(json.dumps(snap))


def resume_latency(data: str, storage: str, base: str, name: str, step: int, total: int, logs: Path) -> tuple[float, float]:
    """(launch -> first step, worker group started -> first step): the second leaves out Python
    and Ray start-up, which cannot depend on the checkpoint, and keeps restore + first batch."""
    cut_run(Path(storage) / base, Path(storage) / name, step)
    r = _spawn(_csl_args(data, storage, name, total, 1, RESUME_EVERY, 100, verbose=True), logs / f"{name}.log",
               stop_at=lambda s: s > step)
    first = min(r["step_times"], default=None)
    if first != step + 1:
        raise RuntimeError(f"resume from step {step}: first step printed was {first}, expected {step + 1}; log {logs / name}.log")
    shutil.rmtree(Path(storage) / name, ignore_errors=True)
    t = r["step_times"][first]
    return t, t - r["marks"].get("group", float("nan"))


# ---------------------------------------------------------------------------------------


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps per throughput run (each contender)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of all throughput contenders, and of resumes")
    ap.add_argument("--resume-steps", type=int, default=120, help="length of the run resumed from (multiple of 20, >= 60)")
    ap.add_argument("--ckpt-every", type=int, default=50, help="checkpoint.every_steps of the throughput runs")
    ap.add_argument("--no-wds", action="store_true", help="skip the webdataset reference")
    ap.add_argument("--workdir", help="keep data, runs and logs here (default: a temp folder, removed)")
    ap.add_argument("--plain-worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.plain_worker:
        kw = json.loads(a.plain_worker)
        print(json.dumps(plain_worker(kw["data"], kw["steps"], kw["threads"], kw["reader"])))
        return 0
    if a.resume_steps % RESUME_EVERY or a.resume_steps < 3 * RESUME_EVERY:
        ap.error(f"--resume-steps must be a multiple of {RESUME_EVERY} and >= {3 * RESUME_EVERY}")

    exe = os.path.relpath(sys.executable) if sys.executable.startswith(str(REPO)) else sys.executable
    print("$ " + shlex.join([exe, *sys.argv]), flush=True)
    print(f"cores {os.cpu_count()}, load average {_load()}", flush=True)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="train-throughput-"))
    work.mkdir(parents=True, exist_ok=True)
    data, storage, logs = str(work / "data"), str(work / "runs"), work / "logs"
    logs.mkdir(exist_ok=True)
    t_all = time.perf_counter()
    try:
        if not Path(data, "dataset.json").exists():
            from data_shards.sources.synthetic import build_synthetic

            build_synthetic(data, train=4000, val=200, image_size=64, shard_samples=250, progress=False)

        contenders: list[tuple[str, Callable[[int], tuple[float, float]], int]] = [
            ("csl train (2 workers x 1 thread)", lambda r: csl_throughput(data, storage, f"tput-{r}", a.steps, a.ckpt_every, logs), 2),
            ("plain loop, 1 thread", lambda r: plain_throughput(data, a.steps, 1, "stream"), 1),
            ("plain loop, 2 threads", lambda r: plain_throughput(data, a.steps, 2, "stream"), 2),
            ("plain loop x 2 at once, 1 thread each", lambda r: plain_throughput(data, a.steps, 1, "stream", copies=2), 2),
        ]
        if not a.no_wds:
            contenders.append(("plain loop + webdataset, 1 thread", lambda r: plain_throughput(data, a.steps, 1, "wds"), 1))
        rates: dict[str, list[tuple[float, float]]] = {name: [] for name, _, _ in contenders}
        for r in range(a.rounds):
            order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
            for name, fn, _ in order:
                t = time.perf_counter()
                rates[name].append(fn(r))
                print(f"  round {r + 1}: {name:<36} {rates[name][-1][0]:7.1f} samples/s, {rates[name][-1][1]:6.1f} per CPU-s "
                      f"({time.perf_counter() - t:.0f} s, load {_load()})", flush=True)

        # start and resume latency
        base = "resume-base"
        r0 = _spawn(_csl_args(data, storage, base, a.resume_steps, 1, RESUME_EVERY, 100, verbose=True),
                    logs / f"{base}.log")
        start_s = r0["step_times"].get(1)
        if start_s is None:
            raise RuntimeError(f"no 'step 1/' line from {base}; log {logs / base}.log")
        start_group = start_s - r0["marks"].get("group", float("nan"))
        print(f"  start to first step: {start_s:.1f} s, of which {start_group:.1f} s after the worker group started "
              f"(whole {a.resume_steps}-step run {r0['wall']:.0f} s)", flush=True)
        early_at, late_at = RESUME_EVERY, a.resume_steps - RESUME_EVERY
        lat: dict[str, list[tuple[float, float]]] = {"early": [], "late": []}
        for r in range(a.rounds):
            pair = [("early", early_at), ("late", late_at)]
            for which, at in pair if r % 2 == 0 else pair[::-1]:
                lat[which].append(resume_latency(data, storage, base, f"resume-{which}-{r}", at, a.resume_steps, logs))
                print(f"  round {r + 1}: resume from step {at:<4} to first step {lat[which][-1][0]:5.1f} s, "
                      f"{lat[which][-1][1]:4.1f} s after the worker group started (load {_load()})", flush=True)
    finally:
        if not a.workdir:
            shutil.rmtree(work, ignore_errors=True)

    med = {name: statistics.median(x for x, _ in v) for name, v in rates.items()}
    med_cpu = {name: statistics.median(c for _, c in v) for name, v in rates.items()}
    cores = {name: c for name, _, c in contenders}
    csl_name, p1_name = contenders[0][0], contenders[1][0]
    print()
    print(f"{'contender':<36} {'samples/s':>10} {'per core':>9} {'cores':>6} {'per CPU-s':>10}  runs (samples/s)")
    for name in rates:
        runs = ", ".join(f"{x:.1f}" for x, _ in rates[name])
        print(f"{name:<36} {med[name]:10.1f} {med[name] / cores[name]:9.1f} {cores[name]:6d} {med_cpu[name]:10.1f}  {runs}")
    print()
    failed = False
    ratio = (med[csl_name] / 2) / (med[p1_name] / 1)
    print(f"csl per core / plain(1 thread) per core = {ratio:.2f}  (a report, no bar)")
    print(f"  for reading: per CPU-second (CPU time actually granted; csl counts all its Ray processes) "
          f"csl / plain(1 thread) = {med_cpu[csl_name] / med_cpu[p1_name]:.2f}")
    p2 = contenders[2][0]
    print(f"  for reading: csl per core / plain(2 threads) per core = {(med[csl_name] / 2) / (med[p2] / 2):.2f}")
    pair = contenders[3][0]
    print(f"  for reading: csl per core / plain(x 2 at once) per core = {(med[csl_name] / 2) / (med[pair] / 2):.2f}")
    if not a.no_wds:
        wds_name = contenders[-1][0]
        print(f"  for reading: plain ShardStream / plain webdataset (1 thread) = {med[p1_name] / med[wds_name]:.2f}")
    print(f"start to first step: {start_s:.1f} s ({start_group:.1f} s after the worker group started)")
    e, l_ = statistics.median(x for x, _ in lat["early"]), statistics.median(x for x, _ in lat["late"])
    spread = max(e, l_) / min(e, l_)
    ok = spread <= 1.2
    failed |= not ok
    print(f"resume to first step: early (step {early_at}) {e:.1f} s, late (step {late_at}) {l_:.1f} s "
          f"[runs: {', '.join(f'{x:.1f}' for x, _ in lat['early'])} / {', '.join(f'{x:.1f}' for x, _ in lat['late'])}]; "
          f"late/early = {l_ / e:.2f}, max/min = {spread:.2f} (bar <= 1.20)  {'PASS' if ok else 'FAIL'}")
    eg, lg = statistics.median(g for _, g in lat["early"]), statistics.median(g for _, g in lat["late"])
    print(f"  for reading: worker group started -> first step (restore + first batch; no Python/Ray start-up): "
          f"early {eg:.1f} s, late {lg:.1f} s, late/early = {lg / eg:.2f}")
    print(f"total {time.perf_counter() - t_all:.0f} s, load average {_load()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
