"""The training stream: round trip, plain-webdataset/Ray readability, determinism, exactly-once
coverage across ranks and workers, exact resume (torchtitan-style), S3.

Datasets are tiny (16x16 JPEGs, uneven shards) so the module runs in seconds on 2 cores.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from data_shards.decode import decode_image, normalize
from data_shards.format import ClassInfo, Record
from data_shards.partition import rank_batches
from data_shards.stream import ResumeError, ShardStream
from data_shards.writer import write_dataset

C = 6


def jpeg(i: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(i)
    arr = np.full((size, size, 3), rng.integers(0, 256, 3), dtype=np.uint8)
    arr[: size // 2, : size // 4] = 255 - arr[0, 0]  # asymmetric, so a flip is visible
    bio = io.BytesIO()
    Image.fromarray(arr).save(bio, "JPEG", quality=95)
    return bio.getvalue()


def records(n: int, prefix: str = "s") -> list[Record]:
    out = []
    for i in range(n):
        pos = sorted({i % C, (i * 7) % C})
        neg = [c for c in [(i + 3) % C] if c not in pos]
        out.append(Record(key=f"{prefix}{i:04d}", image=jpeg(i), pos=pos, neg=neg))
    return out


def make_dataset(root: str, n: int = 40, shard_samples: int = 7, val: int = 0) -> None:
    classes = [ClassInfo(id=f"/m/{c}", name=f"class{c}") for c in range(C)]
    splits = {"train": records(n)}
    if val:
        splits["val"] = records(val, prefix="v")
    write_dataset(root, classes, splits, shard_samples=shard_samples)


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("ds"))
    make_dataset(root, n=40, shard_samples=7, val=11)  # shards 7,7,7,7,7,5
    return root


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("big"))
    make_dataset(root, n=130, shard_samples=9)
    return root


def keys(batches) -> list[list[str]]:
    return [b["key"] for b in batches]


def test_round_trip_keys_and_labels(ds):
    s = ShardStream(ds, "train", batch_size=4, image_size=16, shuffle=False, train_transform=False)
    got = list(s)
    assert len(got) == len(s) == 10
    want = {r.key: r for r in records(40)}
    flat = [k for b in got for k in b["key"]]
    assert flat == sorted(want)  # eval order is manifest order
    for b in got:
        assert b["image"].dtype == torch.float32 and b["image"].shape[1:] == (3, 16, 16)
        assert b["target"].dtype == torch.int8 and b["target"].shape == (len(b["key"]), C)
        for k, t in zip(b["key"], b["target"]):
            r = want[k]
            assert torch.nonzero(t == 1).flatten().tolist() == r.pos
            assert torch.nonzero(t == -1).flatten().tolist() == r.neg
    # Eval images equal the in-memory decode, normalised.
    first = decode_image(want[flat[0]].image, 16).astype(np.float32) / 255.0
    ref = (torch.from_numpy(first).permute(2, 0, 1) - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]
    ).view(3, 1, 1)
    assert torch.allclose(got[0]["image"][0], ref, atol=1e-5)


def test_plain_webdataset_reads_the_shards(ds):
    import webdataset as wds

    urls = sorted(str(p) for p in Path(ds, "train").glob("*.tar"))
    got = {s["__key__"]: json.loads(s["json"]) for s in wds.WebDataset(urls, shardshuffle=False)}
    want = {r.key: r for r in records(40)}
    assert set(got) == set(want)
    assert all(got[k]["pos"] == want[k].pos and got[k]["neg"] == want[k].neg for k in want)


@pytest.mark.integration
def test_ray_data_reads_the_shards(ds, ray_connected):
    import ray.data

    rows = ray.data.read_webdataset(f"{ds}/train", decoder=None).take_all()
    assert len(rows) == 40
    got = {r["__key__"]: r for r in rows}
    r5 = records(40)[5]
    assert json.loads(bytes(got[r5.key]["json"]))["pos"] == r5.pos


def test_same_seed_same_batches_other_epoch_other_order(ds):
    mk = lambda seed: ShardStream(ds, "train", batch_size=4, image_size=16, seed=seed, shuffle_buffer=5)  # noqa: E731
    a, b = mk(1), mk(1)
    ea, eb = list(a), list(b)
    assert keys(ea) == keys(eb)
    assert all(torch.equal(x["image"], y["image"]) for x, y in zip(ea, eb))
    e1 = list(a)  # the cursor moved to epoch 1 by itself
    assert a.epoch == 2 and keys(e1) != keys(ea)
    assert sorted(sum(keys(e1), [])) == sorted(sum(keys(ea), []))
    assert keys(list(mk(2))) != keys(ea)
    b.set_epoch(1)
    assert keys(list(b)) == keys(e1)


@pytest.mark.parametrize("ws,nw", [(1, 0), (2, 0), (3, 0), (2, 2), (3, 2)])
def test_every_sample_once_per_epoch_across_ranks_and_workers(ds, ws, nw):
    per_rank = []
    for r in range(ws):
        s = ShardStream(ds, "train", batch_size=3, image_size=8, rank=r, world_size=ws, num_workers=nw,
                        seed=3, shuffle_buffer=4)
        s.set_epoch(1)
        got = list(s)
        assert len(got) == len(s)
        per_rank.append(got)
        # The stream executes exactly the pure plan.
        plan = rank_batches([7, 7, 7, 7, 7, 5], rank=r, world_size=ws, num_workers=nw, batch_size=3,
                            epoch=1, seed=3, shuffle_buffer=4)
        assert [np.stack([b["shard"].numpy(), b["index"].numpy()], 1).tolist() for b in got] == [p.tolist() for p in plan]
    assert len({len(g) for g in per_rank}) == 1
    flat = [k for g in per_rank for b in g for k in b["key"]]
    assert sorted(flat) == sorted(r.key for r in records(40))


def test_eval_split_every_sample_once_equal_batches(ds):
    got = [list(ShardStream(ds, "val", batch_size=2, image_size=8, rank=r, world_size=3, shuffle=False,
                            train_transform=False)) for r in range(3)]
    assert [len(g) for g in got] == [2, 2, 2]
    assert sorted(k for g in got for b in g for k in b["key"]) == [f"v{i:04d}" for i in range(11)]


def _same(xs, ys) -> bool:
    return len(xs) == len(ys) and all(
        x["key"] == y["key"] and torch.equal(x["image"], y["image"]) and torch.equal(x["target"], y["target"])
        for x, y in zip(xs, ys)
    )


def take(stream: ShardStream, n: int) -> list:
    """The next n batches, crossing epoch boundaries; the iterator is dropped mid-epoch."""
    out = []
    while len(out) < n:
        it = iter(stream)
        for b in it:
            out.append(b)
            if len(out) == n:
                break
        del it
    return out


@pytest.mark.parametrize("nw", [0, 2])
def test_resume_yields_exactly_the_next_batches(ds, nw):
    kw = dict(batch_size=3, image_size=8, rank=1, world_size=2, num_workers=nw, seed=7, shuffle_buffer=5)
    ref = ShardStream(ds, "train", **kw)
    per_epoch = len(ref)
    full = take(ref, 2 * per_epoch)
    for k in (1, 2, 5, per_epoch - 1, per_epoch, per_epoch + 2):  # mid-shard, mid-window, boundaries
        s = ShardStream(ds, "train", **kw)
        assert _same(take(s, k), full[:k])
        state = s.state_dict()
        assert (state["epoch"], state["batch"]) == divmod(k, per_epoch)
        fresh = ShardStream(ds, "train", **kw)
        fresh.load_state_dict(state)
        assert _same(take(fresh, 2 * per_epoch - k), full[k:])


def test_torchtitan_style_40_batches_then_rebuild(big):
    kw = dict(batch_size=2, image_size=8, num_workers=2, seed=11, shuffle_buffer=6)
    ref = list(ShardStream(big, "train", **kw))
    assert len(ref) == 65
    s = ShardStream(big, "train", **kw)
    it = iter(s)
    for _ in range(40):
        next(it)
    state = s.state_dict()
    del it
    assert state["batch"] == 40
    rebuilt = ShardStream(big, "train", **kw)
    rebuilt.load_state_dict(state)
    assert _same(list(rebuilt), ref[40:])


def test_persistent_workers_follow_the_cursor(ds):
    """One set of worker processes serves every epoch; set_epoch, load_state_dict and an early
    stop reach them, and their batches equal those of workers forked for each epoch."""
    kw = dict(batch_size=3, image_size=8, num_workers=2, seed=5, shuffle_buffer=4)
    fresh = ShardStream(ds, "train", persistent_workers=False, **kw)
    e0, e1 = list(fresh), list(fresh)
    assert fresh._loader is None or getattr(fresh._loader, "_iterator", None) is None
    s = ShardStream(ds, "train", **kw)
    assert _same(list(s), e0)
    pids = [w.pid for w in s._loader._iterator._workers]
    assert _same(take(s, 2), e1[:2])  # stopped mid-epoch: prefetched batches must be discarded
    s.load_state_dict({**s.state_dict(), "epoch": 0, "batch": 4})
    assert _same(list(s), e0[4:])
    assert _same(list(s), e1)
    s.set_epoch(0)
    assert _same(list(s), e0)
    assert [w.pid for w in s._loader._iterator._workers] == pids
    s.close()
    assert s._loader is None
    assert _same(list(s), e1)  # closing only costs a fresh start


@pytest.mark.parametrize("nw", [0, 2])
def test_uint8_output_is_the_float_output_before_normalize(ds, nw):
    """Held for a whole epoch, uint8 batches handed over through shared slots stay intact."""
    kw = dict(batch_size=4, image_size=8, seed=3, shuffle_buffer=5, num_workers=nw)
    f = list(ShardStream(ds, "train", **kw))
    u = list(ShardStream(ds, "train", output="uint8", **kw))
    assert [b["key"] for b in f] == [b["key"] for b in u]
    for a, b in zip(f, u):
        assert b["image"].dtype == torch.uint8 and b["image"].shape == (len(b["key"]), 8, 8, 3)
        assert torch.equal(normalize(b["image"]), a["image"])
    with pytest.raises(ValueError, match="output"):
        ShardStream(ds, "train", batch_size=4, image_size=8, output="fp16")


def test_cursor_is_rank_independent_and_checked(ds):
    kw = dict(batch_size=3, image_size=8, world_size=2, seed=1, shuffle_buffer=5)
    r0 = ShardStream(ds, "train", rank=0, **kw)
    it = iter(r0)
    for _ in range(3):
        next(it)
    state = r0.state_dict()
    r1 = ShardStream(ds, "train", rank=1, **kw)
    r1.load_state_dict(state)
    assert keys(list(r1)) == keys(list(ShardStream(ds, "train", rank=1, **kw)))[3:]
    for change in ({"world_size": 3, "rank": 0}, {"batch_size": 4}, {"num_workers": 2}, {"seed": 2}):
        other = ShardStream(ds, "train", **{**kw, "rank": 0, **change})
        with pytest.raises(ResumeError, match="mid-epoch"):
            other.load_state_dict(state)
        other.load_state_dict({**state, "batch": 0})  # an epoch boundary: allowed
        assert other.epoch == state["epoch"]


def test_stream_from_s3(s3_bucket):
    root = f"{s3_bucket}/ds"
    make_dataset(root, n=17, shard_samples=5)
    for nw in (0, 2):
        s = ShardStream(root, "train", batch_size=4, image_size=8, num_workers=nw, shuffle=False, train_transform=False)
        got = list(s)
        assert sorted(k for b in got for k in b["key"]) == [r.key for r in records(17)]


def test_real_photos_decode(openimages_dir, tmp_path):
    files = sorted((openimages_dir / "images").glob("*.jpg"))
    classes = [ClassInfo(id="/m/a", name="a"), ClassInfo(id="/m/b", name="b")]
    recs = [Record(key=f"p{i}", image=f.read_bytes(), pos=[i % 2], neg=[]) for i, f in enumerate(files)]
    write_dataset(str(tmp_path), classes, {"train": recs}, shard_samples=4)
    got = list(ShardStream(str(tmp_path), "train", batch_size=3, image_size=64))
    assert sum(len(b["key"]) for b in got) == len(files)
    assert all(b["image"].shape[1:] == (3, 64, 64) and torch.isfinite(b["image"]).all() for b in got)


def test_resume_reads_only_from_the_current_window(ds, monkeypatch):
    """Resume cost: shards wholly before the resume point are never opened."""
    import data_shards.shard_reader as reader_mod

    opened: list[str] = []
    real = reader_mod.open_file
    monkeypatch.setattr(reader_mod, "open_file", lambda url, mode="rb": (opened.append(url), real(url, mode))[1])
    kw = dict(batch_size=2, image_size=8, seed=4, shuffle_buffer=4)
    full = list(ShardStream(ds, "train", **kw))
    assert len(opened) == 6
    k = 15  # 30 of 40 samples consumed
    s = ShardStream(ds, "train", **kw)
    s.load_state_dict({**s.state_dict(), "batch": k})
    opened.clear()
    rest = list(s)
    assert _same(rest, full[k:])
    still_needed = {int(x) for b in rest for x in b["shard"]}
    assert len(opened) <= len(still_needed) + 1 < 6


def test_handoff_without_a_free_slot_falls_back_to_torch_tensors(ds, monkeypatch):
    """Every slot in use: batches still arrive, through torch's own hand-off, unchanged."""
    from data_shards.handoff import SlotPool

    kw = dict(batch_size=3, image_size=8, num_workers=2, seed=4, shuffle_buffer=5)
    ref = list(ShardStream(ds, "train", **kw))
    monkeypatch.setattr(SlotPool, "acquire", lambda self, worker, generation: -1)  # inherited by the fork
    got = list(ShardStream(ds, "train", **kw))
    assert _same(got, ref)
    assert all(b["target"].dtype == torch.int8 and b["shard"].dtype == torch.int64 for b in got)


