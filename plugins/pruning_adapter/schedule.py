"""Pruning-Adapter's training-time schedule: importance from the training batches, and when to prune.

:class:`PruningSchedule` holds what exists only while training: the gates whose gradients score the
structures, the running importance statistics, the input means of bias compensation, and whether it switched
activation checkpointing on. Each training step, :meth:`PruningSchedule.update` folds the step's gate gradients in
and, at a pruning step, gives the :class:`~.pruning.PruningEvent` due, which the model applies:
:class:`~compress.plugins.pruning_adapter.PruningAdapterCallback` calls the model's ``update_and_prune`` once per
step (and ``start_scoring``/``stop_scoring`` when training starts and ends).

Which events already happened is the config's ``pruning_plan``; the next one follows from the training step.
The statistics gathered since the last event are the only other state a checkpoint must keep:
:meth:`PruningSchedule.state_dict` gives them to the tuner, which saves them with the adapter weights, and
:meth:`PruningSchedule.load_state_dict` takes them back when a checkpoint is loaded.
"""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from compress.distributed import active_ddp, all_reduce_mean, all_reduce_sum, check_unsharded, world_size
from compress.errors import CompressError
from compress.pruning.arch import arch_spec
from compress.pruning.compensate import InputMeans, record_input_means
from compress.pruning.engine import score_units
from compress.pruning.importance import attach_gates, get_importance

from .config import PruningAdapterConfig
from .plan import recorded_widths
from .pruning import PruningEvent, plan_event, total_width, units_of

logger = logging.getLogger(__name__)

#: state-dict keys of the schedule's statistics start with this (then ``stat.``, ``mean_sum.`` or ``mean_count.``
#: and the unit key)
SCHEDULE_PREFIX = "pa_schedule."
_FIELDS = ("stat", "mean_sum", "mean_count")


def cubic_sparsity(step: int, final: float, end_step: int) -> float:
    """Sparsity reached at ``step`` on the cubic schedule of Zhu & Gupta (2017), from 0 to ``final``."""
    progress = min(max(step / end_step, 0.0), 1.0)
    return final * (1.0 - (1.0 - progress) ** 3)


@dataclass
class DueStep:
    """A pruning step of the schedule: the event due (``None`` when the model already has the scheduled widths),
    and whether it is the last."""

    event: PruningEvent | None
    final: bool


