"""The prior pass: paper 1 eq. 10-11, the mean sigmoid output of an Ignore model over a split.

    P_r(c) = 1/|X| sum_{x in X} sigmoid(f(x; theta_Ignore))_c

Shape. The driver cuts the shards still to score into one contiguous, sample-balanced group
per actor and starts plain Ray actors (`PriorActor`): each loads the model once, on a GPU when
the cluster has them (bf16 autocast; a CPU actor runs fp32), and scores its group with
`prior_scoring.score_shards`, which reads through the training stream in evaluation order
with the actor's own loader worker processes decoding while the model runs (one tar reader,
one decode for the project: see that module). Each actor method is a Ray streaming
generator: one row per finished shard (float64 per-class sums of sigmoid outputs, the scored
and corrupt counts, the per-class positive-annotation counts) comes back as soon as the shard
is done, and the driver folds rows into float64 totals as they arrive (`ray.wait` over the
generators). Memory is O(C x shards in flight) on every process, never O(N x C): at
OpenImages scale a per-sample matrix would be 9M x 9,600 floats (345 GB); a row is
9,600 x 16 bytes.

Resources (`actor_plan`, a pure function of the cluster's nodes): `device="auto"` takes the
GPUs when the cluster has any. On GPUs: one actor per GPU (`gpus_per_actor=1`), each with
the CPUs per GPU of the leanest GPU node, of which all but one decode in loader workers. On
CPUs: one actor per CPU, decoding in-process, as many model processes as cores. Every knob
(actors, GPUs, CPUs and loader workers per actor) can be set. Static groups instead of a
shared queue: an actor keeps one stream (its loader workers stay up and read every shard of
the group sequentially) instead of starting processes per shard; the price is that the last
actor to finish sets the end, which for equal GPUs and sample-balanced groups is small. Why
not Ray Data's `read_webdataset`: it decodes members by its own rules (and may unpickle
`.pyd`/`.pickle` members) and splits files into read tasks whose sample accounting we could
not check; and any design that decodes in one operator and infers in another moves every
decoded image through the object store.

Exactly once. Each shard is one item; the driver checks that every shard index comes back once,
that each shard's count + corrupt equals its manifest count, and that the total equals the
split's manifest count; otherwise it raises (a Ray Data retry that duplicated a shard, or a
silently short read, cannot pass unnoticed). Corrupt samples (bad image, bad labels, a tar cut
short) are skipped as training skips them, counted and reported; the prior is the mean over
the samples the model actually scored. There is no splitting mode that drops a tail: the
`batch_size` only groups samples for the model, the last short batch included.

Resumable, fault tolerant. Each actor publishes a finished shard's row as a record under
`<out stem>.shards/` (from a thread, off the model's path) before the row goes back; a rerun
folds those and scores only the other shards (`prior_records`: layout, the identity that
keeps other passes' records out, why the folder goes at the end), with the same exactly-once
checks. A shard that cannot be read is found and retried SHARD_RETRIES times with back-off
(`prior_scoring`: fault isolation) and then comes back as an error row, as does a record that
cannot be written; the other shards go on, and after the stream the driver raises naming the
failed shards, every other shard's record kept. An exception that is not an OSError is a bug,
not a bad shard: it fails the pass at once, published records kept. The progress bar's rate
and ETA count this run's samples.

Weights: "auto" uses the EMA weights when the checkpoint has them (what eval uses, and what the
papers evaluate), else the raw model; priors.json says which.

Outputs (beside `--out`, atomically, local or fsspec URL, the CSV last): `<stem>.csv`
(`class_id,name,prior`, read back by `read_priors`), `<stem>.json` (estimates, Spearman
correlations as in paper 1 sec. 5.2 / Fig. 7, the top-20, shards reused), `<stem>.png` (the
top-20 as in Fig. 5, with annotation frequency and, where known, the truth for the same
classes). Two other estimators sit beside the model's in priors.json for comparison:
annotation frequency (positive annotations / N, counted in this pass over the same samples;
the naive estimate that annotation bias breaks) and, when the checkpoint folder has a
`running_prior.csv`, the reference code's running mean over training outputs
(`priors.RunningPrior`).

Cost: one forward per sample plus one decode; the driver does O(C) work per shard. At
OpenImages scale on 64 GPUs: 64 actors, each reading ~140k images from ~140 shards with its
node's CPUs decoding; the driver folds ~9,000 rows of 154 kB (1.4 GB through the object store
over the whole pass) and keeps O(C + shards) memory.
"""

