"""Saved multi-exit models: :class:`MultiExitForSequenceClassification`, a transformers model holding a sequence
classifier (the *backbone*: BERT, RoBERTa, Llama or Qwen2, compact pruned forms included), whose own head is the
last exit, and ``exits``, the exit heads after earlier blocks; early exit at inference.

Its config, :class:`MultiExitClassifierConfig` (``model_type`` ``multi_exit``), holds the backbone's config as a
sub-config (as ``EncoderDecoderConfig`` holds its encoder's and decoder's) and the exit fields (``exit_layers``,
``exit_head``, ``exit_pooling``, ``exit_policy``, ``exit_threshold``, ``exit_loss_weights``). ``import compress``
registers both with transformers' Auto classes (``AutoConfig``, ``AutoModelForSequenceClassification``,
``pipeline("text-classification")``): no remote code. Folders saved in the earlier per-family format load too
(:mod:`.legacy`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedConfig, PreTrainedModel
from transformers import initialization as hf_init
from transformers.configuration_utils import SubConfigSpec

from compress.errors import CompressError
from compress.pruning.arch import arch_spec
from compress.tasks import register_task_class

from . import legacy
from .config import EXIT_FIELDS, validate_exit_config
from .layer import ExitHead
from .runner import OUTPUT_EXTRAS, ExitSettings, every_exit_loss, forward_with_exits

MODEL_TYPE = "multi_exit"
#: config attributes of a multi-exit model, with their defaults
CONFIG_FIELDS = EXIT_FIELDS
#: the label fields a pipeline reads from the model's config; the backbone's head computes them
_LABEL_FIELDS = ("id2label", "label2id", "problem_type")


def exit_blocks(model: nn.Module, exit_layers: list[int] | None) -> tuple[nn.ModuleList, list[int]]:
    """The blocks of a sequence classifier and the (sorted) blocks before the last that carry an exit head."""
    stacks = arch_spec(model).stacks()
    blocks = stacks[0].blocks
    layers = range(len(blocks)) if exit_layers is None else exit_layers
    return blocks, [b for b in sorted(layers) if b != len(blocks) - 1]


def build_exit_heads(model: nn.Module, exit_layers: list[int] | None, design: str,
                     pooling: str = "mean") -> nn.ModuleList:
    """One :class:`ExitHead` per exit before the last block of the sequence classifier ``model``, shaped like its
    own head (and, ``pooled``, starting from its weights), reading its block's output by ``pooling``."""
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


class MultiExitClassifierConfig(PreTrainedConfig):
    r"""Configuration of a :class:`MultiExitForSequenceClassification`: the backbone classifier's config and where
    its exits sit and when an example leaves. Building or loading one checks the exit fields against their allowed
    values and the backbone's depth (:func:`~.config.validate_exit_config`).

    Args:
        backbone: the sequence classifier's config (a config or its dict, with its ``model_type``), e.g. a
            ``BertConfig`` or a compact ``CompressedBertConfig``.
        exit_layers: blocks followed by an exit (``None``: every block); the last block's exit is the backbone's
            own head.
        exit_head: ``pooled`` or ``linear`` (see :class:`~compress.MultiExitConfig`).
        exit_pooling: what an exit head reads from its block's output: ``mean``, ``first`` or ``last``.
        exit_policy: ``entropy``, ``max_prob`` or ``patience``.
        exit_threshold: the policy's threshold; ``None`` runs every block.
        exit_loss_weights: ``linear``, ``equal`` or one positive number per exit (training only).

    The label fields (``id2label``, ``label2id``, ``problem_type``) are the backbone's: given here they are written
    into the backbone's config, else taken from it.

    Example::

        >>> config = MultiExitClassifierConfig(backbone=BertConfig(num_labels=3), exit_layers=[1, 3],
        ...                                    exit_policy="patience", exit_threshold=1)
        >>> model = MultiExitForSequenceClassification(config)
    """

    model_type = MODEL_TYPE
    sub_configs_defaults = {"backbone": SubConfigSpec(config_class=AutoConfig, model_type="bert")}
    #: output fields the Trainer leaves out of its predictions, so that compute_metrics gets the logits alone
    keys_to_ignore_at_inference = list(OUTPUT_EXTRAS)

    backbone: PreTrainedConfig | dict | None = None
    exit_layers: list[int] | None = None
    exit_head: str = "pooled"
    exit_pooling: str = "mean"
    exit_policy: str = "entropy"
    exit_threshold: float | None = None
    exit_loss_weights: str | list[float] = "linear"

    def __post_init__(self, **kwargs):
        labels_given = self.id2label is not None or kwargs.get("num_labels") is not None
        super().__post_init__(**kwargs)
        backbone = self.backbone
        if labels_given:
            backbone.id2label = dict(self.id2label)
            backbone.label2id = dict(self.label2id) if self.label2id else {v: k for k, v in self.id2label.items()}
            if self.problem_type is not None:
                backbone.problem_type = self.problem_type
        for name in _LABEL_FIELDS:
            value = getattr(backbone, name)
            setattr(self, name, dict(value) if isinstance(value, dict) else value)
        validate_exit_config(self, config_source(self.name_or_path))

    @property
    def num_hidden_layers(self) -> int | None:
        """The backbone's number of blocks (what ``exit_layers`` indexes)."""
        return getattr(self.backbone, "num_hidden_layers", None)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        """Build the config from a ``config.json``'s contents: this format, or a multi-exit model saved in the
        earlier per-family format (``model_type`` ``multi_exit_<family>``, converted with a FutureWarning)."""
        if legacy.is_legacy_config(config_dict):
            config_dict = legacy.convert_config_dict(config_dict)
        return super().from_dict(config_dict, **kwargs)

    def to_diff_dict(self) -> dict[str, Any]:
        """transformers' diff against the defaults, with every exit field written: a saved model states how it
        exits, whatever later defaults are."""
        serialized = super().to_diff_dict()
        serialized.update({name: getattr(self, name) for name in EXIT_FIELDS})
        return serialized


