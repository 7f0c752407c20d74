"""Rows of the benchmark, each run in a fresh Python process, and the JSON file that collects their figures.

A :class:`Row` names a function (``"module:function"``, importable with ``recipes/`` on the path) and the JSON-able
keyword arguments it is called with. :func:`run_rows` runs every row in its own process, so that a row's training
peak memory is its own (the resident-set high-water mark of a process only grows, and the allocator keeps what an
earlier row freed), a crash or an out-of-memory kill ends one row only, and the CPU allocator starts clean.

The function returns a dict of figures (see :data:`FIGURES`); it may raise :class:`RowSkipped` when the row cannot
run here (a missing optional package, no model given), which is recorded with its reason, not as a failure. Any
other exception is recorded in the row with its message and traceback, and the next row runs.

After every row the whole results file is written again, atomically (a reader or a Ctrl-C sees the previous file or
the new one, never part of it); ``resume=True`` skips the rows already finished with the same arguments.

``jobs=N`` runs N rows at the same time, each in its own process. Rows that depend on each other share a *lane*
(:attr:`Row.lane`): a lane's rows run one after another in their given order, on one worker, and the workers take
whole lanes in the order of their first rows. A lane with an :attr:`Row.exclusive` row runs alone: it starts when
nothing else runs, and nothing starts beside it. Only the calling process writes the results file.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["FIGURES", "RESULTS_FILE", "Lane", "Row", "RowSkipped", "TrainingPeak", "lanes", "load_results",
           "run_rows", "save_results"]

#: the file of a run folder that holds every row's figures
RESULTS_FILE = "results.json"
RESULTS_FORMAT = 1
#: the figures a row function may return, with their meaning (extra keys are kept as they are)
FIGURES = {
    "quality": "the row's quality figure (accuracy in %, or perplexity): see quality_name and higher_is_better",
    "quality_name": "what quality is, e.g. 'accuracy' or 'perplexity'",
    "higher_is_better": "whether a larger quality is better",
    "train_peak_mb": "training peak memory: RSS high-water mark of the row's training phase minus the RSS before it",
    "train_peak_rss_mb": "RSS high-water mark of the training phase, absolute",
    "step_time_s": "wall time per training step",
    "latency_b1_ms": "inference time per row, rows one at a time",
    "latency_b32_ms": "inference time of a batch of 32 rows",
    "ref_latency_b1_ms": "the same for the track's dense model, timed in alternation with the row's model",
    "ref_latency_b32_ms": "the same for the track's dense model at batch 32",
    "params": "parameters of the model that runs inference",
    "trainable_params": "parameters the row trains",
    "artifact_mb": "size of what the row saves for deployment",
}
_STDERR_TAIL = 3000
_CHILD_CODE = "import sys; from bench.harness import _child_main; sys.exit(_child_main(sys.argv[1:]))"
#: how often a row's process is checked while other rows run (a stopped run ends its rows within this time)
_POLL_S = 0.2


class RowSkipped(Exception):  # noqa: N818 - a skip, not an error
    """Raised by a row function that cannot run in this environment; the message says why and what would run it."""


@dataclass(frozen=True)
class Row:
    """One configuration of a track: ``function(**kwargs)`` returns its figures.

    Attributes:
        track: ``encoder``, ``decoder`` or ``scaling``.
        group: the table the row belongs to within its track (a task, or the model family).
        method: the row's label in the tables and plots.
        function: ``"module:function"`` run in the measuring process.
        kwargs: JSON-able keyword arguments of ``function``.
        seed: the seed of this repetition (rows of one method and group with different seeds are averaged).
        baseline: the row the ratios of its group are taken against (full fine-tuning, the dense model).
        timeout_s: how long the row may run.
        lane: rows of one lane never run at the same time, and run in their given order (rows that share a cached
            start or read another row's output); ``None``: the row's track, every row of the track in one lane.
        exclusive: the row's lane runs alone, with no other row beside it (rows whose memory or timings would
            suffer from a neighbour).
    """

    track: str
    group: str
    method: str
    function: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    baseline: bool = False
    timeout_s: float = 6 * 3600.0
    lane: str | None = None
    exclusive: bool = False

    def __post_init__(self) -> None:
        module, sep, name = self.function.partition(":")
        if not (module and sep and name):
            raise ValueError(f"Row.function must look like 'module:function', got {self.function!r}")
        json.dumps(self.kwargs)  # a row is described in JSON to its process

    @property
    def id(self) -> str:
        """``track/group/method[/seedN]``: the row's key in the results file."""
        parts = [self.track, self.group, self.method]
        if self.seed is not None:
            parts.append(f"seed{self.seed}")
        return "/".join(parts)

    @property
    def lane_key(self) -> str:
        """The row's lane: :attr:`lane`, or its track."""
        return self.lane or self.track


