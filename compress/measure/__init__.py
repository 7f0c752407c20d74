"""Measurement harness for benchmarks: parameters, FLOPs, disk size, latency, training memory, tables.

One module per concern, every public name importable from here:

- :mod:`compress.measure.static`: :func:`count_parameters`, :func:`estimate_flops`, :func:`folder_size`,
  :func:`ratio`;
- :mod:`compress.measure.latency`: :func:`inference_latency` (median of timed forward calls after warm-up),
  :func:`interleaved_latency` (several models compared in rounds, so machine-load drift hits all alike) and
  :func:`pass_latency` (one pass over a data set's batches, for input-dependent models such as early exit;
  :func:`interleaved_pass_latency` compares several);
- :mod:`compress.measure.memory`: :func:`peak_training_memory`, the peak resident memory of a few training
  steps measured in a fresh subprocess, as the increase over the RSS once the model is loaded
  (:class:`TrainingJob`, :class:`TrainingSetup`, :class:`TrainingMemoryResult`);
- :mod:`compress.measure.table`: :func:`format_table`, an aligned Markdown table.

All helpers are side-effect free for the caller: nothing global (grad mode, a model's train/eval flag) is
left changed after a call returns. Nothing here knows about a model family, a data set or a recipe.
"""

from compress.measure.latency import (
    LatencyResult,
    inference_latency,
    interleaved_latency,
    interleaved_pass_latency,
    pass_latency,
)
from compress.measure.memory import (
    DEFAULT_MALLOC_ENV,
    TrainingJob,
    TrainingJobError,
    TrainingMemoryResult,
    TrainingSetup,
    peak_training_memory,
)
from compress.measure.static import count_parameters, estimate_flops, folder_size, ratio
from compress.measure.table import format_table

__all__ = [
    "DEFAULT_MALLOC_ENV",
    "LatencyResult",
    "TrainingJob",
    "TrainingJobError",
    "TrainingMemoryResult",
    "TrainingSetup",
    "count_parameters",
    "estimate_flops",
    "folder_size",
    "format_table",
    "inference_latency",
    "interleaved_latency",
    "interleaved_pass_latency",
    "pass_latency",
    "peak_training_memory",
    "ratio",
]
