"""The run's geometry and what each world size runs to keep it (pure, no Ray, no DeepSpeed)."""

from __future__ import annotations

import pytest

from trainer.config import ConfigError, load_config
from trainer.elastic import Geometry, fit, geometry_from_state, geometry_of


def _cfg(*overrides: str):
    return load_config("synthetic-cpu", ["data.batch_size=16", "cluster.workers=4", "train.grad_accum=2", *overrides])


def test_a_new_run_keeps_todays_meaning_of_batch_size_and_workers():
    g = geometry_of(_cfg())
    assert g == Geometry(lanes=4, lane_batch=16, lane_steps=2, batch_size=16, world_size=4)
    assert g.global_batch == 16 * 4 * 2
    g = geometry_of(_cfg("data.lanes=16"))
    assert (g.lanes, g.lane_batch) == (16, 4) and g.global_batch == 128
    with pytest.raises(ConfigError, match="data.lanes"):
        geometry_of(_cfg("data.lanes=6"))


@pytest.mark.parametrize("world,batch,accum", [(16, 4, 2), (8, 8, 2), (4, 16, 2), (2, 16, 4), (1, 16, 8)])
def test_every_divisor_keeps_the_global_batch_and_never_grows_the_per_worker_batch(world, batch, accum):
    g = geometry_of(_cfg("data.lanes=16"))
    s = fit(g, world)
    assert (s.batch_size, s.grad_accum) == (batch, accum)
    assert s.world_size * s.batch_size * s.grad_accum == g.global_batch
    assert s.lanes_per_batch * g.lane_batch == s.batch_size and s.loss_scale == 16 / batch


def test_a_size_that_does_not_divide_the_lanes_is_refused_naming_those_that_do():
    with pytest.raises(ValueError, match="world size 3 .* 1, 2, 4, 8, 16"):
        fit(geometry_of(_cfg("data.lanes=16")), 3)


def test_checkpoints_from_before_lanes_had_one_lane_per_rank():
    cfg = _cfg().model_dump(mode="json")
    g = geometry_from_state({"world_size": 4, "config": cfg})
    assert g == geometry_of(_cfg())
    assert geometry_from_state({"world_size": 4, "config": cfg, "geometry": g.to_dict()}) == g


def test_min_workers_above_workers_is_refused():
    with pytest.raises(ConfigError, match="min_workers"):
        _cfg("cluster.min_workers=5")
