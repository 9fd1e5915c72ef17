"""Training augmentation (data_shards/augment.py, `data.augment`): the same (seed, epoch, sample)
gives the same pixels whatever the worker count or resume point, epochs differ, each op keeps the
image's shape and dtype, Cutout fills the stated square, and evaluation and the prior pass never
augment. Tiny 24 px images with structure (gradients and a block) so every op has work to do.
"""

from __future__ import annotations

import copy
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from data_shards.augment import REFERENCE, Augmenter, AugmentSpec, CutoutSpec, cutout, randaugment_ops
from data_shards.decode import decode_image
from data_shards.format import ClassInfo, Record
from data_shards.shard_reader import iter_shard
from data_shards.storage import join, read_manifest
from data_shards.stream import ShardStream
from data_shards.writer import write_dataset
from trainer.config import ConfigError, load_config

C, S = 5, 24


def _image(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:S, 0:S]
    arr = np.stack([x * 10, y * 10, (x + y) * 5], -1).astype(np.uint8) ^ rng.integers(0, 256, 3, dtype=np.uint8)
    arr[3:9, 2:7] = rng.integers(0, 256, 3, dtype=np.uint8)
    return arr


def _jpeg(i: int) -> bytes:
    bio = io.BytesIO()
    Image.fromarray(_image(i)).save(bio, "JPEG", quality=95)
    return bio.getvalue()


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("aug"))
    recs = [Record(key=f"s{i:03d}", image=_jpeg(i), pos=[i % C], neg=[(i + 2) % C]) for i in range(36)]
    write_dataset(root, [ClassInfo(id=f"/m/{c}", name=f"c{c}") for c in range(C)], {"train": recs}, shard_samples=8)
    return root


def _pixels(batches) -> dict[tuple[int, int], np.ndarray]:
    return {(s, i): img.numpy().copy() for b in batches
            for s, i, img in zip(b["shard"].tolist(), b["index"].tolist(), b["image"])}


def _stream(ds: str, workers: int = 0, **kw) -> ShardStream:
    return ShardStream(ds, "train", batch_size=4, image_size=S, num_workers=workers, seed=7, output="uint8",
                       **{"augment": REFERENCE, **kw})


def _epoch(stream: ShardStream, epoch: int = 0) -> dict[tuple[int, int], np.ndarray]:
    stream.set_epoch(epoch)
    try:
        return _pixels(stream)
    finally:
        stream.close()


def _plain(ds: str) -> dict[tuple[int, int], np.ndarray]:
    """Every train sample decoded with no transform at all, by (shard, index)."""
    m = read_manifest(ds)
    return {(j, i): decode_image(raw.members["jpg"], S) for j, s in enumerate(m.split("train").shards)
            for i, raw in iter_shard(join(ds, s.path), 0, s.samples)}


def test_same_sample_same_pixels_across_worker_counts_and_restarts(ds):
    ref = _epoch(_stream(ds, 0))
    assert len(ref) == 36
    assert _epoch(_stream(ds, 2)).keys() == ref.keys()
    assert all(np.array_equal(v, ref[k]) for k, v in _epoch(_stream(ds, 2)).items())
    # a stream stopped after 3 batches, its cursor restored into a fresh one (other processes)
    first = _stream(ds, 2)
    it = iter(first)
    seen = _pixels([next(it) for _ in range(3)])
    state = first.state_dict()
    first.close()
    again = _stream(ds, 2)
    again.load_state_dict(state)
    rest = _epoch(again)
    assert seen.keys().isdisjoint(rest.keys()) and len(seen) + len(rest) == 36
    assert all(np.array_equal(v, ref[k]) for k, v in {**seen, **rest}.items())


def test_other_epoch_other_pixels_and_augmentation_changes_pixels(ds):
    e0, e1, plain = _epoch(_stream(ds)), _epoch(_stream(ds), 1), _plain(ds)
    assert sum(not np.array_equal(e0[k], e1[k]) for k in e0) >= 0.9 * len(e0)
    assert sum(not np.array_equal(e0[k], plain[k]) for k in e0) >= 0.9 * len(e0)
    assert all(v.dtype == np.uint8 and v.shape == (S, S, 3) for v in e0.values())


def test_eval_streams_and_switched_off_ops_never_augment(ds, monkeypatch):
    plain = _plain(ds)
    # train_transform=False, as evaluation and the prior pass build their streams: the spec is ignored
    ev = _pixels(ShardStream(ds, "train", batch_size=4, image_size=S, shuffle=False, train_transform=False,
                             augment=REFERENCE, output="uint8"))
    assert ev.keys() == plain.keys() and all(np.array_equal(v, plain[k]) for k, v in ev.items())
    off = _epoch(_stream(ds, augment=load_config("synthetic-cpu", ["data.augment.flip=false", "data.augment.cutout=false",
                                                                    "data.augment.randaugment=false"]).data.augment.spec()))
    assert all(np.array_equal(v, plain[k]) for k, v in off.items())


def test_each_randaugment_op_keeps_shape_and_dtype_and_the_reference_set():
    ops = randaugment_ops(10.0)
    names = [op.name for op in ops]
    assert len(names) == 15 and "PosterizeOriginal" in names and "Invert" in names and "PosterizeIncreasing" not in names
    assert all(op.prob == 0.5 and op.magnitude_std == float("inf") for op in ops)  # the reference's draw
    img = Image.fromarray(_image(3))
    random.seed(0)
    changed = 0
    for op in ops:
        forced = copy.copy(op)
        forced.prob = 1.0
        for _ in range(3):
            out = forced(img.copy())
            arr = np.asarray(out)
            assert out.mode == "RGB" and arr.shape == (S, S, 3) and arr.dtype == np.uint8, op.name
            changed += not np.array_equal(arr, np.asarray(img))
    assert changed >= 0.8 * 3 * len(ops)  # the ops do act on the image


