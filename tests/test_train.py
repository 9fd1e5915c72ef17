"""`csl train` for real: a local Ray cluster (2 CPU workers), DeepSpeed on gloo, tiny data.

Each run is a `csl` subprocess that joins the session's Ray head through RAY_ADDRESS
(`conftest.ray_head`), as a submitted job's driver joins a cluster (`csl demo`'s test and
`test_local_ray.py` cover the local cluster a command starts on its own). The commands that
read a finished run (export, eval, predict) run in this process through the CLI's `main`.
Failures are injected with `debug.fault_step` (a worker SIGKILLs itself after a given step,
once) and samples are traced with `debug.record_keys`: config overrides that reach the workers
with the rest of the config.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

CSL = str(Path(sys.executable).with_name("csl"))
BASE = ["data.image_size=32", "data.batch_size=16", "data.workers=0", "train.log_every=2", "cluster.workers=2"]


def csl(*args: str, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    p = subprocess.run([CSL, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    return p


def ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, f"rc={p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-6000:]}"
    return p


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    from data_shards.sources.synthetic import build_synthetic

    root = str(tmp_path_factory.mktemp("data") / "syn")
    build_synthetic(root, train=256, val=64, image_size=32, shard_samples=48, seed=1, progress=False)
    return root


def latest_ckpt(run_dir: Path) -> Path:
    snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    return run_dir / snap["latest_checkpoint_result"]["checkpoint_dir_name"]


def test_bad_config_exits_2_naming_the_key(tmp_path):
    p = csl("train", "--config", "synthetic-cpu", "train.epocs=3")
    assert p.returncode == 2 and "train.epocs" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    missing = tmp_path / "nowhere"
    p = csl("train", "--config", "synthetic-cpu", f"data.root={missing}")
    assert p.returncode == 2 and str(missing) in p.stderr and "Traceback" not in p.stderr


# What a quiet `csl train` prints: the driver's own lines (stdout) and Ray's warnings, one line each (stderr).
DRIVER_LINES = ("starting run ", "resuming run ", "logs: ", "step ", "checkpoint at step ", "eval at step ",
                "worker failure ", "run '", "{")


def assert_quiet_console(p: subprocess.CompletedProcess) -> list[str]:
    """No worker output, no traceback; returns the progress lines."""
    console = p.stdout + p.stderr
    assert "Traceback" not in console and "(RayTrainWorker" not in console and "pid=" not in console, console
    assert all(ln.startswith(DRIVER_LINES) for ln in p.stdout.splitlines()), p.stdout
    assert all(ln.startswith("ray ") for ln in p.stderr.splitlines()), p.stderr
    return [ln for ln in p.stdout.splitlines() if ln.startswith("step ")]


def cli(capsys, *argv: str) -> str:
    """`csl ARGV` in this process; its stdout, once it exited 0."""
    from trainer.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(argv))
    out, err = capsys.readouterr()
    assert not e.value.code, f"rc={e.value.code}\n{out[-3000:]}\n{err[-3000:]}"
    return out


@pytest.mark.integration
def test_smoke_train_export_eval_predict(data_root, tmp_path, openimages_dir, ray_env, capsys):
    p = ok(csl("train", "--config", "synthetic-cpu", *BASE, f"data.root={data_root}", "train.max_steps=6",
               "checkpoint.every_steps=3", f"run.storage={tmp_path}", "run.name=smoke", "deepspeed.zero_stage=2",
               env=ray_env))
    run = tmp_path / "smoke"
    progress = assert_quiet_console(p)
    assert [ln.split(" | ")[0] for ln in progress] == ["step 2/6", "step 4/6", "step 6/6"]
    assert all(" samples/s | ETA " in ln for ln in progress), progress
    assert f"checkpoint at step 3: {run / 'checkpoint_00000003'}" in p.stdout and "eval at step 6 " in p.stdout
    assert "step 6/6" in (run / "logs" / "rank0.log").read_text()  # the workers' output went to the run folder
    assert "rank 1 (pid" in (run / "logs" / "rank1.log").read_text()
    assert (run / "config.yaml").exists()
    eval_before = (run / "eval.json").read_text()
    again = ok(csl("train", "--config", "synthetic-cpu", *BASE, f"data.root={data_root}", "train.max_steps=6",
                   "checkpoint.every_steps=3", f"run.storage={tmp_path}", "run.name=smoke", "deepspeed.zero_stage=2"))
    assert "already finished at step 6" in again.stdout and "logs: " not in again.stdout  # no cluster started
    assert (run / "eval.json").read_text() == eval_before and json.loads(again.stdout.splitlines()[-1]) == json.loads(eval_before)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "epoch", "loss", "lr", "samples_per_s"} <= set(lines[0])
    ev = json.loads((run / "eval.json").read_text())
    assert ev["step"] == 6 and 0 <= ev["map_c"] <= 100 and ev["num_valid"] > 0
    ckpt = latest_ckpt(run)
    assert (ckpt / "model.safetensors").exists() and (ckpt / "ds").is_dir()

    out = tmp_path / "export" / "model.safetensors"
    cli(capsys, "export", "--checkpoint", str(run), "--out", str(out), "--weights", "model")
    sd = load_file(str(out))
    assert all(v.dtype == torch.float32 for v in sd.values() if v.is_floating_point())
    classes = json.loads(out.with_suffix("").with_suffix(".classes.json").read_text())
    assert sd["fc.weight"].shape[0] == len(classes) == 31

    res = json.loads(cli(capsys, "eval", "--checkpoint", str(run), "--data", data_root, "--json", "--workers", "0"))
    assert res["step"] == 6 and res["samples"] == 64 and res["map_c"] == pytest.approx(ev["ema_map_c"], abs=1e-6)

    photo = sorted(openimages_dir.glob("images/*.jpg"))[0]
    top = json.loads(cli(capsys, "predict", "--checkpoint", str(run), str(photo), "--top-k", "3", "--json"))[0]["top"]
    assert len(top) == 3 and all(t["name"] for t in top)


def keys_per_epoch(folder: Path, resume_step: int | None) -> dict[int, Counter]:
    """Samples that fed kept optimizer steps: a killed attempt's steps after the checkpoint
    it resumes from were redone, so they do not count."""
    rows = [ln.split() for f in folder.glob("rank*.txt") for ln in f.read_text().splitlines()]
    first_step: dict[str, int] = {}
    for pid, _, step, _ in rows:
        first_step[pid] = min(first_step.get(pid, 1 << 30), int(step))
    out: dict[int, Counter] = {}
    for pid, epoch, step, key in rows:
        killed_attempt = resume_step is not None and first_step[pid] == 1
        if killed_attempt and int(step) > resume_step:
            continue
        out.setdefault(int(epoch), Counter())[key] += 1
    return out


def _common(data_root, storage, zero: int) -> list[str]:
    return ["--config", "synthetic-cpu", *BASE, f"data.root={data_root}", "train.epochs=2",
            "checkpoint.every_steps=4", f"run.storage={storage}", f"deepspeed.zero_stage={zero}", "loss.name=pasl",
            "data.augment.cutout=true", "data.augment.randaugment=true"]  # the exactness holds for augmented pixels


@pytest.fixture(scope="module")
def straight(data_root, tmp_path_factory, ray_head) -> Path:
    """The uninterrupted 2-worker run (ZeRO 3) the resumed runs are compared with."""
    storage = tmp_path_factory.mktemp("straight")
    ok(csl("train", *_common(data_root, storage, 3), "run.name=straight", f"debug.record_keys={storage / 'keys_a'}",
           env=ray_head.driver_env))
    return storage


@pytest.fixture(scope="module")
def killed(data_root, tmp_path_factory, ray_head) -> Path:
    """The same run at ZeRO 2, its rank 0 SIGKILLed at step 6 (after the step-4 checkpoint) with
    no failures allowed: the command exits 1. Each test resumes its own copy of the folder
    (Ray's checkpoint bookkeeping names checkpoints relative to the run folder)."""
    storage = tmp_path_factory.mktemp("killed")
    fault = ["debug.fault_step=6", "debug.fault_rank=0", f"debug.fault_marker={storage / 'fired'}"]
    p = csl("train", *_common(data_root, storage, 2), "run.name=killed", "cluster.max_failures=0",
            f"debug.record_keys={storage / 'keys'}", *fault, env=ray_head.driver_env)
    assert p.returncode == 1 and (storage / "fired").exists(), p.stderr[-3000:]
    assert latest_ckpt(storage / "killed").name == "checkpoint_00000004"
    return storage


@pytest.mark.integration
def test_exact_resume_after_kill(data_root, straight, killed, tmp_path, ray_env):
    shutil.copytree(killed, tmp_path, dirs_exist_ok=True)
    p = ok(csl("train", "--verbose", *_common(data_root, tmp_path, 2), "run.name=killed", "cluster.max_failures=0",
               f"debug.record_keys={tmp_path / 'keys'}", env=ray_env))
    assert "resuming run 'killed' from" in p.stdout
    assert "(RayTrainWorker pid=" in p.stdout + p.stderr  # --verbose: Ray's worker stream is on the console

    a, b = latest_ckpt(straight / "straight"), latest_ckpt(tmp_path / "killed")
    assert a.name == b.name
    for f in ("model.safetensors", "ema.safetensors"):
        wa, wb = load_file(str(a / f)), load_file(str(b / f))
        assert wa.keys() == wb.keys()
        diff = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa if wa[k].is_floating_point())
        assert diff <= 1e-5, f"{f}: max abs difference {diff}"

    all_keys = None
    for keys in (keys_per_epoch(straight / "keys_a", None), keys_per_epoch(tmp_path / "keys", 4)):
        assert sorted(keys) == [0, 1]
        for epoch, counts in keys.items():
            assert set(counts.values()) == {1}, f"epoch {epoch}: some sample seen twice"
            all_keys = all_keys or set(counts)
            assert set(counts) == all_keys and len(all_keys) == 256


