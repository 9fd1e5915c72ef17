"""The checkpoint layout (`trainer/checkpoint.py`): readers fetch the state file and one weights
file, never DeepSpeed's state or the folder; the EMA is stored once; time-based checkpoints are
taken at the same steps on every rank (rank 0's clock decides)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch

from data_shards.format import ClassInfo
from trainer.checkpoint import DS_TAG, EMA_FILE, MODEL_FILE, STATE_FILE, read_weights, resolve_checkpoint

C = 5
CLASSES = [ClassInfo(id=f"/m/{i}", name=f"c{i}") for i in range(C)]

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _checkpoint_folder(root: Path, final: bool = True) -> Path:
    """A checkpoint as training writes it: DeepSpeed's folder, the EMA, the raw weights (in the
    final checkpoint), the state."""
    from trainer.checkpoint import save_checkpoint
    from trainer.config import load_config
    from trainer.engine import setup_engine
    from trainer.models import build_model

    cfg = load_config("synthetic-cpu", ["train.ema_decay=0.9"])
    torch.manual_seed(0)
    engine = setup_engine(build_model(cfg.model, C), cfg, world_size=1, total_steps=10)
    x = torch.randn(4, 3, 32, 32)
    loss = engine.forward(x).float().square().mean()
    engine.backward(loss)
    engine.step()
    engine.update_ema(1)
    state = {"step": 1, "stream": {}, "world_size": 1, "classes": [c.model_dump() for c in CLASSES],
             "config": cfg.model_dump(mode="json")}
    root.mkdir(parents=True)
    save_checkpoint(engine, str(root), 0, state, final=final)
    return root


@pytest.fixture(scope="module")
def local_ckpt(tmp_path_factory) -> Path:
    return _checkpoint_folder(tmp_path_factory.mktemp("ck") / "checkpoint_00000001")


def test_a_periodic_checkpoint_of_an_ema_run_keeps_one_weights_file(tmp_path):
    """18 bytes per parameter in bf16 training: DeepSpeed's 14 and the EMA's 4; the raw weights
    are DeepSpeed's masters until the final checkpoint consolidates them."""
    ckpt = _checkpoint_folder(tmp_path / "checkpoint_00000001", final=False)
    assert set(os.listdir(ckpt)) - {"latest"} == {DS_TAG, EMA_FILE, STATE_FILE}
    assert json.loads((ckpt / STATE_FILE).read_text())["final"] is False
    assert read_weights(str(ckpt), "ema")
    with pytest.raises(FileNotFoundError, match="only in its final checkpoint"):
        read_weights(str(ckpt), "model")


def test_layout_stores_the_ema_once(local_ckpt):
    names = set(os.listdir(local_ckpt))
    assert names - {"latest"} == {DS_TAG, EMA_FILE, MODEL_FILE, STATE_FILE}  # `latest`: DeepSpeed's tag pointer
    ds_files = os.listdir(local_ckpt / DS_TAG)
    from trainer.engine import safe_torch_load

    for f in ds_files:  # DeepSpeed's files hold no second copy of the EMA
        assert "_csl_ema" not in safe_torch_load(str(local_ckpt / DS_TAG / f), "cpu")
    ema = read_weights(str(local_ckpt), "ema")
    model = read_weights(str(local_ckpt), "model")
    assert ema.keys() == model.keys() and all(t.dtype == torch.float32 for t in ema.values() if t.is_floating_point())


def test_readers_on_s3_read_only_the_state_and_one_weights_file(local_ckpt, s3_bucket, tmp_path, monkeypatch):
    import fsspec

    import data_shards.storage as storage
    from trainer import inference

    fs = fsspec.filesystem("s3", **storage.storage_options("s3://x"))
    url = f"{s3_bucket}/run/checkpoint_00000001"
    fs.put(str(local_ckpt), url.removeprefix("s3://"), recursive=True)
    assert fs.ls(f"{url}/{DS_TAG}")  # DeepSpeed's state is there to be (not) read

    reads: list[tuple[str, int]] = []
    real_read = storage.read_bytes

    def counting(u: str) -> bytes:
        data = real_read(u)
        reads.append((u, len(data)))
        return data

    def forbidden(*a, **k):
        raise AssertionError(f"a reader downloaded a folder: {a}")

    monkeypatch.setattr(storage, "read_bytes", counting)
    monkeypatch.setattr("trainer.checkpoint.read_bytes", counting)
    monkeypatch.setattr(fsspec.AbstractFileSystem, "get", forbidden)
    monkeypatch.setattr(type(fs), "get", forbidden)
    for weights, file in (("auto", EMA_FILE), ("model", MODEL_FILE)):
        reads.clear()
        res = inference.export_checkpoint(url, str(tmp_path / f"{weights}.safetensors"), weights)
        assert res["weights"] == ("ema" if weights == "auto" else "model")
        assert all(f"/{DS_TAG}/" not in u for u, _ in reads), reads
        weight_bytes = (local_ckpt / file).stat().st_size
        total = sum(n for _, n in reads)
        assert {u.rsplit("/", 1)[-1] for u, _ in reads} == {STATE_FILE, file}
        assert total <= 1.1 * weight_bytes, (total, weight_bytes)
    assert resolve_checkpoint(url) == url


# -- time-based checkpoints: rank 0's clock decides for every rank ------------------------


def _time_ckpt_worker(rank: int, port: int, root: str, out: str) -> None:
    import time as _time

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if rank == 1:
        _time.perf_counter = lambda: 0.0  # rank 1's own clock would never call a checkpoint due
    from trainer.config import load_config
    from trainer.loop import Hooks, run_training

    cfg = load_config("synthetic-cpu", [f"data.root={root}", "data.image_size=32", "data.batch_size=4",
                                        "data.workers=0", "train.epochs=1", "train.log_every=2",
                                        "checkpoint.every_steps=0", "checkpoint.every_minutes=1e-9",
                                        "cluster.workers=2"])
    saved: list[int] = []
    hooks = Hooks(report=lambda metrics, local, name: saved.append(int(metrics["step"])),
                  restore_dir=lambda: contextlib.nullcontext(None))
    run_training(cfg, os.path.join(out, "run"), rank=rank, world_size=2, hooks=hooks)
    Path(out, f"rank{rank}.json").write_text(json.dumps(saved))


@pytest.mark.integration
def test_time_based_checkpoints_are_taken_at_the_same_steps_on_every_rank(tmp_path):
    import torch.multiprocessing as mp

    from data_shards.sources.synthetic import build_synthetic

    root = str(tmp_path / "syn")
    build_synthetic(root, train=48, val=8, image_size=32, shard_samples=12, seed=2, progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_time_ckpt_worker, args=(r, port, root, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    steps = [json.loads(Path(tmp_path, f"rank{r}.json").read_text()) for r in range(2)]
    assert steps[0] == steps[1] == [2, 4, 6]  # 48 / (2 x 4) = 6 steps: log steps 2, 4; 6 ends the epoch