class MultiExitForSequenceClassification(PreTrainedModel):
    """A sequence classifier (``backbone``) with exit heads (``exits``) after earlier blocks and early exit.

    In training mode, or without ``config.exit_threshold``, every exit classifies and the loss (given labels) is the
    weighted mean of every exit's task loss; in eval mode with a threshold each example leaves at its first exit
    that ``config.exit_policy`` accepts, and the remaining blocks run on the rows still running
    (:mod:`.runner`). The output is a :class:`~.runner.MultiExitClassifierOutput`.

    ``merge_and_unload()`` of a multi-exit (or Pruning-Adapter ``exits``) PEFT model returns one;
    ``compress.save_pretrained`` saves it and ``AutoModelForSequenceClassification.from_pretrained`` (after
    ``import compress``) loads it, checking that the saved exit heads are the ones the config describes.

    Args:
        config: the model's :class:`MultiExitClassifierConfig`.
        backbone: an existing classifier to hold (its config becomes ``config.backbone``); default: one built
            from ``config.backbone``.
        exits: existing exit heads, one per exit before the last block; default: new heads shaped like (and, for
            ``pooled``, starting from) the backbone's head.
    """

    config_class = MultiExitClassifierConfig
    # a prefix no attribute has: ``base_model`` is the model itself, and loading adds or strips no prefix
    base_model_prefix = "multi_exit"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    # the backbone checks its own attention implementation
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True

    def __init__(self, config: MultiExitClassifierConfig, backbone: PreTrainedModel | None = None,
                 exits: nn.ModuleList | None = None):
        if not isinstance(config, MultiExitClassifierConfig):
            raise CompressError(f"{type(self).__name__} needs a MultiExitClassifierConfig, not "
                                f"{type(config).__name__}")
        validate_exit_config(config)  # fields may have been set after the config was built
        super().__init__(config)
        if backbone is None:
            backbone = AutoModelForSequenceClassification.from_config(config.backbone)
        # one config object for the backbone and the sub-config (the backbone's own: it holds what loading set,
        # e.g. the attention implementation), so that changes through either are saved
        config.backbone = backbone.config
        self.backbone = backbone
        _, blocks = exit_blocks(backbone, config.exit_layers)
        if exits is None:
            exits = build_exit_heads(backbone, config.exit_layers, config.exit_head, config.exit_pooling)
        elif len(exits) != len(blocks):
            raise CompressError(f"{len(exits)} exit heads given, but exit_layers={config.exit_layers!r} on this "
                                f"{len(blocks) + 1}-exit model needs one per exit before the last block "
                                f"({len(blocks)})")
        self.exits = exits
        # the backbone and exit heads are built (or trained) already: collect the submodels' properties
        # (tied weights, no-split modules) without initializing any weight again
        with hf_init.no_init_weights():
            self.post_init()

    # -- loading ----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' ``from_pretrained``, then a check that the saved exit heads are the ones ``exit_layers``
        and ``exit_head`` describe. A folder saved in the earlier per-family format loads with a FutureWarning
        (:func:`.legacy.loading_arguments`)."""
        output_loading_info = kwargs.pop("output_loading_info", False)
        source = pretrained_model_name_or_path
        if legacy.holds_legacy_model(source, kwargs):
            kwargs = legacy.loading_arguments(cls.config_class, source, kwargs)
            pretrained_model_name_or_path = None  # the weights come as `state_dict`
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True,
                                              **kwargs)
        check_loaded_exits(model.config, info, config_source(source))
        return (model, info) if output_loading_info else model

    # -- the model ----------------------------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.backbone.set_input_embeddings(value)

    def exit_block_indices(self) -> tuple[nn.ModuleList, list[int]]:
        """The backbone's blocks and the blocks before the last that carry an exit head."""
        return exit_blocks(self.backbone, self.config.exit_layers)

    def forward(self, input_ids=None, labels=None, **kwargs):
        """The backbone's inputs (``input_ids``, ``attention_mask``, ...) and ``labels``; see the class
        docstring."""
        blocks, exits = self.exit_block_indices()
        inputs = {"input_ids": input_ids, **kwargs} if input_ids is not None else kwargs
        return forward_with_exits(self.backbone, blocks, exits, self.exits, self.config,
                                  settings_from_config(self.config), inputs, labels, training=self.training,
                                  final_head=arch_spec(self.backbone).sequence_head()[1])

    @contextlib.contextmanager
    def every_exit_loss(self) -> Iterator[nn.Module]:
        """While active, the backbone's own forward returns the loss of every exit whenever it gets labels, and
        the backbone is yielded: what :func:`compress.prune_model` run on it scores, so that pruning its width
        keeps what each exit needs (the exit heads read the hidden size, which must then stay)."""
        blocks, exits = self.exit_block_indices()
        depth, width = len(blocks), self._exit_input_width()
        with every_exit_loss(self.backbone, blocks, exits, self.exits, self.config.exit_loss_weights):
            yield self.backbone
        self.config.backbone = self.backbone.config  # the same object, unless the change replaced the config
        changed = [f"{what} {before} -> {after}" for what, before, after in (
            ("blocks", depth, len(self.exit_block_indices()[0])), ("hidden size", width, self._exit_input_width()))
            if before != after]
        if changed:
            raise CompressError(f"the backbone changed under its exits ({', '.join(changed)}): exit heads sit after "
                                "given blocks (exit_layers) and read the hidden size, so prune only within blocks "
                                "(ffn, heads, kv_heads); start again from the saved model")

    def _exit_input_width(self) -> int:
        """The width the exit heads read: the backbone head's input (the hidden size)."""
        dense, out = arch_spec(self.backbone).sequence_head()
        return (dense if dense is not None else out).in_features


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


