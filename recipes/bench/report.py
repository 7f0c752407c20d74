"""The benchmark's tables: rows of one method averaged over seeds, every figure beside its ratio to the baseline row
of the same group (full fine-tuning, the dense model), and the Pareto front of quality against a cost."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from compress.measure import format_table

__all__ = ["COST_COLUMNS", "concurrency_text", "markdown_report", "pareto_front", "ratio", "summarise",
           "track_table"]

#: figures averaged over seeds: key, column title, number format, title of its ratio column
COST_COLUMNS = (
    ("train_peak_mb", "train peak MB", "{:,.0f}", "x mem"),
    ("step_time_s", "s/step", "{:.3f}", "x step"),
    ("latency_b1_ms", "latency b1 ms", "{:.1f}", "x b1"),
    ("latency_b32_ms", "latency b32 ms", "{:.0f}", "x b32"),
    ("params", "params", "{:,.0f}", "x params"),
    ("artifact_mb", "artifact MB", "{:.1f}", "x size"),
)
#: the scaling section's columns
SCALING_COLUMNS = (
    ("params", "params", "{:,.0f}"),
    ("model_mb", "fp32 weights MB", "{:,.0f}"),
    ("prune_wall_s", "CLI wall s", "{:.1f}"),
    ("prune_peak_rss_mb", "CLI peak RSS MB", "{:,.0f}"),
    ("peak_over_model", "peak / weights", "{:.2f}"),
    ("params_after", "params after", "{:,.0f}"),
)


def _mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    return statistics.fmean(values) if values else None


def summarise(results: Mapping[str, Any], track: str) -> dict[str, list[dict[str, Any]]]:
    """The track's rows grouped by group, then method (in the order the results file holds them), the figures of a
    method's seeds averaged: ``{group: [entry, ...]}``.

    An entry has ``method``, ``seeds`` (finished repetitions), ``status`` (``ok`` when one repetition finished,
    else the first record's), ``quality`` (mean) and ``quality_sd`` (sample standard deviation over seeds, ``None``
    for one), the mean of every other numeric figure, ``latency_b1_ratio`` / ``latency_b32_ratio`` (each
    repetition's latency over its dense reference timed alongside, averaged) where the rows timed one,
    ``baseline``, and ``note`` (errors and skip reasons).
    """
    grouped: dict[str, dict[str, list[Mapping[str, Any]]]] = {}
    for record in results.get("rows", {}).values():
        if record.get("track") != track:
            continue
        grouped.setdefault(record["group"], {}).setdefault(record["method"], []).append(record)
    summary: dict[str, list[dict[str, Any]]] = {}
    for group, methods in grouped.items():
        entries = []
        for method, records in methods.items():
            done = [r for r in records if r.get("status") == "ok"]
            figures = [r.get("figures", {}) for r in done]
            entry: dict[str, Any] = {"method": method, "seeds": len(done),
                                     "status": "ok" if done else records[0].get("status", "failed"),
                                     "baseline": any(r.get("baseline") for r in records)}
            keys = dict.fromkeys(k for f in figures for k, v in f.items()
                                 if isinstance(v, (int, float)) and not isinstance(v, bool))
            for key in keys:
                entry[key] = _mean([f.get(key) for f in figures])
            for key in ("quality_name", "higher_is_better", "note", "command"):
                entry[key] = next((f[key] for f in figures if key in f), entry.get(key))
            qualities = [f["quality"] for f in figures if isinstance(f.get("quality"), (int, float))]
            entry["quality_sd"] = statistics.stdev(qualities) if len(qualities) > 1 else None
            for size in ("b1", "b32"):
                ratios = [f[f"latency_{size}_ms"] / f[f"ref_latency_{size}_ms"] for f in figures
                          if f.get(f"ref_latency_{size}_ms") and f.get(f"latency_{size}_ms") is not None]
                entry[f"latency_{size}_ratio"] = _mean(ratios)
            problems = [r.get("error") or r.get("reason") for r in records if r.get("status") != "ok"]
            if problems and not done:
                entry["note"] = "; ".join(dict.fromkeys(p.splitlines()[0] for p in problems if p))
            elif problems:
                entry["note"] = (f"{len(problems)} of {len(records)} repetitions failed: "
                                 + problems[0].splitlines()[0])
            entries.append(entry)
        summary[group] = entries
    return summary


def ratio(value: float | None, base: float | None) -> float | None:
    """``value / base``, or ``None`` when either is missing or ``base`` is zero."""
    if value is None or base is None or base == 0:
        return None
    return value / base


def pareto_front(points: Sequence[tuple[float, float]], higher_is_better: bool = True) -> list[int]:
    """Indices of the points no other point dominates, sorted by cost: ``(cost, quality)`` pairs, a lower cost and
    a better quality (higher, or lower with ``higher_is_better=False``) being better. A point is dominated by one at
    most as costly and at least as good, and better in one of the two; equal points are both kept."""
    sign = 1.0 if higher_is_better else -1.0
    front = []
    for i, (cost, quality) in enumerate(points):
        dominated = any(c <= cost and sign * q >= sign * quality and (c < cost or sign * q > sign * quality)
                        for j, (c, q) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -sign * points[i][1]))


def _fmt(value: Any, pattern: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return pattern.format(value)


def _counts(values: Iterable[int], unit: str) -> str:
    """``2 units`` / ``1 or 2 units``: the distinct values (sorted), the unit in the plural beyond one."""
    values = sorted(set(values))
    text = " or ".join(str(v) for v in values)
    return f"{text} {unit}" + ("s" if values[-1] > 1 else "")


def concurrency_text(results: Mapping[str, Any]) -> str:
    """One sentence on how the rows ran: how many at a time (each record's ``jobs``, else the run's
    ``settings["jobs"]``; 1 for records without it) and with how many torch threads each (the ``threads`` the
    rows' processes report)."""
    records = list(results.get("rows", {}).values())
    jobs = sorted({int(r.get("jobs") or 1) for r in records}) or [int(results.get("settings", {}).get("jobs") or 1)]
    threads = [int(r["threads"]) for r in records if r.get("threads")]
    each = f", each in its own process with {_counts(threads, 'torch thread')}" if threads else ""
    if jobs == [1]:
        return f"Rows ran one at a time{each}."
    if len(jobs) == 1:
        how = f"Rows ran {jobs[0]} at a time (`--jobs {jobs[0]}`){each}"
    else:
        how = (f"Rows ran {' or '.join(map(str, jobs))} at a time (invocations of a resumed run with different "
               f"`--jobs`; each row's `jobs` is in results.json){each}")
    return (how + ": the rows of one lane (an encoder task and seed, the decoder's uniform row and its recovery "
            "rows) in order, the scaling rows alone. Step times, latencies and wall times of rows that ran beside "
            "another are those of a shared machine (per-core figures), not of an idle one; the latency ratios are "
            "against the dense model timed alternately in the same process.")


def _quality_text(entry: Mapping[str, Any]) -> str:
    quality = entry.get("quality")
    if quality is None:
        return ""
    digits = "{:.2f}" if entry.get("quality_name") != "perplexity" or quality < 1e4 else "{:.3g}"
    text = digits.format(quality)
    if entry.get("quality_sd") is not None:
        text += f" ± {entry['quality_sd']:.2f} ({entry['seeds']} seeds)"
    return text


def track_table(entries: Sequence[Mapping[str, Any]]) -> str:
    """One group's Markdown table: quality and each cost with its ratio to the group's baseline entry (``x``)."""
    if entries and any("prune_peak_rss_mb" in e for e in entries):
        return _scaling_table(entries)
    base = next((e for e in entries if e.get("baseline") and e.get("status") == "ok"), None)
    name = next((e.get("quality_name") for e in entries if e.get("quality_name")), "quality")
    rows = []
    for entry in entries:
        row: dict[str, Any] = {"method": entry["method"], name: _quality_text(entry),
                               "x": _fmt(ratio(entry.get("quality"), base and base.get("quality")), "{:.3f}")}
        for key, title, pattern, ratio_title in COST_COLUMNS:
            row[title] = _fmt(entry.get(key), pattern)
            value = entry.get(f"{key.removesuffix('_ms')}_ratio") if key.startswith("latency_") else None
            if value is None:
                value = ratio(entry.get(key), base and base.get(key))
            row[ratio_title] = _fmt(value, "{:.2f}")
        row["note"] = entry.get("note") or ""
        rows.append(row)
    columns = list(rows[0]) if rows else []
    return format_table(rows, columns)


def _scaling_table(entries: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for entry in entries:
        row: dict[str, Any] = {"model, criterion": entry["method"]}
        for key, title, pattern in SCALING_COLUMNS:
            row[title] = _fmt(entry.get(key), pattern)
        row["note"] = entry.get("note") or ""
        rows.append(row)
    return format_table(rows)


def markdown_report(results: Mapping[str, Any], tracks: Iterable[str], notes: Mapping[str, str] | None = None,
                    plots: Mapping[str, str] | None = None, header: str = "") -> str:
    """The whole report: ``header``, then per track and group its table, the track's note and its plot."""
    titles = {"encoder": "Encoder track", "decoder": "Decoder track", "scaling": "Scaling: the engine on large models"}
    parts = [header.strip()] if header.strip() else []
    for track in tracks:
        summary = summarise(results, track)
        if not summary and not (notes and notes.get(track)):
            continue
        parts.append(f"## {titles.get(track, track)}")
        for group, entries in summary.items():
            parts.append(f"### {group}\n\n{track_table(entries)}")
        if notes and notes.get(track):
            parts.append(notes[track].strip())
        if plots and plots.get(track):
            parts.append(f"![{track}]({plots[track]})")
    return "\n\n".join(parts) + "\n"
