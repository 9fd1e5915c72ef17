"""GPU smoke: the OpenImages presets' models through `csl` on one CUDA GPU, against a plain
PyTorch bf16 loop on the same model with its batches already on the GPU.

    .venv/bin/python bench/gpu_smoke.py [--steps 300] [--models resnet50,tresnet-m] [--out DIR]
    .venv/bin/python bench/gpu_smoke.py --cpu-check     # the same path, tiny, on this CPU (no bar)

Without a CUDA device (and without `--cpu-check`) it says so and exits 2. Sized to finish in
about 8 minutes on one H200 with 16 host cores; every figure is printed as soon as it is
measured, and a summary table closes the run.

What runs, in a fresh folder (a temp folder unless `--out`):

1. Shards. Synthetic images (`data_shards.sources.synthetic`) at 224 px with a class list
   padded to OpenImages' 9,600 classes: the 31 synthetic classes keep their annotations and
   the 9,569 others have none, so heads, losses, scores and priors are 9,600 wide while the
   labels stay meaningful. `--unique` images are drawn per split and repeated under new keys
   up to the train size (`--steps` x batch, one epoch: no epoch end inside the timed steps);
   drawing 224 px images costs far more than reading them, and repeats change no cost of
   training (every sample is still read and decoded from a tar).
2. `csl train` for each model's preset (`openimages-v6-resnet50`, `openimages-v6-tresnet-m`:
   bottleneck head, Adam, OneCycle, EMA 0.9997, bf16, ZeRO-1, batch 64, 224 px) with
   overrides for one GPU: one Ray Train worker with 1 GPU (NCCL), `train.max_steps`, all CPUs
   but two for the worker (and its `data.workers` loader processes, CPUs - 2), no time-based
   checkpoint. Its rate is `samples_per_s` of `metrics.jsonl` (one record every `--log-every`
   steps): the median of the records after the first 20% (start-up, cuDNN autotuning).
3. `csl prior --device auto` over the train split with that run's checkpoint (GPU actors when
   the local Ray sees a GPU), and `csl eval --device cuda` over the val split: their images/s
   (the prior pass's own timing and eval's `images_per_s`, both after Ray/model start-up).
4. The plain loop, in this process, no Ray, no DeepSpeed: the same `build_model` (channels
   last), loss (`build_loss` with the preset's parameters), Adam over `param_groups` (fused)
   at a constant LR (OneCycle's step is a few scalar updates), an fp32 EMA of the parameters
   updated each step with `_foreach_lerp_`, bf16 autocast. Its batches are
   `--plain-batches` real batches from the shards, normalised on the GPU once and cycled:
   no loader at all, so it is the GPU-bound ceiling. `--plain-steps` timed steps after
   `--plain-warmup`, between two `cuda.synchronize()`.

Bar (GPU only, from issue 15): `csl train` images/s >= 0.9 x the plain loop's, per model.
Exit code 1 if a bar fails or a command fails, 2 without a CUDA device.

`--cpu-check` runs every step above on the CPU with tiny sizes (32 px, batch 4, a few steps,
one loader process): the same commands, overrides and parsing, so the script is checked on a
machine without a GPU. Its figures mean nothing and no bar applies; `csl train` keeps the
presets' bf16 and ZeRO-1 (DeepSpeed on gloo), eval runs `--device cpu`, the plain loop fp32.

Caveats: one run per model, no repeats; `csl train` pays for its validation pass and final
checkpoint after the timed steps, outside the figure; the plain loop leaves out what `csl`
does beside the GPU work by design (data loading, Ray, DeepSpeed's bookkeeping): that is what
the ratio measures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CSL = str(Path(sys.executable).with_name("csl"))
CLASSES = 9600
BAR = 0.9
PRESETS = {"resnet50": "openimages-v6-resnet50", "tresnet-m": "openimages-v6-tresnet-m"}


@dataclass
class Sizes:
    image_size: int
    batch: int
    steps: int
    unique: int
    val: int
    shard_samples: int
    loader_workers: int
    cpus_per_worker: int
    gpus: int
    log_every: int
    plain_batches: int
    plain_warmup: int
    plain_steps: int
    timeout_s: int


def sizes(args: argparse.Namespace, cpus: int) -> Sizes:
    if args.cpu_check:
        return Sizes(image_size=32, batch=4, steps=args.steps or 4, unique=16, val=16, shard_samples=8,
                     loader_workers=1, cpus_per_worker=1, gpus=0, log_every=1, plain_batches=2, plain_warmup=1,
                     plain_steps=3, timeout_s=900)
    return Sizes(image_size=224, batch=64, steps=args.steps or 300, unique=args.unique, val=2048, shard_samples=1000,
                 loader_workers=max(1, cpus - 2), cpus_per_worker=max(1, cpus - 2), gpus=1, log_every=args.log_every,
                 plain_batches=args.plain_batches, plain_warmup=args.plain_warmup, plain_steps=args.plain_steps,
                 timeout_s=600)


def say(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------
# data


def build_shards(root: str, sz: Sizes, workers: int) -> dict[str, int]:
    """Synthetic records, repeated under new keys, with the class list padded to 9,600."""
    from data_shards.format import ClassInfo, Record
    from data_shards.sources.synthetic import synthetic_classes, synthetic_records
    from data_shards.writer import write_dataset

    classes = synthetic_classes()
    classes += [ClassInfo(id=f"smoke:{i:05d}", name=f"unannotated {i}") for i in range(CLASSES - len(classes))]
    counts = {"train": sz.steps * sz.batch, "val": sz.val}

    def split(name: str) -> list[Record]:
        scheme = "openimages" if name == "train" else "full"  # as `csl shards synthetic` annotates its splits
        drawn = list(synthetic_records(name, min(sz.unique, counts[name]), image_size=sz.image_size, scheme=scheme,
                                       workers=workers))
        return [Record(key=f"{name}_{i:08d}", image=r.image, pos=r.pos, neg=r.neg, true=r.true)
                for i, r in ((i, drawn[i % len(drawn)]) for i in range(counts[name]))]

    write_dataset(root, classes, {name: split(name) for name in counts}, shard_samples=sz.shard_samples,
                  meta={"source": "bench/gpu_smoke.py", "image_size": sz.image_size})
    return counts


# ---------------------------------------------------------------------------------------
# csl commands


def run_csl(args: list[str], log: Path, timeout_s: int) -> tuple[str, float]:
    """Run `csl ...` with its output in `log`; (stdout, wall seconds). A failure raises with the
    log's tail, so the summary names what broke."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ csl " + " ".join(args) + "\n")
        f.flush()
        p = subprocess.run([CSL, *args], stdout=subprocess.PIPE, stderr=f, text=True, timeout=timeout_s)
        f.write(p.stdout)
    if p.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"csl {args[0]} exited {p.returncode}; last lines of {log}:\n{tail}")
    return p.stdout, time.perf_counter() - t0


