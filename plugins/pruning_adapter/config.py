"""Configuration of Pruning-Adapter: the pruning options of :class:`~compress.pruning.spec.PruningSpec`, the
schedule, and the low-rank adapters."""

from __future__ import annotations

import math
from dataclasses import InitVar, dataclass, field
from typing import Any

from peft.tuners.lora import LoraConfig

from compress.pruning.spec import InvalidOptionError, PruningSpec, is_number, positive_int, sparsity_by_structure
from compress.registry import PeftMethodType
from compress.tuner import check_lora_options, take_deprecated_init_weights

from ..multi_exit import EXIT_FIELDS, check_exit_fields
from .plan import check_plan

#: the multi-exit options ``exits`` may set
EXIT_OPTIONS = tuple(EXIT_FIELDS)

PRUNING_ADAPTER = PeftMethodType("PRUNING_ADAPTER")

SCHEDULES = ("oneshot", "progressive")
QUANTIZATIONS = ("8bit", "4bit")


@dataclass
class PruningAdapterConfig(LoraConfig):
    """Configuration for :class:`PruningAdapterModel`: task-oriented structured pruning of a frozen
    backbone plus low-rank adapters trained on the smaller model.

    A ``LoraConfig`` (as peft's ``AdaLoraConfig`` is): the adapters are peft's LoRA layers and take LoRA's options
    (``r``, ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``init_lora_weights``, ``rank_pattern``,
    ``alpha_pattern``, ``exclude_modules``, ``layers_to_transform``, ...), except those that change the base weights
    or the layer's computation (DoRA and the other LoRA variants, PiSSA/OLoRA/CorDA/LoftQ/EVA/LoRA-GA initialisations,
    ``bias``, ``target_parameters``, ``layer_replication``, ``trainable_token_indices``), which a pruned backbone
    rebuilt from the original base model cannot reproduce.

    The pruning options are those of :func:`compress.prune_model` and are validated by the same
    :class:`~compress.pruning.spec.PruningSpec` (:attr:`spec`); a bad value raises
    :class:`~compress.pruning.spec.InvalidOptionError` naming the field.

    Args:
        sparsity: fraction of each structure to remove, in [0, 1): one number for every structure in
            ``structures`` (default ``ffn``), or ``{"ffn": 0.5, "heads": 0.5}``. Structures: ``ffn`` (FFN
            neurons), ``heads`` (attention heads; with grouped-query attention an equal number per kv group;
            BERT/RoBERTa need ``mode="global"``), ``kv_heads`` (whole kv heads with their query heads),
            ``layers`` (whole transformer blocks), ``hidden`` (channels of the residual stream, removed from every
            tensor that carries it, adapters and ``modules_to_save`` copies included; BERT/RoBERTa need
            ``mode="global"``). A structure at 0 is not pruned.
        structures: the structures a single-number ``sparsity`` applies to (a list or ``"ffn,heads"``); with a
            mapping, it must name the same structures or be left out. Holds the pruned structures afterwards.
        mode: ``uniform`` (same width in every layer; the merged model reloads with plain transformers) or
            ``global`` (widths differ per layer; loading the merged model needs ``import compress``).
        importance: ``taylor`` (|dL/dgate|), ``fisher`` ((dL/dgate)^2), ``activation`` (mean activation
            magnitude on calibration data; oneshot ``model.prune(data=...)`` only, and not for ``layers``),
            ``magnitude``/``l2``, ``l1``, ``random``, or a name registered with
            :func:`compress.register_importance`. Taylor and Fisher use gradients of the task loss with respect
            to per-structure gates only: the backbone gets no weight gradients and no optimizer state.
        normalize: ``global`` mode only: ``"mean"`` or ``"l2"`` divide each layer's scores by their mean / L2 norm
            before ranking across layers, ``"none"`` ranks raw scores. Gradient scores grow towards the loss, so
            raw ranking strips early layers (see :func:`compress.pruning.plan.normalize_scores`).
        max_keep: ``global`` mode only: the largest fraction of its original FFN neurons, and of its heads, that
            any one layer keeps (at least ``1 - sparsity``; ``None``, the default, sets no cap). Global ranking
            can leave a layer nearly whole; with activation checkpointing the training peak is one layer's
            recomputation, so the widest layer sets it. Progressive schedules cap every pruning step so the
            final cap stays reachable.
        round_to: keep FFN widths (and the hidden size) a multiple of this.
        compensate_bias: add the average contribution of removed FFN neurons and heads, measured on the scoring
            batches, to the bias of the output projection they fed (FLAP-style; see
            :mod:`compress.pruning.compensate`). Kept as a frozen per-adapter buffer (``pa_bias``) and folded in
            on merge. Applies where that projection carries an adapter and has a bias (BERT/RoBERTa) or its
            config can give it one (Llama: ``mlp_bias`` / ``attention_bias`` are set and zero biases added when
            the adapters are created, as ``compress.prune_model`` does); Qwen2 and T5 output projections cannot
            hold one and stay uncompensated, with a warning. Off by default.
        schedule: ``oneshot`` prunes once, to the final sparsity, after ``scoring_steps`` training steps
            (or immediately with ``model.prune(data=...)``); ``progressive`` prunes every
            ``pruning_interval`` steps from ``scoring_steps`` to ``pruning_end_step`` along a cubic schedule,
            scoring with an exponential moving average of the gate gradients.
        scoring_steps: training steps whose gate gradients are accumulated before the first pruning step.
        pruning_end_step: step at which the final sparsity is reached (progressive); must not exceed the
            training length.
        pruning_interval: steps between two pruning events (progressive).
        ema_beta: smoothing of the importance moving average (progressive).
        checkpoint_until_pruned: when pruning happens during training (the callback), recompute activations
            (gradient checkpointing) until the final sparsity is reached, so the dense steps before it do not
            set the training memory peak; switched off once the model is pruned.
        distill_weight: weight of a layer-wise distillation term added to the training loss: the mean squared
            error between every layer's hidden states and those of the original dense model (a frozen teacher
            that shares the loaded weights and runs without gradients; see
            :mod:`compress.plugins.pruning_adapter.distill`). It tells the adapters what the pruned channels
            contributed. ``0`` (default) turns it off. Costs a dense forward pass per training step and keeps the
            dense weights alive until merging. With hidden-size pruning the teacher's states are compared on the
            channels the student keeps. Not combined with layer pruning (the depths would differ) or a quantised
            backbone.
        r: adapter rank (LoRA's).
        lora_alpha: adapter scaling numerator (scale = lora_alpha / r, or lora_alpha / sqrt(r) with ``use_rslora``);
            default 16.
        lora_dropout: dropout on the adapter path.
        target_modules: modules that get adapters; default: every attention and FFN projection of the
            architecture family (:attr:`compress.pruning.arch.ArchSpec.projection_names`).
        init_lora_weights: ``True`` (default) initialises B to zero so the adapted model starts equal to the pruned
            base; ``False`` leaves both adapter matrices random; ``"gaussian"``/``"orthogonal"`` as in LoRA.
        init_weights: deprecated name of ``init_lora_weights`` (True or False), read for one more release.
        modules_to_save: extra modules trained and saved in full (e.g. a classification head).
        quantize_backbone: ``"8bit"`` (LLM.int8) or ``"4bit"`` (NF4) to keep the adapted, frozen base layers in
            bitsandbytes form once pruning is finished (needs the ``quant`` extra); ``None`` keeps them float.
            Merging dequantises them.
        exits: exit classifiers after the blocks, so that one memory-lean run gives a narrower model (pruning)
            that can also stop early (a multi-exit model, :class:`~compress.MultiExitConfig`): a dict of its
            ``exit_layers``, ``exit_head``, ``exit_pooling``, ``exit_loss_weights``, ``exit_policy``,
            ``exit_threshold``. The exit heads train with the adapters on every exit's loss, which also scores the
            pruning; merging gives a ``MultiExit...`` model. Sequence classification, pruning ``ffn`` and
            ``heads`` only (the exits read every block at the full hidden size).
        pruning_plan: filled in while pruning (one dict of removed indices per pruning event); saved with the
            adapter so that ``PeftModel.from_pretrained`` rebuilds the pruned shapes on the original base.
            Checked when loaded, event by event and against a copy kept in the adapter weights: do not edit it
            (see :mod:`compress.plugins.pruning_adapter.plan`).
    """

    sparsity: float | dict[str, float] = field(
        default=0.5, metadata={"help": "Fraction removed, in [0, 1): one number for `structures`, or "
                                       "{'ffn': 0.5, 'heads': 0.5} (ffn, heads, kv_heads, layers, hidden)."})
    structures: list[str] | str | None = field(
        default=None, metadata={"help": "Structures a single-number sparsity applies to (default: ffn)."})
    mode: str = field(default="uniform", metadata={"help": "uniform or global width allocation."})
    importance: str = field(
        default="taylor", metadata={"help": "taylor, fisher, activation (not for layers), magnitude/l2, l1 or random."})
    normalize: str = field(
        default="none", metadata={"help": "Global mode: per-layer score scaling before ranking: none, mean or l2."})
    max_keep: float | None = field(
        default=None, metadata={"help": "Global mode: most of its original FFN neurons/heads one layer keeps."})
    round_to: int = field(default=1, metadata={"help": "Keep FFN widths (and the hidden size) a multiple of this."})
    compensate_bias: bool = field(
        default=False, metadata={"help": "Fold the mean contribution of removed channels into the output bias."})
    schedule: str = field(default="oneshot", metadata={"help": "oneshot or progressive."})
    scoring_steps: int = field(default=16, metadata={"help": "Steps of gate gradients before the first pruning."})
    pruning_end_step: int | None = field(default=None, metadata={"help": "Progressive: step of final sparsity."})
    pruning_interval: int = field(default=10, metadata={"help": "Progressive: steps between pruning events."})
    ema_beta: float = field(default=0.85, metadata={"help": "Progressive: EMA smoothing of importance."})
    checkpoint_until_pruned: bool = field(
        default=True, metadata={"help": "Gradient checkpointing during training steps before the final pruning."})
    distill_weight: float = field(
        default=0.0, metadata={"help": "Weight of hidden-state distillation from the frozen dense model (0: off)."})
    lora_alpha: float = field(default=16, metadata={"help": "Adapter scale numerator (scale = lora_alpha / r)."})
    quantize_backbone: str | None = field(
        default=None, metadata={"help": "'8bit' or '4bit': quantise the frozen base layers after pruning."})
    exits: dict[str, Any] | None = field(
        default=None, metadata={"help": "Exit classifiers after the blocks (MultiExitConfig's exit_* options)."})
    pruning_plan: list[dict] = field(
        default_factory=list, metadata={"help": "Filled while pruning; replayed on load. Do not set by hand."})
    init_weights: InitVar[bool | None] = None  # deprecated: init_lora_weights

    def __post_init__(self, init_weights: bool | None = None) -> None:
        take_deprecated_init_weights(self, init_weights)
        check_lora_options(self, "Pruning-Adapter")  # before LoraConfig's own checks, which assume the types
        super().__post_init__()
        self.peft_type = PRUNING_ADAPTER
        spec = self.spec  # validates the pruning options
        # one unambiguous form in adapter_config.json: the sparsity of every pruned structure, and their names
        self.sparsity = dict(spec.sparsity)
        self.structures = list(spec.sparsity)
        self._check_training_fields()
        self._check_exits()
        check_plan(self.pruning_plan)  # loading a saved adapter: a hand-edited field fails before the model is touched

    @property
    def pruning_finished(self) -> bool:
        """Whether ``pruning_plan`` reaches the configured sparsity (its last event is final)."""
        return bool(self.pruning_plan) and self.pruning_plan[-1].get("final", False)

    @property
    def spec(self) -> PruningSpec:
        """The pruning options as a validated :class:`~compress.pruning.spec.PruningSpec` (structures at 0
        left out)."""
        if self.structures is not None and not isinstance(self.structures, (str, list, tuple)):
            raise InvalidOptionError("structures", self.structures, "must be a list of structure names, e.g. "
                                     "['ffn', 'heads'], or None")
        sparsity = sparsity_by_structure(self.sparsity, self.structures, allow_zero=True)
        if not isinstance(self.importance, str):
            raise InvalidOptionError("importance", self.importance, "must be the name of a criterion (a saved "
                                     "config holds names only); register a custom one with "
                                     "compress.register_importance")
        return PruningSpec(sparsity=sparsity, mode=self.mode, importance=self.importance, normalize=self.normalize,
                           max_keep=self.max_keep, round_to=self.round_to, compensate_bias=self.compensate_bias)

    def _check_training_fields(self) -> None:
        if self.schedule not in SCHEDULES:
            raise InvalidOptionError("schedule", self.schedule, f"choose one of {', '.join(SCHEDULES)}")
        positive_int("scoring_steps", self.scoring_steps)
        positive_int("pruning_interval", self.pruning_interval)
        if self.pruning_end_step is not None:
            positive_int("pruning_end_step", self.pruning_end_step)
        if self.schedule == "progressive":
            if self.pruning_end_step is None:
                raise InvalidOptionError("pruning_end_step", None, "schedule='progressive' needs the step by which "
                                         "the final sparsity is reached (at most the number of training steps)")
            if self.pruning_end_step <= self.scoring_steps:
                raise InvalidOptionError("pruning_end_step", self.pruning_end_step,
                                         f"must come after scoring_steps={self.scoring_steps}")
        _fraction("ema_beta", self.ema_beta)
        _boolean("checkpoint_until_pruned", self.checkpoint_until_pruned)
        if not (is_number(self.distill_weight) and math.isfinite(self.distill_weight) and self.distill_weight >= 0):
            raise InvalidOptionError("distill_weight", self.distill_weight, "must be a finite number >= 0 (0: off)")
        if self.quantize_backbone is not None and self.quantize_backbone not in QUANTIZATIONS:
            raise InvalidOptionError("quantize_backbone", self.quantize_backbone,
                                     f"choose one of {', '.join(QUANTIZATIONS)} or None")
        if self.distill_weight and "layers" in self.sparsity:
            raise InvalidOptionError("distill_weight", self.distill_weight, "needs every layer's hidden states to "
                                     "have a teacher counterpart: leave 'layers' out of sparsity, or set it to 0")
        if self.distill_weight and self.quantize_backbone:
            raise InvalidOptionError("distill_weight", self.distill_weight, "keeps a float dense teacher, which "
                                     "defeats quantize_backbone: use one or the other")

    def _check_exits(self) -> None:
        if self.exits is None:
            return
        if not isinstance(self.exits, dict) or set(self.exits) - set(EXIT_OPTIONS):
            raise InvalidOptionError("exits", self.exits, f"must be a dict of {', '.join(EXIT_OPTIONS)}")
        if self.task_type is not None and str(self.task_type) != "SEQ_CLS":
            raise InvalidOptionError("exits", self.exits, "are sequence classifiers: use task_type='SEQ_CLS'")
        moved = sorted(set(self.sparsity) & {"layers", "hidden"})
        if moved:
            raise InvalidOptionError("exits", self.exits, f"read every block at the full hidden size: prune ffn and "
                                     f"heads only (not {', '.join(moved)})")
        checked = check_exit_fields(self.exits)  # validates, and normalises the values
        self.exits = {name: checked[name] for name in self.exits}


def _fraction(name: str, value: Any) -> None:
    if not (is_number(value) and 0.0 <= value < 1.0):
        raise InvalidOptionError(name, value, "must be a number in [0, 1)")


def _boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise InvalidOptionError(name, value, "must be True or False")
