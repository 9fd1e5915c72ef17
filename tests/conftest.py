"""Shared fixtures: a local S3-compatible server, the shared real-data folder, seeds.

The S3 server is moto in server mode on 127.0.0.1 (a free port), started once per session in
a thread of the test process; other processes (Ray workers, `csl` subprocesses) reach it
through `AWS_ENDPOINT_URL`, exactly as they would reach a real endpoint.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_OPENIMAGES = REPO.parent / "shared" / "data" / "openimages"


def pytest_itemcollected(item):
    """Two lanes under `pytest -n 2 --dist loadgroup` (the Makefile's): every integration test
    in one lane, one at a time, because each sizes its local Ray cluster or gloo group for the
    machine's 2 CPUs; the unit tests in the other, a file at a time so module fixtures are
    built once. Marked as each item is collected, before any `pytest_collection_modifyitems`
    (where xdist turns the marks into groups). Without xdist the marks do nothing."""
    lane = "integration" if item.get_closest_marker("integration") else item.nodeid.split("::")[0]
    item.add_marker(pytest.mark.xdist_group(lane))


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
