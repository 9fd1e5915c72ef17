"""Config tree: presets load, overrides parse with YAML types, errors name the key."""

from __future__ import annotations

import pytest
import yaml

from trainer.config import Config, ConfigError, available_presets, load_config

PRESETS = ["synthetic-cpu", "openimages-v6-tresnet-m", "openimages-v6-resnet50", "coco-fpc-1000", "lvis"]


def test_presets_exist() -> None:
    assert set(PRESETS) <= set(available_presets())


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads(name: str) -> None:
    cfg = load_config(name, [])
    assert cfg.run.name == name
    assert cfg.data.batch_size >= 1


def test_embedded_default_is_cpu_and_small() -> None:
    cfg = load_config("synthetic-cpu", [])
    assert cfg.model.name == "small-cnn"
    assert cfg.data.image_size == 64
    assert cfg.cluster.workers == 2 and cfg.cluster.gpus_per_worker == 0
    assert cfg.train.precision == "fp32"


def test_openimages_preset_matches_the_reference_setting() -> None:
    cfg = load_config("openimages-v6-tresnet-m", [])
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.schedule, cfg.optim.pct_start) == ("adam", 2e-4, "onecycle", 0.2)
    assert (cfg.train.ema_decay, cfg.optim.weight_decay, cfg.data.image_size) == (0.9997, 1e-4, 224)
    assert cfg.loss.params() == {"gamma_pos": 0.0, "gamma_neg": 1.0, "gamma_unann": 4.0, "clip": 0.0,
                                 "likelihood_topk": 5, "prior_threshold": 0.5}
    assert cfg.model.head == "bottleneck"


def test_overrides_take_yaml_types() -> None:
    cfg = load_config("synthetic-cpu", [
        "train.epochs=7",                  # int
        "optim.lr=1e-3",                   # float written without a dot (YAML reads a str)
        "optim.pct_start=0.3",             # float
        "run.name=exp-1",                  # str
        "run.storage=s3://bucket/runs/x",  # remote path stays a str
        "loss.likelihood_topk=5",
        "loss.extra.alpha=0.25",           # nested, free-form
        "model.pretrained=https://example.com/w.safetensors",
        "train.max_steps=null",
    ])
    assert cfg.train.epochs == 7 and isinstance(cfg.train.epochs, int)
    assert cfg.optim.lr == pytest.approx(1e-3) and cfg.optim.pct_start == pytest.approx(0.3)
    assert cfg.run.name == "exp-1"
    assert cfg.run.storage == "s3://bucket/runs/x"
    assert cfg.loss.likelihood_topk == 5
    assert cfg.loss.params()["alpha"] == 0.25
    assert cfg.model.pretrained == "https://example.com/w.safetensors"
    assert cfg.train.max_steps is None


def test_numeric_name_is_kept_as_str() -> None:
    assert load_config("synthetic-cpu", ["run.name=2024"]).run.name == "2024"


def test_unknown_key_names_the_key_and_valid_keys() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.epocs'.*valid in 'train': epochs, seed") as e:
        load_config("synthetic-cpu", ["train.epocs=3"])
    assert "train.epocs=3" in str(e.value)


def test_unknown_section_names_the_section() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'trian'.*valid sections: data, model"):
        load_config("synthetic-cpu", ["trian.epochs=3"])


def test_wrong_type_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"config key 'train\.epochs': expected int, got 'abc'"):
        load_config("synthetic-cpu", ["train.epochs=abc"])
    with pytest.raises(ConfigError, match=r"config key 'train\.precision': expected one of"):
        load_config("synthetic-cpu", ["train.precision=fp8"])
    with pytest.raises(ConfigError, match=r"config key 'deepspeed\.zero_stage'"):
        load_config("synthetic-cpu", ["deepspeed.zero_stage=4"])


def test_bad_override_syntax() -> None:
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config("synthetic-cpu", ["train.epochs"])
    with pytest.raises(ConfigError, match="is not a section"):
        load_config("synthetic-cpu", ["train.epochs.x=1"])


def test_unknown_preset_lists_presets() -> None:
    with pytest.raises(ConfigError, match="unknown config preset 'nope'.*synthetic-cpu"):
        load_config("nope", [])


def test_loss_extra_may_not_repeat_typed_params() -> None:
    cfg = load_config("synthetic-cpu", ["loss.extra.gamma_pos=1"])
    with pytest.raises(ConfigError, match="gamma_pos"):
        cfg.loss.params()


def test_yaml_file_and_round_trip(tmp_path) -> None:
    cfg = load_config("openimages-v6-resnet50", ["train.epochs=2", "run.storage=s3://b/x", "loss.extra.k=[1, 2]"])
    out = str(tmp_path / "run" / "config.yaml")
    cfg.save_resolved(out)
    again = load_config(out, [])
    assert again == cfg
    assert yaml.safe_load(open(out))["run"]["storage"] == "s3://b/x"


def test_partial_file_falls_back_to_defaults(tmp_path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  epochs: 9\n")
    cfg = load_config(str(path), [])
    assert cfg.train.epochs == 9 and cfg.model == Config().model


def test_bad_file_contents(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(str(path), [])
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"), [])


def test_config_crosses_process_boundary_as_plain_data() -> None:
    cfg = load_config("synthetic-cpu", ["deepspeed.zero_stage=3"])
    assert Config.model_validate(cfg.model_dump()) == cfg


def test_round_trip_through_s3(s3_bucket: str) -> None:
    cfg = load_config("synthetic-cpu", [f"run.storage={s3_bucket}/runs"])
    url = f"{s3_bucket}/runs/exp/config.yaml"
    cfg.save_resolved(url)
    assert load_config(url, []) == cfg
