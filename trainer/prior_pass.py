"""The prior pass: paper 1 eq. 10-11, the mean sigmoid output of an Ignore model over a split.

    P_r(c) = 1/|X| sum_{x in X} sigmoid(f(x; theta_Ignore))_c

Shape. A Ray Dataset of *shard descriptors* (`from_items`, one row per shard: index, URL,
manifest sample count, one block each) goes through `map_batches(PriorActor, batch_size=1)`
on a fixed pool of actors (`ActorPoolStrategy(size=N)`). Each actor loads the model once, and
per shard streams it with the project's reader (`iter_shard`: tarfile, fsspec, retries, never
unpickles) and decode (`decode_image` at the checkpoint's image size, no flip, ImageNet
normalisation: exactly the eval path), runs the model in batches under `no_grad`, and returns
ONE row: float64 per-class sums of sigmoid outputs, the sample count, the corrupt count and the
per-class positive-annotation count. The driver folds rows into float64 totals as they arrive.
Memory is O(C x shards in flight) on every process, never O(N x C): at OpenImages scale a
per-sample matrix would be 9M x 9,600 floats (345 GB); a row here is 9,600 x 16 bytes.

Why not `ray.data.read_webdataset`: it decodes members with its own rules (and may unpickle
`.pyd`/`.pickle` members), splits files into read tasks whose sample accounting we could not
check, and decodes differently from training/eval. Why not a `Datasource` subclass: a
datasource's read tasks run as plain tasks, so the model would be loaded per read task (or the
decode and the inference would sit in different operators and every decoded image would cross
the object store: 9M x 3 x 224 x 224 floats). Shard descriptors plus an actor pool keep the
model resident, the images inside the actor, and make "exactly once" checkable per shard.

Exactly once. Each shard is one item; the driver checks that every shard index comes back once,
that each shard's count + corrupt equals its manifest count, and that the total equals the
split's manifest count; otherwise it raises (a Ray Data retry that duplicated a shard, or a
silently short read, cannot pass unnoticed). Corrupt samples (bad image, bad labels, a tar cut
short) are skipped as training skips them, counted and reported; the prior is the mean over
the samples the model actually scored. There is no splitting mode that drops a tail: the
`batch_size` only groups samples for the model, the last short batch included.

Resumable, fault tolerant. Each actor publishes a finished shard's row as a record under
`<out stem>.shards/`; a rerun folds those and scores only the other shards (`prior_records`:
layout, the identity that keeps other passes' records out, why the folder goes at the end),
with the same exactly-once checks. An OSError on a shard (ShardReadError after the reader's own
retries, a failed record upload) is retried SHARD_RETRIES times with back-off in the actor,
then comes back as an error row; after the stream the driver raises naming the failed shards,
every other shard's record kept. The progress bar's rate and ETA count this run's samples.

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

Cost: one forward per sample plus one decode; the driver does O(C) work per shard.
"""

from __future__ import annotations

import io
import json
import logging
import resource
import sys
import time
from typing import Any, Callable, TypeVar

import numpy as np

from data_shards.format import ClassInfo, Manifest
from data_shards.storage import exists, join, read_manifest, redact, write_bytes_atomic

from .checkpoint import EMA_FILE, MODEL_FILE, RUNNING_PRIOR_FILE, has_ema, read_state, resolve_checkpoint
from .prior_records import (ShardRecord, encode_record, file_stamp, identity_digest, iter_records, open_records,
                            pass_identity, record_url, records_dir, remove_records)
from .priors import read_priors, write_priors

__all__ = ["PriorActor", "PriorReduction", "shard_sums", "estimate_priors", "output_paths"]

log = logging.getLogger(__name__)
T = TypeVar("T")

TOP_K = 20
SHARD_RETRIES = 2  # attempts beyond the first, per shard, on top of the tar reader's own retries
RETRY_BACKOFF_S = 1.0  # doubles per attempt, capped at 30 s
MAX_FAILURES_KEPT = 10  # failure messages the driver keeps (the count is exact)


def shard_sums(model: Any, url: str, samples: int, *, image_size: int, num_classes: int, batch_size: int,
               device: Any = "cpu") -> dict[str, Any]:
    """Sums of sigmoid outputs over one shard's samples, streamed in batches (no per-sample kept)."""
    import torch

    from data_shards.decode import ImageDecodeError, decode_image, to_tensor
    from data_shards.shard_reader import SampleError, iter_shard, sample_parts

    total = torch.zeros(num_classes, dtype=torch.float64, device=device)
    pos = np.zeros(num_classes, dtype=np.int64)
    count = corrupt = 0
    images: list[np.ndarray] = []

    def flush() -> None:
        nonlocal count
        x = to_tensor(np.stack(images)).to(device, non_blocking=True)
        with torch.no_grad():
            total.add_(model(x).float().sigmoid().sum(0, dtype=torch.float64))
        count += len(images)
        images.clear()

    for i, raw in iter_shard(url, 0, samples):
        try:
            image, p, _ = sample_parts(raw, num_classes, f"shard {url} sample {raw.key or i!r}")
            images.append(decode_image(image, image_size))
        except (SampleError, ImageDecodeError):
            corrupt += 1
            continue
        pos[p] += 1
        if len(images) == batch_size:
            flush()
    if images:
        flush()
    return {"sum": total.cpu().numpy(), "count": count, "corrupt": corrupt, "pos": pos}


