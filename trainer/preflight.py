"""Preflight: before work starts on a multi-node cluster, every node must reach the run's storage.

On one node every process sees the same disk, so any path works. On several, a path that only
the driver's node holds (a local `run.storage`, a `data.root` on one machine's disk) lets the
job start and fail late: at the first checkpoint, or when a rank opens its first shard, with a
multi-screen traceback. So `check_nodes` runs one tiny task pinned to each alive node
(`NodeAffinitySchedulingStrategy`, hard) and proves sharing, not mere existence:

- readable: the node reads the same bytes the driver read (`dataset.json`, or the one file
  named), compared by sha256: a node-local copy of another dataset is caught too;
- writable: the driver writes a probe file with a fresh token under `.preflight/`, each node
  reads it back (same storage, not its own folder of the same name) and writes its own, which
  the driver then finds; every probe is removed afterwards.

Each task sees its node's own environment (credentials, endpoint), exactly as the training
workers there will. A failure is one line naming the node, the path and the reason (exit 2).

Cost at 64 GPU nodes: 64 zero-CPU tasks and 2 small reads plus 1 write and 1 delete per node
and path, once per command: a few seconds, against a failure ~minutes into a run.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any, Sequence

from data_shards.storage import exists, get_fs, join, read_bytes, redact, remove, write_bytes_atomic

__all__ = ["PreflightError", "check_nodes", "alive_nodes"]

PROBE_DIR = ".preflight"
TASK_TIMEOUT_S = 120.0
SHARED_HINT = "multi-node runs need data and storage that every node reaches: S3 (or another object store) or a shared file system"


class PreflightError(ValueError):
    """Some node cannot reach a path the run needs (a usage error: exit 2)."""


def alive_nodes() -> list[dict[str, Any]]:
    """Ray's records of the cluster's alive nodes (`NodeID`, `NodeManagerAddress`, ...)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _why(e: Exception) -> str:
    return f"{type(e).__name__}: {redact(str(e))[:200]}"


def _probe(reads: Sequence[tuple[str, str]], writes: Sequence[tuple[str, str, str]], node: str) -> list[tuple[str, str]]:
    """On one node: the sha256 of each file to read, then read each write probe back and write
    this node's own. Returns (url, what is wrong) per failed check (empty: all good)."""
    problems = []
    for url, want in reads:
        try:
            if _sha(read_bytes(url)) != want:
                problems.append((url, "reads other bytes there than the driver: a node-local copy, not shared storage"))
        except Exception as e:  # noqa: BLE001 - any failure to read is the finding
            problems.append((url, f"cannot read it ({_why(e)})"))
    for folder, probe, token in writes:
        try:
            if read_bytes(join(folder, PROBE_DIR, probe)).decode() != token:
                problems.append((folder, "reads another probe there than the driver wrote: not the same storage"))
                continue
        except FileNotFoundError:
            problems.append((folder, "does not see the driver's probe file there: a node-local folder, not shared storage"))
            continue
        except Exception as e:  # noqa: BLE001
            problems.append((folder, f"cannot read it ({_why(e)})"))
            continue
        try:
            write_bytes_atomic(join(folder, PROBE_DIR, f"{probe}-{node}"), token.encode())
        except Exception as e:  # noqa: BLE001
            problems.append((folder, f"cannot write there ({_why(e)})"))
    return problems


def check_nodes(read: Sequence[tuple[str, str]] = (), write: Sequence[tuple[str, str]] = ()) -> int:
    """Check from every alive node of the connected cluster that each (label, file URL) in `read`
    holds the bytes the driver reads and each (label, folder URL) in `write` is the same
    writable storage the driver writes. Does nothing on a one-node cluster. Returns the number
    of nodes checked; raises PreflightError naming the first node and path that fail."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = alive_nodes()
    if len(nodes) <= 1:
        return len(nodes)
    reads = []
    for label, url in read:
        try:
            reads.append((label, url, _sha(read_bytes(url))))
        except FileNotFoundError:
            raise PreflightError(f"{label}={redact(url)} not found from the driver") from None
    run_id = uuid.uuid4().hex[:12]
    writes = []
    try:
        for label, folder in write:
            fs, path = get_fs(folder)
            fs.makedirs(path, exist_ok=True)
            token = uuid.uuid4().hex
            write_bytes_atomic(join(folder, PROBE_DIR, run_id), token.encode())
            writes.append((label, folder, token))
        task = ray.remote(num_cpus=0, max_retries=0)(_probe)
        pending = {}
        for n in nodes:
            strategy = NodeAffinitySchedulingStrategy(node_id=n["NodeID"], soft=False)
            ref = task.options(scheduling_strategy=strategy).remote(
                [(u, sha) for _, u, sha in reads], [(f, run_id, t) for _, f, t in writes], n["NodeID"][:12])
            pending[ref] = n
        done, late = ray.wait(list(pending), num_returns=len(pending), timeout=TASK_TIMEOUT_S)
        for ref in late:
            n = pending[ref]
            ray.cancel(ref, force=True)
            raise PreflightError(f"node {n['NodeManagerAddress']} did not run the storage check within "
                                 f"{TASK_TIMEOUT_S:.0f} s; is it healthy?")
        labels = {u: label for label, u, _ in reads} | {f: label for label, f, _ in writes}
        for ref in done:
            n = pending[ref]
            for url, what in ray.get(ref)[:1]:
                raise PreflightError(f"node {n['NodeManagerAddress']}: {labels[url]}={redact(url)} {what}; {SHARED_HINT}")
            for label, folder, _ in writes:
                if not exists(join(folder, PROBE_DIR, f"{run_id}-{n['NodeID'][:12]}")):
                    raise PreflightError(f"node {n['NodeManagerAddress']} wrote its probe to {redact(folder)} but the "
                                         f"driver does not see it ({label}); {SHARED_HINT}")
    finally:
        for _, folder, _ in writes:
            _cleanup(folder, run_id)
    return len(nodes)


def _cleanup(folder: str, run_id: str) -> None:
    fs, path = get_fs(folder)
    probe_dir = join(path, PROBE_DIR)
    try:
        names = [p for p in fs.ls(probe_dir, detail=False) if p.rsplit("/", 1)[-1].startswith(run_id)]
    except FileNotFoundError:
        return
    for p in names:
        try:
            remove(join(folder, PROBE_DIR, p.rsplit("/", 1)[-1]))
        except FileNotFoundError:
            pass
    try:
        if not fs.ls(probe_dir, detail=False):
            fs.rmdir(probe_dir)
    except (FileNotFoundError, OSError):
        pass
