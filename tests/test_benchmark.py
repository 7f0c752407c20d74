"""recipes/benchmark.py and its package recipes/bench: rows run one by one into an atomically rewritten results file,
--resume, failing and skipped rows, rows run side by side in lanes (--jobs), the tables' ratios, Pareto fronts, the
plots; the --quick run on tiny models."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench import harness, report
from bench.harness import Row, RowSkipped, load_results, run_in_process, run_rows

ROOT = Path(__file__).resolve().parents[1]
CALLS: list[str] = []


# ---- stub rows (importable by a row's process as tests.test_benchmark:...) ------------------------------------


def stub_row(name: str, quality: float = 80.0, memory: float = 100.0, latency: float = 10.0) -> dict:
    CALLS.append(name)
    return {"quality": quality, "quality_name": "accuracy", "higher_is_better": True, "train_peak_mb": memory,
            "latency_b32_ms": latency, "latency_b1_ms": latency / 10, "params": 1000}


def failing_row(name: str) -> dict:
    CALLS.append(name)
    raise RuntimeError(f"{name} broke")


def skipped_row(name: str) -> dict:
    CALLS.append(name)
    raise RowSkipped("no model here: give --decoder-model")


def dying_row(name: str) -> dict:
    os._exit(3)  # the process ends without a result, as an out-of-memory kill would


def sleeping_row(name: str, marker: str, seconds: float = 300.0) -> dict:
    Path(marker).write_text(str(os.getpid()))  # the row's process is running
    time.sleep(seconds)
    return stub_row(name)


def interrupted_row(name: str) -> dict:
    os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C reaches the row's process
    time.sleep(60)
    return stub_row(name)


def _row(method: str, function: str = "stub_row", seed: int | None = None, baseline: bool = False, **kwargs) -> Row:
    return Row(track="encoder", group="task", method=method, function=f"tests.test_benchmark:{function}",
               kwargs={"name": method, **kwargs}, seed=seed, baseline=baseline)


@pytest.fixture(autouse=True)
def _clear_calls():
    CALLS.clear()


def test_a_failing_row_is_recorded_with_its_error_and_the_others_run(tmp_path):
    path = tmp_path / "results.json"
    rows = [_row("full", baseline=True), _row("broken", "failing_row"), _row("absent", "skipped_row"), _row("lora")]
    results = run_rows(rows, path, runner=run_in_process, progress=False)
    assert CALLS == ["full", "broken", "absent", "lora"]
    records = load_results(path)["rows"]
    assert records == results["rows"]
    assert [records[r.id]["status"] for r in rows] == ["ok", "failed", "skipped", "ok"]
    assert records["encoder/task/broken"]["error"] == "RuntimeError: broken broke"
    assert "Traceback" in records["encoder/task/broken"]["traceback"]
    assert records["encoder/task/absent"]["reason"] == "no model here: give --decoder-model"
    assert records["encoder/task/lora"]["figures"]["quality"] == 80.0


def test_resume_skips_finished_rows_and_runs_failed_and_changed_ones(tmp_path):
    path = tmp_path / "results.json"
    run_rows([_row("full"), _row("broken", "failing_row"), _row("lora")], path, runner=run_in_process,
             progress=False)
    CALLS.clear()
    rows = [_row("full"), _row("broken", "failing_row"), _row("lora", quality=70.0)]  # lora's options changed
    run_rows(rows, path, resume=True, runner=run_in_process, progress=False)
    assert CALLS == ["broken", "lora"]
    assert load_results(path)["rows"]["encoder/task/lora"]["figures"]["quality"] == 70.0
    CALLS.clear()
    run_rows(rows[:1], path, resume=False, runner=run_in_process, progress=False)  # without --resume: again
    assert CALLS == ["full"]


def test_an_interrupted_run_keeps_the_finished_rows_in_a_whole_file(tmp_path):
    path = tmp_path / "results.json"

    def runner(row, threads):
        if row.method == "second":
            raise KeyboardInterrupt
        return run_in_process(row, threads)

    with pytest.raises(KeyboardInterrupt):
        run_rows([_row("first"), _row("second"), _row("third")], path, runner=runner, progress=False)
    assert list(json.loads(path.read_text())["rows"]) == ["encoder/task/first"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary file left


def test_the_results_file_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    run_rows([_row("first")], path, runner=run_in_process, progress=False)
    before = path.read_text()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        run_rows([_row("second")], path, runner=run_in_process, progress=False)
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_rows_need_unique_ids_and_a_results_file_of_this_benchmark(tmp_path):
    with pytest.raises(ValueError, match="duplicate rows"):
        run_rows([_row("a"), _row("a")], tmp_path / "r.json", runner=run_in_process, progress=False)
    (tmp_path / "other.json").write_text('{"something": 1}')
    with pytest.raises(ValueError, match="not a benchmark results file"):
        load_results(tmp_path / "other.json")
    with pytest.raises(ValueError, match="module:function"):
        Row(track="t", group="g", method="m", function="no_colon")


# ---- rows side by side: lanes and --jobs ---------------------------------------------------------------------


def _lane_row(method: str, lane: str, function: str = "stub_row", exclusive: bool = False, **kwargs) -> Row:
    return Row(track="encoder", group="task", method=method, function=f"tests.test_benchmark:{function}",
               kwargs={"name": method, **kwargs}, lane=lane, exclusive=exclusive)


class _Timeline:
    """A runner that runs rows in this process and notes when each starts and ends; ``before[method]()`` runs at
    the start of that row (a barrier, a wait, an interrupt)."""

    def __init__(self, before: dict | None = None) -> None:
        self.before = before or {}
        self.events: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def __call__(self, row: Row, threads: int | None) -> dict:
        with self.lock:
            self.events.append(("start", row.method))
        try:
            if row.method in self.before:
                self.before[row.method]()
            return run_in_process(row, threads)
        finally:
            with self.lock:
                self.events.append(("end", row.method))

    def overlaps(self) -> set[frozenset[str]]:
        """The pairs of rows that ran at the same time."""
        active: set[str] = set()
        pairs = set()
        for kind, method in self.events:
            if kind == "start":
                pairs |= {frozenset((method, other)) for other in active}
                active.add(method)
            else:
                active.discard(method)
        return pairs

    def started(self) -> list[str]:
        return [method for kind, method in self.events if kind == "start"]

    def index(self, kind: str, method: str) -> int:
        return self.events.index((kind, method))


def test_jobs_run_lanes_side_by_side_each_lane_in_order_one_row_at_a_time(tmp_path):
    path = tmp_path / "results.json"
    together = threading.Barrier(2, timeout=10)  # a1 and b1 pass it only when both run at the same time
    timeline = _Timeline({"a1": together.wait, "b1": together.wait, "a2": lambda: time.sleep(0.05)})
    rows = [_lane_row("a1", "A"), _lane_row("b1", "B"), _lane_row("a2", "A"), _lane_row("b2", "B"),
            _lane_row("a3", "A")]
    results = run_rows(rows, path, runner=timeline, progress=False, jobs=2)
    assert frozenset(("a1", "b1")) in timeline.overlaps()
    assert not any(pair <= {"a1", "a2", "a3"} or pair <= {"b1", "b2"} for pair in timeline.overlaps())
    started = timeline.started()
    assert [m for m in started if m.startswith("a")] == ["a1", "a2", "a3"]
    assert [m for m in started if m.startswith("b")] == ["b1", "b2"]
    records = load_results(path)["rows"]
    assert records == results["rows"] and set(records) == {row.id for row in rows}
    assert {r["status"] for r in records.values()} == {"ok"} and {r["jobs"] for r in records.values()} == {2}


def test_with_jobs_a_failing_row_does_not_stop_its_lane_or_the_others(tmp_path):
    path = tmp_path / "results.json"
    rows = [_lane_row("a1", "A", "failing_row"), _lane_row("b1", "B", "skipped_row"), _lane_row("a2", "A"),
            _lane_row("b2", "B")]
    run_rows(rows, path, runner=run_in_process, progress=False, jobs=2)
    assert sorted(CALLS) == ["a1", "a2", "b1", "b2"]
    records = load_results(path)["rows"]
    assert {r["method"]: r["status"] for r in records.values()} == {"a1": "failed", "a2": "ok", "b1": "skipped",
                                                                    "b2": "ok"}
    assert records["encoder/task/a1"]["error"] == "RuntimeError: a1 broke"


def test_an_exclusive_lane_runs_alone_and_the_lanes_keep_their_order(tmp_path):
    path = tmp_path / "results.json"
    timeline = _Timeline({"a1": lambda: time.sleep(0.1)})  # time for a neighbour to start, were one allowed
    rows = [_lane_row("a1", "A"), _lane_row("a2", "A"), _lane_row("s1", "S", exclusive=True),
            _lane_row("s2", "S", exclusive=True), _lane_row("b1", "B"), _lane_row("c1", "C")]
    run_rows(rows, path, runner=timeline, progress=False, jobs=2)
    assert not any(pair & {"s1", "s2"} for pair in timeline.overlaps())
    assert timeline.index("end", "a2") < timeline.index("start", "s1") < timeline.index("end", "s1") \
        < timeline.index("start", "s2") < timeline.index("end", "s2") < timeline.index("start", "b1")
    assert timeline.index("end", "s2") < timeline.index("start", "c1")
    assert len(load_results(path)["rows"]) == 6


def test_with_jobs_an_interrupted_row_stops_the_run_and_keeps_the_finished_rows(tmp_path):
    path = tmp_path / "results.json"
    b1_started, interrupted = threading.Event(), threading.Event()

    def interrupt() -> None:
        assert b1_started.wait(10)
        interrupted.set()
        raise KeyboardInterrupt

    def finish_after_the_interrupt() -> None:  # b1 is running when a2 is interrupted, and finishes
        b1_started.set()
        assert interrupted.wait(10)
        time.sleep(0.3)

    timeline = _Timeline({"a2": interrupt, "b1": finish_after_the_interrupt})
    rows = [_lane_row("a1", "A"), _lane_row("a2", "A"), _lane_row("a3", "A"), _lane_row("b1", "B"),
            _lane_row("b2", "B")]
    with pytest.raises(KeyboardInterrupt):
        run_rows(rows, path, runner=timeline, progress=False, jobs=2)
    assert sorted(CALLS) == ["a1", "b1"]  # no row started after the interrupt
    assert sorted(json.loads(path.read_text())["rows"]) == ["encoder/task/a1", "encoder/task/b1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_with_jobs_ctrl_c_in_the_main_thread_stops_the_run_and_keeps_the_finished_rows(tmp_path):
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is handled by something else here")
    path = tmp_path / "results.json"
    b1_started = threading.Event()

    def ctrl_c() -> None:
        b1_started.set()
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
        time.sleep(0.3)

    def finish_later() -> None:  # a1 is running at the Ctrl-C, and finishes
        assert b1_started.wait(10)
        time.sleep(0.3)

    timeline = _Timeline({"b1": ctrl_c, "a1": finish_later})
    rows = [_lane_row("a1", "A"), _lane_row("b1", "B"), _lane_row("a2", "A"), _lane_row("b2", "B")]
    with pytest.raises(KeyboardInterrupt):
        run_rows(rows, path, runner=timeline, progress=False, jobs=2)
    assert sorted(CALLS) == ["a1", "b1"]
    assert sorted(json.loads(path.read_text())["rows"]) == ["encoder/task/a1", "encoder/task/b1"]


def test_lanes_of_the_tracks_keep_dependent_rows_together_in_order(tmp_path):
    from bench import decoder, encoder, scaling
    from bench.harness import lanes

    enc = encoder.rows({**encoder.QUICK, "seeds": 2, "workdir": str(tmp_path)})
    enc_lanes = lanes(enc)
    assert [lane.key for lane in enc_lanes] == ["encoder/SST-2/seed0", "encoder/SST-2/seed1"]
    assert [row.kwargs["method"] for row in enc_lanes[0].rows] == [key for _, key in encoder.METHODS]
    assert all(row.seed == 0 for row in enc_lanes[0].rows) and not any(lane.exclusive for lane in enc_lanes)

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "text.txt").write_text("some text")
    dec = decoder.rows({**decoder.QUICK, "model": str(tmp_path / "model"), "eval_text": str(tmp_path / "text.txt"),
                        "calibration_text": str(tmp_path / "text.txt"), "workdir": str(tmp_path)})
    dec_lanes = {lane.key: [row.kwargs["method"] for row in lane.rows] for lane in lanes(dec)}
    assert dec_lanes.pop("decoder/model/uniform") == ["ours-uniform", "recover-lora"]
    assert all(len(methods) == 1 for methods in dec_lanes.values()) and len(dec_lanes) == 8
    import llm_prune  # Pruning-Adapter's recovery runs beside the uniform lane only while it prunes on its own
    assert ("pruning-adapter" in llm_prune.RECOVERY_METHODS) == ("recover-pa" in decoder.UNIFORM_LANE)

    (scaling_lane,) = lanes(scaling.rows({**scaling.FULL, "workdir": str(tmp_path)}))
    assert scaling_lane.exclusive and len(scaling_lane.rows) == 6
    assert [lane.key for lane in lanes([_row("x"), _row("y")])] == ["encoder"]  # no lane given: the track's


def test_the_report_says_how_many_rows_ran_at_a_time():
    one = {"rows": {"a": {"threads": 2}, "b": {"jobs": 1, "threads": 2}}}
    assert report.concurrency_text(one) == "Rows ran one at a time, each in its own process with 2 torch threads."
    two = report.concurrency_text({"rows": {"a": {"jobs": 2, "threads": 1}, "b": {"jobs": 2, "threads": 1}}})
    assert two.startswith("Rows ran 2 at a time (`--jobs 2`), each in its own process with 1 torch thread: ")
    assert "per-core figures" in two
    mixed = report.concurrency_text({"rows": {"a": {"jobs": 2, "threads": 1}, "b": {"threads": 2}}})
    assert mixed.startswith("Rows ran 1 or 2 at a time (invocations of a resumed run with different `--jobs`")
    assert "with 1 or 2 torch threads" in mixed
    assert report.concurrency_text({"rows": {}, "settings": {"jobs": 3}}).startswith("Rows ran 3 at a time")


# ---- tables ----------------------------------------------------------------------------------------------------


def _results(*records: dict) -> dict:
    rows = {}
    for record in records:
        record = {"track": "encoder", "group": "SST-2", "status": "ok", "baseline": False, **record}
        rows[f"{record['method']}/{record.get('seed')}"] = record
    return {"rows": rows}


def test_tables_average_seeds_and_give_ratios_to_the_baseline_row():
    results = _results(
        {"method": "full", "baseline": True, "seed": 0, "figures": {"quality": 90.0, "train_peak_mb": 400.0,
                                                                     "latency_b32_ms": 100.0, "params": 1000}},
        {"method": "full", "baseline": True, "seed": 1, "figures": {"quality": 88.0, "train_peak_mb": 400.0,
                                                                     "latency_b32_ms": 100.0, "params": 1000}},
        {"method": "lora", "seed": 0, "figures": {"quality": 85.0, "train_peak_mb": 100.0, "latency_b32_ms": 50.0,
                                                  "ref_latency_b32_ms": 40.0, "params": 1000}},
        {"method": "lora", "seed": 1, "figures": {"quality": 87.0, "train_peak_mb": 300.0, "latency_b32_ms": 60.0,
                                                  "ref_latency_b32_ms": 60.0, "params": 1000}},
        {"method": "broken", "status": "failed", "error": "RuntimeError: out of cheese\nmore"},
    )
    (entries,) = report.summarise(results, "encoder").values()
    full, lora, broken = entries
    assert full["quality"] == 89.0 and full["quality_sd"] == pytest.approx(1.4142, abs=1e-4) and full["seeds"] == 2
    assert lora["train_peak_mb"] == 200.0
    assert lora["latency_b32_ratio"] == pytest.approx((50 / 40 + 1.0) / 2)  # each seed against its own reference
    assert broken["status"] == "failed" and broken["note"] == "RuntimeError: out of cheese"
    table = report.track_table(entries).splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in table[2:]}
    assert cells["lora"][header.index("x")] == f"{86 / 89:.3f}"
    assert cells["lora"][header.index("x mem")] == "0.50"
    assert cells["lora"][header.index("x b32")] == "1.12"
    assert cells["full"][header.index("x b32")] == "1.00"
    assert cells["lora"][header.index("quality")] == "86.00 ± 1.41 (2 seeds)"
    assert cells["broken"][header.index("note")] == "RuntimeError: out of cheese"


def test_pareto_front():
    points = [(100, 90), (50, 85), (60, 80), (200, 91), (50, 85), (300, 89)]
    assert report.pareto_front(points) == [1, 4, 0, 3]  # (60, 80) and (300, 89) are dominated
    perplexities = [(10, 40.0), (5, 60.0), (7, 70.0), (20, 35.0)]
    assert report.pareto_front(perplexities, higher_is_better=False) == [1, 0, 3]


@pytest.mark.slow  # importing matplotlib and drawing take about a second
def test_plot_is_written_for_every_track_with_a_cost(tmp_path):
    pytest.importorskip("matplotlib")
    from bench.plots import plot_track

    results = _results(
        {"method": "full", "baseline": True, "figures": {"quality": 90.0, "quality_name": "accuracy",
                                                         "higher_is_better": True, "train_peak_mb": 400.0,
                                                         "latency_b32_ms": 100.0}},
        {"method": "lora", "figures": {"quality": 88.0, "train_peak_mb": 200.0, "latency_b32_ms": 90.0}},
    )
    path = plot_track(report.summarise(results, "encoder"), tmp_path / "encoder.png", "Encoder track")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_track({"g": [{"method": "x", "status": "failed"}]}, tmp_path / "none.png", "t") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder.png"]


# ---- the command ------------------------------------------------------------------------------------------------


def test_list_names_every_row_and_bad_options_are_one_error(tmp_path, capsys):
    import benchmark

    assert benchmark.main(["--list", "--out", str(tmp_path / "run"), "--quick", "--tracks", "encoder,scaling"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert "encoder/SST-2/full fine-tuning/seed0" in listed and "scaling/" in listed[-1]
    assert not (tmp_path / "run").exists()  # --list does no work
    assert benchmark.main(["--list", "--out", str(tmp_path / "run"), "--rows", "*lora*", "--seeds", "2",
                           "--tracks", "encoder,decoder"]) == 0  # no --decoder-model: no decoder row
    assert capsys.readouterr().out.split() == ["encoder/SST-2/LoRA", "r=8", "(peft)/seed0", "encoder/SST-2/LoRA",
                                               "r=8", "(peft)/seed1", "encoder/MRPC/LoRA", "r=8", "(peft)/seed0",
                                               "encoder/MRPC/LoRA", "r=8", "(peft)/seed1"]
    for argv, message in ((["--tracks", "encoder,gpu"], "--tracks encoder,gpu: choose among"),
                          (["--rows", "nothing*"], "matches no row"),
                          (["--scaling-sizes", "7b"], "unknown size(s) 7b"),
                          (["--steps", "10", "--recovery-steps", "10"], "--recovery-steps 10 must be between"),
                          (["--decoder-data", "t.txt", "--calibration-text", "t.txt"], "are the same file"),
                          (["--tracks", "decoder"], "nothing to run: the decoder track needs a model (no decoder "
                                                    "model: give --decoder-model FOLDER")):
        with pytest.raises(SystemExit) as exc:
            benchmark.main(["--out", str(tmp_path / "run"), *argv])
        assert exc.value.code == 2 and message in capsys.readouterr().err


def test_resume_refuses_a_folder_that_is_no_run_folder(tmp_path, capsys):
    import benchmark

    (tmp_path / "mine.txt").write_text("my notes")
    with pytest.raises(SystemExit):
        benchmark.main(["--out", str(tmp_path), "--resume", "--tracks", "scaling"])
    assert "--out" in capsys.readouterr().err and (tmp_path / "mine.txt").read_text() == "my notes"


# ---- in fresh processes ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_rows_run_in_fresh_processes_and_record_crashes(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    rows = [_row("ok"), _row("broken", "failing_row"), _row("dies", "dying_row"), _row("absent", "skipped_row")]
    results = run_rows(rows, tmp_path / "results.json", progress=False, threads=1)["rows"]
    assert CALLS == []  # nothing ran in this process
    assert results["encoder/task/ok"]["figures"]["quality"] == 80.0 and results["encoder/task/ok"]["threads"] == 1
    assert results["encoder/task/broken"]["error"] == "RuntimeError: broken broke"
    assert "exit status 3 without a result" in results["encoder/task/dies"]["error"]
    assert results["encoder/task/absent"]["status"] == "skipped"
    log = (tmp_path / "logs" / "encoder_task_broken.log").read_text()
    assert "RuntimeError: broken broke" in log and "Traceback" in log  # each row's output, in its own log


@pytest.mark.slow
def test_with_jobs_ctrl_c_kills_the_running_rows_processes(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is handled by something else here")
    markers = [tmp_path / "a.pid", tmp_path / "b.pid"]

    def ctrl_c_once_both_sleep() -> None:
        deadline = time.monotonic() + 300
        while not all(m.is_file() and m.read_text() for m in markers) and time.monotonic() < deadline:
            time.sleep(0.1)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    rows = [_lane_row("first", "A"), _lane_row("a", "A", "sleeping_row", marker=str(markers[0])),
            _lane_row("b", "B", "sleeping_row", marker=str(markers[1])), _lane_row("b-after", "B")]
    threading.Thread(target=ctrl_c_once_both_sleep, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_rows(rows, tmp_path / "results.json", progress=False, threads=1, jobs=2)
    assert time.monotonic() - started < 250  # the sleeping rows (300 s) did not run to their end
    assert list(load_results(tmp_path / "results.json")["rows"]) == ["encoder/task/first"]
    for marker in markers:
        with pytest.raises(ProcessLookupError):  # killed, and reaped
            os.kill(int(marker.read_text()), 0)
    assert not (tmp_path / "logs" / "encoder_task_b-after.log").exists()

    # a Ctrl-C that reaches a row's process first (the terminal's process group) stops the run the same way
    marker = tmp_path / "c.pid"
    rows = [_lane_row("c", "C", "sleeping_row", marker=str(marker)), _lane_row("hit", "D", "interrupted_row")]
    with pytest.raises(KeyboardInterrupt):
        run_rows(rows, tmp_path / "again.json", progress=False, threads=1, jobs=2)
    assert load_results(tmp_path / "again.json")["rows"] == {}
    if marker.is_file():
        with pytest.raises(ProcessLookupError):
            os.kill(int(marker.read_text()), 0)


def _tiny_inputs(root: Path) -> dict[str, Path]:
    """A tiny BERT classifier, a tiny Llama (both with a word tokenizer), a labelled jsonl task and a text."""
    from tests import tiny
    from tests.test_text import counting_text, word_tokenizer

    folders = {}
    for arch in ("bert", "llama"):
        model = tiny.make_model(arch)
        model.config.max_position_embeddings = 64
        model.save_pretrained(root / arch)
        word_tokenizer().save_pretrained(root / arch)
        folders[arch] = root / arch
    words = counting_text(400).split()
    task = root / "task"
    task.mkdir()
    for split, n in (("train", 96), ("test", 40)):
        lines = [json.dumps({"sentence": " ".join(words[i:i + 6]), "target": i % 2}) for i in range(n)]
        (task / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    text = counting_text(6000)
    (root / "text.txt").write_text(text, encoding="utf-8")
    (root / "eval.txt").write_text(" ".join(reversed(text.split())), encoding="utf-8")  # never calibrated on
    return {**folders, "task": task, "text": root / "text.txt", "eval": root / "eval.txt"}


@pytest.mark.slow
def test_quick_run_on_tiny_models_writes_json_tables_and_plots(tmp_path):
    inputs = _tiny_inputs(tmp_path)
    out = tmp_path / "run"
    argv = [sys.executable, str(ROOT / "recipes" / "benchmark.py"), "--quick", "--out", str(out), "--threads", "1",
            "--model", str(inputs["bert"]), "--data", str(inputs["task"]), "--text-column", "sentence",
            "--label-column", "target", "--steps", "4", "--recovery-steps", "2", "--batch-size", "8", "--max-length",
            "16", "--decoder-model", str(inputs["llama"]), "--decoder-data", str(inputs["eval"]),
            "--calibration-text", str(inputs["text"]), "--scaling-sizes", "tiny"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / harness.RESULTS_FILE).read_text())["rows"]
    statuses = {row_id: r["status"] for row_id, r in results.items()}
    failed = {row_id: r.get("error") for row_id, r in results.items() if r["status"] == "failed"}
    assert not failed, failed
    assert statuses["encoder/task/full fine-tuning/seed0"] == "ok"
    assert sum(1 for s in statuses.values() if s == "ok") >= len(statuses) - 3  # bitsandbytes, recovery may skip
    text = (out / "benchmark.md").read_text()
    assert "## Encoder track" in text and "## Decoder track" in text and "## Scaling" in text
    for png in ("encoder.png", "decoder.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # resumed: nothing runs again
    again = subprocess.run([*argv, "--resume"], capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished" in again.stderr


def test_encoder_data_with_named_columns(tmp_path):
    from bench.encoder import _load_any

    for split, n in (("train", 6), ("validation", 4)):
        rows = [json.dumps({"review": f"words {i}", "stars": i % 2, "extra": "x"}) for i in range(n)]
        (tmp_path / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
    train, test = _load_any(str(tmp_path), {"text_column": "review", "label_column": "stars"})
    assert train.column_names == ["text", "label"] and len(train) == 6 and len(test) == 4
    assert test[1] == {"text": "words 1", "label": 1}
    with pytest.raises(ValueError, match="--text-column and --label-column"):
        _load_any(str(tmp_path), {"text_column": "extra", "label_column": "nothing"})


def test_a_skipped_track_says_why_in_the_report():
    from bench import decoder

    settings = {**decoder.QUICK, "model": None, "eval_text": "e.txt", "calibration_text": "c.txt"}
    assert decoder.rows(settings) == []
    text = report.markdown_report({"rows": {}}, ["decoder"], notes={"decoder": decoder.note(settings)})
    assert "## Decoder track" in text and "Not run: no decoder model: give --decoder-model FOLDER" in text


class _FakeTrack:
    """A track of stub rows, for the command's flow without real models."""

    FULL = QUICK = {"n": 1}
    TITLE = "Fake"

    def __init__(self, name: str) -> None:
        self.name = name

    def rows(self, settings: dict) -> list[Row]:
        return [Row(track=self.name, group="g", method=f"{self.name}-{m}", function="tests.test_benchmark:stub_row",
                    kwargs={"name": f"{self.name}-{m}", "quality": q}, baseline=m == "base")
                for m, q in (("base", 80.0), ("other", 60.0))]

    def note(self, settings: dict) -> str:
        return f"the {self.name} protocol"


