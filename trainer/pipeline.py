"""The method end to end, as one resumable command: Ignore model -> priors -> Selective model.

Paper 1, sec. 4.2: a temporary model trained in Ignore mode (un-annotated labels add no loss)
sees no bias from the missing annotations, so its average prediction per class estimates the
class's true frequency better than annotation counts do; the target model is then trained
with the Selective loss, which needs exactly that prior (Omega_P, eq. 7).

One run folder, `{run.storage}/{run.name}`, holds the three stages:

    stage1-ignore/      a full training run (Ray Train checkpoints, metrics, eval.json)
    stage2-prior/       priors.csv, priors.json, priors.png
    stage3-selective/   a full training run with prior.path pointing at stage 2
    pipeline.json       each stage's final evaluation and the prior's quality figures

Each stage is skipped when its final artefact exists (a training run's eval.json is written
after its last checkpoint; priors.csv is written atomically), and a stage that was cut short
resumes from its latest complete checkpoint, so running the same command again after any
failure does only the missing work. `train_stage` and `prior_stage` are that skip-or-run step
on their own, for a caller that trains more beside the chain (`csl demo`'s Negative baseline).
"""

from __future__ import annotations

import json
import time
from typing import Any

from data_shards.storage import exists, join, read_bytes, write_bytes_atomic

from .config import Config
from .checkpoint import resolve_checkpoint
from .launch import ensure_ray, launch, run_dir_of, training_done

__all__ = ["STAGE1", "STAGE2", "STAGE3", "stage_config", "training_done", "train_stage", "prior_stage",
           "prior_resources", "run_pipeline"]

STAGE1, STAGE2, STAGE3 = "stage1-ignore", "stage2-prior", "stage3-selective"


def stage_config(cfg: Config, storage: str, name: str, **loss_and_prior: Any) -> Config:
    """`cfg` re-rooted at `storage/name`, with `loss_name` / `prior_path` replaced if given."""
    out = cfg.model_copy(deep=True)
    out.run.storage, out.run.name = storage, name
    if "loss_name" in loss_and_prior:
        out.loss.name = loss_and_prior["loss_name"]
    if "prior_path" in loss_and_prior:
        out.prior.path = loss_and_prior["prior_path"]
    return out


def train_stage(cfg: Config, label: str, verbose: bool = False) -> dict[str, Any]:
    """Train `cfg` unless its run has finished; its final eval either way."""
    done = training_done(cfg)
    if done is not None:
        print(f"[pipeline] {label}: already finished (step {done.get('step')}), skipping", flush=True)
        return done
    print(f"[pipeline] {label}: training {cfg.run.name!r} with loss {cfg.loss.name!r}", flush=True)
    launch(cfg, verbose)
    result = training_done(cfg)
    if result is None:
        raise RuntimeError(f"{label}: training ended without eval.json in {run_dir_of(cfg)}")
    return result


def prior_resources(cfg: Config, actors: int | None = None) -> dict[str, Any]:
    """The prior pass on the training's hardware: a GPU run's workers become GPU actors with the
    same GPUs and CPUs each (one per training worker unless `actors` says otherwise); a CPU run
    takes the pass's CPU defaults (one actor per cluster CPU)."""
    c = cfg.cluster
    if c.gpus_per_worker > 0:
        return {"device": "cuda", "actors": actors or c.workers, "gpus_per_actor": c.gpus_per_worker,
                "cpus_per_actor": c.cpus_per_worker}
    return {"device": "cpu", "actors": actors}


def prior_stage(model_cfg: Config, csv: str, label: str, *, actors: int | None = None,
                verbose: bool = False) -> dict[str, Any]:
    """The prior pass of `model_cfg`'s finished run over its training split, written to `csv`
    (+ .json, .png beside it), unless both exist; the pass's summary (priors.json) either way."""
    from .prior_pass import estimate_priors, output_paths

    summary = output_paths(csv)[1]
    if exists(csv) and exists(summary):
        print(f"[pipeline] {label}: priors exist ({csv}), skipping", flush=True)
        return json.loads(read_bytes(summary))
    print(f"[pipeline] {label}: prior pass with the {model_cfg.loss.name.capitalize()} model", flush=True)
    ckpt = resolve_checkpoint(run_dir_of(model_cfg))
    ensure_ray(verbose)  # a no-op after a training stage ran here; else the pass would start a quiet one
    return estimate_priors(ckpt, model_cfg.data.root, split=model_cfg.data.train_split, out=csv,
                           **prior_resources(model_cfg, actors))


def run_pipeline(cfg: Config, *, prior_actors: int | None = None, final_loss: str | None = None,
                 verbose: bool = False) -> dict[str, Any]:
    """Run (or finish) the three stages; returns a summary with each stage's results. `verbose`:
    Ray's worker output on the console too (see `console.py`)."""
    t0 = time.time()
    root = run_dir_of(cfg)
    final_loss = final_loss or (cfg.loss.name if cfg.loss.name not in ("ignore",) else "csl")
    ignore_cfg = stage_config(cfg, root, STAGE1, loss_name="ignore", prior_path=None)
    ignore_eval = train_stage(ignore_cfg, "stage 1/3", verbose)

    priors_csv = join(root, STAGE2, "priors.csv")
    prior_info = prior_stage(ignore_cfg, priors_csv, "stage 2/3", actors=prior_actors, verbose=verbose)

    final_cfg = stage_config(cfg, root, STAGE3, loss_name=final_loss, prior_path=priors_csv)
    summary_path = join(root, "pipeline.json")
    was_done = exists(summary_path) and training_done(final_cfg) is not None  # a rerun: every stage skips
    final_eval = train_stage(final_cfg, "stage 3/3", verbose)
    summary = {"run_dir": root, "ignore": ignore_eval, "prior": {k: v for k, v in prior_info.items() if k != "top"},
               "final_loss": final_loss, "final": final_eval, "seconds": round(time.time() - t0, 1)}
    if was_done:  # keep the time of the run that did the work, not this rerun's
        summary["seconds"] = json.loads(read_bytes(summary_path)).get("seconds", summary["seconds"])
    else:
        write_bytes_atomic(summary_path, json.dumps(summary, indent=1).encode())
    print(f"[pipeline] done in {summary['seconds']}s: Ignore mAP(C) {ignore_eval.get('map_c', float('nan')):.2f}, "
          f"{final_loss} mAP(C) {final_eval.get('map_c', float('nan')):.2f}", flush=True)
    return summary
