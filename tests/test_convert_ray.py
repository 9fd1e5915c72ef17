"""Conversion and verification as Ray tasks (issue 13), on a local 2-CPU Ray cluster.

- 1 and 2 Ray workers and the in-process mode give byte-identical shards and manifests;
- bad images (a decompression bomb, HTML, a 404, a host that answers 503) are counted and
  named the same way through Ray;
- a `csl shards openimages` process SIGKILLed once about half its shards are recorded: the
  rerun reuses every recorded shard untouched (same mtime), redoes at most one shard per
  worker, and ends byte-identical to an uninterrupted run; the split already in the root stays
  listed and verifying throughout;
- verify through Ray tasks says what the in-process verify says, on damaged shards too.

Images come from a local HTTP server that answers slowly, so that the kill lands mid-way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from data_shards.inspect import verify_dataset
from data_shards.sources.openimages import build_openimages
from data_shards.sources.synthetic import build_synthetic
from test_convert import files, inputs, mtimes
from test_hostile_converters import png_bomb

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]


class _SlowImages(SimpleHTTPRequestHandler):
    delay = 0.0
    status: dict[str, int] = {}

    def do_GET(self) -> None:
        time.sleep(self.delay)
        code = self.status.get(self.path)
        if code:
            self.send_error(code)
            return
        super().do_GET()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def http_folder(tmp_path):
    folder = tmp_path / "served"
    folder.mkdir()
    handler = type("H", (_SlowImages,), {"delay": 0.0, "status": {}})

    def make(*a, **kw):
        return handler(*a, directory=str(folder), **kw)

    server = ThreadingHTTPServer(("127.0.0.1", 0), make)
    server.handle_error = lambda *_: None  # clients of a killed conversion hang up mid-answer
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_port}", folder, handler
    server.shutdown()


def test_workers_give_identical_bytes_and_bad_images_are_named(ray_connected, tmp_path, http_folder):
    roots = {}
    for w in (0, 1, 2):
        roots[w] = tmp_path / f"syn{w}"
        build_synthetic(str(roots[w]), train=40, val=8, image_size=24, shard_samples=8, workers=w, progress=False)
    assert files(roots[0]) == files(roots[1]) == files(roots[2]) and len(files(roots[0])) == 7

    host, folder, handler = http_folder
    ids = ["good1", "bomb", "html", "gone", "down", "good2"]
    csv_path, classes, imgs = inputs(tmp_path, ids, "labels.csv")
    for k in ("good1", "good2"):
        (folder / f"{k}.jpg").write_bytes(Path(imgs, f"{k}.jpg").read_bytes())
    (folder / "bomb.jpg").write_bytes(png_bomb())
    (folder / "html.jpg").write_bytes(b"<html>403 Forbidden</html>")
    handler.status = {"/down.jpg": 503}
    out = {}
    for w in (0, 2):
        root = tmp_path / f"oi{w}"
        m, rep = build_openimages(csv_path, classes, f"http://{host}/{{id}}.jpg", str(root), shard_samples=2,
                                  workers=w, progress=False)
        out[w] = (files(root), rep.problem_counts, rep.summary())
        assert m.splits["train"].samples == 2 and [s.samples for s in m.splits["train"].shards] == [1, 1]
    assert out[0][0] == out[2][0] and out[0][1] == out[2][1]
    assert out[2][1] == {"unreadable image": 2, "missing image": 1, "unreachable image": 1}
    text = out[2][2]
    for what in ("ImageID bomb:", "decompression bomb", "ImageID html:", "ImageID gone:", "ImageID down:"):
        assert what in text, text
    # verify through Ray tasks agrees with the in-process verify, on damage too
    shard = sorted((roots[2] / "train").glob("*.tar"))[1]
    shard.write_bytes(shard.read_bytes()[:3000])
    a, b = verify_dataset(str(roots[2]), workers=0), verify_dataset(str(roots[2]), workers=2)
    assert not a["ok"] and a == b


def test_sigkill_mid_conversion_then_rerun(ray_connected, tmp_path, http_folder):
    host, folder, handler = http_folder
    train = [f"t{i}" for i in range(4)]
    val = [f"v{i:02d}" for i in range(48)]
    t_csv, classes, imgs = inputs(tmp_path, train, "train.csv")
    v_csv, _, _ = inputs(tmp_path, val, "val.csv")
    for k in val:
        (folder / f"{k}.jpg").write_bytes(Path(imgs, f"{k}.jpg").read_bytes())
    template = f"http://{host}/{{id}}.jpg"
    ref, root = tmp_path / "ref", tmp_path / "out"
    for r in (ref, root):
        build_openimages(t_csv, classes, imgs, str(r), resize=256, shard_samples=2, progress=False)
    build_openimages(v_csv, classes, template, str(ref), split="val", resize=256, shard_samples=4, progress=False)
    train_manifest = (root / "dataset.json").read_bytes()

    handler.delay = 0.25  # each shard task waits on its images: the kill lands mid-way
    env = {**os.environ, "RAY_ADDRESS": ray_connected}
    cmd = [sys.executable, "-m", "trainer.cli", "shards", "openimages", "--labels", v_csv, "--classes", classes,
           "--images", template, "--out", str(root), "--split", "val", "--shard-samples", "4", "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    records = root / ".progress" / "val"
    deadline = time.time() + 120
    while len(list(records.glob("shard-*.json"))) < 6:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no progress"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()
    time.sleep(1.0)  # tasks of the dead driver are cancelled by Ray; let any straggler finish
    recorded = {p.name for p in records.glob("shard-*.json")}
    existing = mtimes(root, "val")
    kept = {f"val-{n[6:12]}.tar": existing[f"val-{n[6:12]}.tar"] for n in recorded}
    assert 6 <= len(kept) < 12
    # the root still lists the train split only, byte for byte, and it verifies
    assert (root / "dataset.json").read_bytes() == train_manifest and verify_dataset(str(root))["ok"]

    m, rep = build_openimages(v_csv, classes, template, str(root), split="val", resize=256, shard_samples=4,
                              workers=2, progress=False)
    assert rep.get("shards reused") == len(kept) and rep.get("shards built") == 12 - len(kept)
    redone = [n for n in existing if n not in kept]
    assert len(redone) <= 2  # at most one shard per worker was published without its record
    assert {k: v for k, v in mtimes(root, "val").items() if k in kept} == kept
    assert files(root) == files(ref)
    assert verify_dataset(str(root), workers=2)["ok"] and set(m.splits) == {"train", "val"}
