"""The world-size-free training state (`Engine.portable_state`): gathered by parameter name at
every ZeRO stage and precision, loaded into a fresh engine (here and at another world size),
training goes on exactly as from DeepSpeed's own checkpoint. Gloo, no Ray."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from trainer.checkpoint import portable_weights
from trainer.engine import setup_engine
from trainer.models import build_model

from test_engine import CLASSES, _batches, _cfg, _engine, _train

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _fresh(cfg, tensors, meta, world_size=1):
    model = build_model(cfg.model, CLASSES)
    model.load_state_dict(portable_weights(tensors))
    engine = setup_engine(model, cfg, world_size=world_size, total_steps=20)
    engine.load_portable_state(tensors, meta)
    return engine


def _max_diff(a, b):
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


# every stage once and each precision twice (all eight pairs passed when this was written;
# the suite's time budget keeps four)
@pytest.mark.parametrize("stage,precision", [(0, "bf16"), (1, "fp32"), (2, "bf16"), (3, "fp32")])
def test_portable_state_round_trip_trains_on_identically(stage, precision):
    cfg = _cfg(f"deepspeed.zero_stage={stage}", f"train.precision={precision}", "optim.schedule=onecycle")
    a = _engine(cfg)
    _train(a, _batches(3))
    tensors, meta = a.portable_state()
    assert {"exp_avg", "exp_avg_sq"} <= {k.split("/")[0] for k in tensors} and meta["global_steps"] == 3
    b = _fresh(cfg, tensors, meta)
    again, meta_b = b.portable_state()
    assert _max_diff(tensors, again) == 0 and meta_b == meta
    more = _batches(2, seed=1)
    _train(a, more)
    _train(b, more)
    assert b.lr == a.lr and _max_diff(a.consolidated_state_dict(), b.consolidated_state_dict()) == 0


def _save_at_two(rank, port, folder, stage, precision):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0")
    cfg = _cfg(f"deepspeed.zero_stage={stage}", f"train.precision={precision}")
    torch.manual_seed(0)
    engine = setup_engine(build_model(cfg.model, CLASSES), cfg, world_size=2, total_steps=20)
    _train(engine, _batches(3, seed=rank))  # ranks see different data: partitions differ
    tensors, meta = engine.portable_state()
    if rank == 0:
        torch.save((tensors, meta), os.path.join(folder, "state.pt"))


@pytest.mark.parametrize("stage,precision", [(3, "bf16")])
def test_state_of_two_ranks_loads_into_one(tmp_path, stage, precision):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_save_at_two, args=(port, str(tmp_path), stage, precision), nprocs=2)
    tensors, meta = torch.load(tmp_path / "state.pt", weights_only=True)
    cfg = _cfg(f"deepspeed.zero_stage={stage}", f"train.precision={precision}")
    again, meta_b = _fresh(cfg, tensors, meta).portable_state()
    assert _max_diff(tensors, again) == 0 and meta_b["optim_step"] == meta["optim_step"] == 3
