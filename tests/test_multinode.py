"""Two Ray nodes without a shared disk (`tests/ray_nodes.py`): the head on 127.0.0.1, a second
node on 127.0.0.2 with private /tmp, /dev/shm and /var/tmp, one CPU each, the local S3 server
the only storage both reach. Run these alone with `pytest -m multinode`.

- The preflight refuses, at once and in one line, a path the second node cannot reach.
- Training, submitted as a Ray job to the head, spreads its two workers over both nodes with
  data and run storage on S3; the node without the run folder uploads its share of each
  checkpoint.
- Node loss: every process of the second node SIGKILLed mid-epoch. The run goes on from its
  last checkpoint at the size the cluster still has (one worker, `cluster.min_workers=1`),
  reads every sample once per epoch and ends with the uninterrupted run's parameters.
  (Resuming a run by resubmitting it is the CLI rerun of `test_train.py`: a job's entrypoint
  is that same command.)
- The prior pass with an actor on each node gives the priors a plain in-process scoring of the
  same shards gives.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tempfile
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from ray_nodes import job_client, namespaces_allowed, run_job, shared_scratch, start_cluster
from test_train import keys_per_epoch

pytestmark = [pytest.mark.integration, pytest.mark.multinode]

CSL = str(Path(sys.executable).with_name("csl"))
TRAIN = ["--config", "synthetic-cpu", "data.image_size=32", "data.batch_size=16", "data.workers=0", "train.log_every=2",
         "cluster.workers=2", "cluster.cpus_per_worker=1", "deepspeed.zero_stage=1"]


@pytest.fixture(scope="module")
def aws(s3_server):
    env = {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.delenv("AWS_ENDPOINT_URL_S3", raising=False)
        mp.delenv("AWS_PROFILE", raising=False)
        yield env


@pytest.fixture(scope="module")
def bucket(aws) -> str:
    import boto3
    import s3fs

    name = f"csl-mn-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=aws["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(Bucket=name)
    s3fs.S3FileSystem.clear_instance_cache()
    return f"s3://{name}"


# Shorter waits for the node-loss test (nothing else here depends on them): a lost node is
# declared dead after 3 failed health checks 1 s apart (Ray's defaults: 5, 3 s apart), and a
# worker group that cannot start is given up after 20 s (Ray Train's default: 60 s). The
# ranks notice the loss before Ray marks the node dead, so the first restart still counts
# the lost node's CPU, asks for two workers, and only after that timeout restarts at one.
FAST_NODE_LOSS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
                  "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"}


@pytest.fixture(scope="module")
def cluster(aws):
    why = namespaces_allowed()
    if why:
        pytest.skip(f"a second node needs its own mount namespace: {why}")
    c = start_cluster(head_cpus=1, second_node_cpus=1, env={**aws, **FAST_NODE_LOSS})
    yield c
    c.stop()


@pytest.fixture
def two_nodes(cluster):
    """The cluster with both nodes alive: node 2 is started again if a node-loss test took it."""
    if len(cluster.nodes) < 2:
        cluster.add_node(1)
        cluster.wait_alive(2)
    return cluster


@pytest.fixture(scope="module")
def s3_data(bucket) -> str:
    from data_shards.sources.synthetic import build_synthetic

    root = f"{bucket}/data"
    build_synthetic(root, train=128, val=32, image_size=32, shard_samples=32, seed=3, progress=False)
    return root


def csl(cluster, *args: str, timeout: int = 600):
    return subprocess.run([CSL, *args], capture_output=True, text=True, timeout=timeout, env=cluster.env)


def ok(p):
    assert p.returncode == 0, f"rc={p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-6000:]}"
    return p


def run_args(s3_data: str, bucket: str, name: str) -> list[str]:
    return [*TRAIN, f"data.root={s3_data}", "train.max_steps=8", "checkpoint.every_steps=3", f"run.storage={bucket}/runs",
            f"run.name={name}"]


def assert_each_sample_once_per_epoch(keys: dict[int, Counter]) -> None:
    assert sorted(keys) == [0, 1]  # 128 samples, 32 a step: 8 steps are 2 epochs
    for epoch, counts in keys.items():
        assert set(counts.values()) == {1} and len(counts) == 128, f"epoch {epoch}: a sample missing or seen twice"


@pytest.fixture(scope="module")
def trained(cluster, bucket, s3_data):
    """One run submitted through the head's Jobs API, as `cluster/ray/` documents (`ray job
    submit -- csl train ...`): its driver runs under the job supervisor on the head with
    RAY_ADDRESS set, its two workers one on each node, uninterrupted."""
    scratch = tempfile.mkdtemp(prefix="mn-", dir=shared_scratch())  # the harness's own files, seen by both nodes
    keys = os.path.join(scratch, "keys")
    entrypoint = " ".join([CSL, "train", *run_args(s3_data, bucket, "spread"), f"debug.record_keys={keys}"])
    # PYTHONPATH only matters when the package is not installed in the venv
    try:
        logs = run_job(job_client(cluster), entrypoint, f"spread-{uuid.uuid4().hex[:8]}",
                       {"PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        yield {"logs": logs, "run": f"{bucket}/runs/spread", "keys": keys}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def test_preflight_names_the_node_and_the_path_it_cannot_reach(two_nodes, s3_data, tmp_path):
    from data_shards.sources.synthetic import build_synthetic

    # run.storage on the driver's disk: node 2 has its own /tmp, where the driver's probe is not
    p = csl(two_nodes, "train", *TRAIN, f"data.root={s3_data}", "train.max_steps=2", f"run.storage={tmp_path / 'runs'}",
            "run.name=local")
    assert p.returncode == 2, p.stdout + p.stderr
    line = p.stderr.strip().splitlines()[-1]
    assert "127.0.0.2" in line and "run.storage=" in line and "shared file system" in line and "Traceback" not in p.stderr
    assert not any((tmp_path / "runs" / "local").glob(".preflight/*"))  # probes cleaned up

    # data.root on the driver's disk only: the same check, from a small driver of its own (Ray
    # reads its token settings once per process, so this test process does not join)
    import subprocess

    local = str(tmp_path / "data")
    build_synthetic(local, train=32, val=16, image_size=32, shard_samples=16, seed=0, progress=False)
    code = (
        "import sys, ray\n"
        "from trainer.preflight import PreflightError, check_nodes\n"
        "ray.init(log_to_driver=False)\n"
        f"assert check_nodes(read=[('data.root', '{s3_data}/dataset.json')], write=[('run.storage', '{s3_data}-runs')]) == 2\n"
        "try:\n"
        f"    check_nodes(read=[('data.root', '{local}/dataset.json')], write=[('run.storage', '{s3_data}-runs')])\n"
        "except PreflightError as e:\n"
        "    print(e)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=two_nodes.env)
    assert p.returncode == 0, p.stderr[-3000:]
    line = p.stdout.strip().splitlines()[-1]
    assert "127.0.0.2: data.root=" in line and f"{local}/dataset.json cannot read it" in line, line


def s3():
    import s3fs

    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})


def test_training_spread_over_two_nodes_uploads_each_ranks_share(trained):
    logs, run = trained["logs"], trained["run"]
    assert "starting run 'spread'" in logs and "worker failure" not in logs
    fs = s3()
    assert json.loads(fs.cat_file(f"{run[5:]}/eval.json"))["step"] == 8
    # ZeRO 1: each rank wrote its own optimizer shard, one of them from node 2's private disk to
    # S3 (one CPU per node and per worker: the two workers can only be one on each node)
    ckpt = f"{run[5:]}/checkpoint_00000006/ds"
    shards = [q for q in fs.ls(ckpt) if "optim_states" in q]
    assert len(shards) == 2, fs.ls(ckpt)
    assert_each_sample_once_per_epoch(keys_per_epoch(Path(trained["keys"]), None))


def test_prior_pass_with_an_actor_on_each_node_equals_in_process_scoring(two_nodes, trained, s3_data, bucket):
    import torch

    from data_shards.storage import read_bytes, read_manifest
    from trainer.inference import load_checkpoint
    from trainer.priors import read_priors
    from trainer.prior_scoring import score_shards

    out = f"{bucket}/priors/priors.csv"
    # one CPU per node and one per actor: the two actors can only be one on each node
    ok(csl(two_nodes, "prior", "--checkpoint", trained["run"], "--data", s3_data, "--out", out, "--actors", "2",
           "--cpus-per-actor", "1", "--workers", "0", "--device", "cpu", "--batch-size", "16"))
    assert json.loads(read_bytes(f"{bucket}/priors/priors.json"))["actors"] == 2
    m = read_manifest(s3_data)
    model = load_checkpoint(trained["run"]).model.eval()
    rows = list(score_shards(model, s3_data, "train", m, list(range(len(m.split("train").shards))), image_size=32,
                             batch_size=16, workers=0, device=torch.device("cpu")))
    ref = sum(r.sum for r in rows) / sum(r.count for r in rows)
    np.testing.assert_allclose(read_priors(out, m), ref, rtol=0, atol=1e-5)


def test_conversion_tasks_on_both_nodes_publish_to_s3_as_in_process(two_nodes, bucket, tmp_path):
    """`csl shards` joins the cluster at RAY_ADDRESS, its tasks (one CPU each, one CPU per node)
    publish straight to S3, and the result is byte-identical to an in-process conversion; an
    output only the driver's disk holds is refused by the preflight."""
    from data_shards.sources.synthetic import build_synthetic
    from data_shards.storage import read_bytes

    args = ["shards", "synthetic", "--train", "96", "--val", "16", "--image-size", "32", "--shard-samples", "16",
            "--seed", "5"]
    out = f"{bucket}/converted"
    ok(csl(two_nodes, *args, "--out", out))
    local = str(tmp_path / "here")
    build_synthetic(local, train=96, val=16, image_size=32, shard_samples=16, seed=5, progress=False)
    assert read_bytes(f"{out}/dataset.json") == Path(local, "dataset.json").read_bytes()
    for shard in json.loads(Path(local, "dataset.json").read_text())["splits"]["train"]["shards"]:
        assert read_bytes(f"{out}/{shard['path']}") == Path(local, shard["path"]).read_bytes()

    p = csl(two_nodes, *args, "--out", str(tmp_path / "driver-only"))
    assert p.returncode == 2 and "127.0.0.2: --out=" in p.stderr and "Traceback" not in p.stderr, p.stderr[-3000:]


def test_node_loss_mid_epoch_goes_on_at_one_worker_with_the_same_parameters(two_nodes, trained, bucket, s3_data):
    """The same run with `cluster.min_workers=1`: rank 1 holds after step 7 (step 6's checkpoint
    is complete), and every process of node 2 is SIGKILLed, as when a machine is lost. Ray
    marks the node dead and the worker group fails; Ray Train restarts it at the size the
    cluster still has, one worker on the head, which resumes from step 6's world-size-free
    state (ZeRO 1 shards cut for two ranks cannot load into one) and plays both data lanes
    (grad_accum 2). Every sample is read once per epoch, and the parameters are the
    uninterrupted run's within 1e-5; BatchNorm's running statistics are not compared, since one
    worker folds the two lanes' batches in turn where two ranks averaged theirs (as in
    `test_train.test_resume_at_another_world_size`). The next test that needs node 2 starts
    it again (`two_nodes`)."""
    from safetensors.torch import load

    scratch = tempfile.mkdtemp(prefix="mn-", dir=shared_scratch())
    keys, marker = os.path.join(scratch, "keys"), os.path.join(scratch, "held")
    args = [*run_args(s3_data, bucket, "lost"), "cluster.min_workers=1", "cluster.max_failures=1", "debug.fault_step=7",
            "debug.fault_rank=1", "debug.fault_action=hold", f"debug.fault_marker={marker}", f"debug.record_keys={keys}"]
    driver = subprocess.Popen([CSL, "train", *args], env=two_nodes.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    try:
        deadline = time.monotonic() + 300
        while not os.path.exists(marker):
            assert driver.poll() is None, driver.communicate()
            assert time.monotonic() < deadline, "rank 1 never reached step 7"
            time.sleep(0.2)
        two_nodes.lose_node(two_nodes.nodes[1])
        out, err = driver.communicate(timeout=600)
        assert driver.returncode == 0, f"rc={driver.returncode}\n{out[-4000:]}\n{err[-4000:]}"
        assert "worker failure 1 (cluster.max_failures=1)" in out and "from the checkpoint at step 6" in out, out
        assert "step 8/8 " in out and "eval at step 8 " in out, out  # the console outlives the node (on the driver's)
        fs = s3()
        assert json.loads(fs.cat_file(f"{bucket[5:]}/runs/lost/eval.json"))["step"] == 8
        assert_each_sample_once_per_epoch(keys_per_epoch(Path(keys), 6))

        a = load(fs.cat_file(f"{trained['run'][5:]}/checkpoint_00000008/model.safetensors"))
        b = load(fs.cat_file(f"{bucket[5:]}/runs/lost/checkpoint_00000008/model.safetensors"))
        params = [k for k in a if "running_" not in k and "num_batches" not in k]
        assert "bn1.bias" in params and a.keys() == b.keys()
        diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in params)
        assert diff <= 1e-5, f"parameters differ by {diff}"
    finally:
        if driver.poll() is None:
            driver.kill()
        shutil.rmtree(scratch, ignore_errors=True)
