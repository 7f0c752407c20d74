"""The benchmarks' latency and training-memory measurements (recipes/common/latency.py, memory.py); the
factories below are imported by the training-memory child process (subprocess tests are marked slow)."""

from __future__ import annotations

import math

import pytest
import torch

from common.latency import (
    LatencyResult,
    inference_latency,
    interleaved_latency,
    interleaved_pass_latency,
    pass_latency,
)
from common.memory import TrainingJob, TrainingJobError, TrainingSetup, peak_training_memory

MB = 1024 * 1024


# ---- factories for peak_training_memory (module level, so a fresh process can import them) -----------


class _TinyRegressor(torch.nn.Module):
    """MLP returning ``{"loss": ...}``; optionally allocates a transient ``extra_mb`` buffer per forward."""

    def __init__(self, hidden: int, extra_mb: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(32, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)
        )
        self.extra_mb = extra_mb

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        loss = torch.nn.functional.mse_loss(self.net(x).squeeze(-1), labels)
        if self.extra_mb:
            scratch = torch.ones(self.extra_mb * MB // 4)  # written, so its pages are resident
            loss = loss + scratch.sum() * 0.0
        return {"loss": loss}


def tiny_factory(hidden: int = 64, extra_mb: int = 0):
    model = _TinyRegressor(hidden, extra_mb)
    g = torch.Generator().manual_seed(0)
    batches = [
        {"x": torch.randn(8, 32, generator=g), "labels": torch.randn(8, generator=g)} for _ in range(2)
    ]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, batches, optimizer


def growing_factory(grow_after: int = 2, extra_mb: int = 200):
    """Like tiny_factory, but its on_step_end makes later steps use ``extra_mb`` more (a schedule's effect)."""
    model, batches, optimizer = tiny_factory(hidden=64)

    def on_step_end(step: int) -> None:
        if step == grow_after:
            model.extra_mb = extra_mb

    return model, batches, optimizer, on_step_end


def setup_factory(scratch_mb: int = 200, in_train_begin: bool = True):
    """A TrainingSetup whose pre-training work touches ``scratch_mb`` (before or after the baseline) and whose
    optimizer is built lazily, after that work replaced the model's head (as pruning would)."""
    model, batches, _ = tiny_factory(hidden=64)

    def prepare() -> None:
        scratch = torch.ones(scratch_mb * MB // 4)
        model.scratch_sum = float(scratch.sum())
        model.net[-1] = torch.nn.Linear(64, 1)  # parameters built before this would be stale

    if not in_train_begin:
        prepare()

    def build_optimizer() -> torch.optim.Optimizer:
        assert hasattr(model, "scratch_sum"), "optimizer built before on_train_begin"
        return torch.optim.AdamW(model.parameters(), lr=1e-3)

    return TrainingSetup(model, batches, build_optimizer, on_train_begin=prepare if in_train_begin else None)


def failing_factory():
    raise RuntimeError("boom-from-child-factory")


# ---- latency ---------------------------------------------------------------------------------------


class _CountingLinear(torch.nn.Linear):
    def __init__(self) -> None:
        super().__init__(16, 16)
        self.calls = 0
        self.grad_seen: list[bool] = []

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - mirror nn.Linear's signature
        self.calls += 1
        self.grad_seen.append(torch.is_grad_enabled())
        return super().forward(input)


def test_inference_latency_counts_and_restores_state():
    model = _CountingLinear().train()
    result = inference_latency(model, {"input": torch.randn(2, 16)}, warmup=2, repeats=7)
    assert isinstance(result, LatencyResult)
    assert model.calls == 2 + 7
    assert not any(model.grad_seen)
    assert result.repeats == 7 and len(result.times_s) == 7
    assert result.median_s > 0
    assert result.min_s <= result.p10_s <= result.median_s <= result.p90_s <= result.max_s
    assert model.training  # previous mode restored
    with pytest.raises(ValueError):
        inference_latency(model, {"input": torch.randn(2, 16)}, repeats=0)


def test_pass_latency_times_whole_passes_over_the_batches():
    model = _CountingLinear().train()
    batches = [{"input": torch.randn(n, 16)} for n in (2, 3, 1)]
    result = pass_latency(model, batches, warmup=1, repeats=4)
    assert model.calls == 3 * (1 + 4) and result.repeats == 4
    assert not any(model.grad_seen) and model.training
    with pytest.raises(ValueError, match="at least one batch"):
        pass_latency(model, [])


def test_interleaved_pass_latency_alternates_models_per_round():
    order: list[str] = []
    models = {}
    for name in ("a", "b"):
        model = _CountingLinear()
        model.register_forward_pre_hook(lambda m, args, name=name: order.append(name))
        models[name] = model
    batches = [{"input": torch.randn(2, 16)}, {"input": torch.randn(1, 16)}]
    results = interleaved_pass_latency(models, batches, rounds=3, warmup=1)
    assert order == ["a"] * 2 + ["b"] * 2 + ["a", "a", "b", "b"] * 3
    assert all(r.repeats == 3 for r in results.values())


def test_interleaved_latency_visits_every_model_in_each_round():
    calls: list[str] = []

    class Named(torch.nn.Linear):
        def __init__(self, name: str) -> None:
            super().__init__(4, 4)
            self.name = name

        def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - mirror nn.Linear's signature
            calls.append(self.name)
            return super().forward(input)

    results = interleaved_latency({"a": Named("a"), "b": Named("b")}, {"input": torch.randn(2, 4)}, rounds=3,
                                  repeats=2, warmup=1)
    assert calls == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
    assert set(results) == {"a", "b"}
    for result in results.values():  # every timed call of every round pooled
        assert result.repeats == 6 and len(result.times_s) == 6
        assert result.median_s == pytest.approx((sorted(result.times_s)[2] + sorted(result.times_s)[3]) / 2)
    with pytest.raises(ValueError, match="rounds"):
        interleaved_latency({"a": Named("a")}, {"input": torch.randn(2, 4)}, rounds=0)


# ---- training memory (subprocess) ------------------------------------------------------------------


def test_training_job_validation():
    with pytest.raises(ValueError, match="module:function"):
        TrainingJob(factory="no_colon_here")
    with pytest.raises(ValueError, match="JSON"):
        TrainingJob(factory="tests.test_recipe_measure:tiny_factory", kwargs={"t": torch.zeros(1)})
    with pytest.raises(ValueError, match="importable"):
        TrainingJob.from_callable(lambda: None)
    job = TrainingJob.from_callable(tiny_factory, kwargs={"hidden": 8}, steps=2)
    assert job.factory == "tests.test_recipe_measure:tiny_factory"
    assert TrainingJob.from_json(job.to_json()) == job


@pytest.mark.slow
def test_peak_training_memory_small_vs_large():
    small = peak_training_memory(TrainingJob("tests.test_recipe_measure:tiny_factory", {"hidden": 64}, steps=3))
    large = peak_training_memory(tiny_factory, kwargs={"hidden": 64, "extra_mb": 200}, steps=3)
    for res in (small, large):
        assert res.baseline_rss_mb > 0
        assert res.peak_rss_mb >= res.baseline_rss_mb
        assert res.increase_mb > 0
        assert res.increase_mb == pytest.approx(res.peak_rss_mb - res.baseline_rss_mb)
        assert res.trainable_params == 32 * 64 + 64 + 64 + 1 == res.total_params
        assert res.steps == 3 and len(res.losses) == 3
        assert res.step_time_median_s > 0 and res.step_time_mean_s > 0
        assert res.device == "cpu" and res.cuda_peak_allocated_mb is None
    # the 200 MB transient buffer must show up in the peak, the tiny MLP alone must not come close
    assert large.increase_mb - small.increase_mb > 150, (small, large)
    assert small.increase_mb < 100, small


@pytest.mark.slow
def test_on_step_end_runs_after_each_step_with_its_number():
    grows = peak_training_memory(growing_factory, kwargs={"grow_after": 2}, steps=3)
    never = peak_training_memory(growing_factory, kwargs={"grow_after": 3}, steps=3)  # after the last step
    assert grows.increase_mb - never.increase_mb > 150, (grows, never)


@pytest.mark.slow
def test_training_setup_counts_on_train_begin_and_builds_the_optimizer_after_it():
    counted = peak_training_memory(setup_factory, kwargs={"in_train_begin": True}, steps=2)
    before_baseline = peak_training_memory(setup_factory, kwargs={"in_train_begin": False}, steps=2)
    assert counted.increase_mb - before_baseline.increase_mb > 150, (counted, before_baseline)
    assert counted.trainable_params == before_baseline.trainable_params == 32 * 64 + 64 + 64 + 1
    assert all(math.isfinite(x) for x in counted.losses)


def test_factory_results_are_validated():
    from common.memory import _as_setup

    model, batches, optimizer = tiny_factory()
    assert _as_setup((model, batches, optimizer), "f").on_step_end is None
    with pytest.raises(TypeError, match="must return a TrainingSetup"):
        _as_setup(model, "f")
    with pytest.raises(TypeError, match="callable on_step_end"):
        _as_setup((model, batches, optimizer, 3), "f")
    with pytest.raises(TypeError, match="on_step_end must be callable"):
        TrainingSetup(model, batches, optimizer, on_step_end=3)
    with pytest.raises(TypeError, match="on_train_begin must be callable"):
        TrainingSetup(model, batches, optimizer, on_train_begin="prune")
    with pytest.raises(TypeError, match="non-empty list"):
        TrainingSetup(model, [], optimizer)
    with pytest.raises(TypeError, match="zero-argument callable"):
        TrainingSetup(model, batches, 0.1)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        TrainingSetup("model", batches, optimizer)


@pytest.mark.slow
def test_peak_training_memory_child_error_surfaces():
    with pytest.raises(TrainingJobError, match="boom-from-child-factory") as info:
        peak_training_memory("tests.test_recipe_measure:failing_factory", steps=1)
    assert "exit status 1" in str(info.value)


