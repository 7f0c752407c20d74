"""Pruning a Pruning-Adapter model: one pruning event, and the oneshot prune on calibration data.

A *pruning event* plans which channels, heads and blocks go (:func:`compress.pruning.plan.plan_removals`),
checks the removal against the model (:func:`compress.pruning.surgery.check_removals`), folds the removed
channels' mean contribution into the adapters' bias buffers (``compensate_bias``), removes them from the backbone
and the adapters together (:func:`compress.pruning.surgery.apply_checked`), slices an optimizer's parameters and
state to match, and appends the event to the config's ``pruning_plan``. The training-time schedule
(:mod:`.schedule`) and :func:`prune_oneshot` both end in :func:`prune_event`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import TYPE_CHECKING

import torch

from compress.distributed import check_same_on_ranks, check_unsharded
from compress.errors import CompressError
from compress.pruning.arch import arch_spec
from compress.pruning.compensate import bias_shifts, output_projection, record_input_means
from compress.pruning.engine import forward_passes, score_units
from compress.pruning.importance import Unit, get_importance, units_for
from compress.pruning.optim import remap_optimizer
from compress.pruning.plan import plan_removals, width_cap
from compress.pruning.surgery import apply_checked, check_removals

from .layer import PruningAdapterLayer
from .plan import recorded_widths

if TYPE_CHECKING:
    from .model import PruningAdapterModel

logger = logging.getLogger(__name__)


def total_width(widths: dict[str, list[int]], structure: str) -> int:
    """The summed width of ``structure`` over the model (kv heads fall back to heads when there is no GQA; the hidden
    size is one number)."""
    if structure == "kv_heads":
        return sum(widths.get("kv_heads", widths["heads"]))
    return sum(widths[structure])


def units_of(tuner: PruningAdapterModel) -> list[Unit]:
    """The units of every configured structure, in the model as it is now."""
    return units_for(arch_spec(tuner.model), tuner.active_config.spec.sparsity)


def prune_oneshot(tuner: PruningAdapterModel, data=None, tokenizer=None, num_batches: int = 8,
                  batch_size: int = 16, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Score ``tuner``'s structures on calibration ``data`` (gate gradients only) and prune to the final sparsity;
    see :meth:`PruningAdapterModel.prune`."""
    config = tuner.active_config
    if tuner.pruning_finished:
        raise CompressError("this model is already pruned to its configured sparsity")
    criterion = get_importance(config.spec.importance)
    if criterion.needs_calibration and data is None:
        raise CompressError(f"importance={config.importance!r} needs calibration data: pass data=, "
                            "or train with PruningAdapterCallback to score on the training batches")
    batches = None
    if data is not None:
        from compress.data import calibration_batches

        batches = calibration_batches(data, batch_size=batch_size, num_batches=num_batches, tokenizer=tokenizer)
    units = units_of(tuner)
    recording = record_input_means(tuner.model, units) if config.compensate_bias and batches else None
    with recording or contextlib.nullcontext() as recorder:
        scores = score_units(tuner.model, units, criterion, batches if criterion.needs_calibration else None)
        if recorder is not None and not criterion.needs_calibration:
            forward_passes(tuner.model, batches)  # magnitude/random scores ran no pass: measure the means anyway
    means = recorder.means() if recorder is not None else None
    return prune_event(tuner, dict(config.spec.sparsity), scores, optimizer, final=True, means=means)


def prune_event(tuner: PruningAdapterModel, sparsity: dict[str, float], scores: dict[str, torch.Tensor],
                optimizer: torch.optim.Optimizer | None, final: bool, means: dict[str, torch.Tensor] | None = None,
                step: int | None = None) -> dict:
    """Remove ``sparsity`` of the model's current structures by ``scores``; returns the recorded event."""
    config = tuner.active_config
    spec = config.spec
    check_unsharded(tuner.model, "prune a Pruning-Adapter model")
    arch = arch_spec(tuner.model)
    units = units_for(arch, sparsity)
    removals = plan_removals(arch, units, scores, sparsity, spec.mode, round_to=spec.round_to,
                             normalize=spec.normalize, max_widths=_width_caps(tuner, sparsity))
    check_same_on_ranks(removals, "the channels, heads and blocks chosen for removal")
    checked = check_removals(tuner.model, arch, units, removals)  # a refused event leaves the adapters as they were
    if means:
        _compensate(units, removals, means)
    layers = [m for m in tuner.model.modules() if isinstance(m, PruningAdapterLayer)]
    for layer in layers:
        layer.pruned_params.clear()
    hidden = "hidden" in spec.sparsity  # every event of such a plan records the hidden size
    widths_before = recorded_widths(arch, hidden)
    # the adapter layers record what they replaced; the rest (e.g. peft's trained copies of norms and of the
    # classifier, on the residual stream) comes back from apply_checked
    replaced = apply_checked(checked)
    tuner.finish_shapes()
    if optimizer is not None:
        replaced.update({k: v for layer in layers for k, v in layer.pruned_params.items()})
        remap_optimizer(optimizer, replaced, list(tuner.model.parameters()))
    for layer in layers:
        layer.pruned_params.clear()
    replaced.clear()
    tuner.settle_memory()
    event = {"structures": sorted(sparsity), "removed": {k: v for k, v in removals.items() if v},
             "widths_before": widths_before, "widths_after": recorded_widths(arch_spec(tuner.model), hidden),
             "final": final}
    if step is not None:  # pruned by the schedule: errors about this event can name its training step
        event["step"] = step
    config.pruning_plan.append(event)
    if final and config.quantize_backbone:
        tuner.quantize_backbone(config.quantize_backbone)
    logger.info("pruned %s: widths %s", ", ".join(f"{k} {v:.0%}" for k, v in sparsity.items()),
                event["widths_after"])
    return event


def _width_caps(tuner: PruningAdapterModel, sparsity: dict[str, float]) -> dict[str, int] | None:
    """``max_keep`` as per-layer channel caps for one pruning step, against the widths before the first.

    A step that keeps more than ``max_keep`` overall caps each layer at what the step keeps overall, so
    every layer leaves it with the same width and the final cap stays reachable by later steps.
    """
    config = tuner.active_config
    if config.max_keep is None:
        return None
    current = arch_spec(tuner.model).widths()
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


def _compensate(units: list[Unit], removals: dict[str, list[int]], means: dict[str, torch.Tensor]) -> None:
    """Put the removed channels' mean contribution into the adapters' bias buffers (before removal)."""
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