@dataclass
class Lane:
    """Rows that run one after another on one worker, in this order; ``exclusive``: with nothing beside them."""

    key: str
    rows: list[Row]
    exclusive: bool = False


def lanes(rows: Iterable[Row]) -> list[Lane]:
    """``rows`` grouped by :attr:`Row.lane_key`: lanes in the order of their first row, each lane's rows in their
    given order; a lane is exclusive when one of its rows is."""
    grouped: dict[str, Lane] = {}
    for row in rows:
        lane = grouped.setdefault(row.lane_key, Lane(row.lane_key, []))
        lane.rows.append(row)
        lane.exclusive = lane.exclusive or row.exclusive
    return list(grouped.values())


# --------------------------------------------------------------------------------------------------------
# Measurements taken inside a row's process
# --------------------------------------------------------------------------------------------------------


class TrainingPeak:
    """The RSS high-water mark of a block of code, minus the RSS when it starts (Linux resets the mark at the
    start through ``/proc/self/clear_refs``; elsewhere the mark may include what came before).

    ``with TrainingPeak() as peak: train(...)`` then ``peak.figures()``: ``train_peak_mb``, ``train_peak_rss_mb``.
    """

    def __init__(self) -> None:
        self.baseline_mb = self.peak_mb = float("nan")
        self.seconds = float("nan")
        self.reset = False

    def __enter__(self) -> TrainingPeak:
        import gc

        from common.memory import reset_peak_rss, rss_mb  # the subprocess measurement's own readings

        gc.collect()
        self.baseline_mb = rss_mb()
        self.reset = reset_peak_rss()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        from common.memory import peak_rss_mb

        self.peak_mb = peak_rss_mb()
        self.seconds = time.perf_counter() - self._start

    @property
    def increase_mb(self) -> float:
        return self.peak_mb - self.baseline_mb

    def figures(self, steps: int | None = None) -> dict[str, Any]:
        """``train_peak_mb``, ``train_peak_rss_mb`` and, given the steps trained, ``step_time_s`` (the block's wall
        time per step)."""
        figures: dict[str, Any] = {"train_peak_mb": round(self.increase_mb, 1),
                                   "train_peak_rss_mb": round(self.peak_mb, 1)}
        if steps:
            figures["step_time_s"] = self.seconds / steps
        if not self.reset:
            figures["train_peak_note"] = "high-water mark not reset: it may include loading"
        return figures


def latency_figures(model: Any, batch_32: Mapping[str, Any], rows_1: Sequence[Mapping[str, Any]],
                    reference: Any = None, rounds: int = 3) -> dict[str, float]:
    """Inference time of ``model`` on one batch of 32 rows (``latency_b32_ms``) and per row on ``rows_1`` run one at
    a time (``latency_b1_ms``), medians of ``rounds`` passes; with ``reference`` (the track's dense model), its
    times too (``ref_latency_*``), measured in alternation with the model's so that a change of machine load hits
    both alike."""
    from common.latency import interleaved_pass_latency

    models = {"model": model} if reference is None or reference is model else {"model": model, "reference": reference}
    b32 = interleaved_pass_latency(models, [batch_32], rounds=rounds)
    b1 = interleaved_pass_latency(models, list(rows_1), rounds=rounds)
    figures = {"latency_b32_ms": 1e3 * b32["model"].median_s, "latency_b1_ms": 1e3 * b1["model"].median_s / len(rows_1)}
    if reference is model:
        figures.update(ref_latency_b32_ms=figures["latency_b32_ms"], ref_latency_b1_ms=figures["latency_b1_ms"])
    elif reference is not None:
        figures.update(ref_latency_b32_ms=1e3 * b32["reference"].median_s,
                       ref_latency_b1_ms=1e3 * b1["reference"].median_s / len(rows_1))
    return figures


