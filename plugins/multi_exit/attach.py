"""Exits on a tuner's model: what a PEFT tuner that carries exit heads does at injection, forward and merge.

Used by :class:`~.model.MultiExitModel` and by Pruning-Adapter's ``exits`` option.
"""

from __future__ import annotations

import inspect

from torch import nn

from compress.pruning.arch import arch_spec

from .config import check_exits_fit
from .modeling import exit_blocks
from .runner import OUTPUT_EXTRAS, ExitSettings, forward_with_exits


def check_exits(model: nn.Module, exit_layers: list[int] | None, loss_weights: str | list[float]) -> None:
    """Refuse a model without a sequence-classification head, exit layers out of range, or a weight list
    that does not give one weight per exit, before anything changes."""
    arch_spec(model).sequence_head()
    check_exits_fit(exit_layers, loss_weights, len(arch_spec(model).stacks()[0].blocks))


def ignore_exit_outputs(config, ignore: bool = True) -> None:
    """Make the Trainer's predictions the logits alone (``keys_to_ignore_at_inference``), or undo it."""
    kept = [k for k in getattr(config, "keys_to_ignore_at_inference", []) if k not in OUTPUT_EXTRAS]
    if ignore:
        config.keys_to_ignore_at_inference = [*kept, *OUTPUT_EXTRAS]
    elif kept:
        config.keys_to_ignore_at_inference = kept
    else:
        config.__dict__.pop("keys_to_ignore_at_inference", None)


def call_with_exits(model: nn.Module, heads: nn.ModuleList, exit_layers: list[int] | None, settings: ExitSettings,
                    args: tuple, kwargs: dict, teacher: nn.Module | None = None):
    """A tuner's forward with exits: ``model``'s arguments as keywords, then
    :func:`~.runner.forward_with_exits`."""
    if args:
        kwargs = dict(inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments)
        kwargs.update(kwargs.pop("kwargs", {}))
    labels = kwargs.pop("labels", None)
    kwargs.pop("return_dict", None)  # the output is always a ModelOutput (it carries the exits)
    blocks, exits = exit_blocks(model, exit_layers)
    return forward_with_exits(model, blocks, exits, heads, model.config, settings, kwargs, labels,
                              training=model.training, teacher=teacher,
                              final_head=arch_spec(model).sequence_head()[1])
