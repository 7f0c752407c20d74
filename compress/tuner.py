"""What every peft-compress tuner shares on top of peft's ``BaseTuner``."""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.integrations import get_bnb_param_type
from torch import nn

from compress.distributed import mark_mean_loss
from compress.errors import CompressError


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

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None):
        mark_mean_loss(model)  # the same gradients under torchrun as in one process
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        setattr(parent, child_name, new_module)

    @staticmethod
    def float_linear(target: nn.Module, current_key: str, refusal: str) -> nn.Linear:
        """The float ``nn.Linear`` a target is (or wraps); otherwise an error naming the module, then
        ``refusal`` (what the method adapts and what to do)."""
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if not isinstance(base, nn.Linear) or get_bnb_param_type(base.weight):
            raise CompressError(f"target module {current_key!r} is a {type(base).__name__}; {refusal}")
        return base

    def _install(self, parent: nn.Module, target_name: str, new_module: nn.Module, target: nn.Module,
                 adapter_name: str) -> None:
        """Put a new tuner layer in place of ``target`` (frozen unless its adapter is active)."""
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        """peft's key translation plus :attr:`saved_names`; loading inverts it (peft builds the inverse mapping
        from this function)."""
        key = super()._remove_adapter_name_from_key(key, adapter_name)
        for ours, saved in cls.saved_names.items():
            key = key.replace(ours, saved)
        return key