from __future__ import annotations

import io
import json
import logging
import math
import resource
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterator

import numpy as np

from data_shards.format import MANIFEST_NAME, ClassInfo, Manifest
from data_shards.storage import exists, join, read_manifest, redact, write_bytes_atomic

from .checkpoint import RUNNING_PRIOR_FILE, STATE_FILE, has_ema, read_state, resolve_checkpoint, weights_url
from .prior_records import (ShardRecord, encode_record, file_stamp, identity_digest, iter_records, open_records,
                            pass_identity, record_url, records_dir, remove_records)
from .prior_scoring import SHARD_RETRIES, ShardScore, retrying, score_shards
from .priors import read_priors, write_priors

__all__ = ["ActorPlan", "PriorActor", "PriorReduction", "actor_plan", "estimate_priors", "output_paths"]

log = logging.getLogger(__name__)

TOP_K = 20
MAX_FAILURES_KEPT = 10  # failure messages the driver keeps (the count is exact)


@dataclass(frozen=True)
class ActorPlan:
    """How the pass runs: `actors` actors of `cpus` CPUs and `gpus` GPUs, each decoding in
    `workers` loader processes (0: in-process) and running the model on `threads` threads."""

    device: str
    actors: int
    cpus: float
    gpus: float
    workers: int
    threads: int


def actor_plan(nodes: list[dict[str, float]], *, device: str = "auto", actors: int | None = None,
               cpus_per_actor: float | None = None, gpus_per_actor: float | None = None,
               workers: int | None = None) -> ActorPlan:
    """The plan for alive nodes' resources (`ray.nodes()`' "Resources"); see the module docstring."""
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device {device!r}: use auto, cuda or cpu")
    gpu_nodes = [n for n in nodes if n.get("GPU", 0) > 0]
    if device == "auto":
        device = "cuda" if gpu_nodes else "cpu"
    if device == "cuda":
        if not gpu_nodes:
            raise ValueError("device cuda: the Ray cluster has no GPUs (use --device cpu or auto)")
        gpus = gpus_per_actor or 1.0
        # the leanest GPU node decides, so that every actor fits on every GPU node
        cpus = cpus_per_actor or max(1.0, float(min(math.floor(n.get("CPU", 0) / n["GPU"] * gpus) for n in gpu_nodes)))
        fit = sum(int(min(n["GPU"] / gpus, n.get("CPU", 0) / cpus)) for n in gpu_nodes)
    else:
        if gpus_per_actor:
            raise ValueError(f"gpus_per_actor {gpus_per_actor} needs device cuda (or auto on a cluster with GPUs)")
        gpus, cpus = 0.0, cpus_per_actor or 1.0
        fit = sum(int(n.get("CPU", 0) / cpus) for n in nodes)
    nw = workers if workers is not None else max(0, int(cpus) - 1)
    return ActorPlan(device, actors or max(1, fit), cpus, gpus, nw, max(1, int(cpus) - nw))


