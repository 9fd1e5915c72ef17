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
- Loss parameters are typed but optional: ``None`` means "not set, use the loss's own
  default", so one tree serves every loss of the zoo; ``loss.params()`` hands only the set
  ones to ``trainer.losses.build_loss``, which rejects parameters its loss does not take.
"""

from __future__ import annotations

import importlib.resources
from typing import Any, Literal

import fsspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "CheckpointConfig",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DeepSpeedConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "PriorConfig",
    "RunConfig",
    "TrainConfig",
    "available_presets",
    "load_config",
]


class ConfigError(ValueError):
    """A bad preset name, config file, key or value; the message names the key."""


class _Section(BaseModel):
    # coerce_numbers_to_str: `run.name=2024` parses as an int in YAML but is clearly a name.
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, validate_assignment=True)


class DataConfig(_Section):
    root: str = "runs/data/synthetic"
    batch_size: int = Field(32, ge=1, description="samples per worker per micro-step")
    image_size: int = Field(64, ge=8)
    workers: int = Field(2, ge=0, description="DataLoader worker processes per training worker")
    shuffle_buffer: int = Field(1000, ge=0, description="samples held for streaming shuffle")
    corrupt: Literal["skip", "fail"] = "skip"
    train_split: str = "train"
    val_split: str = "val"


class ModelConfig(_Section):
    name: str = "small-cnn"
    pretrained: str | None = Field(None, description="local path or fsspec URL of .safetensors/.pt weights")
    head: Literal["linear", "bottleneck"] = "linear"
    bottleneck_dim: int = Field(2048, ge=1)
    channels_last: bool = Field(True, description="NHWC weights and activations (faster convolutions on CPU and GPU)")


class LossConfig(_Section):
    name: str = "csl"
    gamma_pos: float | None = None
    gamma_neg: float | None = None
    gamma_unann: float | None = None
    clip: float | None = None
    likelihood_topk: int | None = None
    prior_threshold: float | None = None
    topk_scope: str | None = None
    prior_alpha: float | None = None
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
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0, description="applied to weights only, not biases and norms")
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd only")
    schedule: Literal["onecycle", "constant"] = "onecycle"
    pct_start: float = Field(0.2, gt=0, lt=1)
    grad_clip: float = Field(0.0, ge=0, description="max global grad norm; 0 turns clipping off")


class TrainConfig(_Section):
    epochs: int = Field(3, ge=1)
    seed: int = 0
    ema_decay: float = Field(0.99, ge=0, lt=1, description="0 turns the EMA model off")
    ema_warmup_steps: int = Field(0, ge=0, description="decay * (1 - exp(-step / this)); 0: constant decay")
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps (smoke runs)")
    log_every: int = Field(10, ge=1)
    grad_accum: int = Field(1, ge=1)


class CheckpointConfig(_Section):
    every_steps: int = Field(50, ge=0, description="0: only at the end of each epoch")
    keep: int = Field(2, ge=1)


class RunConfig(_Section):
    name: str = "synthetic-cpu"
    storage: str = Field("runs", description="a folder or an fsspec URL such as s3://bucket/prefix")


class ClusterConfig(_Section):
    workers: int = Field(2, ge=1)
    gpus_per_worker: float = Field(0.0, ge=0)
    cpus_per_worker: float = Field(1.0, gt=0)
    max_failures: int = Field(1, ge=-1, description="-1: retry forever (Ray's convention)")
    tune_malloc: bool = Field(True, description="glibc workers keep freed memory for reuse (see loop.tune_malloc)")
    shm_allreduce: bool = Field(True, description="CPU ranks on one machine average gradients through /dev/shm "
                                "(ZeRO-0 fp32; see trainer/shm_allreduce.py)")


class DeepSpeedConfig(_Section):
    zero_stage: int = Field(0, ge=0, le=3)


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
        return Config.model_validate(tree)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        first = _describe(errors[0], sources, where)
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ConfigError(first + more) from None
