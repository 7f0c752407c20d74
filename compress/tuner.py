"""What peft-compress tuners share on top of peft's ``BaseTuner`` and ``LoraModel``.

:class:`CompressTuner` is the ``BaseTuner`` of the methods with layers of their own (Ladder Side-Tuning,
multi-exit). :class:`CompressLoraModel` is the ``LoraModel`` of the methods whose adapters are peft's LoRA layers
(Pruning-Adapter, sparse soups), as AdaLoRA's is: their configs are ``LoraConfig`` subclasses checked by
:func:`check_lora_options`, their layers ``peft.tuners.lora.LoraLayer`` subclasses, their saved keys LoRA's own
(``lora_A``/``lora_B``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any

import torch
from peft.tuners.lora import LoraConfig, LoraModel
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils.integrations import get_bnb_param_type
from torch import nn

from compress.distributed import mark_mean_loss
from compress.errors import CompressError
from compress.pruning.spec import InvalidOptionError, is_number, positive_int


def float_linear(target: nn.Module, current_key: str, refusal: str) -> nn.Linear:
    """The float ``nn.Linear`` a target is (or wraps); otherwise an error naming the module, then ``refusal`` (what
    the method adapts and what to do)."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not isinstance(base, nn.Linear) or get_bnb_param_type(base.weight):
        raise CompressError(f"target module {current_key!r} is a {type(base).__name__}; {refusal}")
    return base


class CompressTuner(BaseTuner):
    """``BaseTuner`` whose module replacement only swaps the module.

    peft's version re-ties ``weight``/``bias`` from the old child onto the new module, which fails when unloading
    puts back a module without a weight (e.g. ``RobertaClassificationHead`` out of ``modules_to_save``); these
    tuners' layers wrap their base layer and place their adapters themselves, so there is nothing to re-tie.
    """

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None):
        mark_mean_loss(model)  # the same gradients under torchrun as in one process
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        setattr(parent, child_name, new_module)

    float_linear = staticmethod(float_linear)

    def _install(self, parent: nn.Module, target_name: str, new_module: nn.Module, target: nn.Module,
                 adapter_name: str) -> None:
        """Put a new tuner layer in place of ``target`` (frozen unless its adapter is active)."""
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)


class CompressLoraModel(LoraModel):
    """``LoraModel`` of a method whose adapters are peft's LoRA layers with more on them (a pruning or a mask).

    Subclasses create their own layer classes in :meth:`_create_new_module` (the method's ``LoraLayer``
    subclasses) and keep LoRA's prefix and saved keys. Folders saved by earlier releases named LoRA's matrices
    ``<legacy_matrix_names>``: they are renamed on load, with a ``FutureWarning``.
    """

    #: how earlier releases of the method saved ``lora_A``/``lora_B`` (e.g. ``("pa_A", "pa_B")``), or ``None``
    legacy_matrix_names: tuple[str, str] | None = None

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None):
        mark_mean_loss(model)  # the same gradients under torchrun as in one process
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config: LoraConfig, adapter_name: str,
                                           state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """peft's key mapping, after renaming the LoRA matrices of a folder saved by an earlier release."""
        state_dict = rename_legacy_matrices(state_dict, cls.legacy_matrix_names, str(config.peft_type))
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)

    def add_weighted_adapter(self, *args, **kwargs):
        """Not supported: each adapter of these methods belongs to its own pruned or masked base."""
        raise CompressError(f"{type(self).__name__} does not support add_weighted_adapter: each adapter belongs to "
                            "its own pruning or mask of the base model")


def rename_legacy_matrices(state_dict: dict[str, torch.Tensor], legacy: tuple[str, str] | None,
                           method: str) -> dict[str, torch.Tensor]:
    """``state_dict`` with the LoRA matrices an earlier release saved as ``legacy`` (A, B) under LoRA's names."""
    if legacy is None:
        return state_dict
    old = {f".{legacy[0]}.": ".lora_A.", f".{legacy[1]}.": ".lora_B."}
    if not any(name in key for key in state_dict for name in old):
        return state_dict
    warnings.warn(f"these {method} adapter weights name LoRA's matrices {legacy[0]}/{legacy[1]}, as releases "
                  "before the move onto peft's LoRA classes saved them; they load as lora_A/lora_B. This format will "
                  "not be read after the next release: save the adapter again (peft_model.save_pretrained)",
                  FutureWarning, stacklevel=2)
    renamed = {}
    for key, value in state_dict.items():
        for before, after in old.items():
            key = key.replace(before, after)
        renamed[key] = value
    return renamed