class PriorActor:
    """A Ray actor: the model is loaded once; `score` streams one row per finished shard.

    A shard's record is published here, from a thread, before its row goes back: the PUTs run
    on every actor at once and beside the model, and a folded shard always has a record.
    """

    def __init__(self, checkpoint: str, weights: str, data: str, split: str, image_size: int, batch_size: int,
                 plan: dict[str, Any], *, records: str, digest: str, retries: int = SHARD_RETRIES):
        import torch

        from .inference import load_checkpoint

        self.plan = ActorPlan(**plan)
        torch.set_num_threads(self.plan.threads)
        if self.plan.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("prior pass actor: device cuda, but this actor sees no CUDA device")
        self.device = torch.device(self.plan.device)
        self.manifest = read_manifest(data)
        lm = load_checkpoint(checkpoint, weights)  # type: ignore[arg-type]
        if len(lm.classes) != self.manifest.num_classes:
            raise ValueError(f"{checkpoint}: {len(lm.classes)} classes, {data} has {self.manifest.num_classes}")
        self.model = lm.model.to(self.device).eval()
        self.data, self.split, self.image_size, self.batch_size = data, split, image_size, batch_size
        self.records, self.digest, self.retries = records, digest, retries

    def _publish(self, row: ShardScore) -> None:
        data = encode_record(ShardRecord(row.shard, row.sum, row.pos, row.count, row.corrupt), self.digest)
        retrying(lambda: write_bytes_atomic(record_url(self.records, row.shard), data), self.retries,
                 f"record of shard {row.shard}")

    def _row(self, row: ShardScore, published: Future | None, t0: float) -> dict[str, Any]:
        if published is not None:
            try:
                published.result()
            except OSError as e:
                c = len(row.sum)
                row = ShardScore(row.shard, np.zeros(c), np.zeros(c, dtype=np.int64), 0, 0,
                                 error=f"record of shard {row.shard} failed {self.retries + 1} times: "
                                       f"{type(e).__name__}: {redact(str(e))}")
        return {**asdict(row), "t0": t0, "t1": time.time()}

    def score(self, shards: list[int]) -> Iterator[dict[str, Any]]:
        t0 = time.time()
        waiting: deque[tuple[ShardScore, Future | None]] = deque()
        with ThreadPoolExecutor(1, thread_name_prefix="prior-record") as pool:
            for row in score_shards(self.model, self.data, self.split, self.manifest, shards,
                                    image_size=self.image_size, batch_size=self.batch_size,
                                    workers=self.plan.workers, device=self.device, retries=self.retries):
                waiting.append((row, None if row.error else pool.submit(self._publish, row)))
                while waiting and (waiting[0][1] is None or waiting[0][1].done()):
                    yield self._row(*waiting.popleft(), t0)
            while waiting:
                yield self._row(*waiting.popleft(), t0)


