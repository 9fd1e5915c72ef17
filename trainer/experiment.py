"""`csl experiment`: the loss grid of paper 1 (Fig. 6, Table 1) on synthetic data, with seeds.

Why a grid: paper 1's claim is not "CSL wins" but "the right treatment of un-annotated labels
depends on how the data was annotated". Under RPA (each label dropped at random, so positive
counts stay proportional to the true frequencies) an un-annotated label is as likely positive as
any other, and Ignore beats Negative; under FPC (a fixed number of annotations per class) almost
every un-annotated label is truly negative, and Negative beats Ignore; the Selective loss,
choosing per label (Omega_L, eq. 5) and per class (Omega_P, eq. 7), should match or beat the
better of the two in both, and on the OpenImages-like bias. One run per cell says little on a
small synthetic set, so every cell is trained with several seeds and reported as mean +- std.

The grid: for each (scheme, seed) one dataset (`out/data/<scheme>-s<seed>`, the seed draws the
images and the annotation; val fully annotated, so mAP is measured against the truth), the Ignore
model first (it is also the temporary model of the method), one prior pass with it (paper 1,
eqs. 10-11), then the other variants with the same seed for their initialisation:

    ignore, negative, pasl       baselines (pasl: eq. 3 with omega = 1)
    csl-L                        csl with K = likelihood_topk (>0), no prior: Omega_L only
    csl-P                        csl with K = 0 and the prior, eta = prior_threshold: Omega_P only
    csl-LP                       csl with both (eq. 8)
    pseudo                       paper 2's pseudo-label loss

`fpc:N` needs N at the scale of the set: the default is N = train / 20 (5 % of the images per
class, about the paper's 1,000 of COCO's 82k, scaled up so the rarest synthetic classes are not
left with a handful of annotations); the bare scheme `fpc` means exactly that.

Every run lives at `out/runs/<scheme>-s<seed>-<variant>` (":" dropped from the scheme: Ray and
pyarrow treat a colon in a path as a URI scheme) and is skipped when its eval.json exists, so
running the same command again resumes the grid; one Ray session serves the whole grid. After
every run, `out/experiment.json` (every run's numbers, EMA and raw model) and
`out/experiment.md` (one table per scheme and the findings, computed from the numbers, a finding
that does not hold reported as such) are rewritten, so an interrupted grid still has a report.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import numpy as np

from data_shards.simulate import parse_scheme

from .config import Config, load_config
from .checkpoint import resolve_checkpoint
from .launch import ensure_ray, run_dir_of
from .pipeline import stage_config, training_done

__all__ = ["VARIANTS", "DEFAULT_VARIANTS", "default_schemes", "run_experiment", "summarise", "render_markdown"]

# variant -> (registered loss, uses Omega_L, uses the prior)
VARIANTS: dict[str, tuple[str, bool, bool]] = {
    "ignore": ("ignore", False, False),
    "negative": ("negative", False, False),
    "pasl": ("pasl", False, False),
    "csl-L": ("csl", True, False),
    "csl-P": ("csl", False, True),
    "csl-LP": ("csl", True, True),
    "pseudo": ("pseudo", False, False),
}
DEFAULT_VARIANTS = tuple(VARIANTS)
CSL_VARIANTS = ("csl-L", "csl-P", "csl-LP")


def default_schemes(train: int) -> tuple[str, ...]:
    return ("openimages", f"fpc:{_fpc_n(train)}", "rpa:0.5")


def _fpc_n(train: int) -> int:
    return max(1, train // 20)


def _slug(scheme: str) -> str:
    return scheme.replace(":", "")


def _check_grid(schemes: list[str], losses: list[str], seeds: list[int], prior_from: str) -> None:
    for s in schemes:
        parse_scheme(s)  # raises ValueError naming the bad scheme
    bad = [v for v in losses if v not in VARIANTS]
    if bad:
        raise ValueError(f"unknown loss variant(s) {', '.join(map(repr, bad))}; valid: {', '.join(VARIANTS)}")
    if prior_from not in VARIANTS or VARIANTS[prior_from][2]:
        raise ValueError(f"prior_from {prior_from!r} must be a variant that needs no prior, e.g. 'ignore'")
    if not schemes or not losses or not seeds:
        raise ValueError("the grid is empty: give at least one scheme, one loss variant and one seed")
    if len(set(seeds)) != len(seeds) or len(set(losses)) != len(losses) or len(set(schemes)) != len(schemes):
        raise ValueError(f"repeated entries in the grid: schemes {schemes}, losses {losses}, seeds {seeds}")


def _variant_config(base: Config, runs: str, name: str, variant: str, prior_csv: str | None, topk: int) -> Config:
    loss, uses_l, uses_p = VARIANTS[variant]
    cfg = stage_config(base, runs, name, loss_name=loss, prior_path=prior_csv if uses_p else None)
    if loss == "csl":
        cfg.loss.likelihood_topk = topk if uses_l else 0
    return cfg


def _train(cfg: Config, label: str) -> tuple[dict[str, Any], float | None]:
    from .launch import launch

    done = training_done(cfg)
    if done is not None:
        print(f"[experiment] {label}: finished already, skipping", flush=True)
        return done, None
    print(f"[experiment] {label}: training {cfg.run.name!r} (loss {cfg.loss.name})", flush=True)
    t0 = time.time()
    launch(cfg)
    done = training_done(cfg)
    if done is None:
        raise RuntimeError(f"{label}: training ended without eval.json in {run_dir_of(cfg)}")
    return done, round(time.time() - t0, 1)


def _stats(values: list[float]) -> dict[str, float | int]:
    a = np.asarray(values, dtype=float)
    # sample std (ddof=1): 3 seeds are a sample of the seed distribution; undefined for one seed
    std = float(a.std(ddof=1)) if a.size > 1 else float("nan")
    return {"mean": round(float(a.mean()), 3), "std": round(std, 3) if a.size > 1 else None, "n": int(a.size)}


def summarise(runs: list[dict[str, Any]], schemes: list[str], losses: list[str],
              raw: bool = False) -> dict[str, dict[str, Any]]:
    """Per scheme and variant: mean / std / n of mAP(C) and mAP(O) over the finished seeds.

    `raw`: of the raw model instead of the reported (EMA when kept) weights.
    """
    c, o = ("map_c_raw_model", "map_o_raw_model") if raw else ("map_c", "map_o")
    table: dict[str, dict[str, Any]] = {}
    for s in schemes:
        rows = {}
        for v in losses:
            cell = [r for r in runs if r["scheme"] == s and r["variant"] == v]
            if cell:
                rows[v] = {"map_c": _stats([r[c] for r in cell]), "map_o": _stats([r[o] for r in cell]),
                           "seeds": sorted(r["seed"] for r in cell)}
        table[s] = rows
    return table


def _cmp(rows: dict[str, Any], a: str, b: str | list[str]) -> tuple[str, bool] | None:
    """'a vs b' on mean mAP(C) (b: the better of several), with mAP(O) and the spread beside it."""
    bs = [b] if isinstance(b, str) else b
    if a not in rows or any(x not in rows for x in bs):
        return None
    best = max(bs, key=lambda x: rows[x]["map_c"]["mean"])
    ca, cb = rows[a]["map_c"], rows[best]["map_c"]
    oa, ob = rows[a]["map_o"]["mean"], rows[best]["map_o"]["mean"]
    holds = ca["mean"] >= cb["mean"] if isinstance(b, list) else ca["mean"] > cb["mean"]
    stds = [x for x in (ca["std"], cb["std"]) if x is not None]
    noise = ""
    if stds and abs(ca["mean"] - cb["mean"]) < max(stds):
        noise = f"; the gap ({abs(ca['mean'] - cb['mean']):.2f}) is within one seed std ({max(stds):.2f})"
    text = (f"{a} {ca['mean']:.2f} vs {best} {cb['mean']:.2f} mAP(C) (mAP(O) {oa:.2f} vs {ob:.2f}, "
            f"n = {ca['n']}/{cb['n']} seeds){noise}")
    return text, holds


def findings(table: dict[str, dict[str, Any]]) -> list[str]:
    """Paper 1's claims, each checked on the measured means (mAP(C) decides; mAP(O) shown)."""
    out: list[str] = []

    def add(claim: str, res: tuple[str, bool] | None) -> None:
        if res is None:
            out.append(f"- {claim}: not measured (a variant it needs has no finished run)")
        else:
            out.append(f"- {claim}: **{'holds' if res[1] else 'does NOT hold'}** -- {res[0]}")

    for s, rows in table.items():
        kind = parse_scheme(s).kind
        if kind == "rpa":
            add(f"`{s}` favours Ignore over Negative", _cmp(rows, "ignore", "negative"))
        if kind == "fpc":
            add(f"`{s}` favours Negative over Ignore", _cmp(rows, "negative", "ignore"))
    for s, rows in table.items():
        done = [v for v in CSL_VARIANTS if v in rows]
        if done:
            best = max(done, key=lambda v: rows[v]["map_c"]["mean"])
            add(f"`{s}`: best Selective variant ({best}) >= the better of Ignore / Negative",
                _cmp(rows, best, ["ignore", "negative"]))
        add(f"`{s}`: csl-LP >= the better of Ignore / Negative", _cmp(rows, "csl-LP", ["ignore", "negative"]))
    return out


