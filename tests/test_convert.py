"""Conversion as shard jobs (issue 13), in-process: resume after a crash, refusal of changed
settings, a rerun with nothing to do, anonymous S3 with transient errors, and verify/inspect
in flat memory with sampling. The Ray side (workers, SIGKILL) is in test_convert_ray.py.

A crash is simulated by a `build_shard` that raises once some shards are published: the same
state a kill leaves (published shards with records, no manifest for the split), without a
process to kill.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import threading
import time
import tracemalloc
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from data_shards import convert
from data_shards.convert import SettingsChanged
from data_shards.format import ClassInfo, Record
from data_shards.inspect import inspect_dataset, verify_dataset
from data_shards.sources.openimages import build_openimages
from data_shards.writer import write_dataset

PERSON, CAR = "/m/01g317", "/m/0k4j"
HEADER = "ImageID,Source,LabelName,Confidence"


def jpeg(seed: int, size: tuple[int, int] = (40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (seed * 37 % 256, 80, 160)).save(buf, format="JPEG")
    return buf.getvalue()


def inputs(tmp_path: Path, ids: list[str], name: str) -> tuple[str, str, str]:
    d = tmp_path / "imgs"
    d.mkdir(exist_ok=True)
    for i, k in enumerate(ids):
        (d / f"{k}.jpg").write_bytes(jpeg(i))
    classes = tmp_path / "classes.txt"
    classes.write_text(f"{PERSON}\n{CAR}\n")
    labels = tmp_path / name
    labels.write_text("\n".join([HEADER] + [f"{k},v,{PERSON if n % 3 else CAR},{n % 2}" for n, k in enumerate(ids)]) + "\n")
    return str(labels), str(classes), str(d)


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and ".progress" not in p.parts}


def mtimes(root: Path, split: str) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (root / split).glob("*.tar")}


def crash_after(monkeypatch, n: int) -> None:
    real, calls = convert.build_shard, []

    def flaky(job, ctx):
        if len(calls) == n:
            raise RuntimeError("simulated crash")
        calls.append(job.index)
        return real(job, ctx)

    monkeypatch.setattr(convert, "build_shard", flaky)


def test_crash_then_rerun_resumes_byte_identical_and_keeps_the_other_split(tmp_path, monkeypatch):
    train = [f"t{i}" for i in range(4)]
    val = [f"v{i:02d}" for i in range(10)]
    t_csv, classes, imgs = inputs(tmp_path, train, "train.csv")
    v_csv, _, _ = inputs(tmp_path, val, "val.csv")
    ref, root = tmp_path / "ref", tmp_path / "out"
    for r in (ref, root):
        build_openimages(t_csv, classes, imgs, str(r), shard_samples=2, progress=False)
    build_openimages(v_csv, classes, imgs, str(ref), split="val", shard_samples=2, progress=False)
    train_manifest = (root / "dataset.json").read_bytes()

    crash_after(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_openimages(v_csv, classes, imgs, str(root), split="val", shard_samples=2, progress=False)
    monkeypatch.undo()
    # The other split is listed and whole; the unfinished one is not a dataset yet.
    assert (root / "dataset.json").read_bytes() == train_manifest and verify_dataset(str(root))["ok"]
    kept = mtimes(root, "val")
    assert len(kept) == 3 and len(list((root / ".progress" / "val").glob("shard-*.json"))) == 3

    # Other settings over the unfinished split: refused in one line naming the change.
    with pytest.raises(SettingsChanged, match=r"resize: None -> 16.*--overwrite"):
        build_openimages(v_csv, classes, imgs, str(root), split="val", shard_samples=2, resize=16, progress=False)

    m, rep = build_openimages(v_csv, classes, imgs, str(root), split="val", shard_samples=2, progress=False)
    assert rep.get("shards reused") == 3 and rep.get("shards built") == 2
    assert {k: v for k, v in mtimes(root, "val").items() if k in kept} == kept  # untouched
    assert files(root) == files(ref)  # shards and dataset.json byte for byte
    assert [p.name for p in (root / ".progress" / "val").iterdir()] == ["settings.json"]
    assert verify_dataset(str(root))["ok"] and set(m.splits) == {"train", "val"}

    # The same command again: nothing to do, nothing rewritten.
    before = mtimes(root, "val")
    _, rep = build_openimages(v_csv, classes, imgs, str(root), split="val", shard_samples=2, progress=False)
    assert rep.get("splits already converted (nothing to do)") == 1 and mtimes(root, "val") == before
    assert files(root) == files(ref)


def test_changed_input_under_an_unfinished_split_is_refused_and_overwrite_starts_afresh(tmp_path, monkeypatch):
    ids = [f"i{i}" for i in range(6)]
    csv_path, classes, imgs = inputs(tmp_path, ids, "labels.csv")
    root = tmp_path / "out"
    crash_after(monkeypatch, 1)
    with pytest.raises(RuntimeError):
        build_openimages(csv_path, classes, imgs, str(root), shard_samples=2, progress=False)
    monkeypatch.undo()
    Path(csv_path).write_text(Path(csv_path).read_text().replace(f"i0,v,{CAR},0", f"i0,v,{CAR},1"))
    with pytest.raises(SettingsChanged, match="labels file"):
        build_openimages(csv_path, classes, imgs, str(root), shard_samples=2, progress=False)
    m, rep = build_openimages(csv_path, classes, imgs, str(root), shard_samples=2, overwrite=True, progress=False)
    assert rep.get("shards reused") == 0 and m.stats["train"].pos[1] == 2 and verify_dataset(str(root))["ok"]
    assert not (root / "dataset.json").read_text().count(".progress")


# ---------------------------------------------------------------- anonymous S3, transient errors


class _FlakyProxy(BaseHTTPRequestHandler):
    """Forwards to the S3 server; answers 503 to the first GET of each image; notes signatures."""

    upstream = ""
    seen: dict[str, int] = {}
    signed: list[str] = []

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or None
        if "Authorization" in self.headers or "X-Amz-Signature" in self.path:
            self.signed.append(self.path)
        if self.command == "GET" and self.path.split("?")[0].endswith(".jpg"):
            n = self.seen[self.path] = self.seen.get(self.path, 0) + 1
            if n == 1:
                msg = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                self.send_response(503)
                self.send_header("Content-Length", str(len(msg)))
                self.end_headers()
                self.wfile.write(msg)
                return
        host, port = self.upstream.split("//")[1].split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.request(self.command, self.path, body=body, headers={k: v for k, v in self.headers.items()})
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_PUT = _forward

    def log_message(self, *args) -> None:
        pass


def test_anonymous_s3_images_with_transient_errors(tmp_path, s3_bucket, monkeypatch):
    """The local server (moto) answers unsigned requests by the bucket policy: 403 before the
    policy, the object after it (for GetObject; it refuses HEAD, hence one GET per image). With
    no credential anywhere in the environment, `anon=True` reads the public prefix with unsigned
    requests (the proxy sees no signature), and a 503 SlowDown on every image's first GET is
    retried (botocore standard mode) instead of skipping the image."""
    import boto3
    import s3fs

    ids = [f"a{i}" for i in range(5)]
    csv_path, classes, imgs = inputs(tmp_path, ids, "labels.csv")
    bucket = s3_bucket[5:]
    s3 = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"], region_name="us-east-1")
    for k in ids:
        s3.upload_file(f"{imgs}/{k}.jpg", bucket, f"public/{k}.jpg")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Principal": "*", "Action": "s3:GetObject",
                                                       "Resource": f"arn:aws:s3:::{bucket}/public/*"}]}
    from data_shards.sources.common import read_image_bytes

    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(PermissionError):  # anonymous and no policy yet: refused
        read_image_bytes(f"s3://{bucket}/public/a0.jpg", anon=True)
    s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))

    _FlakyProxy.upstream, _FlakyProxy.seen, _FlakyProxy.signed = os.environ["AWS_ENDPOINT_URL"], {}, []
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), _FlakyProxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.server_port}")
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            monkeypatch.delenv(k, raising=False)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        s3fs.S3FileSystem.clear_instance_cache()
        root = tmp_path / "out"
        m, rep = build_openimages(csv_path, classes, f"s3://{bucket}/public/{{id}}.jpg", str(root), anon=True,
                                  shard_samples=2, progress=False)
    finally:
        proxy.shutdown()
        s3fs.S3FileSystem.clear_instance_cache()
    assert rep.problems == 0 and m.splits["train"].samples == 5, rep.summary()
    assert all(n == 2 for n in _FlakyProxy.seen.values()) and len(_FlakyProxy.seen) == 5  # each 503 retried once
    assert _FlakyProxy.signed == []  # no request carried a signature


# ---------------------------------------------------------------- verify / inspect at scale


def _many_shards(root: str, shards: int, num_classes: int = 9600) -> None:
    classes = [ClassInfo(id=f"/m/{c}", name=f"c{c}") for c in range(num_classes)]
    img = jpeg(1, (16, 16))
    recs = [Record(key=f"k{i:05d}", image=img, pos=[(i * 7) % num_classes], neg=[(i * 11 + 1) % num_classes])
            for i in range(shards)]
    write_dataset(root, classes, {"train": recs}, shard_samples=1)


def test_verify_and_inspect_memory_is_flat_in_shards_and_sampling_checks_a_fraction(tmp_path):
    peaks = {}
    slow_consumer = lambda *_: time.sleep(0.004)  # noqa: E731 (lets the scanners run ahead, if they may)
    for n in (20, 120):
        root = str(tmp_path / f"d{n}")
        _many_shards(root, n)
        manifest_bytes = os.path.getsize(os.path.join(root, "dataset.json"))
        tracemalloc.start()
        res = verify_dataset(root, threads=2, progress=slow_consumer)
        ins = inspect_dataset(root, threads=2, progress=slow_consumer)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert res["ok"] and res["samples"] == n and ins["splits"]["train"]["samples"] == n
        peaks[n] = peak - 40 * manifest_bytes  # the parsed manifest itself grows with the shards listed
    # 100 more shards' reports (two 9,600-long int64 arrays each, 15 MB if kept) must not add up.
    assert peaks[120] - peaks[20] < 5e6, peaks
    res = verify_dataset(str(tmp_path / "d120"), threads=2, sample=0.2)
    assert res["ok"] and res["sampled"] and 8 <= res["shards"] <= 45 and res["samples"] == res["shards"]
