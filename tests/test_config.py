"""Config tree: presets load, overrides parse with YAML types, errors name the key."""

from __future__ import annotations

import re

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


@pytest.mark.parametrize("key", ["shm_allreduce", "tune_malloc"])
def test_a_config_file_naming_a_removed_key_fails_in_one_line(tmp_path, key: str) -> None:
    path = tmp_path / "old.yaml"
    path.write_text(f"cluster:\n  workers: 2\n  {key}: true\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(path), [])
    msg = str(e.value)
    assert msg.startswith(f"unknown config key 'cluster.{key}' (valid in 'cluster': workers,") and "\n" not in msg
    assert f"[file {str(path)!r}]" in msg
    with pytest.raises(ConfigError, match=rf"unknown config key 'cluster\.{key}'.*\[override"):
        load_config("synthetic-cpu", [f"cluster.{key}=false"])


def test_a_checkpoints_saved_config_with_removed_keys_still_reads() -> None:
    """csl_state.json of a run from before the removal names them; readers drop them."""
    saved = load_config("synthetic-cpu", ["cluster.workers=3"]).model_dump(mode="json")
    saved["cluster"].update(shm_allreduce=True, tune_malloc=True)
    cfg = Config.model_validate(saved)
    assert cfg.cluster.workers == 3 and "shm_allreduce" not in cfg.cluster.model_dump()
    saved["cluster"]["nonsense"] = 1  # anything else is still refused
    with pytest.raises(ValueError, match="nonsense"):
        Config.model_validate(saved)


def test_debug_section_is_typed_and_off_by_default(tmp_path) -> None:
    assert Config().debug.fault_step is None and Config().debug.record_keys is None
    marker = str(tmp_path / "fired")
    cfg = load_config("synthetic-cpu", ["debug.fault_step=6", "debug.fault_rank=1", f"debug.fault_marker={marker}",
                                        "debug.fault_delay_s=0.5", f"debug.record_keys={tmp_path}"])
    assert (cfg.debug.fault_step, cfg.debug.fault_rank, cfg.debug.fault_marker) == (6, 1, marker)
    assert Config.model_validate(cfg.model_dump(mode="json")) == cfg  # it reaches the workers
    with pytest.raises(ConfigError, match=r"config key 'debug'.*needs debug\.fault_marker") as e:
        load_config("synthetic-cpu", ["debug.fault_step=6"])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"unknown config key 'debug\.fault_inject'"):
        load_config("synthetic-cpu", ["debug.fault_inject=0:6:x"])


def test_config_crosses_process_boundary_as_plain_data() -> None:
    cfg = load_config("synthetic-cpu", ["deepspeed.zero_stage=3"])
    assert Config.model_validate(cfg.model_dump()) == cfg


def test_round_trip_through_s3(s3_bucket: str) -> None:
    cfg = load_config("synthetic-cpu", [f"run.storage={s3_bucket}/runs"])
    url = f"{s3_bucket}/runs/exp/config.yaml"
    cfg.save_resolved(url)
    assert load_config(url, []) == cfg


# ---------------------------------------------------------------------------------------
# hostile values: a run folder outside run.storage, loose types, bounds the workers need


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "..", ".", "a\\b", "a\x00b", "a\nb", "a\x1bb", "x" * 256, ""])
def test_run_name_is_one_safe_folder_name(name: str) -> None:
    with pytest.raises(ConfigError, match=r"config key 'run\.name'") as e:
        load_config("synthetic-cpu", [f"run.name={name}"])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["exp-1", "a.b_c", "..a", "x" * 255, "2024"])
def test_ordinary_run_names_pass(name: str) -> None:
    assert load_config("synthetic-cpu", [f"run.name={name}"]).run.name == name


def test_run_name_is_checked_on_assignment() -> None:
    cfg = load_config("synthetic-cpu", [])
    with pytest.raises(ValueError, match="run.name|folder name"):
        cfg.run.name = "../x"


@pytest.mark.parametrize("override, expected", [
    ("train.epochs=true", "expected int, got True"),
    ("cluster.workers=1.5", "expected int, got 1.5"),
    ("cluster.workers=2.0", "expected int, got 2.0"),
    ("loss.likelihood_topk=false", "expected int, got False"),
    ("model.channels_last=1", "expected bool, got 1"),
    ("debug.fault_rank=true", "expected int, got True"),
    ("optim.lr=true", "expected float, got True"),
    ("loss.gamma_neg=yes", "expected float, got True"),
    ("optim.lr=.inf", "expected a finite number, got inf"),
    ("loss.gamma_pos=.nan", "expected a finite number, got nan"),
])
def test_types_are_strict(override: str, expected: str) -> None:
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match=rf"config key '{key}': {expected} \[override '{override}'\]"):
        load_config("synthetic-cpu", [override])


