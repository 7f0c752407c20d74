"""The one place where peft-compress reaches past the public API of peft, transformers or Python's object model.

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
"""

from __future__ import annotations

from collections.abc import Callable

from peft import PeftModel
from peft.tuners._buffer_dict import BufferDict

__all__ = ["BufferDict", "change_class", "wrap_peft_model_methods"]

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
