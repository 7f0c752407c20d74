"""What every peft-compress tuner shares on top of peft's ``BaseTuner``."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner
from torch import nn


class CompressTuner(BaseTuner):
    """``BaseTuner`` whose module replacement only swaps the module.

    peft's version re-ties ``weight``/``bias`` from the old child onto the new module, which fails when unloading
    puts back a module without a weight (e.g. ``RobertaClassificationHead`` out of ``modules_to_save``); our
    tuners' layers wrap their base layer and place their adapters themselves, so there is nothing to re-tie.
    """

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        setattr(parent, child_name, new_module)
