"""The one place where peft-compress reaches past the public API of torch, peft, transformers or Python's object
model.

Everything else in the package uses public names only. Overriding the methods peft's ``BaseTuner`` and ``LoraModel``
define for their subclasses (``_create_and_replace``, ``_create_new_module``, ``_prepare_adapter_config``,
``_pre_injection_hook``, ``_get_adapter_state_dict``, ``_remap_adapter_state_dict_for_load``,
``_unload_and_optionally_merge``, ...) is how a peft tuner is written, as peft's own LoRA, AdaLoRA and VeRA do, and
is not counted here. What remains, and why:

- :data:`BufferDict`: peft's per-adapter buffer container (``peft.tuners._buffer_dict``), which peft's own layers
  use for buffers saved with the adapter (e.g. VeRA's); peft does not export it. Pruning-Adapter's bias
  compensation (``pa_bias``) and the sparse soups' masks (``sparse_mask``) are such buffers.
- :func:`change_class`: :func:`compress.pruning.compact.make_compact` turns a model whose widths differ per layer
  into its compact class *in place*: pruning happens on a live model (a ``PeftModel``'s base model, a merged
  multi-exit model's backbone during ``every_exit_loss``, a model an optimizer and a ``Trainer`` hold), and the
  objects that hold it must keep working, so it cannot be replaced by a new object. The compact class is a subclass
  of the model's own class whose only additions are its config class and the shapes applied when building a new
  instance, so the live object's state stays valid.
- :func:`wrap_peft_model_methods`: peft gives a tuner or a config no hook around ``PeftModel.save_pretrained`` and
  none before ``PeftModel.from_pretrained``/``load_adapter`` read the folder; :mod:`compress.adapter_io` needs one
  (atomic saves, checked folders) for the methods registered through :mod:`compress.registry`. These three methods
  of ``peft.PeftModel`` are wrapped once; for other methods' adapters the wrappers call peft unchanged.
- :func:`active_ddp_module` and :func:`rebuild_ddp_buckets`: a pruning step during distributed training replaces
  the trainable parameters of the model that ``torch.nn.parallel.DistributedDataParallel`` wraps, and the wrapper
  (held by the ``Trainer``) must then bucket the new parameters. torch has no public call for either: which DDP
  wrapper is running (so that a forward hook finds it), and building the buckets again, done here with the steps
  of DDP's own constructor.
- :func:`is_fsdp_flat_parameter`: FSDP (version 1) marks the flat parameters that hold a shard with an attribute;
  torch exports no public test of it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from peft import PeftModel
from peft.tuners._buffer_dict import BufferDict
from torch import nn

__all__ = ["BufferDict", "DDP_REBUILD_METHODS", "active_ddp_module", "change_class", "is_fsdp_flat_parameter",
           "rebuild_ddp_buckets", "wrap_peft_model_methods"]

_WRAPPED = "__compress_wrapped__"


def change_class(obj: object, cls: type) -> None:
    """Make ``obj`` an instance of ``cls``, a subclass of its class that adds no instance state (see above)."""
    if not issubclass(cls, type(obj)):
        raise TypeError(f"{cls.__name__} is not a subclass of {type(obj).__name__}")
    obj.__class__ = cls


def wrap_peft_model_methods(save_pretrained: Callable[[Callable], Callable],
                            from_pretrained: Callable[[Callable], Callable],
                            load_adapter: Callable[[Callable], Callable]) -> None:
    """Replace ``PeftModel.save_pretrained``, ``from_pretrained`` and ``load_adapter`` by what each factory makes of
    peft's own method; calling it again does nothing."""
    if getattr(PeftModel.save_pretrained, _WRAPPED, False):
        return
    wrapped = {"save_pretrained": save_pretrained(PeftModel.save_pretrained),
               "from_pretrained": from_pretrained(PeftModel.__dict__["from_pretrained"].__func__),
               "load_adapter": load_adapter(PeftModel.load_adapter)}
    for function in wrapped.values():
        setattr(function, _WRAPPED, True)
    PeftModel.save_pretrained = wrapped["save_pretrained"]
    PeftModel.from_pretrained = classmethod(wrapped["from_pretrained"])
    PeftModel.load_adapter = wrapped["load_adapter"]


#: the methods of ``DistributedDataParallel`` that :func:`rebuild_ddp_buckets` calls
DDP_REBUILD_METHODS = ("_build_params_for_reducer", "_build_debug_param_to_name_mapping", "_ddp_init_helper")


def active_ddp_module() -> nn.Module | None:
    """The ``DistributedDataParallel`` wrapper whose forward is running now, if any."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel._get_active_ddp_module()


def rebuild_ddp_buckets(ddp: nn.Module) -> int:
    """Bucket the trainable parameters ``ddp.module`` has now, as ``DistributedDataParallel.__init__`` does
    (callers first check that ``ddp`` has :data:`DDP_REBUILD_METHODS`). Returns how many it registered."""
    ignored = ddp.parameters_to_ignore
    ddp._module_parameters = [p for name, p in ddp.module.named_parameters() if name not in ignored]
    parameters, expect_sparse_gradient = ddp._build_params_for_reducer()
    names = ddp._build_debug_param_to_name_mapping(parameters)
    ddp._ddp_init_helper(parameters, expect_sparse_gradient, names, ddp.static_graph)
    return len(parameters)


def is_fsdp_flat_parameter(param: torch.Tensor) -> bool:
    """Whether ``param`` is one of FSDP's (version 1) flat parameters, which hold a shard."""
    return bool(getattr(param, "_is_flat_param", False)) or type(param).__name__ == "FlatParameter"