class PruningSchedule:
    """Scores a Pruning-Adapter model's structures on its training batches and tells when to prune, and what.

    Gate gradients come from the same backward pass that trains the adapters. ``oneshot`` sums them over
    ``scoring_steps`` steps and prunes once; ``progressive`` keeps an exponential moving average and prunes
    every ``pruning_interval`` steps along :func:`cubic_sparsity`. Its methods take the model (the adapted
    transformers model) and its config.
    """

    def __init__(self) -> None:
        self._gates_ctx = None
        self._gates: dict[str, torch.Tensor] = {}
        self._stats: dict[str, torch.Tensor] = {}
        self._means_ctx = None
        self._means: InputMeans | None = None
        self._checkpointing_by_us = False
        #: the DistributedDataParallel wrapper training the model (seen in its forward), re-registered after pruning
        #: (a weak reference: the schedule must not keep the wrapper alive, nor take it along into copies)
        self._ddp: weakref.ref[torch.nn.Module] | None = None
        self._ddp_hook = None
        #: statistics loaded from a checkpoint, taken up by the next :meth:`start`
        self._pending: dict[str, dict[str, torch.Tensor]] | None = None

    @property
    def active(self) -> bool:
        """Whether gates are attached (scoring is under way)."""
        return self._gates_ctx is not None

    @staticmethod
    def steps(config: PruningAdapterConfig) -> list[int]:
        """Training steps (``global_step`` after the optimizer step) at which pruning happens."""
        if config.schedule == "oneshot":
            return [config.scoring_steps]
        steps = list(range(config.scoring_steps, config.pruning_end_step, config.pruning_interval))
        return steps + [config.pruning_end_step]

    def start(self, model: nn.Module, config: PruningAdapterConfig) -> None:
        """Attach gates so the training loss gives importance gradients; no-op once pruning is finished.

        Statistics loaded from a checkpoint (:meth:`load_state_dict`) are taken up here, so scoring goes on
        from where the checkpointed run was.
        """
        if config.pruning_finished or self._gates_ctx is not None:
            return
        check_unsharded(model, "prune a Pruning-Adapter model during training")
        criterion = get_importance(config.spec.importance)
        if criterion.needs_calibration and not getattr(criterion, "needs_gradients", True):
            raise CompressError(f"importance={config.importance!r} scores on calibration data, not on "
                                "gate gradients of the training batches: prune with model.base_model.prune(data=...) "
                                "before training instead of the callback")
        units = units_of(model, config)
        self._gates_ctx = attach_gates(units)
        self._gates = self._gates_ctx.__enter__()
        self._stats = {}
        self._ddp_hook = model.register_forward_pre_hook(self._note_ddp)
        if config.compensate_bias:
            self._means_ctx = record_input_means(model, units)
            self._means = self._means_ctx.__enter__()
        if self._pending is not None:
            self._take_up(self._pending)
            self._pending = None
        if config.checkpoint_until_pruned:
            self.set_checkpointing(model, True)

    def stop(self, model: nn.Module, keep_checkpointing: bool = False) -> None:
        """Detach the gates (and stop checkpointing, unless ``keep_checkpointing``: more pruning follows)."""
        if not keep_checkpointing:
            self.set_checkpointing(model, False)
        if self._gates_ctx is not None:
            self._gates_ctx.__exit__(None, None, None)
        if self._means_ctx is not None:
            self._means_ctx.__exit__(None, None, None)
        if self._ddp_hook is not None:
            self._ddp_hook.remove()
            self._ddp_hook = None
        self._gates_ctx, self._gates, self._stats = None, {}, {}
        self._means_ctx, self._means = None, None

    def set_checkpointing(self, model: nn.Module, on: bool) -> None:
        """Recompute activations in the backward pass while the model is still (partly) dense."""
        if not getattr(model, "supports_gradient_checkpointing", False):
            if on:
                logger.warning("%s does not support gradient checkpointing: checkpoint_until_pruned has no effect",
                               type(model).__name__)
            return
        if on and not model.is_activation_checkpointing:
            # non-reentrant: the frozen embeddings give inputs without grad, which the reentrant variant drops
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            self._checkpointing_by_us = True
        elif not on and self._checkpointing_by_us:
            model.activation_checkpointing_disable()
            self._checkpointing_by_us = False

    def update(self, model: nn.Module, config: PruningAdapterConfig, global_step: int) -> DueStep | None:
        """Fold this step's gate gradients into the importance estimate; at a pruning step, stop scoring and give
        the event due (``None`` between pruning steps). Scoring starts again with :meth:`start` after the model
        applied a step that is not the last."""
        if self._gates_ctx is None:
            return None
        beta = config.ema_beta if config.schedule == "progressive" else 1.0
        fisher = config.spec.importance == "fisher"
        # each rank saw its shard of the batch: average the gradients so every rank scores the global batch
        all_reduce_mean([gate.grad for _, gate in sorted(self._gates.items()) if gate.grad is not None])
        for key, gate in self._gates.items():
            if gate.grad is None:
                continue
            grad = gate.grad.detach().float()
            stat = grad.pow(2) if fisher else grad.abs()
            previous = self._stats.get(key)
            # oneshot sums over the scoring steps; progressive keeps a moving average
            self._stats[key] = stat if previous is None else (
                previous + stat if beta == 1.0 else beta * previous + (1 - beta) * stat)
            gate.grad = None
        steps = self.steps(config)
        if global_step not in steps:
            return None
        units = units_of(model, config)
        criterion = get_importance(config.spec.importance)
        if criterion.needs_calibration:
            missing = [u.key for u in units if u.key not in self._stats]
            if missing:
                raise CompressError(f"no gate gradients reached {missing[:3]}...: is the model training with a loss?")
            scores = {u.key: self._stats[u.key].cpu() for u in units}
        else:
            scores = score_units(model, units, criterion, None)
        final = global_step == steps[-1]
        sparsity = self.sparsity_at(model, config, global_step, final)
        means = self._reduced_means()
        self.stop(model, keep_checkpointing=not final)
        event = plan_event(model, config, sparsity, scores, final=final, means=means, step=global_step) \
            if sparsity else None
        return DueStep(event, final)

    def ddp(self) -> nn.Module | None:
        """The ``DistributedDataParallel`` wrapper training the model, if one ran its forward (its buckets are
        rebuilt after pruning)."""
        return self._ddp() if self._ddp is not None else None

    def _note_ddp(self, module: torch.nn.Module, args) -> None:
        ddp = active_ddp()
        if ddp is not None:
            self._ddp = weakref.ref(ddp)

    def _reduced_means(self) -> dict[str, torch.Tensor] | None:
        """The input means for bias compensation, over every rank's batches."""
        if not self._means:
            return None
        if world_size() == 1:
            return self._means.means()
        totals = sorted(self._means.totals().items())
        sums = [total.detach().clone() for _, (total, _) in totals]
        counts = torch.tensor([count for _, (_, count) in totals], dtype=torch.float64, device=sums[0].device)
        all_reduce_sum([*sums, counts])
        return {key: total / count for (key, _), total, count in zip(totals, sums, counts.tolist()) if count > 0}

    @staticmethod
    def sparsity_at(model: nn.Module, config: PruningAdapterConfig, step: int, final: bool) -> dict[str, float]:
        """Sparsity relative to the *current* widths that reaches the scheduled sparsity of the original widths."""
        current = recorded_widths(arch_spec(model), "hidden" in config.spec.sparsity)
        original = config.pruning_plan[0]["widths_before"] if config.pruning_plan else current
        sparsity = {}
        for structure, target in config.spec.sparsity.items():
            scheduled = target if (final or config.schedule == "oneshot") else cubic_sparsity(
                step, target, config.pruning_end_step)
            keep = math.floor((1 - scheduled) * total_width(original, structure) + 0.5)
            now = total_width(current, structure)
            if now > keep:
                sparsity[structure] = (now - keep) / now
        return sparsity

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """The statistics gathered since the last pruning event, as state-dict entries (empty when not scoring)."""
        if self._gates_ctx is None and self._pending is not None:
            return {f"{SCHEDULE_PREFIX}{field}.{key}": value  # loaded but not started yet: pass them on unchanged
                    for field, entries in self._pending.items() for key, value in entries.items()}
        entries = {f"{SCHEDULE_PREFIX}stat.{key}": stat.detach() for key, stat in self._stats.items()}
        for key, (total, count) in (self._means.totals() if self._means is not None else {}).items():
            entries[f"{SCHEDULE_PREFIX}mean_sum.{key}"] = total.detach()
            entries[f"{SCHEDULE_PREFIX}mean_count.{key}"] = torch.tensor(count, dtype=torch.float64)
        return entries

    def load_state_dict(self, entries: dict[str, torch.Tensor]) -> None:
        """Take statistics saved by :meth:`state_dict` (keys with :data:`SCHEDULE_PREFIX`); applied at once
        while scoring, otherwise by the next :meth:`start`."""
        parsed: dict[str, dict[str, torch.Tensor]] = {field: {} for field in _FIELDS}
        for name, value in entries.items():
            field, _, key = name.removeprefix(SCHEDULE_PREFIX).partition(".")
            if field not in parsed or not key:
                raise CompressError(f"unknown entry {name!r} among the schedule state saved with the adapter weights: "
                                    "the file was not written by this version of peft-compress")
            parsed[field][key] = value
        if set(parsed["mean_sum"]) != set(parsed["mean_count"]):
            raise CompressError("the schedule state saved with the adapter weights has input sums without counts "
                                "(or counts without sums): the file is damaged")
        if self._gates_ctx is not None:
            self._take_up(parsed)
        else:
            self._pending = parsed

    def _take_up(self, parsed: dict[str, dict[str, torch.Tensor]]) -> None:
        sizes = {key: gate.shape for key, gate in self._gates.items()}
        for key, stat in parsed["stat"].items():
            if key not in sizes or stat.shape != sizes[key]:
                raise CompressError(
                    f"the importance statistics saved with the checkpoint do not fit the model: unit {key!r} "
                    f"has {tuple(stat.shape)} saved and {tuple(sizes[key]) if key in sizes else 'no such unit'} now; "
                    "resume with the configuration the run was started with")
            self._stats[key] = stat.to(self._gates[key].device, torch.float32)
        if parsed["mean_sum"] and self._means is None:
            raise CompressError("the checkpoint holds input means for bias compensation but compensate_bias is off: "
                                "resume with the configuration the run was started with")
        for key, total in parsed["mean_sum"].items():
            device = self._gates[key].device if key in self._gates else total.device
            self._means.add(key, total.to(device, torch.float32), float(parsed["mean_count"][key]))
