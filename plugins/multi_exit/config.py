"""Configuration of multi-exit models: where the exits sit, how they train, and when an example leaves."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from peft.config import PeftConfig
from peft.utils.constants import DUMMY_TARGET_MODULES

from compress.pruning.spec import InvalidOptionError, is_number
from compress.registry import PeftMethodType

from .policy import POLICIES, check_threshold

MULTI_EXIT = PeftMethodType("MULTI_EXIT")

EXIT_HEADS = ("pooled", "linear")
EXIT_POOLINGS = ("mean", "first", "last")
LOSS_WEIGHTINGS = ("linear", "equal")
SLENDER_STRUCTURES = ("heads", "ffn")
SLENDER_IMPORTANCES = ("taylor", "fisher", "magnitude")


@dataclass
class MultiExitConfig(PeftConfig):
    """Configuration for :class:`MultiExitModel`: a classifier after several blocks of an encoder, trained jointly,
    with early exit at inference (after COST-EFF, Shen et al., EMNLP 2022; exit policies after DeeBERT and PABEE).

    The last block's exit is the model's own classification head; ``exit_layers`` adds exits after earlier blocks.
    Training minimises the weighted mean over exits of the task loss, mixed with distillation from a teacher's
    logits (``distill_weight``). At inference (``model.eval()`` with ``exit_threshold`` set), each example leaves
    at the first exit whose prediction satisfies ``exit_policy``: exited examples are removed from the running
    batch, so the remaining blocks run on fewer rows.

    Args:
        exit_layers: indices of the blocks followed by an exit; default every block. The last block always has one
            (the model's own head).
        exit_head: ``pooled`` (dense + tanh + linear, initialised from the model's own head: BERT's pooler and
            classifier, RoBERTa's classification head) or ``linear`` (one linear layer, random).
        exit_pooling: what an exit head reads from its block's output: ``mean`` over the tokens the attention
            mask keeps (default), the ``first`` token, as an encoder's own head does (DeeBERT, PABEE), or the
            ``last`` real token, as a decoder's own head does. In an encoder's early blocks the first token's state
            barely varies from example to example (it has attended to little yet; sentence-transformers
            checkpoints never train it at all), so a first-token exit there can stay at chance; the mean of the
            tokens carries the input from the first block on. In a decoder the first token sees only itself.
        exit_loss_weights: ``linear`` (exit after block ``i`` weighs ``i + 1``, as PABEE), ``equal``, or one
            positive number per exit (``exit_layers`` plus the last block).
        distill_weight: ``alpha`` in ``(1 - alpha) * task loss + alpha * distillation loss`` per exit; the
            distillation loss is the KL divergence from the teacher's temperature-softened logits (times ``T^2``).
            Needs a teacher: :func:`~compress.plugins.multi_exit.apply_multi_exit` or
            ``model.base_model.set_teacher(teacher)``.
        distill_temperature: ``T`` of that distillation.
        distill_hidden_weight: weight of an extra mean-squared error between each exit's first-token hidden state
            and the teacher's at the same relative depth (same width needed); 0 turns it off.
        train_backbone: train the backbone with the exits (COST-EFF's joint training; the saved adapter then holds
            the backbone's weights too), or keep it frozen and train the exits only (DeeBERT's second stage, for a
            model already fine-tuned on the task).
        exit_policy: ``entropy`` (leave when the prediction's entropy is below the threshold: 0 runs every block,
            ``inf`` leaves at the first exit), ``max_prob`` (leave when the top class probability exceeds the
            threshold, in [0, 1]: 0 leaves at the first exit, 1 runs every block) or ``patience`` (leave when the
            prediction has not changed over ``threshold`` consecutive exits, a whole number or ``inf``: 0 leaves at
            the first exit, ``inf`` runs every block).
        exit_threshold: the policy's threshold; ``None`` runs every block for every example (the output's logits
            are the last exit's). :func:`~compress.plugins.multi_exit.calibrate_exit_threshold` chooses one on
            validation data for a target accuracy drop or speedup and stores it here.
        slenderize: fractions of attention heads and FFN neurons to remove before training, e.g.
            ``{"heads": 0.5, "ffn": 0.5}`` (COST-EFF's slenderization: width shrinks, depth stays). Applied by
            ``model.base_model.slenderize(data)`` through :func:`compress.prune_model` in ``global`` mode, with the
            importance computed from the loss of every exit, so each exit keeps the structures it needs.
        slenderize_importance: the engine importance for it: ``taylor`` (default), ``fisher`` or ``magnitude``.
        slender_shapes: the projection shapes after slenderization, filled in by ``slenderize`` and saved with the
            adapter, so that ``PeftModel.from_pretrained`` rebuilds them on the original model. Do not set by hand.
        modules_to_save: modules trained and saved in full besides the exits; for ``SEQ_CLS`` peft adds the
            classifier itself.
    """

    exit_layers: list[int] | None = field(
        default=None, metadata={"help": "Blocks followed by an exit (default: every block)."})
    exit_head: str = field(default="pooled", metadata={"help": "Exit classifier: pooled or linear."})
    exit_pooling: str = field(default="mean", metadata={"help": "What an exit reads: mean (of tokens), first or last."})
    exit_loss_weights: str | list[float] = field(
        default="linear", metadata={"help": "Loss weight per exit: linear, equal, or one number per exit."})
    distill_weight: float = field(default=0.0, metadata={"help": "Weight of teacher distillation per exit, in [0, 1]."})
    distill_temperature: float = field(default=2.0, metadata={"help": "Temperature of the logit distillation."})
    distill_hidden_weight: float = field(
        default=0.0, metadata={"help": "Weight of hidden-state distillation (first token, same relative depth)."})
    train_backbone: bool = field(default=True, metadata={"help": "Train the backbone with the exits (joint)."})
    exit_policy: str = field(default="entropy", metadata={"help": "entropy, max_prob or patience."})
    exit_threshold: float | None = field(
        default=None, metadata={"help": "Threshold of the exit policy; None runs every block."})
    slenderize: dict[str, float] | None = field(
        default=None, metadata={"help": "Fractions of heads / ffn to remove before training, e.g. {'ffn': 0.5}."})
    slenderize_importance: str = field(
        default="taylor", metadata={"help": "Importance for slenderization: taylor, fisher or magnitude."})
    slender_shapes: dict[str, list[int]] | None = field(
        default=None, metadata={"help": "Filled by slenderize(); do not set by hand."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained and saved in full, e.g. the classifier."})
    target_modules: str | None = field(
        default=DUMMY_TARGET_MODULES, metadata={"help": "Not used: exits are added beside the backbone's blocks."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = MULTI_EXIT
        if self.exit_layers is not None:
            layers = self.exit_layers
            if not isinstance(layers, (list, tuple)) or not layers or not all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
                raise InvalidOptionError("exit_layers", layers, "must be a non-empty list of block indices "
                                         "(integers >= 0), or None for every block")
            if len(set(layers)) != len(layers):
                raise InvalidOptionError("exit_layers", layers, "names a block twice")
            self.exit_layers = sorted(layers)
        if self.exit_head not in EXIT_HEADS:
            raise InvalidOptionError("exit_head", self.exit_head, f"choose one of {', '.join(EXIT_HEADS)}")
        if self.exit_pooling not in EXIT_POOLINGS:
            raise InvalidOptionError("exit_pooling", self.exit_pooling, f"choose one of {', '.join(EXIT_POOLINGS)}")
        weights = self.exit_loss_weights
        if isinstance(weights, str):
            if weights not in LOSS_WEIGHTINGS:
                raise InvalidOptionError("exit_loss_weights", weights,
                                         f"choose one of {', '.join(LOSS_WEIGHTINGS)} or give one number per exit")
        elif not isinstance(weights, (list, tuple)) or not weights or not all(
                is_number(w) and math.isfinite(w) and w > 0 for w in weights):
            raise InvalidOptionError("exit_loss_weights", weights, "must be linear, equal, or a list of positive "
                                     "numbers (one per exit)")
        for name in ("distill_weight", "distill_temperature", "distill_hidden_weight"):
            value = getattr(self, name)
            if not (is_number(value) and math.isfinite(value)):
                raise InvalidOptionError(name, value, "must be a finite number")
        if not 0 <= self.distill_weight <= 1:
            raise InvalidOptionError("distill_weight", self.distill_weight, "must be in [0, 1]")
        if self.distill_temperature <= 0:
            raise InvalidOptionError("distill_temperature", self.distill_temperature, "must be > 0")
        if self.distill_hidden_weight < 0:
            raise InvalidOptionError("distill_hidden_weight", self.distill_hidden_weight, "must be >= 0")
        if not isinstance(self.train_backbone, bool):
            raise InvalidOptionError("train_backbone", self.train_backbone, "must be True or False")
        if self.exit_policy not in POLICIES:
            raise InvalidOptionError("exit_policy", self.exit_policy, f"choose one of {', '.join(POLICIES)}")
        if self.exit_threshold is not None:
            self.exit_threshold = check_threshold(self.exit_policy, self.exit_threshold)
        if self.slenderize is not None:
            if not isinstance(self.slenderize, dict) or not self.slenderize or not all(
                    k in SLENDER_STRUCTURES and is_number(v) and 0 < v < 1 for k, v in self.slenderize.items()):
                raise InvalidOptionError("slenderize", self.slenderize, "must map heads and/or ffn to a fraction in "
                                         "(0, 1), e.g. {'heads': 0.5, 'ffn': 0.5} (width only: exits need every "
                                         "block and read the hidden size)")
        if self.slenderize_importance not in SLENDER_IMPORTANCES:
            raise InvalidOptionError("slenderize_importance", self.slenderize_importance,
                                     f"choose one of {', '.join(SLENDER_IMPORTANCES)}")
        if self.slender_shapes is not None and not (isinstance(self.slender_shapes, dict) and all(
                isinstance(v, (list, tuple)) and len(v) == 2 for v in self.slender_shapes.values())):
            raise InvalidOptionError("slender_shapes", "...", "is filled in by slenderize() (path -> [out, in]); "
                                     "remove it from adapter_config.json only together with the weights")
        if self.task_type is not None and str(self.task_type) != "SEQ_CLS":
            raise InvalidOptionError("task_type", self.task_type, "multi-exit models classify sequences: use "
                                     "SEQ_CLS")
        if self.modules_to_save is not None and (not isinstance(self.modules_to_save, (list, tuple)) or not all(
                isinstance(n, str) and n for n in self.modules_to_save)):
            raise InvalidOptionError("modules_to_save", self.modules_to_save, "must be a list of module names")
        if self.target_modules != DUMMY_TARGET_MODULES:
            raise InvalidOptionError("target_modules", self.target_modules, "is not used by multi-exit models: exits "
                                     "are added after blocks instead of adapting layers; leave it out")