def test_the_command_runs_tracks_into_one_run_folder_and_resumes_across_tracks(tmp_path, monkeypatch, capsys):
    import functools

    import benchmark

    monkeypatch.setattr(benchmark, "TRACKS", {"encoder": _FakeTrack("encoder"), "scaling": _FakeTrack("scaling")})
    monkeypatch.setattr(benchmark, "run_rows", functools.partial(run_rows, runner=run_in_process, progress=False))
    monkeypatch.setattr("bench.plots.plot_track", lambda summary, path, title: Path(path).write_bytes(b"png") and
                        Path(path))
    out = tmp_path / "run"
    assert benchmark.main(["--out", str(out), "--tracks", "encoder"]) == 0
    assert CALLS == ["encoder-base", "encoder-other"]
    text = (out / "benchmark.md").read_text()
    assert "## Encoder track" in text and "the encoder protocol" in text and "![encoder](encoder.png)" in text
    assert re.search(r"\| encoder-other +\| 60\.00 +\| 0\.750 +\|", text)  # the ratio to the baseline row
    assert {p.name for p in out.iterdir()} >= {"README.md", "results.json", "benchmark.md", "encoder.png",
                                               "metrics.json", "resolved_config.json"}
    with pytest.raises(SystemExit):  # an earlier run folder: --overwrite or --resume
        benchmark.main(["--out", str(out), "--tracks", "scaling"])
    assert "--overwrite" in capsys.readouterr().err
    CALLS.clear()
    assert benchmark.main(["--out", str(out), "--tracks", "scaling", "--resume"]) == 0
    assert CALLS == ["scaling-base", "scaling-other"]  # the encoder rows are kept, not run again
    text = (out / "benchmark.md").read_text()
    assert "## Encoder track" in text and "the scaling protocol" in text
    assert len(load_results(out / "results.json")["rows"]) == 4


