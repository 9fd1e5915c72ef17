"""Hostile and broken input: pickles are never unpickled; truncated tars, bad JPEGs, bad JSON,
out-of-range class ids and missing members follow the corrupt-sample policy (skip: counted and
logged with shard and key, the rest still comes; fail: an error naming shard and key)."""

from __future__ import annotations

import builtins
import io
import logging
import os
import pickle
import re
import tarfile
from pathlib import Path

import pytest

from data_shards.format import ClassInfo, Record
from data_shards.stream import CorruptSampleError, ShardStream
from data_shards.writer import write_dataset

from test_stream import C, make_dataset, records

N = 40  # shards of 7: 7,7,7,7,7,5


class Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def shard(root: str, i: int) -> Path:
    return Path(root, "train", f"train-{i:06d}.tar")


def rewrite(path: Path, edit) -> None:
    """Rewrite a tar, passing each (name, data) through `edit` (None drops the member)."""
    with tarfile.open(path) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=tarfile.USTAR_FORMAT) as out:
        for name, data in members:
            data = edit(name, data)
            if data is None:
                continue
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            out.addfile(ti, io.BytesIO(data))
    path.write_bytes(bio.getvalue())


def stream(root: str, policy: str = "skip", nw: int = 0, bs: int = 4, shuffle: bool = True) -> ShardStream:
    return ShardStream(root, "train", batch_size=bs, image_size=8, num_workers=nw, corrupt=policy,
                       shuffle=shuffle, shuffle_buffer=5, seed=2)


def all_keys(s: ShardStream) -> list[str]:
    return sorted(k for b in s for k in b["key"])


@pytest.fixture
def ds(tmp_path) -> str:
    make_dataset(str(tmp_path), n=N, shard_samples=7)
    return str(tmp_path)


@pytest.mark.parametrize("nw", [0, 2])
def test_pickle_members_are_never_unpickled(tmp_path, nw):
    marker = tmp_path / "pwned"
    evil = pickle.dumps(Evil(str(marker)))
    fn, args = Evil(str(marker)).__reduce__()
    fn(*args).close()  # what unpickling `evil` would run: the payload works...
    assert marker.exists()
    marker.unlink()
    recs = [Record(r.key, r.image, r.pos, r.neg, extra={"pyd": evil, "pkl": evil, "pth": evil}) for r in records(12)]
    root = str(tmp_path / "ds")
    write_dataset(root, [ClassInfo(id=f"/m/{c}", name=f"c{c}") for c in range(C)], {"train": recs}, shard_samples=5)
    for policy in ("skip", "fail"):
        s = ShardStream(root, "train", batch_size=3, image_size=8, num_workers=nw, corrupt=policy)
        assert all_keys(s) == [r.key for r in recs]
        assert s.corrupt_samples == 0
    assert not marker.exists()  # ...and the stream never did


def test_truncated_tar_skip_and_fail(ds, caplog):
    p = shard(ds, 2)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="data_shards.stream"):
        s = stream(ds)
        got = all_keys(s)
    lost = N - len(got)
    assert 0 < lost <= 7 and s.corrupt_samples == lost
    shard2 = {f"s{i:04d}" for i in range(14, 21)}
    assert set(got) >= {r.key for r in records(N)} - shard2  # everything else still comes
    assert "train-000002.tar" in caplog.text and "truncated" in caplog.text
    with pytest.raises(CorruptSampleError, match=r"train-000002\.tar.*(after key 's00\d\d'|sample)"):
        list(stream(ds, "fail"))


def test_shard_with_fewer_samples_than_manifest(ds):
    rewrite(shard(ds, 1), lambda name, data: data if name < "s0010" else None)  # keeps s0007..s0009
    s = stream(ds)
    got = all_keys(s)
    assert s.corrupt_samples == 4 and len(got) == N - 4
    with pytest.raises(CorruptSampleError, match=r"train-000001\.tar.*tar ends after 3 samples"):
        list(stream(ds, "fail"))


def test_not_a_tar_at_all(ds):
    shard(ds, 3).write_bytes(os.urandom(3000))
    s = stream(ds, bs=8, shuffle=False)
    assert len(all_keys(s)) == N - 7 and s.corrupt_samples == 7


@pytest.mark.parametrize("nw", [0, 2])
def test_a_batch_with_nothing_left_is_empty_and_the_epoch_completes(ds, caplog, nw):
    shard(ds, 1).write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="data_shards.stream"):
        s = stream(ds, bs=2, shuffle=False, nw=nw)
        batches = list(s)
    assert len(batches) == len(s)  # every rank still takes the same number of steps
    sizes = [len(b["key"]) for b in batches]
    assert 0 in sizes and sum(sizes) == N - 7 and s.corrupt_samples == 7
    empty = batches[sizes.index(0)]
    assert tuple(empty["image"].shape) == (0, 3, 8, 8) and tuple(empty["target"].shape) == (0, C)
    if nw == 0:
        assert "all 2 samples are corrupt" in caplog.text and "train-000001.tar" in caplog.text
    assert s.state_dict()["epoch"] == 1 and s.state_dict()["batch"] == 0


