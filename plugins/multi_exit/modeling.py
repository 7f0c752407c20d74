"""Saved multi-exit models: transformers classes (``MultiExitBertForSequenceClassification``, ...) holding the
backbone, its own head as the last exit and ``exits`` (exit heads) for the earlier ones, with early exit at inference.

The config records the exits and the exit policy (``exit_layers``, ``exit_head``, ``exit_policy``,
``exit_threshold``, ``exit_loss_weights``). ``import compress`` registers the classes with transformers' Auto
classes (``AutoModelForSequenceClassification``, ``pipeline("text-classification")``): no remote code.
"""

from __future__ import annotations

import transformers
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification
from transformers.models.auto import configuration_auto

from compress.errors import CompressError
from compress.pruning.arch import arch_spec
from compress.pruning.compact import compact_config_class, compact_model_class

from .config import EXIT_FIELDS, validate_exit_config
from .layer import ExitHead
from .runner import OUTPUT_EXTRAS, ExitSettings, forward_with_exits

PREFIX = "multi_exit_"
#: the families with a sequence-classification head (compress.pruning.arch: BertSpec, LlamaSpec)
MODEL_TYPES = ("bert", "roberta", "llama", "qwen2")
#: config attributes of a multi-exit model, with their defaults
CONFIG_FIELDS = EXIT_FIELDS

_CONFIG_CLASSES: dict[type, type] = {}
_MODEL_CLASSES: dict[type, type] = {}
_BACKBONE_CLASSES: dict[tuple[type, type], type] = {}


def exit_blocks(model: nn.Module, exit_layers: list[int] | None) -> tuple[nn.ModuleList, list[int]]:
    """The model's blocks and the (sorted) blocks before the last that carry an exit head."""
    stacks = arch_spec(model).stacks()
    blocks = stacks[0].blocks
    layers = range(len(blocks)) if exit_layers is None else exit_layers
    return blocks, [b for b in sorted(layers) if b != len(blocks) - 1]


def build_exit_heads(model: nn.Module, exit_layers: list[int] | None, design: str,
                     pooling: str = "mean") -> nn.ModuleList:
    """One :class:`ExitHead` per exit before the last block, shaped like the model's own head (and, ``pooled``,
    starting from its weights), reading its block's output by ``pooling``."""
    dense, out = arch_spec(model).sequence_head()
    dense, out = _unwrapped(dense), _unwrapped(out)
    cfg = model.config
    dropout = getattr(cfg, "classifier_dropout", None)
    dropout = getattr(cfg, "hidden_dropout_prob", 0.0) if dropout is None else dropout
    hidden = (dense.in_features if dense is not None else out.in_features)
    pooled = dense.out_features if dense is not None else None
    _, blocks = exit_blocks(model, exit_layers)
    heads = nn.ModuleList(ExitHead(hidden, out.out_features, design, pooled, dropout, pooling,
                                   bias=out.bias is not None) for _ in blocks)
    for head in heads:
        head.copy_from(dense, out)
    return heads.to(dtype=out.weight.dtype, device=out.weight.device)


def _unwrapped(module: nn.Module | None) -> nn.Module | None:
    """The module peft's modules_to_save wrapper trains (or the module itself)."""
    if module is not None and hasattr(module, "modules_to_save") and hasattr(module, "original_module"):
        active = getattr(module, "active_adapters", None) or list(module.modules_to_save)
        return module.modules_to_save[active[0]] if active and active[0] in module.modules_to_save else \
            module.original_module
    return module


def settings_from_config(config) -> ExitSettings:
    return ExitSettings(policy=config.exit_policy, threshold=config.exit_threshold,
                        loss_weights=config.exit_loss_weights)


def config_source(name_or_path: object) -> str | None:
    """How messages name a saved config: ``<folder>/config.json``."""
    return f"{name_or_path}/config.json" if name_or_path else None


def multi_exit_config_class(base_cls: type) -> type:
    """``MultiExit<Base>Config``: the base config plus the exit fields, checked whenever a config is built or
    loaded (:func:`~.config.validate_exit_config`); created once, then cached."""
    if base_cls not in _CONFIG_CLASSES:
        ignored = [*getattr(base_cls, "keys_to_ignore_at_inference", []), *OUTPUT_EXTRAS]

        def __post_init__(self, **kwargs):
            base_cls.__post_init__(self, **kwargs)
            validate_exit_config(self, config_source(kwargs.get("name_or_path")))

        _CONFIG_CLASSES[base_cls] = type(f"MultiExit{base_cls.__name__}", (base_cls,), {
            "model_type": PREFIX + base_cls.model_type, "keys_to_ignore_at_inference": ignored,
            "__post_init__": __post_init__, "__module__": __name__})
    return _CONFIG_CLASSES[base_cls]


