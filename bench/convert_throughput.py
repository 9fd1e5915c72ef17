"""Benchmark: conversion and verification as Ray tasks against plain worker processes, same run.

    .venv/bin/python bench/convert_throughput.py [--images 3000] [--shard-samples 250] [--rows 1000000,4000000]

Inputs as a user has them (issue 13): an official-format label CSV (ImageID,Source,LabelName,
Confidence; about 7 verified labels per image, some of classes outside the trainable list) over
9,600 real OpenImages MIDs (the first 9,600 of `../shared/data/openimages/`'s class
descriptions), and `--images` 1024x768 JPEGs (quality 90) made from the real photos there:
upscaled, cropped, mirrored and shifted in colour, with mild noise so that they encode like
photos and not like smooth upscales. Everything is built once under `--work`.

Figures, all measured in this one run (the machine's load is printed with them); each figure
and its baseline alternate for `--rounds` rounds and their medians are compared:
1. ceiling: the same images read, decoded, resized to the default short edge (256) and encoded
   by `resize_short_edge` in a plain `multiprocessing.Pool` of P processes; images/s per core;
2. conversion (`build_openimages`, labels CSV to published shards and manifest) with P Ray
   workers (Ray started before the clock), and in-process (`workers=0`, 1 core); per core
   against the ceiling at the same P (bar >= 0.8); 2 Ray workers against 1;
3. label grouping alone (`read_label_groups`, 9,600 trainable classes, half the rows of other
   classes, skipped): rows/s and the peak RSS (VmHWM) of a fresh process at each `--rows`
   (ratio of the largest to the smallest: bar <= 1.1);
4. resume: a `csl shards openimages` process (P Ray workers, through RAY_ADDRESS) SIGKILLed at
   about half its shards; the rerun's shards built beyond the ones not yet published
   (work redone: bar <= one shard per worker);
5. verify (`verify_dataset`, P Ray tasks) against the same reader + decode (`iter_groups`,
   `decode_image` at 224 with draft) over the same shards in a plain Pool of P processes;
   images/s per core (bar >= 0.8).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from multiprocessing import Pool
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = REPO.parent / "shared" / "data" / "openimages"

__all__ = ["main"]


def _load() -> str:
    return "load average " + " / ".join(f"{x:.1f}" for x in os.getloadavg())


def make_inputs(work: Path, n: int) -> tuple[str, str, str]:
    """(labels CSV, classes file, image folder), built once."""
    import numpy as np
    from PIL import Image

    imgs, labels, classes = work / "images", work / "labels.csv", work / "classes.txt"
    work.mkdir(parents=True, exist_ok=True)
    mids = [line.split(",", 1)[0] for line in (SHARED / "oidv6-class-descriptions.csv").read_text().splitlines()[1:]]
    if not classes.exists():
        classes.write_text("\n".join(mids[:9600]) + "\n")
    imgs.mkdir(parents=True, exist_ok=True)
    photos = sorted((SHARED / "images").glob("*.jpg"))
    rng = random.Random(0)
    nrng = np.random.default_rng(0)
    ids = [f"{i:016x}" for i in range(n)]
    for i, k in enumerate(ids):
        out = imgs / f"{k}.jpg"
        if out.exists():
            continue
        with Image.open(photos[i % len(photos)]) as im:
            im = im.convert("RGB")
            w, h = im.size
            crop = (rng.randint(0, w // 8), rng.randint(0, h // 8))
            im = im.crop((crop[0], crop[1], w - rng.randint(0, w // 8), h - rng.randint(0, h // 8)))
            im = im.resize((1024, 768), Image.Resampling.BICUBIC)
            if i % 2:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            a = np.asarray(im, dtype=np.int16) + np.array([rng.randint(-20, 20) for _ in range(3)], np.int16)
            a = a + nrng.integers(-6, 7, size=a.shape, dtype=np.int16)
            buf = io.BytesIO()
            Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
            out.write_bytes(buf.getvalue())
    if not labels.exists():
        write_csv(labels, ids, mids, 0)
    return str(labels), str(classes), str(imgs)


def write_csv(path: Path, ids: list[str], mids: list[str], seed: int) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        f.write("ImageID,Source,LabelName,Confidence\n")
        for k in ids:
            for mid in sorted(rng.sample(mids, 7)):  # ~half of these are outside the 9,600 trainable
                f.write(f"{k},verification,{mid},{rng.randint(0, 1)}\n")


def _ceiling_one(path: str) -> int:
    from data_shards.sources.common import resize_short_edge

    with open(path, "rb") as f:
        resize_short_edge(f.read(), 256)
    return 1


def ceiling(imgs: str, procs: int) -> float:
    files = sorted(str(p) for p in Path(imgs).glob("*.jpg"))
    with Pool(procs) as pool:
        pool.map(_ceiling_one, files[: procs * 2])  # warm: imports
        t0 = time.perf_counter()
        n = sum(pool.imap_unordered(_ceiling_one, files, chunksize=16))
    return n / (time.perf_counter() - t0)


def _verify_plain_one(path: str) -> int:
    from data_shards.decode import decode_image
    from data_shards.shard_reader import iter_groups

    n = 0
    with open(path, "rb") as f:
        for _, raw in iter_groups(f):
            decode_image(raw.members["jpg"], 224)
            n += 1
    return n


def verify_plain(root: str, procs: int) -> float:
    shards = sorted(str(p) for p in Path(root).glob("train/*.tar"))
    with Pool(procs) as pool:
        pool.map(_verify_plain_one, shards[:procs])  # warm: imports
        t0 = time.perf_counter()
        n = sum(pool.imap_unordered(_verify_plain_one, shards))
    return n / (time.perf_counter() - t0)


def convert(labels: str, classes: str, imgs: str, out: str, workers: int, shard_samples: int) -> tuple[float, dict]:
    from data_shards.sources.openimages import build_openimages

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    m, rep = build_openimages(labels, classes, imgs, out, resize=256, shard_samples=shard_samples, workers=workers,
                              skip_unknown=True, progress=False)
    return m.splits["train"].samples / (time.perf_counter() - t0), rep.counts


# VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's high-water mark at fork.
_GROUPING = """
import sys, time
sys.path.insert(0, {repo!r})
def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])
from data_shards.sources.common import ConversionReport
from data_shards.sources.openimages import load_classes, read_label_groups
classes = load_classes({classes!r})
index = {{c.id: i for i, c in enumerate(classes)}}
rep = ConversionReport("bench")
base = kb("VmRSS:")
t0 = time.perf_counter()
n = sum(1 for _ in read_label_groups({csv!r}, index, rep, skip_unknown=True))
dt = time.perf_counter() - t0
print(rep.counts["rows read"], n, dt, kb("VmHWM:"), base)
"""


def grouping(work: Path, classes: str, rows: int) -> dict:
    mids = [line.strip() for line in Path(classes).read_text().splitlines()]
    mids = mids + [f"/m/other{i}" for i in range(len(mids))]
    csv = work / f"labels-{rows}.csv"
    if not csv.exists():
        write_csv(csv, [f"{i:016x}" for i in range(rows // 7)], mids, 1)
    out = subprocess.run([sys.executable, "-c", _GROUPING.format(repo=str(REPO), classes=classes, csv=str(csv))],
                         capture_output=True, text=True, check=True).stdout.split()
    read, groups, dt, peak, base = int(out[0]), int(out[1]), float(out[2]), int(out[3]), int(out[4])
    return {"rows": read, "images": groups, "rows_per_s": read / dt, "peak_rss_mb": peak / 1024,
            "growth_mb": (peak - base) / 1024}


def resume(labels: str, classes: str, imgs: str, out: str, workers: int, shard_samples: int, address: str) -> dict:
    from data_shards.sources.openimages import build_openimages

    shutil.rmtree(out, ignore_errors=True)
    n = sum(1 for _ in open(labels)) // 7
    shards = -(-n // shard_samples)
    cmd = [sys.executable, "-m", "trainer.cli", "shards", "openimages", "--labels", labels, "--classes", classes,
           "--images", imgs, "--out", out, "--shard-samples", str(shard_samples), "--workers", str(workers),
           "--skip-unknown"]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "RAY_ADDRESS": address},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = Path(out, ".progress", "train")
    while len(list(records.glob("shard-*.json"))) < shards // 2:
        if proc.poll() is not None:
            raise RuntimeError("the conversion ended before it could be killed")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(2.0)
    recorded = len(list(records.glob("shard-*.json")))
    published = len(list(Path(out, "train").glob("train-*.tar")))
    t0 = time.perf_counter()
    _, rep = build_openimages(labels, classes, imgs, out, resize=256, shard_samples=shard_samples, workers=workers,
                              skip_unknown=True, progress=False)
    return {"shards": shards, "recorded_at_kill": recorded, "published_at_kill": published,
            "reused": rep.get("shards reused"), "built": rep.get("shards built"),
            "redone": published - rep.get("shards reused"), "rerun_s": time.perf_counter() - t0}


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def measure(a, parts: set, res: dict, summary: dict, labels: str, classes: str, imgs: str, work: Path,
            address: str) -> None:
    """Each figure and its baseline alternate for `--rounds` rounds; the medians are compared."""
    p = a.procs
    procs = sorted({1, p})
    root = str(work / f"out{p}")
    if "convert" in parts:
        res["convert_inprocess"], _ = convert(labels, classes, imgs, str(work / "out0"), 0, a.shard_samples)
        print(f"convert in-process: {res['convert_inprocess']:.1f} img/s ({_load()})", flush=True)
        for r in range(a.rounds):
            for q in procs:
                c = ceiling(imgs, q)
                v, counts = convert(labels, classes, imgs, str(work / f"out{q}"), q, a.shard_samples)
                res.setdefault(f"ceiling_{q}", []).append(c)
                res.setdefault(f"convert_ray_{q}", []).append(v)
                print(f"round {r}, {q} process(es): ceiling {c:.1f} img/s, convert on Ray {v:.1f} img/s ({_load()})",
                      flush=True)
        med = {k: _median(res[k]) for k in res if k.startswith(("ceiling_", "convert_ray_"))}

        def paired(a: str, b: str) -> float:  # the median of per-round ratios: robust to the load drifting
            return _median([x / y for x, y in zip(res[a], res[b])])

        summary.update({
            "convert_per_core_vs_ceiling": paired(f"convert_ray_{p}", f"ceiling_{p}"),
            "convert_1_worker_vs_ceiling_1": paired("convert_ray_1", "ceiling_1"),
            "convert_inprocess_vs_ceiling_1": res["convert_inprocess"] / med["ceiling_1"],
            "ray_2_vs_1": paired(f"convert_ray_{p}", "convert_ray_1"),
            "per_core_convert_img_s": med[f"convert_ray_{p}"] / p,
            "per_core_ceiling_img_s": med[f"ceiling_{p}"] / p,
        })
    if "verify" in parts:
        from data_shards.inspect import verify_dataset

        if not Path(root, "dataset.json").exists():
            convert(labels, classes, imgs, root, p, a.shard_samples)
        verify_dataset(root, workers=p)  # warm the Ray workers' imports, as the Pool is warmed
        for r in range(a.rounds):
            plain = verify_plain(root, p)
            t1 = time.perf_counter()
            v = verify_dataset(root, workers=p)
            ray_rate = v["samples"] / (time.perf_counter() - t1)
            assert v["ok"], v
            res.setdefault("verify_plain", []).append(plain)
            res.setdefault("verify_ray", []).append(ray_rate)
            print(f"round {r}: verify plain {plain:.1f} img/s, Ray tasks {ray_rate:.1f} img/s ({_load()})", flush=True)
        summary["verify_vs_plain"] = _median([x / y for x, y in zip(res["verify_ray"], res["verify_plain"])])
    if "resume" in parts:
        res["resume"] = resume(labels, classes, imgs, str(work / "resume"), p, a.shard_samples, address)
        print(f"resume: {res['resume']} ({_load()})", flush=True)
        summary["resume_redone_shards"] = res["resume"]["redone"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--shard-samples", type=int, default=250)
    ap.add_argument("--rows", default="1000000,4000000")
    ap.add_argument("--work", default="/tmp/csl-bench-convert")
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="alternations of each figure and its baseline")
    ap.add_argument("--parts", default="grouping,convert,verify,resume", help="which figures to measure")
    a = ap.parse_args(argv)
    parts = set(a.parts.split(","))
    if not SHARED.is_dir():
        print(f"skipped: {SHARED} (real OpenImages class names and photos) is absent")
        return 0
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"machine": f"{os.cpu_count()} CPUs", "images": a.images}
    t0 = time.perf_counter()
    labels, classes, imgs = make_inputs(work, a.images)
    print(f"inputs ready in {time.perf_counter() - t0:.0f}s ({_load()})", flush=True)

    for rows in [int(r) for r in a.rows.split(",")] if "grouping" in parts else []:
        res[f"grouping_{rows}"] = g = grouping(work, classes, rows)
        print(f"label grouping {rows} rows: {g['rows_per_s']:,.0f} rows/s, peak RSS {g['peak_rss_mb']:.0f} MB "
              f"({_load()})", flush=True)

    summary: dict = {}
    groupings = [v for k, v in res.items() if k.startswith("grouping_")]
    if groupings:
        summary["grouping_peak_ratio"] = max(g["peak_rss_mb"] for g in groupings) / min(g["peak_rss_mb"] for g in groupings)
    if parts & {"convert", "verify", "resume"}:
        import ray

        ray.init(num_cpus=a.procs, include_dashboard=False, log_to_driver=False)
        address = ray.get_runtime_context().gcs_address
        try:
            measure(a, parts, res, summary, labels, classes, imgs, work, address)
        finally:
            ray.shutdown()
    res["summary"] = summary
    print(json.dumps(summary, indent=1))
    Path(work, "results.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