class PriorReduction:
    """The driver's fold of per-shard rows, with the exactly-once checks (float64 throughout).

    It holds running totals, a seen-flag per shard and at most `MAX_FAILURES_KEPT` failure
    messages: O(C + shards) whatever the number of samples. A reused record is added like a
    streamed row (`reused=True` only counts it), so it too is seen exactly once.
    """

    def __init__(self, shard_samples: list[int], num_classes: int):
        self.expected = list(shard_samples)
        self.sum = np.zeros(num_classes, dtype=np.float64)
        self.pos = np.zeros(num_classes, dtype=np.int64)
        self.count = self.corrupt = 0
        self.seen = np.zeros(len(shard_samples), dtype=bool)
        self.reused_shards = self.reused_samples = 0
        self.failed = 0
        self.failures: list[str] = []  # the first MAX_FAILURES_KEPT messages
        # timing for the summary: actor start-up is the wait before the first shard starts
        self.first_result_s: float | None = None
        self.stream_s = 0.0
        self.busy = (float("inf"), float("-inf"))  # first shard started .. last shard ended (wall clock)

    def _check(self, shard: int) -> None:
        if not 0 <= shard < len(self.expected):
            raise RuntimeError(f"prior pass: result for unknown shard {shard}")
        if self.seen[shard]:
            raise RuntimeError(f"prior pass: shard {shard} was counted twice")

    def add(self, shard: int, sums: np.ndarray, count: int, corrupt: int, pos: np.ndarray | None = None, *,
            reused: bool = False) -> None:
        self._check(shard)
        if count + corrupt != self.expected[shard]:
            raise RuntimeError(f"prior pass: shard {shard} gave {count} + {corrupt} corrupt samples, manifest says {self.expected[shard]}")
        self.seen[shard] = True
        self.sum += np.asarray(sums, dtype=np.float64)
        if pos is not None:
            self.pos += np.asarray(pos, dtype=np.int64)
        self.count += int(count)
        self.corrupt += int(corrupt)
        if reused:
            self.reused_shards += 1
            self.reused_samples += int(count) + int(corrupt)

    def fail(self, shard: int, message: str) -> None:
        """A shard that failed after its retries: not counted, remembered for the error."""
        self._check(shard)
        self.failed += 1
        if len(self.failures) < MAX_FAILURES_KEPT:
            self.failures.append(message)

    def finish(self) -> np.ndarray:
        """The prior (float64 [C]); raises unless every shard was counted exactly once."""
        if self.failed:
            more = f"; and {self.failed - len(self.failures)} more" if self.failed > len(self.failures) else ""
            raise RuntimeError(f"prior pass: {self.failed} of {len(self.expected)} shards failed: "
                               + "; ".join(self.failures) + more)
        missing = np.flatnonzero(~self.seen)
        if missing.size:
            raise RuntimeError(f"prior pass: {missing.size} shards never reported (first: {int(missing[0])})")
        if self.count + self.corrupt != sum(self.expected):
            raise RuntimeError(f"prior pass: {self.count} + {self.corrupt} corrupt samples, manifest says {sum(self.expected)}")
        if self.count == 0:
            raise RuntimeError("prior pass: every sample was corrupt")
        return self.sum / self.count


def output_paths(out: str) -> tuple[str, str, str]:
    """`priors.csv` -> (`priors.csv`, `priors.json`, `priors.png`)."""
    stem = out[: -len(".csv")] if out.endswith(".csv") else out
    return out, stem + ".json", stem + ".png"


def _checkpoint_meta(checkpoint: str, weights: str) -> tuple[str, dict[str, Any], list[ClassInfo], str]:
    """(resolved checkpoint, config dict, classes, weights actually used), without loading weights."""
    from .config import Config

    if weights not in ("auto", "ema", "model"):
        raise ValueError(f"weights {weights!r}: use auto, ema or model")
    ckpt = resolve_checkpoint(checkpoint)
    state = read_state(ckpt)
    cfg = Config.model_validate(state["config"])
    classes = [ClassInfo.model_validate(c) for c in state["classes"]]
    if weights == "auto":
        weights = "ema" if has_ema(ckpt) else "model"
    weights_url(ckpt, weights)  # a missing weights file is refused here, saying why
    return ckpt, cfg.model_dump(mode="json"), classes, weights


def _spearman_or_none(a: np.ndarray, b: np.ndarray) -> float | None:
    from .metrics import spearman

    r = spearman(a, b)
    return None if np.isnan(r) else round(r, 6)


