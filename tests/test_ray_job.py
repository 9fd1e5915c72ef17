"""The job path, for real: `ray start --head` on 127.0.0.1, then `csl train` through the Jobs API.

This is the path `cluster/ray/` documents (`ray job submit ... -- csl ...`): the entrypoint
runs as a subprocess of the cluster's job supervisor with `RAY_ADDRESS` set, so `csl train`
joins the running cluster instead of starting an embedded one. The test checks exactly that:
the job reaches SUCCEEDED and leaves a complete run folder.

Isolation, because other tests and engineers may run Ray on this machine at the same time:

- every port the head opens is a free port picked here (GCS, dashboard, dashboard agent,
  runtime-env agent, metrics, client server, node manager, object manager), and worker ports
  are left to the OS (`--min-worker-port=0 --max-worker-port=0`);
- the head has its own short `--temp-dir` (a Unix socket path must stay under ~107 bytes);
- the head runs under `ray start --block` in a process this test owns, in its own session.
  `ray stop` is never called: it stops *every* Ray process on the machine. Tear-down sends
  SIGTERM to our `ray start --block` (which stops the processes it started), then kills
  survivors: by PID where the command line names our temp dir, and by the process group of
  the session we created (the dashboard and runtime-env agents rename themselves
  `ray::DashboardAgent` and were seen outliving the raylet).
- `ray start` (Ray 2.60) turns token authentication on whenever a token exists in
  `~/.ray/auth_token` (one does on this machine) and would share it. The head gets its own
  random token (a file in its temp dir, via `RAY_AUTH_TOKEN_PATH`) and the client sends it
  as a bearer header, so nothing here reads or writes the user's token or changes this
  process's Ray settings. The job's entrypoint inherits the head's environment, so
  `csl train` authenticates the same way.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import free_port

pytestmark = pytest.mark.integration

BIN = Path(sys.executable).parent
RAY = BIN / "ray"
CSL = BIN / "csl"
JOB_TIMEOUT_S = 600


def _pids_naming(marker: str) -> list[int]:
    """PIDs of live processes whose command line contains `marker` (our unique temp dir)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(entry))
    return pids


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    # The cluster is throwaway: SIGTERM to the whole session we created (only ours), a short
    # grace, then SIGKILL. Waiting for `ray start --block` to wind down alone took 30-50 s.
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    # Raylet-spawned workers may outlive it for a moment; ours all carry our temp dir or
    # belong to the session we created for the head.
    deadline = time.time() + 5
    while time.time() < deadline:
        left = [p for p in _pids_naming(temp_dir) if p != os.getpid()]
        try:
            os.killpg(proc.pid, 0)
            group_alive = True
        except (ProcessLookupError, PermissionError):
            group_alive = False
        if not left and not group_alive:
            return
        time.sleep(1)
    for pid in _pids_naming(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group is the session we created: only ours
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture
def ray_head():
    """A private single-node Ray cluster; yields the dashboard (Jobs API) address."""
    if not RAY.exists():
        pytest.skip(f"no `ray` executable beside the interpreter ({RAY}); install ray[default]")
    pytest.importorskip("ray.job_submission", reason="the Jobs API needs ray[default]")
    from ray.job_submission import JobSubmissionClient

    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Unix socket paths live under it
    dash_port = free_port()
    ports = {
        "--port": free_port(),
        "--dashboard-port": dash_port,
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
        "--ray-client-server-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
    }
    cmd = [
        str(RAY), "start", "--head", "--block",
        "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
        "--num-cpus=2", "--num-gpus=0", f"--object-store-memory={256 * 1024**2}",
        f"--temp-dir={temp_dir}", "--min-worker-port=0", "--max-worker-port=0",
        "--disable-usage-stats",
        *(f"{k}={v}" for k, v in ports.items()),
    ]
    token = secrets.token_hex(32)
    token_path = Path(temp_dir) / "auth_token"
    token_path.touch(mode=0o600)
    token_path.write_text(token)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path))
    log_path = Path(temp_dir) / "ray-start.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dash_port}"
    try:
        deadline = time.time() + 120
        client, last_error = None, None
        while client is None:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-4000:]}")
            if time.time() > deadline:
                pytest.fail(f"Jobs API not up at {address} after 120 s ({last_error!r}):\n"
                            f"{log_path.read_text(errors='replace')[-4000:]}")
            try:
                client = JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"})
                client.list_jobs()  # proves the token is accepted, not only that the port is open
            except Exception as e:  # connection refused while the dashboard starts
                client, last_error = None, e
                time.sleep(2)
        yield client
    finally:
        _stop_head(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _run_job(client, entrypoint: str, submission_id: str, env_vars: dict[str, str]) -> str:
    """Submit, wait for a terminal state, and return the job's log; fail with the log unless SUCCEEDED."""
    from ray.job_submission import JobStatus

    job_id = client.submit_job(entrypoint=entrypoint, submission_id=submission_id, runtime_env={"env_vars": env_vars})
    deadline = time.time() + JOB_TIMEOUT_S
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    status = client.get_job_status(job_id)
    while status not in terminal and time.time() < deadline:
        time.sleep(3)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    if status not in terminal:
        client.stop_job(job_id)
    assert status == JobStatus.SUCCEEDED, (
        f"job {job_id} ended {status}; info: {client.get_job_info(job_id)}\n--- logs ---\n{logs[-8000:]}")
    return logs


def test_csl_train_as_ray_job(ray_head, tmp_path):
    from data_shards.sources.synthetic import build_synthetic

    client = ray_head
    data_root = tmp_path / "data"
    storage = tmp_path / "runs"
    build_synthetic(str(data_root), train=256, val=64, image_size=32, shard_samples=64, seed=0, progress=False)

    def entrypoint(max_steps: int) -> str:
        # Everything is on this machine, so no working_dir upload: the venv's `csl` by
        # absolute path, as `ray job submit -- csl ...` runs the image's `csl` on a cluster.
        return " ".join([
            str(CSL), "train", "--config", "synthetic-cpu",
            f"data.root={data_root}", "data.image_size=32", "data.batch_size=16", "data.workers=0",
            "train.epochs=1", f"train.max_steps={max_steps}", "checkpoint.every_steps=2",
            # constant LR in both attempts: with OneCycle, 4 steps fall back to constant and 6
            # do not, and a checkpoint without scheduler state does not load into one with it
            "optim.schedule=constant",
            f"run.storage={storage}", "run.name=jobtest", "cluster.workers=2",
        ])

    # PYTHONPATH only matters when the package is not installed in the venv.
    env_vars = {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    logs = _run_job(client, entrypoint(4), f"jobtest-{os.getpid()}-1", env_vars)
    assert "starting run 'jobtest'" in logs, logs[-4000:]

    run_dir = storage / "jobtest"
    listing = sorted(p.name for p in run_dir.iterdir())
    for name in ("config.yaml", "metrics.jsonl", "eval.json"):
        assert (run_dir / name).is_file(), f"{name} missing from {run_dir}: {listing}"
    assert (run_dir / "checkpoint_00000004").is_dir(), f"no step-4 checkpoint in {run_dir}: {listing}"

    # What cluster/ray/README.md promises: a new submission (new submission id) with the same
    # run name continues from the latest complete checkpoint instead of starting over.
    logs = _run_job(client, entrypoint(6), f"jobtest-{os.getpid()}-2", env_vars)
    assert "resuming run 'jobtest'" in logs and "checkpoint_00000004" in logs, logs[-4000:]
    assert (run_dir / "checkpoint_00000006").is_dir(), sorted(p.name for p in run_dir.iterdir())
