"""Pruning-Adapter: task-oriented structured pruning of a frozen backbone plus low-rank adapters.

After "Task-oriented Memory-efficient Pruning-Adapter" (Wang, Yang, Sun, 2023).
"""

from __future__ import annotations

from compress.hub import register_folder_check
from compress.pruning.importance import get_importance
from compress.registry import register_method

from .callback import PruningAdapterCallback, find_tuner
from .checks import check_saved_folder
from .config import PRUNING_ADAPTER, PruningAdapterConfig
from .distill import Distillation
from .layer import Linear, PruningAdapterLayer
from .model import PruningAdapterModel
from .schedule import PruningSchedule, cubic_sparsity

__all__ = [
    "PRUNING_ADAPTER",
    "Distillation",
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
register_folder_check(PRUNING_ADAPTER, check_saved_folder)


def apply_pruning_adapter(model, config: PruningAdapterConfig, data=None, tokenizer=None, **prune_kwargs):
    """``get_peft_model`` plus a oneshot prune on calibration ``data``: the function form of the method.

    With ``data=None`` and a data-driven importance, pruning is left to :class:`PruningAdapterCallback`
    during training. Returns the ``PeftModel``.
    """
    from peft import get_peft_model

    peft_model = get_peft_model(model, config)
    if data is not None or not get_importance(config.spec.importance).needs_calibration:
        find_tuner(peft_model).prune(data=data, tokenizer=tokenizer, **prune_kwargs)
    return peft_model