def make_multi_exit(model: PreTrainedModel, heads: nn.ModuleList,
                    settings: dict[str, Any]) -> MultiExitForSequenceClassification:
    """A :class:`MultiExitForSequenceClassification` holding the sequence classifier ``model`` (not copied) and its
    exit heads, with the exit fields of ``settings``; it keeps ``model``'s training mode and Hub tags."""
    # built from a copy of the backbone's config (building the config resets its sub-configs' attention
    # implementation); the model then adopts the backbone's config object itself
    config = MultiExitClassifierConfig(backbone=model.config.to_dict(), name_or_path=model.config.name_or_path,
                                       **{name: settings[name] for name in EXIT_FIELDS})
    merged = MultiExitForSequenceClassification(config, backbone=model, exits=heads)
    if getattr(model, "model_tags", None):
        merged.add_model_tags(model.model_tags)
    return merged.train(model.training)


def register_multi_exit_models() -> None:
    """Register the multi-exit config and model with transformers' Auto classes, and the readers of configs saved
    in the earlier per-family format (idempotent)."""
    AutoConfig.register(MODEL_TYPE, MultiExitClassifierConfig, exist_ok=True)
    AutoModelForSequenceClassification.register(MultiExitClassifierConfig, MultiExitForSequenceClassification,
                                                exist_ok=True)
    register_task_class(MultiExitForSequenceClassification.__name__, "sequence-classification")
    for config_cls in legacy.LEGACY_CONFIGS:
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
