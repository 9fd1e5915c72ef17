"""Shared fixtures: a local S3-compatible server, the shared real-data folder, seeds.

The S3 server is moto in server mode on 127.0.0.1 (a free port), started once per session in
a thread of the test process; other processes (Ray workers, `csl` subprocesses) reach it
through `AWS_ENDPOINT_URL`, exactly as they would reach a real endpoint.
"""

from __future__ import annotations

import os
import secrets
import socket
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_OPENIMAGES = REPO.parent / "shared" / "data" / "openimages"


def pytest_itemcollected(item):
    """Lanes under `pytest -n 3 --dist loadgroup` (the Makefile's): the single-node integration
    tests in one lane, one at a time, because each sizes its Ray cluster or gloo group for the
    machine's 2 CPUs; the two-node tests (`-m multinode`, their own cluster of 1 + 1 CPU, much
    of their time spent waiting on Ray's start-up and failure detection) in a second; the unit
    tests a file at a time (module fixtures built once) in whichever worker is free. Marked as
    each item is collected, before any `pytest_collection_modifyitems` (where xdist turns the
    marks into groups). Without xdist the marks do nothing."""
    if item.get_closest_marker("multinode"):
        lane = "multinode"
    elif item.get_closest_marker("integration"):
        lane = "integration"
    else:
        lane = item.nodeid.split("::")[0]
    item.add_marker(pytest.mark.xdist_group(lane))


def pytest_configure(config):
    """Every Ray cluster this session starts or joins in this process uses token auth with one
    session token, set before any test imports Ray: a process reads Ray's auth settings once
    (a later change to its environment is not seen by `ray.init`), and the shared head
    (`ray_head`) is joined from this process too. It also keeps the tests off the user's
    `~/.ray/auth_token`. Child processes inherit both."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch) -> str:
    """A fresh bucket on the local server; returns 's3://<bucket>'. Env points boto at it."""
    import boto3
    import s3fs

    for k, v in {
        "AWS_ENDPOINT_URL": s3_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    name = f"csl-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    s3fs.S3FileSystem.clear_instance_cache()
    yield f"s3://{name}"
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def openimages_dir() -> Path:
    if not SHARED_OPENIMAGES.is_dir():
        pytest.skip(f"real OpenImages fixtures absent: {SHARED_OPENIMAGES} not found")
    return SHARED_OPENIMAGES


@pytest.fixture(scope="session")
def ray_head(s3_server):
    """One private 2-CPU Ray head (`ray_nodes.start_cluster`) that the integration tests' drivers
    join through RAY_ADDRESS, as `ray job submit` drivers join a real cluster. Starting and
    stopping a local cluster (GCS, raylet, dashboard and its agents) costs about 11 s and 15
    CPU-seconds on this machine; each `csl` command that joins this head pays it once per
    session instead. Its processes get `LOCAL_RAY_ENV` (what `ensure_ray` gives a local
    cluster) and the local S3 server's endpoint and test keys, since a worker's environment is
    its node's, not its driver's. The tests of the local default itself (`csl demo`, the smoke
    test, `test_local_ray.py`) still start their own."""
    from ray_nodes import start_cluster

    from trainer.launch import LOCAL_RAY_ENV

    aws = {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    cluster = start_cluster(head_cpus=2, env={**LOCAL_RAY_ENV, **aws}, token=os.environ["RAY_AUTH_TOKEN"])
    yield cluster
    cluster.stop()


@pytest.fixture
def ray_env(ray_head) -> dict[str, str]:
    """The environment of a driver process (a `csl` command) that joins `ray_head`."""
    return {**os.environ, **ray_head.driver_env}


@pytest.fixture(scope="module")
def ray_connected(ray_head):
    """This process as a driver of `ray_head` for a module's tests; yields the address. Its
    environment carries the head's address and token meanwhile, so `csl` subprocesses started
    with `os.environ` join the same head."""
    import ray

    with pytest.MonkeyPatch.context() as mp:
        for k, v in ray_head.driver_env.items():
            mp.setenv(k, v)
        ray.init(address=ray_head.address, log_to_driver=False)
        try:
            yield ray_head.address
        finally:
            ray.shutdown()