class PriorActor:
    """Ray Data callable class: the model is loaded once per actor; one call per shard.

    A shard's record is published here, before its row goes back: the PUTs run on every actor
    at once, not one after another on the driver, and a folded shard always has a record.
    Only OSError is retried and turned into an error row: any other exception is a bug, not a
    bad shard, and fails the pass at once (published records kept) instead of on every shard.
    """

    def __init__(self, checkpoint: str, weights: str, image_size: int, num_classes: int, batch_size: int,
                 cpus: float = 1.0, gpus: float = 0.0, *, records: str, digest: str, retries: int = SHARD_RETRIES):
        import torch

        from .inference import load_checkpoint

        torch.set_num_threads(max(1, int(cpus)))  # a CPU actor gets the cores Ray reserved for it
        self.device = torch.device("cuda" if gpus > 0 and torch.cuda.is_available() else "cpu")
        lm = load_checkpoint(checkpoint, weights)  # type: ignore[arg-type]
        if len(lm.classes) != num_classes:
            raise ValueError(f"{checkpoint}: {len(lm.classes)} classes, the pass expects {num_classes}")
        self.model = lm.model.to(self.device).eval()
        self.image_size, self.num_classes, self.batch_size = image_size, num_classes, batch_size
        self.records, self.digest, self.retries = records, digest, retries

    def _shard(self, shard: int, url: str, samples: int) -> dict[str, Any]:
        t0 = time.time()
        try:
            r = _retrying(lambda: shard_sums(self.model, url, samples, image_size=self.image_size,
                                             num_classes=self.num_classes, batch_size=self.batch_size, device=self.device),
                          self.retries, f"shard {shard} ({redact(url)})")
            data = encode_record(ShardRecord(shard, r["sum"], r["pos"], r["count"], r["corrupt"]), self.digest)
            _retrying(lambda: write_bytes_atomic(record_url(self.records, shard), data), self.retries,
                      f"record of shard {shard}")
        except OSError as e:
            r = {"sum": np.zeros(self.num_classes), "count": 0, "corrupt": 0, "pos": np.zeros(self.num_classes, dtype=np.int64),
                 "error": f"shard {shard} ({redact(url)}) failed {self.retries + 1} times: {type(e).__name__}: {redact(str(e))}"}
        return {**r, "error": r.get("error", ""), "t0": t0, "t1": time.time()}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = [self._shard(int(i), str(url), int(n)) for i, url, n in zip(batch["shard"], batch["url"], batch["samples"])]
        return {"shard": np.asarray(batch["shard"], dtype=np.int64),
                "sum": np.stack([r["sum"] for r in rows]).astype(np.float64),
                "count": np.asarray([r["count"] for r in rows], dtype=np.int64),
                "corrupt": np.asarray([r["corrupt"] for r in rows], dtype=np.int64),
                "pos": np.stack([r["pos"] for r in rows]).astype(np.int64),
                "error": np.asarray([r["error"] for r in rows], dtype=str),
                "t0": np.asarray([r["t0"] for r in rows]), "t1": np.asarray([r["t1"] for r in rows])}