# --------------------------------------------------------------------------------------------------------
# The results file
# --------------------------------------------------------------------------------------------------------


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The results file at ``path``, or an empty one when there is none.

    Raises:
        ValueError: the file exists but is not a results file of this benchmark.
    """
    path = Path(path)
    if not path.is_file():
        return {"format": RESULTS_FORMAT, "rows": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path} is not a benchmark results file ({exc}); give another --out") from exc
    if not isinstance(data, dict) or not isinstance(data.get("rows"), dict):
        raise ValueError(f"{path} is not a benchmark results file (no 'rows' mapping); give another --out")
    return data


def save_results(path: str | os.PathLike[str], results: Mapping[str, Any]) -> None:
    """Write the whole results file atomically (a temporary file beside it, then one rename)."""
    from compress.export import write_text_atomically

    write_text_atomically(path, json.dumps(results, indent=1, default=str) + "\n")


def _finished(record: Mapping[str, Any] | None, row: Row) -> bool:
    """A row done in an earlier run with the same arguments (a failed row runs again)."""
    return (record is not None and record.get("status") in ("ok", "skipped")
            and record.get("function") == row.function and record.get("kwargs") == row.kwargs)


def run_rows(rows: Iterable[Row], path: str | os.PathLike[str], *, resume: bool = False,
             settings: Mapping[str, Any] | None = None, threads: int | None = None, progress: bool = True,
             runner: Callable[[Row, int | None], dict[str, Any]] | None = None, jobs: int = 1) -> dict[str, Any]:
    """Run ``rows``, each in a fresh process, writing the results file at ``path`` after each.

    Args:
        rows: the rows, in the order to run them.
        path: the results file (JSON); its other rows are kept.
        resume: skip the rows the file holds as finished (``ok`` or ``skipped``) with the same function and
            arguments; without it every row runs again.
        settings: the run's options, stored in the file.
        threads: torch threads in each row's process (``None``: torch's default).
        progress: a progress bar over the rows.
        runner: what runs one row and returns its record (default: a fresh process whose output, progress bars
            included, goes to ``logs/<row>.log`` beside ``path``; tests pass their own). With ``jobs > 1`` it is
            called from worker threads.
        jobs: rows run at the same time. 1: one after another, in the given order. More: the rows' lanes
            (:func:`lanes`) are run by ``jobs`` workers, each lane's rows in order on one worker, an exclusive lane
            alone; every record notes ``jobs``.

    Returns:
        The results (also written to ``path``). A ``KeyboardInterrupt`` (Ctrl-C, or a row's process ended by
        SIGINT while other rows run) stops the run: no row starts, the running rows' processes are killed and
        not recorded, and the interrupt is raised again; the rows finished so far are in the file. Another error
        (e.g. the results file cannot be written) stops the run the same way.
    """
    from tqdm.auto import tqdm

    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    rows = list(rows)
    ids = [row.id for row in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate rows: {sorted({i for i in ids if ids.count(i) > 1})}")
    results = load_results(path)
    results["format"] = RESULTS_FORMAT
    if settings is not None:
        results["settings"] = dict(settings)
    stop = threading.Event()  # set when a run of several jobs stops: no row starts, running processes are killed
    if runner is None:
        runner = functools.partial(run_in_subprocess, log_dir=Path(path).parent / "logs",
                                   stop=stop if jobs > 1 else None)
    todo = [row for row in rows if not (resume and _finished(results["rows"].get(row.id), row))]
    if len(todo) < len(rows):
        logger.warning("--resume: %d of %d rows already finished in %s", len(rows) - len(todo), len(rows), path)
    save_results(path, results)

    def store(row: Row, record: dict[str, Any]) -> None:
        results["rows"][row.id] = {**record, "jobs": jobs}
        save_results(path, results)
        if record["status"] == "failed":
            logger.warning("%s failed: %s", row.id, record.get("error", "").splitlines()[-1:] or "")
        elif record["status"] == "skipped":
            logger.warning("%s skipped: %s", row.id, record.get("reason", ""))

    if jobs == 1:
        bar = tqdm(todo, desc="benchmark rows", unit="row", disable=not progress, dynamic_ncols=True)
        for row in bar:
            bar.set_postfix_str(row.id, refresh=True)
            store(row, runner(row, threads))
        return results
    with tqdm(total=len(todo), desc="benchmark rows", unit="row", disable=not progress, dynamic_ncols=True) as bar:
        _run_lanes(lanes(todo), jobs, lambda row: runner(row, threads), store, bar, stop)
    return results


def _run_lanes(todo: list[Lane], jobs: int, run: Callable[[Row], dict[str, Any]],
               store: Callable[[Row, dict[str, Any]], None], bar: Any, stop: threading.Event) -> None:
    """Run the lanes on ``jobs`` worker threads, in order, an exclusive lane alone; ``store`` each record (one
    at a time). Any exception of a worker or of this thread (Ctrl-C) sets ``stop``: no row starts, the running
    rows end (a process run with ``stop`` is killed), and it is raised once every worker has returned."""
    lock = threading.Lock()  # the results, the progress bar and the running rows' ids
    running_rows: dict[str, None] = {}

    def run_lane(lane: Lane) -> None:
        try:
            for row in lane.rows:
                with lock:
                    if stop.is_set():
                        return
                    running_rows[row.id] = None
                    bar.set_postfix_str(", ".join(running_rows), refresh=True)
                try:
                    record = run(row)
                finally:
                    with lock:
                        running_rows.pop(row.id, None)
                with lock:
                    if stop.is_set() and record["status"] == "failed":
                        return  # ended by the run's stop: not a result of the row (it runs again with --resume)
                    store(row, record)
                    bar.update(1)
        except BaseException:
            stop.set()  # before any other worker looks: its lane must not start another row
            raise

    pending = deque(todo)
    running: dict[Future, Lane] = {}
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="benchmark-lane")
    try:
        while pending or running:
            while (pending and not stop.is_set() and len(running) < jobs
                   and not any(other.exclusive for other in running.values())
                   and not (pending[0].exclusive and running)):
                lane = pending.popleft()
                running[pool.submit(run_lane, lane)] = lane
            if stop.is_set() and not running:
                break
            done, _ = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
            for future in done:
                del running[future]
                future.result()  # a worker's exception (an interrupted row's included) stops the run
    except BaseException:
        stop.set()
        wait(running)
        raise
    finally:
        pool.shutdown(wait=True)


def _record(row: Row, status: str, wall_s: float, **fields: Any) -> dict[str, Any]:
    return {"track": row.track, "group": row.group, "method": row.method, "seed": row.seed, "baseline": row.baseline,
            "function": row.function, "kwargs": row.kwargs, "status": status, "wall_s": round(wall_s, 1),
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **fields}


def _tail(text: str) -> str:
    return text if len(text) <= _STDERR_TAIL else "...\n" + text[-_STDERR_TAIL:]


def log_name(row: Row) -> str:
    """The file name of a row's log: its id with every character but letters, digits, ``-``, ``_`` and ``.``
    replaced."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in row.id) + ".log"


