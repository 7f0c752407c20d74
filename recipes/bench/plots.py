"""The benchmark's plots: quality against training peak memory and against inference latency, one PNG per track
(a row of two panels per group), every method labelled, the Pareto front drawn (matplotlib: the ``bench`` extra).

Latency is drawn as the ratio to the dense model timed in alternation with the row's model in the row's own process:
rows run at different times, and on a shared machine the absolute times of two rows differ with the load."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.report import pareto_front

__all__ = ["COSTS", "plot_track"]

#: the x axes: figure, label
COSTS = (("train_peak_mb", "training peak memory (MB over the loaded model)"),
         ("latency_b32_ratio", "inference latency at batch 32 / the dense model's (timed alongside)"))


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
    # every method gets a number, the same in every panel, and the legend names it: long labels beside
    # clustered points would overlap
    numbers: dict[str, int] = {}
    for _, entries in groups:
        for entry in entries:
            if any(_points([entry], cost) for cost, _ in COSTS):
                numbers.setdefault(entry["method"], len(numbers) + 1)
    fig, axes = plt.subplots(len(groups), len(COSTS), figsize=(5.6 * len(COSTS) + 4.2, 4.4 * len(groups)),
                             squeeze=False)
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
            ax.scatter([x for _, x, _ in points], [y for _, _, y in points], s=26, color="tab:blue", zorder=3)
            seen: dict[tuple[float, float], int] = {}
            for i, (method, x, y) in enumerate(points):
                stacked = seen.get((round(x, 6), round(y, 6)), 0)  # numbers of equal points side by side
                seen[(round(x, 6), round(y, 6))] = stacked + 1
                ax.annotate(str(numbers[method]), (x, y), textcoords="offset points", xytext=(4 + 9 * stacked, 3),
                            fontsize=8, fontweight="bold" if i in front else "normal",
                            color="tab:red" if i in front else "black")
            fx, fy = [points[i][1] for i in front], [points[i][2] for i in front]
            ax.step(fx, fy, where="post", color="tab:red", linewidth=1.2, label="Pareto front", zorder=2)
            ax.scatter(fx, fy, s=70, facecolors="none", edgecolors="tab:red", zorder=4)
            if name == "perplexity":
                from matplotlib.ticker import FuncFormatter

                ax.set_yscale("log")
                plain = FuncFormatter(lambda value, _: f"{value:g}")
                ax.yaxis.set_major_formatter(plain)
                low, high = ax.get_ylim()
                if high / low < 10:  # within a decade the minor ticks are the only labels
                    ax.yaxis.set_minor_formatter(plain)
                    ax.tick_params(axis="y", which="minor", labelsize=7)
            ax.set_xlabel(label, fontsize=9)
            ax.set_ylabel(f"{name} ({'higher' if higher else 'lower'} is better)", fontsize=9)
            ax.set_title(group, fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="best")
            ax.margins(x=0.12, y=0.12)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], linestyle="", label=f"{number}  {method}") for method, number in numbers.items()]
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, handlelength=0,
               frameon=False, title="methods (red: on the Pareto front)", title_fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