def _retrying(fn: Callable[[], T], retries: int, what: str) -> T:
    """fn(), retried on OSError with doubling back-off (RETRY_BACKOFF_S, capped at 30 s)."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except OSError as e:
            if attempt == retries:
                raise
            delay = min(RETRY_BACKOFF_S * 2**attempt, 30.0)
            log.warning("%s: %s: %s; attempt %d of %d, retrying in %.0f s", what, type(e).__name__, redact(str(e)),
                        attempt + 1, retries + 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


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
    ema = has_ema(ckpt)
    if weights == "auto":
        weights = "ema" if ema else "model"
    if weights == "ema" and not ema:
        raise FileNotFoundError(f"{ckpt}: no EMA weights (the run had train.ema_decay=0); use --weights model")
    return ckpt, cfg.model_dump(mode="json"), classes, weights


def _default_actors(cpus: float, gpus: float) -> int:
    import ray

    res = ray.cluster_resources()
    n = res.get("GPU", 0) / gpus if gpus > 0 else res.get("CPU", 1) / cpus
    return max(1, int(n))


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
                    actors: int | None = None, batch_size: int = 64, cpus_per_actor: float = 1.0,
                    gpus_per_actor: float = 0.0, progress: bool = True, fresh: bool = False,
                    shard_retries: int = SHARD_RETRIES) -> dict[str, Any]:
    """Estimate the label prior of `data`/`split` with a checkpoint's model; write the outputs.

    Resumable: finished shards are recorded under `<out stem>.shards/` and a rerun of the same
    pass scores only the others (`prior_records`); `fresh=True` discards the records first.
    A shard that fails `shard_retries + 1` times is named in a RuntimeError raised after every
    other shard finished (their records kept). Returns the summary written to priors.json plus
    `manifest_samples`, `corrupt`, `actors`, `driver_peak_rss_mb` and the output paths.
    """
    if (batch_size < 1 or cpus_per_actor <= 0 or gpus_per_actor < 0 or (actors is not None and actors < 1)
            or shard_retries < 0):
        raise ValueError(f"need batch_size >= 1, cpus_per_actor > 0, gpus_per_actor >= 0, actors >= 1, shard_retries >= 0; "
                         f"got {batch_size}, {cpus_per_actor}, {gpus_per_actor}, {actors}, {shard_retries}")
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
    weights_file = file_stamp(join(ckpt, EMA_FILE if weights == "ema" else MODEL_FILE))
    identity = pass_identity(checkpoint=ckpt, weights=weights, weights_file=weights_file, split=split, shards=shards,
                             image_size=cfg["data"]["image_size"], class_ids=[c.id for c in manifest.classes])
    digest = identity_digest(identity)
    open_records(folder, identity, fresh=fresh)
    red = PriorReduction([s.samples for s in shards], manifest.num_classes)
    for rec in iter_records(folder, digest=digest, num_classes=manifest.num_classes, shard_samples=red.expected):
        red.add(rec.shard, rec.sum, rec.count, rec.corrupt, rec.pos, reused=True)
    todo = np.flatnonzero(~red.seen).tolist()

    n_actors = 0
    if todo:
        import ray

        from .launch import ensure_ray

        started = ensure_ray()
        try:
            n_actors = min(actors or _default_actors(cpus_per_actor, gpus_per_actor), len(todo))
            _run(ray, red, data, shards, todo, ckpt, weights, cfg, n_actors, batch_size, cpus_per_actor,
                 gpus_per_actor, progress, folder, digest, shard_retries)
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
    summary["actors"] = n_actors
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


def _run(ray: Any, red: PriorReduction, data: str, shards: list, todo: list[int], ckpt: str, weights: str,
         cfg: dict[str, Any], n_actors: int, batch_size: int, cpus: float, gpus: float, progress: bool,
         records: str, digest: str, retries: int) -> None:
    """Score the shards in `todo` on an actor pool, folding each row into `red` as it arrives."""
    from tqdm import tqdm

    ctx = ray.data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.enable_operator_progress_bars)
    ctx.enable_progress_bars = ctx.enable_operator_progress_bars = False  # ours counts samples
    try:
        items = [{"shard": i, "url": join(data, shards[i].path), "samples": shards[i].samples} for i in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(
            PriorActor, batch_size=1, batch_format="numpy",
            fn_constructor_kwargs={"checkpoint": ckpt, "weights": weights, "image_size": cfg["data"]["image_size"],
                                   "num_classes": len(red.sum), "batch_size": batch_size, "cpus": cpus, "gpus": gpus,
                                   "records": records, "digest": digest, "retries": retries},
            compute=ray.data.ActorPoolStrategy(size=n_actors), num_cpus=cpus, num_gpus=gpus or None,
        )
        reused = f", {red.reused_shards} shards reused" if red.reused_shards else ""
        # rate and ETA count this run's samples only: tqdm measures from `initial`
        bar = tqdm(total=sum(red.expected), initial=red.reused_samples, unit="img", unit_scale=True,
                   desc=f"prior pass ({n_actors} actors{reused})", disable=not progress, file=sys.stderr,
                   mininterval=1.0, dynamic_ncols=True, smoothing=0.1)
        t0 = time.perf_counter()
        with bar:
            for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
                if red.first_result_s is None:
                    red.first_result_s = time.perf_counter() - t0
                red.busy = (min(red.busy[0], float(b["t0"].min())), max(red.busy[1], float(b["t1"].max())))
                for i in range(len(b["shard"])):
                    if b["error"][i]:
                        red.fail(int(b["shard"][i]), str(b["error"][i]))
                        bar.set_postfix(corrupt=red.corrupt, failed_shards=red.failed)
                        continue
                    red.add(int(b["shard"][i]), b["sum"][i], int(b["count"][i]), int(b["corrupt"][i]), b["pos"][i])
                    bar.update(int(b["count"][i]) + int(b["corrupt"][i]))
                    if b["corrupt"][i]:
                        bar.set_postfix(corrupt=red.corrupt, failed_shards=red.failed)
        red.stream_s = time.perf_counter() - t0
    finally:
        ctx.enable_progress_bars, ctx.enable_operator_progress_bars = saved


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
