"""DeepSpeed engine on CPU/gloo, single process (no Ray): config mapping, training for
ZeRO 0/2/3, channels_last activations at every stage, exact save/load round trips,
consolidated fp32 weights, EMA."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from trainer.config import Config, ConfigError, load_config
from trainer.engine import ModelEMA, channels_last_activations, deepspeed_config, setup_engine
from trainer.models import build_model

CLASSES = 5

# DeepSpeed and torch.distributed deprecations on CPU/gloo are not ours to fix.
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _cfg(*overrides: str) -> Config:
    return load_config("synthetic-cpu", ["data.batch_size=4", "optim.lr=1e-2", "train.ema_decay=0.9", *overrides])


def _batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 32, 32, generator=g), (torch.rand(4, CLASSES, generator=g) > 0.5).float())
            for _ in range(n)]


def _engine(cfg: Config, total_steps: int = 20, seed: int = 0):
    torch.manual_seed(seed)
    return setup_engine(build_model(cfg.model, CLASSES), cfg, world_size=1, total_steps=total_steps)


def _train(engine, batches) -> list[torch.Tensor]:
    losses = []
    for x, y in batches:
        loss = F.binary_cross_entropy_with_logits(engine.forward(x), y)
        engine.backward(loss)
        if engine.step():
            engine.update_ema(engine.global_step)
        losses.append(loss.detach())
    return losses


# -- config mapping (no DeepSpeed initialisation) -------------------------------------


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_deepspeed_config_mapping(stage: int, precision: str) -> None:
    cfg = _cfg(f"deepspeed.zero_stage={stage}", f"train.precision={precision}", "train.grad_accum=3",
               "optim.grad_clip=1.5")
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 4 * 3 * 2
    assert ds["gradient_clipping"] == 1.5
    assert ds["zero_optimization"] == {"stage": stage}
    assert ds["steps_per_print"] > 10**6 and ds["wall_clock_breakdown"] is False
    assert "optimizer" not in ds and "scheduler" not in ds
    assert ("bf16" in ds) == (precision == "bf16") and ("fp16" in ds) == (precision == "fp16")
    if precision != "fp32":
        assert ds[precision]["enabled"] is True
        assert ds["data_types"]["buffer_dtype"] == precision  # BatchNorm stats follow the weights


def test_importing_the_engine_does_nothing() -> None:
    code = ("import sys, os, torch.distributed as d, trainer.engine; "
            "assert 'deepspeed' not in sys.modules; assert not d.is_initialized(); "
            "assert 'MASTER_PORT' not in os.environ")
    env = {k: v for k, v in os.environ.items() if k != "MASTER_PORT"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_fp16_is_refused_clearly_on_this_cpu() -> None:
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().is_fp16_supported():
        pytest.skip("this machine's accelerator supports fp16")
    with pytest.raises(ConfigError, match="train.precision.*'fp16' is not supported"):
        _engine(_cfg("train.precision=fp16"))


# -- training --------------------------------------------------------------------------


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (2, "fp32"), (3, "fp32"), (0, "bf16"), (3, "bf16")])
def test_a_few_steps_decrease_the_loss(stage: int, precision: str) -> None:
    engine = _engine(_cfg(f"deepspeed.zero_stage={stage}", f"train.precision={precision}"))
    assert engine.zero_stage == stage
    assert engine.dtype == (torch.bfloat16 if precision == "bf16" else torch.float32)
    x, y = _batches(1)[0]
    losses = _train(engine, [(x, y)] * 8)
    assert engine.global_step == 8
    assert losses[-1] < 0.5 * losses[0]
    assert losses[-1].dtype == torch.float32  # logits come back in fp32
    assert all(v.is_contiguous() for v in engine.consolidated_state_dict().values())


# -- channels_last: NHWC activations, weights as DeepSpeed keeps them -------------------------


def _conv_layouts(model: torch.nn.Module) -> list[bool]:
    """Run-time record of whether each Conv2d's input (after pre-hooks) and output were NHWC."""
    seen: list[bool] = []

    def hook(module, args, out) -> None:
        seen.append(args[0].is_contiguous(memory_format=torch.channels_last)
                    and out.is_contiguous(memory_format=torch.channels_last))

    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(hook)
    return seen


