"""The benchmark's plots: quality against training peak memory and against inference latency, one PNG per track
(a row of two panels per group), every method labelled, the Pareto front drawn (matplotlib: the ``bench`` extra)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.report import pareto_front

__all__ = ["COSTS", "plot_track"]

#: the x axes: figure, label
COSTS = (("train_peak_mb", "training peak memory (MB over the loaded model)"),
         ("latency_b32_ms", "inference latency, batch of 32 (ms)"))


def _points(entries: Sequence[Mapping[str, Any]], cost: str) -> list[tuple[str, float, float]]:
    return [(e["method"], float(e[cost]), float(e["quality"])) for e in entries
            if e.get("status") == "ok" and e.get(cost) is not None and e.get("quality") is not None]


def plot_track(summary: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike[str],
               title: str) -> Path | None:
    """Write the track's PNG to ``path`` (atomically) and return it; ``None`` when no row has a quality and a cost.

    ``summary`` is :func:`bench.report.summarise`'s ``{group: entries}``. Perplexity is drawn on a log axis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [(g, entries) for g, entries in summary.items() if any(_points(entries, c) for c, _ in COSTS)]
    if not groups:
        return None
    fig, axes = plt.subplots(len(groups), len(COSTS), figsize=(6.4 * len(COSTS), 4.6 * len(groups)), squeeze=False)
    for (group, entries), row_axes in zip(groups, axes):
        higher = next((bool(e["higher_is_better"]) for e in entries if e.get("higher_is_better") is not None), True)
        name = next((e["quality_name"] for e in entries if e.get("quality_name")), "quality")
        for ax, (cost, label) in zip(row_axes, COSTS):
            points = _points(entries, cost)
            if not points:
                ax.set_axis_off()
                ax.set_title(f"{group}: no {label.split(' (')[0]} measured", fontsize=9)
                continue
            front = pareto_front([(x, y) for _, x, y in points], higher_is_better=higher)
            ax.scatter([x for _, x, _ in points], [y for _, _, y in points], s=28, color="tab:blue", zorder=3)
            for i, (method, x, y) in enumerate(points):
                ax.annotate(method, (x, y), textcoords="offset points", xytext=(4, 4 if i % 2 else -10),
                            fontsize=7.5, color="black" if i in front else "dimgray")
            fx, fy = [points[i][1] for i in front], [points[i][2] for i in front]
            ax.step(fx, fy, where="post", color="tab:red", linewidth=1.2, label="Pareto front", zorder=2)
            ax.scatter(fx, fy, s=60, facecolors="none", edgecolors="tab:red", zorder=4)
            if name == "perplexity":
                ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel(f"{name} ({'higher' if higher else 'lower'} is better)")
            ax.set_title(group, fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="best")
            ax.margins(x=0.15, y=0.12)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
