"""Label priors: the CSV formats, the online RunningPrior, the driver's reduction, the per-shard
records, and the Ray prior pass against a single-process reference (paper 1 eq. 10: the mean
sigmoid output), killed and rerun, with a shard that never reads, and with stale records.

The integration tests build a checkpoint folder by hand (untrained small-cnn, fixed seed, in
the layout loop.py writes): the pass's arithmetic does not care whether the weights are good.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from data_shards.format import ClassInfo, Manifest, Record, ShardInfo
from data_shards.storage import read_manifest
from trainer.checkpoint import write_weights_checkpoint as write_checkpoint
from trainer.prior_pass import PriorReduction, actor_plan, output_paths
from trainer.prior_scoring import score_shards
from trainer.prior_records import (ShardRecord, decode_record, encode_record, file_stamp, identity_digest, iter_records,
                                   open_records, pass_identity, record_url, records_dir, remove_records)
from trainer.priors import RunningPrior, read_priors, write_priors

CSL = str(Path(sys.executable).with_name("csl"))


def _manifest(names: list[str]) -> Manifest:
    return Manifest(classes=[ClassInfo(id=f"/m/{i}", name=n) for i, n in enumerate(names)], splits={})


# ---------------------------------------------------------------------------------------
# CSV formats


def test_priors_csv_round_trip_and_reference_format(tmp_path):
    m = _manifest(["Person", "White", "Daytime"])
    write_priors(str(tmp_path / "p.csv"), m, [0.5, 0.25, 0.125])
    np.testing.assert_array_equal(read_priors(str(tmp_path / "p.csv"), m), np.float32([0.5, 0.25, 0.125]))
    (tmp_path / "ref.csv").write_text("Classes,avg_pred\nDaytime,0.3\n/m/0,0.1\nWhite,0.2\n")
    np.testing.assert_allclose(read_priors(str(tmp_path / "ref.csv"), m), [0.1, 0.2, 0.3], rtol=1e-6)
    (tmp_path / "bad.csv").write_text("Classes,avg_pred\nDaytime,0.3\n")
    with pytest.raises(ValueError, match="2 classes have no prior"):
        read_priors(str(tmp_path / "bad.csv"), m)


def test_output_paths():
    assert output_paths("s3://b/x/priors.csv") == ("s3://b/x/priors.csv", "s3://b/x/priors.json", "s3://b/x/priors.png")
    assert output_paths("out/p") == ("out/p", "out/p.json", "out/p.png")


# ---------------------------------------------------------------------------------------
# RunningPrior (the reference code's online estimator)


def test_running_prior_cumulative_equals_mean_of_all_samples():
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(b, 7, generator=g) for b in (5, 3, 8, 1)]
    rp = RunningPrior(7)
    for b in batches:
        rp.update(b.to(torch.bfloat16).float())
    ref = torch.cat([b.to(torch.bfloat16).float() for b in batches]).double().mean(0)
    assert rp.count == 17
    torch.testing.assert_close(rp.value(), ref, rtol=0, atol=1e-12)

    again = RunningPrior(7)
    again.load_state_dict(rp.state_dict())
    torch.testing.assert_close(again.value(), rp.value(), rtol=0, atol=0)


def test_running_prior_ema_is_bias_corrected():
    rp = RunningPrior(2, decay=0.5)
    rp.update(torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(rp.value(), torch.tensor([1.0, 0.0], dtype=torch.float64))  # no pull toward 0
    rp.update(torch.tensor([[0.0, 0.0], [0.0, 1.0]]))
    # weights 0.5 (old) and 0.5 (new batch mean [0, 0.5]), normalised by 1 - 0.5^2
    torch.testing.assert_close(rp.value(), torch.tensor([0.25 / 0.75, 0.25 / 0.75], dtype=torch.float64))


def test_running_prior_rejects_bad_input():
    with pytest.raises(ValueError, match="no samples"):
        RunningPrior(3).value()
    with pytest.raises(ValueError, match=r"expected probs \[B, 3\]"):
        RunningPrior(3).update(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="decay"):
        RunningPrior(3, decay=1.0)
    with pytest.raises(ValueError, match="decay"):
        RunningPrior(3, decay=0.9).load_state_dict(RunningPrior(3).state_dict())


# ---------------------------------------------------------------------------------------
# the driver's reduction: exactly once


def test_reduction_sums_in_float64_and_checks_every_shard_once():
    red = PriorReduction([3, 2], 2)
    red.add(1, np.array([1.0, 0.5]), 2, 0, np.array([1, 0]))
    red.add(0, np.array([2.0, 0.5]), 2, 1, np.array([0, 2]))
    np.testing.assert_allclose(red.finish(), [0.75, 0.25])
    assert (red.count, red.corrupt, red.pos.tolist()) == (4, 1, [1, 2])
    with pytest.raises(RuntimeError, match="counted twice"):
        red.add(0, np.zeros(2), 3, 0)
    short = PriorReduction([3, 2], 2)
    with pytest.raises(RuntimeError, match="manifest says 3"):
        short.add(0, np.zeros(2), 2, 0)
    short.add(1, np.zeros(2), 2, 0)
    with pytest.raises(RuntimeError, match="1 shards never reported"):
        short.finish()


def test_reduction_counts_reused_shards_once_and_names_failures():
    red = PriorReduction([3, 2, 4], 2)
    red.add(2, np.array([1.0, 1.0]), 4, 0, np.array([1, 1]), reused=True)
    with pytest.raises(RuntimeError, match="counted twice"):
        red.add(2, np.array([1.0, 1.0]), 4, 0, np.array([1, 1]))  # a streamed row for a reused shard
    red.add(0, np.array([1.0, 2.0]), 3, 0, np.array([0, 1]))
    red.fail(1, "shard 1 (x/train-000001.tar) failed 3 times: ShardReadError: gone")
    assert (red.reused_shards, red.reused_samples, red.failed) == (1, 4, 1)
    with pytest.raises(RuntimeError, match=r"1 of 3 shards failed: shard 1 \(x/train-000001.tar\)"):
        red.finish()


# ---------------------------------------------------------------------------------------
# per-shard records (no Ray)


def _shards(n: int = 3, samples: int = 3) -> list[ShardInfo]:
    return [ShardInfo(path=f"train/train-{i:06d}.tar", samples=samples, bytes=10, sha256=f"{i:064x}") for i in range(n)]


def _identity(**change) -> dict:
    shards = _shards()
    kw = dict(checkpoint="/runs/a/checkpoint_00000010", weights="ema", weights_file={"size": 1, "modified": "1.0"},
              split="train", shards=shards, image_size=32, class_ids=["a", "b"])
    return pass_identity(**{**kw, **change})


def test_record_round_trip_and_what_is_refused():
    rec = ShardRecord(1, np.array([0.5, 2.25]), np.array([0, 3], dtype=np.int64), 3, 0)
    data = encode_record(rec, "d1")
    back = decode_record(data, "r", digest="d1", num_classes=2, shard_samples=[3, 3])
    assert (back.shard, back.count, back.corrupt) == (1, 3, 0) and back.sum.tolist() == [0.5, 2.25]
    with pytest.raises(ValueError, match="another pass"):
        decode_record(data, "r", digest="d2", num_classes=2, shard_samples=[3, 3])
    with pytest.raises(ValueError, match="does not match the manifest"):
        decode_record(data, "r", digest="d1", num_classes=2, shard_samples=[3, 4])
    with pytest.raises(ValueError, match=r"expected float64/int64 \(3,\)"):
        decode_record(data, "r", digest="d1", num_classes=3, shard_samples=[3, 3])
    import io

    buf = io.BytesIO()  # an object array needs pickle to load: refused, never unpickled
    np.savez(buf, sum=np.array([{"x": 1}], dtype=object), pos=np.zeros(2, np.int64), shard=1, count=3, corrupt=0, identity="d1")
    with pytest.raises(ValueError, match="not a prior-pass record"):
        decode_record(buf.getvalue(), "r", digest="d1", num_classes=2, shard_samples=[3, 3])


def test_records_folder_refuses_another_pass_and_skips_bad_records(tmp_path):
    folder = records_dir(str(tmp_path / "priors.csv"))
    assert folder.endswith("priors.shards")
    ident = _identity()
    open_records(folder, ident)
    open_records(folder, _identity())  # the same pass again: fine
    digest = identity_digest(ident)

    def rec(i: int) -> ShardRecord:
        return ShardRecord(i, np.array([1.0, 0.0]), np.array([1, 0], dtype=np.int64), 2, 1)

    Path(record_url(folder, 0)).write_bytes(encode_record(rec(0), digest))
    Path(record_url(folder, 2)).write_bytes(encode_record(rec(2), "another pass"))
    Path(folder, "shard-000001.npz").write_bytes(b"PK\x03\x04 cut short")
    Path(folder, "shard-0000000.npz").write_bytes(encode_record(rec(0), digest))  # not the canonical name
    Path(folder, ".shard-000001.npz.tmp-1234abcd").write_bytes(b"")  # a write a kill interrupted
    got = list(iter_records(folder, digest=digest, num_classes=2, shard_samples=[3, 3, 3], chunk=2))
    assert [r.shard for r in got] == [0]

    with pytest.raises(ValueError) as e:
        open_records(folder, _identity(weights="model", weights_file={"size": 1, "modified": "2.0"}))
    msg = str(e.value)
    assert "\n" not in msg and "weights 'ema' -> 'model'" in msg and "weights_file" in msg and "--fresh" in msg
    assert "checkpoint" not in msg.split("(", 1)[1] and "split" not in msg
    with pytest.raises(ValueError, match="shard_list_sha256"):  # another dataset or split
        open_records(folder, _identity(shards=_shards(samples=4)))
    open_records(folder, _identity(image_size=64), fresh=True)  # discards the old pass, starts this one
    assert sorted(os.listdir(folder)) == ["identity.json"]


def test_records_on_s3_write_list_fold_and_remove(s3_bucket):
    from data_shards.storage import exists, write_bytes_atomic

    folder = records_dir(f"{s3_bucket}/priors/priors.csv")
    ident = _identity()
    open_records(folder, ident)
    digest = identity_digest(ident)
    for i in (2, 0):
        write_bytes_atomic(record_url(folder, i), encode_record(
            ShardRecord(i, np.array([1.0, 0.5 * i]), np.array([1, i], dtype=np.int64), 3, 0), digest))
    got = list(iter_records(folder, digest=digest, num_classes=2, shard_samples=[3, 3, 3], chunk=2))
    assert [r.shard for r in got] == [0, 2] and got[1].sum.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="class_ids_sha256"):
        open_records(folder, _identity(class_ids=["a", "c"]))
    stamp = file_stamp(record_url(folder, 0))
    assert stamp["size"] > 0 and stamp["modified"] not in ("", "None")
    remove_records(folder)
    assert not exists(record_url(folder, 0)) and not exists(f"{folder}/identity.json")
    assert list(iter_records(folder, digest=digest, num_classes=2, shard_samples=[3, 3, 3])) == []


def test_file_stamp_changes_when_a_file_is_rewritten(tmp_path):
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"1234")
    a = file_stamp(str(f))
    time.sleep(0.01)
    f.write_bytes(b"5678")
    assert a["size"] == 4 and file_stamp(str(f)) != a


# ---------------------------------------------------------------------------------------
# fixtures: a tiny dataset and a hand-written checkpoint


def _models(num_classes: int, image_size: int):
    from trainer.config import load_config
    from trainer.models import build_model

    cfg = load_config("synthetic-cpu", [f"data.image_size={image_size}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, num_classes).eval()
    torch.manual_seed(1)
    ema = build_model(cfg.model, num_classes).eval()  # other weights: "auto" must pick these
    return cfg, model, ema


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from data_shards.sources.synthetic import build_synthetic

    base = tmp_path_factory.mktemp("prior")
    root = str(base / "data")
    m = build_synthetic(root, train=200, val=16, image_size=32, shard_samples=30, seed=1, progress=False)
    cfg, model, ema = _models(m.num_classes, 32)
    ckpt = write_checkpoint(str(base / "ckpt"), model.state_dict(), cfg.model_dump(mode="json"), m.classes,
                            ema_state_dict=ema.state_dict())
    return {"root": root, "ckpt": ckpt, "manifest": m, "ema": ema, "base": base}


@torch.no_grad()
def _reference_mean(model: torch.nn.Module, root: str, manifest: Manifest, split: str, size: int) -> tuple[np.ndarray, int]:
    """One process, one sample at a time, float64: eq. 10 written out."""
    from data_shards.decode import decode_image, to_tensor
    from data_shards.shard_reader import iter_shard

    total, n = np.zeros(manifest.num_classes), 0
    for s in manifest.split(split).shards:
        for _, raw in iter_shard(os.path.join(root, s.path), 0, s.samples):
            x = to_tensor(decode_image(raw.members["jpg"], size)[None])
            total += model(x).sigmoid()[0].double().numpy()
            n += 1
    return total / n, n


def _score(tiny, root: str, shards: list[int], workers: int, **kw) -> list:
    return list(score_shards(tiny["ema"], root, "train", read_manifest(root), shards, image_size=32, batch_size=8,
                             workers=workers, device=torch.device("cpu"), **kw))


@pytest.mark.parametrize("workers", [0, 2])
def test_scoring_through_the_stream_gives_each_shard_once_and_the_mean(tiny, workers):
    m = tiny["manifest"]
    n_shards = len(m.split("train").shards)
    rows = _score(tiny, tiny["root"], list(range(n_shards)), workers)
    assert sorted(r.shard for r in rows) == list(range(n_shards))  # every shard once, workers splitting some
    assert all(r.count == m.split("train").shards[r.shard].samples and r.corrupt == 0 and not r.error for r in rows)
    ref, n = _reference_mean(tiny["ema"], tiny["root"], m, "train", 32)
    total = np.sum([r.sum for r in rows], axis=0)
    assert rows[0].sum.dtype == np.float64 and sum(r.count for r in rows) == n
    np.testing.assert_allclose(total / n, ref, rtol=0, atol=1e-5)
    assert np.sum([r.pos for r in rows], axis=0).tolist() == m.stats["train"].pos


def test_scoring_counts_a_truncated_shard_as_corrupt(tiny, tmp_path):
    root = str(tmp_path / "data")
    shutil.copytree(tiny["root"], root)
    s = tiny["manifest"].split("train").shards[1]
    shard = Path(root) / s.path
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    rows = {r.shard: r for r in _score(tiny, root, [0, 1, 2], workers=2)}
    assert rows[1].count + rows[1].corrupt == s.samples and 0 < rows[1].corrupt < s.samples
    assert rows[0].corrupt == rows[2].corrupt == 0


def test_an_unreadable_shard_is_found_from_a_worker_and_the_others_complete(tiny, tmp_path, monkeypatch):
    """Raised in a loader worker, the error arrives as text: the scorer finds the shard by
    scoring the plan's suspects alone, names it after its retries, and finishes the rest."""
    import trainer.prior_scoring as scoring

    monkeypatch.setattr(scoring, "RETRY_BACKOFF_S", 0.01)
    root = str(tmp_path / "data")
    shutil.copytree(tiny["root"], root)
    m = tiny["manifest"]
    os.remove(os.path.join(root, m.split("train").shards[4].path))
    rows = _score(tiny, root, list(range(7)), workers=2, retries=1)
    assert sorted(r.shard for r in rows) == list(range(7))
    bad = [r for r in rows if r.error]
    assert [r.shard for r in bad] == [4] and "failed 2 times: ShardReadError" in bad[0].error
    assert all(r.count == m.split("train").shards[r.shard].samples for r in rows if r.shard != 4)


