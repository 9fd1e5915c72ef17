"""Synthetic multi-label images with a known full ground truth: the embedded default's data.

Why a synthetic set: the CSL method is about a gap between annotation counts and true class
frequencies (paper 1, sec. 3.3). Measuring whether a prior estimator closes that gap needs the
truth, which no partially annotated real dataset has. Here every image is drawn from a sampled
description, so the full label vector is exact, and an annotation scheme is applied on top.

Content of an image (S x S pixels, drawn at 2S and box-reduced for anti-aliasing, mild noise,
JPEG quality 90):
- one scene/background (exactly one per image): sky, indoor, grass, night, water;
- 1-4 object instances; each object class is present independently with its own probability
  (a long tail from 30 % down to 3 %), a present class gets a second instance 20 % of the time,
  an empty draw gets one object, and more than 4 instances are cut to 4. Shapes have a dark
  outline so they read on every background, a random size (a diameter of 0.3-0.62 S, so
  >= 19 px at 64 px), position and rotation, and one of 8 clean colours;
- colour classes are true when some object has that colour; general concepts are derived from
  the content (>= 3 objects, a large object, a small object, daytime, nature, warm colours).
The groups give objects rare-to-moderate frequencies and colours/scenes/concepts common ones,
so a rank correlation between annotation counts and truth has room to be wrong.

Scheme `openimages` (paper 1, sec. 3.3) mimics how OpenImages was annotated: a true positive is
annotated with a per-class probability that depends on its group (objects 0.7-0.9, colours,
scenes and concepts 0.04-0.2), and each image gets 1-4 verified negatives drawn from its absent
classes, weighted toward objects (2x) and away from concepts (0.5x): OpenImages' verified
negatives are candidate labels a classifier proposed and a human rejected, mostly object-level.
Frequent colours and scenes thus get few positive annotations and objects many, as in the
paper's "Daytime"/"White" examples. The other schemes (`full`, `fpc:N`, ...) apply
`data_shards.simulate` to the split's full label matrix.

Determinism: the content of image i of split s is drawn from `default_rng([seed, split_id, i])`,
its pixels (background jitter, colour jitter, noise) from `[seed, split_id, i, 2]` and its
openimages annotation from `[seed, split_id, i, 1]`: the bytes do not depend on the number of
workers, and the images do not depend on the scheme. Other schemes are simulated in the parent
on the split's full matrix (content only, no drawing) with a seed derived from (seed, split).

Writing: `build_synthetic` makes each shard one job of `convert.py` (`draw_records` draws
images [start, stop) inside the task), in-process or as Ray tasks, resumable like any
conversion; `synthetic_records` still yields records through a process pool in chunks of 32
images (amortising per-task overhead) for callers that write them themselves.
"""

from __future__ import annotations

import io
import zlib
from functools import lru_cache
from typing import Iterator

import numpy as np

from ..format import ClassInfo, Manifest, Record
from ..simulate import Scheme, parse_scheme, simulate
from ..writer import parallel_map

__all__ = [
    "OBJECTS",
    "COLOURS",
    "SCENES",
    "CONCEPTS",
    "synthetic_classes",
    "class_groups",
    "synthetic_truth",
    "synthetic_records",
    "build_synthetic",
]

# (name, presence probability, openimages annotation rate)
OBJECTS = [
    ("circle", 0.30, 0.85), ("square", 0.24, 0.90), ("triangle", 0.19, 0.80), ("star", 0.15, 0.88),
    ("ring", 0.12, 0.75), ("cross", 0.10, 0.82), ("heart", 0.08, 0.90), ("diamond", 0.065, 0.72),
    ("arrow", 0.05, 0.86), ("hexagon", 0.04, 0.70), ("crescent", 0.035, 0.80), ("bolt", 0.03, 0.78),
]  # fmt: skip
# (name, probability per object, openimages annotation rate, RGB)
COLOURS = [
    ("red", 0.22, 0.12, (220, 40, 40)), ("blue", 0.17, 0.10, (40, 80, 225)),
    ("green", 0.14, 0.15, (40, 175, 60)), ("yellow", 0.12, 0.08, (240, 220, 40)),
    ("white", 0.11, 0.05, (248, 248, 248)), ("orange", 0.09, 0.18, (250, 140, 30)),
    ("purple", 0.08, 0.20, (150, 60, 195)), ("pink", 0.07, 0.10, (250, 145, 205)),
]  # fmt: skip
# (name, probability, openimages annotation rate)
SCENES = [("sky", 0.26, 0.15), ("indoor", 0.24, 0.10), ("grass", 0.20, 0.20), ("night", 0.18, 0.12), ("water", 0.12, 0.08)]
# (name, openimages annotation rate)
CONCEPTS = [
    ("multiple_objects", 0.10), ("large_object", 0.06), ("small_object", 0.05),
    ("daytime", 0.04), ("nature", 0.12), ("warm_colours", 0.08),
]  # fmt: skip

