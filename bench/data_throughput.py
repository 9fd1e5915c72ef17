"""Samples/s of `ShardStream` against the decode ceiling and the one-file-per-image reference.

    .venv/bin/python bench/data_throughput.py [--samples 2000] [--workers 2] [--rounds 3]

What runs, all on the same bytes: the nine real photos of `shared/data/openimages/images`,
repeated to `--samples` samples (`img000000`, ...), each with OpenImages-density labels
(9,600 classes keyed by real MIDs, 3 positives and 4 negatives drawn from a seeded rng).
Every contender produces what training consumes: float32 [32, 3, 224, 224] normalised
batches, randomly flipped, with their labels.

* ``ceiling``: `decode_image(bytes, 224, flip=...)`, a uint8 `np.stack` collate and
  `normalize` over the bytes already in memory, the exact functions and output format of the
  stream (whose workers decode, flip and collate uint8, and whose main process normalises),
  with no I/O, no labels and no hand-off of the batch to another process. It is what this CPU can do, so it is measured with the same
  number of processes as the stream it is compared with: 1 process against
  `num_workers=0`, and N forked processes (each decoding a contiguous share, fork so the
  bytes are inherited, not pickled) against `num_workers=N`. The comparison is at equal
  process count, never per process; per-process rates are printed for reading only.
* ``stream``: `ShardStream(root, "train", batch_size=32, image_size=224)` with its defaults
  (shuffle buffer 1,000, train flips), one epoch, from the local shard folder and from S3.
* ``stream augmented``: the same local stream with the reference's training augmentations
  (`augment.REFERENCE`: Cutout 0.5 and RandAugment on timm's ops, no flip), at 1 and N
  processes; its ratio to the plain stream is reported (no bar), with the CPU ms per sample of
  both in-process (`num_workers=0`: every decode and op runs in this process, so its
  `time.process_time()` is their whole cost).
* ``reference``: the public reference code's layout, re-implemented here: one file per image
  `{dir}/{key}.jpg` and a CSV `key,labels` (MID:1 / MID:0 pairs), a torch Dataset that opens
  each file, decodes it fully with PIL (no draft), resizes to 224, flips, normalises with torch
  ops per sample and builds a dense 9,600-float label vector per sample (reference encoding 1
  pos, 0 neg, -1 un-annotated), batched by `DataLoader(batch_size=32, num_workers=N)`. From S3
  each image is one GET (`s3fs.cat_file`): the one-object-per-image pattern.

Timing: wall time of one epoch, worker start-up included where there is one. Each contender is
built once and iterated once per round, as a training run iterates it once per epoch: the
stream's DataLoader workers are persistent (its default), so it forks them and makes their S3
clients in round 1 only; the reference's DataLoader forks new workers every epoch, as the
reference code's does; the ceiling forks its processes inside the timed region every round
(a fork of this process, nothing to import or connect). Building a stream or a
Dataset (manifest / CSV read) is outside it. Contenders alternate inside each round, the
starting contender rotating between rounds, and medians are reported, so a noisy neighbour on
this shared 2-core machine slows all of them alike.

The S3 server is moto on 127.0.0.1 in a child process: as a thread of this process it would
share the GIL with the main process it is serving, which is the process being measured when
`num_workers=0`. Its CPU still comes out of the same two cores, equally for both S3 contenders.

Label bytes: the mean size of the `.json` member per sample read back from the written tars,
against 96 bytes (1% of a dense int8 vector of 9,600 classes). The tar headers and block
padding around it are reported separately: they are the container's cost, not the labels'.

Bars: stream >= 85% of the ceiling at both process counts; stream from S3 >= 5x the
one-object-per-image reference from S3; label payload <= 96 bytes per sample.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import multiprocessing as mp
import os
import random
import shlex
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from data_shards.augment import REFERENCE, AugmentSpec  # noqa: E402
from data_shards.decode import IMAGENET_MEAN, IMAGENET_STD, decode_image, normalize  # noqa: E402
from data_shards.format import ClassInfo, Record  # noqa: E402
from data_shards.storage import get_fs  # noqa: E402
from data_shards.stream import ShardStream  # noqa: E402
from data_shards.writer import write_dataset  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "openimages"
NUM_CLASSES = 9600
SIZE = 224
BUCKET = "csl-bench"


# ----------------------------------------------------------------------------- data


def load_inputs(n: int, seed: int) -> tuple[list[ClassInfo], list[Record], list[bytes]]:
    """Classes (real MIDs), records at OpenImages density, and the distinct photos."""
    with open(SHARED / "oidv6-class-descriptions.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:NUM_CLASSES]
    classes = [ClassInfo(id=r["LabelName"], name=r["DisplayName"]) for r in rows]
    photos = [Path(p).read_bytes() for p in sorted(glob.glob(str(SHARED / "images" / "*.jpg")))]
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        ids = rng.choice(NUM_CLASSES, size=7, replace=False)
        records.append(Record(key=f"img{i:06d}", image=photos[i % len(photos)],
                              pos=sorted(ids[:3].tolist()), neg=sorted(ids[3:].tolist())))
    return classes, records, photos


def reference_csv(records: list[Record], classes: list[ClassInfo]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["key", "labels"])
    for r in records:
        w.writerow([r.key, " ".join([f"{classes[c].id}:1" for c in r.pos] + [f"{classes[c].id}:0" for c in r.neg])])
    return buf.getvalue().encode()


def write_reference_local(folder: str, records: list[Record], classes: list[ClassInfo]) -> None:
    os.makedirs(folder, exist_ok=True)
    for r in records:
        with open(os.path.join(folder, f"{r.key}.jpg"), "wb") as f:
            f.write(r.image)
    with open(os.path.join(folder, "labels.csv"), "wb") as f:
        f.write(reference_csv(records, classes))


def write_reference_s3(url: str, records: list[Record], classes: list[ClassInfo]) -> None:
    fs, path = get_fs(url)
    objs = {f"{path}/{r.key}.jpg": r.image for r in records}
    objs[f"{path}/labels.csv"] = reference_csv(records, classes)
    fs.pipe(objs)


def label_bytes(root: str) -> dict[str, float]:
    """Per-sample bytes of the label member, of tar headers and of block padding."""
    n = json_bytes = headers = padding = image_bytes = total = 0
    for path in sorted(glob.glob(os.path.join(root, "train", "*.tar"))):
        total += os.path.getsize(path)
        with tarfile.open(path) as tf:
            for ti in tf:
                headers += ti.offset_data - ti.offset
                padding += -ti.size % tarfile.BLOCKSIZE
                if ti.name.endswith(".json"):
                    json_bytes += ti.size
                    n += 1
                else:
                    image_bytes += ti.size
    return {"samples": n, "json": json_bytes / n, "headers": headers / n, "padding": padding / n,
            "end_of_archive": (total - json_bytes - image_bytes - headers - padding) / n}


# ----------------------------------------------------------------------------- S3 server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_s3() -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server on 127.0.0.1:{port} did not start (exit code {proc.poll()})")
            time.sleep(0.2)
    endpoint = f"http://127.0.0.1:{port}"
    # Set before any worker forks, so DataLoader workers reach the same server through s3fs.
    os.environ.update({"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    for k in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(k, None)
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    return proc, endpoint


# ----------------------------------------------------------------------------- contenders


def _ceiling_share(photos: list[bytes], flips: np.ndarray, lo: int, hi: int, batch: int) -> None:
    for s in range(lo, hi, batch):
        e = min(hi, s + batch)
        normalize(torch.from_numpy(np.stack([decode_image(photos[i % len(photos)], SIZE, flip=bool(flips[i]))
                                             for i in range(s, e)])))


def run_ceiling(photos: list[bytes], n: int, procs: int, batch: int) -> tuple[int, float]:
    flips = np.random.default_rng(1).random(n) < 0.5
    if procs <= 1:
        _ceiling_share(photos, flips, 0, n, batch)
        return n, float("nan")
    ctx = mp.get_context("fork")  # the bytes are inherited, as DataLoader workers inherit theirs
    bounds = np.linspace(0, n, procs + 1).astype(int)
    ps = [ctx.Process(target=_ceiling_share, args=(photos, flips, int(lo), int(hi), batch))
          for lo, hi in zip(bounds[:-1], bounds[1:])]
    for p in ps:
        p.start()
    for p in ps:
        p.join()
    if any(p.exitcode != 0 for p in ps):
        raise RuntimeError(f"ceiling process failed: exit codes {[p.exitcode for p in ps]}")
    return n, float("nan")


def _drain(batches, count: Callable) -> tuple[int, float]:
    """Samples seen and seconds to the first batch (worker start-up, buffer fill, 1st decode)."""
    t = time.perf_counter()
    n, first = 0, 0.0
    for batch in batches:
        if not n:
            first = time.perf_counter() - t
        n += count(batch)
    return n, first


def run_stream(stream: ShardStream) -> tuple[int, float]:
    return _drain(stream, lambda b: len(b["key"]))


class ReferenceDataset(Dataset):
    """One image per file or object and a CSV of label lists, the way the reference reads."""

    def __init__(self, root: str, classes: list[ClassInfo]):
        self.root = root
        self.remote = "://" in root
        self._fs = None
        self._pid = -1
        data = self._read("labels.csv")
        self.rows = [(r["key"], r["labels"]) for r in csv.DictReader(io.StringIO(data.decode()))]
        self.index = {c.id: i for i, c in enumerate(classes)}
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def _read(self, name: str) -> bytes:
        if self.remote:
            if self._pid != os.getpid():  # one client per process, made after the fork
                self._fs, self._base = get_fs(self.root)
                self._pid = os.getpid()
            return self._fs.cat_file(f"{self._base}/{name}")
        with open(os.path.join(self.root, name), "rb") as f:
            return f.read()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        key, labels = self.rows[i]
        if self.remote:
            img = Image.open(io.BytesIO(self._read(f"{key}.jpg"))).convert("RGB")
        else:
            img = Image.open(os.path.join(self.root, f"{key}.jpg")).convert("RGB")
        img = img.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        if random.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
        x = (x - self.mean) / self.std
        target = torch.full((NUM_CLASSES,), -1.0)
        for item in labels.split():
            mid, v = item.rsplit(":", 1)
            target[self.index[mid]] = float(v)
        return x, target


def run_reference(ds: ReferenceDataset, workers: int, batch: int) -> tuple[int, float]:
    loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    return _drain(loader, lambda b: len(b[0]))


# ----------------------------------------------------------------------------- report


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2000, help="samples per epoch (the 9 photos repeated)")
    ap.add_argument("--workers", type=int, default=2, help="N: DataLoader workers / ceiling processes")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; medians reported")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--shard-samples", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    exe = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable
    print("$ " + shlex.join([exe] + sys.argv), flush=True)
    if args.samples < args.batch or args.workers < 1 or args.rounds < 1:
        print(f"error: need --samples >= --batch ({args.batch}), --workers >= 1, --rounds >= 1", file=sys.stderr)
        return 2
    if not (SHARED / "images").is_dir() or not glob.glob(str(SHARED / "images" / "*.jpg")):
        print(f"SKIP: real OpenImages photos absent ({SHARED / 'images'}/*.jpg not found); nothing measured")
        return 0
    torch.set_num_threads(1)  # two shared cores: intra-op threads would only wait on each other
    n, nw, b = args.samples, args.workers, args.batch

    classes, records, photos = load_inputs(n, args.seed)
    print(f"cpus {os.cpu_count()}, torch {torch.__version__}, {len(photos)} photos "
          f"({', '.join('x'.join(map(str, Image.open(io.BytesIO(p)).size)) for p in photos)}), "
          f"{n} samples, batch {b}, {NUM_CLASSES} classes, 3 pos + 4 neg per sample", flush=True)

    tmp = tempfile.TemporaryDirectory(prefix="csl-bench-")
    server = None
    try:
        t0 = time.perf_counter()
        local = os.path.join(tmp.name, "shards")
        write_dataset(local, classes, {"train": records}, shard_samples=args.shard_samples)
        write_reference_local(os.path.join(tmp.name, "ref"), records, classes)
        server, endpoint = start_s3()
        s3_root, s3_ref = f"s3://{BUCKET}/ds", f"s3://{BUCKET}/ref"
        write_dataset(s3_root, classes, {"train": records}, shard_samples=args.shard_samples)
        write_reference_s3(s3_ref, records, classes)
        print(f"setup {time.perf_counter() - t0:.1f} s (shards and per-image files, local and on moto at {endpoint})")

        def stream(root: str, workers: int, augment: AugmentSpec | None = None) -> ShardStream:
            return ShardStream(root, "train", batch_size=b, image_size=SIZE, num_workers=workers, seed=args.seed,
                               augment=augment)

        ref_local = ReferenceDataset(os.path.join(tmp.name, "ref"), classes)
        ref_s3 = ReferenceDataset(s3_ref, classes)
        streams = {k: stream(*k) for k in [(local, 0), (local, nw), (s3_root, nw)]}
        augmented = {w: stream(local, w, REFERENCE) for w in (0, nw)}
        contenders: list[tuple[str, int, Callable[[], tuple[int, float]]]] = [
            ("ceiling: decode in memory", 1, lambda: run_ceiling(photos, n, 1, b)),
            ("stream local, workers=0", 1, lambda: run_stream(streams[(local, 0)])),
            ("ceiling: decode in memory", nw, lambda: run_ceiling(photos, n, nw, b)),
            (f"stream local, workers={nw}", nw, lambda: run_stream(streams[(local, nw)])),
            (f"reference local files, workers={nw}", nw, lambda: run_reference(ref_local, nw, b)),
            (f"stream S3, workers={nw}", nw, lambda: run_stream(streams[(s3_root, nw)])),
            (f"reference S3 objects, workers={nw}", nw, lambda: run_reference(ref_s3, nw, b)),
            ("stream local augmented, workers=0", 1, lambda: run_stream(augmented[0])),
            (f"stream local augmented, workers={nw}", nw, lambda: run_stream(augmented[nw])),
        ]
        rates: list[list[float]] = [[] for _ in contenders]
        cpu: list[list[float]] = [[] for _ in contenders]  # this process's CPU s per sample
        firsts: list[list[float]] = [[] for _ in contenders]
        for r in range(args.rounds):
            line = []
            for j in range(len(contenders)):
                k = (j + r) % len(contenders)  # rotate who goes first: drift hits everyone alike
                name, procs, fn = contenders[k]
                t, c = time.perf_counter(), time.process_time()
                got, first = fn()
                dt = time.perf_counter() - t
                cpu[k].append((time.process_time() - c) / n)
                firsts[k].append(first)
                if got != n:
                    raise RuntimeError(f"{name}: produced {got} samples, expected {n}")
                rates[k].append(n / dt)
                line.append(f"{name.split(',')[0].split(':')[0]}/{procs} {n / dt:.0f}")
            print(f"round {r + 1}: " + ", ".join(line) + " samples/s", flush=True)

        med = [statistics.median(x) for x in rates]
        print()
        print(f"{'contender':38s} {'procs':>5s} {'median/s':>9s} {'per proc':>9s} {'1st batch':>10s}   rounds (samples/s)")
        for (name, procs, _), m, xs, fs in zip(contenders, med, rates, firsts):
            fb = statistics.median(fs)
            fb_s = "-" if fb != fb else f"{fb * 1e3:.0f} ms"
            print(f"{name:38s} {procs:5d} {m:9.0f} {m / procs:9.0f} {fb_s:>10s}   {' '.join(f'{x:.0f}' for x in xs)}")
        print("(rates are whole epochs, start-up included; '1st batch': median wait for the first batch)")

        lb = label_bytes(local)
        print()
        print(f"label payload per sample: {lb['json']:.1f} B of .json (dense int8 would be {NUM_CLASSES} B; "
              f"bar {NUM_CLASSES // 100} B)")
        print(f"tar container per sample, not counted above: {lb['headers']:.0f} B headers "
              f"(2 members x 512), {lb['padding']:.0f} B block padding, "
              f"{lb['end_of_archive']:.1f} B end-of-archive blocks")

        c1, s0, cn, sn, rl, s3, r3, a0, an = med
        bars = [
            ("stream/ceiling at 1 process", f"stream workers=0 / ceiling 1 process       = {s0 / c1:6.2f}  (bar >= 0.85)",
             s0 / c1 >= 0.85),
            (f"stream/ceiling at {nw} processes",
             f"stream workers={nw} / ceiling {nw} processes     = {sn / cn:6.2f}  (bar >= 0.85)", sn / cn >= 0.85),
            ("S3 stream/reference", f"stream S3 / reference S3 (workers={nw})     = {s3 / r3:6.2f}x (bar >= 5x)",
             s3 / r3 >= 5),
            ("label bytes", f"label payload per sample                   = {lb['json']:6.1f} B (bar <= 96 B)",
             lb["json"] <= NUM_CLASSES / 100),
        ]
        print()
        for _, text, ok in bars:
            print(f"{verdict(ok)}  {text}")
        print(f"info  stream local / reference local (workers={nw}) = {sn / rl:.2f}x; "
              f"stream S3 / stream local = {s3 / sn:.2f}")
        p_ms, a_ms = (statistics.median(cpu[k]) * 1e3 for k in (1, 7))  # the workers=0 streams, all in-process
        print(f"info  augmented (reference Cutout + RandAugment) / plain stream: samples/s {a0 / s0:.2f} at 1 process, "
              f"{an / sn:.2f} at {nw}; CPU per sample in-process {a_ms:.2f} ms vs {p_ms:.2f} ms = {a_ms / p_ms:.2f}x")
        failed = [short for short, _, ok in bars if not ok]
        print()
        print(f"summary: {len(bars) - len(failed)}/{len(bars)} bars pass; stream {sn:.0f}/s vs ceiling {cn:.0f}/s "
              f"at {nw} processes, S3 {s3 / r3:.1f}x one-object-per-image, labels {lb['json']:.0f} B/sample"
              + (f"; FAILED: {'; '.join(failed)}" if failed else ""))
        return 1 if failed else 0
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
        tmp.cleanup()


if __name__ == "__main__":
    sys.exit(main())
