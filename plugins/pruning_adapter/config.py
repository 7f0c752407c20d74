"""Configuration of Pruning-Adapter."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from peft.config import PeftConfig

from compress.errors import CompressError
from compress.pruning.engine import NORMALIZATIONS, check_max_keep
from compress.pruning.importance import available_importances
from compress.registry import PeftMethodType

from .plan import check_plan

PRUNING_ADAPTER = PeftMethodType("PRUNING_ADAPTER")

SCHEDULES = ("oneshot", "progressive")
MODES = ("uniform", "global")


@dataclass
class PruningAdapterConfig(PeftConfig):
    """Configuration for :class:`PruningAdapterModel`: task-oriented structured pruning of a frozen
    backbone plus low-rank adapters trained on the smaller model.

    Args:
        ffn_sparsity: fraction of FFN neurons to remove in [0, 1).
        head_sparsity: fraction of attention heads to remove in [0, 1) (BERT/RoBERTa need ``mode="global"``).
        layer_sparsity: fraction of whole transformer blocks to remove in [0, 1).
        sparsity: alternative to the three fields above, ``{"ffn": 0.5, "heads": 0.25, "layers": 0.0}``
            (keys: ffn, heads, kv_heads, layers); overrides them when given.
        prune_kv_heads: with grouped-query attention, remove whole kv heads (with their query heads) instead
            of an equal number of query heads per kv group.
        importance: ``taylor`` (|dL/dgate|), ``fisher`` ((dL/dgate)^2), ``magnitude`` or ``random``. Taylor and
            Fisher use gradients of the task loss with respect to per-structure gates only: the backbone
            gets no weight gradients and no optimizer state.
        schedule: ``oneshot`` prunes once, to the final sparsity, after ``scoring_steps`` training steps
            (or immediately with ``model.prune(data=...)``); ``progressive`` prunes every
            ``pruning_interval`` steps from ``scoring_steps`` to ``pruning_end_step`` along a cubic schedule,
            scoring with an exponential moving average of the gate gradients.
        scoring_steps: training steps whose gate gradients are accumulated before the first pruning step.
        pruning_end_step: step at which the final sparsity is reached (progressive); must not exceed the
            training length.
        pruning_interval: steps between two pruning events (progressive).
        ema_beta: smoothing of the importance moving average (progressive).
        mode: ``uniform`` (same width in every layer; the merged model reloads with plain transformers) or
            ``global`` (widths differ per layer; loading the merged model needs ``import compress``).
        round_to: keep FFN widths a multiple of this.
        score_normalization: ``global`` mode only: ``"mean"`` or ``"l2"`` divide each layer's scores by their
            mean / L2 norm before ranking across layers, ``"none"`` ranks raw scores. Gradient scores grow
            towards the loss, so raw ranking strips early layers (see
            :func:`compress.pruning.engine.normalize_scores`).
        max_keep: ``global`` mode only: the largest fraction of its original FFN neurons, and of its heads, that
            any one layer keeps (at least ``1 - sparsity``; ``None``, the default, sets no cap). Global ranking
            can leave a layer nearly whole; with activation checkpointing the training peak is one layer's
            recomputation, so the widest layer sets it. Progressive schedules cap every pruning step so the
            final cap stays reachable.
        compensate_bias: add the average contribution of removed FFN neurons and heads, measured on the scoring
            batches, to the bias of the output projection they fed (FLAP-style; see
            :mod:`compress.pruning.compensate`). Kept as a frozen per-adapter buffer and folded in on merge.
            Applies where that projection has a bias and carries an adapter (BERT/RoBERTa); Llama, Qwen2 and
            T5 output projections have no bias and are left as they are. Off by default: on MiniLM/SST-2 it
            cost oneshot pruning 2.9 points (2 seeds) and changed progressive pruning by +0.3 (noise).
        checkpoint_until_pruned: when pruning happens during training (the callback), recompute activations
            (gradient checkpointing) until the final sparsity is reached, so the dense steps before it do not
            set the training memory peak; switched off once the model is pruned.
        distill_weight: weight of a layer-wise distillation term added to the training loss: the mean squared
            error between every layer's hidden states and those of the original dense model (a frozen teacher
            that shares the loaded weights and runs without gradients; see :mod:`compress.pruning.distill`).
            It tells the adapters what the pruned channels contributed. ``0`` (default) turns it off. Costs a
            dense forward pass per training step and keeps the dense weights alive until merging; not
            combined with layer pruning (hidden states would not align) or a quantised backbone.
        r: adapter rank.
        lora_alpha: adapter scaling numerator (scale = lora_alpha / r).
        lora_dropout: dropout on the adapter path.
        target_modules: modules that get adapters; default: every attention and FFN projection.
        init_weights: ``True`` initialises B to zero so the adapted model starts equal to the pruned base.
        modules_to_save: extra modules trained and saved in full (e.g. a classification head).
        quantize_backbone: ``"8bit"`` (LLM.int8) or ``"4bit"`` (NF4) to keep the adapted, frozen base layers in
            bitsandbytes form once pruning is finished (needs the ``quant`` extra); ``None`` keeps them float.
            Merging dequantises them.
        pruning_plan: filled in while pruning (one dict of removed indices per pruning event); saved with the
            adapter so that ``PeftModel.from_pretrained`` rebuilds the pruned shapes on the original base.
            Checked when loaded, event by event and against a copy kept in the adapter weights: do not edit it
            (see :mod:`compress.plugins.pruning_adapter.plan`).
    """

    ffn_sparsity: float = field(default=0.5, metadata={"help": "Fraction of FFN neurons to remove, in [0, 1)."})
    head_sparsity: float = field(default=0.0, metadata={"help": "Fraction of attention heads to remove, in [0, 1)."})
    layer_sparsity: float = field(default=0.0, metadata={"help": "Fraction of transformer blocks to remove."})
    sparsity: dict[str, float] | None = field(
        default=None, metadata={"help": "Sparsity per structure, e.g. {'ffn': 0.5, 'heads': 0.25}."})
    prune_kv_heads: bool = field(default=False, metadata={"help": "GQA: remove whole kv heads with their queries."})
    importance: str = field(default="taylor", metadata={"help": "taylor, fisher, magnitude or random."})
    schedule: str = field(default="oneshot", metadata={"help": "oneshot or progressive."})
    scoring_steps: int = field(default=16, metadata={"help": "Steps of gate gradients before the first pruning."})
    pruning_end_step: int | None = field(default=None, metadata={"help": "Progressive: step of final sparsity."})
    pruning_interval: int = field(default=10, metadata={"help": "Progressive: steps between pruning events."})
    ema_beta: float = field(default=0.85, metadata={"help": "Progressive: EMA smoothing of importance."})
    mode: str = field(default="uniform", metadata={"help": "uniform or global width allocation."})
    round_to: int = field(default=1, metadata={"help": "Keep FFN widths a multiple of this."})
    score_normalization: str = field(
        default="none", metadata={"help": "Global mode: per-layer score scaling before ranking: none, mean or l2."})
    max_keep: float | None = field(
        default=None, metadata={"help": "Global mode: most of its original FFN neurons/heads one layer keeps."})
    compensate_bias: bool = field(
        default=False, metadata={"help": "Fold the mean contribution of removed channels into the output bias."})
    checkpoint_until_pruned: bool = field(
        default=True, metadata={"help": "Gradient checkpointing during training steps before the final pruning."})
    distill_weight: float = field(
        default=0.0, metadata={"help": "Weight of hidden-state distillation from the frozen dense model (0: off)."})
    r: int = field(default=8, metadata={"help": "Adapter rank."})
    lora_alpha: int = field(default=16, metadata={"help": "Adapter scale numerator (scale = lora_alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter path."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Modules to adapt (names or regex); default: attention and FFN projections."})
    init_weights: bool = field(default=True, metadata={"help": "Zero-init B so training starts at the pruned base."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained and saved in full, e.g. the classifier."})
    quantize_backbone: str | None = field(
        default=None, metadata={"help": "'8bit' or '4bit': quantise the frozen base layers after pruning."})
    pruning_plan: list[dict] = field(
        default_factory=list, metadata={"help": "Filled while pruning; replayed on load. Do not set by hand."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PRUNING_ADAPTER
        self.target_modules = set(self.target_modules) if isinstance(self.target_modules, list) else \
            self.target_modules
        if self.sparsity is not None:
            unknown = set(self.sparsity) - {"ffn", "heads", "kv_heads", "layers"}
            if unknown:
                raise CompressError(f"unknown structure(s) {sorted(unknown)} in sparsity; "
                                    "use ffn, heads, kv_heads, layers")
            if "heads" in self.sparsity and "kv_heads" in self.sparsity:
                raise CompressError("sparsity names both 'heads' and 'kv_heads': prune query heads per kv group "
                                    "or whole kv heads, not both")
            self.prune_kv_heads = self.prune_kv_heads or "kv_heads" in self.sparsity
            self.ffn_sparsity = float(self.sparsity.get("ffn", 0.0))
            self.head_sparsity = float(self.sparsity.get("heads", self.sparsity.get("kv_heads", 0.0)))
            self.layer_sparsity = float(self.sparsity.get("layers", 0.0))
            self.sparsity = None  # the three fields now hold it; keeps the saved config unambiguous
        for name in ("ffn_sparsity", "head_sparsity", "layer_sparsity"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise CompressError(f"{name}={value}: a sparsity is the fraction removed and must be in [0, 1)")
        if not (self.ffn_sparsity or self.head_sparsity or self.layer_sparsity):
            raise CompressError("all sparsities are 0: set ffn_sparsity, head_sparsity or layer_sparsity "
                                "(or use LoRA if you do not want pruning)")
        if self.importance not in available_importances():
            raise CompressError(f"importance={self.importance!r}; choose one of {', '.join(available_importances())}")
        if self.schedule not in SCHEDULES:
            raise CompressError(f"schedule={self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        if self.score_normalization not in NORMALIZATIONS:
            raise CompressError(f"score_normalization={self.score_normalization!r}; choose one of "
                                f"{', '.join(NORMALIZATIONS)}")
        if self.mode not in MODES:
            raise CompressError(f"mode={self.mode!r}; choose one of {', '.join(MODES)}")
        check_max_keep(self.max_keep, self.ratios, self.mode)
        if self.scoring_steps < 1 or self.pruning_interval < 1 or self.round_to < 1 or self.r < 1:
            raise CompressError("scoring_steps, pruning_interval, round_to and r must be positive integers")
        if self.schedule == "progressive":
            if self.pruning_end_step is None:
                raise CompressError("schedule='progressive' needs pruning_end_step: the step by which the final "
                                    "sparsity is reached (at most the number of training steps)")
            if self.pruning_end_step <= self.scoring_steps:
                raise CompressError(f"pruning_end_step={self.pruning_end_step} must come after "
                                    f"scoring_steps={self.scoring_steps}")
        if self.quantize_backbone not in (None, "8bit", "4bit"):
            raise CompressError(f"quantize_backbone={self.quantize_backbone!r}; choose '8bit', '4bit' or None")
        if not 0.0 <= self.ema_beta < 1.0:
            raise CompressError(f"ema_beta={self.ema_beta} must be in [0, 1)")
        if not (self.distill_weight >= 0.0 and math.isfinite(self.distill_weight)):
            raise CompressError(f"distill_weight={self.distill_weight} must be a finite number >= 0")
        if self.distill_weight and self.layer_sparsity:
            raise CompressError("distill_weight needs every layer's hidden states to have a teacher counterpart: "
                                "set layer_sparsity=0 or distill_weight=0")
        if self.distill_weight and self.quantize_backbone:
            raise CompressError("distill_weight keeps a float dense teacher, which defeats quantize_backbone: "
                                "use one or the other")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise CompressError(f"lora_dropout={self.lora_dropout} must be in [0, 1)")
        check_plan(self.pruning_plan)  # loading a saved adapter: a hand-edited field fails before the model is touched

    @property
    def ratios(self) -> dict[str, float]:
        """Sparsity per engine structure (only the non-zero ones)."""
        heads = "kv_heads" if self.prune_kv_heads else "heads"
        ratios = {"ffn": self.ffn_sparsity, heads: self.head_sparsity, "layers": self.layer_sparsity}
        return {k: v for k, v in ratios.items() if v > 0}

    def last_pruning_step(self) -> int:
        """The training step of the last pruning event."""
        return self.scoring_steps if self.schedule == "oneshot" else int(self.pruning_end_step)