def _fmt(st: dict[str, Any]) -> str:
    return f"{st['mean']:.2f} ± {st['std']:.2f}" if st["std"] is not None else f"{st['mean']:.2f} ± n/a"


def render_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = ["# csl experiment: losses x annotation schemes (paper 1, Fig. 6 / Table 1)", "",
             f"Synthetic data: {s['train']} train / {s['val']} val images (val fully annotated), {s['image_size']} px; "
             f"{s['epochs']} epochs per model; seeds {s['seeds']}; {s['weights']} weights "
             f"(the raw model's at the end). csl: K = {s['likelihood_topk']}, "
             f"eta = {s['prior_threshold']}, prior from the `{s['prior_from']}` model of the same scheme and seed. "
             f"Mean ± sample std over the finished seeds.", "",
             f"Runs finished: {result['finished']} of {result['planned']}.", ""]
    for scheme, rows in result["table"].items():
        lines += [f"## `{scheme}`", ""]
        if not rows:
            lines += ["No finished runs yet.", ""]
            continue
        lines += ["| loss | mAP(C) | mAP(O) | n seeds |", "|---|---|---|---|"]
        lines += [f"| {v} | {_fmt(r['map_c'])} | {_fmt(r['map_o'])} | {r['map_c']['n']} |" for v, r in rows.items()]
        pri = [p for p in result["priors"] if p["scheme"] == scheme]
        if pri:
            sp = [p["spearman_vs_truth"] for p in pri if p.get("spearman_vs_truth") is not None]
            sp_text = f"Spearman vs true frequency {np.mean(sp):.3f}, " if sp else ""
            lines += ["", f"Prior pass ({len(pri)} seed(s)): {sp_text}classes in Omega_P (prior > eta): "
                          f"{', '.join(str(p['omega_p_classes']) for p in pri)} of {pri[0]['classes']}."]
        lines.append("")
    lines += ["## Findings, as measured here", "", *findings(result["table"]), ""]
    raw = result.get("table_raw_model")
    if raw and s["weights"] == "EMA":
        # With a few hundred steps the EMA still carries early weights, which can shrink the
        # gaps between losses; the same checks on the raw model show whether a finding depends on it.
        lines += ["## Raw model (no EMA), for comparison", "", "| scheme | loss | mAP(C) | mAP(O) | n seeds |",
                  "|---|---|---|---|---|"]
        lines += [f"| {sc} | {v} | {_fmt(r['map_c'])} | {_fmt(r['map_o'])} | {r['map_c']['n']} |"
                  for sc, rows in raw.items() for v, r in rows.items()]
        lines += ["", "Findings on the raw model:", "", *findings(raw), ""]
    lines += [f"Training time this invocation: {result['seconds_training']:.0f} s.", ""]
    return "\n".join(lines)


