"""The two-stage method as commands: `csl demo` at reduced size, which runs `csl pipeline`'s chain
(and its resume), plus the pipeline's one-line refusal of bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CSL = str(Path(sys.executable).with_name("csl"))


def run(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    p = subprocess.run([CSL, *args], capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"rc={p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def test_pipeline_refuses_a_bad_config_key_in_one_line():
    p = subprocess.run([CSL, "pipeline", "train.epocs=1"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "train.epocs" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr


@pytest.mark.integration
def test_demo_at_reduced_size(tmp_path):
    """The demo is the pipeline plus a Negative baseline: one chain trained covers both, and the
    rerun checks the pipeline's resume (every stage skipped, nothing retrained)."""
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--train", "192", "--val", "48", "--image-size", "32", "--epochs", "1",
            "data.batch_size=16", "data.workers=0", "checkpoint.every_steps=0", "deepspeed.zero_stage=0",
            "cluster.workers=1"]  # two ranks: test_train.py
    run(*args)
    res = json.loads((out / "results.json").read_text())
    assert list(res["modes"]) == ["ignore", "negative", "selective"]
    for mode in res["modes"].values():
        assert 0 <= mode["map_c"] <= 100 and 0 <= mode["map_o"] <= 100
    assert {"spearman_vs_truth", "spearman_counts_vs_truth", "spearman_negative_model_vs_truth"} <= set(res["prior"])
    assert res["seconds"] > 0 and res["config"]["workers"] == 1
    errors = res["prior"]["ignore_errors"]
    assert len(errors["most_overestimated"]) == 5 and "error_vs_annotation_skew" in errors
    report = (out / "report.md").read_text()
    assert "Findings" in report and "Where the Ignore prior errs" in report
    for png in ("map_per_mode.png", "prior_vs_truth.png", "training_curves.png"):
        assert (out / png).stat().st_size > 1000, png

    root = out / "runs"
    for stage in ("stage1-ignore", "stage3-selective", "negative"):
        assert (root / stage / "eval.json").exists(), stage
    for prior in ("stage2-prior", "negative-prior"):
        assert (root / prior / "priors.csv").read_text().startswith("class_id,name,prior\n"), prior
    cfg = (root / "stage3-selective" / "config.yaml").read_text()
    assert "name: csl" in cfg and "stage2-prior/priors.csv" in cfg
    assert "name: negative" in (root / "negative" / "config.yaml").read_text()
    summary_text = (root / "pipeline.json").read_text()
    summary = json.loads(summary_text)
    assert summary["prior"]["samples"] == 192 and summary["final_loss"] == "csl"

    again = run(*args).stdout
    assert again.count("[pipeline] stage ") == 3 and again.count("skipping") == 5, again
    assert "training '" not in again and "starting run" not in again and "prior pass with" not in again, again
    assert "Ray" not in again  # nothing to run: no cluster started
    assert json.loads((out / "results.json").read_text())["modes"] == res["modes"]
    assert (root / "pipeline.json").read_text() == summary_text  # the rerun keeps the working run's summary


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