def train_overrides(sz: Sizes, root: str, storage: str, name: str) -> list[str]:
    return [
        f"data.root={root}", f"data.image_size={sz.image_size}", f"data.batch_size={sz.batch}",
        f"data.workers={sz.loader_workers}", "data.shuffle_buffer=1000",
        f"train.max_steps={sz.steps}", "train.epochs=1", f"train.log_every={sz.log_every}",
        "train.precision=bf16", "deepspeed.zero_stage=1",
        "cluster.workers=1", f"cluster.gpus_per_worker={sz.gpus}", f"cluster.cpus_per_worker={sz.cpus_per_worker}",
        "checkpoint.every_steps=0", "checkpoint.every_minutes=0", "checkpoint.keep=1",
        f"run.storage={storage}", f"run.name={name}",
    ]


def steady_rate(metrics: Path) -> tuple[float, int]:
    """Median `samples_per_s` of the log records after the first 20%, and how many were used."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rates = [r["samples_per_s"] for r in records if "samples_per_s" in r]  # not the validation records
    if not rates:
        raise RuntimeError(f"{metrics}: no training records")
    kept = rates[len(rates) // 5:] or rates
    return statistics.median(kept), len(kept)


# ---------------------------------------------------------------------------------------
# the plain loop


def plain_rate(preset: str, sz: Sizes, root: str, device: str) -> float:
    """Images/s of a plain PyTorch bf16 training loop on the preset's model, batches on `device`."""
    import torch

    from data_shards.decode import normalize
    from data_shards.stream import ShardStream
    from trainer.config import load_config
    from trainer.inference import autocast
    from trainer.losses import build_loss
    from trainer.models import build_model, channels_last, param_groups

    cfg = load_config(preset, [f"data.image_size={sz.image_size}", f"data.batch_size={sz.batch}"])
    dev = torch.device(device)
    torch.manual_seed(0)
    model = channels_last(build_model(cfg.model.model_copy(update={"pretrained": None}), CLASSES)).to(dev).train()
    loss_fn = build_loss(cfg.loss.name, prior=None, **cfg.loss.params()).to(dev)
    opt = torch.optim.Adam(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, fused=dev.type == "cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    ema = [p.detach().float().clone() for p in params]
    decay = cfg.train.ema_decay
    # workers=0: this process has initialised CUDA, and the batches are read once
    stream = ShardStream(root, "train", batch_size=sz.batch, image_size=sz.image_size, shuffle=False,
                         train_transform=False, output="uint8")
    batches = []
    for batch in stream:
        batches.append((normalize(batch["image"].to(dev), channels_last=True), batch["target"].to(dev)))
        if len(batches) == sz.plain_batches:
            break

    def step(i: int) -> None:
        x, target = batches[i % len(batches)]
        with autocast(dev):
            logits = model(x)
        loss = loss_fn(logits.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)

    for i in range(sz.plain_warmup):
        step(i)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for i in range(sz.plain_steps):
        step(i)
    sync()
    rate = sz.plain_steps * sz.batch / (time.perf_counter() - t0)
    del model, opt, batches, ema
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rate


# ---------------------------------------------------------------------------------------


def smoke_model(key: str, sz: Sizes, root: str, work: Path, counts: dict[str, int], cpu_check: bool) -> dict:
    preset, name = PRESETS[key], f"smoke-{key}"
    storage = str(work / "runs")
    shutil.rmtree(os.path.join(storage, name), ignore_errors=True)  # ours: a rerun must not resume
    row: dict = {"model": key}
    say(f"\n== {key} ({preset}) ==")
    _, wall = run_csl(["train", "--config", preset, *train_overrides(sz, root, storage, name)],
                      work / f"train-{key}.log", sz.timeout_s)
    run_dir = Path(storage) / name
    row["train"], windows = steady_rate(run_dir / "metrics.jsonl")
    ev = json.loads((run_dir / "eval.json").read_text())
    say(f"csl train: {row['train']:.1f} images/s (median of {windows} log windows after the first 20%; "
        f"{sz.steps} steps in {wall:.0f} s wall with start-up, validation and checkpoint); "
        f"its validation: mAP(C) {ev.get('map_c', float('nan')):.2f}, EMA {ev.get('ema_map_c', float('nan')):.2f}")

    out, wall = run_csl(["prior", "--checkpoint", str(run_dir), "--data", root, "--split", "train",
                         "--out", str(work / f"priors-{key}.csv"), "--device", "auto", "--actors", "1",
                         "--no-progress"], work / f"prior-{key}.log", sz.timeout_s)
    m = re.search(r"(\d+) samples scored.* by \d+ (\w*) ?actors in ([0-9.]+)s", out)
    if m:
        row["prior"] = int(m.group(1)) / max(float(m.group(3)), 1e-9)
        say(f"csl prior: {row['prior']:.1f} images/s ({m.group(1)} images on {m.group(2) or '?'} actors in "
            f"{m.group(3)} s; {wall:.0f} s wall with Ray start-up)")
    else:
        row["prior"] = counts["train"] / wall
        say(f"csl prior: {row['prior']:.1f} images/s over {wall:.0f} s wall, Ray start-up included "
            "(its summary line was not recognised)")

    device = "cpu" if cpu_check else "cuda"
    out, wall = run_csl(["eval", "--checkpoint", str(run_dir), "--data", root, "--device", device, "--json"],
                        work / f"eval-{key}.log", sz.timeout_s)
    res = json.loads(out)
    row["eval"], row["map_c"] = res["images_per_s"], res["map_c"]
    say(f"csl eval --device {device}: {row['eval']} images/s ({res['samples']} images, {res['workers']} loader "
        f"workers, {res['weights']} weights; {wall:.0f} s wall with start-up); mAP(C) {res['map_c']:.2f}")

    row["plain"] = plain_rate(preset, sz, root, device)
    row["ratio"] = row["train"] / row["plain"]
    say(f"plain PyTorch {'fp32' if cpu_check else 'bf16'} loop, batches on the {device}: {row['plain']:.1f} images/s; "
        f"csl train / plain = {row['ratio']:.3f}" + ("" if cpu_check else f" (bar >= {BAR})"))
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-check", action="store_true", help="tiny sizes on the CPU: checks the script, measures nothing")
    ap.add_argument("--models", default="resnet50,tresnet-m", help=f"comma-separated, of {', '.join(PRESETS)}")
    ap.add_argument("--steps", type=int, default=None, help="csl train steps [default: 300; 4 with --cpu-check]")
    ap.add_argument("--unique", type=int, default=4096, help="distinct images drawn per split (then repeated)")
    ap.add_argument("--log-every", type=int, default=10, help="csl train's metrics interval, steps")
    ap.add_argument("--plain-batches", type=int, default=8)
    ap.add_argument("--plain-warmup", type=int, default=20)
    ap.add_argument("--plain-steps", type=int, default=100)
    ap.add_argument("--out", default=None, help="keep everything here (default: a temp folder, removed)")
    args = ap.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in PRESETS]
    if bad or not models:
        ap.error(f"--models: unknown {bad or models}; use {', '.join(PRESETS)}")

    import torch

    if not args.cpu_check and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device is visible to torch here; run it on a GPU machine "
              "(or with --cpu-check for the tiny CPU run of the same path)", file=sys.stderr)
        return 2
    cpus = len(os.sched_getaffinity(0))
    sz = sizes(args, cpus)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.cpu_check else "none (cpu check)"
    say(f"gpu_smoke {time.strftime('%Y-%m-%d')}: {platform.node()}, GPU {gpu}, {cpus} CPUs, torch {torch.__version__}; "
        f"{sz.image_size} px, batch {sz.batch}, {sz.steps} steps, {CLASSES} classes")

    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="csl-gpu-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    rows, failed = [], []
    t_all = time.perf_counter()
    try:
        root = str(work / "data")
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        counts = build_shards(root, sz, workers=max(1, cpus - 1))
        say(f"shards: {counts['train']} train + {counts['val']} val images at {sz.image_size} px "
            f"({min(sz.unique, counts['train'])} drawn) in {time.perf_counter() - t0:.0f} s -> {root}")
        for key in models:
            try:
                rows.append(smoke_model(key, sz, root, work, counts, args.cpu_check))
            except Exception as e:  # noqa: BLE001 - named in the summary; the next model still runs
                failed.append(key)
                say(f"{key}: FAILED: {type(e).__name__}: {e}")
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)

    say(f"\nsummary ({time.perf_counter() - t_all:.0f} s in all)")
    say("| model | csl train img/s | plain img/s | ratio | csl prior img/s | csl eval img/s | eval mAP(C) |")
    say("|---|---|---|---|---|---|---|")
    for r in rows:
        say(f"| {r['model']} | {r['train']:.1f} | {r['plain']:.1f} | {r['ratio']:.3f} | {r['prior']:.1f} | "
            f"{r['eval']} | {r['map_c']:.2f} |")
    if args.cpu_check:
        say("cpu check: every step ran on the CPU at tiny sizes; the figures measure nothing, no bar applies"
            + (f"; FAILED: {', '.join(failed)}" if failed else ""))
        return 1 if failed else 0
    low = [r["model"] for r in rows if r["ratio"] < BAR]
    say(f"bar csl train >= {BAR} x plain: " + ("met" if not low and not failed else f"NOT met ({', '.join(low + failed)})"))
    return 1 if low or failed else 0


if __name__ == "__main__":
    sys.exit(main())