def run_in_subprocess(row: Row, threads: int | None = None, log_dir: str | os.PathLike[str] | None = None,
                      stop: threading.Event | None = None) -> dict[str, Any]:
    """Run one row in a fresh Python process and return its record (``status`` ``ok``, ``skipped`` or ``failed``).

    The process gets the environment of :func:`common.memory.peak_training_memory`'s children (``recipes/`` and
    this copy of ``compress`` importable, pinned allocator thresholds). Its output and progress bars go to
    ``log_dir/<row>.log`` (follow a long row with ``tail -f``), or a temporary file; a failed row's record keeps
    the log's tail. A ``KeyboardInterrupt`` kills the process and is raised again.

    ``stop`` (given by :func:`run_rows` when rows run at the same time, this one in a worker thread): once it is
    set, the process is killed and ``KeyboardInterrupt`` raised, as when the process itself ends by SIGINT (a
    Ctrl-C reaches every process of the terminal, and the worker may see its row's end before the main thread
    sees the interrupt).
    """
    from common.memory import child_env

    started = time.perf_counter()
    spec = json.dumps({"function": row.function, "kwargs": row.kwargs, "threads": threads})
    with tempfile.TemporaryDirectory(prefix="compress-bench-row-") as tmp:
        result_path = Path(tmp, "result.json")
        log_path = Path(log_dir) / log_name(row) if log_dir is not None else Path(tmp, "row.log")
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w", encoding="utf-8") as log:
            proc = subprocess.Popen([sys.executable, "-c", _CHILD_CODE, spec, str(result_path)],
                                    env=child_env({"COMPRESS_BENCH_ROW": row.id}), stdout=log,
                                    stderr=subprocess.STDOUT)
            try:
                returncode = _wait(proc, row.timeout_s, stop)
            except BaseException:  # Ctrl-C, or the run stopped: the row's process ends with it
                proc.kill()
                proc.wait()
                raise
        if stop is not None and returncode == -signal.SIGINT:
            raise KeyboardInterrupt(f"{row.id}: its process was interrupted")
        output = log_path.read_text(encoding="utf-8", errors="replace")
        wall = time.perf_counter() - started
        if returncode is None:
            return _record(row, "failed", wall, error=f"timed out after {row.timeout_s:g} s",
                           stderr_tail=_tail(output))
        if result_path.is_file():
            outcome = json.loads(result_path.read_text(encoding="utf-8"))
            status = outcome.pop("status")
            if status == "failed":
                outcome["stderr_tail"] = _tail(output)
            return _record(row, status, wall, **outcome)
    return _record(row, "failed", wall, error=f"the row's process ended with exit status {returncode} without a "
                   "result (killed, or out of memory?)", stderr_tail=_tail(output))


