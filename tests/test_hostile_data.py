"""Hostile datasets (issue 16): a split conversion never loses the others, manifests stay inside
their root, verify and the stream agree on every hand-made shard, JSON bombs name their file,
skip really skips, and killed conversions leave no workers and no secrets behind."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_shards.format import ClassInfo, ManifestError, Record, parse_manifest
from data_shards.inspect import verify_dataset
from data_shards.shard_reader import ShardReadError
from data_shards.storage import read_manifest, redact
from data_shards.stream import CorruptSampleError, ShardStream
from data_shards.writer import EmptySplitError, write_dataset
from trainer.cli import main

from test_stream import C, jpeg, records

CLASSES = [ClassInfo(id=f"/m/{c}", name=f"class{c}") for c in range(C)]


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(list(argv))
    out, err = capsys.readouterr()
    return int(e.value.code or 0), out, err


def two_splits(root: str) -> None:
    write_dataset(root, CLASSES, {"train": records(20), "val": records(6, prefix="v")}, shard_samples=4)


def assert_intact(root: str, split: str = "train", samples: int = 20) -> None:
    m = read_manifest(root)
    assert m.splits[split].samples == samples
    res = verify_dataset(root)
    assert res["ok"], res["problems"]


# -- 1. data loss: converting a split never loses the others ------------------------------


def test_bad_split_name_changes_nothing(tmp_path):
    root = str(tmp_path / "ds")
    two_splits(root)
    before = Path(root, "dataset.json").read_bytes()
    keep = read_manifest(root)
    with pytest.raises(ValueError, match="split name 'va/l'"):
        write_dataset(root, CLASSES, {"va/l": records(3)}, keep=keep)
    assert Path(root, "dataset.json").read_bytes() == before
    assert_intact(root)


def _failing(n_ok: int):
    for i, r in enumerate(records(n_ok + 5, prefix="w")):
        if i == n_ok:
            raise ValueError("bad row 123 (strict mode stops at the first problem)")
        yield r


def test_failure_before_any_shard_keeps_the_whole_manifest(tmp_path):
    root = str(tmp_path / "ds")
    two_splits(root)
    before = Path(root, "dataset.json").read_bytes()
    with pytest.raises(ValueError, match="bad row"):
        write_dataset(root, CLASSES, {"val": _failing(2)}, shard_samples=4, keep=read_manifest(root))
    assert Path(root, "dataset.json").read_bytes() == before  # val too: none of its shards was touched
    assert_intact(root)


def test_failure_part_way_keeps_the_other_split(tmp_path):
    root = str(tmp_path / "ds")
    two_splits(root)
    with pytest.raises(ValueError, match="bad row"):
        write_dataset(root, CLASSES, {"val": _failing(9)}, shard_samples=4, keep=read_manifest(root))
    m = read_manifest(root)
    assert list(m.splits) == ["train"] and "val" not in m.stats  # val's old shards were being overwritten
    assert_intact(root)
    # rerun: both splits again, nothing stale
    write_dataset(root, CLASSES, {"val": records(5, prefix="x")}, shard_samples=4, keep=read_manifest(root))
    m = read_manifest(root)
    assert m.splits["val"].samples == 5 and m.splits["train"].samples == 20
    assert sorted(os.listdir(Path(root, "val"))) == ["val-000000.tar", "val-000001.tar"]
    assert_intact(root)


def test_zero_samples_is_an_error_and_publishes_nothing(tmp_path):
    root = str(tmp_path / "ds")
    two_splits(root)
    before = Path(root, "dataset.json").read_bytes()
    with pytest.raises(EmptySplitError, match="'test': no samples"):
        write_dataset(root, CLASSES, {"test": iter([])}, keep=read_manifest(root))
    assert Path(root, "dataset.json").read_bytes() == before
    with pytest.raises(EmptySplitError):
        write_dataset(str(tmp_path / "new"), CLASSES, {"train": []})
    assert not Path(tmp_path, "new", "dataset.json").exists()


_SLOW_CONVERSION = """
import sys, time
sys.path[:0] = [{tests!r}]
from data_shards.storage import read_manifest
from data_shards.writer import write_dataset
from test_stream import records
from test_hostile_data import CLASSES
def slow():
    for i, r in enumerate(records(40, prefix="k")):
        if i == 9:
            print("published", flush=True)
        time.sleep(0.05 if i < 9 else 1.0)
        yield r
