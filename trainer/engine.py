"""The DeepSpeed engine: the only module that imports deepspeed.

Design notes:

- The worker loop sees a small ``Engine`` (forward, backward, step, lr, save, load,
  consolidated_state_dict, EMA), never a ``DeepSpeedEngine``: the rest of the project stays
  testable without DeepSpeed and a change of engine touches one file.
- We hand DeepSpeed our own optimizer and per-step LR schedule (``trainer/optim.py``), so
  its config has no optimizer/scheduler sections; ``zero_allow_untested_optimizer`` is on
  because SGD is not on DeepSpeed's list; ZeRO only shards its state.
- The process group comes from Ray Train (gloo on CPU, NCCL on GPU); ``ensure_process_group``
  only creates a single-process gloo group when there is none (unit tests, a bare script).
- ``model.channels_last`` makes activations NHWC (``models.channels_last_activations``),
  never the weights: ZeRO and the bf16/fp16 optimizers keep parameters as views of flat buffers.
- What DeepSpeed 0.19.8 does on the CPU accelerator (measured here, gloo, 1 and 2 ranks):
  ZeRO 0, 1, 2 and 3 train; bf16 works for every stage once buffers are cast too
  (``data_types.buffer_dtype``: 0.19 casts only parameters, and BatchNorm refuses bf16
  weights with fp32 running stats); fp16 is refused ("Type fp16 is not supported on your
  device") unless oneDNN has fp16 kernels, so ``setup_engine`` says so up front.
  ``DS_ACCELERATOR=cpu`` is not needed: DeepSpeed falls back to CPU when no GPU is visible.
- bf16 keeps BatchNorm running statistics in bf16 (about 3 significant digits): the price
  of a bf16 module under DeepSpeed. Master weights and optimizer state stay fp32.
- EMA (``trainer/ema.py``), updated after each optimizer step: under ZeRO-3 an update gathers
  the parameters (one all-gather of the model); under bf16 it averages the bf16 compute
  weights, not the fp32 masters (reading masters would cost a collective per tensor).
- No host syncs per step: the LR is a Python float the scheduler already holds.
- Checkpoints are DeepSpeed's sharded format in a *local* folder (``save_checkpoint`` is
  collective and writes per-rank files); uploading to the run storage is the loop's job.
- Resume does not trust the run folder (a shared bucket): DeepSpeed reads its files with
  ``torch.load(weights_only=False)``, so ``load`` lends it a checkpoint engine that loads
  with ``weights_only=True`` and an allow-list of four DeepSpeed types. Its direct
  ``torch.load`` calls (universal checkpoints, ZeRO-3 weights without optimizer state) are
  off our path: the first is refused, the second never asked for.
- Another world size (``trainer/elastic.py``): ZeRO 1-3 cut the state by rank, so
  ``portable_state`` gathers it by parameter name (DeepSpeed's ``safe_get_full_*``) and
  ``load_portable_state`` puts it back at any size (``safe_set_full_*``), safetensors only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import socket
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from trainer.config import Config, ConfigError
from trainer.ema import ModelEMA, named_tensors
from trainer.models import channels_last_activations
from trainer.optim import build_optimizer, build_schedule, state_keys

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

__all__ = ["Engine", "ModelEMA", "UnsafeCheckpointError", "channels_last_activations", "deepspeed_config",
           "ensure_process_group", "safe_torch_load", "setup_engine"]

log = logging.getLogger(__name__)

_EMA_KEY = "_csl_ema"
_CLIENT_KEY = "_csl_client"  # DeepSpeed returns its own keys beside ours: keep ours apart


def deepspeed_config(cfg: Config, world_size: int, micro_batch: int | None = None,
                     grad_accum: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config dict for this run (no optimizer/scheduler sections: we pass ours).

    `micro_batch`/`grad_accum` override the config's at another world size than the run's
    (`elastic.fit`), so that the global batch stays the run's.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    micro = micro_batch or cfg.data.batch_size
    accum = grad_accum or cfg.train.grad_accum
    ds: dict[str, Any] = {
        "train_batch_size": micro * accum * world_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.grad_clip,  # 0.0: DeepSpeed does not clip
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # we log ourselves, every train.log_every steps
        "wall_clock_breakdown": False,
    }
    if cfg.train.precision == "bf16":
        ds["bf16"] = {"enabled": True}
        ds["data_types"] = {"buffer_dtype": "bf16"}
    elif cfg.train.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}  # 0: dynamic scaling
        ds["data_types"] = {"buffer_dtype": "fp16"}
    return ds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_process_group(local_rank: int | None = None) -> None:
    """Make sure torch.distributed and DeepSpeed's comm layer are up.

    Under Ray Train the group exists and is only wrapped. Without one, a single-process
    gloo group is created from MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE, defaulting to
    127.0.0.1, a free port, rank 0 and world size 1. ``local_rank`` (Ray Train's local rank)
    is exported as LOCAL_RANK, which DeepSpeed reads to pick the GPU.
    """
    import deepspeed  # noqa: PLC0415  (heavy import, kept out of module import)

    if local_rank is not None:
        os.environ["LOCAL_RANK"] = str(local_rank)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def _check_precision(precision: str) -> None:
    from deepspeed.accelerator import get_accelerator  # noqa: PLC0415

    acc = get_accelerator()
    supported = {"fp32": True, "bf16": acc.is_bf16_supported(), "fp16": acc.is_fp16_supported()}
    if not supported[precision]:
        raise ConfigError(
            f"config key 'train.precision': {precision!r} is not supported by DeepSpeed on the "
            f"{acc.device_name()} accelerator here; use "
            + " or ".join(repr(p) for p, ok in supported.items() if ok)
        )


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds a type outside the resume allow-list; nothing in it ran."""


def _resume_allow_list() -> list[type]:
    # The non-torch types DeepSpeed 0.19.8 pickles into our checkpoints, found by saving at
    # ZeRO 0-3 in fp32 and bf16 and loading with weights_only=True. Model-state files (and
    # ZeRO-0 optimizer state, torch's own) need none. Each is plain data: no __reduce__ or
    # __setstate__ of its own, so loading one only sets attributes.
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler  # noqa: PLC0415
    from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: PLC0415
    from deepspeed.utils.tensor_fragment import fragment_address  # noqa: PLC0415

    return [
        ZeroStageEnum,  # ZeRO 1-3 optim_states: the stage that wrote the file (an int Enum)
        LossScaler,  # ZeRO 1-3 optim_states: the no-op scaler DeepSpeed keeps in fp32 and bf16
        DynamicLossScaler,  # that slot under fp16 (GPU; CPU refuses fp16, so checked by pickling one)
        fragment_address,  # ZeRO 1-2 optim_states: (numel, start) of each parameter in its partition
    ]


def safe_torch_load(path: str, map_location: Any = None) -> Any:
    """``torch.load(weights_only=True)`` with DeepSpeed's checkpoint types allowed for this call.

    Raises ``UnsafeCheckpointError`` naming ``path`` when the file holds anything else.
    """
    with torch.serialization.safe_globals(_resume_allow_list()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            # torch's own message suggests weights_only=False, the wrong advice for a hostile file
            why = r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed| Please use|\n\n|$)"
            found = re.search(why, str(e), re.S)
            raise UnsafeCheckpointError(
                f"checkpoint file {path!r} holds a disallowed type; nothing from it was executed "
                f"({found.group(1).strip() if found else 'not loadable with weights_only=True'})"
            ) from None


class _SafeLoads:
    """DeepSpeed's checkpoint engine with ``load`` replaced by ``safe_torch_load``."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        return safe_torch_load(path, map_location)


def setup_engine(model: nn.Module, cfg: Config, world_size: int, total_steps: int, *,
                 micro_batch: int | None = None, grad_accum: int | None = None) -> Engine:
    """Optimizer, LR schedule and DeepSpeed around ``model`` (collective: every rank calls it).

    ``total_steps`` is the number of optimizer steps of the whole run (after gradient
    accumulation); OneCycle refuses to step past it. ``micro_batch``/``grad_accum``: see
    ``deepspeed_config``.
    """
    import deepspeed  # noqa: PLC0415

    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    _check_precision(cfg.train.precision)
    ensure_process_group()
    if dist.get_world_size() != world_size:
        raise ValueError(f"world_size={world_size} but the process group has {dist.get_world_size()} ranks")
    # DeepSpeed prints its whole config at INFO on every initialize; we log what matters.
    logging.getLogger("DeepSpeed").setLevel(max(logging.WARNING, logging.getLogger("DeepSpeed").level))

    # Built before initialize: the model is still full-size fp32 here, even under ZeRO-3 + bf16.
    ema = ModelEMA(model, cfg.train.ema_decay, cfg.train.ema_warmup_steps) if cfg.train.ema_decay > 0 else None
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_schedule(optimizer, cfg.optim, total_steps)
    ds_engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, world_size, micro_batch, grad_accum),
    )
    if ema is not None:
        ema.to(ds_engine.device)
    if cfg.model.channels_last:
        channels_last_activations(ds_engine.module)
        if ema is not None:
            channels_last_activations(ema.module)
    return Engine(ds_engine, ema, state_keys(cfg.optim))


class Engine:
    """The loop's view of DeepSpeed: one object per rank."""

    def __init__(self, ds_engine: DeepSpeedEngine, ema: ModelEMA | None = None,
                 optim_keys: tuple[str, ...] = ()) -> None:
        self._ds = ds_engine
        self.optim_keys = optim_keys
        self.ema = ema
        self.zero_stage = ds_engine.zero_optimization_stage()
        self.dtype = next(ds_engine.module.parameters()).dtype  # what forward casts inputs to
        self.device = ds_engine.device
        self.loaded_client_states: list[dict[str, Any]] = []

    # -- training ---------------------------------------------------------------------

    @property
    def module(self) -> nn.Module:
        """The unwrapped model (under ZeRO-3 its parameters are partitioned outside forward)."""
        return self._ds.module

    @property
    def input_dtype(self) -> torch.dtype:
        """The compute dtype (fp32 or bf16): the loop may cast batches to it early."""
        return self.dtype

    @property
    def global_step(self) -> int:
        """Optimizer steps taken (host counter)."""
        return self._ds.global_steps

    @property
    def lr(self) -> float:
        """Current LR of the first group: a Python float the scheduler set, no device sync."""
        return self._ds.optimizer.param_groups[0]["lr"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits in fp32 whatever the compute precision, so the loss is computed in fp32."""
        if x.is_floating_point():
            x = x.to(self.device, self.dtype, non_blocking=True)
        return self._ds(x).float()

    __call__ = forward

    def backward(self, loss: torch.Tensor) -> None:
        self._ds.backward(loss)  # divides by grad_accum itself

    def step(self) -> bool:
        """DeepSpeed step (optimizer + scheduler + zero_grad at accumulation boundaries).

        Returns whether an optimizer step happened (then call ``update_ema``).
        """
        before = self._ds.global_steps
        self._ds.step()
        return self._ds.global_steps != before

    def update_ema(self, step: int | None = None) -> None:
        """Fold the current weights into the EMA; call once per optimizer step.

        ``step`` (the optimizer step just taken) pins the warm-up counter, so a resumed run
        continues the same decay sequence; without it the EMA counts its own updates.
        Collective under ZeRO-3 (the parameters are gathered).
        """
        if self.ema is None:
            return
        if step is not None:
            self.ema.updates = step - 1
        with self._gathered():
            self.ema.update(self.module)

    def ema_module(self) -> nn.Module | None:
        """The EMA weights as an fp32 model in eval mode (shared, not a copy), or None."""
        return None if self.ema is None else self.ema.module

    def _need_ema(self, what: str) -> ModelEMA:
        if self.ema is None:
            raise RuntimeError(f"{what} needs the EMA: set train.ema_decay > 0")
        return self.ema

    @torch.no_grad()
    def ema_predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the EMA model (fp32), e.g. for pseudo-labels; the EMA must be on."""
        return self._need_ema("ema_predict").module(x.to(self.device, torch.float32)).float()

    def save_ema(self, path: str) -> None:
        """Write the EMA weights as safetensors (local path; any rank, rank 0 usually)."""
        self._need_ema("save_ema").save(path)

    def load_ema(self, path: str) -> None:
        self._need_ema("load_ema").load(path)

    def _gathered(self) -> contextlib.AbstractContextManager:
        """Full parameters inside the block under ZeRO-3 (an all-gather); a no-op otherwise."""
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed  # noqa: PLC0415

        return deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None)

    @torch.no_grad()
    def sync_buffers(self) -> None:
        """Average floating buffers (BatchNorm running stats, also in the EMA) over ranks.

        Unlike DDP, DeepSpeed never broadcasts buffers, so each rank's running stats follow
        its own data. ``save`` calls this first so that the checkpoint, and every rank after
        it, hold one set of statistics; call it before evaluation too. One all-reduce of the
        buffers (kilobytes for a ResNet).
        """
        world = dist.get_world_size()
        names = [n for n, b in self.module.named_buffers() if b.is_floating_point()]
        if world == 1 or not names:
            return
        own = dict(self.module.named_buffers())
        targets = [own[n] for n in names]
        if self.ema is not None:
            targets += [self.ema.weights[n] for n in names]
        # fp32 on the wire: gloo has no bf16 all-reduce, and one flat tensor is one collective.
        flat = torch.cat([t.detach().float().reshape(-1) for t in targets])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for t in targets:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def train(self) -> None:
        self._ds.train()

    def eval(self) -> None:
        self._ds.eval()

    # -- checkpoints ------------------------------------------------------------------

    def save(self, ckpt_dir: str, tag: str, client_state: dict[str, Any] | None = None) -> None:
        """Collective: every rank calls it with the same local ``ckpt_dir`` and ``tag``.

        ``client_state`` may differ between ranks (e.g. each rank's data cursor): all ranks'
        dicts are gathered into the checkpoint, because under ZeRO 0-2 DeepSpeed writes and
        reads back only rank 0's model-state file.
        """
        self.sync_buffers()
        per_rank: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, dict(client_state or {}))
        # The EMA is not in DeepSpeed's state: the caller stores it once, as safetensors
        # (`save_ema`; trainer/checkpoint.py), and hands its path back to `load`.
        self._ds.save_checkpoint(ckpt_dir, tag=tag, client_state={_CLIENT_KEY: per_rank})

    def load(self, ckpt_dir: str, tag: str | None = None, ema_path: str | None = None) -> dict[str, Any]:
        """Collective: restores module, optimizer, LR schedule, step count and the EMA (from
        `ema_path`, the safetensors `save_ema` wrote; checkpoints of older versions kept it in
        DeepSpeed's client state, which is read when there is no file).

        Returns the ``client_state`` this rank gave to ``save`` (``tag=None``: the latest
        tag). If the world size changed since, rank 0's is returned and every rank's is in
        ``self.loaded_client_states`` for the caller to redistribute.
        """
        # DeepSpeed asserts (or loads nothing silently) on a missing folder: say what is missing.
        probe = os.path.join(ckpt_dir, tag) if tag is not None else os.path.join(ckpt_dir, "latest")
        if not os.path.exists(probe):
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {ckpt_dir!r} (tag {tag!r}): {probe!r} is missing")
        if self._ds.load_universal_checkpoint():
            raise RuntimeError("universal checkpoints are read by DeepSpeed's own torch.load "
                               "(weights_only=False), past our safe loader: not supported on resume")
        inner = self._ds.checkpoint_engine
        self._ds.checkpoint_engine = _SafeLoads(inner)  # every file of our path is read through it
        try:
            path, state = self._ds.load_checkpoint(
                ckpt_dir, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        finally:
            self._ds.checkpoint_engine = inner
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {ckpt_dir!r} (tag {tag!r})")
        state = state or {}
        ema_state = state.get(_EMA_KEY)
        if self.ema is not None:
            if ema_path is not None:
                self.load_ema(ema_path)
            elif ema_state is None:
                log.warning("checkpoint %s has no EMA state: EMA restarts from the loaded weights", path)
                with self._gathered():
                    self.ema.load_state_dict({"weights": dict(named_tensors(self.module)), "updates": 0})
            else:
                self.ema.load_state_dict(ema_state)
        per_rank = state.get(_CLIENT_KEY) or [{}]
        self.loaded_client_states = per_rank
        rank, world = dist.get_rank(), dist.get_world_size()
        if len(per_rank) != world:
            log.warning("checkpoint %s was written by %d ranks, now %d: returning rank 0's client state",
                        path, len(per_rank), world)
            return dict(per_rank[0])
        return dict(per_rank[rank])

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 state dict (CPU tensors), same keys as ``module.state_dict()``.

        Collective for ZeRO 1-3: every rank must call it; every rank gets the dict (rank 0
        usually writes it). Parameters are the fp32 *master* weights, exact for every stage
        and precision (``safe_get_full_fp32_param`` reassembles the ZeRO partitions in
        memory, no checkpoint round trip); buffers are the module's, cast to fp32 when
        floating (under bf16 they were bf16).
        """
        from deepspeed.utils import safe_get_full_fp32_param  # noqa: PLC0415

        masters = self._stage0_masters()
        out: dict[str, torch.Tensor] = {}
        for name, p in self.module.named_parameters():
            full = safe_get_full_fp32_param(p) if p.requires_grad else None
            if full is None:
                full = masters.get(id(p))
            if full is None:
                full = self._full_param(p)
            # contiguous copies, as safetensors needs them
            out[name] = full.detach().float().cpu().clone(memory_format=torch.contiguous_format)
        for name, b in self.module.named_buffers():
            b = b.detach().float() if b.is_floating_point() else b.detach()
            out[name] = b.cpu().clone(memory_format=torch.contiguous_format)
        order = list(self.module.state_dict().keys())
        return {k: out[k] for k in order if k in out} | {k: v for k, v in out.items() if k not in order}

    def _stage0_masters(self) -> dict[int, torch.Tensor]:
        # ZeRO-0 with bf16/fp16: DeepSpeed's unfused optimizer keeps fp32 copies beside the
        # low-precision params, group by group.
        opt = self._ds.optimizer
        if self.zero_stage != 0 or not hasattr(opt, "fp32_groups"):
            return {}
        return {id(lo): hi for los, his in zip(opt.fp16_groups, opt.fp32_groups) for lo, hi in zip(los, his)}

    def _full_param(self, p: torch.Tensor) -> torch.Tensor:
        if self.zero_stage == 3 and hasattr(p, "ds_id"):  # a frozen, partitioned parameter
            import deepspeed  # noqa: PLC0415

            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                return p.detach().float().clone()
        return p

    # -- world-size-free state (resume at another world size) -------------------------

    def _base_optimizer(self) -> torch.optim.Optimizer:
        opt = self._ds.optimizer  # ZeRO 1-3 and the low-precision wrappers hold torch's inside
        return getattr(opt, "optimizer", opt)

    def _partitioned(self, p: torch.Tensor) -> bool:
        return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")

    def _link_state(self) -> None:
        # ZeRO 1-2 give each parameter views of its optimizer state lazily, once; a state made
        # (or replaced) since needs them made again
        opt = self._ds.optimizer
        if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()

    def portable_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(tensors, meta): every rank's share of the training state in a layout that no world
        size is written into. Collective under ZeRO 1-3 (each tensor is assembled from the
        partitions); every rank gets it, rank 0 writes it (``checkpoint.save_portable``).

        Tensors: ``master/<param>`` fp32 master weights, ``buffer/<name>`` fp32 buffers,
        ``<key>/<param>`` the optimizer's per-parameter state (``optim.STATE_KEYS``). Meta
        (plain JSON): the optimizer's step, its param-group hyperparameters (OneCycle moves lr
        and the betas), the scheduler's state and DeepSpeed's step counters.
        """
        from deepspeed.utils import safe_get_full_optimizer_state  # noqa: PLC0415

        base, masters = self._base_optimizer(), self._stage0_masters()
        self._link_state()
        names = dict(self.module.named_parameters())
        out = {f"master/{k}": v for k, v in self.consolidated_state_dict().items() if k in names}
        out |= {f"buffer/{n}": (b.detach().float() if b.is_floating_point() else b.detach()).cpu().clone()
                for n, b in self.module.named_buffers()}
        for name, p in self.module.named_parameters():
            if not p.requires_grad:
                continue
            for key in self.optim_keys:
                if self._partitioned(p):
                    t = safe_get_full_optimizer_state(p, key)  # collective
                else:
                    t = base.state[masters.get(id(p), p)][key]
                out[f"{key}/{name}"] = t.detach().float().cpu().reshape(p.shape if not hasattr(p, "ds_shape")
                                                                         else p.ds_shape).contiguous()
        steps = [float(st["step"]) for st in base.state.values() if "step" in st]
        sched = self._ds.lr_scheduler
        meta = {"optim_step": steps[0] if steps else float(self.global_step),
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups],
                "scheduler": sched.state_dict() if sched is not None else None,
                "global_steps": self._ds.global_steps, "global_samples": self._ds.global_samples,
                "skipped_steps": self._ds.skipped_steps}
        return out, meta

    @torch.no_grad()
    def load_portable_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Collective: the state ``portable_state`` wrote, into this engine at any world size.

        The module's weights and buffers must already hold ``master/`` and ``buffer/`` (load
        them before ``setup_engine``: DeepSpeed partitions and casts what it is given). This
        sets the fp32 masters exactly (under bf16 they were made from bf16 copies), creates the
        optimizer state where no step has yet (torch creates it lazily, DeepSpeed's ZeRO views
        link to it) and fills it, then the hyperparameters, scheduler and step counters.
        """
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state  # noqa: PLC0415

        base, masters = self._base_optimizer(), self._stage0_masters()
        flat = getattr(self._ds.optimizer, "fp32_partitioned_groups_flat", None)  # ZeRO-3 steps these
        for hp in flat if flat is not None else [p for g in base.param_groups for p in g["params"]]:
            st = base.state[hp]
            st.setdefault("step", torch.zeros((), dtype=torch.float32))
            for key in self.optim_keys:
                st.setdefault(key, torch.zeros_like(hp, memory_format=torch.preserve_format))
            st["step"].fill_(meta["optim_step"])
        self._link_state()
        for name, p in self.module.named_parameters():
            if not p.requires_grad:
                continue
            master = tensors[f"master/{name}"].to(self.device)
            if self._partitioned(p):
                safe_set_full_fp32_param(p, master)
            elif id(p) in masters:
                masters[id(p)].copy_(master.view_as(masters[id(p)]))
            for key in self.optim_keys:
                value = tensors[f"{key}/{name}"].to(self.device)
                if self._partitioned(p):
                    safe_set_full_optimizer_state(p, value, key)
                else:
                    base.state[masters.get(id(p), p)][key].copy_(value.view_as(p))
        for group, saved in zip(base.param_groups, meta["param_groups"]):
            group.update({k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
        if self._ds.lr_scheduler is not None and meta.get("scheduler") is not None:
            self._ds.lr_scheduler.load_state_dict(meta["scheduler"])
        self._ds.global_steps = int(meta["global_steps"])
        self._ds.global_samples = int(meta["global_samples"])
        self._ds.skipped_steps = int(meta["skipped_steps"])
