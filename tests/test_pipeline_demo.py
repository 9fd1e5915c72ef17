"""The two-stage method as commands: `csl pipeline` (with resume) and `csl demo` at reduced size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CSL = str(Path(sys.executable).with_name("csl"))
SMALL = ["data.image_size=32", "data.batch_size=16", "data.workers=0", "train.log_every=2", "cluster.workers=2",
         "checkpoint.every_steps=0", "deepspeed.zero_stage=0"]


def run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    p = subprocess.run([CSL, *args], capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"rc={p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


@pytest.mark.integration
def test_pipeline_runs_three_stages_and_skips_them_when_rerun(tmp_path):
    from data_shards.sources.synthetic import build_synthetic

    data = str(tmp_path / "data")
    build_synthetic(data, train=192, val=48, image_size=32, shard_samples=48, seed=3, progress=False)
    args = ["pipeline", "--config", "synthetic-cpu", "--prior-actors", "2", *SMALL, f"data.root={data}",
            "train.epochs=1", f"run.storage={tmp_path / 'runs'}", "run.name=pipe"]
    run(*args)
    root = tmp_path / "runs" / "pipe"
    for stage in ("stage1-ignore", "stage3-selective"):
        assert (root / stage / "eval.json").exists()
    assert (root / "stage2-prior" / "priors.csv").read_text().startswith("class_id,name,prior\n")
    cfg = (root / "stage3-selective" / "config.yaml").read_text()
    assert "name: csl" in cfg and "stage2-prior/priors.csv" in cfg
    summary = json.loads((root / "pipeline.json").read_text())
    assert summary["prior"]["samples"] == 192

    again = run(*args)
    out = again.stdout
    assert out.count("skipping") == 3, out
    assert "training" not in out.replace("already finished", "")


@pytest.mark.integration
def test_demo_at_reduced_size(tmp_path):
    out = tmp_path / "demo"
    run("demo", "--out", str(out), "--train", "192", "--val", "48", "--image-size", "32", "--epochs", "1",
        "data.batch_size=16", "data.workers=0", "checkpoint.every_steps=0", "deepspeed.zero_stage=0")
    res = json.loads((out / "results.json").read_text())
    assert set(res["modes"]) == {"ignore", "negative", "selective"}
    for mode in res["modes"].values():
        assert 0 <= mode["map_c"] <= 100 and 0 <= mode["map_o"] <= 100
    assert {"spearman_vs_truth", "spearman_counts_vs_truth", "spearman_negative_model_vs_truth"} <= set(res["prior"])
    assert res["seconds"] > 0
    errors = res["prior"]["ignore_errors"]
    assert len(errors["most_overestimated"]) == 5 and "error_vs_annotation_skew" in errors
    report = (out / "report.md").read_text()
    assert "Findings" in report and "Where the Ignore prior errs" in report
    for png in ("map_per_mode.png", "prior_vs_truth.png", "training_curves.png"):
        assert (out / png).stat().st_size > 1000, png


def test_prior_errors_follow_the_annotation_skew():
    import numpy as np

    from trainer.demo import _prior_errors

    truth = np.array([0.5, 0.2, 0.1, 0.05])
    pos, neg = np.array([50.0, 60.0, 40.0, 30.0]), np.array([50.0, 40.0, 60.0, 70.0])  # shares .5 .6 .4 .3
    est = truth * (pos / (pos + neg) / truth) ** 0.5  # pulled halfway (in logs) towards the annotated share
    e = _prior_errors(est, truth, pos, neg, ["a", "b", "c", "d"], k=2)
    assert e["error_vs_annotation_skew"] == 1.0
    assert [x["class"] for x in e["most_overestimated"]] == ["d", "c"]
    assert e["most_overestimated"][0]["annotated_positive_share"] == 0.3