def test_zero_copy_lends_the_slot_until_the_next_batch(ds):
    """The uint8 image is the shared slot itself (no copy), holding the same pixels as the owned
    copy for as long as the consumer has not asked for the next batch."""
    kw = dict(batch_size=4, image_size=8, seed=3, shuffle_buffer=5, num_workers=2, output="uint8")
    owned = list(ShardStream(ds, "train", **kw))
    s = ShardStream(ds, "train", zero_copy=True, **kw)
    lent, in_slot = [], []
    for b in s:
        in_slot.append(np.shares_memory(b["image"].numpy(), s._dataset.pool.images))
        lent.append((b["key"], b["image"].clone(), b["target"]))
    assert all(in_slot)
    assert [k for k, _, _ in lent] == [b["key"] for b in owned]
    assert all(torch.equal(a["image"], img) and torch.equal(a["target"], t) for a, (_, img, t) in zip(owned, lent))
    assert not any(np.shares_memory(t.numpy(), s._dataset.pool.targets) for _, _, t in lent)  # targets are owned
    for bad in (dict(output="float"), dict(output="uint8", pin_memory=True)):
        with pytest.raises(ValueError, match="zero_copy|pin_memory"):
            ShardStream(ds, "train", batch_size=4, image_size=8, zero_copy=True, **bad)


