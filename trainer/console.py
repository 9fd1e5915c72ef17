"""The console of `csl train`, `pipeline` and `demo`: the driver's own lines; the rest to files.

Someone watching a run wants to know where it is and whether it is healthy: run start or
resume, one progress line per log interval (step/total, samples/s, ETA; a tqdm bar on a
terminal), checkpoints and evaluations, a worker failure in one line. Ray's stream of worker
output buried those lines, so by default (`--verbose` restores the stream):

- Progress: rank 0 puts each log-step record on a `ray.util.queue.Queue` the driver drains.
  Not `ray.train.report`: every report is a barrier through Ray Train's sync actor, and a
  worker's report queue holds one item that the controller drains every 2 s
  (`RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`), so reporting at log steps stalls training whenever
  they come faster than that. The put costs one small RPC on rank 0 at log steps only.
- Checkpoints, evaluations, failures: a Ray Train `UserCallback` on the same queue. It runs in
  the Train controller (an actor, not the driver) when Ray has *registered* a checkpoint, so
  the line never announces one a crash could still lose.
- Worker output: `log_to_driver=False`; each rank's Python logging (its `print`s, which Ray
  Train routes to the root logger, Ray Train's and DeepSpeed's loggers, warnings) also goes
  to `{run_dir}/logs/rank{r}.log` when the run folder is a file system path. An object store
  cannot be appended to, so with `s3://` runs the logs stay where Ray keeps every worker's
  output (the session log folder on each node), and the driver prints that place once. What
  bypasses Python (C++ warnings of torch, gloo, NCCL) is only there in either case.
- Ray's own records on the driver (the "ray" loggers): INFO goes to the run's `driver.log`
  only; WARNING and above keep one line on the console, their tracebacks in the file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from typing import Any, Callable, Iterator, Optional, TextIO

__all__ = ["format_progress", "format_checkpoint", "checkpoint_event", "failure_event", "failure_summary",
           "DriverConsole", "console_callback", "progress_sink", "worker_logging", "quiet_ray_logging", "driver_log",
           "ray_log_dir"]

_LOG = logging.getLogger(__name__)
_LOG.addHandler(logging.NullHandler())  # the library idiom: never Python's last-resort stderr printer
_POLL_S = 1.0  # the driver waits this long on the queue: how late a stop is noticed, not a line


def _interval(seconds: float) -> str:
    from tqdm import tqdm

    return tqdm.format_interval(max(0.0, seconds))


def format_progress(rec: dict[str, Any]) -> str:
    """One progress line from rank 0's log-step record (the fields of `metrics.jsonl`, plus
    `total_steps` and `eta_s`)."""
    parts = [f"step {rec['step']}/{rec['total_steps']}", f"epoch {rec.get('epoch', 0)}"]
    if rec.get("loss") is not None:
        parts.append(f"loss {rec['loss']:.4f}")
    if rec.get("lr") is not None:
        parts.append(f"lr {rec['lr']:.2e}")
    parts.append(f"{rec.get('samples_per_s', 0):.0f} samples/s")
    if rec.get("eta_s") is not None:
        parts.append(f"ETA {_interval(rec['eta_s'])}")
    if rec.get("skipped_samples"):
        parts.append(f"{rec['skipped_samples']} corrupt samples skipped")
    return " | ".join(parts)


def format_checkpoint(metrics: dict[str, Any], path: str) -> list[str]:
    """The lines for one registered checkpoint: its evaluation when it closes an epoch, then where."""
    lines = []
    if "map_c" in metrics:
        ev = f"eval at step {metrics.get('step')} | epoch {metrics.get('epoch', 0)} | " \
             f"mAP(C) {metrics['map_c']:.2f} | mAP(O) {metrics['map_o']:.2f}"
        if "ema_map_c" in metrics:
            ev += f" | EMA mAP(C) {metrics['ema_map_c']:.2f} | EMA mAP(O) {metrics['ema_map_o']:.2f}"
        if metrics.get("skipped_samples"):
            ev += f" | {metrics['skipped_samples']} corrupt samples skipped"
        lines.append(ev)
    lines.append(f"checkpoint at step {metrics.get('step')}: {path}")
    return lines


def _gist(text: str, limit: int = 160) -> str:
    """The first line of a message; when that is long, its first sentence (Ray's messages run to
    a paragraph per line), else its first `limit` characters."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if len(line) <= limit:
        return line
    end = re.search(r"[.!?](\s|$)", line)
    return line[:end.end()].strip() if end and end.end() <= limit else line[:limit - 3] + "..."


