"""Conversion as resumable shard work: one task builds one shard; the driver holds records.

Why this shape: at 9M images one process that receives every image (to tar, hash and upload
it) caps a host at what that one core can pass through, and a crash at 90% redoes everything.
So the label stream is cut on the driver into shard-sized `ShardJob`s (ids, URLs and labels:
small plain data, never image bytes), and `build_shard` (the one implementation, run in-process
with `workers=0` or as a Ray task) fetches, decodes, resizes, tars, hashes and publishes one
shard under its final name (temporary file, then rename or one upload), then writes a small
progress record beside the output and returns it. Shard i holds job i's images whatever the
number of workers or nodes: its bytes are a pure function of the inputs and the settings.

Resume. `ROOT/.progress/<split>/` holds `settings.json` (what the conversion was asked to do,
with strings redacted) and one `shard-NNNNNN.json` per published shard (path, samples, bytes,
sha256, sparse per-class counts, problem tallies, the digest of its job). A record is written
only after its shard is published, so a record proves a complete shard. Running the same
command again reuses every recorded shard whose job digest matches and whose file is there
with the recorded size, and builds the rest; `dataset.json` comes out byte-identical to an
uninterrupted run because it is made from the records in shard order. Other settings over an
unfinished conversion are refused with one line naming what changed (`overwrite=True` starts
afresh). After the manifest is published the shard records are deleted and `settings.json` is
kept, marked complete, so that the same command again is a no-op that says so.

Splits stay independent: a split being rewritten is unlisted (atomic manifest replace) only
when its first new shard is about to be built; other splits stay listed throughout; the new
manifest is published once, after every shard of every split written here is complete.

Cost at OpenImages scale (9M images, 9,600 classes, 1,000 images per shard, 64 nodes of 16
cores): 9,000 tasks; the driver keeps one `ShardInfo` per shard (a few MB in all), running
per-class totals (3 x 9,600 int64), nothing per image for a sorted label CSV (see
`openimages.py`) and at most `window` (2 x the cluster's CPUs: 2,048) jobs in flight, whose
entries (ids, URLs, labels: ~100 kB per job) sit in Ray's object store, not in its heap, until
their task ends; results are records of tens of kB (sparse counts) folded into the totals and
dropped. The progress folder peaks at 9,001 small files and shrinks to one at the end. A rerun
lists the folder once and reads the records it reuses one at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from .format import ClassInfo, Manifest, ShardInfo, SplitInfo, SplitStats, SplitTruth
from .storage import get_fs, join, read_bytes, redact, remove, write_bytes_atomic, write_manifest
from .writer import (
    EmptySplitError,
    ShardWriter,
    carry_other_splits,
    check_split_name,
    current_manifest,
    stale_shards,
    without_split,
)

__all__ = ["ShardJob", "SplitPlan", "SettingsChanged", "build_shard", "cut_jobs", "run_conversion", "progress_dir"]

_UNBOUNDED = 1 << 62


class SettingsChanged(ValueError):
    """An unfinished conversion in the output was started with other inputs or settings."""


@dataclass(frozen=True)
class ShardJob:
    """Everything one task needs to build shard `index` of `split` (plain data, picklable).

    `produce(args, opts, report)` yields the shard's `Record`s in order and reports the
    problems of its images; it must be a module-level function so it pickles by reference.
    """

    split: str
    index: int
    produce: Callable[..., Iterator[Any]]
    args: Any
    images: int

    def digest(self) -> str:
        what = [f"{self.produce.__module__}.{self.produce.__qualname__}", self.split, self.index, self.args]
        return hashlib.sha256(json.dumps(what, separators=(",", ":"), default=list).encode()).hexdigest()[:32]


@dataclass
class SplitPlan:
    """One split to convert: its jobs (a lazy, deterministic stream), its settings and meta."""

    jobs: Iterable[ShardJob]
    settings: dict[str, Any]  # compared on resume; strings must already be redacted
    images: int | None = None  # planned images, for the progress bar's ETA
    truth: list[float] | None = None  # per-class true frequency known analytically


def cut_jobs(split: str, entries: Iterable[Any], shard_samples: int, produce: Callable[..., Iterator[Any]],
             args_of: Callable[[list[Any]], Any] = lambda chunk: chunk) -> Iterator[ShardJob]:
    """Cut a stream of per-image entries into jobs of `shard_samples` entries each, in order."""
    chunk: list[Any] = []
    index = 0
    for e in entries:
        chunk.append(e)
        if len(chunk) == shard_samples:
            yield ShardJob(split, index, produce, args_of(chunk), len(chunk))
            chunk, index = [], index + 1
    if chunk:
        yield ShardJob(split, index, produce, args_of(chunk), len(chunk))


def progress_dir(root: str, split: str) -> str:
    return join(root, ".progress", split)


def _record_url(root: str, split: str, index: int) -> str:
    return join(progress_dir(root, split), f"shard-{index:06d}.json")


def _sparse(counts: np.ndarray) -> list[list[int]]:
    nz = np.flatnonzero(counts)
    return [nz.tolist(), counts[nz].tolist()]


def build_shard(job: ShardJob, ctx: dict[str, Any]) -> dict[str, Any]:
    """Build, hash and publish one shard, then record it; returns the record.

    `ctx`: root, num_classes, source, strict, opts (passed to `produce`). Strict mode raises
    at the shard's first problem (nothing is published for this shard).
    """
    from .sources.common import ConversionReport  # sources import this module

    report = ConversionReport(ctx["source"], strict=ctx["strict"])
    w = ShardWriter(ctx["root"], job.split, ctx["num_classes"], _UNBOUNDED, _UNBOUNDED, first_index=job.index)
    try:
        for rec in job.produce(job.args, ctx["opts"], report):
            w.write(rec)
    except BaseException:
        w.abort()
        raise
    info, _, _ = w.close()
    shard = info.shards[0] if info.shards else None
    record = {
        "index": job.index, "digest": job.digest(), "planned": job.images,
        "path": shard.path if shard else None, "samples": w.samples,
        "bytes": shard.bytes if shard else 0, "sha256": shard.sha256 if shard else "",
        "pos": _sparse(w.pos_counts), "neg": _sparse(w.neg_counts), "true": _sparse(w.true_counts),
        "with_truth": w.samples_with_truth,
        "counts": report.counts, "problems": report.problem_counts, "examples": report.examples,
    }
    write_bytes_atomic(_record_url(ctx["root"], job.split, job.index), json.dumps(record, separators=(",", ":")).encode())
    return record


class _Totals:
    """Running totals of one split: shard list (small) and per-class sums, never per-shard arrays."""

    def __init__(self, num_classes: int):
        self.shards: dict[int, ShardInfo] = {}
        self.pos = np.zeros(num_classes, np.int64)
        self.neg = np.zeros(num_classes, np.int64)
        self.true = np.zeros(num_classes, np.int64)
        self.samples = self.with_truth = self.reused = self.built = 0

    def add(self, rec: dict[str, Any]) -> None:
        if rec["path"]:
            self.shards[rec["index"]] = ShardInfo(path=rec["path"], samples=rec["samples"], bytes=rec["bytes"],
                                                  sha256=rec["sha256"])
        for arr, key in ((self.pos, "pos"), (self.neg, "neg"), (self.true, "true")):
            idx, n = rec[key]
            np.add.at(arr, np.asarray(idx, np.int64), np.asarray(n, np.int64))
        self.samples += rec["samples"]
        self.with_truth += rec["with_truth"]


def _changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted((set(old) | set(new)) - {"complete"})
            if old.get(k) != new.get(k)]


def _read_settings(root: str, split: str) -> dict[str, Any] | None:
    try:
        data = json.loads(read_bytes(join(progress_dir(root, split), "settings.json")))
    except (FileNotFoundError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _shard_sizes(root: str, split: str) -> dict[str, int]:
    """`<split>/<name>` -> size of every file in the split's folder: one listing, not a probe per shard."""
    fs, path = get_fs(join(root, split))
    try:
        return {f"{split}/{d['name'].rstrip('/').rsplit('/', 1)[-1]}": int(d.get("size") or 0)
                for d in fs.ls(path, detail=True)}
    except FileNotFoundError:
        return {}