def test_actor_plan_defaults_follow_the_cluster():
    gpu_node = {"CPU": 11.0, "GPU": 1.0}
    plan = actor_plan([{"CPU": 8.0}, *[{"CPU": 88.0, "GPU": 8.0}] * 2])  # a head without GPUs, two 8-GPU nodes
    assert (plan.device, plan.actors, plan.gpus, plan.cpus, plan.workers, plan.threads) == ("cuda", 16, 1.0, 11.0, 10, 1)
    plan = actor_plan([{"CPU": 16.0, "GPU": 4.0}, gpu_node])  # the leanest node sets the CPUs per actor
    assert (plan.actors, plan.cpus) == (5, 4.0)
    assert actor_plan([gpu_node], gpus_per_actor=0.5, workers=3).actors == 2
    cpu = actor_plan([{"CPU": 2.0}])
    assert (cpu.device, cpu.actors, cpu.cpus, cpu.workers, cpu.threads) == ("cpu", 2, 1.0, 0, 1)
    assert actor_plan([{"CPU": 8.0}], cpus_per_actor=4).workers == 3
    assert actor_plan([gpu_node], device="cpu").gpus == 0
    with pytest.raises(ValueError, match="no GPUs"):
        actor_plan([{"CPU": 2.0}], device="cuda")
    from trainer.prior_pass import _groups

    assert _groups([10] * 7, 2) == [[0, 1, 2], [3, 4, 5, 6]]  # contiguous, balanced by samples
    assert _groups([100, 1, 1, 1], 3) == [[0], [1], [2, 3]] and _groups([5, 5], 2) == [[0], [1]]
    with pytest.raises(ValueError, match="needs device cuda"):
        actor_plan([{"CPU": 2.0}], gpus_per_actor=1)


