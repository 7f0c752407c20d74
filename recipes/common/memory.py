"""Peak training memory, measured in a fresh subprocess per configuration.

A process's resident set high-water mark (``VmHWM``) only ever grows and the allocator keeps freed pages
around: measuring two configurations in one process makes the second depend on the first. A
:class:`TrainingJob` is therefore a serialisable description ("module:function" factory plus JSON-able
kwargs), not a live model.

The RSS high-water mark includes the Python/torch baseline (about 0.5 GB with MiniLM loaded on CPU), so
the figure that matters for comparing methods is ``increase_mb``: peak RSS during training minus RSS after
the model and batches were built and before the first step. The optimizer counts when the setup builds it
lazily (:class:`TrainingSetup` with a zero-argument builder, called after ``on_train_begin``); one passed
ready-made is part of the baseline. Work that belongs to the method rather than to loading (e.g. scoring
and pruning before training) goes in :attr:`TrainingSetup.on_train_begin`, which runs after that
baseline, so its memory counts.

:func:`rss_mb`, :func:`peak_rss_mb` and :func:`reset_peak_rss` are the readings themselves, for code that measures
a phase of a process that is already fresh (the benchmark's rows, a recipe's training loop).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import compress
from common.device import model_device, sync, to_device
from compress.measure.static import count_parameters

logger = logging.getLogger(__name__)

_MB = 1024 * 1024
# glibc grows its mmap threshold dynamically after large frees, after which big tensors are carved out of
# the brk heap and their pages stay resident when freed: RSS then depends on allocation history rather
# than on what is live. Pinning both thresholds disables that adaptation, so large buffers are always
# mmap'd (and returned to the OS on free) and heap trimming is predictable -> steadier, comparable peaks.
DEFAULT_MALLOC_ENV: dict[str, str] = {
    "MALLOC_MMAP_THRESHOLD_": str(128 * 1024),
    "MALLOC_TRIM_THRESHOLD_": str(128 * 1024),
}
_STDERR_TAIL_CHARS = 4000


class TrainingJobError(RuntimeError):
    """A training-memory child process failed; the message carries its exit status and stderr tail."""


@dataclass(frozen=True)
class TrainingJob:
    """Serialisable description of a training run to measure in a fresh process.

    Factory contract: ``factory`` is ``"package.module:function"`` (importable in the child, whose working
    directory and ``sys.path`` roots match the parent's) and is called as ``function(**kwargs)``. It must
    return ``(model, batches, optimizer)``:

    * ``model``: a ``torch.nn.Module`` already on the device to measure (CPU or CUDA);
    * ``batches``: a non-empty ``list[dict]``; step ``i`` uses ``batches[i % len(batches)]``, tensors are
      moved to the model's device;
    * ``optimizer``: a ``torch.optim.Optimizer`` over the parameters to train.

    Each step runs ``loss = model(**batch).loss`` (a mapping with ``"loss"`` or a scalar tensor output also
    works), ``loss.backward()``, ``optimizer.step()``, ``optimizer.zero_grad(set_to_none=True)``.
    The factory may return a fourth element, ``on_step_end(step)``, called after each optimizer step with
    the 1-based step number (what a ``TrainerCallback.on_step_end`` would do, e.g. prune on a schedule),
    or a :class:`TrainingSetup`, which can also run measured work before the first step.
    ``kwargs`` must be JSON-serialisable. ``num_threads`` (if set) is applied with
    ``torch.set_num_threads`` in the child only; ``seed`` is passed to ``torch.manual_seed`` before the
    factory runs.
    """

    factory: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    steps: int = 5
    seed: int | None = 0
    num_threads: int | None = None

    def __post_init__(self) -> None:
        module, sep, qualname = self.factory.partition(":")
        if not (module and sep and qualname):
            raise ValueError(f"factory must look like 'package.module:function', got {self.factory!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        try:
            json.dumps(self.kwargs)
        except TypeError as exc:
            raise ValueError(f"TrainingJob kwargs must be JSON-serialisable: {exc}") from exc

    @classmethod
    def from_callable(cls, fn: Callable[..., Any], **fields: Any) -> TrainingJob:
        """Build a job from a module-level function (not a lambda, local function or ``__main__`` one)."""
        module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
        if not module or module == "__main__" or "<" in qualname:
            raise ValueError(
                f"{fn!r} is not importable from a fresh process; define it at module level in an "
                "importable module, or pass 'module:function'"
            )
        return cls(factory=f"{module}:{qualname}", **fields)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainingJob:
        return cls(**json.loads(text))


@dataclass
class TrainingSetup:
    """What a :class:`TrainingJob` factory may return instead of a tuple.

    Attributes:
        model: the ``torch.nn.Module`` to train, already on the device to measure.
        batches: a non-empty ``list[dict]`` of model inputs with labels.
        optimizer: a ``torch.optim.Optimizer``, or a zero-argument callable that builds one; a callable is
            called after ``on_train_begin`` (whose work may replace parameters, e.g. pruning).
        on_train_begin: zero-argument callable run after the baseline memory snapshot and before step 1, so
            its memory counts as training memory (what ``TrainerCallback.on_train_begin`` or a method's own
            pre-training phase does: calibration, scoring, pruning).
        on_step_end: called after each optimizer step with the 1-based step number.
    """

    model: torch.nn.Module
    batches: list[dict]
    optimizer: torch.optim.Optimizer | Callable[[], torch.optim.Optimizer]
    on_train_begin: Callable[[], Any] | None = None
    on_step_end: Callable[[int], Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, torch.nn.Module):
            raise TypeError(f"TrainingSetup.model must be a torch.nn.Module, got {type(self.model).__name__}")
        if not isinstance(self.batches, list) or not self.batches:
            raise TypeError("TrainingSetup.batches must be a non-empty list of model-input dicts")
        if not (isinstance(self.optimizer, torch.optim.Optimizer) or callable(self.optimizer)):
            raise TypeError("TrainingSetup.optimizer must be a torch.optim.Optimizer or a zero-argument callable "
                            "that builds one")
        for name in ("on_train_begin", "on_step_end"):
            if getattr(self, name) is not None and not callable(getattr(self, name)):
                raise TypeError(f"TrainingSetup.{name} must be callable or None")


def _as_setup(built: Any, factory: str) -> TrainingSetup:
    if isinstance(built, TrainingSetup):
        return built
    expected = f"factory {factory!r} must return a TrainingSetup or (model, batches, optimizer[, on_step_end])"
    try:
        model, batches, optimizer, *rest = built
    except (TypeError, ValueError) as exc:
        raise TypeError(expected) from exc
    if len(rest) > 1 or (rest and not callable(rest[0])):
        raise TypeError(f"{expected} with a callable on_step_end")
    return TrainingSetup(model, batches, optimizer, on_step_end=rest[0] if rest else None)


@dataclass(frozen=True)
class TrainingMemoryResult:
    """Memory and speed of one :class:`TrainingJob`, measured in its own process.

    ``increase_mb`` (``peak_rss_mb - baseline_rss_mb``) is the comparable figure; absolute RSS includes the
    interpreter and torch. ``hwm_reset`` says whether the RSS high-water mark could be reset to the
    baseline before step 1 (Linux ``/proc/self/clear_refs``); when it could not, ``peak_rss_mb`` may
    reflect a transient during model construction (``load_peak_rss_mb``) rather than training.
    """

    factory: str
    steps: int
    peak_rss_mb: float
    baseline_rss_mb: float
    increase_mb: float
    load_peak_rss_mb: float
    hwm_reset: bool
    step_time_mean_s: float
    step_time_median_s: float
    first_step_s: float
    trainable_params: int
    total_params: int
    device: str
    cuda_peak_allocated_mb: float | None = None
    cuda_baseline_allocated_mb: float | None = None
    losses: tuple[float, ...] = field(default=(), repr=False)

    @property
    def cuda_increase_mb(self) -> float | None:
        if self.cuda_peak_allocated_mb is None or self.cuda_baseline_allocated_mb is None:
            return None
        return self.cuda_peak_allocated_mb - self.cuda_baseline_allocated_mb


def _proc_status_kb(key: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``), or None off Linux."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{key}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


def _maxrss_mb() -> float:
    """Peak RSS via getrusage (kB on Linux, bytes on macOS)."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / _MB if sys.platform == "darwin" else maxrss / 1024


def rss_mb() -> float:
    """This process's resident set size now, in MB (``VmRSS``; off Linux, the high-water mark instead)."""
    kb = _proc_status_kb("VmRSS")
    return kb / 1024 if kb is not None else _maxrss_mb()


def peak_rss_mb() -> float:
    """This process's resident set high-water mark, in MB (``VmHWM``, or ``getrusage``): the largest RSS since the
    process started or since :func:`reset_peak_rss`."""
    kb = _proc_status_kb("VmHWM")
    return kb / 1024 if kb is not None else _maxrss_mb()


def reset_peak_rss() -> bool:
    """Reset the high-water mark to the current RSS (Linux >= 4.0, ``echo 5 > /proc/self/clear_refs``); whether it
    could. Where it cannot, :func:`peak_rss_mb` keeps including what came before."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True



def resolve_callable(spec: str) -> Callable[..., Any]:
    """The callable a ``"module:qualified.name"`` spec names (how a fresh process is told what to run)."""
    module_name, _, qualname = spec.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"factory {spec!r} is not callable")
    return obj


def _loss_of(output: Any) -> torch.Tensor:
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, Mapping):
        loss = output.get("loss")
    if loss is None and isinstance(output, torch.Tensor) and output.dim() == 0:
        loss = output
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"model output {type(output).__name__} has no loss: pass labels in the batches, or return an "
            "object with .loss / a mapping with 'loss' / a scalar tensor"
        )
    return loss


def _run_training_job(job: TrainingJob) -> TrainingMemoryResult:
    """Child-side body: build, snapshot baseline memory, train ``job.steps`` steps, report."""
    if job.num_threads is not None:
        torch.set_num_threads(job.num_threads)
    if job.seed is not None:
        torch.manual_seed(job.seed)
    setup = _as_setup(resolve_callable(job.factory)(**job.kwargs), job.factory)
    if not setup.batches:
        raise ValueError(f"factory {job.factory!r} returned no batches")
    model = setup.model
    device = model_device(model)
    batches = [to_device(b, device) for b in setup.batches]
    model.train()

    on_cuda = device.type == "cuda"
    cuda_baseline = None
    if on_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        cuda_baseline = torch.cuda.memory_allocated(device) / _MB
    load_peak = peak_rss_mb()
    hwm_reset = reset_peak_rss()
    baseline = rss_mb()

    if setup.on_train_begin is not None:
        setup.on_train_begin()
        model.train()
    optimizer = setup.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        if not callable(optimizer):
            raise TypeError(f"factory {job.factory!r}: optimizer must be a torch Optimizer or a callable that "
                            f"builds one, got {type(optimizer).__name__}")
        optimizer = optimizer()
    optimizer.zero_grad(set_to_none=True)
    on_step_end = setup.on_step_end

    times: list[float] = []
    losses: list[float] = []
    for step in range(job.steps):
        start = time.perf_counter()
        loss = _loss_of(model(**batches[step % len(batches)]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step_end is not None:
            on_step_end(step + 1)
        sync(device)
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))

    peak = peak_rss_mb()
    timed = times[1:] or times
    return TrainingMemoryResult(
        factory=job.factory,
        steps=job.steps,
        peak_rss_mb=peak,
        baseline_rss_mb=baseline,
        increase_mb=peak - baseline,
        load_peak_rss_mb=load_peak,
        hwm_reset=hwm_reset,
        step_time_mean_s=statistics.fmean(timed),
        step_time_median_s=statistics.median(timed),
        first_step_s=times[0],
        trainable_params=count_parameters(model, trainable_only=True),
        total_params=count_parameters(model),
        device=str(device),
        cuda_peak_allocated_mb=torch.cuda.max_memory_allocated(device) / _MB if on_cuda else None,
        cuda_baseline_allocated_mb=cuda_baseline,
        losses=tuple(losses),
    )


def _child_main(argv: Sequence[str]) -> int:
    """Entry point of the measuring child: ``argv = [job_json, result_path]``."""
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    job_json, result_path = argv
    result = _run_training_job(TrainingJob.from_json(job_json))
    Path(result_path).write_text(json.dumps(dataclasses.asdict(result)))
    return 0


_CHILD_CODE = "import sys; from common.memory import _child_main; sys.exit(_child_main(sys.argv[1:]))"


def child_env(extra_env: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """The environment of a measuring child process: this one's, with :data:`DEFAULT_MALLOC_ENV`, ``recipes/``,
    this copy of ``compress`` and the working directory on ``PYTHONPATH``, and ``extra_env`` (``None`` values
    removed)."""
    env = dict(os.environ)
    env.update(DEFAULT_MALLOC_ENV)
    # Make `common` (the recipes' folder, which holds this file's package), this very copy of `compress` and the
    # parent's working directory importable in the child.
    recipes_folder = str(Path(__file__).resolve().parents[1])
    package_root = str(Path(compress.__file__).resolve().parents[1])  # the folder holding the parent's `compress`
    roots = [recipes_folder, package_root, os.getcwd()]
    if env.get("PYTHONPATH"):
        roots.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(roots)
    for key, value in (extra_env or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _tail(text: str, limit: int = _STDERR_TAIL_CHARS) -> str:
    return text if len(text) <= limit else "...\n" + text[-limit:]


def peak_training_memory(
    job: TrainingJob | str | Callable[..., Any],
    *,
    kwargs: Mapping[str, Any] | None = None,
    steps: int | None = None,
    timeout_s: float = 900.0,
    extra_env: Mapping[str, str | None] | None = None,
) -> TrainingMemoryResult:
    """Peak memory and step time of ``steps`` training steps, measured in a fresh Python process.

    ``job`` is a :class:`TrainingJob`, a ``"module:function"`` factory spec or a module-level factory
    function (see :class:`TrainingJob` for the factory contract); ``kwargs``/``steps`` override the job's.
    The child runs with :data:`DEFAULT_MALLOC_ENV` (pinned glibc thresholds, for peaks that reflect live
    memory rather than allocator history) plus ``extra_env``, where a ``None`` value removes a variable
    (``{"MALLOC_MMAP_THRESHOLD_": None, "MALLOC_TRIM_THRESHOLD_": None}`` restores glibc's defaults).
    A failing or timed-out child raises :class:`TrainingJobError` with the tail of its stderr.
    """
    if isinstance(job, str):
        job = TrainingJob(factory=job)
    elif not isinstance(job, TrainingJob):
        job = TrainingJob.from_callable(job)
    overrides: dict[str, Any] = {}
    if kwargs is not None:
        overrides["kwargs"] = dict(kwargs)
    if steps is not None:
        overrides["steps"] = steps
    if overrides:
        job = dataclasses.replace(job, **overrides)

    with tempfile.TemporaryDirectory(prefix="compress-measure-") as tmp:
        result_path = Path(tmp, "result.json")
        cmd = [sys.executable, "-c", _CHILD_CODE, job.to_json(), str(result_path)]
        logger.info("measuring training memory of %s (%d steps) in a subprocess", job.factory, job.steps)
        try:
            proc = subprocess.run(
                cmd, env=child_env(extra_env), capture_output=True, text=True, timeout=timeout_s
            )
        except subprocess.TimeoutExpired as exc:
            stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr
            raise TrainingJobError(
                f"training job {job.factory} timed out after {timeout_s:g} s; "
                f"stderr tail:\n{_tail(stderr or '')}"
            ) from exc
        if proc.returncode != 0 or not result_path.exists():
            raise TrainingJobError(
                f"training job {job.factory} failed in the child process (exit status {proc.returncode}); "
                f"stderr tail:\n{_tail(proc.stderr)}"
            )
        data = json.loads(result_path.read_text())
    data["losses"] = tuple(data["losses"])
    result = TrainingMemoryResult(**data)
    logger.info(
        "%s: peak RSS %.1f MB, baseline %.1f MB, increase %.1f MB",
        job.factory, result.peak_rss_mb, result.baseline_rss_mb, result.increase_mb,
    )
    return result