def _recorded(root: str, split: str) -> set[int]:
    fs, path = get_fs(progress_dir(root, split))
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return set()
    out = set()
    for n in names:
        base = n.rstrip("/").rsplit("/", 1)[-1]
        if base.startswith("shard-") and base.endswith(".json") and base[6:-5].isdigit():
            out.add(int(base[6:-5]))
    return out


def _reuse(root: str, split: str, job: ShardJob, files: dict[str, int]) -> dict[str, Any] | None:
    """The record of `job`'s shard if it proves a complete shard of this very job, else None."""
    try:
        rec = json.loads(read_bytes(_record_url(root, split, job.index)))
    except (FileNotFoundError, ValueError):
        return None
    if rec.get("digest") != job.digest():
        raise SettingsChanged(f"{progress_dir(redact(root), split)}: shard {job.index} was made from other input rows than "
                              "the input has now (the input file changed); rerun with --overwrite to start afresh")
    if rec["path"] and files.get(rec["path"]) != rec["bytes"]:
        return None  # the shard file went away or is not the one recorded: build it again
    return rec


class _Bars:
    def __init__(self, split: str, shards: int | None, images: int | None, enabled: bool):
        from tqdm import tqdm

        kw = {"file": sys.stderr, "disable": not enabled, "dynamic_ncols": True}
        self.shards = tqdm(total=shards, desc=f"{split} shards", unit="shard", position=0, **kw)
        self.images = tqdm(total=images, desc=f"{split} images", unit="img", position=1, **kw)

    def done(self, rec: dict[str, Any], reused: bool) -> None:
        self.shards.update(1)
        self.images.update(rec["planned"])
        if reused:  # rate and ETA from the work done now, not from what a rerun skipped
            for bar in (self.shards, self.images):
                bar.initial, bar.start_t = bar.n, time.time()

    def close(self) -> None:
        self.images.close()
        self.shards.close()