@pytest.mark.parametrize("nw", [0, 2])
def test_a_cursor_resumes_at_another_world_size_over_the_same_lanes(ds, nw):
    """4 ranks read 2 micro-batches each; 2 ranks (and 1, with 2 lanes per micro-batch) go on
    from that cursor: every sample exactly once, each in the batch the pure plan names."""
    from data_shards.partition import lane_layout, layout_rank_batches

    kw = dict(image_size=8, num_workers=nw, seed=4, shuffle_buffer=3, lanes=4)
    first = []
    for r in range(4):
        s = ShardStream(ds, "train", batch_size=2, rank=r, world_size=4, **kw)
        it = iter(s)
        first += [next(it) for _ in range(2)]
        state = s.state_dict()
    assert state["lane_index"] == 2
    for ws, q in ((2, 1), (1, 2), (1, 4)):
        rest = []
        for r in range(ws):
            s = ShardStream(ds, "train", batch_size=2 * q, rank=r, world_size=ws, lanes_per_batch=q, **kw)
            s.load_state_dict(state)
            got = list(s)
            plan = layout_rank_batches([7, 7, 7, 7, 7, 5], lane_layout(4, ws, r, q), num_workers=nw, lane_batch=2,
                                       epoch=0, seed=4, shuffle_buffer=3)
            skip = 2 * (4 // ws // q)
            assert [np.stack([b["shard"], b["index"]], 1).tolist() for b in got] == [p.tolist() for p in plan[skip:]]
            rest += got
        assert sorted(k for b in first + rest for k in b["key"]) == [r.key for r in records(40)]
    with pytest.raises(ValueError, match="world sizes that keep the run's order and global batch: 1, 2, 4"):
        ShardStream(ds, "train", batch_size=2, world_size=3, **kw)
