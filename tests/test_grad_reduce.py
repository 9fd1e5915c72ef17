"""The overlapped gradient reducer over two gloo ranks (spawned processes, no Ray): it gives
the same average as an all-reduce after backward, with the parameters' strides, across
accumulation and unused parameters; and the ZeRO-0 engine using it trains as DeepSpeed's
own reduction does."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]

CLASSES = 5


def _data(rank: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
    return [(torch.randn(4, 3, 32, 32, generator=g), (torch.rand(4, CLASSES, generator=g) > 0.5).float())
            for _ in range(n)]


def _reducer_worker(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    from trainer.config import load_config
    from trainer.grad_reduce import OverlappedGradReducer
    from trainer.models import build_model, channels_last

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cfg = load_config("synthetic-cpu", [])
    torch.manual_seed(0)
    model = channels_last(build_model(cfg.model, CLASSES))
    model.register_parameter("unused", torch.nn.Parameter(torch.ones(7)))  # never in the loss
    reference = channels_last(build_model(cfg.model, CLASSES))
    reference.load_state_dict(model.state_dict(), strict=False)
    reducer = OverlappedGradReducer(list(model.parameters()), bucket_bytes=4096)  # many buckets
    out = {"buckets": reducer.num_buckets, "steps": []}
    batches = _data(rank, 4)
    for step in range(2):  # two optimizer steps of two micro-batches each
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        for micro in range(2):
            x, y = batches[2 * step + micro]
            reducer.arm(boundary=micro == 1)
            F.binary_cross_entropy_with_logits(model(x), y).backward()
            reducer.finish()
            F.binary_cross_entropy_with_logits(reference(x), y).backward()
        expected = {}
        for name, p in reference.named_parameters():
            g = p.grad.clone()
            dist.all_reduce(g)
            expected[name] = g / 2
        got = dict(model.named_parameters())
        out["steps"].append({
            "max_diff": max((got[n].grad - e).abs().max().item() for n, e in expected.items()),
            "strides_match": all(got[n].grad.stride() == got[n].stride() for n in expected),
            "unused_zero": bool(torch.equal(got["unused"].grad, torch.zeros(7))),
        })
    queue.put((rank, out))
    dist.destroy_process_group()


def _engine_worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    from trainer.config import load_config
    from trainer.engine import Engine, setup_engine
    from trainer.models import build_model

    torch.set_num_threads(1)
    cfg = load_config("synthetic-cpu", ["optim.lr=1e-2", "train.ema_decay=0", "train.grad_accum=2"])
    weights = {}
    for mode in ("ours", "deepspeed"):
        torch.manual_seed(0)
        engine = setup_engine(build_model(cfg.model, CLASSES), cfg, world_size=2, total_steps=20)
        if mode == "deepspeed":  # DeepSpeed's own reduction after backward, as before the reducer
            engine._ds.enable_backward_allreduce = True
            engine = Engine(engine._ds, engine.ema, None)
        else:
            assert engine._reducer is not None and not engine._ds.enable_backward_allreduce
        for x, y in _data(rank, 6):
            engine.backward(F.binary_cross_entropy_with_logits(engine.forward(x), y))
            engine.step()
        weights[mode] = {k: v.detach().clone() for k, v in engine.module.named_parameters()}
    queue.put((rank, max((weights["ours"][k] - weights["deepspeed"][k]).abs().max().item() for k in weights["ours"])))


def _run_two(target) -> list:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=240) for _ in procs), key=lambda r: r[0])
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    return [r[1] for r in results]


def test_reducer_matches_allreduce_after_backward() -> None:
    for out in _run_two(_reducer_worker):
        assert out["buckets"] > 5
        for step in out["steps"]:
            assert step["max_diff"] <= 1e-7, step  # the same sums; /2 is exact in floating point
            assert step["strides_match"]  # channels_last weights keep channels_last gradients
            assert step["unused_zero"]


def test_zero0_engine_trains_as_deepspeeds_own_reduction() -> None:
    diffs = _run_two(_engine_worker)
    assert all(d <= 1e-6 for d in diffs), diffs
