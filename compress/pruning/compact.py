"""Compact models: per-layer widths that a standard transformers config cannot express.

A ``global``-mode pruned model keeps its family's config with the *largest* width per field, plus
``compress_shapes``: the ``[out_features, in_features]`` of every projection that is smaller. The compact
config/model classes (``CompressedBertConfig``, ``CompressedBertForSequenceClassification``, ...) build
the standard model and then shrink those projections, so ``from_pretrained`` loads the compact weights.
They are registered with transformers' Auto classes by ``import compress``: no remote code.
"""

from __future__ import annotations

import logging

import transformers
from torch import nn
from transformers import AutoConfig

from compress._compat import change_class
from compress.pruning.arch import ARCH_SPECS, arch_spec

logger = logging.getLogger(__name__)

PREFIX = "compressed_"

_CONFIG_CLASSES: dict[str, type] = {}
_MODEL_CLASSES: dict[type, type] = {}


def _projection_paths(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer of the model by path: relative to the base model, or to the whole model for task-head
    layers (e.g. ``classifier``, ``lm_head``). Adapter layers count as the layer they wrap."""
    from compress.pruning.surgery import PrunableLayer

    in_base = {module: name for name, module in model.base_model.named_modules()}
    wrappers: list[str] = []
    linears: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in wrappers):
            continue  # the wrapped layer and the adapter's own matrices, or peft's trained copies of a module
        original = getattr(module, "original_module", None)  # peft's modules_to_save wrapper
        if isinstance(module, PrunableLayer):
            wrappers.append(name)
            linears[in_base.get(module, name)] = module
            continue
        if original is not None and hasattr(module, "modules_to_save"):
            wrappers.append(name)  # its layers count at the paths the plain model has (the copies share shapes)
            path = in_base.get(module, name)
            for sub, layer in original.named_modules():
                if isinstance(layer, nn.Linear):
                    linears[f"{path}.{sub}" if sub else path] = layer
            continue
        if isinstance(module, nn.Linear):
            linears[in_base.get(module, name)] = module
    return linears


def _layer_at(model: nn.Module, path: str) -> tuple[nn.Module, str] | None:
    """The parent module and attribute name of the layer at ``path``: relative to the base model, or for a task-head
    layer (its first name is no child of the base model) to the whole model; ``None`` for a task-head layer the
    model does not have.

    Raises:
        AttributeError: the base model has no such layer (the shapes were recorded from another model).
    """
    parent_path, _, attr = path.rpartition(".")
    base = model.base_model
    if path.split(".")[0] in dict(base.named_children()):
        return (base.get_submodule(parent_path) if parent_path else base), attr
    try:
        parent = model.get_submodule(parent_path) if parent_path else model
    except AttributeError:
        return None
    return (parent, attr) if isinstance(getattr(parent, attr, None), nn.Module) else None


def _apply_shapes(model: nn.Module, shapes: dict[str, list[int]]) -> None:
    """Replace each recorded projection of a freshly built model by one of the recorded shape.

    A recorded task-head layer the model does not have is left out: the model is the base that a head class builds
    for itself (Llama's and Qwen2's head classes build theirs with ``AutoModel.from_config``, which gives the
    compact base class; the head class then shapes its head), or a folder saved with one head is loaded with
    another class (the bare model, another task), whose head is new.
    """
    for path, (out_features, in_features) in shapes.items():
        found = _layer_at(model, path)
        if found is None:
            logger.debug("%s has no task-head layer %s: left out", type(model).__name__, path)
            continue
        parent, attr = found
        old = getattr(parent, attr)
        if (old.out_features, old.in_features) == (out_features, in_features):
            continue
        new = nn.Linear(in_features, out_features, bias=old.bias is not None,
                        device=old.weight.device, dtype=old.weight.dtype)
        setattr(parent, attr, new)
    arch_spec(model).refresh()


def projection_shapes(model: nn.Module) -> dict[str, list[int]]:
    """``{path: [out_features, in_features]}`` of every linear layer (paths as in ``compress_shapes``)."""
    return {path: [lin.out_features, lin.in_features] for path, lin in _projection_paths(model).items()}


def reshape_to(model: nn.Module, shapes: dict[str, list[int]]) -> nn.Module:
    """Give a freshly loaded model the projection ``shapes`` recorded from a pruned one (new layers where they
    differ; their weights are to be loaded), then its compact class if the standard config cannot express them."""
    _apply_shapes(model, shapes)
    if not arch_spec(model).fits_standard_config():
        make_compact(model)
    return model


def compact_config_class(base_cls: type) -> type:
    """The ``Compressed<Base>Config`` for a transformers config class (created once, then cached)."""
    model_type = PREFIX + base_cls.model_type
    if model_type not in _CONFIG_CLASSES:
        created: list[type] = []  # the class defined below; `super(cls, cls)` would loop in its subclasses

        @classmethod
        def get_config_dict(cls, *args, **kwargs) -> tuple[dict, dict]:
            # A base checkpoint's config is a valid compact config with uniform widths. Reading one this way
            # happens, e.g., when peft's save_pretrained compares vocab sizes with the original base model
            # through the (now compact) config class; without this, transformers warns of a type mismatch.
            config_dict, rest = super(created[0], cls).get_config_dict(*args, **kwargs)
            if config_dict.get("model_type") == base_cls.model_type:
                config_dict = {**config_dict, "model_type": cls.model_type}
            return config_dict, rest

        cls = type(f"Compressed{base_cls.__name__}", (base_cls,), {"model_type": model_type, "__module__": __name__,
                                                                  "get_config_dict": get_config_dict})
        created.append(cls)
        _CONFIG_CLASSES[model_type] = cls
    return _CONFIG_CLASSES[model_type]


def compact_model_class(base_cls: type) -> type:
    """The ``Compressed<Base>`` model class: the standard model, shrunk to ``config.compress_shapes``."""
    if base_cls in _MODEL_CLASSES.values():
        return base_cls
    if base_cls not in _MODEL_CLASSES:
        config_cls = compact_config_class(base_cls.config_class)

        def __init__(self, config, *args, **kwargs):
            base_cls.__init__(self, config, *args, **kwargs)
            _apply_shapes(self, getattr(config, "compress_shapes", None) or {})

        _MODEL_CLASSES[base_cls] = type(f"Compressed{base_cls.__name__}", (base_cls,), {
            "config_class": config_cls, "__init__": __init__, "__module__": __name__,
        })
    return _MODEL_CLASSES[base_cls]


def make_compact(model: nn.Module) -> nn.Module:
    """Turn a model with per-layer widths into its compact class in place (config included): whatever holds the
    model (a ``PeftModel``, a merged multi-exit model, an optimizer, a ``Trainer``) keeps working with it
    (:func:`compress._compat.change_class` says why this is done in place)."""
    shapes = projection_shapes(model)
    arch_spec(model).refresh()  # config fields now hold the largest width per field
    base_model_type = model.config.model_type.removeprefix(PREFIX)
    base_cfg_cls = type(model.config) if not model.config.model_type.startswith(PREFIX) else None
    if base_cfg_cls is not None:
        change_class(model.config, compact_config_class(base_cfg_cls))
    # from_pretrained stores `model_type` on the instance too, which would shadow the compact class's
    model.config.__dict__.pop("model_type", None)
    model.config.compress_shapes = shapes
    change_class(model, compact_model_class(type(model)))
    model.config.architectures = [type(model).__name__]
    logger.debug("made %s compact (%s)", type(model).__name__, base_model_type)
    return model


def register_compact_models() -> None:
    """Register every compact config/model class with transformers' Auto classes (idempotent)."""
    from transformers.models.auto import configuration_auto

    from compress.tasks import TASKS, auto_class_name, model_classes

    model_types = [t for arch in ARCH_SPECS for t in arch.model_types]
    for model_type in model_types:
        base_cfg_cls = getattr(transformers, configuration_auto.CONFIG_MAPPING_NAMES[model_type])
        cfg_cls = compact_config_class(base_cfg_cls)
        AutoConfig.register(cfg_cls.model_type, cfg_cls, exist_ok=True)
        for task in (None, *TASKS):
            base_model_cls = getattr(transformers, model_classes(task).get(model_type, ""), None)
            if base_model_cls is not None:
                auto_cls = getattr(transformers, auto_class_name(task))
                auto_cls.register(cfg_cls, compact_model_class(base_model_cls), exist_ok=True)