def test_the_command_runs_jobs_side_by_side_and_says_so_in_the_report(tmp_path, monkeypatch, capsys):
    import functools

    import benchmark

    monkeypatch.setattr(benchmark, "TRACKS", {"encoder": _FakeTrack("encoder"), "scaling": _FakeTrack("scaling")})
    monkeypatch.setattr(benchmark, "run_rows", functools.partial(run_rows, runner=run_in_process, progress=False))
    monkeypatch.setattr("bench.plots.plot_track", lambda summary, path, title: None)
    out = tmp_path / "run"
    assert benchmark.main(["--out", str(out), "--tracks", "encoder", "--jobs", "2", "--threads", "1"]) == 0
    results = load_results(out / "results.json")
    assert results["settings"]["jobs"] == 2 and results["settings"]["threads"] == 1
    assert {r["jobs"] for r in results["rows"].values()} == {2}
    assert "Rows ran 2 at a time (`--jobs 2`)" in (out / "benchmark.md").read_text()
    with pytest.raises(SystemExit) as exc:
        benchmark.main(["--out", str(tmp_path / "other"), "--tracks", "encoder", "--jobs", "0"])
    assert exc.value.code == 2 and "--jobs 0: give a positive number" in capsys.readouterr().err


# ---- the decoder track's model: a folder or a Hub id ----------------------------------------------------------


