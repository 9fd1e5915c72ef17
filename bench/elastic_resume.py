"""Benchmark: resuming a run at another world size, against a same-size resume of the same checkpoint.

    .venv/bin/python bench/elastic_resume.py [--zero 2] [--state-model resnet50]

Part 1 (the whole path, `csl` subprocesses on a local Ray cluster, tiny synthetic data): a
2-worker run is killed after its step-4 checkpoint; the run folder is copied twice and resumed
by the same command, once with `cluster.workers=2` and once with `cluster.workers=1`. Reported
for each: seconds from the command's start to the end of its first optimizer step (the first
`metrics.jsonl` record, `train.log_every=1`), and for the other size the conversion the
driver prints (`converted ... in Ns`), as a ratio against the same-size resume.

Part 2 (the conversion's own work, one process, gloo): for a real-size model at the given ZeRO
stage, the seconds to gather the state by parameter name (`Engine.portable_state`) and write
it (`checkpoint.save_portable`), and to read and load it into a fresh engine
(`read_portable` + `load_portable_state`), per GB of `portable.safetensors`. The Ray job
around it in part 1 adds process start, model build and the DeepSpeed load.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

CSL = str(Path(sys.executable).with_name("csl"))


def _csl(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.time()
    p = subprocess.run([CSL, *args], capture_output=True, text=True, timeout=1200)
    return p, t0


def _first_step_s(run: Path, t0: float, after_step: int) -> float:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if r["step"] > after_step and "loss" in r)
    return first["time"] - t0


def part1(zero: int) -> None:
    from data_shards.sources.synthetic import build_synthetic

    tmp = Path(tempfile.mkdtemp(prefix="csl-bench-elastic-"))
    try:
        data = str(tmp / "data")
        build_synthetic(data, train=256, val=64, image_size=32, shard_samples=48, seed=1, progress=False)
        common = ["--config", "synthetic-cpu", "data.image_size=32", "data.batch_size=16", "data.workers=0",
                  "train.log_every=1", f"data.root={data}", "train.epochs=1", "checkpoint.every_steps=4",
                  f"deepspeed.zero_stage={zero}", "cluster.max_failures=0", "run.name=r"]
        p, _ = _csl("train", *common, f"run.storage={tmp / 'a'}", "cluster.workers=2", "debug.fault_step=5",
                    f"debug.fault_marker={tmp / 'fired'}")
        assert p.returncode == 1, p.stderr[-2000:]
        shutil.copytree(tmp / "a", tmp / "b")
        res = {}
        for name, workers in (("a", 2), ("b", 1)):
            p, t0 = _csl("train", *common, f"run.storage={tmp / name}", f"cluster.workers={workers}")
            assert p.returncode == 0, p.stderr[-3000:]
            conv = re.search(r"converted .* in ([0-9.]+)s", p.stdout)
            res[workers] = (_first_step_s(tmp / name / "r", t0, 4), float(conv.group(1)) if conv else 0.0)
        same, other = res[2], res[1]
        print(f"ZeRO {zero}: start to first step: same size (2 workers) {same[0]:.1f}s, other size (1 worker) "
              f"{other[0]:.1f}s = {other[0] / same[0]:.2f}x, of which conversion {other[1]:.1f}s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def part2(zero: int, model_name: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import torch
    import torch.nn.functional as F

    from trainer.checkpoint import PORTABLE_FILE, portable_weights, read_portable, save_portable
    from trainer.config import load_config
    from trainer.engine import setup_engine
    from trainer.models import build_model

    cfg = load_config("synthetic-cpu", [f"model.name={model_name}", f"deepspeed.zero_stage={zero}", "data.batch_size=2"])
    torch.manual_seed(0)
    engine = setup_engine(build_model(cfg.model, 100), cfg, world_size=1, total_steps=10)
    x, y = torch.randn(2, 3, 64, 64), (torch.rand(2, 100) > 0.5).float()
    engine.backward(F.binary_cross_entropy_with_logits(engine.forward(x), y))
    engine.step()  # the optimizer state exists from the first step on
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        save_portable(engine, d, 0)
        t_save = time.perf_counter() - t0
        gb = os.path.getsize(os.path.join(d, PORTABLE_FILE)) / 1e9
        t0 = time.perf_counter()
        tensors, meta = read_portable(d)
        model = build_model(cfg.model, 100)
        model.load_state_dict(portable_weights(tensors))
        t_build = time.perf_counter()
        fresh = setup_engine(model, cfg, world_size=1, total_steps=10)
        t_setup = time.perf_counter() - t_build
        fresh.load_portable_state(tensors, meta)
        t_load = time.perf_counter() - t0 - t_setup
    n = sum(p.numel() for p in model.parameters())
    print(f"{model_name} ({n / 1e6:.1f} M params), ZeRO {zero}: portable.safetensors {gb:.3f} GB "
          f"({gb * 1e9 / n:.2f} B/param); gather + write {t_save:.2f}s = {t_save / gb:.1f} s/GB; "
          f"read + load {t_load:.2f}s = {t_load / gb:.1f} s/GB (engine setup {t_setup:.1f}s not counted)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zero", type=int, default=2)
    ap.add_argument("--state-model", default="resnet50")
    ap.add_argument("--skip-run", action="store_true", help="part 2 only")
    args = ap.parse_args()
    if not args.skip_run:
        part1(args.zero)
    part2(args.zero, args.state_model)


if __name__ == "__main__":
    main()
