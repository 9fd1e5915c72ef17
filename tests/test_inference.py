"""Evaluation and prediction of a checkpoint: the device choice, the uint8 batches normalised on
the device, the loader's worker count, against a plain fp32 reference computed here.

The checkpoint is an untrained small-cnn written by hand (`write_weights_checkpoint`): what is
tested is that eval and predict score exactly what the model says, not that it is good.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from data_shards.decode import decode_image, to_tensor
from data_shards.storage import read_manifest
from data_shards.stream import ShardStream
from trainer.checkpoint import write_weights_checkpoint
from trainer.cli import main
from trainer.config import load_config
from trainer.inference import default_workers, evaluate_checkpoint, load_checkpoint, predict, resolve_device
from trainer.metrics import PartialAPAccumulator
from trainer.models import build_model

HAS_CUDA = torch.cuda.is_available()
SIZE = 32


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    from data_shards.sources.synthetic import build_synthetic

    root = str(tmp_path_factory.mktemp("data") / "syn")
    build_synthetic(root, train=16, val=40, image_size=SIZE, shard_samples=16, seed=3, progress=False)
    return root


@pytest.fixture(scope="module")
def checkpoint(data_root, tmp_path_factory) -> str:
    cfg = load_config("synthetic-cpu", [f"data.image_size={SIZE}"])
    classes = read_manifest(data_root).classes
    torch.manual_seed(0)
    model = build_model(cfg.model, len(classes))
    return write_weights_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "checkpoint_00000007"), model.state_dict(),
                                    cfg.model_dump(mode="json"), classes, step=7)


def _reference_map(checkpoint: str, data_root: str) -> dict[str, float]:
    """fp32 on the host, float batches from the stream, no prefetcher: the plain way."""
    lm = load_checkpoint(checkpoint)
    acc = PartialAPAccumulator(len(lm.classes))
    stream = ShardStream(data_root, "val", batch_size=8, image_size=SIZE, shuffle=False, train_transform=False)
    with torch.no_grad():
        for batch in stream:
            acc.update(lm.model(batch["image"]).sigmoid(), batch["target"])
    res = acc.compute()
    return {"map_c": float(res["map_c"]), "map_o": float(res["map_o"])}


@pytest.mark.parametrize("workers", [0, 2])
def test_eval_on_cpu_scores_what_the_model_says(checkpoint, data_root, workers: int) -> None:
    res = evaluate_checkpoint(checkpoint, data_root, device="cpu", workers=workers, batch_size=8)
    ref = _reference_map(checkpoint, data_root)
    assert res["device"] == "cpu" and res["workers"] == workers
    assert res["samples"] == 40 and res["step"] == 7 and res["num_valid"] > 0
    assert res["map_c"] == pytest.approx(ref["map_c"], abs=1e-6)
    assert res["map_o"] == pytest.approx(ref["map_o"], abs=1e-6)
    assert res["images_per_s"] > 0


def test_default_workers_follow_the_cpus_and_the_device() -> None:
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert [default_workers(cuda, n) for n in (1, 2, 16, 96)] == [1, 1, 15, 95]
    assert [default_workers(cpu, n) for n in (1, 2, 16, 96)] == [1, 1, 4, 24]


def test_eval_workers_default_is_capped_by_the_batches(checkpoint, data_root, monkeypatch) -> None:
    import trainer.inference as inference

    monkeypatch.setattr(inference, "default_workers", lambda device: 64)
    res = evaluate_checkpoint(checkpoint, data_root, device="cpu", batch_size=20)
    assert res["workers"] == 2  # 40 samples in batches of 20: batch i goes to worker i % n, 62 would idle


def test_device_resolution() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if HAS_CUDA else "cpu")
    with pytest.raises(ValueError, match="device 'tpu'"):
        resolve_device("tpu")


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a CUDA device: there is nothing to refuse")
@pytest.mark.parametrize("command", ["eval", "predict"])
def test_device_cuda_without_a_gpu_exits_2_with_one_line(checkpoint, data_root, tmp_path, command: str, capsys) -> None:
    args = ["--data", data_root] if command == "eval" else [str(tmp_path / "any.png")]
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--checkpoint", checkpoint, *args, "--device", "cuda"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA device" in err and "Traceback" not in err


def _images(data_root: str, tmp_path, n: int) -> list[str]:
    """PNG files of `n` val images at another size than the model's (predict resizes)."""
    stream = ShardStream(data_root, "val", batch_size=n, image_size=SIZE * 2, shuffle=False, train_transform=False,
                         output="uint8")
    batch = next(iter(stream))
    paths = []
    for i, arr in enumerate(batch["image"].numpy()):
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray(arr).save(paths[-1])
    return paths


def test_predict_on_cpu_in_batches_keeps_the_order(checkpoint, data_root, tmp_path) -> None:
    paths = _images(data_root, tmp_path, 5)
    lm = load_checkpoint(checkpoint)
    res = predict(lm, paths, top_k=3, device="cpu", workers=2, batch_size=2)
    assert [r["image"] for r in res] == paths
    with torch.no_grad():
        x = to_tensor(np.stack([decode_image(open(p, "rb").read(), SIZE) for p in paths]))
        scores, idx = lm.model(x).sigmoid().topk(3, dim=1)
    for r, s_row, i_row in zip(res, scores.tolist(), idx.tolist()):
        assert [t["class_id"] for t in r["top"]] == [lm.classes[i].id for i in i_row]
        assert [t["score"] for t in r["top"]] == pytest.approx(s_row, abs=1e-4)


def test_predict_cli_json_on_cpu(checkpoint, data_root, tmp_path, capsys) -> None:
    import json

    paths = _images(data_root, tmp_path, 2)
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--checkpoint", checkpoint, *paths, "--device", "cpu", "--top-k", "2", "--json"])
    assert exit_info.value.code == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in out] == paths and all(len(r["top"]) == 2 for r in out)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device on this machine")
def test_eval_and_predict_on_cuda_match_the_cpu(checkpoint, data_root, tmp_path) -> None:
    gpu = evaluate_checkpoint(checkpoint, data_root, device="cuda", workers=2, batch_size=8)
    cpu = evaluate_checkpoint(checkpoint, data_root, device="cpu", workers=2, batch_size=8)
    assert gpu["device"] == "cuda" and gpu["samples"] == cpu["samples"]
    assert gpu["map_c"] == pytest.approx(cpu["map_c"], abs=2.0)  # bf16 autocast reorders close scores
    paths = _images(data_root, tmp_path, 3)
    on_gpu = predict(load_checkpoint(checkpoint), paths, top_k=3, device="cuda")
    on_cpu = predict(load_checkpoint(checkpoint), paths, top_k=3, device="cpu")
    for g, c in zip(on_gpu, on_cpu):
        assert [t["score"] for t in g["top"]] == pytest.approx([t["score"] for t in c["top"]], abs=0.02)
