"""Benchmark: the Ray prior pass (1 and 2 actors) against single-process inference, same run.

    .venv/bin/python bench/prior_pass.py [--train 3000] [--small 1000] [--image-size 64] [--batch-size 64]

What it measures, on one synthetic dataset and one untrained small-cnn checkpoint (throughput
does not depend on the weights):
- single process: `shard_sums` over every shard in this process, 1 torch thread and 2: the
  same decode and model code the actors run, without Ray;
- the pass (`estimate_priors`) with 1 and 2 actors (1 CPU each) on a 2-CPU local cluster.
  End-to-end images/s includes the fixed cost of starting the actors (import torch, load the
  model) and writing outputs; the *scoring* rate (priors.json `timing`: images / wall time
  from the first shard an actor started to the last it finished, actor clocks) excludes that
  fixed cost and is what a large split sees;
- peak driver RSS (`ru_maxrss` of a fresh `csl prior` process, attached to the same cluster
  through RAY_ADDRESS) on the small and the big split: it must not grow with N.
Ratios are against the single-process 1-thread rate measured in this run, so a busy shared
machine slows both sides alike (not exactly: load changes during the run; repeat to judge).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]


def _single(ckpt: str, root: str, split: str, threads: int, batch_size: int) -> tuple[int, float]:
    import torch

    from data_shards.storage import join, read_manifest
    from trainer.inference import load_checkpoint
    from trainer.prior_pass import shard_sums

    torch.set_num_threads(threads)
    lm = load_checkpoint(ckpt, "auto")
    m = read_manifest(root)
    t0, n = time.perf_counter(), 0
    for s in m.split(split).shards:
        r = shard_sums(lm.model, join(root, s.path), s.samples, image_size=lm.cfg.data.image_size,
                       num_classes=m.num_classes, batch_size=batch_size)
        n += r["count"]
    return n, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=3000)
    ap.add_argument("--small", type=int, default=1000, help="size of the second (val) split")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--shard-samples", type=int, default=100)
    args = ap.parse_args(argv)
    print("command: " + " ".join([os.path.relpath(sys.executable), *sys.argv]), flush=True)

    import ray
    import torch

    from data_shards.sources.synthetic import build_synthetic
    from trainer.config import load_config
    from trainer.models import build_model
    from trainer.checkpoint import write_weights_checkpoint as write_checkpoint
    from trainer.prior_pass import estimate_priors

    tmp = tempfile.mkdtemp(prefix="csl-bench-prior-")
    root, ckpt = os.path.join(tmp, "data"), os.path.join(tmp, "ckpt")
    m = build_synthetic(root, train=args.train, val=args.small, image_size=args.image_size,
                        shard_samples=args.shard_samples, seed=0, workers=2, progress=False)
    cfg = load_config("synthetic-cpu", [f"data.image_size={args.image_size}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, m.num_classes)
    write_checkpoint(ckpt, model.state_dict(), cfg.model_dump(mode="json"), m.classes, ema_state_dict=model.state_dict())
    sizes = {"val": m.split("val").samples, "train": m.split("train").samples}
    print(f"data: {sizes['train']} + {sizes['val']} images at {args.image_size}px, {m.num_classes} classes, "
          f"{args.shard_samples} per shard; model small-cnn; batch {args.batch_size}; {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    rows: list[tuple[str, int, float, float | None, float | None]] = []
    for threads in (1, 2):
        n, t = _single(ckpt, root, "train", threads, args.batch_size)
        rows.append((f"single process, {threads} thread{'s' if threads > 1 else ''}", n, t, n / t, None))
    base = rows[0][1] / rows[0][2]

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for actors in (1, 2):
            t0 = time.perf_counter()
            res = estimate_priors(ckpt, root, os.path.join(tmp, f"out{actors}", "priors.csv"), split="train",
                                  actors=actors, batch_size=args.batch_size, progress=False)
            t = time.perf_counter() - t0
            if res["samples"] != sizes["train"]:
                raise RuntimeError(f"{actors} actors: {res['samples']} samples, manifest {sizes['train']}")
            rows.append((f"ray pass, {actors} actor{'s' if actors > 1 else ''}", sizes["train"], t,
                         res["timing"]["scoring_images_per_s"], res["timing"]["first_result_s"]))

        peak = {}
        address = ray.get_runtime_context().gcs_address
        csl = str(Path(sys.executable).with_name("csl"))
        for split in ("val", "train"):
            out = Path(tmp) / "mem" / split / "priors.csv"
            p = subprocess.run([csl, "prior", "--checkpoint", ckpt, "--data", root, "--split", split, "--out", str(out),
                                "--actors", "2", "--no-progress", "--batch-size", str(args.batch_size)],
                               capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": address})
            if p.returncode:
                raise RuntimeError(f"csl prior failed: {p.stderr[-2000:]}")
            peak[split] = json.loads(out.with_suffix(".json").read_text())["driver_peak_rss_mb"]
    finally:
        ray.shutdown()

    print(f"\n{'configuration':<28} {'images':>7} {'seconds':>8} {'img/s':>7} {'vs single':>9} {'scoring img/s':>13} "
          f"{'vs single':>9} {'1st result s':>12}")
    for name, n, t, steady, first in rows:
        st = f"{steady:13.0f} {steady / base:8.2f}x" if steady else f"{'n/a':>13} {'':>9}"
        fr = f"{first:12.2f}" if first is not None else f"{'':>12}"
        print(f"{name:<28} {n:>7} {t:>8.2f} {n / t:>7.0f} {n / t / base:>8.2f}x {st} {fr}")
    r1, r2 = rows[2], rows[3]
    print(f"\nscaling, end to end: 2 actors / single 1 thread = {r2[1] / r2[2] / base:.2f}x; 2 actors / 1 actor = {r1[2] / r2[2]:.2f}x")
    if r1[3] and r2[3]:
        print(f"scaling, scoring:    2 actors / single 1 thread = {r2[3] / base:.2f}x; 2 actors / 1 actor = {r2[3] / r1[3]:.2f}x")
    print(f"peak driver RSS (fresh `csl prior`, 2 actors): {sizes['val']} images {peak['val']:.0f} MB, "
          f"{sizes['train']} images {peak['train']:.0f} MB (growth {peak['train'] - peak['val']:+.0f} MB)")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
