"""Models: shapes, torchvision-compatible resnet50 names, pretrained loading, decay groups."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from safetensors.torch import save_file

from trainer.config import ModelConfig
from trainer.models import build_model, load_pretrained, param_groups, read_weights

HAS_TIMM = importlib.util.find_spec("timm") is not None


@pytest.mark.parametrize("head", ["linear", "bottleneck"])
@pytest.mark.parametrize("name,px", [("small-cnn", 64), ("small-cnn", 32), ("resnet50", 64)])
def test_forward_shapes(name: str, px: int, head: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name, head=head, bottleneck_dim=16), num_classes=7)
    out = model(torch.randn(2, 3, px, px))
    assert out.shape == (2, 7) and out.dtype == torch.float32
    out.sum().backward()  # every parameter takes part
    assert all(p.grad is not None for p in model.parameters())


def test_small_cnn_is_small() -> None:
    n = sum(p.numel() for p in build_model(ModelConfig(name="small-cnn"), 20).parameters())
    assert 300_000 < n < 2_000_000


def test_resnet50_uses_torchvision_names() -> None:
    sd = build_model(ModelConfig(name="resnet50"), 1000).state_dict()
    # torchvision's resnet50: 161 parameters + 53 BatchNorms x 3 buffers = 320 entries.
    assert len(sd) == 320
    assert sum(v.numel() for k, v in sd.items() if "running" not in k and "num_batches" not in k) == 25_557_032
    for key, shape in {
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_mean": (64,),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.0.downsample.1.num_batches_tracked": (),
        "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer3.5.bn2.weight": (256,),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "layer4.2.bn3.running_var": (2048,),
        "fc.weight": (1000, 2048),
        "fc.bias": (1000,),
    }.items():
        assert tuple(sd[key].shape) == shape, key
    assert "layer4.3.conv1.weight" not in sd and "layer3.6.conv1.weight" not in sd


def test_models_never_import_torchvision_or_timm() -> None:
    build_model(ModelConfig(name="small-cnn"), 3)
    build_model(ModelConfig(name="resnet50"), 3)
    assert "torchvision" not in sys.modules
    assert "timm" not in sys.modules


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_backbone_loads_and_head_is_dropped(tmp_path, suffix: str) -> None:
    torch.manual_seed(1)
    source = build_model(ModelConfig(name="resnet50"), 1000)  # an "ImageNet" checkpoint
    path = str(tmp_path / f"weights{suffix}")
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    if suffix == ".pth":
        torch.save({"model": state}, path)  # wrapped as the reference saves them
    else:
        save_file(state, path)
    torch.manual_seed(2)
    model = build_model(ModelConfig(name="resnet50", pretrained=path), 7)
    mine = model.state_dict()
    assert torch.equal(mine["layer4.2.conv3.weight"], state["layer4.2.conv3.weight"])
    assert torch.equal(mine["bn1.running_var"], state["bn1.running_var"])
    assert mine["fc.weight"].shape == (7, 2048)

    report = load_pretrained(build_model(ModelConfig(name="resnet50"), 7), path)
    assert sorted(report.shape_mismatch) == ["fc.bias", "fc.weight"]
    assert report.missing == ["fc.bias", "fc.weight"]
    assert report.unexpected == []
    assert len(report.loaded) == 318


def test_pretrained_into_bottleneck_head_reports_unexpected(tmp_path) -> None:
    path = str(tmp_path / "small.pt")
    torch.save(build_model(ModelConfig(name="small-cnn"), 5).state_dict(), path)
    report = load_pretrained(build_model(ModelConfig(name="small-cnn", head="bottleneck", bottleneck_dim=8), 5), path)
    assert sorted(report.unexpected) == ["fc.bias", "fc.weight"]
    assert "fc.0.weight" in report.missing and "fc.2.weight" in report.missing
    assert "2 unexpected (fc." in report.summary()


def test_pretrained_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="not found"):
        read_weights(str(tmp_path / "missing.pt"))
    bad = tmp_path / "weights.npz"
    bad.write_bytes(b"x")
    with pytest.raises(ValueError, match="expected a .safetensors"):
        read_weights(str(bad))
    other = tmp_path / "other.pt"
    torch.save({"unrelated.weight": torch.zeros(3)}, str(other))
    with pytest.raises(ValueError, match="no tensor matches"):
        load_pretrained(build_model(ModelConfig(name="small-cnn"), 5), str(other))
    with pytest.raises(ValueError, match="hub downloads"):
        read_weights("hf://timm/resnet50.a1_in1k")


def test_weights_only_refuses_pickled_objects(tmp_path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "obj": object()}, str(path))
    with pytest.raises(Exception, match="(?i)weights.only|unsupported"):
        read_weights(str(path))


def test_unknown_model_and_timm_without_timm() -> None:
    with pytest.raises(ValueError, match="unknown model.name 'vgg'"):
        build_model(ModelConfig(name="vgg"), 3)
    if not HAS_TIMM:
        with pytest.raises(ValueError, match="`gpu` extra"):
            build_model(ModelConfig(name="timm:resnet18"), 3)


@pytest.mark.skipif(not HAS_TIMM, reason="timm is not installed (it is in the `gpu` extra, GPU image only)")
def test_timm_backbone_with_our_head(tmp_path) -> None:
    model = build_model(ModelConfig(name="timm:resnet18", head="bottleneck", bottleneck_dim=16), 4)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 4)
    path = str(tmp_path / "body.pt")
    torch.save(model.body.state_dict(), path)  # timm naming, no `body.` prefix
    report = load_pretrained(build_model(ModelConfig(name="timm:resnet18"), 4), path)
    assert report.unexpected == [] and report.missing == ["fc.bias", "fc.weight"]


def test_param_groups_split_decay() -> None:
    model = build_model(ModelConfig(name="small-cnn", head="bottleneck", bottleneck_dim=8), 3)
    groups = param_groups(model, 1e-4)
    decay, no_decay = groups
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    ids = {id(p) for p in no_decay["params"]}
    assert id(model.bn1.weight) in ids and id(model.fc[0].bias) in ids and id(model.conv1.weight) not in ids


def test_param_groups_skip_frozen_and_empty() -> None:
    model = torch.nn.Linear(3, 2, bias=False)
    assert [len(g["params"]) for g in param_groups(model, 0.1)] == [1]
    model.weight.requires_grad_(False)
    assert param_groups(model, 0.1) == []


def test_pretrained_from_an_fsspec_url(s3_bucket: str, tmp_path) -> None:
    import fsspec

    torch.manual_seed(3)
    source = build_model(ModelConfig(name="small-cnn"), 4)
    local = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(local))  # channels_last weights
    url = f"{s3_bucket}/weights/w.safetensors"
    with fsspec.open(url, "wb") as f:
        f.write(local.read_bytes())
    model = build_model(ModelConfig(name="small-cnn", pretrained=url), 4)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in model.state_dict().items())


def test_channels_last_changes_the_layout_not_the_function() -> None:
    import copy

    from trainer.models import channels_last

    torch.manual_seed(4)
    nchw = build_model(ModelConfig(name="small-cnn"), 5).eval()
    nhwc = channels_last(copy.deepcopy(nchw))
    assert nhwc.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not nchw.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(nhwc(x), nchw(x), rtol=1e-4, atol=1e-5)