# -- configs ---------------------------------------------------------------------------------------------------
#: the LoRA initialisations these methods support: the others change the base weights (PiSSA, OLoRA, CorDA, LoftQ,
#: LoRA-GA, MiCA) or need data of their own (EVA), which a pruning plan or mask replayed on the original base model
#: cannot reproduce
SUPPORTED_INITS = (True, False, "gaussian", "orthogonal")
#: LoraConfig options these methods refuse while they are set (truthy), with the reason
_UNSUPPORTED = {
    "bias": "trains the base model's biases, which pruning and masks change",
    "target_parameters": "adapts parameters, not the linear layers these methods change",
    "layer_replication": "duplicates blocks that pruning would change twice",
    "trainable_token_indices": "trains embedding rows outside the adapter layers",
    "megatron_config": "shards layers these methods reshape",
    "loftq_config": "changes the base weights",
    "use_qalora": "needs a quantised base model",
    "fan_in_fan_out": "is for Conv1D layers, and these methods adapt torch.nn.Linear layers",
}


def _variant_options(config: LoraConfig) -> list[str]:
    """The LoRA variants (DoRA, aLoRA, VeLoRA, MonteCLoRA, BD-LoRA, Arrow, KaSA, ...) ``config`` switches on: their
    layers compute more than ``B @ A``, which pruning and masks do not handle."""
    return [f.name for f in dataclasses.fields(config) if f.metadata.get("is_lora_variant") and getattr(config, f.name)]


def check_lora_options(config: LoraConfig, method: str) -> None:
    """Check the LoRA options of a :class:`CompressLoraModel` config, before ``LoraConfig.__post_init__``: each
    wrong value is one :class:`~compress.pruning.spec.InvalidOptionError` naming the field."""
    positive_int("r", config.r)
    if not (is_number(config.lora_alpha) and math.isfinite(config.lora_alpha) and config.lora_alpha > 0):
        raise InvalidOptionError("lora_alpha", config.lora_alpha, "must be a positive number")
    if not (is_number(config.lora_dropout) and 0.0 <= config.lora_dropout < 1.0):
        raise InvalidOptionError("lora_dropout", config.lora_dropout, "must be a number in [0, 1)")
    init = config.init_lora_weights
    if not any(init is choice or (isinstance(init, str) and init == choice) for choice in SUPPORTED_INITS):
        raise InvalidOptionError("init_lora_weights", init, f"{method} supports True, False, 'gaussian' and "
                                 "'orthogonal': the other initialisations change the base weights or need data "
                                 "of their own, which its saved adapter cannot rebuild on the original base model")
    if not isinstance(config.use_rslora, bool):
        raise InvalidOptionError("use_rslora", config.use_rslora, "must be True or False")
    if isinstance(config.target_modules, (list, tuple, set)):
        _names("target_modules", config.target_modules)
    elif config.target_modules is not None and not isinstance(config.target_modules, str):
        raise InvalidOptionError("target_modules", config.target_modules, "must be a list of module names, a "
                                 "regular expression, or None (the method's default targets)")
    if config.modules_to_save is not None:
        if not isinstance(config.modules_to_save, (list, tuple)):
            raise InvalidOptionError("modules_to_save", config.modules_to_save, "must be a list of module names")
        _names("modules_to_save", config.modules_to_save)
    for name, reason in _UNSUPPORTED.items():
        value = getattr(config, name)
        if value and value != "none":
            raise InvalidOptionError(name, value, f"is not supported by {method}: it {reason}")
    variants = _variant_options(config)
    if variants:
        raise InvalidOptionError(variants[0], getattr(config, variants[0]), f"is a LoRA variant {method} does not "
                                 "support: its layers compute more than B @ A, which this method's layers do not "
                                 "prune or mask")


def take_deprecated_init_weights(config: LoraConfig, init_weights: Any) -> None:
    """``init_weights`` (the name earlier releases gave ``init_lora_weights``): checked, moved to
    ``init_lora_weights`` with a ``FutureWarning``."""
    if init_weights is None:
        return
    if not isinstance(init_weights, bool):
        raise InvalidOptionError("init_weights", init_weights, "must be True or False (or use init_lora_weights, "
                                 "which takes LoRA's initialisations)")
    warnings.warn(f"{type(config).__name__}(init_weights=...) is deprecated and will be removed in the next release: "
                  "use init_lora_weights (LoRA's option of the same meaning)", FutureWarning, stacklevel=4)
    config.init_lora_weights = init_weights


def _names(name: str, values: Any) -> None:
    wrong = [v for v in values if not isinstance(v, str) or not v]
    if wrong:
        raise InvalidOptionError(name, values, f"{wrong[0]!r} is not a module name")
