"""Resume does not trust the run folder: every DeepSpeed file is read with
``torch.load(weights_only=True)`` and a four-type allow-list, so a tampered checkpoint (a
shared bucket) is refused with the file named and its payload never runs. Single process,
gloo, no Ray; one saved checkpoint per (ZeRO stage, precision), shared by the tests."""

from __future__ import annotations

import builtins
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from trainer.engine import UnsafeCheckpointError, safe_torch_load

from test_engine import _batches, _cfg, _engine, _train

# DeepSpeed's deprecations are not ours; torch warns about the raw pickle's protocol before refusing it.
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")]

TAG = "ds"  # the loop's tag
_SAVED: dict[tuple[int, str], Path] = {}


class Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def _saved(tmp_path_factory, stage: int, precision: str) -> Path:
    """A checkpoint written by a 3-step run (cached per module), with its consolidated weights."""
    key = (stage, precision)
    if key not in _SAVED:
        engine = _engine(_cfg(f"deepspeed.zero_stage={stage}", f"train.precision={precision}"))
        _train(engine, _batches(3))
        root = tmp_path_factory.mktemp(f"z{stage}{precision}")
        engine.save(str(root), TAG, {"cursor": [3, 7]})
        torch.save(engine.consolidated_state_dict(), root / "consolidated.pt")
        _SAVED[key] = root
    return _SAVED[key]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _spy_torch_load(monkeypatch) -> list[tuple[str, object]]:
    calls: list[tuple[str, object]] = []
    real = torch.load

    def spy(f, *args, **kwargs):
        calls.append((os.path.basename(str(f)), kwargs.get("weights_only")))
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)  # DeepSpeed calls torch.load through the module too
    return calls


def test_safe_torch_load_takes_deepspeeds_types_and_nothing_else(tmp_path) -> None:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    before = set(torch.serialization.get_safe_globals())
    ok = tmp_path / "ok.pt"
    torch.save({"stage": ZeroStageEnum.gradients, "scaler": LossScaler(1.0), "slice": fragment_address(6, 2),
                "t": torch.arange(3)}, ok)
    back = safe_torch_load(str(ok), map_location="cpu")
    assert back["stage"] is ZeroStageEnum.gradients and back["scaler"].cur_scale == 1.0
    assert back["slice"] == fragment_address(6, 2) and torch.equal(back["t"], torch.arange(3))
    assert set(torch.serialization.get_safe_globals()) == before  # the allow-list lived for that call only

    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pt"
    torch.save({"t": torch.ones(1), "x": Evil(str(marker))}, bad)
    with pytest.raises(UnsafeCheckpointError, match=r"bad\.pt.*disallowed type.*nothing from it was executed"):
        safe_torch_load(str(bad))
    assert not marker.exists()


@pytest.mark.parametrize("stage,precision", [(0, "fp32"), (1, "bf16"), (2, "fp32"), (3, "bf16")])
def test_round_trip_reads_every_file_with_weights_only(tmp_path_factory, monkeypatch, stage: int,
                                                      precision: str) -> None:
    root = _saved(tmp_path_factory, stage, precision)
    engine = _engine(_cfg(f"deepspeed.zero_stage={stage}", f"train.precision={precision}"), seed=5)
    original = engine._ds.checkpoint_engine
    calls = _spy_torch_load(monkeypatch)
    assert engine.load(str(root), TAG) == {"cursor": [3, 7]}
    monkeypatch.undo()
    assert engine._ds.checkpoint_engine is original  # lent for the load only
    assert engine.global_step == 3
    # every DeepSpeed file of the checkpoint was read (model states twice: DeepSpeed checks
    # them first), each time with weights_only=True
    assert {name for name, _ in calls} == set(os.listdir(root / TAG))
    assert all(weights_only is True for _, weights_only in calls), calls
    saved = torch.load(root / "consolidated.pt", weights_only=True)
    restored = engine.consolidated_state_dict()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)


@pytest.mark.parametrize("stage,precision,name,how", [
    (0, "fp32", "mp_rank_00_model_states.pt", "augment"),  # the real state plus one payload
    (2, "fp32", "zero_pp_rank_0_mp_rank_00_optim_states.pt", "replace"),  # the whole file is the payload
    (1, "bf16", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "raw pickle"),  # not even torch's format
])
def test_tampered_file_is_refused_and_never_run(tmp_path_factory, tmp_path, stage: int, precision: str,
                                                name: str, how: str) -> None:
    ckpt = _copy(_saved(tmp_path_factory, stage, precision), tmp_path / "run")
    target = ckpt / TAG / name
    marker = tmp_path / "pwned"
    if how == "augment":
        state = safe_torch_load(str(target))
        state["note"] = Evil(str(marker))
        torch.save(state, target)
    elif how == "replace":
        torch.save(Evil(str(marker)), target)
    else:
        target.write_bytes(pickle.dumps(Evil(str(marker))))
    assert not marker.exists()
    engine = _engine(_cfg(f"deepspeed.zero_stage={stage}", f"train.precision={precision}"))
    original = engine._ds.checkpoint_engine
    with pytest.raises(UnsafeCheckpointError, match=rf"{name}'? holds a disallowed type; nothing from it was executed"):
        engine.load(str(ckpt), TAG)
    assert not marker.exists()
    assert engine._ds.checkpoint_engine is original


def test_universal_checkpoints_are_refused(tmp_path_factory, monkeypatch) -> None:
    # DeepSpeed reads those with its own torch.load(weights_only=False), past our hook
    root = _saved(tmp_path_factory, 0, "fp32")
    engine = _engine(_cfg())
    monkeypatch.setattr(engine._ds, "load_universal_checkpoint", lambda: True)
    with pytest.raises(RuntimeError, match="universal checkpoints"):
        engine.load(str(root), TAG)
