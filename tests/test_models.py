"""Models: shapes, torchvision's resnet50 with our head, pretrained loading, decay groups.

The paper's backbones (timm TResNet-M, timm ResNet-50) with the OpenImages head are built,
loaded from a local file, stepped by DeepSpeed and exported in `test_timm_backbones.py`.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from trainer.config import ModelConfig
from trainer.models import build_model, load_pretrained, param_groups, read_weights


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


def test_resnet50_is_torchvisions_with_our_head() -> None:
    from torchvision.models import resnet50

    sd = build_model(ModelConfig(name="resnet50"), 1000).state_dict()
    reference = resnet50(weights=None).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {k: tuple(v.shape) for k, v in reference.items()}
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


def test_torchvision_and_timm_are_imported_only_by_the_models_that_need_them() -> None:
    # A fresh interpreter: this test session has imported both already.
    code = ("import sys; from trainer.config import ModelConfig; from trainer.models import build_model; "
            "seen = lambda: [m for m in ('torchvision', 'timm') if m in sys.modules]; "
            "build_model(ModelConfig(name='small-cnn'), 3); print(seen()); "
            "build_model(ModelConfig(name='resnet50'), 3); print(seen())")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert out.split("\n")[:2] == ["[]", "['torchvision']"]


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


def test_unknown_models() -> None:
    with pytest.raises(ValueError, match="unknown model.name 'vgg'"):
        build_model(ModelConfig(name="vgg"), 3)
    with pytest.raises(ValueError, match="model.name 'timm:no_such_net'.*Unknown model"):
        build_model(ModelConfig(name="timm:no_such_net"), 3)


def test_timm_body_from_a_pt_file_in_timm_naming(tmp_path) -> None:
    model = build_model(ModelConfig(name="timm:resnet18", head="bottleneck", bottleneck_dim=16), 4)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
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


# -- the paper's backbones, end to end -------------------------------------------------
# 9,600 classes with the OpenImages bottleneck head, as the presets build them, at 32 px and
# batch 2: what is tested is the wiring (weights file, DeepSpeed, export), not accuracy. Most
# of the cost on CPU is oneDNN compiling kernels at each layout's first pass, so every model
# here runs in the layout the engine chose, and a plain fp32 forward/backward is not repeated
# outside DeepSpeed.

OPENIMAGES_CLASSES = 9600


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")  # DeepSpeed on gloo
@pytest.mark.parametrize("name,classifier,precision,stage", [
    ("timm:tresnet_m", "head.fc", "fp32", 0),
    ("timm:resnet50", "fc", "bf16", 1),  # the GPU presets' precision and ZeRO stage
])
def test_paper_backbone_loads_trains_a_deepspeed_step_and_exports(
    tmp_path, caplog, name: str, classifier: str, precision: str, stage: int
) -> None:
    import logging

    import timm
    import torch.nn.functional as F
    from safetensors.torch import load_file

    from data_shards.format import ClassInfo
    from trainer.checkpoint import write_weights_checkpoint
    from trainer.config import load_config
    from trainer.engine import setup_engine
    from trainer.inference import export_checkpoint, load_checkpoint

    # An "ImageNet" file as timm writes one: timm naming, its own 1000-class classifier.
    torch.manual_seed(0)
    imagenet = {k: v.contiguous() for k, v in timm.create_model(name[5:], num_classes=1000).state_dict().items()}
    weights = str(tmp_path / "imagenet.safetensors")
    save_file(imagenet, weights)

    cfg = load_config("openimages-v6-resnet50", [
        f"model.name={name}", f"model.pretrained={weights}", "data.batch_size=2", "data.image_size=32",
        f"train.precision={precision}", f"deepspeed.zero_stage={stage}", "train.ema_decay=0",
    ])
    assert cfg.model.head == "bottleneck" and cfg.model.bottleneck_dim == 2048
    torch.manual_seed(1)
    caplog.set_level(logging.INFO, logger="trainer.models")
    model = build_model(cfg.model, OPENIMAGES_CLASSES)
    body = [k for k in imagenet if not k.startswith(classifier + ".")]
    mine = model.state_dict()
    assert all(torch.equal(mine["body." + k], imagenet[k]) for k in body)
    loaded = caplog.records[-1].getMessage()
    assert f"{len(body)} tensors loaded; 4 missing (fc.0.bias, fc.0.weight, fc.2.bias, fc.2.weight); 2 unexpected" in loaded
    assert f"body.{classifier}.weight" in loaded and f"body.{classifier}.bias" in loaded

    # one DeepSpeed step on a one-rank gloo group: forward, backward into every parameter, step
    stem = next(k for k, v in mine.items() if k.startswith("body.") and v.ndim == 4)  # the first convolution
    before = {k: mine[k].clone() for k in (stem, "fc.0.weight", "fc.2.weight")}
    engine = setup_engine(model, cfg, world_size=1, total_steps=1)
    assert engine.zero_stage == stage
    x = torch.randn(2, 3, 32, 32)
    y = (torch.rand(2, OPENIMAGES_CLASSES) < 0.01).float()
    logits = engine.forward(x)
    assert logits.shape == (2, OPENIMAGES_CLASSES) and logits.dtype == torch.float32
    engine.backward(F.binary_cross_entropy_with_logits(logits, y))
    if stage == 0 and precision == "fp32":  # elsewhere DeepSpeed moves gradients into its own buffers
        assert all(p.grad is not None for p in engine.module.parameters())
    assert engine.step() and engine.global_step == 1
    after = engine.consolidated_state_dict()
    for key, value in before.items():
        assert not torch.equal(after[key], value), key

    # reload (and, once, export): what was trained is what a reader gets, and the model rebuilt
    # from it scores as the trained one does
    classes = [ClassInfo(id=f"/m/{i:05d}", name=f"class {i}") for i in range(OPENIMAGES_CLASSES)]
    ckpt = write_weights_checkpoint(str(tmp_path / "ckpt"), after, cfg.model_dump(mode="json"), classes, step=1)
    reloaded = load_checkpoint(ckpt)
    state = reloaded.model.state_dict()
    # the engine's dict may add non-persistent buffers (TResNet's blur filters): constants, not weights
    assert state.keys() <= after.keys() and all(torch.equal(state[k], after[k]) for k in state)
    if precision == "bf16":  # the export path, where a bf16 run makes its fp32 conversion matter
        out = str(tmp_path / "model.safetensors")
        export_checkpoint(ckpt, out)
        exported = load_file(out)
        assert exported.keys() == state.keys() and all(torch.equal(exported[k], after[k]) for k in exported)
        assert all(v.dtype == torch.float32 for v in exported.values() if v.is_floating_point())
    engine.eval()
    with torch.no_grad():
        # bf16: the engine computes in bf16, the reload in fp32; logits are ~0.05 here and differ
        # by ~1e-3, another initialisation's by ~0.1
        tol = 1e-4 if precision == "fp32" else 1e-2
        torch.testing.assert_close(reloaded.model(x), engine.forward(x), rtol=0, atol=tol)
