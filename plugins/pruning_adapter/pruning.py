"""Pruning events of a Pruning-Adapter model: what one event removes, planned and checked against the model.

A *pruning event* plans which channels, heads and blocks go (:func:`compress.pruning.plan.plan_removals`) and
checks the removal against the model (:func:`compress.pruning.surgery.check_removals`): :func:`plan_event` gives a
:class:`PruningEvent`, and :func:`oneshot_event` one to the final sparsity from scores on calibration data. Nothing
changes before :meth:`~compress.plugins.pruning_adapter.PruningAdapterModel.apply_event` applies it: folding the
removed channels' mean contribution into the adapters' bias buffers (``compensate_bias``, :func:`compensate`),
removing them from the backbone and the adapters together, slicing an optimizer's parameters and state to match, and
appending the event to the config's ``pruning_plan``. The training-time schedule (:mod:`.schedule`) gives its events
the same way.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from compress.distributed import check_same_on_ranks, check_unsharded
from compress.errors import CompressError
from compress.pruning.arch import arch_spec, base_model_type
from compress.pruning.compensate import bias_shifts, output_projection, record_input_means
from compress.pruning.engine import forward_passes, score_units
from compress.pruning.importance import Unit, get_importance, units_for
from compress.pruning.plan import plan_removals, width_cap
from compress.pruning.spec import RECONSTRUCTED_STRUCTURES
from compress.pruning.surgery import CheckedRemovals, check_removals, widths_after

from .config import PruningAdapterConfig
from .layer import PruningAdapterLayer
from .plan import recorded_widths

logger = logging.getLogger(__name__)


@dataclass
class PruningEvent:
    """One pruning event, planned and checked against the model as it is now; applying it is the model's
    (:meth:`~compress.plugins.pruning_adapter.PruningAdapterModel.apply_event`)."""

    #: the fraction of each structure's current width removed
    sparsity: dict[str, float]
    #: the removal, checked: units, removed indices per unit key, and how to carry it out
    checked: CheckedRemovals
    #: the widths before the event, as the plan records them
    widths_before: dict[str, list[int]]
    #: whether the event reaches the configured sparsity
    final: bool
    #: mean input of the removed channels' output projections, for ``compensate_bias``
    means: dict[str, torch.Tensor] | None = None
    #: the training step of an event the schedule gave
    step: int | None = None

    def record(self, model: nn.Module) -> dict:
        """The entry of ``pruning_plan`` for this event, once ``model`` is pruned by it."""
        hidden = "hidden" in self.widths_before
        event = {"structures": sorted(self.sparsity), "removed": {k: v for k, v in self.checked.removals.items() if v},
                 "widths_before": self.widths_before, "widths_after": recorded_widths(arch_spec(model), hidden),
                 "final": self.final}
        if self.step is not None:  # pruned by the schedule: errors about this event can name its training step
            event["step"] = self.step
        return event


def total_width(widths: dict[str, list[int]], structure: str) -> int:
    """The summed width of ``structure`` over the model (kv heads fall back to heads when there is no GQA; the hidden
    size is one number)."""
    if structure == "kv_heads":
        return sum(widths.get("kv_heads", widths["heads"]))
    return sum(widths[structure])


def units_of(model: nn.Module, config: PruningAdapterConfig) -> list[Unit]:
    """The units of every configured structure, in the model as it is now."""
    return units_for(arch_spec(model), config.spec.sparsity)


def oneshot_event(model: nn.Module, config: PruningAdapterConfig, data=None, tokenizer=None, num_batches: int = 8,
                  batch_size: int = 16) -> PruningEvent:
    """Score the structures of ``model`` on calibration ``data`` (gate gradients only) and plan the event that prunes
    them to the final sparsity; see :meth:`PruningAdapterModel.prune`."""
    if config.pruning_finished:
        raise CompressError("this model is already pruned to its configured sparsity")
    criterion = get_importance(config.spec.importance)
    if criterion.needs_calibration and data is None:
        raise CompressError(f"importance={config.importance!r} needs calibration data: pass data=, "
                            "or train with PruningAdapterCallback to score on the training batches")
    batches = None
    if data is not None:
        from compress.data import calibration_batches

        batches = calibration_batches(data, batch_size=batch_size, num_batches=num_batches, tokenizer=tokenizer)
    units = units_of(model, config)
    recording = record_input_means(model, units) if config.compensate_bias and batches else None
    with recording or contextlib.nullcontext() as recorder:
        scores = score_units(model, units, criterion, batches if criterion.needs_calibration else None)
        if recorder is not None and not criterion.needs_calibration:
            forward_passes(model, batches)  # magnitude/random scores ran no pass: measure the means anyway
    means = recorder.means() if recorder is not None else None
    return plan_event(model, config, dict(config.spec.sparsity), scores, final=True, means=means)


def plan_event(model: nn.Module, config: PruningAdapterConfig, sparsity: dict[str, float],
               scores: dict[str, torch.Tensor], final: bool, means: dict[str, torch.Tensor] | None = None,
               step: int | None = None) -> PruningEvent:
    """The event that removes ``sparsity`` of the model's current structures by ``scores``, checked against the
    model, and when ``final`` against what the family's config can express (a refused event leaves everything as it
    was)."""
    spec = config.spec
    check_unsharded(model, "prune a Pruning-Adapter model")
    arch = arch_spec(model)
    units = units_for(arch, sparsity)
    removals = plan_removals(arch, units, scores, sparsity, spec.mode, round_to=spec.round_to,
                             normalize=spec.normalize, max_widths=_width_caps(model, config, sparsity))
    check_same_on_ranks(removals, "the channels, heads and blocks chosen for removal")
    if final:  # the widths a saved model has; earlier events of a schedule may pass through others
        arch.check_config_expresses(widths_after(arch, units, removals))
    checked = check_removals(model, arch, units, removals)
    # every event of a plan that prunes the hidden size records it
    widths_before = recorded_widths(arch, "hidden" in spec.sparsity)
    return PruningEvent(sparsity, checked, widths_before, final, means, step)


def _width_caps(model: nn.Module, config: PruningAdapterConfig, sparsity: dict[str, float]) -> dict[str, int] | None:
    """``max_keep`` as per-layer channel caps for one pruning step, against the widths before the first.

    A step that keeps more than ``max_keep`` overall caps each layer at what the step keeps overall, so
    every layer leaves it with the same width and the final cap stays reachable by later steps.
    """
    if config.max_keep is None:
        return None
    current = arch_spec(model).widths()
    original = config.pruning_plan[0]["widths_before"] if config.pruning_plan else current
    caps = {}
    for structure, fraction in sparsity.items():
        if structure in ("layers", "hidden"):
            continue  # max_keep caps per-layer widths of FFN neurons and heads
        width_key = "kv_heads" if structure == "kv_heads" and "kv_heads" in original else "heads"
        widths = original["ffn"] if structure == "ffn" else original[width_key]
        now = total_width(current, structure)
        kept_overall = (now - math.floor(fraction * now + 0.5)) / total_width(original, structure)
        caps[structure] = width_cap(max(widths), 1.0 - kept_overall, config.max_keep)
    return caps


def add_compensation_biases(model: nn.Module, config: PruningAdapterConfig) -> list[str]:
    """With ``compensate_bias``: give the FFN / attention output projections that the configured structures prune
    the bias their family's config can express, as :func:`compress.prune_model` does
    (:meth:`~compress.pruning.arch.ArchSpec.add_output_biases`: Llama's ``mlp_bias`` / ``attention_bias``, zero
    biases that change no output), before the adapter layers are created, so that each holds a ``pa_bias`` that
    merging folds into a bias a standard folder reloads. Where the config cannot express one (Qwen2, T5), one
    warning says that those projections stay uncompensated. Returns the notes of the flags set."""
    if not config.compensate_bias:
        return []
    arch = arch_spec(model)
    structures = [s for s in config.spec.sparsity if s in RECONSTRUCTED_STRUCTURES]
    flags = arch.bias_flags()
    expressible = [s for s in structures if ("ffn" if s == "ffn" else "heads") in flags]
    unexpressed = [("FFN output" if kind == "ffn" else "attention output")
                   for kind in arch._bias_kinds(structures) if kind not in flags]
    if unexpressed:
        model_type = base_model_type(str(getattr(model.config, "model_type", arch.family)))
        logger.warning("compensate_bias: the %s projections have no bias and the %s config cannot give them one, "
                       "so the channels pruned from them are not compensated (the adapters still train on the pruned "
                       "model); set compensate_bias=False to silence this", " and ".join(unexpressed), model_type)
    notes = arch.add_output_biases(expressible)
    for note in notes:
        logger.info("compensate_bias: %s", note)
    return notes


def compensate(event: PruningEvent) -> None:
    """Put the removed channels' mean contribution into the adapters' bias buffers (before the removal)."""
    units, removals, means = event.checked.units, event.checked.removals, event.means
    channel_units = [u for u in units if u.structure in ("ffn", "heads")]
    held = [u for u in channel_units if isinstance(output_projection(u), PruningAdapterLayer)]
    unheld = sorted({u.key for u in channel_units if removals.get(u.key)} - {u.key for u in held})
    if unheld:
        logger.warning("compensate_bias: %d pruned blocks have no adapter on their output projection (e.g. %s); "
                       "add it to target_modules to compensate them", len(unheld), unheld[0])
    shifts, no_bias = bias_shifts(held, removals, means)
    if no_bias:
        logger.info("compensate_bias: %d output projections have no bias and stay uncompensated", len(no_bias))
    for unit in held:
        if unit.key in shifts:
            output_projection(unit).add_bias_shift(shifts[unit.key])