_WARM = {"red", "orange", "yellow", "pink"}
_DAYTIME = {"sky", "grass", "water"}
_NATURE = {"grass", "water"}
_NEG_GROUP_WEIGHT = {"object": 2.0, "colour": 1.0, "scene": 1.0, "concept": 0.5}
_SIZE_RANGE = (0.30, 0.62)  # object diameter as a fraction of the image side (>= 19 px at 64)
_LARGE, _SMALL = 0.52, 0.37
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
_OUTLINE = (25, 25, 25)
_CHUNK = 32  # images per pool task: amortises the pool's per-task overhead


def synthetic_classes() -> list[ClassInfo]:
    """The class list in index order: objects, colours, scenes, concepts; ids `syn:<name>`."""
    names = [o[0] for o in OBJECTS] + [c[0] for c in COLOURS] + [s[0] for s in SCENES] + [c[0] for c in CONCEPTS]
    return [ClassInfo(id=f"syn:{n}", name=n.replace("_", " ")) for n in names]


def class_groups() -> list[str]:
    """The group of each class index: object, colour, scene or concept."""
    return ["object"] * len(OBJECTS) + ["colour"] * len(COLOURS) + ["scene"] * len(SCENES) + ["concept"] * len(CONCEPTS)


def _split_id(split: str) -> int:
    return _SPLIT_IDS.get(split, zlib.crc32(split.encode()) & 0x7FFFFFFF)


def _annotation_rates() -> np.ndarray:
    return np.array([o[2] for o in OBJECTS] + [c[2] for c in COLOURS] + [s[2] for s in SCENES] + [c[1] for c in CONCEPTS])


def _neg_weights() -> np.ndarray:
    return np.array([_NEG_GROUP_WEIGHT[g] for g in class_groups()])


def _sample_content(rng: np.random.Generator) -> tuple[int, list[tuple[int, int, float, float, float, float]]]:
    """Scene index and instances (object, colour, diameter, cx, cy, angle), sizes in [0, 1]."""
    scene = int(rng.choice(len(SCENES), p=[s[1] for s in SCENES]))
    p_obj = np.array([o[1] for o in OBJECTS])
    present = np.flatnonzero(rng.random(len(OBJECTS)) < p_obj)
    if present.size == 0:
        present = np.array([rng.choice(len(OBJECTS), p=p_obj / p_obj.sum())])
    kinds = [int(k) for k in present for _ in range(2 if rng.random() < 0.2 else 1)]
    if len(kinds) > 4:
        kinds = [kinds[i] for i in sorted(rng.choice(len(kinds), size=4, replace=False))]
    p_col = [c[1] for c in COLOURS]
    inst: list[tuple[int, int, float, float, float, float]] = []
    for k in kinds:
        colour = int(rng.choice(len(COLOURS), p=p_col))
        d = float(rng.uniform(*_SIZE_RANGE))
        r = d / 2
        # A few tries to avoid heavy overlap: an occluded shape is a label the pixels lack.
        for _ in range(6):
            cx, cy = rng.uniform(r, 1 - r, size=2)
            if all((cx - x) ** 2 + (cy - y) ** 2 >= (0.8 * (r + dd / 2)) ** 2 for _, _, dd, x, y, _ in inst):
                break
        inst.append((k, colour, d, float(cx), float(cy), float(rng.uniform(0, 2 * np.pi))))
    return scene, inst


def _truth(scene: int, inst: list) -> np.ndarray:
    no, nc, ns = len(OBJECTS), len(COLOURS), len(SCENES)
    t = np.zeros(no + nc + ns + len(CONCEPTS), dtype=bool)
    for k, colour, *_ in inst:
        t[k] = True
        t[no + colour] = True
    t[no + nc + scene] = True
    scene_name = SCENES[scene][0]
    colours = {COLOURS[c][0] for _, c, *_ in inst}
    sizes = [d for _, _, d, *_ in inst]
    base = no + nc + ns
    t[base + 0] = len(inst) >= 3
    t[base + 1] = max(sizes) >= _LARGE
    t[base + 2] = min(sizes) <= _SMALL
    t[base + 3] = scene_name in _DAYTIME
    t[base + 4] = scene_name in _NATURE
    t[base + 5] = bool(colours & _WARM)
    return t