class _Ray:
    """Ray, started (or joined) on the first shard that has to be built: an empty input or a
    rerun with nothing left to do never pays for a cluster. On a multi-node cluster every node
    must reach the output root: checked once, before the first task (`trainer/preflight.py`)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.started = False
        self.task: Any = None

    def get(self) -> Any:
        import ray

        if self.task is None:
            from trainer.launch import ensure_ray  # the project's one place that starts Ray

            self.started = ensure_ray()
            from trainer.preflight import check_nodes

            check_nodes(write=[("--out", self.root)])
            self.task = ray.remote(num_cpus=1, max_retries=2)(build_shard)  # retried only when a worker dies
        return ray

    def close(self) -> None:
        if self.started:
            import ray

            ray.shutdown()


def _run_jobs(jobs: Iterable[ShardJob], ctx: dict[str, Any], workers: int | None, skip: Callable[[ShardJob], bool],
              done: Callable[[dict[str, Any]], None], pool: _Ray) -> None:
    """Build every job not `skip`ped: in-process (workers=0) or as Ray tasks with a bounded window."""
    if workers == 0:
        for job in jobs:
            if not skip(job):
                done(build_shard(job, ctx))
        return
    pending: dict[Any, tuple[str, int]] = {}  # the job itself went to the object store with its task
    ray: Any = None
    window = workers or 0
    ctx_ref = None

    def collect() -> None:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            split, index = pending.pop(ref)
            try:
                rec = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, (ValueError, FileNotFoundError)):
                    raise cause from None
                raise RuntimeError(f"shard {index} of split {split!r}: task failed ({cause or e})") from None
            done(rec)

    try:
        for job in jobs:
            if skip(job):
                continue
            if ray is None:
                ray = pool.get()
                window = workers or 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
                ctx_ref = ray.put(ctx)
            while len(pending) >= window:
                collect()
            pending[pool.task.remote(job, ctx_ref)] = (job.split, job.index)
        while pending:
            collect()
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


def run_conversion(
    root: str,
    classes: Sequence[ClassInfo],
    plans: dict[str, SplitPlan],
    *,
    source: str,
    opts: dict[str, Any],
    meta: dict[str, Any],
    report: Any,
    keep: Manifest | None = None,
    workers: int | None = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Manifest:
    """Convert every split of `plans` into `root`, resuming what a stopped run published.

    workers: 0 builds shards in this process; N > 0 runs at most N Ray tasks at a time; None
    as many as the cluster has CPUs (twice that in flight). Ray is the local one
    `ensure_ray` starts, or the cluster at RAY_ADDRESS. `keep` (the root's manifest) carries
    its other splits into the new manifest; without it only the splits written here are listed.
    `report` (a ConversionReport) gets every task's counts and problems.
    """
    for split in plans:
        check_split_name(split)
    listed = keep if keep is not None else current_manifest(root)
    pool = _Ray(root)
    t0 = time.time()
    ctx = {"root": root, "num_classes": len(classes), "source": source, "strict": report.strict, "opts": opts}
    results: dict[str, tuple[SplitInfo, SplitStats, SplitTruth | None]] = {}
    try:
        for split, plan in plans.items():
            settings = {**plan.settings, "classes": _classes_digest(classes)}
            old = _read_settings(root, split)
            if overwrite and old is not None:
                _remove_progress(root, split)
                old = None
            if old is not None and old.get("complete") and not _changes(old, settings) and listed is not None \
                    and split in listed.splits:
                report.count("splits already converted (nothing to do)", 1)
                results[split] = (listed.splits[split], listed.stats.get(split) or SplitStats(pos=[], neg=[]),
                                  listed.truth.get(split))
                continue
            if old is not None and not old.get("complete") and _changes(old, settings) and _recorded(root, split):
                raise SettingsChanged(f"{progress_dir(redact(root), split)}: an unfinished conversion with other settings "
                                      f"({'; '.join(_changes(old, settings))[:400]}); rerun it as it was to resume, or "
                                      "pass --overwrite to start afresh")
            if old is None or old.get("complete") or _changes(old, settings):
                _remove_progress(root, split)
                write_bytes_atomic(join(progress_dir(root, split), "settings.json"),
                                   json.dumps({**settings, "complete": False}, sort_keys=True).encode())
            recorded = _recorded(root, split)
            files = _shard_sizes(root, split) if recorded else {}
            totals = _Totals(len(classes))
            bars = _Bars(split, None, plan.images, progress)
            unlisted = False

            def absorb(rec: dict[str, Any], reused: bool = False) -> None:
                totals.add(rec)
                report_merge(report, rec)
                bars.done(rec, reused)

            def skip(job: ShardJob) -> bool:
                nonlocal listed, unlisted
                if job.index in recorded:
                    rec = _reuse(root, split, job, files)
                    if rec is not None:
                        totals.reused += 1
                        absorb(rec, reused=True)
                        return True
                if not unlisted and listed is not None and split in listed.splits:
                    listed = without_split(listed, split)  # before a new shard overwrites an old one
                    if listed.splits:
                        write_manifest(root, listed)
                    else:
                        remove(join(root, "dataset.json"))
                unlisted = True
                totals.built += 1
                return False

            try:
                _run_jobs(plan.jobs, ctx, workers, skip, absorb, pool)
            finally:
                bars.close()
            if totals.samples == 0:
                _remove_progress(root, split)  # nothing was published: nothing to resume
                raise EmptySplitError(
                    f"split {split!r}: no samples to write (every input row or image was skipped, or the input is "
                    f"empty); {redact(join(root, 'dataset.json'))} was left without it; {source} input had {report.brief()}")
            shards = [totals.shards[i] for i in sorted(totals.shards)]
            info = SplitInfo(samples=totals.samples, shards=shards)
            stats = SplitStats(pos=totals.pos.tolist(), neg=totals.neg.tolist())
            truth = None
            if plan.truth is not None:
                truth = SplitTruth(freq=list(plan.truth))
            elif totals.with_truth == totals.samples:
                truth = SplitTruth(freq=(totals.true / totals.samples).tolist())
            results[split] = (info, stats, truth)
            report.count("shards reused", totals.reused)
            report.count("shards built", totals.built)
    finally:
        pool.close()
    manifest = _publish(root, classes, results, keep, meta)
    for split in plans:
        write_bytes_atomic(join(progress_dir(root, split), "settings.json"),
                           json.dumps({**plans[split].settings, "classes": _classes_digest(classes), "complete": True},
                                      sort_keys=True).encode())
        _remove_records(root, split)
    report.count("elapsed s", round(time.time() - t0))
    return manifest


def report_merge(report: Any, rec: dict[str, Any]) -> None:
    for k, v in rec["counts"].items():
        report.count(k, v)
    for kind, n in rec["problems"].items():
        report.problem_counts[kind] = report.problem_counts.get(kind, 0) + n
        ex = report.examples.setdefault(kind, [])
        ex.extend(rec["examples"].get(kind, [])[: max(0, report.max_examples - len(ex))])


def _classes_digest(classes: Sequence[ClassInfo]) -> str:
    text = "\n".join(c.id for c in classes)
    return f"{len(classes)} classes, sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}"


def _publish(root: str, classes: Sequence[ClassInfo], results: dict[str, tuple[SplitInfo, SplitStats, SplitTruth | None]],
             keep: Manifest | None, meta: dict[str, Any]) -> Manifest:
    infos = {k: v[0] for k, v in results.items()}
    stats = {k: v[1] for k, v in results.items() if v[1].pos}
    truths = {k: v[2] for k, v in results.items() if v[2] is not None}
    if keep is not None:
        carry_other_splits(keep, infos, stats, truths)
    manifest = Manifest(classes=list(classes), splits=infos, stats=stats, truth=truths, meta=meta)
    write_manifest(root, manifest)  # one atomic replace, after every shard is published
    for split in results:
        for url in stale_shards(root, split, {s.path for s in infos[split].shards}):
            remove(url)
    return manifest


def _remove_records(root: str, split: str) -> None:
    for i in _recorded(root, split):
        remove(_record_url(root, split, i))


def _remove_progress(root: str, split: str) -> None:
    _remove_records(root, split)
    remove(join(progress_dir(root, split), "settings.json"))
    if not root.startswith(("s3://", "gs://")) and "://" not in root:
        for d in (progress_dir(root, split), join(root, ".progress")):
            try:
                os.rmdir(d)
            except OSError:
                pass
