"""`csl experiment` on a tiny grid: tables and numbers written, and a re-run retrains nothing.

The integration grid is 1 scheme x (ignore, csl-P) x 1 seed: csl-P needs the prior pass, so
the whole chain runs; each training costs ~20-60 s of Ray Train start-up on a shared 2-core
machine, so the grid is the smallest that runs every stage. Tables over several schemes and
the findings' logic are tested on hand-made numbers instead.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

CSL = str(Path(sys.executable).with_name("csl"))
TINY = ["--schemes", "rpa:0.5", "--losses", "ignore,csl-P", "--seeds", "0", "--train", "128",
        "--val", "32", "--image-size", "32", "--epochs", "1", "data.batch_size=16", "data.workers=0",
        "checkpoint.every_steps=0", "deepspeed.zero_stage=0", "cluster.workers=1"]  # two ranks: test_train.py


def run(*args: str, timeout: int = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    p = subprocess.run([CSL, *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode == 0, f"rc={p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def test_bad_variant_is_one_line_and_exit_2(tmp_path):
    p = subprocess.run([CSL, "experiment", "--out", str(tmp_path / "x"), "--losses", "ignore,csl-X"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "csl-X" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_summary_and_findings_are_computed_from_the_numbers():
    from trainer.experiment import findings, render_markdown, summarise

    runs = [{"scheme": "rpa:0.5", "seed": s, "variant": v, "map_c": c + s, "map_o": c + 1 + s}
            for s in (0, 1) for v, c in (("ignore", 50.0), ("negative", 60.0), ("csl-LP", 55.0))]
    table = summarise(runs, ["rpa:0.5"], ["ignore", "negative", "csl-LP"])
    assert table["rpa:0.5"]["ignore"]["map_c"] == {"mean": 50.5, "std": round(2 ** -0.5, 3), "n": 2}
    text = "\n".join(findings(table))
    assert "favours Ignore over Negative: **does NOT hold**" in text
    assert "csl-LP >= the better of Ignore / Negative: **does NOT hold**" in text
    md = render_markdown({"settings": {"train": 1, "val": 1, "image_size": 32, "epochs": 1, "seeds": [0, 1],
                                       "weights": "EMA", "likelihood_topk": 1, "prior_threshold": 0.5,
                                       "prior_from": "ignore"},
                          "finished": 6, "planned": 6, "table": table, "priors": [], "seconds_training": 0})
    assert "| ignore | 50.50 ± 0.71 | 51.50 ± 0.71 | 2 |" in md


@pytest.mark.integration
def test_tiny_grid_writes_tables_and_resumes_without_retraining(tmp_path, ray_env):
    out = tmp_path / "exp"
    first = run("experiment", "--out", str(out), *TINY, env=ray_env)  # joins the session's Ray head
    assert "run 2/2" in first.stdout and str(out / "experiment.md") in first.stdout
    res = json.loads((out / "experiment.json").read_text())
    assert res["finished"] == res["planned"] == 2
    assert {(r["scheme"], r["variant"]) for r in res["runs"]} == {("rpa:0.5", v) for v in ("ignore", "csl-P")}
    for r in res["runs"]:
        assert 0 <= r["map_c"] <= 100 and 0 <= r["map_o"] <= 100
        assert 0 <= r["map_c_raw_model"] <= 100
    assert set(res["table"]["rpa:0.5"]) == {"ignore", "csl-P"}
    assert res["table"]["rpa:0.5"]["csl-P"]["map_c"]["n"] == 1
    assert len(res["priors"]) == 1 and all(p["classes"] > 0 for p in res["priors"])
    csl_p = (out / "runs" / "rpa0.5-s0-csl-P" / "config.yaml").read_text()
    assert "likelihood_topk: 0" in csl_p and "priors/rpa0.5-s0-ignore.csv" in csl_p
    md = (out / "experiment.md").read_text()
    assert "## `rpa:0.5`" in md and "| csl-P |" in md
    ignore = next(r for r in res["runs"] if r["variant"] == "ignore")
    assert res["table_raw_model"]["rpa:0.5"]["ignore"]["map_c"]["mean"] == ignore["map_c_raw_model"]
    if res["settings"]["weights"] == "EMA":
        assert "## Raw model (no EMA)" in md and "| rpa:0.5 | csl-P |" in md
    assert "## Findings" in md and "favours Ignore over Negative: not measured" in md

    t0 = time.time()
    again = run("experiment", "--out", str(out), *TINY, env=ray_env)
    assert again.stdout.count("skipping") == 3, again.stdout  # 2 runs + 1 prior pass
    assert "training '" not in again.stdout and "starting run" not in again.stdout
    assert time.time() - t0 < 60
    assert json.loads((out / "experiment.json").read_text())["table"] == res["table"]
