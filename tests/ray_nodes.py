"""Private Ray clusters for tests: a head on 127.0.0.1 and, for multi-node tests, a second node
on 127.0.0.2 in its own mount namespace.

Isolation, because other tests and engineers may run Ray on this machine at the same time:

- every port a node opens is a free port picked here, and worker ports are left to the OS;
- each node has its own short `--temp-dir` (a Unix socket path must stay under ~107 bytes);
- each node runs under `ray start --block` in a process this module owns, in its own session.
  `ray stop` is never called: it stops *every* Ray process on the machine. Tear-down sends
  SIGTERM to the session, then SIGKILL to survivors: those in the node's session (workers and
  agents rename themselves `ray::...` and were seen outliving the raylet) and those whose
  command line names the node's temp dir. A node loss is the same SIGKILL without the SIGTERM.
- `ray start` (Ray 2.60) turns token authentication on whenever a token exists in
  `~/.ray/auth_token` (one does on this machine). The cluster gets its own token (random, or
  the test session's: `conftest.ray_head`), passed as `RAY_AUTH_TOKEN` to its nodes and to the
  drivers the tests start, so nothing here reads or writes the user's token.

The second node is what a machine of a real cluster is: it shares the network and the
installed code, not the disk. `unshare -m` gives it a private /tmp, /dev/shm and /var/tmp
(tmpfs mounts only it sees), so a local path under them that the driver wrote is not there for
its processes; the local S3 server is the only storage both nodes reach.
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
from dataclasses import dataclass, field
from pathlib import Path

from conftest import free_port

BIN = Path(sys.executable).parent
RAY = BIN / "ray"
PRIVATE_MOUNTS = ("/tmp", "/dev/shm", "/var/tmp")


def _pids_naming(marker: str) -> list[int]:
    """PIDs of live processes whose command line contains `marker` (a node's unique temp dir)."""
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


def _pids_in_session(sid: int) -> list[int]:
    """PIDs of live processes in session `sid` (a node's `ray start`, started in a session of
    its own): its raylet and workers even after they renamed themselves `ray::...`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()  # after "pid (comm)": state ppid pgrp session ...
        if len(fields) > 3 and int(fields[3]) == sid:
            pids.append(int(entry))
    return pids


def shared_scratch() -> str:
    """A folder every node of a test cluster sees (on the repository's disk, not a private
    mount), for the harness's own files: node logs, recorded keys, fault markers. Never for
    what a test checks is shared: that is what the S3 server is for."""
    path = Path(__file__).resolve().parents[1] / ".pytest_cache" / "csl-shared"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def namespaces_allowed() -> str | None:
    """None if this process may give a child private tmpfs mounts; else why not."""
    if not shutil.which("unshare"):
        return "no `unshare` on this machine"
    p = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", "mount -t tmpfs tmpfs /tmp"],
                       capture_output=True, text=True)
    return None if p.returncode == 0 else f"mount namespaces not permitted here ({p.stderr.strip()[:200]})"


@dataclass
class Node:
    proc: subprocess.Popen
    temp_dir: str
    log: Path

    def kill(self) -> None:
        """SIGKILL to every process of the node at once: those whose command line names its temp
        dir and those in the session it was started in."""
        for pid in {*_pids_naming(self.temp_dir), *_pids_in_session(self.proc.pid)}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        """Throwaway: SIGTERM to the session we created (only ours), 3 s of grace, then SIGKILL
        to whatever is left (waiting for `ray start --block` to wind down alone took 30-50 s),
        and its temp dir removed (the head's is on this machine's /tmp; node 2's went with its
        namespace)."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            pass
        self.kill()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@dataclass
class Cluster:
    """A private cluster: `address` for RAY_ADDRESS, `dashboard` for the Jobs API, `env` for a
    driver process (the token and RAY_ADDRESS), `nodes` in start order."""

    address: str
    dashboard: str
    token: str
    env: dict[str, str]
    node_env: dict[str, str]
    nodes: list[Node] = field(default_factory=list)
    logs_dir: str = ""

    @property
    def driver_env(self) -> dict[str, str]:
        """What a driver process adds to its own environment to join this cluster."""
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def spawn(self, cmd: list[str], temp_dir: str, name: str) -> Node:
        log = Path(self.logs_dir) / f"{name}.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self.node_env, start_new_session=True)
        node = Node(proc, temp_dir, log)
        self.nodes.append(node)
        return node

    def add_node(self, cpus: int) -> Node:
        """A node on 127.0.0.2 whose /tmp, /dev/shm and /var/tmp are its own (tmpfs mounts in a
        private mount namespace); its temp dir is created there. Returns without waiting."""
        node_tmp = f"/tmp/rn{secrets.token_hex(4)}"
        mounts = " && ".join(f"mount -t tmpfs tmpfs {m}" for m in PRIVATE_MOUNTS)
        cmd = [str(RAY), "start", "--block", f"--address={self.address}", "--node-ip-address=127.0.0.2",
               f"--num-cpus={cpus}", "--num-gpus=0", f"--object-store-memory={256 * 1024**2}", f"--temp-dir={node_tmp}",
               "--min-worker-port=0", "--max-worker-port=0", "--disable-usage-stats", *_common_ports()]
        return self.spawn(["unshare", "-m", "--propagation", "private", "sh", "-c",
                           f"{mounts} && mkdir -p {node_tmp} && exec \"$@\"", "sh", *cmd], node_tmp,
                          f"node{len(self.nodes) + 1}")

    def lose_node(self, node: Node) -> None:
        """A machine lost: SIGKILL at once to every process of the node (its raylet, object
        store, agents and workers), no shutdown of any kind."""
        node.kill()
        self.nodes.remove(node)

    def wait_alive(self, want: int, timeout_s: float = 300.0) -> None:
        deadline = time.time() + timeout_s
        while True:
            for node in self.nodes:
                if node.proc.poll() is not None:
                    raise RuntimeError(f"ray start exited with {node.proc.returncode}:\n"
                                       f"{node.log.read_text(errors='replace')[-4000:]}")
            alive = _alive_nodes(self)
            if alive == want:
                return
            if time.time() > deadline:
                raise RuntimeError(f"{alive} of {want} Ray nodes alive after {timeout_s:.0f} s:\n"
                                   + "\n".join(n.log.read_text(errors="replace")[-2000:] for n in self.nodes))
            time.sleep(2)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop()
        shutil.rmtree(self.logs_dir, ignore_errors=True)


def _node_env(extra: dict[str, str], token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(extra)
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    return env


def _common_ports() -> list[str]:
    ports = {
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
        "--metrics-export-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
    }
    return [f"{k}={v}" for k, v in ports.items()]


def start_cluster(head_cpus: int, second_node_cpus: int = 0, env: dict[str, str] | None = None,
                  timeout_s: float = 300.0, token: str | None = None) -> Cluster:
    """A head on 127.0.0.1 (with the dashboard), plus a second node on 127.0.0.2 in a private
    mount namespace when `second_node_cpus` > 0; returns once every node is alive. `token`:
    the cluster's auth token (default: a new random one)."""
    token = token or secrets.token_hex(32)
    node_env = _node_env(env or {}, token)
    logs_dir = tempfile.mkdtemp(prefix="ray-logs-", dir=shared_scratch())
    head_tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Unix socket paths live under it
    gcs_port, dash_port = free_port(), free_port()
    head_cmd = [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
                "--include-dashboard=true", f"--num-cpus={head_cpus}", "--num-gpus=0",
                f"--object-store-memory={256 * 1024**2}", f"--temp-dir={head_tmp}", "--min-worker-port=0",
                "--max-worker-port=0", "--disable-usage-stats", f"--port={gcs_port}", f"--dashboard-port={dash_port}",
                f"--ray-client-server-port={free_port()}", *_common_ports()]
    cluster = Cluster(address=f"127.0.0.1:{gcs_port}", dashboard=f"http://127.0.0.1:{dash_port}", token=token,
                      env={**node_env, "RAY_ADDRESS": f"127.0.0.1:{gcs_port}"}, node_env=node_env, logs_dir=logs_dir)
    try:
        cluster.spawn(head_cmd, head_tmp, "head")
        if second_node_cpus:
            cluster.add_node(second_node_cpus)
        cluster.wait_alive(len(cluster.nodes), timeout_s)
        return cluster
    except BaseException:
        cluster.stop()
        raise


def _alive_nodes(cluster: Cluster) -> int:
    """Alive nodes, asked from a short-lived process (this one must not join the cluster)."""
    code = "import ray; ray.init(log_to_driver=False); print(sum(1 for n in ray.nodes() if n['Alive']))"
    try:
        p = subprocess.run([sys.executable, "-c", code], env=cluster.env, capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:  # a head still starting on a busy machine: ask again
        return 0
    try:
        return int(p.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 0


def job_client(cluster: Cluster, timeout_s: float = 120.0):
    """A Jobs API client for the cluster's head, once the dashboard accepts the cluster's token."""
    from ray.job_submission import JobSubmissionClient

    deadline, last_error = time.time() + timeout_s, None
    while time.time() < deadline:
        try:
            client = JobSubmissionClient(cluster.dashboard, headers={"Authorization": f"Bearer {cluster.token}"})
            client.list_jobs()  # proves the token is accepted, not only that the port is open
            return client
        except Exception as e:  # connection refused while the dashboard starts
            last_error = e
            time.sleep(2)
    raise RuntimeError(f"Jobs API not up at {cluster.dashboard} after {timeout_s:.0f} s ({last_error!r})")


def run_job(client, entrypoint: str, submission_id: str, env_vars: dict[str, str], timeout_s: float = 600.0) -> str:
    """Submit, wait for a terminal state, and return the job's log; fail with the log unless SUCCEEDED."""
    from ray.job_submission import JobStatus

    job_id = client.submit_job(entrypoint=entrypoint, submission_id=submission_id, runtime_env={"env_vars": env_vars})
    deadline = time.time() + timeout_s
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
