"""Inference latency: timed forward calls after warm-up, alone or interleaved across several models."""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from common.device import model_device, sync, to_device

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatencyResult:
    """Wall-clock latency of single forward calls, in seconds."""

    median_s: float
    mean_s: float
    p10_s: float
    p90_s: float
    min_s: float
    max_s: float
    repeats: int
    times_s: tuple[float, ...] = field(repr=False)

    @classmethod
    def from_times(cls, times: Sequence[float]) -> LatencyResult:
        """Summary statistics of a non-empty sequence of call times (seconds)."""
        if not times:
            raise ValueError("LatencyResult needs at least one timed call")
        ordered = sorted(times)
        return cls(median_s=statistics.median(ordered), mean_s=statistics.fmean(ordered),
                   p10_s=_percentile(ordered, 10), p90_s=_percentile(ordered, 90), min_s=ordered[0],
                   max_s=ordered[-1], repeats=len(times), times_s=tuple(times))


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (``q`` in [0, 100]) of an already sorted, non-empty sequence."""
    pos = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def inference_latency(
    model: torch.nn.Module, inputs: Mapping[str, Any], warmup: int = 3, repeats: int = 10
) -> LatencyResult:
    """Time ``repeats`` forward calls ``model(**inputs)`` after ``warmup`` untimed ones.

    Runs under ``torch.inference_mode`` with the model in eval mode (its previous mode is restored).
    Tensor inputs are moved to the model's device; on CUDA each call is bracketed by synchronisation.
    The torch thread count is left as it is: set it yourself for comparable figures.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    device = model_device(model)
    batch = to_device(inputs, device)
    was_training = model.training
    model.eval()
    times: list[float] = []
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(**batch)
            sync(device)
            for _ in range(repeats):
                start = time.perf_counter()
                model(**batch)
                sync(device)
                times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    result = LatencyResult.from_times(times)
    logger.debug("latency: median %.6f s over %d calls", result.median_s, repeats)
    return result


def interleaved_latency(
    models: Mapping[str, torch.nn.Module], inputs: Mapping[str, Any], rounds: int = 2, repeats: int = 3,
    warmup: int = 1,
) -> dict[str, LatencyResult]:
    """Latency of several models on the same inputs, timed in ``rounds`` that visit every model in turn.

    Each round runs :func:`inference_latency` (``warmup`` untimed, ``repeats`` timed calls) once per model, in
    the mapping's order, so a change in machine load during the measurement hits every model alike. Each
    model's result pools its ``rounds * repeats`` timed calls (``median_s`` is their median).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            times[name] += inference_latency(model, inputs, warmup=warmup, repeats=repeats).times_s
    return {name: LatencyResult.from_times(values) for name, values in times.items()}


def pass_latency(model: torch.nn.Module, batches: Sequence[Mapping[str, Any]], warmup: int = 1,
                 repeats: int = 3) -> LatencyResult:
    """Time ``repeats`` passes of ``model(**batch)`` over every batch of ``batches`` (after ``warmup`` untimed
    passes); each timed call is one whole pass.

    For models whose cost depends on the inputs (early exit), where one input says little: time a data set.
    Same conditions as :func:`inference_latency` (inference mode, eval mode restored afterwards).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not batches:
        raise ValueError("pass_latency needs at least one batch")
    device = model_device(model)
    moved = [to_device(batch, device) for batch in batches]
    was_training = model.training
    model.eval()
    times: list[float] = []
    try:
        with torch.inference_mode():
            for index in range(warmup + repeats):
                start = time.perf_counter()
                for batch in moved:
                    model(**batch)
                sync(device)
                if index >= warmup:
                    times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    return LatencyResult.from_times(times)


def interleaved_pass_latency(models: Mapping[str, torch.nn.Module], batches: Sequence[Mapping[str, Any]],
                             rounds: int = 3, warmup: int = 1) -> dict[str, LatencyResult]:
    """:func:`pass_latency` of several models over the same batches, one timed pass per model per round in the
    mapping's order (after ``warmup`` untimed passes each), so that a change in machine load hits every model
    alike."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    for model in models.values():
        if warmup:
            pass_latency(model, batches, warmup=0, repeats=warmup)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            times[name] += pass_latency(model, batches, warmup=0, repeats=1).times_s
    return {name: LatencyResult.from_times(values) for name, values in times.items()}