@pytest.mark.parametrize("fraction,side", [(0.5, 12), (0.25, 6), (1.0, 24)])
def test_cutout_fills_a_square_of_the_stated_fraction_clipped_at_the_border(fraction, side):
    def filled(centre):
        img = Image.new("RGB", (S, S), (10, 20, 30))
        arr = np.asarray(cutout(img, fraction, centre, (200, 100, 0)))
        mask = (arr == (200, 100, 0)).all(-1)
        assert ((arr == (10, 20, 30)).all(-1) | mask).all()  # nothing else touched
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert mask.sum() == len(rows) * len(cols)  # one axis-aligned rectangle
        return len(rows), len(cols)

    assert filled((S // 2, S // 2)) == (side, side)  # fraction x side, squared: the stated area
    assert filled((0, S - 1)) == (side // 2 + 1, side - side // 2)  # at a corner: clipped, as the reference's


def test_cutout_draws_centre_and_colour_from_the_sample_key():
    aug = Augmenter(AugmentSpec(flip=False, cutout=CutoutSpec(0.5)))
    outs = [np.asarray(aug(Image.new("RGB", (S, S), (0, 0, 0)), key=k)) for k in range(40)]
    assert all(np.array_equal(np.asarray(aug(Image.new("RGB", (S, S), (0, 0, 0)), key=k)), outs[k]) for k in range(3))
    areas = [int(o.any(-1).sum()) for o in outs]
    assert max(areas) <= 12 * 12 and max(areas) == 144  # whole squares where the centre allows
    assert len({tuple(o.reshape(-1, 3).max(0)) for o in outs}) > 30  # a random colour per key


def test_the_global_random_and_the_pixels_do_not_touch(monkeypatch):
    """Read in the training process (num_workers=0), a stream shares the global `random` with
    other threads: their draws mid-sample must not change the pixels, nor ours their sequence."""
    import data_shards.augment as augment

    aug = Augmenter(REFERENCE)
    img = _image(1)
    random.seed(123)
    sequence = [random.random() for _ in range(3)]
    random.seed(123)
    expected = [np.asarray(aug(Image.fromarray(img), key=k)) for k in range(20)]
    assert [random.random() for _ in range(3)] == sequence
    cut = augment.cutout

    def cutout_then_another_thread_draws(*args):
        random.random()  # what a thread running between the cutout and the RandAugment ops would do
        return cut(*args)

    monkeypatch.setattr(augment, "cutout", cutout_then_another_thread_draws)
    got = [np.asarray(aug(Image.fromarray(img), key=k)) for k in range(20)]
    assert all(np.array_equal(a, b) for a, b in zip(got, expected))


def test_config_switches_settings_and_presets():
    base = load_config("synthetic-cpu", ["data.augment.cutout=false", "data.augment.randaugment=false"]).data.augment
    assert base.spec() == AugmentSpec(flip=True)
    on = load_config("synthetic-cpu", ["data.augment.cutout=true", "data.augment.randaugment=true"]).data.augment.spec()
    assert on.cutout == CutoutSpec(0.5, None) and on.randaugment.num_ops == 2 and on.randaugment.magnitude == 10
    cfg = load_config("synthetic-cpu", ["data.augment.cutout={fraction: 0.3, fill: [1, 2, 3]}",
                                        "data.augment.randaugment.magnitude=6", "data.augment.randaugment.enabled=true"])
    spec = cfg.data.augment.spec()
    assert spec.cutout == CutoutSpec(0.3, (1, 2, 3)) and spec.randaugment.magnitude == 6
    assert type(cfg).model_validate(cfg.model_dump(mode="json")) == cfg  # crosses the Ray boundary intact
    for name in ("openimages-v6-tresnet-m", "openimages-v6-resnet50", "coco-fpc-1000", "lvis"):
        assert load_config(name).data.augment.spec() == REFERENCE, name  # the reference's transform
    for bad, word in [("data.augment.cutout.fill=blue", "fill"), ("data.augment.cutout.fraction=0", "fraction"),
                      ("data.augment.randaugment.magnitude=11", "magnitude"), ("data.augment.cutout.size=3", "size")]:
        with pytest.raises(ConfigError, match=word):
            load_config("synthetic-cpu", [bad])


def test_evaluation_and_prior_pass_build_no_augmenter(ds, tmp_path, monkeypatch):
    """Both read a checkpoint whose config augments; neither may build a training transform."""
    from trainer.checkpoint import write_weights_checkpoint
    from trainer.inference import evaluate_checkpoint
    from trainer.models import build_model
    from trainer.prior_scoring import score_shards

    cfg = load_config("synthetic-cpu", [f"data.image_size={S}", "data.augment.cutout=true", "data.augment.randaugment=true"])
    m = read_manifest(ds)
    torch.manual_seed(0)
    model = build_model(cfg.model, m.num_classes).eval()
    ckpt = write_weights_checkpoint(str(tmp_path / "checkpoint_00000001"), model.state_dict(),
                                    cfg.model_dump(mode="json"), m.classes, step=1)

    def refuse(self, spec):
        raise AssertionError(f"an augmenter was built: {spec}")

    monkeypatch.setattr(Augmenter, "__init__", refuse)
    with pytest.raises(AssertionError, match="augmenter was built"):
        _stream(ds)  # the guard is live
    res = evaluate_checkpoint(ckpt, ds, split="train", device="cpu", workers=0, batch_size=8)
    assert res["samples"] == 36
    rows = list(score_shards(model, ds, "train", m, list(range(len(m.split("train").shards))), image_size=S,
                             batch_size=8, workers=0, device=torch.device("cpu")))
    assert sum(r.count for r in rows) == 36