def multi_exit_model_class(base_cls: type) -> type:
    """``MultiExit<Base>``: a sequence classifier with exit heads after earlier blocks and early exit."""
    if base_cls in _MODEL_CLASSES.values():
        return base_cls
    if base_cls not in _MODEL_CLASSES:
        def __init__(self, config, *args, **kwargs):
            validate_exit_config(config)  # fields set after the config was built
            base_cls.__init__(self, config, *args, **kwargs)
            for name, default in CONFIG_FIELDS.items():
                if not hasattr(config, name):
                    setattr(config, name, default)
            self.exits = build_exit_heads(self, config.exit_layers, config.exit_head, config.exit_pooling)

        base_from_pretrained = base_cls.from_pretrained.__func__

        def from_pretrained(cls, *args, output_loading_info: bool = False, **kwargs):
            model, info = base_from_pretrained(cls, *args, output_loading_info=True, **kwargs)
            folder = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            check_loaded_exits(model.config, info, config_source(folder))
            return (model, info) if output_loading_info else model

        def forward(self, input_ids=None, labels=None, **kwargs):
            blocks, exits = exit_blocks(self, self.config.exit_layers)
            inputs = {"input_ids": input_ids, **kwargs} if input_ids is not None else kwargs
            return forward_with_exits(partial_forward(self, base_cls), blocks, exits, self.exits, self.config,
                                      settings_from_config(self.config), inputs, labels, training=self.training,
                                      final_head=arch_spec(self).sequence_head()[1])

        _MODEL_CLASSES[base_cls] = type(f"MultiExit{base_cls.__name__}", (base_cls,), {
            "config_class": multi_exit_config_class(base_cls.config_class), "__init__": __init__,
            "from_pretrained": classmethod(from_pretrained), "forward": forward, "__module__": __name__})
    return _MODEL_CLASSES[base_cls]


def check_loaded_exits(config, loading_info: dict, source: str | None) -> None:
    """Refuse a loaded multi-exit model whose exit heads are not the saved ones: ``exit_layers`` (how many exits)
    or ``exit_head`` (their design) in ``source`` changed after saving, so heads would stay random or saved ones be
    dropped."""
    def exits(keys) -> list[str]:
        return sorted(k[0] if isinstance(k, tuple) else k for k in keys
                      if (k[0] if isinstance(k, tuple) else k).startswith("exits."))

    missing = exits(loading_info.get("missing_keys", ())) + exits(loading_info.get("mismatched_keys", ()))
    unexpected = exits(loading_info.get("unexpected_keys", ()))
    if missing or unexpected:
        found = [f"{len(missing)} exit weights missing or of another shape (e.g. {missing[0]})"] if missing else []
        found += [f"{len(unexpected)} saved exit weights unused (e.g. {unexpected[0]})"] if unexpected else []
        raise CompressError(f"{source or 'multi-exit model config'}: exit_layers={config.exit_layers!r} and "
                            f"exit_head={config.exit_head!r} do not describe the saved exit heads: "
                            f"{'; '.join(found)}. Put back the values the model was saved with")


def partial_forward(model: nn.Module, base_cls: type):
    """The base class's forward bound to ``model`` (the multi-exit class's own forward adds the exits)."""
    return lambda **inputs: base_cls.forward(model, **inputs)


def make_multi_exit(model: nn.Module, heads: nn.ModuleList, settings: dict) -> nn.Module:
    """Turn a sequence classifier and its exit heads into its multi-exit class in place (config included)."""
    model.config.__class__ = multi_exit_config_class(type(model.config))
    model.config.__dict__.pop("model_type", None)  # an instance value would shadow the class's model_type
    for name in CONFIG_FIELDS:
        setattr(model.config, name, settings[name])
    model.__class__ = multi_exit_model_class(type(model))
    model.exits = heads
    model.config.architectures = [type(model).__name__]
    return model


def _backbone_class(backbone: type, config_cls: type) -> type:
    """The backbone class that reads a multi-exit config (AutoModel requires its ``config_class`` to match)."""
    key = (backbone, config_cls)
    if key not in _BACKBONE_CLASSES:
        _BACKBONE_CLASSES[key] = type(f"MultiExit{backbone.__name__}", (backbone,),
                                      {"config_class": config_cls, "__module__": __name__})
    return _BACKBONE_CLASSES[key]


def register_multi_exit_models() -> None:
    """Register the multi-exit config/model classes of every supported family (plain and compact) with
    transformers' Auto classes (idempotent)."""
    for model_type in MODEL_TYPES:
        base_cfg = getattr(transformers, configuration_auto.CONFIG_MAPPING_NAMES[model_type])
        base_model = getattr(transformers, f"{base_cfg.__name__.removesuffix('Config')}ForSequenceClassification")
        for cfg_cls, model_cls in ((base_cfg, base_model),
                                   (compact_config_class(base_cfg), compact_model_class(base_model))):
            exit_cfg = multi_exit_config_class(cfg_cls)
            AutoConfig.register(exit_cfg.model_type, exit_cfg, exist_ok=True)
            AutoModelForSequenceClassification.register(exit_cfg, multi_exit_model_class(model_cls), exist_ok=True)
            # decoder classifiers build their backbone with AutoModel.from_config(config): the plain backbone
            backbone = AutoModel._model_mapping.get(cfg_cls, None)
            if backbone is not None:
                AutoModel.register(exit_cfg, _backbone_class(backbone, exit_cfg), exist_ok=True)
