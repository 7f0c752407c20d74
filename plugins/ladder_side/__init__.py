"""Ladder Side-Tuning: a small side network fed by ladders from a frozen backbone, trained without backpropagating
through the backbone.

After "LST: Ladder Side-Tuning for Parameter and Memory Efficient Transfer Learning" (Sung, Cho, Bansal, 2022).
"""

from __future__ import annotations

from compress.hub import register_folder_check
from compress.registry import register_method

from .cache import LadderCache, LadderEncoderDecoderCache
from .checks import check_saved_folder
from .config import LADDER_SIDE, LadderSideConfig
from .layer import LadderSide
from .model import LadderSideModel

__all__ = [
    "LADDER_SIDE",
    "LadderCache",
    "LadderEncoderDecoderCache",
    "LadderSide",
    "LadderSideConfig",
    "LadderSideModel",
    "apply_ladder_side",
]

register_method(LADDER_SIDE, LadderSideConfig, LadderSideModel, prefix=LadderSideModel.prefix)
register_folder_check(LADDER_SIDE, check_saved_folder)


def apply_ladder_side(model, config: LadderSideConfig, data=None, tokenizer=None, **calibration):
    """``get_peft_model`` plus the side network's pruned initialisation scored on calibration ``data`` (the
    function form of the method). Returns the ``PeftModel``."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, config)
    if data is not None and config.side_init == "pruned":
        peft_model.base_model.init_side(data=data, tokenizer=tokenizer, **calibration)
    return peft_model
