"""`csl shards inspect` / `verify` on small datasets the tests write, good and damaged."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from data_shards.format import ClassInfo, Record
from data_shards.inspect import inspect_dataset, verify_dataset
from data_shards.writer import write_dataset
from trainer.cli import main


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (i * 37 % 256, i * 91 % 256, 80)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    classes = [ClassInfo(id=f"/m/{i:02d}", name=f"class{i}") for i in range(6)]
    recs = []
    for i in range(23):
        labels = rng.permutation(6)
        recs.append(Record(key=f"img{i:03d}", image=_jpeg(i), pos=sorted(labels[:2].tolist()), neg=sorted(labels[2:3].tolist())))
    root = str(tmp_path / "ds")
    m = write_dataset(root, classes, {"train": recs, "val": recs[:5]}, shard_samples=10)
    return root, m, recs


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.cli", *args], capture_output=True, text=True, timeout=120)


def test_inspect_counts_come_from_shards(dataset):
    root, m, recs = dataset
    res = inspect_dataset(root)
    tr = res["splits"]["train"]
    assert res["classes"] == 6 and tr["samples"] == 23 and tr["shards"] == 3
    pos = np.zeros(6, int)
    for r in recs:
        pos[r.pos] += 1
    assert tr["pos"] == pos.tolist() == m.stats["train"].pos


def test_inspect_json_cli(dataset):
    root, m, _ = dataset
    p = run_cli("shards", "inspect", root, "--json", "--workers", "0")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["classes"] == 6
    assert out["splits"]["val"]["samples"] == 5 and out["splits"]["train"]["shards"] == 3
    assert out["splits"]["train"]["neg"] == m.stats["train"].neg


def test_verify_ok(dataset):
    root, _, _ = dataset
    res = verify_dataset(root)
    assert res == {"ok": True, "samples": 28, "shards": 4, "sampled": False, "problems": [], "problem_count": 0}
    p = run_cli("shards", "verify", root, "--json", "--workers", "0")
    assert p.returncode == 0 and json.loads(p.stdout)["ok"] is True


def _rewrite_member(path: str, key: str, ext: str, data: bytes) -> None:
    members = []
    with tarfile.open(path) as t:
        for info in t:
            members.append((info, t.extractfile(info).read()))
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
        for info, d in members:
            if info.name == f"{key}.{ext}":
                d = data
                info.size = len(d)
            t.addfile(info, io.BytesIO(d))


def test_verify_finds_damage(dataset):
    root, _, _ = dataset
    shard0 = os.path.join(root, "train", "train-000000.tar")
    _rewrite_member(shard0, "img003", "jpg", b"\xff\xd8 not a jpeg")
    _rewrite_member(shard0, "img004", "json", b'{"pos": [1, 9], "neg": []}')
    shard2 = os.path.join(root, "train", "train-000002.tar")
    with open(shard2, "r+b") as f:
        f.truncate(2048)
    os.remove(os.path.join(root, "val", "val-000000.tar"))
    res = verify_dataset(root)
    assert not res["ok"]
    whats = {(p["shard"], p["key"]): p["what"] for p in res["problems"]}
    assert "does not decode" in whats[("train/train-000000.tar", "img003")]
    assert "out of range" in whats[("train/train-000000.tar", "img004")]
    assert "sha256" in whats[("train/train-000000.tar", "-")] or any(
        "sha256" in p["what"] for p in res["problems"] if p["shard"] == "train/train-000000.tar")
    assert any(p["shard"] == "train/train-000002.tar" and "manifest says" in p["what"] for p in res["problems"])
    assert whats[("val/val-000000.tar", "-")] == "shard file missing"
    p = run_cli("shards", "verify", root, "--workers", "0")
    assert p.returncode == 1
    assert "img003" in p.stdout and "val/val-000000.tar" in p.stdout


def test_cli_bad_input_exit_codes(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["shards", "inspect", str(tmp_path / "missing")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "dataset.json" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "dataset.json").write_text('{"format": "csl-shards", "version": 1, "classes": 3, "splits": {}}')
    with pytest.raises(SystemExit) as e:
        main(["shards", "verify", str(tmp_path / "bad")])
    assert e.value.code == 2
    assert "classes" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["shards", "nope"])
    assert e.value.code == 2


def test_verify_on_s3(s3_bucket):
    root = f"{s3_bucket}/ds"
    classes = [ClassInfo(id="a", name="a"), ClassInfo(id="b", name="b")]
    write_dataset(root, classes, {"train": [Record(key=f"k{i}", image=_jpeg(i), pos=[i % 2], neg=[]) for i in range(5)]}, shard_samples=2)
    res = verify_dataset(root)
    assert res["ok"] and res["samples"] == 5
