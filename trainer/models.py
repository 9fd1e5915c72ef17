"""Image backbones and multi-label heads, as plain ``nn.Module``s.

Design notes:

- Nothing here knows about Ray or DeepSpeed: ``trainer/engine.py`` wraps whatever
  ``build_model`` returns. Models map images ``[B, 3, H, W]`` (float, already normalised
  by the data pipeline) to logits ``[B, C]``; the loss applies the sigmoid.
- The registry is a plain dict of builders. ``small-cnn`` is the CPU default: a ResNet-18
  style network cut to one basic block per stage (about 1.2M parameters) so that a demo
  trains in minutes on two cores. ``resnet50`` is torchvision's (``weights=None``) with our
  head as its ``fc``: its state-dict names (``conv1``, ``layer4.2.bn3.running_var``) are
  the ones ImageNet files in torchvision naming carry, so they load unchanged. It replaced a
  hand-written copy kept only while torchvision had no build for our torch: now that it is a
  dependency, a second ResNet-50 to maintain served nobody. ``timm:<name>`` builds any timm
  body (``timm:tresnet_m``, the paper's) with our head.
- torchvision and timm are dependencies but imported only when a model needs them: importing
  timm costs seconds, and small-cnn, the CLI and Ray workers that never build one skip it.
- Every model names its head ``fc``: a ``Linear`` or, as the reference does for
  OpenImages, a bottleneck ``Linear -> ReLU -> Linear``. Pretrained files therefore load
  with ``strict=False``: the backbone matches, the head (sized for another class count) is
  dropped because its shapes differ, and what was missing or unexpected is reported.
- Weights are read with ``torch.load(weights_only=True)`` or safetensors, from a local path
  or an fsspec URL: a file we were given, never a model hub download at run time.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass, field

import fsspec
import torch
from torch import nn

from trainer.config import ModelConfig

__all__ = [
    "MODELS",
    "channels_last_activations",
    "PretrainedReport",
    "SmallCNN",
    "TimmClassifier",
    "build_model",
    "channels_last",
    "load_pretrained",
    "make_head",
    "param_groups",
    "read_weights",
]

log = logging.getLogger(__name__)


def make_head(kind: str, in_features: int, num_classes: int, bottleneck_dim: int = 2048) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_features, num_classes)
    if kind == "bottleneck":
        return nn.Sequential(
            nn.Linear(in_features, bottleneck_dim), nn.ReLU(inplace=True), nn.Linear(bottleneck_dim, num_classes)
        )
    raise ValueError(f"unknown model.head {kind!r} (expected 'linear' or 'bottleneck')")


# ---------------------------------------------------------------------------------------
# small-cnn


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        # Zero-init the last BN so each block starts as identity: faster, steadier start from scratch.
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class SmallCNN(nn.Module):
    """Stem conv (stride 2) then four one-block stages; widths 32/64/128/256."""

    def __init__(self, num_classes: int, head: str = "linear", bottleneck_dim: int = 256,
                 widths: tuple[int, ...] = (32, 64, 128, 256)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            # Stage 1 keeps the stem's resolution (ResNet layout): 64 px ends at 4x4. Striding it
            # too is faster but leaves a 2x2 map, too coarse for several objects per image.
            layers.append(_BasicBlock(cin, w, stride=1 if i == 0 else 2))
            cin = w
        self.layers = nn.Sequential(*layers)
        self.num_features = cin
        self.fc = make_head(head, cin, num_classes, bottleneck_dim)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x))


# ---------------------------------------------------------------------------------------
# resnet50: torchvision's, with our head


def _build_resnet50(cfg: ModelConfig, num_classes: int) -> nn.Module:
    from torchvision.models import resnet50  # noqa: PLC0415  (heavy: imported only for this model)

    # zero_init_residual: each block starts as identity, as small-cnn's do (steadier from scratch).
    model = resnet50(weights=None, zero_init_residual=True)
    model.fc = make_head(cfg.head, model.fc.in_features, num_classes, cfg.bottleneck_dim)
    return model


# ---------------------------------------------------------------------------------------
# timm


class TimmClassifier(nn.Module):
    """A timm body without its classifier (``num_classes=0``) plus our head."""

    # Pretrained timm checkpoints name the body's keys without our `body.` prefix.
    backbone_prefix = "body."

    def __init__(self, body: nn.Module, num_classes: int, head: str, bottleneck_dim: int) -> None:
        super().__init__()
        self.body = body
        self.num_features = int(body.num_features)
        self.fc = make_head(head, self.num_features, num_classes, bottleneck_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def _build_timm(name: str, cfg: ModelConfig, num_classes: int) -> nn.Module:
    import timm  # noqa: PLC0415  (heavy: imported only for timm models)

    try:
        body = timm.create_model(name, pretrained=False, num_classes=0)
    except RuntimeError as e:  # timm's "Unknown model"
        raise ValueError(f"model.name {cfg.name!r}: {e}") from None
    return TimmClassifier(body, num_classes, cfg.head, cfg.bottleneck_dim)


MODELS: dict[str, Callable[[ModelConfig, int], nn.Module]] = {
    "small-cnn": lambda cfg, c: SmallCNN(c, cfg.head, cfg.bottleneck_dim),
    "resnet50": _build_resnet50,
}


def channels_last(model: nn.Module) -> nn.Module:
    """The model with NHWC weights, in place; its inputs may stay NCHW (the first convolution
    converts them).

    cuDNN's convolutions under bf16 on GPU (and oneDNN's on CPU) run faster in NHWC. Where it
    may be applied to a model DeepSpeed holds is `Engine`'s decision. State dicts of such a
    model must be made contiguous before `safetensors` saves them.
    """
    return model.to(memory_format=torch.channels_last)


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """The model named by ``cfg.name`` with a head for ``num_classes``, pretrained if asked."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if cfg.name.startswith("timm:"):
        model = _build_timm(cfg.name.removeprefix("timm:"), cfg, num_classes)
    elif cfg.name in MODELS:
        model = MODELS[cfg.name](cfg, num_classes)
    else:
        raise ValueError(f"unknown model.name {cfg.name!r} (known: {', '.join(MODELS)}, or timm:<name>)")
    if cfg.pretrained:
        report = load_pretrained(model, cfg.pretrained)
        log.info("loaded %s: %s", cfg.pretrained, report.summary())
    return model