write_dataset({root!r}, CLASSES, {{"val": slow()}}, shard_samples=4, keep=read_manifest({root!r}))
"""


def test_kill_part_way_and_rerun_keeps_the_other_split(tmp_path):
    root = str(tmp_path / "ds")
    two_splits(root)
    code = _SLOW_CONVERSION.format(tests=str(Path(__file__).parent), root=root)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "published"
        time.sleep(0.3)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    assert list(read_manifest(root).splits) == ["train"]
    assert_intact(root)
    write_dataset(root, CLASSES, {"val": records(6, prefix="v")}, shard_samples=4, keep=read_manifest(root))
    assert_intact(root)
    assert read_manifest(root).splits["val"].samples == 6
    assert not [n for n in os.listdir(Path(root, "val")) if n.startswith(".tmp-")]


# -- 2. manifest paths stay inside the root, each shard once ------------------------------


def _manifest_with(paths: dict[str, list[str]]) -> dict:
    return {"format": "csl-shards", "version": 1, "classes": [c.model_dump() for c in CLASSES],
            "splits": {s: {"samples": 4 * len(ps), "shards": [{"path": p, "samples": 4, "bytes": 1, "sha256": "x"}
                                                           for p in ps]} for s, ps in paths.items()}}


@pytest.mark.parametrize("bad", ["../outside.tar", "/dev/zero", "s3://other/x.tar", "train/../../x.tar",
                                 "train/./a.tar", "train//a.tar", "train\\a.tar", "", "train/a\x1b.tar"])
def test_shard_paths_must_stay_inside_the_root(tmp_path, capsys, bad):
    with pytest.raises(ManifestError, match=r"dataset\.json: field 'splits\.train\.shards\.0\.path'.*inside"):
        parse_manifest(json.dumps(_manifest_with({"train": [bad]})))
    Path(tmp_path, "dataset.json").write_text(json.dumps(_manifest_with({"train": [bad]})))
    for cmd in ("verify", "inspect"):
        rc, _, err = cli(capsys, "shards", cmd, str(tmp_path))
        assert rc == 2 and "dataset.json" in err and len(err.strip().splitlines()) == 1 and "\x1b" not in err


@pytest.mark.parametrize("splits", [{"train": ["train/a.tar", "train/a.tar"]},
                                    {"train": ["train/a.tar"], "val": ["train/a.tar"]}])
def test_a_shard_listed_twice_is_refused(splits):
    with pytest.raises(ManifestError, match="'train/a.tar' is listed in split"):
        parse_manifest(json.dumps(_manifest_with(splits)))


@pytest.mark.parametrize("field,value", [("samples", 4.0), ("samples", "4"), ("samples", True), ("bytes", 1.5)])
def test_shard_counts_are_integers(field, value):
    raw = _manifest_with({"train": ["train/a.tar"]})
    raw["splits"]["train"]["shards"][0][field] = value
    with pytest.raises(ManifestError, match=rf"shards\.0\.{field}"):
        parse_manifest(json.dumps(raw))


def test_a_symlink_to_a_device_is_not_read(tmp_path, capsys):
    root = tmp_path / "ds"
    write_dataset(str(root), CLASSES, {"train": records(8)}, shard_samples=4)
    shard = root / "train" / "train-000001.tar"
    shard.unlink()
    shard.symlink_to("/dev/zero")
    t0 = time.monotonic()
    res = verify_dataset(str(root))
    assert time.monotonic() - t0 < 30
    assert not res["ok"] and any("not a regular file" in p["what"] for p in res["problems"])
    with pytest.raises(ShardReadError, match="train-000001.tar: not a regular file"):
        list(ShardStream(str(root), "train", batch_size=4, image_size=8))


# -- 3. verify and the stream read the same samples ----------------------------------------


def _image(fmt: str) -> bytes:
    bio = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(bio, fmt)
    return bio.getvalue()


def _label(pos: int = 1) -> bytes:
    return json.dumps({"pos": [pos], "neg": []}).encode()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


_GOOD = [("g0.jpg", jpeg(0)), ("g0.json", _label())]
CASES = {
    "clean": [],
    "duplicate member": [("d.jpg", jpeg(1)), ("d.json", _label()), ("d.jpg", jpeg(2))],
    "two images": [("t.jpg", jpeg(1)), ("t.png", _image("PNG")), ("t.json", _label())],
    "same base name in two folders": [("a/x.jpg", jpeg(1)), ("b/x.json", _label())],
    "gif bytes": [("gif.jpg", _image("GIF")), ("gif.json", _label())],
    "bmp bytes": [("bmp.png", _image("BMP")), ("bmp.json", _label())],
    "tiff bytes": [("tif.webp", _image("TIFF")), ("tif.json", _label())],
    "png and webp": [("p.png", _image("PNG")), ("p.json", _label()), ("w.webp", _image("WEBP")), ("w.json", _label())],
    "label too large": [("big.jpg", jpeg(1)), ("big.json", b'{"pos": [1], "neg": [], "x": "' + b"a" * (2 << 20) + b'"}')],
    "deep label": [("deep.jpg", jpeg(1)), ("deep.json", b"[" * 100_000 + b"]" * 100_000)],
    "huge int label": [("int.jpg", jpeg(1)), ("int.json", b'{"pos": [' + b"9" * 5000 + b'], "neg": []}')],
    "not utf-8 label": [("u.jpg", jpeg(1)), ("u.json", b'{"pos": [1], "neg": [], "s": "\xff\xfe"}')],
    "unknown members": [("k.jpg", jpeg(1)), ("k.json", _label()), ("k.pyd", b"\x80\x04junk"), ("k.txt", b"hi")],
    "control chars in key": [("c\x1b[31m.jpg", jpeg(1)), ("c\x1b[31m.json", _label())],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_verify_ok_means_the_stream_reads_every_listed_sample(tmp_path, case):
    root = tmp_path / "ds"
    write_dataset(str(root), CLASSES, {"train": records(4)}, shard_samples=4)
    members = _GOOD + CASES[case]
    groups = []  # distinct consecutive keys, as every reader groups them
    for name, _ in members:
        key = name.split(".", 1)[0] if "/" not in name else name.rsplit(".", 1)[0]
        if not groups or groups[-1] != key:
            groups.append(key)
    shard = root / "train" / "train-000000.tar"
    _tar(shard, members)
    m = json.loads((root / "dataset.json").read_text())
    m["splits"]["train"] = {"samples": len(groups), "shards": [
        {"path": "train/train-000000.tar", "samples": len(groups), "bytes": shard.stat().st_size,
         "sha256": __import__("hashlib").sha256(shard.read_bytes()).hexdigest()}]}
    m["stats"] = {}
    (root / "dataset.json").write_text(json.dumps(m))
    res = verify_dataset(str(root))
    s = ShardStream(str(root), "train", batch_size=2, image_size=8, shuffle=False, train_transform=False)
    read = [k for b in s for k in b["key"]]
    assert res["ok"] == (s.corrupt_samples == 0 and len(read) == len(groups)), (res, read)
    assert res["samples"] == len(read)  # the same samples are usable to both
    bad_keys = {p["key"] for p in res["problems"]}
    assert all("\x1b" not in p["key"] + p["what"] for p in res["problems"])
    assert res["ok"] == (case in ("clean", "png and webp", "unknown members", "control chars in key"))
    if not res["ok"]:
        assert bad_keys and "g0" not in bad_keys and "g0" in read


def test_unknown_members_are_not_read_into_memory(tmp_path):
    root = tmp_path / "ds"
    write_dataset(str(root), CLASSES, {"train": records(2)}, shard_samples=2)
    shard = root / "train" / "train-000000.tar"
    big = 96 << 20
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in _GOOD:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        ti = tarfile.TarInfo("g0.bin")
        ti.size = big
        tf.addfile(ti, io.BytesIO(bytes(big)))
    m = json.loads((root / "dataset.json").read_text())
    m["splits"]["train"]["shards"][0].update(samples=1, bytes=shard.stat().st_size)
    m["splits"]["train"]["samples"] = 1
    (root / "dataset.json").write_text(json.dumps(m))
    tracemalloc.start()
    try:
        res = verify_dataset(str(root), threads=1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert res["samples"] == 1
    assert peak < 24 << 20, f"verify held {peak / 2**20:.0f} MiB for a {big >> 20} MiB unknown member"


# -- 4. JSON bombs in manifests and labels name their file --------------------------------


@pytest.mark.parametrize("payload,what", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"format": "csl-shards", "version": ' + b"1" * 5000 + b"}", "not valid JSON"),
    (b'{"format": "csl-shards", "classes": ["\xff"]}', "not UTF-8"),
])
def test_manifest_bombs_name_the_file(tmp_path, capsys, payload, what):
    (tmp_path / "dataset.json").write_bytes(payload)
    rc, _, err = cli(capsys, "shards", "verify", str(tmp_path))
    assert rc == 2 and f"{tmp_path}/dataset.json" in err and what in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("label,what", [(b"[" * 100_000, "nested too deeply"),
                                        (b'{"pos": [' + b"7" * 5000 + b'], "neg": []}', "not valid JSON")])
def test_label_bombs_are_skipped_or_named(tmp_path, label, what):
    root = tmp_path / "ds"
    recs = records(6)
    write_dataset(str(root), CLASSES, {"train": recs}, shard_samples=6)
    shard = root / "train" / "train-000000.tar"
    with tarfile.open(shard) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    _tar(shard, [(n, label if n == "s0002.json" else d) for n, d in members])
    s = ShardStream(str(root), "train", batch_size=3, image_size=8, corrupt="skip")
    assert sorted(k for b in s for k in b["key"]) == [r.key for r in recs if r.key != "s0002"]
    assert s.corrupt_samples == 1
    with pytest.raises(CorruptSampleError, match=rf"train-000000\.tar sample 's0002'.*{what}"):
        list(ShardStream(str(root), "train", batch_size=3, image_size=8, corrupt="fail"))


# -- 7. a manifest count smaller than its shard is not read as a silent prefix ------------


def test_shard_longer_than_its_manifest_entry(tmp_path, caplog):
    root = tmp_path / "ds"
    write_dataset(str(root), CLASSES, {"train": records(8)}, shard_samples=4)
    m = json.loads((root / "dataset.json").read_text())
    m["splits"]["train"]["shards"][1]["samples"] = 3
    m["splits"]["train"]["samples"] = 7
    (root / "dataset.json").write_text(json.dumps(m))
    with caplog.at_level("WARNING", logger="data_shards.stream"):
        s = ShardStream(str(root), "train", batch_size=2, image_size=8, shuffle=False)
        assert len([k for b in s for k in b["key"]]) == 7
    assert "train-000001.tar: holds more than the 3 samples the manifest lists" in caplog.text
    with pytest.raises(CorruptSampleError, match="train-000001.tar: holds more than the 3 samples"):
        list(ShardStream(str(root), "train", batch_size=2, image_size=8, shuffle=False, corrupt="fail"))
    res = verify_dataset(str(root))
    assert any("holds 4 samples, manifest says 3" in p["what"] for p in res["problems"])


# -- 5/6. killed conversions leave no workers; errors carry no credentials ----------------


_POOL_PARENT = """
import os, sys, time
from data_shards.writer import parallel_map
def work(i):
    time.sleep(0.2)
    return os.getpid()