def _decoder_settings(root: Path, model: str) -> dict:
    from bench import decoder
    from tests.test_text import counting_text

    text = counting_text(2000)
    (root / "calibration.txt").write_text(text, encoding="utf-8")
    (root / "eval.txt").write_text(" ".join(reversed(text.split())), encoding="utf-8")
    return {**decoder.QUICK, "model": model, "eval_text": str(root / "eval.txt"),
            "calibration_text": str(root / "calibration.txt"), "workdir": str(root / "run")}


def _offline_hub_cache(root: Path, monkeypatch) -> Path:
    """An empty Hugging Face cache under ``root``, read offline by huggingface_hub and transformers in this process."""
    import huggingface_hub.constants

    cache = root / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_the_decoder_track_loads_a_folder_or_a_hub_id_from_the_cache(tmp_path, monkeypatch):
    import shutil

    import torch

    from bench import decoder
    from tests import tiny
    from tests.test_text import word_tokenizer

    folder = tmp_path / "tiny-llama"
    model = tiny.make_model("llama")
    model.config.max_position_embeddings = 64
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    cache = _offline_hub_cache(tmp_path, monkeypatch)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--tiny-org--tiny-llama"
    shutil.copytree(folder, repo / "snapshots" / commit)  # the cache's layout: a snapshot per commit, refs/main
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)

    ids = torch.arange(2, 34).reshape(2, 16)
    logits = {}
    for name, where in ((str(folder), folder), ("tiny-org/tiny-llama", repo / "snapshots" / commit)):
        settings = _decoder_settings(tmp_path, name)
        assert decoder.skip_reason(settings) is None
        assert decoder.rows(settings)[0].group == "tiny-llama, WikiText-2 perplexity"
        run = decoder.DecoderRun("dense", settings)
        assert (run.model_name, run.model_path, run.s["window"]) == (name, where, 64)  # 64 positions cap the window
        loaded, tokenizer = run.load()
        assert tokenizer("t1 t2")["input_ids"] and not loaded.training and loaded.config.use_cache is False
        with torch.inference_mode():
            logits[name] = loaded(input_ids=ids).logits
    assert torch.equal(*logits.values())