def checkpoint_event(metrics: list[dict[str, Any]], checkpoint_path: Optional[str]) -> Optional[dict[str, Any]]:
    """What the controller sends for a report: rank 0's metrics and the checkpoint folder's name
    (the driver joins it to the run folder, which spells remote paths with their scheme)."""
    if checkpoint_path is None:
        return None
    return {"kind": "checkpoint", "name": checkpoint_path.rstrip("/").rsplit("/", 1)[-1],
            "metrics": dict(metrics[0]) if metrics else {}}


def failure_event(worker_exceptions: dict[int, BaseException]) -> dict[str, Any]:
    """One line per failed rank for the console; the full texts (tracebacks) for driver.log."""
    errors = {int(r): f"{type(e).__name__}: {_gist(str(e))}" for r, e in sorted(worker_exceptions.items())}
    detail = "\n".join(f"rank {r}: {type(e).__name__}: {e}" for r, e in sorted(worker_exceptions.items()))
    return {"kind": "failure", "errors": errors, "detail": detail}


def failure_summary(error: BaseException) -> str:
    """`fit()`'s error on one line (each failed rank's gist, or the controller's), after writing
    it in full, tracebacks included, to the driver's log."""
    _LOG.error("training failed", exc_info=error)
    failures = getattr(error, "worker_failures", None)
    if failures:
        return "; ".join(f"rank {r}: {e}" for r, e in failure_event(failures)["errors"].items())
    cause = getattr(error, "controller_failure", None) or error
    return f"{type(cause).__name__}: {_gist(str(cause))}"