seen = set()
for pid in parallel_map(work, range(10_000), workers=2):
    if pid not in seen:
        seen.add(pid)
        print(pid, flush=True)
"""


def test_killed_conversion_leaves_no_pool_workers():
    p = subprocess.Popen([sys.executable, "-c", _POOL_PARENT], stdout=subprocess.PIPE, text=True,
                         cwd=str(Path(__file__).parents[1]))
    try:
        assert p.stdout is not None
        pids = [int(p.stdout.readline()) for _ in range(2)]
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    deadline = time.monotonic() + 20
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in pids if Path(f"/proc/{pid}").exists()
                 and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"]
        time.sleep(0.1)
    assert not alive, f"pool workers {alive} outlived their killed parent"


def test_redact_strips_user_info_and_signed_queries():
    text = "image not found: https://bob:s3cr3t@host.example/a/1.jpg?X-Amz-Signature=deadbeef&x=1 (s3://b/k.jpg)"
    out = redact(text)
    assert "s3cr3t" not in out and "deadbeef" not in out and "bob" not in out
    assert "https://host.example/a/1.jpg?<redacted>" in out and "s3://b/k.jpg" in out


def test_cli_errors_carry_no_credentials(capsys):
    rc, out, err = cli(capsys, "shards", "verify", "memory://bob:s3cr3t@nowhere/ds?X-Amz-Signature=deadbeef")
    assert rc == 2 and "memory://nowhere/ds?<redacted>" in err and "not found" in err
    assert "s3cr3t" not in out + err and "deadbeef" not in out + err


# -- 9. verify prints names from tars with control characters escaped ---------------------


def test_verify_escapes_control_characters(tmp_path, capsys):
    root = tmp_path / "ds"
    write_dataset(str(root), CLASSES, {"train": records(4)}, shard_samples=4)
    shard = root / "train" / "train-000000.tar"
    with tarfile.open(shard) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    evil = "s\x1b]0;pwned\x07\x1b[2J"
    _tar(shard, [(n.replace("s0001", evil), b"not json" if n == "s0001.json" else d) for n, d in members])
    rc, out, _ = cli(capsys, "shards", "verify", str(root), "--workers", "0")
    assert rc == 1 and "\x1b" not in out and "\x07" not in out and "s\\x1b]0;pwned" in out
    rc, out, _ = cli(capsys, "shards", "verify", str(root), "--json", "--workers", "0")
    assert rc == 1 and "\x1b" not in out


def test_empty_split_through_a_converter_exits_2(tmp_path, capsys):
    rc, _, err = cli(capsys, "shards", "synthetic", "--out", str(tmp_path / "ds"), "--train", "0", "--val", "0",
                     "--workers", "0")
    assert rc == 2 and "no samples" in err and not Path(tmp_path, "ds", "dataset.json").exists()


# -- 7. training goes on through batches with nothing left --------------------------------


@pytest.mark.integration
def test_training_completes_through_empty_batches(tmp_path):
    """`run_training` in this process (one gloo rank, no Ray): three of four shards are empty
    files, so most batches arrive with zero rows; every step still runs and the skips are
    counted in metrics.jsonl and eval.json."""
    import contextlib

    from data_shards.sources.synthetic import build_synthetic
    from trainer.config import load_config
    from trainer.loop import Hooks, run_training

    root = str(tmp_path / "syn")
    build_synthetic(root, train=32, val=8, image_size=32, shard_samples=8, seed=3, progress=False)
    for i in (1, 2, 3):
        Path(root, "train", f"train-{i:06d}.tar").write_bytes(b"")
    cfg = load_config("synthetic-cpu", [f"data.root={root}", "data.image_size=32", "data.batch_size=4",
                                        "data.workers=0", "data.shuffle_buffer=1", "train.epochs=1", "train.log_every=1",
                                        "checkpoint.every_steps=0", "cluster.workers=1"])
    sizes = [len(b["key"]) for b in ShardStream(root, "train", batch_size=4, image_size=32, seed=cfg.train.seed,
                                                  shuffle_buffer=1)]  # what the loop will see
    assert sizes.count(0) >= 4 and sum(sizes) == 8
    reports: list[dict] = []
    hooks = Hooks(report=lambda metrics, local, name: reports.append(metrics),
                  restore_dir=lambda: contextlib.nullcontext(None))
    run_dir = str(tmp_path / "run")
    res = run_training(cfg, run_dir, rank=0, world_size=1, hooks=hooks)
    lines = [json.loads(ln) for ln in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    steps = [ln for ln in lines if "loss" in ln]
    assert [ln["step"] for ln in steps] == list(range(1, 9))  # 32 samples / 4: every step ran
    assert all(np.isfinite(ln["loss"]) for ln in steps)
    assert steps[-1]["skipped_samples"] == 24 and res["skipped_samples"] == 24
    assert json.loads(Path(run_dir, "eval.json").read_text())["skipped_samples"] == 24


# -- 8. a tampered run folder: JSON state files are guarded like manifests ----------------


def test_tampered_checkpoint_state_is_one_line_naming_the_file(tmp_path, capsys):
    from trainer.config import Config
    from trainer.models import build_model
    from trainer.checkpoint import write_weights_checkpoint as write_checkpoint

    cfg = Config()
    ckpt = str(tmp_path / "ckpt")
    write_checkpoint(ckpt, build_model(cfg.model, C).state_dict(), cfg.model_dump(mode="json"), CLASSES)
    Path(ckpt, "csl_state.json").write_bytes(b"[" * 100_000)
    rc, _, err = cli(capsys, "export", "--checkpoint", ckpt, "--out", str(tmp_path / "m.safetensors"))
    assert rc == 2 and "csl_state.json" in err and "nested too deeply" in err and "Traceback" not in err
