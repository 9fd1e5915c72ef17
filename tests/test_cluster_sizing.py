"""Issue 20: deadlines and /dev/shm budgets of the KubeRay manifests, recomputed.

The RayJob deadlines are recomputed from each overlay's entrypoint config and
cluster/README.md's rates; each pod's /dev/shm budget (object store + DataLoader hand-offs +
host staging + NCCL) from the rendered manifests, the presets and the stream's slot pool,
against the limit and README's table. Rendering and schema helpers live in
`test_cluster_static.py`.
"""

from __future__ import annotations

import math
from typing import Any

import yaml

from test_cluster_static import CLUSTER, K8S, REPO, _builds, _containers, _entrypoint_config, _quantity_bytes

# deadlines and /dev/shm

# cluster/README.md, "Sizing": OpenImages V6 training images, the slowest GPU class it
# estimates (V100: TResNet-M training and inference rates), the low end of its 64-GPU
# scaling efficiency; the margin and the pre-running bounds are the manifests' own.
TRAIN_IMAGES = 9.0e6
TRAIN_IMG_S_PER_GPU = 730
INFER_IMG_S_PER_GPU = 2930
MULTI_NODE_EFFICIENCY = 0.85
DEADLINE_MARGIN = 1.5
PIPELINE_TRAININGS = 2            # csl pipeline: Ignore model, then the target model
NUM_CLASSES = 9605                # V6 trainable classes (cluster/README.md): int8 targets per sample
NCCL_SHM_PER_GPU = 512 * 2**20    # estimate: NCCL's intra-node buffers, a few hundred MiB per GPU
STAGED_BATCHES_PER_GPU = 2        # the batch being copied to the GPU and the next one
SHM_MAX_USE = 0.75                # budget <= 75 % of /dev/shm: a quarter stays free
GIB = 2**30
def _expected_run_s(cfg, gpus: int, nodes: int) -> float:
    """One `csl pipeline` on `gpus` GPUs at cluster/README.md's V100 rates."""
    samples = cfg.train.epochs * TRAIN_IMAGES
    if cfg.train.max_steps:
        samples = min(samples, cfg.train.max_steps * cfg.train.grad_accum * cfg.data.batch_size * gpus)
    rate = gpus * TRAIN_IMG_S_PER_GPU * (MULTI_NODE_EFFICIENCY if nodes > 1 else 1.0)
    return PIPELINE_TRAININGS * samples / rate + TRAIN_IMAGES / (gpus * INFER_IMG_S_PER_GPU)


def test_readme_holds_the_rates_the_deadlines_use():
    text = (CLUSTER / "README.md").read_text()
    for fact in ("9.0M training images", "730 img/s/GPU", "2,930 img/s/GPU", "85 to 95 %", "9,605 trainable classes"):
        assert fact in text, f"cluster/README.md no longer says {fact!r}: recheck the deadlines and the /dev/shm budget"


def test_deadlines_cover_the_expected_run():
    for build, docs in _builds().items():
        job = next(d for d in docs if d["kind"] == "RayJob")
        cfg, _ = _entrypoint_config(job)
        spec, where = job["spec"], f"kustomize build {build}"
        pre, active = spec.get("preRunningDeadlineSeconds"), spec.get("activeDeadlineSeconds")
        assert pre and active, f"{where}: a RayJob without deadlines can hold its GPUs forever"
        nodes = spec["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"]
        assert 1200 <= pre <= 7200, f"{where}: preRunningDeadlineSeconds {pre}: an image pull and Ray start need ~30 min"
        if nodes > 1:
            assert pre >= 3600, f"{where}: {nodes} whole nodes must be free at once; allow an hour"
        run = _expected_run_s(cfg, cfg.cluster.workers, nodes)
        want = math.ceil((pre + DEADLINE_MARGIN * run) / 3600) * 3600
        assert active == want, (
            f"{where}: activeDeadlineSeconds {active}, but {pre} s + {DEADLINE_MARGIN} x the expected "
            f"{run:,.0f} s, rounded up to the hour, is {want}: a smaller value kills a healthy run, a larger one "
            "holds hung GPUs longer")


# Every rank keeps a train and a val ShardStream alive (trainer/loop.py), each with its slots.
STREAMS_PER_RANK = 2


def _per_gpu_bytes(cfgs) -> tuple[int, int]:
    """(DataLoader slots, host staging) per GPU, the largest over `cfgs`.

    Slots: every rank keeps a train and a val stream alive (persistent workers), each with its
    SlotPool. Staging: the batch being copied to the GPU and the next, as float32 [b, 3, S, S],
    the larger of ShardStream's two outputs (it yields float by default).
    """
    from data_shards.stream import loader_shared_bytes

    slots, staging = 0, 0
    for d in (c.data for c in cfgs):
        slots = max(slots, STREAMS_PER_RANK * loader_shared_bytes(d.workers, d.batch_size, d.image_size, NUM_CLASSES))
        staging = max(staging, STAGED_BATCHES_PER_GPU * 4 * d.batch_size * 3 * d.image_size ** 2)
    return slots, staging