def _wait(proc: subprocess.Popen, timeout_s: float, stop: threading.Event | None) -> int | None:
    """The exit status of ``proc``, or ``None`` when it ran longer than ``timeout_s`` (it is then killed);
    ``KeyboardInterrupt`` once ``stop`` is set."""
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        try:
            return proc.wait(timeout=max(remaining, 0.0) if stop is None else max(min(remaining, _POLL_S), 0.0))
        except subprocess.TimeoutExpired:
            if stop is not None and stop.is_set():
                raise KeyboardInterrupt("the run stopped") from None
            if time.monotonic() >= deadline:
                proc.kill()
                proc.wait()
                return None


def _child_main(argv: Sequence[str]) -> int:
    """Entry point of a row's process: ``argv = [spec_json, result_path]``."""
    spec_json, result_path = argv
    spec = json.loads(spec_json)
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    from common.recipe import setup_run

    setup_run()
    try:
        from common.memory import resolve_callable

        figures = resolve_callable(spec["function"])(**spec["kwargs"])
        outcome: dict[str, Any] = {"status": "ok", "figures": _jsonable(figures)}
    except RowSkipped as skip:
        outcome = {"status": "skipped", "reason": str(skip)}
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - recorded in the row; the other rows still run
        outcome = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        logger.error("row failed:\n%s", outcome["traceback"])  # into the row's log too
    outcome["threads"] = torch.get_num_threads()
    Path(result_path).write_text(json.dumps(outcome, default=str), encoding="utf-8")
    return 0 if outcome["status"] != "failed" else 1


def _jsonable(figures: Any) -> dict[str, Any]:
    if not isinstance(figures, Mapping):
        raise TypeError(f"a row function must return a dict of figures, got {type(figures).__name__}")
    return json.loads(json.dumps(dict(figures), default=float))


def run_in_process(row: Row, threads: int | None = None) -> dict[str, Any]:
    """Run one row in this process (tests and debugging; figures of memory are then not the row's own)."""
    started = time.perf_counter()
    try:
        from common.memory import resolve_callable

        figures = resolve_callable(row.function)(**row.kwargs)
        return _record(row, "ok", time.perf_counter() - started, figures=_jsonable(figures))
    except RowSkipped as skip:
        return _record(row, "skipped", time.perf_counter() - started, reason=str(skip))
    except Exception as exc:  # noqa: BLE001
        return _record(row, "failed", time.perf_counter() - started, error=f"{type(exc).__name__}: {exc}",
                       traceback=traceback.format_exc())

