"""Benchmark: the prior pass's actors against a plain inference loop, same run, same data.

    .venv/bin/python bench/prior_pass.py [--train 8000] [--small 1000] [--image-size 64] [--batch-size 64]

On one synthetic dataset and one untrained small-cnn checkpoint (throughput does not depend on
the weights), on a 2-CPU local Ray cluster:
- plain loop: this process reads the split with `ShardStream` in evaluation order with one
  loader worker decoding, runs the model on one thread and sums sigmoid outputs: the least a
  scorer can do with the same decode processes; run before and after the actor, with the
  Ray cluster up (idle) both times, so both sides share the cores with Ray's own processes;
- the pass (`estimate_priors`) with 1 actor of 2 CPUs: one loader worker decoding and the
  model on one thread, as the plain loop. Bar: its scoring rate (priors.json `timing`: images
  over the wall time from the first shard an actor started to the last it finished, actor
  clocks; it excludes starting the actor) >= 0.85 x the plain loop's;
- 2 actors vs 1 (1 CPU each, decoding in-process): the scaling report;
- peak driver RSS (`ru_maxrss` of a fresh `csl prior` process attached through RAY_ADDRESS)
  on the small and the big split: it must not grow with N.
The machine is shared and noisy: the ratios are measured in one run; repeat to judge.
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

BAR = 0.85


def _plain(ckpt: str, root: str, split: str, workers: int, batch_size: int) -> tuple[int, float]:
    """The plain loop: stream, normalise, forward, sum; images and seconds (workers started inside)."""
    import torch

    from data_shards.decode import normalize
    from data_shards.stream import ShardStream
    from trainer.inference import load_checkpoint

    torch.set_num_threads(1)
    lm = load_checkpoint(ckpt, "auto")
    model = lm.model.eval()
    stream = ShardStream(root, split, batch_size=batch_size, image_size=lm.cfg.data.image_size, num_workers=workers,
                         shuffle=False, train_transform=False, output="uint8", persistent_workers=False)
    total = torch.zeros(len(lm.classes), dtype=torch.float64)
    t0, n = time.perf_counter(), 0
    with torch.no_grad():
        for batch in stream:
            total += model(normalize(batch["image"])).float().sigmoid().sum(0, dtype=torch.float64)
            n += len(batch["key"])
    return n, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, default=8000)
    ap.add_argument("--small", type=int, default=1000, help="size of the second (val) split, for the memory check")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--shard-samples", type=int, default=250)
    args = ap.parse_args(argv)
    print("command: " + " ".join([os.path.relpath(sys.executable), *sys.argv]), flush=True)

    import ray
    import torch

    from data_shards.sources.synthetic import build_synthetic
    from trainer.checkpoint import write_weights_checkpoint
    from trainer.config import load_config
    from trainer.models import build_model
    from trainer.prior_pass import estimate_priors

    tmp = tempfile.mkdtemp(prefix="csl-bench-prior-")
    root, ckpt = os.path.join(tmp, "data"), os.path.join(tmp, "ckpt")
    m = build_synthetic(root, train=args.train, val=args.small, image_size=args.image_size,
                        shard_samples=args.shard_samples, seed=0, workers=2, progress=False)
    cfg = load_config("synthetic-cpu", [f"data.image_size={args.image_size}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, m.num_classes)
    write_weights_checkpoint(ckpt, model.state_dict(), cfg.model_dump(mode="json"), m.classes)
    sizes = {"val": m.split("val").samples, "train": m.split("train").samples}
    print(f"data: {sizes['train']} + {sizes['val']} images at {args.image_size}px, {m.num_classes} classes, "
          f"{args.shard_samples} per shard; model small-cnn; batch {args.batch_size}; {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    # The cluster is up before the plain loop runs: Ray's own processes take a share of 2 cores
    # even when idle, and both sides should pay it (on a GPU node they are a rounding error).
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rates: dict[str, float] = {}
    plain_runs: list[float] = []

    def plain_loop() -> None:
        n, t = _plain(ckpt, root, "train", 1, args.batch_size)
        plain_runs.append(n / t)
        print(f"plain loop, 1 loader worker + 1 model thread: {n} images in {t:.2f} s = {n / t:.0f} img/s", flush=True)

    try:
        plain_loop()
        for name, kw in (("1 actor, 2 CPUs (1 loader worker)", {"actors": 1, "cpus_per_actor": 2}),
                         ("1 actor, 1 CPU (in-process decode)", {"actors": 1, "cpus_per_actor": 1}),
                         ("2 actors, 1 CPU each (in-process)", {"actors": 2, "cpus_per_actor": 1})):
            t0 = time.perf_counter()
            res = estimate_priors(ckpt, root, os.path.join(tmp, name.replace(" ", "_"), "priors.csv"), split="train",
                                  device="cpu", batch_size=args.batch_size, progress=False, **kw)
            wall = time.perf_counter() - t0
            if res["samples"] != sizes["train"]:
                raise RuntimeError(f"{name}: {res['samples']} samples, manifest {sizes['train']}")
            rates[name] = res["timing"]["scoring_images_per_s"]
            print(f"ray pass, {name}: scoring {rates[name]:.0f} img/s, end to end {sizes['train'] / wall:.0f} img/s "
                  f"({wall:.1f} s, first result after {res['timing']['first_result_s']:.1f} s)", flush=True)
            if len(rates) == 1:
                plain_loop()  # on both sides of the actor run: the load drifts

        peak = {}
        address = ray.get_runtime_context().gcs_address
        csl = str(Path(sys.executable).with_name("csl"))
        for split in ("val", "train"):
            out = Path(tmp) / "mem" / split / "priors.csv"
            p = subprocess.run([csl, "prior", "--checkpoint", ckpt, "--data", root, "--split", split, "--out", str(out),
                                "--device", "cpu", "--actors", "2", "--no-progress", "--batch-size", str(args.batch_size)],
                               capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": address})
            if p.returncode:
                raise RuntimeError(f"csl prior failed: {p.stderr[-2000:]}")
            peak[split] = json.loads(out.with_suffix(".json").read_text())["driver_peak_rss_mb"]
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    plain = sum(plain_runs) / len(plain_runs)
    per_actor = rates["1 actor, 2 CPUs (1 loader worker)"] / plain
    print(f"\nactor / plain loop (same decode processes, plain = mean of the runs before and after): {per_actor:.2f} (bar >= {BAR}: "
          f"{'PASS' if per_actor >= BAR else 'FAIL'})")
    print(f"2 actors / 1 actor (1 CPU each): {rates['2 actors, 1 CPU each (in-process)'] / rates['1 actor, 1 CPU (in-process decode)']:.2f}")
    print(f"peak driver RSS (fresh `csl prior`, 2 actors): {sizes['val']} images {peak['val']:.0f} MB, "
          f"{sizes['train']} images {peak['train']:.0f} MB (growth {peak['train'] - peak['val']:+.0f} MB)")
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    return 0 if per_actor >= BAR else 1


if __name__ == "__main__":
    sys.exit(main())
