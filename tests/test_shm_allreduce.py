"""`ShmAllReduce`: gradient averaging through /dev/shm for CPU ranks on one machine (spawned
gloo processes, no Ray). It must give what an all-reduce average gives, the same on every
rank, leave nothing in /dev/shm, fall back when the ranks cannot share the file, and train
exactly like DeepSpeed's own all-reduce inside the engine."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
from torch import nn

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]

SHM = Path("/dev/shm")
needs_shm = pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm on this machine")


def _spawn(fn, world: int, *args) -> None:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=fn, args=(r, world, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
    assert [p.exitcode for p in procs] == [0] * world


def _init(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 5)
        self.spare = nn.Parameter(torch.ones(7))  # used by rank 0 only: a missing grad elsewhere

    def forward(self, x: torch.Tensor, rank: int) -> torch.Tensor:
        y = self.fc(self.conv(x).mean((2, 3)))
        return y.sum() + (self.spare.sum() if rank == 0 else 0.0)


def _average_worker(rank: int, world: int, port: int, out: str, shm_dir: str, full: bool = False) -> None:
    import errno

    import torch.distributed as dist

    from trainer.shm_allreduce import ShmAllReduce

    if full:  # a /dev/shm without room for the table, as in a container's 64 MB default
        def no_room(fd: int, offset: int, length: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        os.posix_fallocate = no_room
    _init(rank, world, port)
    torch.manual_seed(0)
    net = _Net().to(memory_format=torch.channels_last)
    before = set(os.listdir(shm_dir)) if os.path.isdir(shm_dir) else set()
    red = ShmAllReduce.create(list(net.parameters()), shm_dir=shm_dir)
    dist.barrier()
    left = sorted(set(os.listdir(shm_dir)) - before) if os.path.isdir(shm_dir) else []
    results = []
    for step in range(3):  # the same table reused: the barriers must order reuse
        torch.manual_seed(100 * step + rank)
        net.zero_grad(set_to_none=True)
        net(torch.randn(2, 3, 6, 6), rank).backward()
        expected = {}
        for name, p in net.named_parameters():
            g = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(g)
            expected[name] = g / world
        if red is not None:
            red.average_()
            results.append({name: (p.grad.clone(), expected[name]) for name, p in net.named_parameters()})
    torch.save({"enabled": red is not None, "left": left, "results": results,
                "conv_grad_channels_last": net.conv.weight.grad.is_contiguous(memory_format=torch.channels_last)},
               os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@needs_shm
@pytest.mark.parametrize("world", [2, 3])
def test_average_equals_an_allreduce_mean_and_is_identical_on_every_rank(tmp_path, world: int) -> None:
    _spawn(_average_worker, world, str(tmp_path), str(SHM))
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]
    assert all(g["enabled"] for g in got)
    assert all(g["left"] == [] for g in got), "the shared file must be unlinked once every rank has it"
    assert got[0]["conv_grad_channels_last"]
    for step in range(3):
        for name, (mine, expected) in got[0]["results"][step].items():
            torch.testing.assert_close(mine, expected, rtol=1e-6, atol=1e-7, msg=f"step {step} {name}")
            for other in got[1:]:  # bit-identical on every rank: weights never drift apart
                assert torch.equal(other["results"][step][name][0], mine), (step, name)
        assert torch.count_nonzero(got[0]["results"][step]["spare"][0]) == 7  # rank 0's grad / world


@needs_shm
def test_ranks_that_cannot_share_the_file_keep_the_process_group(tmp_path) -> None:
    _spawn(_average_worker, 2, str(tmp_path), str(tmp_path / "no-such-dir"))
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [g["enabled"] for g in got] == [False, False]


def test_no_room_for_the_table_keeps_the_process_group_and_leaves_nothing(tmp_path) -> None:
    shm_dir = tmp_path / "shm"
    shm_dir.mkdir()
    _spawn(_average_worker, 2, str(tmp_path), str(shm_dir), True)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [g["enabled"] for g in got] == [False, False]
    assert list(shm_dir.iterdir()) == []


def _engine_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.nn.functional as F

    from trainer.config import load_config
    from trainer.engine import setup_engine
    from trainer.models import build_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    weights = {}
    for shm in ("true", "false"):
        cfg = load_config("synthetic-cpu", ["data.batch_size=4", "optim.lr=1e-2", "train.grad_accum=2",
                                            f"cluster.shm_allreduce={shm}"])
        torch.manual_seed(0)
        engine = setup_engine(build_model(cfg.model, 5), cfg, world_size=world, total_steps=20)
        assert (engine.reducer is not None) == (shm == "true")
        assert engine._ds.enable_backward_allreduce == (shm == "false")  # never both
        g = torch.Generator().manual_seed(rank)  # each rank its own data
        for _ in range(6):  # 3 optimizer steps of 2 micro-batches
            x, y = torch.randn(4, 3, 32, 32, generator=g), (torch.rand(4, 5, generator=g) > 0.5).float()
            engine.backward(F.binary_cross_entropy_with_logits(engine.forward(x), y))
            engine.step()
        assert engine.global_step == 3
        weights[shm] = {k: v.clone() for k, v in engine.module.named_parameters()}
    torch.save(weights, os.path.join(out, f"rank{rank}.pt"))


@needs_shm
@pytest.mark.integration
def test_engine_with_shm_average_trains_like_deepspeeds_allreduce(tmp_path) -> None:
    _spawn(_engine_worker, 2, str(tmp_path))
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for name, w in got[0]["true"].items():
        assert torch.equal(w, got[0]["false"][name]), name  # world 2: the same sum, the same 1/2 scale
        assert torch.equal(w, got[1]["true"][name]), name