def synthetic_truth(split: str, n: int, seed: int = 0) -> np.ndarray:
    """The full label matrix bool [n, C] of a split, without drawing any image."""
    sid = _split_id(split)
    out = np.zeros((n, len(synthetic_classes())), dtype=bool)
    for i in range(n):
        out[i] = _truth(*_sample_content(np.random.default_rng([seed, sid, i])))
    return out


@lru_cache(maxsize=None)
def _unit_shape(name: str) -> np.ndarray | None:
    """Polygon of a shape inside the unit disc (centred, radius 1); None for circle/ring."""
    t = np.linspace(0, 2 * np.pi, 7)[:-1]

    def reg(n: int, r: float = 1.0, phase: float = -np.pi / 2) -> np.ndarray:
        a = phase + np.arange(n) * 2 * np.pi / n
        return np.stack([r * np.cos(a), r * np.sin(a)], 1)

    if name in ("circle", "ring"):
        return None
    if name == "square":
        return reg(4, 1.0, np.pi / 4)
    if name == "triangle":
        return reg(3) + [0, 0.2]
    if name == "hexagon":
        return np.stack([np.cos(t), np.sin(t)], 1)
    if name == "diamond":
        return np.array([[0, -1], [0.6, 0], [0, 1], [-0.6, 0]], float)
    if name == "star":
        outer, inner = reg(5), reg(5, 0.42, -np.pi / 2 + np.pi / 5)
        return np.stack([outer, inner], 1).reshape(-1, 2)
    if name == "cross":
        a = 0.33
        return np.array([[-a, -1], [a, -1], [a, -a], [1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a]])
    if name == "arrow":
        return np.array([[-1, -0.25], [0.15, -0.25], [0.15, -0.65], [1, 0], [0.15, 0.65], [0.15, 0.25], [-1, 0.25]])
    if name == "bolt":
        return np.array([[0.25, -1], [-0.55, 0.1], [-0.05, 0.1], [-0.3, 1], [0.55, -0.15], [0.05, -0.15], [0.35, -1]])
    if name == "heart":
        s = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        x = 16 * np.sin(s) ** 3
        y = -(13 * np.cos(s) - 5 * np.cos(2 * s) - 2 * np.cos(3 * s) - np.cos(4 * s))
        p = np.stack([x, y], 1)
    elif name == "crescent":
        # Outer unit circle minus a circle of radius 0.8 centred at (0.45, 0): they meet at
        # x = 0.625; outer arc through the left, inner arc back.
        a_out = np.linspace(np.deg2rad(51.3), np.deg2rad(308.7), 24)
        a_in = np.linspace(np.deg2rad(282.6), np.deg2rad(77.4), 20)
        p = np.concatenate([np.stack([np.cos(a_out), np.sin(a_out)], 1), np.stack([0.45 + 0.8 * np.cos(a_in), 0.8 * np.sin(a_in)], 1)])
    else:
        raise KeyError(name)
    p = p - (p.max(0) + p.min(0)) / 2
    return p / np.abs(p).max()


def _background(scene: str, side: int, rng: np.random.Generator) -> np.ndarray:
    y = np.linspace(0, 1, side, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 1, side, dtype=np.float32)[None, :, None]
    jitter = rng.uniform(-15, 15, size=3).astype(np.float32)
    phase = float(rng.uniform(0, 2 * np.pi))
    if scene == "sky":
        img = (1 - y) * np.array([80, 140, 230], np.float32) + y * np.array([205, 228, 250], np.float32) + 0 * x
    elif scene == "indoor":
        floor = (y > 0.68).astype(np.float32)
        panel = 8 * (np.sin(2 * np.pi * 6 * x + phase) > 0.9)
        img = (1 - floor) * (np.array([205, 185, 150], np.float32) + panel) + floor * np.array([120, 82, 55], np.float32)
    elif scene == "grass":
        stripes = 18 * np.sin(2 * np.pi * 14 * x + 3 * np.sin(2 * np.pi * 2 * y + phase))
        img = np.array([95, 150, 45], np.float32) + stripes * np.array([0.5, 1, 0.3], np.float32)
    elif scene == "night":
        img = np.broadcast_to(np.array([14, 18, 48], np.float32), (side, side, 3)).copy()
        for sx, sy in rng.integers(0, side - 1, size=(12, 2)):
            img[sy : sy + 2, sx : sx + 2] = 230
    elif scene == "water":
        waves = 25 * np.sin(2 * np.pi * 9 * y + 0.8 * np.sin(2 * np.pi * 3 * x + phase))
        img = np.array([30, 95, 150], np.float32) + waves * np.array([0.4, 0.8, 1], np.float32)
    else:
        raise KeyError(scene)
    return np.broadcast_to(img + jitter, (side, side, 3))


