"""Counting and reporting what pruning changed: parameters, FLOPs, disk size, aligned tables.

- :mod:`compress.measure.static`: :func:`count_parameters`, :func:`estimate_flops`, :func:`folder_size`,
  :func:`ratio`;
- :mod:`compress.measure.table`: :func:`format_table`, an aligned Markdown table.

Nothing here changes the model it is given or knows about a model family, a data set or a recipe. Timing and
training-memory measurements belong to the benchmarks (``recipes/common/latency.py``, ``recipes/common/memory.py``).
"""

from compress.measure.static import count_parameters, estimate_flops, folder_size, ratio
from compress.measure.table import format_table

__all__ = ["count_parameters", "estimate_flops", "folder_size", "format_table", "ratio"]
