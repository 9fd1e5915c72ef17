"""The typed configuration tree of a training run.

Design notes:

- One pydantic model per component (data, model, loss, ...), each with
  ``extra="forbid"``: a misspelt key is an error at start-up, not a silently ignored
  setting discovered after a day of training. The tree crosses the Ray boundary as plain
  data (``model_dump()``) and is rebuilt on each worker with ``Config.model_validate``.
- Layering follows timm: a YAML preset (``trainer/configs/NAME.yaml``) or a YAML file
  (local path or fsspec URL), then dotted ``key=value`` overrides whose values are parsed
  with ``yaml.safe_load`` (``train.epochs=3`` is an int, ``run.storage=s3://b/x`` a str),
  then the resolved tree is written to the run folder with ``save_resolved``.
- Every field has a default, so ``Config()`` is a valid (CPU, synthetic-data) run; the
  presets only state what differs and say where each value comes from.
- Errors are ``ConfigError`` naming the dotted key and where the value came from (preset,
  file, or override), so the CLI can print one line and exit 2.
- Remote paths (``data.root``, ``run.storage``, ``model.pretrained``, ``prior.path``) stay
  ``str``: a ``pathlib.Path`` would collapse ``s3://`` into ``s3:/``.
- Types are strict where YAML makes them ambiguous: ``train.epochs=true`` or ``epochs: "3"``
  is an error, not 1 or 3 (``StrictInt``, ``StrictBool``). A float takes an int or a number
  string (PyYAML reads ``1e-3`` as a str, YAML 1.1 wants a dot) but never a bool, and no
  float may be inf or nan. A str takes a number (``run.name=2024``).
- Every bound is the one its consumer needs (a comment names the consumer where it is not
  plain), so a bad value fails here, before Ray starts, not inside a worker;
  ``launch.check_inputs`` adds the bounds that depend on the data (batches per rank) and on
  other components (model names, loss parameters).
- ``run.name`` is one folder name under ``run.storage``: ``run.name=../x`` cannot write
  outside it.
- Loss parameters are typed but optional: ``None`` means "not set, use the loss's own
  default", so one tree serves every loss of the zoo; ``loss.params()`` hands only the set
  ones to ``trainer.losses.build_loss``, which rejects parameters its loss does not take.
"""

from __future__ import annotations

import importlib.resources
import re
from typing import Annotated, Any, Literal

import fsspec
import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, StrictBool,
                      StrictInt, ValidationError, ValidationInfo, model_validator)
from pydantic_core import PydanticCustomError

__all__ = [
    "AugmentConfig",
    "CheckpointConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "CutoutConfig",
    "DataConfig",
    "DebugConfig",
    "DeepSpeedConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "PriorConfig",
    "RandAugmentConfig",
    "RunConfig",
    "TrainConfig",
    "available_presets",
    "load_config",
]


class ConfigError(ValueError):
    """A bad preset name, config file, key or value; the message names the key."""


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise PydanticCustomError("float_type", "Input should be a valid number")
    return value


# Lax float (ints and number strings such as PyYAML's `1e-3`), less bools.
_Float = Annotated[float, BeforeValidator(_not_bool)]

_NAME_MAX = 255  # bytes in one path component (NAME_MAX on Linux and macOS); the pattern is ASCII
_NAME = re.compile(r"[A-Za-z0-9._-]+")


def _folder_name(name: str) -> str:
    if len(name) > _NAME_MAX or name in (".", "..") or not _NAME.fullmatch(name):
        raise PydanticCustomError(
            "folder_name", "must be one folder name of letters, digits, '.', '_' and '-' (not '.' or '..', "
            "at most {max} characters)", {"max": _NAME_MAX})
    return name


def _ray_quantity(value: float) -> float:
    # Ray counts resources in units of 1e-4 and refuses a non-zero request below one unit.
    if 0 < value < 1e-4:
        raise PydanticCustomError("ray_quantity", "must be 0 or at least 0.0001 (Ray's resource unit)")
    return value