def _render(rng: np.random.Generator, scene: int, inst: list, size: int) -> bytes:
    from PIL import Image, ImageDraw

    side = 2 * size  # drawn at 2x, box-reduced: cheap anti-aliasing
    bg = np.clip(_background(SCENES[scene][0], side, rng), 0, 255).astype(np.uint8)
    im = Image.fromarray(bg, "RGB")
    draw = ImageDraw.Draw(im)
    for k, colour, d, cx, cy, angle in inst:
        rgb = tuple(int(np.clip(v + j, 0, 255)) for v, j in zip(COLOURS[colour][3], rng.integers(-12, 13, size=3)))
        r, x0, y0 = d / 2 * side, cx * side, cy * side
        shape = _unit_shape(OBJECTS[k][0])
        if shape is None:
            box = [x0 - r, y0 - r, x0 + r, y0 + r]
            if OBJECTS[k][0] == "circle":
                draw.ellipse(box, fill=rgb, outline=_OUTLINE, width=3)
            else:
                w = max(4, int(0.32 * r))
                draw.ellipse(box, outline=_OUTLINE, width=w + 3)
                draw.ellipse([x0 - r + 1.5, y0 - r + 1.5, x0 + r - 1.5, y0 + r - 1.5], outline=rgb, width=w)
            continue
        c, s = np.cos(angle), np.sin(angle)
        pts = shape @ np.array([[c, s], [-s, c]]) * r + [x0, y0]
        draw.polygon([tuple(p) for p in pts.tolist()], fill=rgb, outline=_OUTLINE, width=3)
    small = np.asarray(im.reduce(2), dtype=np.int16)
    noisy = np.clip(small + rng.integers(-6, 7, size=small.shape, dtype=np.int16), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy, "RGB").save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _annotate_openimages(truth: np.ndarray, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    pos = np.flatnonzero(truth & (rng.random(truth.size) < _annotation_rates()))
    absent = np.flatnonzero(~truth)
    w = _neg_weights()[absent]
    k = min(int(rng.integers(1, 5)), absent.size)
    neg = np.sort(rng.choice(absent, size=k, replace=False, p=w / w.sum())) if k else absent[:0]
    return pos.tolist(), neg.tolist()


def _make_chunk(task: tuple) -> list[Record]:
    """Pool worker: draw images [start, stop) of a split; labels given, or annotated here."""
    seed, split, start, stop, size, labels = task
    sid = _split_id(split)
    out = []
    for j, i in enumerate(range(start, stop)):
        scene, inst = _sample_content(np.random.default_rng([seed, sid, i]))
        truth = _truth(scene, inst)
        if labels is None:
            pos, neg = _annotate_openimages(truth, np.random.default_rng([seed, sid, i, 1]))
        else:
            pos, neg = labels[j]
        render_rng = np.random.default_rng([seed, sid, i, 2])
        image = _render(render_rng, scene, inst, size)
        out.append(Record(key=f"{split}_{i:08d}", image=image, pos=pos, neg=neg, true=np.flatnonzero(truth).tolist()))
    return out


def synthetic_records(
    split: str = "train",
    n: int = 1000,
    *,
    image_size: int = 64,
    scheme: str | Scheme = "openimages",
    seed: int = 0,
    workers: int = 0,
    progress: bool = False,
) -> Iterator[Record]:
    """The records of one split, in index order, without writing anything."""
    from tqdm import tqdm

    sch = parse_scheme(scheme)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"synthetic: number of images must be an integer >= 0, got {n!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or not 16 <= image_size <= 1024:
        raise ValueError(f"synthetic: image_size must be an integer in [16, 1024], got {image_size!r}")
    labels: np.ndarray | None = None
    if sch.kind != "openimages":
        sid = _split_id(split)
        sim_seed = int(np.random.SeedSequence([seed, sid, 3]).generate_state(1)[0])
        labels = simulate(synthetic_truth(split, n, seed), sch, sim_seed)

    def tasks() -> Iterator[tuple]:
        for start in range(0, n, _CHUNK):
            stop = min(n, start + _CHUNK)
            rows = None
            if labels is not None:
                rows = [(np.flatnonzero(r == 1).tolist(), np.flatnonzero(r == -1).tolist()) for r in labels[start:stop]]
            yield (seed, split, start, stop, int(image_size), rows)

    # A generator inside so that bad arguments raise at the call, not at the first next().
    def records() -> Iterator[Record]:
        with tqdm(total=n, desc=f"synthetic {split}", unit="img", disable=not progress) as bar:
            for chunk in parallel_map(_make_chunk, tasks(), workers):
                bar.update(len(chunk))
                yield from chunk

    return records()


def draw_records(args: tuple, opts: dict, report: object) -> Iterator[Record]:
    """A shard task's records: images [start, stop) of a split drawn in the task (`convert.py`)."""
    seed, split, start, stop, size, rows = args
    for a in range(start, stop, _CHUNK):
        b = min(stop, a + _CHUNK)
        yield from _make_chunk((seed, split, a, b, size, None if rows is None else rows[a - start : b - start]))


def _split_jobs(split: str, n: int, size: int, sch: Scheme, seed: int, shard_samples: int) -> Iterator:
    from ..convert import ShardJob

    labels: np.ndarray | None = None
    if sch.kind != "openimages":
        sid = _split_id(split)
        sim_seed = int(np.random.SeedSequence([seed, sid, 3]).generate_state(1)[0])
        labels = simulate(synthetic_truth(split, n, seed), sch, sim_seed)
    for index, start in enumerate(range(0, n, shard_samples)):
        stop = min(n, start + shard_samples)
        rows = None
        if labels is not None:
            rows = [(np.flatnonzero(r == 1).tolist(), np.flatnonzero(r == -1).tolist()) for r in labels[start:stop]]
        yield ShardJob(split, index, draw_records, (seed, split, start, stop, int(size), rows), stop - start)


def build_synthetic(
    out: str,
    *,
    train: int = 4000,
    val: int = 1000,
    image_size: int = 64,
    scheme: str = "openimages",
    val_scheme: str = "full",
    seed: int = 0,
    shard_samples: int = 500,
    workers: int | None = 0,
    progress: bool = True,
    overwrite: bool = False,
) -> Manifest:
    """Draw and write a synthetic dataset (splits `train`, and `val` when val > 0).

    Each shard is one job of `convert.py`: drawn in-process (workers=0) or as Ray tasks
    (N at a time, or None: all the cluster's CPUs); a rerun resumes a stopped one.
    """
    from ..convert import SplitPlan, run_conversion
    from .common import ConversionReport

    schemes = {"train": parse_scheme(scheme), "val": parse_scheme(val_scheme)}
    sizes = {"train": train, "val": val}
    for name, n in sizes.items():
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"synthetic: number of {name} images must be an integer >= 0, got {n!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or not 16 <= image_size <= 1024:
        raise ValueError(f"synthetic: image_size must be an integer in [16, 1024], got {image_size!r}")
    if shard_samples < 1:
        raise ValueError(f"shard_samples must be >= 1, got {shard_samples}")
    names = [name for name in ("train", "val") if name == "train" or val > 0]
    plans = {
        name: SplitPlan(
            jobs=_split_jobs(name, sizes[name], image_size, schemes[name], seed, shard_samples),
            settings={"source": "synthetic", "images": sizes[name], "image_size": image_size,
                      "scheme": str(schemes[name]), "seed": seed, "shard_samples": shard_samples},
            images=sizes[name],
        )
        for name in names
    }
    meta = {
        "source": "synthetic",
        "seed": seed,
        "image_size": image_size,
        "schemes": {k: str(schemes[k]) for k in names},
        "class_groups": class_groups(),
    }
    return run_conversion(out, synthetic_classes(), plans, source="synthetic", opts={}, meta=meta,
                          report=ConversionReport("synthetic"), workers=workers, overwrite=overwrite, progress=progress)
