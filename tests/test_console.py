"""The driver's console without Ray: progress, checkpoint and failure lines, the tqdm bar, and
where worker and Ray log records go (`trainer/console.py`)."""

from __future__ import annotations

import io
import logging
import sys

import pytest

from trainer.console import (DriverConsole, _OneLineConsole, checkpoint_event, driver_log, failure_event,
                             failure_summary, format_checkpoint, format_progress, progress_sink, quiet_ray_logging,
                             worker_logging)

REC = {"step": 4, "total_steps": 10, "epoch": 1, "loss": 51.54937, "lr": 2.07e-4, "samples_per_s": 75.4,
       "skipped_samples": 0, "eta_s": 72.0, "time": 1.0, "epoch_progress": 0.5}
EVAL = {"step": 10, "epoch": 1, "map_c": 29.976, "map_o": 40.118, "num_valid": 31, "ema_map_c": 27.661,
        "ema_map_o": 38.327, "skipped_samples": 0}


def test_progress_line_has_step_of_total_rate_and_eta():
    line = format_progress(REC)
    assert line == "step 4/10 | epoch 1 | loss 51.5494 | lr 2.07e-04 | 75 samples/s | ETA 01:12"
    long = format_progress({**REC, "eta_s": 2 * 86400 + 3723, "skipped_samples": 3})
    assert "ETA 49:02:03" in long and long.endswith("| 3 corrupt samples skipped")


def test_checkpoint_lines_name_the_eval_and_the_folder():
    assert format_checkpoint({"step": 3, "epoch": 0}, "/r/x/checkpoint_00000003") == [
        "checkpoint at step 3: /r/x/checkpoint_00000003"]
    ev, where = format_checkpoint(EVAL, "s3://b/runs/x/checkpoint_00000010")
    assert ev == "eval at step 10 | epoch 1 | mAP(C) 29.98 | mAP(O) 40.12 | EMA mAP(C) 27.66 | EMA mAP(O) 38.33"
    assert where == "checkpoint at step 10: s3://b/runs/x/checkpoint_00000010"


def test_events_from_the_controller():
    # Ray's pyarrow filesystem spells an s3 checkpoint without its scheme: only the name travels
    ev = checkpoint_event([{"step": 3}, {"step": 3}], "bucket/runs/x/checkpoint_00000003")
    assert ev == {"kind": "checkpoint", "name": "checkpoint_00000003", "metrics": {"step": 3}}
    assert checkpoint_event([{"step": 2}], None) is None
    err = RuntimeError("The actor died unexpectedly.\nTraceback (most recent call last):\n  File x\nKilled")
    gloo = RuntimeError("[/pytorch/third_party/gloo/transport/tcp/pair.cc:561] Connection closed by peer "
                        "[127.0.0.1]:1. This is typically caused by a remote worker crashing. Check the logs of the "
                        "remote worker.")
    fail = failure_event({1: err, 0: gloo})
    assert fail["errors"] == {0: "RuntimeError: [/pytorch/third_party/gloo/transport/tcp/pair.cc:561] Connection "
                                 "closed by peer [127.0.0.1]:1.",
                              1: "RuntimeError: The actor died unexpectedly."}
    assert "Traceback" in fail["detail"] and "rank 1" in fail["detail"]


def _console(**kw) -> tuple[DriverConsole, io.StringIO]:
    out = io.StringIO()
    return DriverConsole("/runs/x", out=out, **kw), out


def test_plain_console_prints_one_line_per_event():
    con, out = _console(bar=False, max_failures=1)
    con.handle({"kind": "progress", **REC})
    con.handle({"kind": "checkpoint", "name": "checkpoint_00000004", "metrics": {"step": 4, "epoch": 1}})
    fail = failure_event({1: RuntimeError("worker died\nTraceback (most recent call last):\n  boom")})
    con.handle(fail)
    con.handle(fail)
    con.handle({"kind": "checkpoint", "name": "checkpoint_00000010", "metrics": EVAL})
    lines = out.getvalue().splitlines()
    assert lines[0] == format_progress(REC)
    assert lines[1] == "checkpoint at step 4: /runs/x/checkpoint_00000004"
    assert lines[2].startswith("worker failure 1 (cluster.max_failures=1): rank 1: RuntimeError: worker died; ")
    assert lines[2].endswith("restarts the workers from the checkpoint at step 4")
    assert lines[3].endswith("giving up")
    assert lines[4].startswith("eval at step 10") and lines[5].endswith("/runs/x/checkpoint_00000010")
    assert len(lines) == 6 and "Traceback" not in out.getvalue()
    assert len(con.checkpoints) == 2 and con.failures == 2


def test_terminal_console_draws_a_tqdm_bar_from_the_resumed_step():
    con, out = _console(bar=True, start_step=2)
    for step in (4, 6):
        con.handle({"kind": "progress", **REC, "step": step})
    con.handle({"kind": "checkpoint", "name": "checkpoint_00000006", "metrics": {"step": 6}})
    con.close()
    text = out.getvalue()
    assert "6/10" in text and "samples/s" in text and "step 4/10 |" not in text  # a bar, not plain lines
    assert "checkpoint at step 6: /runs/x/checkpoint_00000006\n" in text