@pytest.mark.parametrize(
    "member,payload,reason",
    [
        ("s0009.jpg", b"\xff\xd8\xff\xe0 definitely not a jpeg", "cannot decode image"),
        ("s0009.json", b'{"pos": [1, ', "not valid JSON"),
        ("s0009.json", b'{"pos": [99], "neg": []}', "out of range"),
        ("s0009.json", b'{"pos": [2, 1], "neg": []}', "not ascending"),
        ("s0009.json", None, "needs one image member .* and a .json member"),
        ("s0009.jpg", None, "needs one image member .* and a .json member"),
    ],
)
@pytest.mark.parametrize("nw", [0, 2])
def test_bad_sample_skip_counts_and_logs_fail_names_shard_and_key(ds, caplog, member, payload, reason, nw):
    rewrite(shard(ds, 1), lambda name, data: payload if name == member else data)
    with caplog.at_level(logging.WARNING, logger="data_shards.stream"):
        s = stream(ds, nw=nw)
        got = all_keys(s)
    assert s.corrupt_samples == 1
    assert got == sorted(r.key for r in records(N) if r.key != "s0009")
    if nw == 0:  # worker processes log to their own stderr
        assert "train-000001.tar" in caplog.text and "'s0009'" in caplog.text and re.search(reason, caplog.text)
    with pytest.raises(CorruptSampleError, match=rf"train-000001\.tar sample 's0009'.*{reason}"):
        list(stream(ds, "fail", nw=nw))


def test_skip_count_survives_resume(ds):
    rewrite(shard(ds, 0), lambda name, data: b"junk" if name == "s0003.jpg" else data)
    s = stream(ds, shuffle=False)
    it = iter(s)
    next(it)
    state = s.state_dict()
    del it
    assert state["corrupt"] == 1
    t = stream(ds, shuffle=False)
    t.load_state_dict(state)
    list(t)
    assert t.corrupt_samples == 1


def test_unknown_and_odd_members_are_ignored(tmp_path):
    recs = [Record(r.key, r.image, r.pos, r.neg, extra={"txt": b"hello", "seg.png": b"\x89PNG junk", "cls": b"3"})
            for r in records(9)]
    root = str(tmp_path)
    write_dataset(root, [ClassInfo(id=f"/m/{c}", name=f"c{c}") for c in range(C)], {"train": recs}, shard_samples=4)

    # A directory entry, a symlink and a metadata-looking member inside a shard.
    p = shard(root, 0)
    with tarfile.open(p) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=tarfile.USTAR_FORMAT) as out:
        d = tarfile.TarInfo("somedir")
        d.type = tarfile.DIRTYPE
        out.addfile(d)
        ln = tarfile.TarInfo("s0000.jpg.lnk")
        ln.type, ln.linkname = tarfile.SYMTYPE, "/etc/passwd"
        out.addfile(ln)
        for m, data in members:
            out.addfile(m, io.BytesIO(data))
    p.write_bytes(bio.getvalue())
    s = ShardStream(root, "train", batch_size=3, image_size=8, corrupt="fail")
    assert all_keys(s) == [r.key for r in recs]


class _Flaky:
    """A file that dies with a connection reset after `fail_after` bytes."""

    def __init__(self, f, fail_after: int):
        self.f, self.left = f, fail_after

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0:
            raise ConnectionResetError("simulated connection reset")
        data = self.f.read(n if n >= 0 and n <= self.left else self.left)
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.f.close()


def test_transient_io_errors_are_retried_exactly(ds, monkeypatch):
    import data_shards.shard_reader as stream_mod

    monkeypatch.setattr(stream_mod, "_RETRY_BASE_S", 0.0)
    real = stream_mod.open_file
    opens: dict[str, int] = {}

    def flaky_open(url, mode="rb"):
        name = url.rsplit("/", 1)[-1]
        opens[name] = opens.get(name, 0) + 1
        if name == "train-000003.tar" and opens[name] == 1:
            raise ConnectionRefusedError("simulated refusal")
        f = real(url, mode)
        if name == "train-000002.tar" and opens[name] == 1:
            return _Flaky(f, 5000)  # dies mid-shard, after a couple of samples
        return f

    want = [b["key"] for b in stream(ds)]
    monkeypatch.setattr(stream_mod, "open_file", flaky_open)
    s = stream(ds)
    assert [b["key"] for b in s] == want and s.corrupt_samples == 0
    assert opens["train-000002.tar"] == 2 and opens["train-000003.tar"] == 2


def test_missing_shard_is_an_error_under_either_policy(ds):
    from data_shards.shard_reader import ShardReadError

    shard(ds, 4).unlink()
    for policy in ("skip", "fail"):
        with pytest.raises(ShardReadError, match=r"train-000004\.tar"):
            list(stream(ds, policy))
