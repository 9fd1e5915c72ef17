"""The local cluster `ensure_ray` starts leaves off what one machine has no use for, for real.

`LOCAL_RAY_ENV` works only if Ray's processes inherit it: the check runs in a fresh Python
(so nothing leaks into this process's Ray state or environment), starts the local cluster
through `ensure_ray`, and reads the environment inside a Ray worker process. A value the
user set before must win over ours.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, os
import ray
from trainer.launch import LOCAL_RAY_ENV, ensure_ray
assert ensure_ray(), "ensure_ray should have started a local cluster"
@ray.remote(num_cpus=0)
def worker_env():
    return {k: os.environ.get(k) for k in LOCAL_RAY_ENV}
print("ENV " + json.dumps(ray.get(worker_env.remote())))
ray.shutdown()
"""


def test_local_cluster_workers_inherit_the_defaults_and_user_values_win() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith(("RAY_TRAIN_", "RAY_enable", "RAY_event"))}
    env["RAY_event_stats"] = "1"  # the user's own setting
    out = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("ENV "))
    seen = json.loads(line[4:])
    assert seen == {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_TRAIN_METRICS_ENABLED": "0",
                    "RAY_enable_metrics_collection": "0", "RAY_event_stats": "1"}