class _Section(BaseModel):
    # coerce_numbers_to_str: `run.name=2024` parses as an int in YAML but is clearly a name.
    # allow_inf_nan: no setting has a meaning for inf or nan, and a bound such as `lr > 0`
    # lets inf through (and nan where a field has no bound).
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, validate_assignment=True,
                              allow_inf_nan=False)


def _switch(value: Any) -> Any:
    # An augmentation given as a bool: true is on with the defaults, false is off.
    return {"enabled": value} if isinstance(value, bool) else value


def _fill(value: Any) -> Any:
    if value == "random":
        return value
    if (isinstance(value, (list, tuple)) and len(value) == 3
            and all(type(v) is int and 0 <= v <= 255 for v in value)):
        return list(value)
    raise PydanticCustomError("fill", "must be 'random' or [r, g, b] with each 0-255")


class CutoutConfig(_Section):
    """A square of `fraction` x the image side, centred anywhere (clipped at the borders)."""

    enabled: StrictBool = True
    fraction: _Float = Field(0.5, gt=0, le=1, description="side of the square / side of the image")
    fill: Annotated[str | list[int], PlainValidator(_fill)] = Field(
        "random", description="'random' (one colour per image) or [r, g, b]")


class RandAugmentConfig(_Section):
    """timm's RandAugment ops, drawn as the reference draws them (data_shards/augment.py)."""

    enabled: StrictBool = True
    num_ops: StrictInt = Field(2, ge=1, description="ops per image, each applied with probability 0.5")
    magnitude: _Float = Field(10.0, ge=0, le=10, description="upper end of each op's uniform magnitude draw "
                              "(timm's 0-10 scale)")


class AugmentConfig(_Section):
    """Training only: evaluation and the prior pass never augment. `cutout` and `randaugment`
    take false (off), true (on, with the defaults: the reference's) or a mapping of settings
    (on unless it says `enabled: false`)."""

    flip: StrictBool = Field(True, description="random horizontal flip")
    cutout: Annotated[CutoutConfig, BeforeValidator(_switch)] = Field(
        default_factory=lambda: CutoutConfig(enabled=False))
    randaugment: Annotated[RandAugmentConfig, BeforeValidator(_switch)] = Field(
        default_factory=lambda: RandAugmentConfig(enabled=False))

    def spec(self) -> Any:
        """The plain `data_shards.augment.AugmentSpec` the training stream takes."""
        from data_shards.augment import AugmentSpec, CutoutSpec, RandAugmentSpec

        c, r = self.cutout, self.randaugment
        fill = None if c.fill == "random" else tuple(c.fill)
        return AugmentSpec(flip=self.flip, cutout=CutoutSpec(c.fraction, fill) if c.enabled else None,
                           randaugment=RandAugmentSpec(r.num_ops, r.magnitude) if r.enabled else None)


class DataConfig(_Section):
    root: str = "runs/data/synthetic"
    # ShardStream (data_shards/stream.py) needs batch_size, shuffle_buffer, image_size >= 1 (the
    # 8 px floor here is stricter) and workers >= 0; launch.check_inputs checks that every rank
    # gets the same number of batches of each split.
    batch_size: StrictInt = Field(32, ge=1, description="samples per worker per micro-step")
    image_size: StrictInt = Field(64, ge=8)
    workers: StrictInt = Field(2, ge=0, description="DataLoader worker processes per training worker")
    shuffle_buffer: StrictInt = Field(1000, ge=1, description="samples held for streaming shuffle")
    lanes: StrictInt = Field(0, ge=0, description="canonical ranks of the epoch's order (partition.py): the run "
                             "can continue at any world size dividing it; 0: cluster.workers")
    corrupt: Literal["skip", "fail"] = "skip"
    train_split: str = "train"
    val_split: str = "val"
    augment: AugmentConfig = Field(default_factory=AugmentConfig)


