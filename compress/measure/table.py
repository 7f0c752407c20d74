"""Aligned Markdown tables of measurement rows (pasteable into a README)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    if isinstance(value, numbers.Real):
        x = float(value)
        if math.isnan(x) or math.isinf(x) or x == 0:
            return str(x) if x else "0"
        if abs(x) >= 1:
            return f"{x:,.3f}"
        return f"{x:.3g}"  # 3 significant digits for small magnitudes (e.g. 0.0123 s)
    return str(value).replace("|", "\\|").replace("\n", " ")


def format_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Render rows as an aligned Markdown pipe table (pasteable into a README).

    ``columns`` defaults to every key in order of first appearance; missing values are blank. Integers get
    thousands separators, floats 3 decimals (3 significant digits below 1), booleans ``yes``/``no``.
    Columns whose values are all numbers are right-aligned, others left-aligned.
    """
    rows = list(rows)
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    columns = list(columns)
    if not columns:
        return ""
    cells = [[_format_cell(row.get(col)) for col in columns] for row in rows]
    numeric = [
        any(col in row for row in rows)
        and all(_is_number(row[col]) for row in rows if row.get(col) is not None)
        for col in columns
    ]
    widths = [max([len(col), 3, *(len(r[i]) for r in cells)]) for i, col in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        padded = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if num else "-" * (w + 2) for w, num in zip(widths, numeric))
    rule += "|"
    return "\n".join([line(columns), rule, *(line(r) for r in cells)])