def _prior_info(csv: str, data: str, eta: float) -> dict[str, Any]:
    from data_shards.storage import read_manifest

    from .priors import read_priors

    with open(csv[:-4] + ".json") as f:
        info = json.load(f)
    prior = read_priors(csv, read_manifest(data))
    return {"spearman_vs_truth": info.get("spearman_vs_truth"), "omega_p_classes": int((prior > eta).sum()),
            "classes": int(prior.size)}


def run_experiment(out: str = "experiment_out", *, schemes: tuple[str, ...] | list[str] | None = None,
                   losses: tuple[str, ...] | list[str] = DEFAULT_VARIANTS, seeds: tuple[int, ...] | list[int] = (0, 1, 2),
                   train: int = 2000, val: int = 500, image_size: int = 32, epochs: int = 4,
                   overrides: list[str] | None = None, prior_from: str = "ignore") -> dict[str, Any]:
    """Train (or finish) the grid; write experiment.json and experiment.md in `out`; return the results."""
    import ray

    from data_shards.sources.synthetic import build_synthetic

    from .prior_pass import estimate_priors

    schemes = [f"fpc:{_fpc_n(train)}" if s == "fpc" else s for s in (schemes or default_schemes(train))]
    losses, seeds = list(losses), list(seeds)
    _check_grid(schemes, losses, seeds, prior_from)
    out = os.path.abspath(out)
    runs_dir = os.path.join(out, "runs")
    base = load_config("synthetic-cpu", [f"data.image_size={image_size}", f"train.epochs={epochs}", *(overrides or [])])
    topk = base.loss.likelihood_topk or 1
    eta = base.loss.prior_threshold if base.loss.prior_threshold is not None else 0.5
    needs_prior = any(VARIANTS[v][2] for v in losses)
    order = ([prior_from] if needs_prior or prior_from in losses else []) + [v for v in losses if v != prior_from]
    planned = len(schemes) * len(seeds) * len(order)
    settings = {"schemes": schemes, "losses": losses, "seeds": seeds, "train": train, "val": val,
                "image_size": image_size, "epochs": epochs, "overrides": list(overrides or []), "prior_from": prior_from,
                "likelihood_topk": topk, "prior_threshold": eta, "weights": None}
    records: list[dict[str, Any]] = []
    priors: list[dict[str, Any]] = []
    spent = 0.0

    def write() -> dict[str, Any]:
        result = {"settings": settings, "planned": planned, "finished": len(records), "runs": records, "priors": priors,
                  "table": summarise(records, schemes, losses),
                  "table_raw_model": summarise(records, schemes, losses, raw=True), "seconds_training": round(spent, 1)}
        with open(os.path.join(out, "experiment.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(out, "experiment.md"), "w") as f:
            f.write(render_markdown(result))
        return result

    os.makedirs(out, exist_ok=True)
    started_ray = ensure_ray()  # one cluster for the whole grid
    k = 0
    try:
        for scheme in schemes:
            for seed in seeds:
                tag = f"{_slug(scheme)}-s{seed}"
                data = os.path.join(out, "data", tag)
                if not os.path.exists(os.path.join(data, "dataset.json")):
                    print(f"[experiment] building {data} (scheme {scheme}, seed {seed})", flush=True)
                    build_synthetic(data, train=train, val=val, image_size=image_size, scheme=scheme, val_scheme="full",
                                    seed=seed, shard_samples=500, workers=os.cpu_count() or 1, progress=False)
                cell = base.model_copy(deep=True)
                cell.data.root, cell.train.seed = data, seed
                prior_csv = os.path.join(out, "priors", f"{tag}-{prior_from}.csv")
                for variant in order:
                    k += 1
                    cfg = _variant_config(cell, runs_dir, f"{tag}-{variant}", variant, prior_csv, topk)
                    ev, secs = _train(cfg, f"run {k}/{planned} {scheme} seed {seed} {variant}")
                    spent += secs or 0.0
                    key = "ema_" if "ema_map_c" in ev else ""
                    settings["weights"] = settings["weights"] or ("EMA" if key else "model")
                    if variant in losses:
                        records.append({"scheme": scheme, "seed": seed, "variant": variant, "loss": cfg.loss.name,
                                        "map_c": round(ev[f"{key}map_c"], 3), "map_o": round(ev[f"{key}map_o"], 3),
                                        "map_c_raw_model": round(ev["map_c"], 3), "map_o_raw_model": round(ev["map_o"], 3),
                                        "weights": "EMA" if key else "model", "step": ev.get("step"),
                                        "seconds": secs, "run_dir": run_dir_of(cfg)})
                    if variant == prior_from and needs_prior:
                        if not (os.path.exists(prior_csv) and os.path.exists(prior_csv[:-4] + ".json")):
                            print(f"[experiment] prior pass with {cfg.run.name!r}", flush=True)
                            estimate_priors(resolve_checkpoint(run_dir_of(cfg)), data, prior_csv, split="train",
                                            progress=False)
                        else:
                            print(f"[experiment] priors {prior_csv} exist, skipping", flush=True)
                        priors.append({"scheme": scheme, "seed": seed, "csv": prior_csv,
                                       **_prior_info(prior_csv, data, eta)})
                    write()
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()
    return write()