class ModelConfig(_Section):
    name: str = "small-cnn"
    pretrained: str | None = Field(None, description="local path or fsspec URL of .safetensors/.pt weights")
    head: Literal["linear", "bottleneck"] = "linear"
    bottleneck_dim: StrictInt = Field(2048, ge=1)  # nn.Linear width (models.make_head)
    channels_last: StrictBool = Field(True, description="NHWC activations at every ZeRO stage and precision "
                                      "(faster convolutions on CPU and GPU); weights keep DeepSpeed's layout")


class LossConfig(_Section):
    name: str = "csl"
    # Ranges are the loss's own (trainer/losses check_float/check_int), checked by
    # launch.check_inputs building the loss; here only the types.
    gamma_pos: _Float | None = None
    gamma_neg: _Float | None = None
    gamma_unann: _Float | None = None
    clip: _Float | None = None
    likelihood_topk: StrictInt | None = None
    prior_threshold: _Float | None = None
    topk_scope: str | None = None
    prior_alpha: _Float | None = None
    reduction: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict, description="parameters of losses not typed above")

    def params(self) -> dict[str, Any]:
        """Keyword arguments for ``build_loss(name, prior=..., **params)``.

        Typed fields are shared by the whole zoo, so a preset written for ``csl`` keeps working
        when ``loss.name=ignore`` is overridden (the two-stage pipeline does exactly that): a
        typed field goes only to losses that take it. ``extra`` is passed as given, so the loss
        builder rejects a parameter there that the loss does not know.
        """
        from trainer.losses import loss_params  # the registry owns what each loss accepts

        accepted = set(loss_params(self.name))
        typed = {k: v for k, v in self.model_dump(exclude={"name", "extra"}).items()
                 if v is not None and k in accepted}
        clash = sorted(set(typed) & set(self.extra))
        if clash:
            raise ConfigError(f"config key 'loss.extra' repeats typed loss parameter(s): {', '.join(clash)}")
        return {**typed, **self.extra}


class PriorConfig(_Section):
    path: str | None = Field(None, description="priors CSV (local or fsspec URL) for the selective loss")


class OptimConfig(_Section):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    # torch.optim needs lr, weight_decay, momentum >= 0 (lr 0 would train nothing); OneCycleLR
    # pct_start in [0, 1]; DeepSpeed's gradient_clipping >= 0.
    lr: _Float = Field(2e-3, gt=0)
    weight_decay: _Float = Field(1e-4, ge=0, description="applied to weights only, not biases and norms")
    momentum: _Float = Field(0.9, ge=0, lt=1, description="sgd only")
    schedule: Literal["onecycle", "constant"] = "onecycle"
    pct_start: _Float = Field(0.2, gt=0, lt=1)
    grad_clip: _Float = Field(0.0, ge=0, description="max global grad norm; 0 turns clipping off")


class TrainConfig(_Section):
    epochs: StrictInt = Field(3, ge=1)
    # ShardStream needs seed >= 0; loop.run_training hands it to np.random.seed, < 2**32.
    seed: StrictInt = Field(0, ge=0, lt=2**32)
    ema_decay: _Float = Field(0.99, ge=0, lt=1, description="0 turns the EMA model off")  # engine.ModelEMA
    ema_warmup_steps: StrictInt = Field(0, ge=0, description="decay * (1 - exp(-step / this)); 0: constant decay")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    max_steps: StrictInt | None = Field(None, ge=1, description="stop after this many optimizer steps (smoke runs)")
    log_every: StrictInt = Field(10, ge=1)  # step % log_every
    grad_accum: StrictInt = Field(1, ge=1)  # DeepSpeed gradient_accumulation_steps


class CheckpointConfig(_Section):
    every_steps: StrictInt = Field(50, ge=0, description="0: only at the end of each epoch")
    every_minutes: _Float = Field(0.0, ge=0, description="also when this many minutes passed since the last "
                                  "checkpoint, by rank 0's clock at log steps (whichever comes first; 0: off)")
    keep: StrictInt = Field(2, ge=1)  # Ray's CheckpointConfig.num_to_keep >= 1
    portable: bool = Field(False, description="also write the state by parameter name (portable.safetensors, 12 "
                           "bytes/parameter with Adam), so Ray can resize the group without a conversion; on "
                           "whenever cluster.min_workers < cluster.workers at ZeRO >= 1")