def _estimator(values: np.ndarray, counts: np.ndarray, truth: np.ndarray | None, **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {**extra, "spearman_vs_counts": _spearman_or_none(values, counts)}
    if truth is not None:
        out["spearman_vs_truth"] = _spearman_or_none(values, truth)
    return out


def estimate_priors(checkpoint: str, data: str, out: str, *, split: str = "train", weights: str = "auto",
                    device: str = "auto", actors: int | None = None, batch_size: int = 64,
                    cpus_per_actor: float | None = None, gpus_per_actor: float | None = None,
                    workers: int | None = None, progress: bool = True, fresh: bool = False,
                    shard_retries: int = SHARD_RETRIES) -> dict[str, Any]:
    """Estimate the label prior of `data`/`split` with a checkpoint's model; write the outputs.

    `device`, `actors`, `cpus_per_actor`, `gpus_per_actor`, `workers` (loader processes per
    actor): None takes `actor_plan`'s defaults for the cluster. Resumable: finished shards are
    recorded under `<out stem>.shards/` and a rerun of the same pass scores only the others
    (`prior_records`); `fresh=True` discards the records first. A shard that fails
    `shard_retries + 1` times is named in a RuntimeError raised after every other shard
    finished (their records kept). Returns the summary written to priors.json plus
    `manifest_samples`, `corrupt` and the output paths.
    """
    if (batch_size < 1 or (cpus_per_actor is not None and cpus_per_actor <= 0)
            or (gpus_per_actor is not None and gpus_per_actor < 0) or (actors is not None and actors < 1)
            or (workers is not None and workers < 0) or shard_retries < 0):
        raise ValueError(f"need batch_size >= 1, cpus_per_actor > 0, gpus_per_actor >= 0, actors >= 1, workers >= 0, "
                         f"shard_retries >= 0; got {batch_size}, {cpus_per_actor}, {gpus_per_actor}, {actors}, "
                         f"{workers}, {shard_retries}")
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device {device!r}: use auto, cuda or cpu")
    t0 = time.perf_counter()
    ckpt, cfg, classes, weights = _checkpoint_meta(checkpoint, weights)
    manifest = read_manifest(data)
    info = manifest.split(split)
    if [c.id for c in manifest.classes] != [c.id for c in classes]:
        raise ValueError(f"{data}: class list differs from the checkpoint's ({manifest.num_classes} vs {len(classes)} classes)")
    shards = [s for s in info.shards]
    if sum(s.samples for s in shards) != info.samples:
        raise ValueError(f"{data}: split {split!r} says {info.samples} samples, its shards add up to {sum(s.samples for s in shards)}")
    if info.samples == 0:
        raise ValueError(f"{data}: split {split!r} has no samples")
    csv_path, json_path, png_path = output_paths(out)

    # before any Ray work: a refused rerun costs a few metadata reads, not a cluster start
    folder = records_dir(out)
    weights_file = file_stamp(weights_url(ckpt, weights))
    identity = pass_identity(checkpoint=ckpt, weights=weights, weights_file=weights_file, split=split, shards=shards,
                             image_size=cfg["data"]["image_size"], class_ids=[c.id for c in manifest.classes])
    digest = identity_digest(identity)
    open_records(folder, identity, fresh=fresh)
    red = PriorReduction([s.samples for s in shards], manifest.num_classes)
    for rec in iter_records(folder, digest=digest, num_classes=manifest.num_classes, shard_samples=red.expected):
        red.add(rec.shard, rec.sum, rec.count, rec.corrupt, rec.pos, reused=True)
    todo = np.flatnonzero(~red.seen).tolist()

    plan = None
    if todo:
        import ray

        from .launch import ensure_ray

        started = ensure_ray()
        try:
            from .preflight import alive_nodes, check_nodes

            check_nodes(read=[("--data", join(data, MANIFEST_NAME)), ("--checkpoint", join(ckpt, STATE_FILE))],
                        write=[("the records folder", folder)])
            nodes = [n["Resources"] for n in alive_nodes()]
            plan = actor_plan(nodes, device=device, actors=actors, cpus_per_actor=cpus_per_actor,
                              gpus_per_actor=gpus_per_actor, workers=workers)
            plan = replace(plan, actors=min(plan.actors, len(todo)))  # never more actors than shards to score
            _run(ray, red, data, split, shards, todo, ckpt, weights, cfg["data"]["image_size"], plan, batch_size,
                 progress, folder, digest, shard_retries)
        finally:
            if started:
                ray.shutdown()
    try:
        prior = red.finish()
    except RuntimeError as e:
        if red.failed:
            raise RuntimeError(f"{e}. The {int(red.seen.sum())} finished shards are kept in {redact(folder)}: "
                               "rerun the same command to score only the rest") from None
        raise
    seconds = time.perf_counter() - t0

    summary = _summary(manifest, split, prior, red, ckpt, weights, seconds)
    summary["actors"] = plan.actors if plan else 0
    summary["plan"] = asdict(plan) if plan else None
    summary["driver_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    write_bytes_atomic(json_path, json.dumps(summary, indent=1).encode())
    write_bytes_atomic(png_path, _plot(manifest, split, prior, red, ckpt))
    write_priors(csv_path, manifest, prior)  # last: a complete CSV means complete outputs
    try:
        remove_records(folder)  # the outputs now hold the result (prior_records: why not keep them)
    except OSError as e:  # the result is complete; a leftover folder only asks the next pass for --fresh
        log.warning("prior pass: could not remove %s (%s)", redact(folder), e)
    return {**summary, "manifest_samples": info.samples, "corrupt": red.corrupt,
            "outputs": {"csv": csv_path, "json": json_path, "png": png_path}}


def _groups(samples: list[int], n: int) -> list[list[int]]:
    """Positions 0..len(samples)-1 cut into `n` (<= len) non-empty contiguous groups of about
    equal samples."""
    cum = np.cumsum(samples)
    bounds = [0]
    for k, cut in enumerate(np.searchsorted(cum, cum[-1] * np.arange(1, n) / n, side="right").tolist(), start=1):
        bounds.append(min(max(cut, bounds[-1] + 1), len(samples) - (n - k)))  # each group keeps >= 1 shard
    bounds.append(len(samples))
    return [list(range(lo, hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]


def _run(ray: Any, red: PriorReduction, data: str, split: str, shards: list, todo: list[int], ckpt: str, weights: str,
         image_size: int, plan: ActorPlan, batch_size: int, progress: bool, records: str, digest: str,
         retries: int) -> None:
    """Score the shards in `todo` on `plan.actors` actors, folding each row into `red` as it arrives."""
    from tqdm import tqdm

    groups = [[todo[j] for j in g] for g in _groups([shards[i].samples for i in todo], plan.actors)]
    actor_cls = ray.remote(PriorActor).options(num_cpus=plan.cpus, num_gpus=plan.gpus)
    actors = [actor_cls.remote(ckpt, weights, data, split, image_size, batch_size, asdict(plan), records=records,
                               digest=digest, retries=retries) for _ in groups]
    reused = f", {red.reused_shards} shards reused" if red.reused_shards else ""
    # rate and ETA count this run's samples only: tqdm measures from `initial`
    bar = tqdm(total=sum(red.expected), initial=red.reused_samples, unit="img", unit_scale=True,
               desc=f"prior pass ({len(groups)} {plan.device} actors{reused})", disable=not progress,
               file=sys.stderr, mininterval=1.0, dynamic_ncols=True, smoothing=0.1)
    t0 = time.perf_counter()
    try:
        live = [a.score.options(num_returns="streaming").remote(g) for a, g in zip(actors, groups)]
        with bar:
            while live:
                ready, _ = ray.wait(live, num_returns=1)
                for gen in ready:
                    try:
                        row = ray.get(next(gen))  # an actor's exception surfaces here
                    except StopIteration:
                        live.remove(gen)
                        continue
                    if red.first_result_s is None:
                        red.first_result_s = time.perf_counter() - t0
                    red.busy = (min(red.busy[0], row["t0"]), max(red.busy[1], row["t1"]))
                    if row["error"]:
                        red.fail(row["shard"], row["error"])
                        bar.set_postfix(corrupt=red.corrupt, failed_shards=red.failed)
                        continue
                    red.add(row["shard"], row["sum"], row["count"], row["corrupt"], row["pos"])
                    bar.update(row["count"] + row["corrupt"])
                    if row["corrupt"]:
                        bar.set_postfix(corrupt=red.corrupt, failed_shards=red.failed)
        red.stream_s = time.perf_counter() - t0
    finally:
        for a in actors:
            ray.kill(a)


def _running_prior(ckpt: str, manifest: Manifest) -> np.ndarray | None:
    path = join(ckpt, RUNNING_PRIOR_FILE)
    return read_priors(path, manifest).astype(np.float64) if exists(path) else None


def _summary(manifest: Manifest, split: str, prior: np.ndarray, red: PriorReduction, ckpt: str, weights: str,
             seconds: float) -> dict[str, Any]:
    n = red.count
    counts = red.pos.astype(np.float64)
    truth = np.asarray(manifest.truth[split].freq, dtype=np.float64) if split in manifest.truth else None
    estimators = {
        "ignore_model": _estimator(prior, counts, truth, weights=weights),
        "annotation_frequency": _estimator(counts / n, counts, truth, source="positive annotations / N, counted in this pass"),
    }
    running = _running_prior(ckpt, manifest)
    if running is not None:
        estimators["running_mean"] = _estimator(running, counts, truth, source=join(ckpt, RUNNING_PRIOR_FILE))
    top = np.argsort(-prior, kind="stable")[:TOP_K]
    out: dict[str, Any] = {
        "samples": n, "classes": manifest.num_classes, "split": split, "checkpoint": ckpt, "weights": weights,
        "estimators": estimators, "spearman_vs_counts": estimators["ignore_model"]["spearman_vs_counts"],
    }
    if truth is not None:
        out["spearman_vs_truth"] = estimators["ignore_model"]["spearman_vs_truth"]
        out["spearman_counts_vs_truth"] = _spearman_or_none(counts, truth)
    out["top"] = [{"class_id": manifest.classes[i].id, "name": manifest.classes[i].name, "prior": round(float(prior[i]), 6),
                   "annotation_frequency": round(float(counts[i] / n), 6)} for i in top.tolist()]
    out["seconds"] = round(seconds, 2)
    out["shards"] = len(red.expected)
    out["reused_shards"], out["reused_samples"] = red.reused_shards, red.reused_samples
    busy = max(0.0, red.busy[1] - red.busy[0])  # 0 when every shard was reused
    scored = n + red.corrupt - red.reused_samples
    out["timing"] = {"first_result_s": round(red.first_result_s or 0.0, 2), "stream_s": round(red.stream_s, 2),
                     "scoring_s": round(busy, 2), "scoring_images_per_s": round(scored / busy, 1) if busy > 0 else None}
    return out


def _plot(manifest: Manifest, split: str, prior: np.ndarray, red: PriorReduction, ckpt: str) -> bytes:
    """Paper 1 Fig. 5: the top-20 classes by estimated prior; beside it, annotation frequency
    (and the truth, where known) for the same classes, which is where annotation bias shows."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend (Agg renders the PNG)

    top = np.argsort(-prior, kind="stable")[:TOP_K][::-1]
    names = [manifest.classes[i].name for i in top]
    fig = Figure(figsize=(11, 0.32 * len(top) + 1.6), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2, sharey=True)
    y = np.arange(len(top))
    ax1.barh(y, prior[top], color="#3b6fb6")
    ax1.set_yticks(y, names)
    ax1.set_xlabel("estimated prior (Ignore model, mean sigmoid)")
    freq = red.pos[top] / red.count
    ax2.barh(y - 0.2, freq, height=0.4, color="#c0504d", label="annotation frequency")
    if split in manifest.truth:
        ax2.barh(y + 0.2, np.asarray(manifest.truth[split].freq)[top], height=0.4, color="#9bbb59", label="true frequency")
    ax2.set_xlabel("frequency")
    ax2.legend(loc="lower right", fontsize=8)
    name = ckpt.rstrip("/").rsplit("/", 2)
    fig.suptitle(f"Top {len(top)} classes by estimated prior: {'/'.join(name[-2:])}, N={red.count} [{split}]", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()
