"""What every peft-compress tuner shares on top of peft's ``BaseTuner``."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner
from torch import nn


class CompressTuner(BaseTuner):
    """``BaseTuner`` whose module replacement only swaps the module, and whose saved keys may rename peft's own
    adapter matrices (:attr:`saved_names`).

    peft's version re-ties ``weight``/``bias`` from the old child onto the new module, which fails when unloading
    puts back a module without a weight (e.g. ``RobertaClassificationHead`` out of ``modules_to_save``); our
    tuners' layers wrap their base layer and place their adapters themselves, so there is nothing to re-tie.
    """

    #: renames of peft's own adapter matrices in saved keys (e.g. LoRA's ``.lora_A.`` as ``.pa_A.``): every saved
    #: key must carry the method's prefix, which is what peft looks for when loading
    saved_names: dict[str, str] = {}

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        setattr(parent, child_name, new_module)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """peft's key translation plus :attr:`saved_names`; loading inverts it (peft builds the inverse mapping
        from this function)."""
        key = super()._remove_adapter_name_from_key(key, adapter_name)
        for ours, saved in cls.saved_names.items():
            key = key.replace(ours, saved)
        return key