def test_cli_bad_inputs_exit_2_with_one_line(tiny, tmp_path):
    for args, needle in ((["--checkpoint", str(tmp_path / "nope"), "--data", tiny["root"]], "checkpoint not found"),
                         (["--checkpoint", tiny["ckpt"], "--data", str(tmp_path / "nodata")], "dataset.json"),
                         (["--checkpoint", tiny["ckpt"], "--data", tiny["root"], "--split", "test"], "split 'test'")):
        p = subprocess.run([CSL, "prior", *args, "--out", str(tmp_path / "p.csv")], capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, p.stderr
        assert needle in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


# ---------------------------------------------------------------------------------------
# the Ray pass


@pytest.mark.integration
def test_prior_pass_two_actors_equals_single_process_mean(tiny, ray_connected):
    from trainer.prior_pass import estimate_priors

    m = tiny["manifest"]
    out = str(tiny["base"] / "out" / "priors.csv")
    res = estimate_priors(tiny["ckpt"], tiny["root"], out, actors=2, batch_size=16, progress=False)
    ref, n = _reference_mean(tiny["ema"], tiny["root"], m, "train", 32)

    assert res["samples"] == n == m.split("train").samples == 200 and res["corrupt"] == 0
    assert res["actors"] == 2 and res["weights"] == "ema"
    est = read_priors(out, m)
    np.testing.assert_allclose(est, ref, rtol=0, atol=1e-5)
    summary = json.loads(Path(res["outputs"]["json"]).read_text())
    assert summary["samples"] == 200 and summary["classes"] == m.num_classes and len(summary["top"]) == 20
    assert {"ignore_model", "annotation_frequency"} <= set(summary["estimators"])
    assert {"spearman_vs_counts", "spearman_vs_truth", "spearman_counts_vs_truth"} <= set(summary)
    assert [t["prior"] for t in summary["top"]] == sorted((t["prior"] for t in summary["top"]), reverse=True)
    freq = np.asarray(m.stats["train"].pos) / 200  # counted in the pass over the same samples
    by_id = {t["class_id"]: t["annotation_frequency"] for t in summary["top"]}
    assert all(by_id[c.id] == pytest.approx(freq[i], abs=1e-6) for i, c in enumerate(m.classes) if c.id in by_id)
    assert Path(res["outputs"]["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _wide_dataset(root: str, num_classes: int, sizes: dict[str, int]) -> Manifest:
    """Many classes, tiny images: a pass that kept per-sample outputs would show in RSS
    (8,000 x 4,000 float32 is 128 MB; 2,000 x 4,000 is 32 MB)."""
    import io

    from PIL import Image

    from data_shards.writer import write_dataset

    rng = np.random.default_rng(0)

    def records(split: str, n: int):
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (16, 16), tuple(int(v) for v in rng.integers(0, 255, 3))).save(buf, format="JPEG")
            pos = sorted(rng.choice(num_classes, 2, replace=False).tolist())
            yield Record(key=f"{split}{i:06d}", image=buf.getvalue(), pos=pos, neg=[])

    classes = [ClassInfo(id=f"c{i}", name=f"class {i}") for i in range(num_classes)]
    return write_dataset(root, classes, {k: records(k, n) for k, n in sizes.items()}, shard_samples=500)


@pytest.mark.integration
def test_driver_memory_does_not_grow_with_samples(tmp_path, ray_connected):
    root = str(tmp_path / "wide")
    m = _wide_dataset(root, 4000, {"small": 2000, "train": 8000})
    cfg, model, _ = _models(m.num_classes, 16)
    ckpt = write_checkpoint(str(tmp_path / "ckpt"), model.state_dict(), cfg.model_dump(mode="json"), m.classes)
    peak = {}
    for split in ("small", "train"):
        out = tmp_path / split / "priors.csv"
        # A fresh driver process per size (ru_maxrss is a peak), on the fixture's cluster.
        p = subprocess.run([CSL, "prior", "--checkpoint", ckpt, "--data", root, "--split", split, "--out", str(out),
                            "--actors", "2", "--no-progress"], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "RAY_ADDRESS": ray_connected})
        assert p.returncode == 0, p.stderr[-3000:]
        assert f"{m.split(split).samples} samples scored of {m.split(split).samples} in the manifest" in p.stdout
        summary = json.loads(out.with_suffix(".json").read_text())
        assert summary["weights"] == "model" and summary["samples"] == m.split(split).samples
        peak[split] = summary["driver_peak_rss_mb"]
    assert peak["train"] - peak["small"] < 50, f"driver peak RSS grew from {peak['small']} MB to {peak['train']} MB"


# ---------------------------------------------------------------------------------------
# resumable and fault tolerant


@pytest.fixture(scope="module")
def twelve(tmp_path_factory):
    """12 shards of 40 tiny images: scored one image per call by one actor, a shard takes a
    few tenths of a second, long enough to kill a pass between its 2nd and its 12th record."""
    from data_shards.sources.synthetic import build_synthetic

    base = tmp_path_factory.mktemp("prior12")
    m = build_synthetic(str(base / "data"), train=480, val=8, image_size=32, shard_samples=40, seed=2, progress=False)
    cfg, model, ema = _models(m.num_classes, 32)
    ckpt = write_checkpoint(str(base / "ckpt"), model.state_dict(), cfg.model_dump(mode="json"), m.classes,
                            ema_state_dict=ema.state_dict())
    return {"root": str(base / "data"), "ckpt": ckpt, "manifest": m, "base": base}


def _records(folder: str) -> list[str]:
    return sorted(p.name for p in Path(folder).glob("shard-*.npz")) if os.path.isdir(folder) else []


@pytest.mark.integration
def test_prior_pass_killed_midway_resumes_with_the_same_priors(twelve, ray_connected):
    from trainer.prior_pass import estimate_priors

    m, base = twelve["manifest"], twelve["base"]
    n_shards, total = len(m.split("train").shards), m.split("train").samples
    whole = estimate_priors(twelve["ckpt"], twelve["root"], str(base / "whole" / "priors.csv"), actors=2, batch_size=1,
                            progress=False)
    assert whole["reused_shards"] == 0 and whole["shards"] == n_shards == 12

    out = str(base / "killed" / "priors.csv")
    folder = records_dir(out)
    p = subprocess.Popen([CSL, "prior", "--checkpoint", twelve["ckpt"], "--data", twelve["root"], "--out", out,
                          "--actors", "1", "--batch-size", "1", "--no-progress"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "RAY_ADDRESS": ray_connected})
    deadline = time.monotonic() + 240
    try:
        while len(_records(folder)) < 2:
            assert p.poll() is None, f"the pass ended before it could be killed: {p.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no 2 shard records within 240 s"
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
    finally:
        p.kill()
        p.wait()
    assert not Path(out).exists() and 2 <= len(_records(folder)) < n_shards

    res = estimate_priors(twelve["ckpt"], twelve["root"], out, actors=2, batch_size=1, progress=False)
    assert 2 <= res["reused_shards"] < n_shards, res["reused_shards"]
    assert res["samples"] + res["corrupt"] == total == whole["samples"] + whole["corrupt"]
    assert 0 < res["reused_samples"] < total
    assert json.loads(Path(res["outputs"]["json"]).read_text())["reused_shards"] == res["reused_shards"]
    np.testing.assert_allclose(read_priors(out, m), read_priors(whole["outputs"]["csv"], m), rtol=0, atol=1e-6)
    assert not os.path.exists(folder)  # the outputs hold the result; the records are gone


@pytest.mark.integration
def test_a_shard_that_never_reads_is_named_and_the_others_are_kept(tiny, ray_connected, tmp_path):
    from trainer.prior_pass import estimate_priors

    m = tiny["manifest"]
    root = str(tmp_path / "data")
    shutil.copytree(tiny["root"], root)
    bad = m.split("train").shards[3].path
    os.rename(os.path.join(root, bad), str(tmp_path / "aside.tar"))  # listed in the manifest, gone from storage
    out = str(tmp_path / "out" / "priors.csv")
    with pytest.raises(RuntimeError) as e:
        estimate_priors(tiny["ckpt"], root, out, actors=2, batch_size=16, progress=False, shard_retries=1)
    msg = str(e.value)
    assert f"1 of 7 shards failed: shard 3 ({os.path.join(root, bad)}) failed 2 times: ShardReadError" in msg, msg
    assert "6 finished shards are kept" in msg and "rerun" in msg
    folder = records_dir(out)
    assert _records(folder) == [f"shard-{i:06d}.npz" for i in range(7) if i != 3]
    assert not Path(out).exists()

    os.rename(str(tmp_path / "aside.tar"), os.path.join(root, bad))
    res = estimate_priors(tiny["ckpt"], root, out, actors=2, batch_size=16, progress=False)
    assert (res["reused_shards"], res["samples"], res["corrupt"], res["actors"]) == (6, 200, 0, 1)
    ref, _ = _reference_mean(tiny["ema"], root, m, "train", 32)
    np.testing.assert_allclose(read_priors(out, m), ref, rtol=0, atol=1e-5)


@pytest.mark.integration
def test_stale_records_are_refused_and_fresh_discards_them(tiny, ray_connected, tmp_path):
    """Records of a pass with the EMA weights of checkpoint A (shard 0 done, written as an actor
    would) must not be folded into a pass with other weights, another checkpoint, or A rewritten."""
    from trainer.prior_pass import estimate_priors

    m = tiny["manifest"]
    ckpt = shutil.copytree(tiny["ckpt"], str(tmp_path / "ckpt_a"))
    out = str(tmp_path / "out" / "priors.csv")
    folder = records_dir(out)
    shards = m.split("train").shards
    ident = pass_identity(checkpoint=ckpt, weights="ema", weights_file=file_stamp(os.path.join(ckpt, "ema.safetensors")),
                          split="train", shards=shards, image_size=32, class_ids=[c.id for c in m.classes])
    open_records(folder, ident)
    r = _score(tiny, tiny["root"], [0], workers=0)[0]
    Path(record_url(folder, 0)).write_bytes(encode_record(ShardRecord(0, r.sum, r.pos, r.count, r.corrupt),
                                                          identity_digest(ident)))

    def refused(ck: str, weights: str = "auto") -> str:
        with pytest.raises(ValueError) as e:
            estimate_priors(ck, tiny["root"], out, weights=weights, progress=False)
        assert "--fresh" in str(e.value) and "\n" not in str(e.value)
        return str(e.value).split(" (", 1)[1]  # the changed fields (the folder's path may say anything)

    # each message names what changed and nothing else: the hand-made identity is the pass's own
    changed = refused(ckpt, "model")
    assert "weights 'ema' -> 'model'" in changed and "checkpoint" not in changed and "split" not in changed
    other = shutil.copytree(ckpt, str(tmp_path / "ckpt_b"))
    assert "checkpoint " in refused(other)
    cfg, model, _ = _models(m.num_classes, 32)
    write_checkpoint(ckpt, model.state_dict(), cfg.model_dump(mode="json"), m.classes, ema_state_dict=model.state_dict())
    changed = refused(ckpt)  # A rewritten in place: same path, same weights choice, other bytes
    assert changed.startswith("weights_file ") and "checkpoint" not in changed
    assert _records(folder) == ["shard-000000.npz"]  # a refusal deletes nothing

    res = estimate_priors(ckpt, tiny["root"], out, actors=2, batch_size=16, progress=False, fresh=True)
    assert res["reused_shards"] == 0 and res["samples"] == 200
    ref, _ = _reference_mean(model, tiny["root"], m, "train", 32)  # the new weights', not the stale record's
    np.testing.assert_allclose(read_priors(out, m), ref, rtol=0, atol=1e-5)


def test_pipeline_runs_the_prior_pass_on_the_training_hardware():
    from trainer.config import load_config
    from trainer.pipeline import prior_resources

    gpu = prior_resources(load_config("openimages-v6-resnet50", []))
    assert gpu == {"device": "cuda", "actors": 8, "gpus_per_actor": 1.0, "cpus_per_actor": 10.0}
    assert prior_resources(load_config("openimages-v6-resnet50", []), actors=4)["actors"] == 4
    assert prior_resources(load_config("synthetic-cpu", [])) == {"device": "cpu", "actors": None}