def _assert_each_sample_once_per_epoch(keys: dict[int, Counter]) -> None:
    assert sorted(keys) == [0, 1]
    for epoch, counts in keys.items():
        assert set(counts.values()) == {1} and len(counts) == 256, f"epoch {epoch}: a sample missing or seen twice"


@pytest.mark.integration
def test_resume_at_another_world_size(data_root, straight, killed, tmp_path, ray_env):
    """Killed after the step-4 checkpoint at 2 workers, resumed by the same command with
    cluster.workers=1: ZeRO 2's state is cut by rank, so the driver first converts it to the
    world-size-free layout (at ZeRO 0, DeepSpeed's own file loads at any size:
    `test_engine.test_two_ranks_save_load_per_rank_state`). Each rank's lane is now a
    micro-step of one worker (grad_accum 2), so the
    run takes the uninterrupted run's steps over the same samples per step. The parameters
    come out equal (within 1e-5: (g1 + g2) / 2 is what two ranks average, and halving is exact
    in floating point), BatchNorm's running statistics do not: one worker folds the two
    micro-batches in turn where two ranks averaged theirs. Evaluation uses those statistics,
    so the validation mAP (64 images) may move: within 3 points of the uninterrupted run's."""
    shutil.copytree(killed, tmp_path, dirs_exist_ok=True)
    p = ok(csl("train", *_common(data_root, tmp_path, 2), "run.name=killed", "cluster.max_failures=0",
               "cluster.workers=1", f"debug.record_keys={tmp_path / 'keys'}", env=ray_env))
    assert "resuming run 'killed' from" in p.stdout and "at 1 workers (written by 2)" in p.stdout
    assert "converted " in p.stdout
    log = (tmp_path / "killed" / "logs" / "rank0.log").read_text()
    assert "world size 2 -> 1: per-worker batch 16, grad_accum 2 (global batch 32" in log
    a, b = latest_ckpt(straight / "straight"), latest_ckpt(tmp_path / "killed")
    assert a.name == b.name == "checkpoint_00000016"
    _assert_each_sample_once_per_epoch(keys_per_epoch(tmp_path / "keys", 4))
    wa, wb = load_file(str(a / "ema.safetensors")), load_file(str(b / "ema.safetensors"))
    diff = max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa if "running" not in k and "num_batches" not in k)
    assert "bn1.bias" in wa and diff <= 1e-5, f"parameters differ by {diff}"
    ea = json.loads((straight / "straight" / "eval.json").read_text())
    eb = json.loads((tmp_path / "killed" / "eval.json").read_text())
    print(f"max weight diff {diff:.2e}, map_c {ea['map_c']:.3f} vs {eb['map_c']:.3f}")
    assert abs(ea["map_c"] - eb["map_c"]) <= 3.0