class _SpaceToDepthNet(torch.nn.Module):
    """A stem that reshapes into a fresh NCHW tensor, as TResNet's space-to-depth does."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(16, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        n, c, h, w = x.shape
        x = x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 3, 5, 1, 2, 4).contiguous().view(n, c * 4, h // 2, w // 2)
        return self.b(x).mean((2, 3))


@pytest.mark.parametrize("name", ["small-cnn", "space-to-depth"])
def test_channels_last_activations_change_the_layout_not_the_outputs(name: str) -> None:
    torch.manual_seed(0)
    nchw = build_model(_cfg().model, CLASSES) if name == "small-cnn" else _SpaceToDepthNet()
    nhwc = channels_last_activations(copy.deepcopy(nchw))
    plain_seen, nhwc_seen = _conv_layouts(nchw), _conv_layouts(nhwc)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want, got = nchw.eval()(x), nhwc.eval()(x)
    assert plain_seen and not any(plain_seen)  # without it, NCHW everywhere
    assert nhwc_seen and all(nhwc_seen)  # every convolution NHWC, also after the reshaping stem
    assert all(p.is_contiguous() for p in nhwc.parameters())  # weights untouched
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stage,precision", [(1, "bf16"), (3, "bf16"), (0, "fp32")])
def test_channels_last_trains_at_every_zero_stage(stage: int, precision: str) -> None:
    """DeepSpeed keeps the parameters (views of its flat buffers at ZeRO-1/2/3 and bf16) as they
    were; the activations are NHWC, and steps train as with NCHW."""
    x, y = _batches(1)[0]
    first, trained = {}, {}
    for on in ("true", "false"):
        engine = _engine(_cfg(f"deepspeed.zero_stage={stage}", f"train.precision={precision}",
                              f"model.channels_last={on}"))
        seen, seen_ema = _conv_layouts(engine.module), _conv_layouts(engine.ema.module)
        engine.eval()
        with torch.no_grad():
            first[on] = engine.forward(x)
        engine.train()
        losses = _train(engine, [(x, y)] * 6)
        with torch.no_grad():
            engine.ema_predict(x)
        assert engine.global_step == 6 and losses[-1] < 0.5 * losses[0]
        assert seen and all(seen) == (on == "true") and all(seen_ema) == (on == "true")
        assert all(p.is_contiguous() for p in engine.module.parameters())
        trained[on] = engine.consolidated_state_dict()
    # the same outputs in either layout, up to the convolutions' rounding (bf16: its own)
    tol = dict(rtol=0.02, atol=0.02) if precision == "bf16" else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first["true"], first["false"], **tol)
    if precision == "fp32":  # and the same training (bf16 rounding compounds over steps)
        for k, v in trained["true"].items():
            torch.testing.assert_close(v, trained["false"][k], rtol=1e-3, atol=1e-4, msg=k)


def test_onecycle_lr_and_grad_accumulation() -> None:
    engine = _engine(_cfg("train.grad_accum=2", "optim.pct_start=0.25"), total_steps=9)
    assert engine.lr == pytest.approx(1e-2 / 25)  # OneCycle starts at max_lr / div_factor
    stepped, lrs = [], []
    for x, y in _batches(6):
        engine.backward(F.binary_cross_entropy_with_logits(engine.forward(x), y))
        stepped.append(engine.step())
        if stepped[-1]:
            engine.update_ema()
        lrs.append(engine.lr)
    assert stepped == [False, True, False, True, False, True]
    assert engine.global_step == 3 and engine.ema.updates == 3
    assert isinstance(engine.lr, float)
    # warm-up ends after 0.25 * 9 - 1 = 1.25 steps: up, then down
    assert lrs[1] < lrs[3] and lrs[5] < lrs[3]


def test_too_short_for_onecycle_runs_at_constant_lr() -> None:
    engine = _engine(_cfg("optim.pct_start=0.2"), total_steps=2)
    _train(engine, _batches(2))
    assert engine.lr == pytest.approx(1e-2)


def test_constant_schedule_with_sgd() -> None:
    engine = _engine(_cfg("optim.schedule=constant", "optim.name=sgd", "train.ema_decay=0"))
    assert engine.ema is None
    _train(engine, _batches(3))
    assert engine.lr == pytest.approx(1e-2)


# -- checkpoints -----------------------------------------------------------------------


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (2, "fp32"), (3, "fp32"), (2, "bf16")])
def test_save_load_round_trip_is_exact(tmp_path, stage: int, precision: str) -> None:
    cfg = _cfg(f"deepspeed.zero_stage={stage}", f"train.precision={precision}")
    batches = _batches(5)
    a = _engine(cfg)
    _train(a, batches[:3])
    a.save(str(tmp_path), "step3", {"epoch": 1, "cursor": [3, 7]})
    a.save_ema(str(tmp_path / "ema.safetensors"))  # the EMA is stored once, beside DeepSpeed's state
    saved = a.consolidated_state_dict()
    saved_ema = {k: v.clone() for k, v in a.ema.weights.items()}
    saved_lr = a.lr
    _train(a, batches[3:])
    after = a.consolidated_state_dict()

    b = _engine(cfg, seed=123)  # different initial weights: everything must come from the file
    client = b.load(str(tmp_path), "step3", ema_path=str(tmp_path / "ema.safetensors"))
    assert client == {"epoch": 1, "cursor": [3, 7]}
    assert b.global_step == 3 and b.lr == saved_lr
    assert b.ema.updates == 3
    restored = b.consolidated_state_dict()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    assert all(torch.equal(saved_ema[k], b.ema.weights[k]) for k in saved_ema)
    # Optimizer moments and schedule came back too: the next steps match bit for bit.
    _train(b, batches[3:])
    again = b.consolidated_state_dict()
    assert all(torch.equal(after[k], again[k]) for k in after)


def test_load_missing_checkpoint_raises(tmp_path) -> None:
    engine = _engine(_cfg())
    with pytest.raises(FileNotFoundError, match="no DeepSpeed checkpoint"):
        engine.load(str(tmp_path / "nothing"), "t")


# -- consolidated weights ---------------------------------------------------------------


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_consolidated_state_dict_equals_module(stage: int) -> None:
    engine = _engine(_cfg(f"deepspeed.zero_stage={stage}"))
    _train(engine, _batches(2))
    sd = engine.consolidated_state_dict()
    reference = build_model(_cfg().model, CLASSES).state_dict()
    assert list(sd) == list(reference)
    assert all(v.dtype == reference[k].dtype and v.shape == reference[k].shape for k, v in sd.items())
    if stage == 3:
        import deepspeed

        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            live = {k: v.detach().clone() for k, v in engine.module.named_parameters()}
    else:
        live = dict(engine.module.named_parameters())
    assert all(torch.equal(sd[k], live[k].detach()) for k in live)
    # and a plain model takes them as they are
    build_model(_cfg().model, CLASSES).load_state_dict(sd)


def test_consolidated_bf16_gives_the_fp32_masters() -> None:
    engine = _engine(_cfg("deepspeed.zero_stage=2", "train.precision=bf16"))
    _train(engine, _batches(2))
    sd = engine.consolidated_state_dict()
    for k, p in engine.module.named_parameters():
        assert p.dtype == torch.bfloat16 and sd[k].dtype == torch.float32
        assert torch.equal(sd[k].bfloat16(), p.detach())  # masters round to the compute weights


# -- EMA ---------------------------------------------------------------------------------


def test_model_ema_math() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    ema = ModelEMA(model, decay=0.75)
    start = {k: v.clone() for k, v in ema.weights.items()}
    with torch.no_grad():
        model[0].weight.add_(4.0)
    model.train()(torch.randn(8, 2))  # moves the running stats and num_batches_tracked
    ema.update(model)
    assert torch.allclose(ema.weights["0.weight"], start["0.weight"] + 1.0)  # 0.25 * 4
    assert torch.allclose(ema.weights["1.running_mean"], 0.75 * start["1.running_mean"] + 0.25 * model[1].running_mean)
    assert ema.weights["1.num_batches_tracked"].item() == 1
    assert all(v.dtype == torch.float32 for k, v in ema.weights.items() if "num_batches" not in k)

    warm = ModelEMA(model, decay=0.9, warmup_steps=10)
    assert warm.current_decay() == 0.0
    warm.update(model)
    assert warm.current_decay() == pytest.approx(0.9 * (1 - 2.718281828 ** -0.1), rel=1e-6)

    copy = ModelEMA(model, decay=0.75)
    copy.load_state_dict(ema.state_dict())
    assert copy.updates == 1 and all(torch.equal(copy.weights[k], ema.weights[k]) for k in ema.weights)


def test_ema_module_predict_and_file_round_trip(tmp_path) -> None:
    engine = _engine(_cfg("train.precision=bf16", "train.ema_decay=0.5"))
    _train(engine, _batches(2))
    ema_model = engine.ema_module()
    assert not ema_model.training and all(not p.requires_grad for p in ema_model.parameters())
    assert all(t.dtype == torch.float32 for t in ema_model.state_dict().values() if t.is_floating_point())
    x = _batches(1)[0][0]
    with torch.no_grad():
        assert torch.equal(engine.ema_predict(x), ema_model(x))
    path = str(tmp_path / "ema.safetensors")
    engine.save_ema(path)
    other = _engine(_cfg("train.precision=bf16", "train.ema_decay=0.5"), seed=9)
    other.load_ema(path)
    assert other.ema.updates == 2
    assert all(torch.equal(engine.ema.weights[k], other.ema.weights[k]) for k in engine.ema.weights)


def test_update_ema_step_pins_the_warmup_counter() -> None:
    engine = _engine(_cfg("train.ema_warmup_steps=100"))
    engine.update_ema(step=41)
    assert engine.ema.updates == 41


@pytest.mark.parametrize("stage", [0, 3])
def test_engine_ema_follows_the_weights(stage: int) -> None:
    engine = _engine(_cfg(f"deepspeed.zero_stage={stage}", "train.ema_decay=0.5"))
    initial = {k: v.clone() for k, v in engine.ema.weights.items()}
    _train(engine, _batches(1))
    live = engine.consolidated_state_dict()
    assert engine.ema.updates == 1
    for k in ("conv1.weight", "fc.weight"):
        assert torch.allclose(engine.ema.weights[k], 0.5 * initial[k] + 0.5 * live[k], atol=1e-6)


# -- two ranks (gloo, spawned processes; still no Ray) ----------------------------------


STAGES = (0, 2, 3)


def _two_rank_worker(rank: int, port: int, folder: str, queue) -> None:
    """Every stage in one pair of processes (their start and imports are most of the cost)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    for stage in STAGES:
        ckpt = os.path.join(folder, f"zero{stage}")
        cfg = _cfg(f"deepspeed.zero_stage={stage}", "train.precision=bf16")
        torch.manual_seed(0)
        a = setup_engine(build_model(cfg.model, CLASSES), cfg, world_size=2, total_steps=20)
        _train(a, _batches(4, seed=rank))  # each rank its own data: BN statistics differ
        a.save(ckpt, "t", {"rank": rank})
        a.save_ema(os.path.join(ckpt, f"ema-{rank}.safetensors"))
        saved = a.consolidated_state_dict()
        torch.manual_seed(1)
        b = setup_engine(build_model(cfg.model, CLASSES), cfg, world_size=2, total_steps=20)
        client = b.load(ckpt, "t", ema_path=os.path.join(ckpt, f"ema-{rank}.safetensors"))
        restored = b.consolidated_state_dict()
        torch.save(saved, os.path.join(ckpt, f"consolidated-{rank}.pt"))  # tensors do not survive the queue
        queue.put((stage, rank, client,
                   all(torch.equal(saved[k], restored[k]) for k in saved),
                   all(torch.equal(a.ema.weights[k], b.ema.weights[k]) for k in a.ema.weights)))