class RunConfig(_Section):
    # The run folder is {storage}/{name} (launch.run_dir_of): one folder name, never a path.
    name: Annotated[str, AfterValidator(_folder_name)] = "synthetic-cpu"
    storage: str = Field("runs", description="a folder or an fsspec URL such as s3://bucket/prefix")


class ClusterConfig(_Section):
    # Ray's ScalingConfig: at least one worker, resources_per_worker in units of 1e-4.
    workers: StrictInt = Field(2, ge=1)
    gpus_per_worker: Annotated[_Float, AfterValidator(_ray_quantity)] = Field(0.0, ge=0)
    cpus_per_worker: _Float = Field(1.0, ge=1e-4)
    max_failures: StrictInt = Field(1, ge=-1, description="-1: retry forever (Ray's convention)")
    min_workers: StrictInt | None = Field(None, ge=1, description="elastic group: Ray Train runs between "
                                          "min_workers and workers and restarts at the size it can get "
                                          "(each a divisor of data.lanes); None: fixed at workers")

    @model_validator(mode="after")
    def _min_below_max(self) -> "ClusterConfig":
        if self.min_workers is not None and self.min_workers > self.workers:
            raise ValueError(f"cluster.min_workers={self.min_workers} exceeds cluster.workers={self.workers}")
        return self


class DeepSpeedConfig(_Section):
    zero_stage: StrictInt = Field(0, ge=0, le=3)


class DebugConfig(_Section):
    """Aids for failure and exactly-once tests, all off by default. They reach the workers inside
    the config like every other setting (no environment variables read by workers)."""

    fault_step: StrictInt | None = Field(None, ge=1, description="stop rank `fault_rank` right after this "
                                         "optimizer step, once (see fault_action); needs fault_marker")
    fault_rank: StrictInt = Field(0, ge=0, description="the rank fault_step stops (a rank the run lacks: none)")
    fault_action: Literal["kill", "hold"] = Field(
        "kill", description="'kill': the rank SIGKILLs itself; 'hold': it waits there (up to 10 min, then trains on) "
        "while the test takes its node or a peer's down from outside, as when a machine is lost")
    fault_marker: str | None = Field(None, description="local file written as the fault fires; while it exists the "
                                     "fault does not fire again, so the restarted worker trains on")
    # Ray's controller registers a reported checkpoint at its next poll of the workers (every
    # 2 s): a kill inside that window rightly loses it, and a test's resume point would be a race.
    fault_delay_s: _Float = Field(3.0, ge=0, description="seconds to wait before the kill")
    record_keys: str | None = Field(None, description="local folder: each rank appends `pid epoch step key` "
                                    "lines to rank{r}.txt, the samples of each optimizer step")

    @model_validator(mode="after")
    def _marker_with_fault(self) -> "DebugConfig":
        if self.fault_step is not None and not self.fault_marker:
            raise ValueError("debug.fault_step needs debug.fault_marker (the fault would fire again after each restart)")
        return self


# Keys earlier versions had. A checkpoint's saved config (csl_state.json) may still name them
# and reads without them; a config file or override naming one fails as an unknown key
# (`load_config` validates with the context {"user_config": True}).
_REMOVED_KEYS = {"cluster": ("tune_malloc", "shm_allreduce")}


