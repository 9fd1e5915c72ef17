"""Benchmark: start to first step on 2 nodes against 1, checkpoint upload from the node that
does not hold the run folder, and what a node loss costs.

    .venv/bin/python bench/multinode.py [--upload-mb 256] [--no-node-loss]

Both clusters are private Ray clusters on this machine (`tests/ray_nodes.py`): one node with
2 CPUs, and a head plus a second node on 127.0.0.2 in its own mount namespace with 1 CPU
each; the local S3 server (moto) holds data and runs for both, so the two differ only in the
node layout. Measured:
- seconds from `csl train` starting (a driver joining the running cluster through
  RAY_ADDRESS, as a job does) to its first progress line (`train.log_every=1`), same config,
  2 workers; the ratio 2 nodes / 1 node;
- seconds per GB for a checkpoint-sized upload to the run storage from a task pinned to the
  second node (fsspec `put` from its private /tmp, the way a rank's files leave its node).
- a node loss, with Ray's and Ray Train's default timeouts (what a user's cluster has): a run
  at `cluster.min_workers=1` holds rank 1 after step 7 (`debug.fault_action=hold`), every
  process of node 2 is SIGKILLed, and the seconds from the loss to the driver's failure
  line, to the first step after the restart (at one worker) and to the run's end are read
  off the driver's console.
The S3 server is moto in this process's machine, single-threaded Python: the upload figure is
this bench's S3, not AWS's; the start-up ratio is the point.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CSL = str(Path(sys.executable).with_name("csl"))


def _first_step_s(env: dict[str, str], data: str, storage: str, name: str) -> float:
    args = [CSL, "train", "--config", "synthetic-cpu", "data.image_size=32", "data.batch_size=16", "data.workers=0",
            "train.log_every=1", "train.max_steps=2", "cluster.workers=2", "cluster.cpus_per_worker=1",
            f"data.root={data}", f"run.storage={storage}", f"run.name={name}"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first = None
    assert proc.stdout is not None
    for line in proc.stdout:
        if first is None and line.startswith("step 1/"):
            first = time.perf_counter() - t0
    err = proc.stderr.read() if proc.stderr else ""
    if proc.wait() != 0 or first is None:
        raise RuntimeError(f"csl train failed (rc {proc.returncode}):\n{err[-3000:]}")
    return first


def _node_loss(cluster, data: str, storage: str) -> dict[str, float]:
    import tempfile

    from ray_nodes import shared_scratch

    marker = os.path.join(tempfile.mkdtemp(prefix="bench-", dir=shared_scratch()), "held")
    args = [CSL, "train", "--config", "synthetic-cpu", "data.image_size=32", "data.batch_size=16", "data.workers=0",
            "train.log_every=1", "train.max_steps=8", "checkpoint.every_steps=3", "cluster.workers=2",
            "cluster.cpus_per_worker=1", "cluster.min_workers=1", "cluster.max_failures=1", "deepspeed.zero_stage=1",
            "debug.fault_step=7", "debug.fault_rank=1", "debug.fault_action=hold", f"debug.fault_marker={marker}",
            f"data.root={data}", f"run.storage={storage}", "run.name=node-loss"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cluster.env)
    while not os.path.exists(marker):
        if proc.poll() is not None:
            raise RuntimeError(f"csl train ended before the hold: {proc.stderr.read()[-3000:]}")
        time.sleep(0.1)
    t0 = time.perf_counter()
    cluster.lose_node(cluster.nodes[1])
    out: dict[str, float] = {}
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("worker failure") and "failure line" not in out:
            out["failure line"] = time.perf_counter() - t0
        elif line.startswith("step 8/") and "first step after the restart" not in out:
            out["first step after the restart"] = time.perf_counter() - t0
    if proc.wait() != 0 or len(out) < 2:
        raise RuntimeError(f"csl train failed (rc {proc.returncode}):\n{proc.stderr.read()[-3000:]}")
    out["run's end"] = time.perf_counter() - t0
    return out


def _upload_s_per_gb(env: dict[str, str], url: str, mb: int) -> float:
    code = f"""
import os, time, ray, fsspec
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from data_shards.storage import get_fs
ray.init(log_to_driver=False)
head = ray.get_runtime_context().get_node_id()
other = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != head][0]

@ray.remote(num_cpus=0)
def upload():
    path = "/tmp/ckpt-probe.bin"
    with open(path, "wb") as f:
        for _ in range({mb}):
            f.write(os.urandom(1 << 20))
    fs, p = get_fs("{url}")
    t = time.perf_counter()
    fs.put_file(path, p)
    dt = time.perf_counter() - t
    os.remove(path)
    return dt

print(ray.get(upload.options(scheduling_strategy=NodeAffinitySchedulingStrategy(other, soft=False)).remote()))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-3000:])
    return float(p.stdout.strip().splitlines()[-1]) / (mb / 1024)


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(REPO / "tests"))
    import boto3
    from moto.server import ThreadedMotoServer

    from conftest import free_port
    from ray_nodes import namespaces_allowed, start_cluster

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--upload-mb", type=int, default=256)
    ap.add_argument("--no-node-loss", dest="node_loss", action="store_false", help="skip the node-loss run")
    args = ap.parse_args(argv)
    why = namespaces_allowed()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's per-request lines
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    aws = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1"}
    os.environ.update(aws)
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=aws["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(Bucket=bucket)
    from data_shards.sources.synthetic import build_synthetic

    data = f"s3://{bucket}/data"
    build_synthetic(data, train=128, val=32, image_size=32, shard_samples=32, seed=0, progress=False)
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    results = {}
    try:
        for label, head, second in (("1 node (2 CPUs)", 2, 0), ("2 nodes (1 + 1 CPU)", 1, 1)):
            cluster = start_cluster(head_cpus=head, second_node_cpus=second, env=aws)
            try:
                results[label] = _first_step_s(cluster.env, data, f"s3://{bucket}/runs", f"start-{head}-{second}")
                print(f"  {label}: start to first step {results[label]:.1f} s", flush=True)
                if second:
                    s = _upload_s_per_gb(cluster.env, f"s3://{bucket}/upload/probe.bin", args.upload_mb)
                    print(f"  checkpoint-sized upload ({args.upload_mb} MB) from the second node to S3: {s:.1f} s/GB")
                    if args.node_loss:
                        loss = _node_loss(cluster, data, f"s3://{bucket}/runs")
                        print("  node loss (default timeouts), seconds after it: "
                              + ", ".join(f"{k} {v:.1f}" for k, v in loss.items()), flush=True)
            finally:
                cluster.stop()
    finally:
        server.stop()
    one, two = results.values()
    print(f"start to first step, 2 nodes / 1 node: {two / one:.2f} ({two:.1f} s vs {one:.1f} s); "
          f"load average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