def test_a_quoted_number_in_a_file_is_not_an_int(tmp_path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text('train:\n  epochs: "3"\n')
    with pytest.raises(ConfigError, match=r"config key 'train\.epochs': expected int, got '3' \[file "):
        load_config(str(path), [])


def test_floats_take_ints_and_yaml_exponents() -> None:
    cfg = load_config("synthetic-cpu", ["optim.lr=1", "loss.gamma_neg=2", "cluster.cpus_per_worker=2"])
    assert cfg.optim.lr == 1.0 and cfg.loss.gamma_neg == 2.0 and cfg.cluster.cpus_per_worker == 2.0
    assert load_config("synthetic-cpu", ["optim.lr=5e-4"]).optim.lr == pytest.approx(5e-4)


@pytest.mark.parametrize("override", [
    "data.shuffle_buffer=0",          # ShardStream: shuffle_buffer >= 1
    "data.workers=-1",                # DataLoader num_workers >= 0
    "data.batch_size=0",
    "train.seed=-1",                  # ShardStream: seed >= 0
    "train.seed=4294967296",          # np.random.seed: < 2**32
    "cluster.cpus_per_worker=0",      # Ray resources_per_worker, units of 1e-4
    "cluster.cpus_per_worker=0.00001",
    "cluster.gpus_per_worker=0.00001",
    "cluster.gpus_per_worker=-1",
    "cluster.max_failures=-2",        # Ray FailureConfig: -1 (forever) or >= 0
    "checkpoint.keep=0",              # Ray CheckpointConfig.num_to_keep >= 1
    "train.ema_decay=1",              # ModelEMA: [0, 1)
    "optim.weight_decay=-0.1",
])
def test_bounds_the_consumers_need(override: str) -> None:
    with pytest.raises(ConfigError, match=rf"config key '{re.escape(override.partition('=')[0])}'"):
        load_config("synthetic-cpu", [override])


def test_edge_values_that_consumers_take() -> None:
    cfg = load_config("synthetic-cpu", ["data.shuffle_buffer=1", "train.seed=4294967295", "cluster.gpus_per_worker=0.5",
                                        "cluster.max_failures=-1", "data.workers=0"])
    assert (cfg.data.shuffle_buffer, cfg.train.seed, cfg.cluster.gpus_per_worker) == (1, 2**32 - 1, 0.5)


@pytest.mark.parametrize("name", sorted(available_presets()))
def test_every_available_preset_loads_and_round_trips(name: str) -> None:
    cfg = load_config(name, [])
    assert Config.model_validate(cfg.model_dump(mode="json")) == cfg


def test_cli_refuses_a_run_name_outside_storage(tmp_path, monkeypatch, capsys) -> None:
    from trainer.cli import main

    storage = tmp_path / "store" / "runs"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", "synthetic-cpu", f"run.storage={storage}", "run.name=../x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "run.name" in err and "../x" in err
    assert not (tmp_path / "store" / "x").exists() and not storage.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------
# launch.check_inputs: what needs the data or another component, before Ray starts


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> str:
    from data_shards.sources.synthetic import build_synthetic

    root = str(tmp_path_factory.mktemp("data") / "tiny")
    build_synthetic(root, train=12, val=6, image_size=16, shard_samples=6, seed=0, progress=False)
    return root


def test_check_inputs_passes_a_good_config(tiny_data: str) -> None:
    from trainer.launch import check_inputs

    check_inputs(load_config("synthetic-cpu", [f"data.root={tiny_data}", "data.batch_size=2"]))


@pytest.mark.parametrize("overrides, match", [
    (["cluster.workers=7"], r"split 'val'.*cluster\.workers=7"),                       # a rank with no val sample
    (["data.batch_size=2", "train.grad_accum=4"], r"fewer than train\.grad_accum=4"),   # 3 batches per rank
    (["model.name=resnet5"], r"config key 'model\.name': unknown model 'resnet5'"),
    (["model.pretrained=/nonexistent/w.safetensors"], r"model\.pretrained.*not found"),
    (["loss.name=pseudo", "train.ema_decay=0"], r"train\.ema_decay > 0"),
    (["loss.gamma_neg=-1"], r"gamma_neg"),                                                # the loss's own range
])
def test_check_inputs_refuses_what_a_worker_would(tiny_data: str, overrides: list[str], match: str) -> None:
    from trainer.launch import check_inputs

    cfg = load_config("synthetic-cpu", [f"data.root={tiny_data}", *overrides])
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        check_inputs(cfg)