class Config(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    prior: PriorConfig = Field(default_factory=PriorConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    run: RunConfig = Field(default_factory=RunConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    debug: DebugConfig = Field(default_factory=DebugConfig)

    @model_validator(mode="before")
    @classmethod
    def _drop_removed_keys(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict) or (info.context or {}).get("user_config"):
            return data
        out = dict(data)
        for section, keys in _REMOVED_KEYS.items():
            if isinstance(out.get(section), dict):
                out[section] = {k: v for k, v in out[section].items() if k not in keys}
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def save_resolved(self, path_or_url: str) -> None:
        """Write the resolved tree (a local path or fsspec URL, e.g. the run folder on s3)."""
        fs, path = fsspec.core.url_to_fs(path_or_url)
        parent = fs._parent(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(path, "w") as f:
            f.write(self.to_yaml())


# ---------------------------------------------------------------------------------------
# loading


def available_presets() -> list[str]:
    root = importlib.resources.files("trainer") / "configs"
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def _looks_like_path(s: str) -> bool:
    return "/" in s or "\\" in s or s.endswith((".yaml", ".yml")) or "://" in s


def _read_yaml(preset_or_path: str) -> tuple[dict[str, Any], str]:
    """The mapping and a short description of where it came from."""
    if _looks_like_path(preset_or_path):
        where = f"file {preset_or_path!r}"
        try:
            with fsspec.open(preset_or_path, "r") as f:
                text = f.read()
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {preset_or_path!r}") from None
    else:
        where = f"preset {preset_or_path!r}"
        res = importlib.resources.files("trainer") / "configs" / f"{preset_or_path}.yaml"
        if not res.is_file():
            raise ConfigError(
                f"unknown config preset {preset_or_path!r} (presets: {', '.join(available_presets())}; "
                "or give a path to a .yaml file)"
            )
        text = res.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must hold a mapping of config sections, got {type(data).__name__}")
    return data, where


def _apply_override(tree: dict[str, Any], override: str, sources: dict[str, str]) -> None:
    key, sep, raw = override.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not key or any(not p for p in parts):
        raise ConfigError(f"bad override {override!r}: expected dotted.key=value, e.g. train.epochs=3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. an unbalanced bracket): the validator reports the type
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"bad override {override!r}: {'.'.join(parts[: i + 1])!r} is not a section")
        node = child
    node[parts[-1]] = value
    sources[key] = f"override {override!r}"


_EXPECTED = {
    "int_parsing": "int",
    "int_type": "int",
    "int_from_float": "int",
    "float_parsing": "float",
    "float_type": "float",
    "bool_parsing": "bool",
    "bool_type": "bool",
    "finite_number": "a finite number",
    "string_type": "str",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _section_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _describe(err: dict[str, Any], sources: dict[str, str], default_where: str) -> str:
    loc = tuple(str(p) for p in err["loc"])
    key = ".".join(loc)
    # the override that set this key, a parent section of it, or (unknown key) a child of it
    where = next((src for k, src in sources.items() if k == key or k.startswith(key + ".") or key.startswith(k + ".")),
                 default_where)
    if err["type"] == "extra_forbidden":
        section = _section_model(loc[:-1])
        valid = ", ".join(section.model_fields) if section else "?"
        parent = f"in {'.'.join(loc[:-1])!r}" if len(loc) > 1 else "sections"
        return f"unknown config key {key!r} (valid {parent}: {valid}) [{where}]"
    got = err.get("input")
    if err["type"] == "literal_error":
        expected = f"one of {err['ctx']['expected']}"
    else:
        expected = _EXPECTED.get(err["type"])
    if expected:
        return f"config key {key!r}: expected {expected}, got {got!r} [{where}]"
    return f"config key {key!r}: {err['msg']}, got {got!r} [{where}]"


def load_config(preset_or_path: str = "synthetic-cpu", overrides: list[str] | None = None) -> Config:
    """Preset name or YAML path/URL, then ``key=value`` overrides, validated.

    Raises ``ConfigError`` naming the first bad key (and how many more there are).
    """
    tree, where = _read_yaml(preset_or_path)
    sources: dict[str, str] = {}
    for override in overrides or []:
        _apply_override(tree, override, sources)
    try:
        return Config.model_validate(tree, context={"user_config": True})
    except ValidationError as e:
        errors = e.errors(include_url=False)
        first = _describe(errors[0], sources, where)
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ConfigError(first + more) from None