# ---------------------------------------------------------------------------------------
# pretrained weights


@dataclass
class PretrainedReport:
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)      # in the model, not in the file
    unexpected: list[str] = field(default_factory=list)   # in the file, not in the model
    shape_mismatch: list[str] = field(default_factory=list)  # dropped (e.g. a head for another class count)

    def summary(self) -> str:
        def names(keys: list[str]) -> str:
            return ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")

        parts = [f"{len(self.loaded)} tensors loaded"]
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("dropped for shape", self.shape_mismatch)):
            if keys:
                parts.append(f"{len(keys)} {label} ({names(keys)})")
        return "; ".join(parts)


def read_weights(path_or_url: str) -> dict[str, torch.Tensor]:
    """A flat state dict from ``.safetensors`` or ``.pt``/``.pth`` (local or fsspec URL)."""
    if path_or_url.startswith("hf://"):
        raise ValueError(f"model.pretrained {path_or_url!r}: hub downloads are not allowed; give a file or URL")
    try:
        with fsspec.open(path_or_url, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ValueError(f"model.pretrained {path_or_url!r}: file not found") from None
    if path_or_url.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors  # noqa: PLC0415

        state = load_safetensors(data)
    elif path_or_url.endswith((".pt", ".pth", ".bin", ".ckpt")):
        state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    else:
        raise ValueError(f"model.pretrained {path_or_url!r}: expected a .safetensors, .pt or .pth file")
    # Common wrappers: {"state_dict": ...} (Lightning), {"model": ...} (the reference, timm train).
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"model.pretrained {path_or_url!r}: holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def load_pretrained(model: nn.Module, path_or_url: str) -> PretrainedReport:
    """Load matching tensors into ``model`` (non-strict) and say what did not match."""
    state = read_weights(path_or_url)
    prefix = getattr(model, "backbone_prefix", "")
    own = model.state_dict()
    # A timm file names the body's keys without our prefix; whether it has it is decided by
    # which naming matches more keys, not by the prefix's presence: TResNet's own keys start
    # with `body.` too (its trunk is named `body`).
    if prefix and sum(prefix + k in own for k in state) > sum(k in own for k in state):
        state = {prefix + k: v for k, v in state.items()}
    report = PretrainedReport()
    usable = {}
    for k, v in state.items():
        if k not in own:
            report.unexpected.append(k)
        elif own[k].shape != v.shape:
            report.shape_mismatch.append(k)
        else:
            usable[k] = v
    result = model.load_state_dict(usable, strict=False)
    report.loaded = sorted(usable)
    report.missing = sorted(result.missing_keys)
    if not usable:
        raise ValueError(f"model.pretrained {path_or_url!r}: no tensor matches the model ({report.summary()})")
    return report


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights only: biases and norm scales (ndim <= 1) are not decayed.

    Decaying BN scales pulls them towards zero and fights the normalisation; the reference
    does the same split (`add_weight_decay`). Empty groups are left out because DeepSpeed's
    ZeRO optimizers do not accept them.
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _nhwc_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    x = args[0] if args else None
    if isinstance(x, torch.Tensor) and x.dim() == 4 and not x.is_contiguous(memory_format=torch.channels_last):
        return (x.contiguous(memory_format=torch.channels_last), *args[1:])
    return None  # already NHWC: the usual case after the first convolution


def channels_last_activations(model: nn.Module) -> nn.Module:
    """Every ``Conv2d`` of ``model`` takes its input NHWC (channels_last); weights stay as they are.

    Convolutions (oneDNN, cuDNN) run NHWC when input or weight is channels_last, and their
    output keeps it through norms and activations, so the pre-hook converts at the stem or
    after a block that reshapes into a fresh NCHW tensor (TResNet's space-to-depth). Each
    convolution reorders its weight (and gradient): small next to the activations. In place.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_pre_hook(_nhwc_input)
    return model