@pytest.mark.integration
def test_two_ranks_save_load_per_rank_state(tmp_path) -> None:
    """At ZeRO 0, 2 and 3 with two gloo ranks: each rank gets its own client state back and
    restores the weights and EMA exactly; and ZeRO 0's file (DeepSpeed's own layout, not cut
    by rank) loads into one rank, the elastic resume's path at that stage."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_two_rank_worker, args=(r, port, str(tmp_path), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted((queue.get(timeout=300) for _ in range(2 * len(STAGES))), key=lambda r: r[:2])
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert [r[:2] for r in results] == [(stage, rank) for stage in STAGES for rank in (0, 1)]
    for stage, rank, client, same_weights, same_ema in results:
        assert client == {"rank": rank}, stage  # each rank gets its own client state back
        assert same_weights and same_ema, stage
    for stage in STAGES:  # after save, both ranks hold the same (averaged) BatchNorm statistics and weights
        sd0, sd1 = (torch.load(tmp_path / f"zero{stage}" / f"consolidated-{r}.pt", weights_only=True) for r in range(2))
        assert all(torch.equal(sd0[k], sd1[k]) for k in sd0), stage

    cfg = _cfg("deepspeed.zero_stage=0", "train.precision=bf16")
    one = setup_engine(build_model(cfg.model, CLASSES), cfg, world_size=1, total_steps=20)
    ckpt = tmp_path / "zero0"
    assert one.load(str(ckpt), "t", ema_path=str(ckpt / "ema-0.safetensors")) == {"rank": 0}
    sd0, got = torch.load(ckpt / "consolidated-0.pt", weights_only=True), one.consolidated_state_dict()
    assert all(torch.equal(sd0[k], got[k]) for k in sd0)
    tensors, meta = one.portable_state()  # Adam's moments exist only once loaded (or stepped)
    assert meta["global_steps"] == 4 and {"exp_avg", "exp_avg_sq"} <= {k.split("/")[0] for k in tensors}