def test_a_hub_id_the_rows_cannot_load_is_refused_or_fails_its_row_in_one_line(tmp_path, monkeypatch, capsys):
    import benchmark
    from bench import decoder

    _offline_hub_cache(tmp_path, monkeypatch)
    settings = _decoder_settings(tmp_path, "nobody/absent-model")
    expected = ("--decoder-model nobody/absent-model is no local folder, and no Hub model of that id is in the Hugging "
                "Face cache while the rows run offline: give a model folder, download it once (`hf download "
                "nobody/absent-model`), or export HF_HUB_OFFLINE=0 so that the rows download it")
    assert decoder.skip_reason(settings) == expected and decoder.rows(settings) == []
    with pytest.raises(SystemExit) as exc:  # before any work
        benchmark.main(["--out", str(tmp_path / "out"), "--tracks", "decoder", "--decoder-model", "nobody/absent-model",
                        "--decoder-data", settings["eval_text"], "--calibration-text", settings["calibration_text"]])
    assert exc.value.code == 2 and expected in capsys.readouterr().err and not (tmp_path / "out").exists()

    # the rows may use the network (HF_HUB_OFFLINE=0), and the Hub is out of reach: each row fails, in one line
    monkeypatch.setattr(decoder, "_hub_id_unavailable", lambda model_id: None)
    (row, *_) = decoder.rows(settings)
    record = run_in_process(row)
    assert record["status"] == "failed" and "\n" not in record["error"]
    assert record["error"].startswith("UsageError: --decoder-model 'nobody/absent-model' is no local folder, and "
                                      "loading it from the Hub failed (")