@pytest.mark.integration
def test_worker_failure_resumes_and_another_world_size_or_schedule_is_refused(data_root, tmp_path, ray_env):
    marker = tmp_path / "fired"
    args = ["--config", "synthetic-cpu", *BASE, f"data.root={data_root}", "train.max_steps=8", "checkpoint.every_steps=3",
            f"run.storage={tmp_path}", "run.name=flaky", "cluster.max_failures=1", "deepspeed.zero_stage=0",
            "debug.fault_step=5", "debug.fault_rank=1", f"debug.fault_marker={marker}",
            "cluster.min_workers=1", f"debug.record_keys={tmp_path / 'keys'}"]  # an elastic group (1..2 workers)
    p = ok(csl("train", *args, env=ray_env))
    epoch0 = keys_per_epoch(tmp_path / "keys", 3)[0]  # one epoch: 8 steps of 32
    assert set(epoch0.values()) == {1} and len(epoch0) == 256
    assert marker.read_text().startswith("rank 1 killed at step 5")
    assert "resumed at step 3" in (tmp_path / "flaky" / "logs" / "rank0.log").read_text()
    assert_quiet_console(p)  # the failure is one line, not Ray's tracebacks
    assert "worker failure 1 (cluster.max_failures=1): rank " in p.stdout
    assert "from the checkpoint at step 3" in p.stdout
    assert json.loads((tmp_path / "flaky" / "eval.json").read_text())["step"] == 8

    # The same run folder, resumed with settings that would change its trajectory: refused
    # before any Ray work, with the way out named.
    p = csl("train", *args, "cluster.workers=3")
    assert p.returncode == 2 and "cluster.workers=3" in p.stderr and "sizes that keep" in p.stderr and ": 1, 2" in p.stderr
    p = csl("train", *args, "train.max_steps=10", "optim.lr=0.01")
    assert p.returncode == 2 and "train.max_steps: 8 -> 10" in p.stderr and "optim.lr" in p.stderr
