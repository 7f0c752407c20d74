"""Bias compensation: removed channels leave their average contribution behind as a bias.

Removing an FFN neuron or an attention head deletes input channels of the block's output projection
(``output.dense``/``down_proj``, ``attention.output.dense``/``o_proj``). Those channels rarely average
zero, so plain removal shifts every token's output by ``W[:, removed] @ mean(x[removed])``; in post-norm
models (BERT) that shift also moves the LayerNorm statistics. Adding exactly that vector to the
projection's bias keeps the expected output unchanged (the fluctuation-based compensation of FLAP, An et
al. 2024) at no inference cost. The means are measured on the same batches that score the channels, over
real tokens only (padding excluded).

:func:`bias_shifts` reports layers without a bias and leaves them as they are; the engine first gives the
output projections a bias where the family's config can express one
(:meth:`compress.pruning.arch.ArchSpec.add_output_biases`) and refuses compensation where it cannot.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from compress.pruning.importance import TokenMasks, Unit, effective_weight, output_projection, sum_over_real_tokens

__all__ = [
    "InputMeans", "add_to_bias", "bias_shifts", "output_projection", "record_input_means", "removed_input_channels",
]

_CHANNEL_STRUCTURES = ("ffn", "heads")


def removed_input_channels(unit: Unit, removed: list[int]) -> list[int]:
    """Input-channel indices of :func:`output_projection` for removed neurons (ffn) or query heads (heads)."""
    if unit.structure == "ffn":
        return sorted(removed)
    head_dim = unit.site.head_dim
    return [h * head_dim + j for h in sorted(removed) for j in range(head_dim)]


class InputMeans:
    """Running per-channel means of the inputs of each unit's output projection (see :func:`record_input_means`)."""

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, float] = {}

    def add(self, key: str, values: torch.Tensor, count: float) -> None:
        self._sums[key] = self._sums[key] + values if key in self._sums else values
        self._counts[key] = self._counts.get(key, 0.0) + count

    def means(self) -> dict[str, torch.Tensor]:
        return {key: total / self._counts[key] for key, total in self._sums.items() if self._counts[key] > 0}

    def totals(self) -> dict[str, tuple[torch.Tensor, float]]:
        """The running ``(sum, count)`` per key; :meth:`add` them to a new instance to continue where this one is."""
        return {key: (total, self._counts[key]) for key, total in self._sums.items()}

    def __bool__(self) -> bool:
        return bool(self._sums)


@contextlib.contextmanager
def record_input_means(model: nn.Module, units: list[Unit]) -> Iterator[InputMeans]:
    """Accumulate, while the context is open, the mean input of every FFN/heads unit's output projection.

    The masks passed to ``model`` (as keywords) exclude padding from the means: ``attention_mask``, and
    ``decoder_attention_mask`` for an encoder-decoder model's decoder (see
    :class:`~compress.pruning.importance.TokenMasks`). Hooks are removed on exit; activation recomputation
    (gradient checkpointing) counts a batch twice, which leaves the means unchanged.
    """
    means = InputMeans()
    masks = TokenMasks(model)
    handles = []

    def recorder(key: str, mask: str):
        def hook(module, args):
            total, count = sum_over_real_tokens(args[0], masks.get(mask))
            means.add(key, total, count)

        return hook

    try:
        handles.append(model.register_forward_pre_hook(masks.capture, with_kwargs=True))
        for unit in units:
            if unit.structure in _CHANNEL_STRUCTURES:
                layer = output_projection(unit)
                handles.append(layer.register_forward_pre_hook(recorder(unit.key, masks.mask_name(layer))))
        yield means
    finally:
        for handle in handles:
            handle.remove()


def bias_shifts(units: list[Unit], removals: Mapping[str, list[int]],
                means: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """What each output projection must add to its bias to keep its expected output after ``removals``.

    Call this before the channels are removed (it reads their weights).

    Returns:
        ``({unit.key: shift}, skipped)``: shifts for units with removed channels, measured means and a bias
        to put them in; ``skipped`` names the units whose output projection has no bias.
    """
    shifts: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for unit in units:
        removed = removals.get(unit.key)
        if unit.structure not in _CHANNEL_STRUCTURES or not removed or unit.key not in means:
            continue
        layer = output_projection(unit)
        base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
        if base.bias is None:
            skipped.append(unit.key)
            continue
        channels = torch.tensor(removed_input_channels(unit, removed), dtype=torch.long)
        mean = means[unit.key].to(base.weight.device)
        shifts[unit.key] = effective_weight(layer)[:, channels] @ mean[channels]
    return shifts, skipped


def add_to_bias(units: list[Unit], shifts: Mapping[str, torch.Tensor]) -> None:
    """Fold ``shifts`` into the output projections' biases in place (plain, frozen models)."""
    with torch.no_grad():
        for unit in units:
            if unit.key in shifts:
                bias = output_projection(unit).bias
                bias.add_(shifts[unit.key].to(bias.dtype))