class _Channel:
    def __init__(self, fail: bool = False):
        self.items, self.fail = [], fail

    def put(self, item, block=True):
        if self.fail:
            raise ConnectionError("queue actor gone")
        self.items.append(item)


def test_progress_sink_tags_records_and_never_raises():
    progress_sink(None)(REC)
    ch = _Channel()
    progress_sink(ch)(REC)
    assert ch.items == [{"kind": "progress", **REC}]
    progress_sink(_Channel(fail=True))(REC)  # a lost line must not stop training


def test_worker_logging_writes_the_rank_file_and_the_traceback(tmp_path):
    root = logging.getLogger()
    level, before = root.level, list(root.handlers)
    root.setLevel(logging.INFO)  # as Ray Train sets it in a worker
    try:
        with pytest.raises(ValueError):
            with worker_logging(str(tmp_path), 1) as path:
                print_like = logging.getLogger("some.lib")
                print_like.info("step 2/6 | 75 samples/s")
                logging.getLogger("DeepSpeed").warning("Setting accelerator to CPU")
                raise ValueError("bad batch")
    finally:
        root.setLevel(level)
    assert path == str(tmp_path / "logs" / "rank1.log")
    text = (tmp_path / "logs" / "rank1.log").read_text()
    assert "rank 1 (pid" in text and "step 2/6" in text and "Setting accelerator" in text
    assert "rank 1 failed" in text and "Traceback" in text and "ValueError: bad batch" in text
    assert root.handlers == before
    with worker_logging("s3://bucket/runs/x", 0) as remote:
        assert remote is None


def test_a_failure_before_any_checkpoint_restarts_from_the_start():
    con, out = _console(bar=False, max_failures=-1)
    con.handle(failure_event({0: RuntimeError("boom")}))
    assert out.getvalue() == ("worker failure 1 (cluster.max_failures=unlimited): rank 0: RuntimeError: boom; "
                              "Ray Train restarts the workers from the start\n")


@pytest.fixture
def fake_ray_logger():
    """A logger shaped like Ray's ("ray.*", its own console handler, no propagation), removed after."""
    lg = logging.getLogger("ray.csl_console_test")
    lg.handlers, lg.propagate, lg.level = [logging.StreamHandler(sys.stderr)], False, logging.INFO
    yield lg
    lg.handlers, lg.propagate, lg.level = [], True, logging.NOTSET


def test_ray_records_keep_one_line_on_the_console_and_all_in_driver_log(fake_ray_logger, tmp_path, capsys):
    import ray._private.worker as rw

    pushed = ("A worker died or was killed while executing a task by an unexpected system error. To troubleshoot "
              "the problem, check the logs for the dead worker. Worker PID: 25436 Worker exit type: SYSTEM_ERROR")
    printer = rw.print_to_stdstream
    saved = {n: list(lg.handlers) for n, lg in logging.root.manager.loggerDict.items()
             if isinstance(lg, logging.Logger) and (n == "ray" or n.startswith("ray."))}
    try:
        quiet_ray_logging()
        quiet_ray_logging()  # idempotent
        assert [type(h) for h in fake_ray_logger.handlers] == [_OneLineConsole]
        with driver_log(str(tmp_path / "logs" / "driver.log")):
            fake_ray_logger.info("Started a local Ray instance.")
            try:
                raise KeyError("gcs")
            except KeyError:
                fake_ray_logger.exception("placement group cleaner failed\nsecond line")
            # what Ray's listener thread does with a message the cluster pushes to the driver
            rw.print_to_stdstream({"lines": [pushed], "pid": "raylet", "is_err": False}, ignore_prefix=False)
        fake_ray_logger.warning("after the run")
    finally:
        rw.print_to_stdstream = printer
        for name, handlers in saved.items():
            logging.getLogger(name).handlers = handlers
    out, err = capsys.readouterr()
    assert err.splitlines() == ["ray error: placement group cleaner failed",
                                "ray warning: A worker died or was killed while executing a task by an unexpected "
                                "system error.",
                                "ray warning: after the run"]
    assert out == ""
    text = (tmp_path / "logs" / "driver.log").read_text()
    assert "Started a local Ray instance." in text and "Traceback" in text and "KeyError: 'gcs'" in text
    assert "Worker exit type: SYSTEM_ERROR" in text and "after the run" not in text


class _WorkerGroupError(Exception):
    """Shaped like ray.train.WorkerGroupError: a text holding every rank's traceback."""

    def __init__(self, failures: dict[int, BaseException]):
        texts = "\n".join(f"Traceback ...\n{e}" for e in failures.values())
        super().__init__("Training failed due to worker errors:\n" + texts)
        self.worker_failures = failures


def test_failure_summary_is_one_line_and_the_driver_log_has_it_all(tmp_path):
    err = _WorkerGroupError({0: ValueError("shard 3 unreadable\nTraceback (most recent call last):\n  File y")})
    with driver_log(str(tmp_path / "driver.log")):
        line = failure_summary(err)
    assert line == "rank 0: ValueError: shard 3 unreadable"
    assert "Training failed due to worker errors" in (tmp_path / "driver.log").read_text()
    assert failure_summary(RuntimeError("controller lost\nmore")) == "RuntimeError: controller lost"