def _group_budget(tpl: dict[str, Any], params: dict[str, str], gpus: int, per_gpu: tuple[int, int], where: str) -> dict[str, int]:
    vols = {v["name"]: v for v in tpl["spec"].get("volumes", [])}
    mounts = {m["mountPath"]: m["name"] for m in _containers(tpl)[0].get("volumeMounts", [])}
    assert "/dev/shm" in mounts, f"{where}: no /dev/shm volume: KubeRay's default is sized to the whole memory limit"
    shm = vols[mounts["/dev/shm"]]["emptyDir"]
    assert shm.get("medium") == "Memory" and "sizeLimit" in shm, f"{where}: /dev/shm must be a sized Memory emptyDir"
    assert "object-store-memory" in params, f"{where}: unset, Ray's object store takes 95 % of /dev/shm"
    store = int(params["object-store-memory"])
    logs = vols.get(mounts.get("/tmp/ray", ""), {})
    assert mounts.get("/tmp/ray") == "ray-logs" and "emptyDir" in logs, (
        f"{where}: /tmp/ray must be the emptyDir KubeRay calls ray-logs (logs off the writable layer)")
    assert logs["emptyDir"].get("medium", "") == "" and _quantity_bytes(logs["emptyDir"]["sizeLimit"]) >= store, (
        f"{where}: /tmp/ray on disk, sized for at least the object store (spilled objects land there)")
    limit = _containers(tpl)[0]["resources"]["limits"]["memory"]
    assert _quantity_bytes(shm["sizeLimit"]) <= _quantity_bytes(limit) // 2, (
        f"{where}: /dev/shm pages count against the memory limit {limit}; keep it at most half")
    return {"limit": _quantity_bytes(shm["sizeLimit"]), "store": store, "loader": gpus * per_gpu[0],
            "staging": gpus * per_gpu[1], "nccl": gpus * NCCL_SHM_PER_GPU}


def _cluster_budgets(rc: dict[str, Any], per_gpu: tuple[int, int], where: str,
                     shape: str) -> dict[str, tuple[str, dict[str, int]]]:
    """group -> (pods x GPUs, budget) for a RayCluster spec with one worker group."""
    head = rc["headGroupSpec"]
    (w,) = rc["workerGroupSpecs"]
    gpus = int(_containers(w["template"])[0]["resources"]["limits"]["nvidia.com/gpu"])
    return {
        "head": ("1 x 0", _group_budget(head["template"], head.get("rayStartParams", {}), 0, per_gpu, f"{where} head")),
        "worker": (f"{shape} x {gpus}",
                   _group_budget(w["template"], w.get("rayStartParams", {}), gpus, per_gpu, f"{where} worker")),
    }


def _budgets() -> dict[tuple[str, str], tuple[str, dict[str, int]]]:
    """(build, group) -> (pods x GPUs, budget) for every overlay and the interactive cluster."""
    from trainer.config import load_config

    out = {}
    for build, docs in _builds().items():
        if build != "base":
            job = next(d for d in docs if d["kind"] == "RayJob")
            rc = job["spec"]["rayClusterSpec"]
            per_gpu = _per_gpu_bytes([_entrypoint_config(job)[0]])
            for group, v in _cluster_budgets(rc, per_gpu, build, str(rc["workerGroupSpecs"][0]["replicas"])).items():
                out[(build, group)] = v
    # the interactive cluster runs whatever is submitted: budget the largest OpenImages preset
    presets = [load_config(p.stem) for p in sorted((REPO / "trainer" / "configs").glob("openimages-v6-*.yaml"))]
    assert presets
    rc = yaml.safe_load((K8S / "interactive" / "raycluster.yaml").read_text())["spec"]
    w = rc["workerGroupSpecs"][0]
    shape = f"{w['minReplicas']}-{w['maxReplicas']}"
    for group, v in _cluster_budgets(rc, _per_gpu_bytes(presets), "interactive", shape).items():
        out[("interactive", group)] = v
    return out


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n else "0"


def test_shared_memory_budget_fits_dev_shm_and_readme():
    """Object store + DataLoader slots + host staging + NCCL <= 75 % of /dev/shm, per pod.

    The DataLoader term is the slot pool's own size (`SlotPool.nbytes`): today it is an
    anonymous shared mapping, not a /dev/shm file, but torch's hand-off, which a worker falls
    back to when no slot is free, puts up to workers x prefetch_factor batches in /dev/shm; the
    pool's size bounds that. Host staging (the batch being copied and the next) is pinned RAM,
    not /dev/shm, and is counted so that a pinned loader would still fit.
    """
    budgets = _budgets()
    rows = {}
    for (build, group), (shape, b) in budgets.items():
        total = b["store"] + b["loader"] + b["staging"] + b["nccl"]
        assert total <= SHM_MAX_USE * b["limit"], (
            f"{build} {group}: /dev/shm budget {total / GIB:.2f} GiB > {SHM_MAX_USE:.0%} of its {b['limit'] / GIB:.0f} GiB "
            f"({ {k: round(v / GIB, 2) for k, v in b.items()} })")
        assert b["store"] >= GIB, f"{build} {group}: an object store under 1 GiB spills Ray's own objects"
        rows[(build, group)] = [shape, _gib(b["limit"]), _gib(b["store"]), _gib(b["loader"]), _gib(b["staging"]),
                                _gib(b["nccl"]), _gib(total), f"{100 * total / b['limit']:.0f} %"]
    readme = {}
    for line in (CLUSTER / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 10 and (cells[0], cells[1]) in rows:
            readme[(cells[0], cells[1])] = cells[2:]
    assert readme == rows, f"cluster/README.md's /dev/shm table differs from the manifests: {rows}"


