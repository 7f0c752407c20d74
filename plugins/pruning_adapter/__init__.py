"""Pruning-Adapter: task-oriented structured pruning of a frozen backbone plus low-rank adapters.

After "Task-oriented Memory-efficient Pruning-Adapter" (Wang, Yang, Sun, 2023).
"""

from __future__ import annotations

from compress.registry import register_method

from .callback import PruningAdapterCallback, find_tuner
from .config import PRUNING_ADAPTER, PruningAdapterConfig
from .layer import Linear, PruningAdapterLayer
from .model import PruningAdapterModel
from .schedule import PruningSchedule, cubic_sparsity

__all__ = [
    "PRUNING_ADAPTER",
    "Linear",
    "PruningAdapterCallback",
    "PruningAdapterConfig",
    "PruningAdapterLayer",
    "PruningAdapterModel",
    "PruningSchedule",
    "apply_pruning_adapter",
    "cubic_sparsity",
    "find_tuner",
]

register_method(PRUNING_ADAPTER, PruningAdapterConfig, PruningAdapterModel, prefix=PruningAdapterModel.prefix)


def apply_pruning_adapter(model, config: PruningAdapterConfig, data=None, tokenizer=None, **prune_kwargs):
    """``get_peft_model`` plus a oneshot prune on calibration ``data``: the function form of the method.

    With ``data=None`` and a data-driven importance, pruning is left to :class:`PruningAdapterCallback`
    during training. Returns the ``PeftModel``.
    """
    from peft import get_peft_model

    peft_model = get_peft_model(model, config)
    tuner = find_tuner(peft_model)
    if data is not None or config.importance in ("magnitude", "l1", "l2", "random"):
        tuner.prune(data=data, tokenizer=tokenizer, **prune_kwargs)
    return peft_model
