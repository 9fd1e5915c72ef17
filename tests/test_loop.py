"""The training loop without Ray: device batches one ahead (`DevicePrefetcher`) and its cursor,
channels_last activations, and `run_training` through plain `Hooks` on a one-rank gloo group
(train, checkpoint, resume exactly). Tiny synthetic data, small-cnn, 32 px, CPU."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data_shards.decode import normalize
from data_shards.stream import ShardStream
from trainer.prefetch import DevicePrefetcher

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    from data_shards.sources.synthetic import build_synthetic

    root = str(tmp_path_factory.mktemp("loop") / "syn")
    build_synthetic(root, train=48, val=16, image_size=32, shard_samples=16, seed=4, progress=False)
    return root


def _stream(root: str, nw: int = 0, **kw) -> ShardStream:
    return ShardStream(root, "train", batch_size=8, image_size=32, seed=5, shuffle_buffer=10, num_workers=nw,
                       output="uint8", **kw)


# -- device batches --------------------------------------------------------------------------


@pytest.mark.parametrize("nw,zero_copy", [(0, False), (2, False), (2, True)])
def test_prefetched_batches_are_the_streams_normalised(data_root: str, nw: int, zero_copy: bool) -> None:
    plain = list(ShardStream(data_root, "train", batch_size=8, image_size=32, seed=5, shuffle_buffer=10, num_workers=nw))
    for nhwc in (False, True):
        got = list(DevicePrefetcher(_stream(data_root, nw, zero_copy=zero_copy), "cpu", channels_last=nhwc))
        assert [b["key"] for b in got] == [b["key"] for b in plain]
        for a, b in zip(plain, got):
            assert b["image"].dtype == torch.float32 and b["image"].device.type == "cpu"
            assert b["image"].is_contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"])
    with pytest.raises(ValueError, match="output='uint8'"):
        DevicePrefetcher(ShardStream(data_root, "train", batch_size=8, image_size=32), "cpu")


@pytest.mark.parametrize("nw", [0, 2])
def test_a_cursor_saved_while_a_batch_is_held_ahead_resumes_at_the_next_batch(data_root: str, nw: int) -> None:
    """torchtitan's data-loader test, through the prefetcher: after 3 batches it has pulled a
    4th from the stream; the saved cursor still says 3, and a rebuilt loader goes on from the 4th."""
    full = [b["key"] for b in DevicePrefetcher(_stream(data_root, nw), "cpu")]
    stream = _stream(data_root, nw, zero_copy=nw > 0)
    loader = DevicePrefetcher(stream, "cpu")
    it = iter(loader)
    seen = [next(it)["key"] for _ in range(3)]
    assert stream.state_dict()["batch"] == 4  # the stream has handed out the one held ahead
    state = loader.state_dict()
    assert state["batch"] == 3
    it.close()
    again = _stream(data_root, nw)
    again.load_state_dict(state)
    rest = [b["key"] for b in DevicePrefetcher(again, "cpu")]
    assert seen + rest == full
    assert DevicePrefetcher(again, "cpu").state_dict()["epoch"] == 1  # the epoch ran out: next one


def test_pinned_batches_need_cuda(data_root: str) -> None:
    if torch.cuda.is_available():
        loader = DevicePrefetcher(_stream(data_root, pin_memory=True), "cuda")
        b = next(iter(loader))
        assert b["image"].is_cuda and b["target"].is_cuda
        ref = next(iter(_stream(data_root)))
        assert torch.equal(b["image"].cpu(), normalize(ref["image"]))
    else:
        with pytest.raises(ValueError, match="pin_memory=True needs a CUDA device"):
            _stream(data_root, pin_memory=True)


# -- run_training through plain Hooks (one gloo rank, no Ray) ------------------------------------


def _run(root: str, run_dir: Path, saved: Path, keys: Path, restore: Path | None = None, *overrides: str) -> dict:
    from trainer.config import load_config
    from trainer.loop import Hooks, run_training

    cfg = load_config("synthetic-cpu", [f"data.root={root}", "data.image_size=32", "data.batch_size=8",
                                        "data.workers=0", "data.shuffle_buffer=10", "train.epochs=2",
                                        "train.log_every=2", "checkpoint.every_steps=4", "cluster.workers=1",
                                        f"debug.record_keys={keys}", *overrides])

    def report(metrics: dict, local: str | None, name: str | None) -> None:
        if local:  # the loop removes its local folder after reporting: keep a copy, as Ray uploads one
            shutil.copytree(local, saved / name)

    hooks = Hooks(report=report, restore_dir=lambda: contextlib.nullcontext(str(restore) if restore else None))
    return run_training(cfg, str(run_dir), rank=0, world_size=1, hooks=hooks)


def _keys(folder: Path) -> list[tuple[int, int, str]]:
    rows = [ln.split() for ln in (folder / "rank0.txt").read_text().splitlines()]
    return [(int(epoch), int(step), key) for _, epoch, step, key in rows]


@pytest.mark.integration
def test_run_training_trains_checkpoints_and_resumes_exactly(data_root: str, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "ckpt").mkdir(parents=True)
    res = _run(data_root, a / "run", a / "ckpt", a / "keys")
    # 48 samples / 8 = 6 steps per epoch, 2 epochs: checkpoints every 4 steps and at each epoch end
    assert sorted(p.name for p in (a / "ckpt").iterdir()) == [f"checkpoint_{s:08d}" for s in (4, 6, 8, 12)]
    lines = [json.loads(ln) for ln in (a / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [ln["loss"] for ln in lines if "loss" in ln]
    assert [ln["step"] for ln in lines if "loss" in ln] == list(range(2, 13, 2))
    assert losses[-1] < losses[0]  # it learns
    assert 0 <= res["map_c"] <= 100 and "ema_map_c" in res
    assert json.loads((a / "run" / "eval.json").read_text())["step"] == 12
    state = json.loads((a / "ckpt" / "checkpoint_00000004" / "csl_state.json").read_text())
    assert (state["step"], state["stream"]["epoch"], state["stream"]["batch"]) == (4, 0, 4)

    # Resume from step 4, mid-epoch: the same samples feed the same steps, and the weights match.
    _run(data_root, b / "run", b / "ckpt", b / "keys", a / "ckpt" / "checkpoint_00000004")
    assert sorted(p.name for p in (b / "ckpt").iterdir()) == [f"checkpoint_{s:08d}" for s in (6, 8, 12)]
    assert _keys(b / "keys") == [k for k in _keys(a / "keys") if k[1] > 4]
    for f in ("model.safetensors", "ema.safetensors"):
        wa, wb = (load_file(str(d / "ckpt" / "checkpoint_00000012" / f)) for d in (a, b))
        assert wa.keys() == wb.keys()
        assert all(torch.equal(wa[k], wb[k]) for k in wa), f


@pytest.mark.integration
def test_run_training_at_zero1_bf16_evaluates_the_fp32_ema(data_root: str, tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    res = _run(data_root, tmp_path / "run", tmp_path / "ckpt", tmp_path / "keys", None, "train.max_steps=2",
               "deepspeed.zero_stage=1", "train.precision=bf16")
    assert res["num_valid"] > 0 and res["ema_num_valid"] == res["num_valid"]
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["checkpoint_00000002"]
