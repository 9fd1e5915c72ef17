"""Host work per batch on the training process: float batches normalised on the host (before)
against uint8 batches normalised on the device (after).

    .venv/bin/python bench/host_batch_cost.py [--batches 8] [--rounds 3] [--batch-size 64] [--image-size 224]

One synthetic split at `--image-size` px is built in a temp folder; `ShardStream` reads it with
one DataLoader worker (the hand-off through shared slots, as in training). Per batch, on the
training process:

* before: `next()` on a stream with `output="float"` (receive from the slot and normalise into a
  new float32 NCHW tensor, on the host), then `.to(device, non_blocking=True)`.
* after: `next()` on a stream with `output="uint8"` as training reads it (receive: on CUDA the
  slot copied out into pinned memory; on CPU `zero_copy`, the slot lent as it is), then
  `.to(device, non_blocking=True)`; `normalize` runs on the device (`trainer/prefetch.py` makes
  exactly these calls). On CUDA its launch is host work and counted; on a CPU-only machine the
  device is the host, so its time is printed apart, as device work, and the copy is a no-op.

Host work is the training thread's CPU time (`time.thread_time`), freeing the host-side batch
included: waiting for a worker costs none, so the figure is the receive itself whatever the
decode speed. Before each `next()` the
loop sleeps `--wait` seconds so the worker has the batch ready; wall times are printed too.
The first batch of each stream is left out (worker start). Modes alternate within a round;
medians over all batches. Bar: after < 2 ms per batch of host work. Exit code 1 if it fails.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_shards.decode import normalize  # noqa: E402
from data_shards.stream import ShardStream  # noqa: E402


def measure(root: str, mode: str, device: torch.device, batches: int, batch_size: int, image_size: int,
            wait: float) -> list[tuple[float, float, float]]:
    """(host CPU ms, host wall ms, device ms) per batch after the first."""
    cuda = device.type == "cuda"
    stream = ShardStream(root, "train", batch_size=batch_size, image_size=image_size, num_workers=1, shuffle=False,
                         train_transform=True, output="float" if mode == "before" else "uint8",
                         pin_memory=cuda and mode == "after", zero_copy=not cuda and mode == "after",
                         persistent_workers=False)
    out = []
    it = iter(stream)
    for i in range(batches + 1):
        time.sleep(wait)
        c0, w0 = time.thread_time(), time.perf_counter()
        batch = next(it)
        x = batch["image"].to(device, non_blocking=True)
        if mode == "after" and cuda:  # a kernel launch: host work
            x = normalize(x, channels_last=True)
        del batch  # the host-side batch: freed here
        c1, w1 = time.thread_time(), time.perf_counter()
        if mode == "after" and not cuda:  # the device is the host: normalising (and freeing) is device work
            x = normalize(x, channels_last=True)
        del x
        dev = (time.thread_time() - c1) * 1e3
        if cuda:
            torch.cuda.synchronize()
        if i:
            out.append(((c1 - c0) * 1e3, (w1 - w0) * 1e3, dev))
    it.close()
    stream.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, default=8, help="timed batches per stream and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--wait", type=float, default=1.0, help="seconds before each next(): the worker gets ahead")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    exe = os.path.relpath(sys.executable) if sys.executable.startswith(str(REPO)) else sys.executable
    print("$ " + shlex.join([exe, *sys.argv]), flush=True)
    print(f"device {device}, {os.cpu_count()} cores, {a.threads} torch thread(s), load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    work = tempfile.mkdtemp(prefix="host-batch-cost-")
    try:
        from data_shards.sources.synthetic import build_synthetic

        build_synthetic(work, train=a.batch_size * (a.batches + 1), val=0, image_size=a.image_size,
                        shard_samples=a.batch_size * 4, progress=False)
        res: dict[str, list[tuple[float, float, float]]] = {"before": [], "after": []}
        for r in range(a.rounds):
            for mode in ("before", "after") if r % 2 == 0 else ("after", "before"):
                res[mode] += measure(work, mode, device, a.batches, a.batch_size, a.image_size, a.wait)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {m: [statistics.median(v[i] for v in rows) for i in range(3)] for m, rows in res.items()}
    shape = f"{a.batch_size}x{a.image_size}x{a.image_size}"
    print(f"\nhost work per {shape} batch on the training process (median of {len(res['before'])} batches):")
    print(f"  before (receive + normalise on the host + copy): {med['before'][0]:7.2f} ms CPU, {med['before'][1]:7.2f} ms wall")
    print(f"  after  (receive uint8 + copy):                   {med['after'][0]:7.2f} ms CPU, {med['after'][1]:7.2f} ms wall")
    if device.type == "cpu":
        print(f"  device work after, normalise + free (the host here): {med['after'][2]:4.2f} ms CPU")
    ratio = med["before"][0] / med["after"][0]
    ok = med["after"][0] < 2.0
    print(f"before / after = {ratio:.1f}x; after {med['after'][0]:.2f} ms < 2 ms: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