class DriverConsole:
    """Prints one training run's lines on the driver, from the events the workers and the Train
    controller put on its queue. `handle` is the whole behaviour (tests call it without Ray);
    `start` / `close` add the queue and the thread that drains it while `fit()` blocks."""

    def __init__(self, run_dir: str, *, start_step: int = 0, max_failures: int = 0, bar: Optional[bool] = None,
                 out: Optional[TextIO] = None):
        self.run_dir, self.start_step, self.max_failures = run_dir, start_step, max_failures
        self.out = out or sys.stdout
        self.use_bar = self.out.isatty() if bar is None else bar
        self.checkpoints: list[dict[str, Any]] = []
        self.checkpoint_step = start_step  # where a restart after a failure resumes
        self.failures = 0
        self._bar: Any = None
        self._queue: Any = None
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()

    def line(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.out)
        else:
            print(text, file=self.out, flush=True)

    def handle(self, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        if kind == "progress":
            self._progress(event)
        elif kind == "checkpoint":
            self.checkpoints.append(event)
            self.checkpoint_step = event["metrics"].get("step", self.checkpoint_step)
            from data_shards.storage import join

            for text in format_checkpoint(event["metrics"], join(self.run_dir, event["name"])):
                self.line(text)
        elif kind == "failure":
            self.failures += 1
            _LOG.info("worker failure %d:\n%s", self.failures, event.get("detail", ""))
            retried = self.max_failures < 0 or self.failures <= self.max_failures
            limit = "unlimited" if self.max_failures < 0 else str(self.max_failures)
            where = f"the checkpoint at step {self.checkpoint_step}" if self.checkpoint_step else "the start"
            then = f"Ray Train restarts the workers from {where}" if retried else "giving up"
            ranks = "; ".join(f"rank {r}: {e}" for r, e in event["errors"].items())
            self.line(f"worker failure {self.failures} (cluster.max_failures={limit}): {ranks}; {then}")

    def _progress(self, rec: dict[str, Any]) -> None:
        if not self.use_bar:
            self.line(format_progress(rec))
            return
        from tqdm import tqdm

        if self._bar is None:
            # tqdm's rate and ETA then count this run's steps only, not the resumed ones
            self._bar = tqdm(total=rec["total_steps"], initial=self.start_step, unit="step", file=self.out,
                             dynamic_ncols=True, desc="train")
        self._bar.set_postfix_str(f"epoch {rec.get('epoch', 0)}, loss {rec.get('loss', float('nan')):.4f}, "
                                  f"{rec.get('samples_per_s', 0):.0f} samples/s", refresh=False)
        self._bar.update(max(0, rec["step"] - self._bar.n))

    def start(self) -> Any:
        """Create the queue (an actor that reserves no CPU) and drain it in a thread; returns it,
        for the workers' `progress_sink` and the controller's `console_callback`. The queue is
        pinned to this driver's node: anywhere else, losing that node would silence the console
        (the failure line and all progress after it) while training went on."""
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
        self._queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
        self._thread = threading.Thread(target=self._drain, name="csl-console", daemon=True)
        self._thread.start()
        return self._queue

    def _drain(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                event = self._queue.get(block=True, timeout=_POLL_S)
            except Empty:
                continue
            except Exception as e:  # the console never stops a run: note it, keep training
                _LOG.warning("console queue unreadable, progress lines stop here: %s", e)
                return
            try:
                self.handle(event)
            except Exception:
                _LOG.exception("console: could not print %r", event)

    def close(self) -> None:
        """Stop the thread, print what is still queued (every put happened before `fit()`
        returned: the callback's and rank 0's puts wait for the queue to take them)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._queue is not None:
            from ray.util.queue import Empty

            try:
                while True:
                    self.handle(self._queue.get(block=False))
            except Empty:
                pass
            except Exception as e:
                _LOG.info("console queue: %s", e)
            with contextlib.suppress(Exception):
                self._queue.shutdown(force=True)
            self._queue = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def console_callback(channel: Any) -> Any:
    """A Ray Train `UserCallback` that puts registered checkpoints and worker failures on
    `channel`. Built on first use: `ray.train` takes seconds to import, and nothing else here
    needs it."""
    from ray.train import UserCallback

    class ConsoleCallback(UserCallback):
        def __init__(self, channel: Any):
            self.channel = channel

        def after_report(self, run_context, metrics, checkpoint) -> None:
            event = checkpoint_event(metrics, checkpoint.path if checkpoint is not None else None)
            if event is not None:
                _put(self.channel, event)

        def after_exception(self, run_context, worker_exceptions) -> None:
            _put(self.channel, failure_event(worker_exceptions))

    return ConsoleCallback(channel)


def _put(channel: Any, event: dict[str, Any]) -> None:
    try:
        channel.put(event, block=False)
    except Exception as e:  # a lost console line must never fail training
        _LOG.warning("console queue: %s", e)


def progress_sink(channel: Any) -> Callable[[dict[str, Any]], None]:
    """Rank 0's progress hook: each log-step record to the driver, or nowhere without a channel."""
    if channel is None:
        return lambda rec: None

    def put(rec: dict[str, Any]) -> None:
        _put(channel, {"kind": "progress", **rec})

    return put


_WORKER_LOGGERS = ("", "ray.train", "DeepSpeed")  # root, and the two that do not propagate to it


@contextlib.contextmanager
def worker_logging(run_dir: str, rank: int) -> Iterator[Optional[str]]:
    """Inside a Ray Train worker: this rank's Python logging also to `{run_dir}/logs/rank{r}.log`
    (appended: a restarted or resumed rank adds to its history); yields the path, or None for a
    remote run folder. A failure's traceback is written there before Ray takes the exception."""
    from data_shards.storage import is_remote

    if is_remote(run_dir):
        yield None
        return
    folder = os.path.join(run_dir, "logs")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"rank{rank}.log")
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    loggers = [logging.getLogger(name) for name in _WORKER_LOGGERS]
    for lg in loggers:
        lg.addHandler(handler)
    logging.captureWarnings(True)
    _LOG.info("rank %d (pid %d) starts", rank, os.getpid())
    try:
        yield path
    except BaseException:
        _LOG.exception("rank %d failed", rank)
        raise
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
        handler.close()


class _OneLineConsole(logging.StreamHandler):
    """Ray's console handler, quieted: WARNING and above, one line each, no traceback. Writes to
    `sys.stderr` as it is at emit time (as Ray's own handler does), and keeps its own format when
    `ray.init` re-formats the "ray" logger's handlers."""

    def __init__(self) -> None:
        super().__init__()
        self.setLevel(logging.WARNING)

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:
        pass

    def setFormatter(self, fmt: Optional[logging.Formatter]) -> None:
        pass

    def format(self, record: logging.LogRecord) -> str:
        return f"ray {record.levelname.lower()}: {_gist(record.getMessage())}"


def _ray_loggers() -> list[logging.Logger]:
    names = [n for n in list(logging.root.manager.loggerDict) if n == "ray" or n.startswith("ray.")]
    return [lg for lg in map(logging.getLogger, ["ray", *names]) if lg.handlers]


def quiet_ray_logging() -> None:
    """Replace the console handlers of Ray's loggers on this process by `_OneLineConsole`, and
    turn the messages Ray pushes to the driver into "ray" records (see `_route_pushed_errors`).
    Idempotent; call again after importing a Ray library that configures its own logger."""
    _route_pushed_errors()
    for lg in _ray_loggers():
        for h in list(lg.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, (logging.FileHandler, _OneLineConsole)):
                lg.removeHandler(h)
                if not any(isinstance(x, _OneLineConsole) for x in lg.handlers):
                    lg.addHandler(_OneLineConsole())


def _route_pushed_errors() -> None:
    """Messages the cluster pushes to this driver ("A worker died or was killed ...", a task
    killed for memory) bypass logging: Ray's listener thread prints them, a paragraph each,
    through `ray._private.worker.print_to_stdstream`, which it looks up at each message. Routed
    to the "ray" logger they get one line on the console and their full text in driver.log.
    Private to Ray: tests/test_console.py fails if the name goes away."""
    import ray._private.worker as rw

    original = rw.print_to_stdstream
    if getattr(original, "_csl_routed", False):
        return

    def route(data: dict[str, Any], ignore_prefix: bool) -> None:
        if data.get("pid") != "raylet":
            original(data, ignore_prefix)
            return
        for line in data.get("lines", []):
            logging.getLogger("ray").warning("%s", line)

    route._csl_routed = True  # type: ignore[attr-defined]
    rw.print_to_stdstream = route


@contextlib.contextmanager
def driver_log(path: str) -> Iterator[str]:
    """While training: the driver's Ray records (INFO and up, with tracebacks) and the failure
    details to `path`, a local file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    loggers = [*_ray_loggers(), _LOG]
    level = _LOG.level
    _LOG.setLevel(logging.INFO)
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield path
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
        _LOG.setLevel(level)
        handler.close()


def ray_log_dir() -> str:
    """This node's Ray log folder (every node keeps its workers' output in its own)."""
    try:
        import ray._private.worker as rw

        node = rw._global_node
        if node is not None:
            return os.path.join(node.get_session_dir_path(), "logs")
    except (ImportError, AttributeError):
        pass
    return "/tmp/ray/session_latest/logs"
