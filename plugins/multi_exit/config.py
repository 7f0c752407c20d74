"""Configuration of multi-exit models: where the exits sit, how they train, and when an example leaves."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

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

#: the exit fields, with their defaults: a MultiExitConfig's, and what a saved multi-exit model's config.json holds
EXIT_FIELDS: dict[str, Any] = {"exit_layers": None, "exit_head": "pooled", "exit_pooling": "mean",
                               "exit_policy": "entropy", "exit_threshold": None, "exit_loss_weights": "linear"}


def _choice(name: str, value: object, allowed: tuple[str, ...] | dict, extra: str = "") -> None:
    if not isinstance(value, str) or value not in allowed:
        raise InvalidOptionError(name, value, f"choose one of {', '.join(allowed)}{extra}")


def check_exit_fields(settings: Mapping[str, Any] | object, num_blocks: int | None = None) -> dict[str, Any]:
    """The exit fields (:data:`EXIT_FIELDS`) of ``settings`` (a mapping, a :class:`MultiExitConfig` or a saved
    multi-exit model's transformers config), checked and normalised: ``exit_layers`` sorted, the threshold a
    float; a missing field takes its default. With ``num_blocks`` (the model's depth), ``exit_layers`` must name
    existing blocks and a list of ``exit_loss_weights`` must give one weight per exit.

    Raises:
        InvalidOptionError: naming the first bad field, its value and what it allows.
    """
    def get(name: str) -> Any:
        if isinstance(settings, Mapping):
            return settings.get(name, EXIT_FIELDS[name])
        return getattr(settings, name, EXIT_FIELDS[name])

    values = {name: get(name) for name in EXIT_FIELDS}
    layers = values["exit_layers"]
    if layers is not None:
        if not isinstance(layers, (list, tuple)) or not layers or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
            raise InvalidOptionError("exit_layers", layers, "must be a non-empty list of block indices "
                                     "(integers >= 0), or None for every block")
        if len(set(layers)) != len(layers):
            raise InvalidOptionError("exit_layers", layers, "names a block twice")
        values["exit_layers"] = layers = sorted(layers)
    _choice("exit_head", values["exit_head"], EXIT_HEADS)
    _choice("exit_pooling", values["exit_pooling"], EXIT_POOLINGS)
    weights = values["exit_loss_weights"]
    if isinstance(weights, str):
        _choice("exit_loss_weights", weights, LOSS_WEIGHTINGS, " or give one number per exit")
    elif not isinstance(weights, (list, tuple)) or not weights or not all(
            is_number(w) and math.isfinite(w) and w > 0 for w in weights):
        raise InvalidOptionError("exit_loss_weights", weights, "must be linear, equal, or a list of positive "
                                 "numbers (one per exit)")
    _choice("exit_policy", values["exit_policy"], POLICIES)
    if values["exit_threshold"] is not None:
        values["exit_threshold"] = check_threshold(values["exit_policy"], values["exit_threshold"])
    if num_blocks is not None:
        check_exits_fit(layers, weights, num_blocks)
    return values


def check_exits_fit(exit_layers: list[int] | None, loss_weights: str | list[float], num_blocks: int) -> None:
    """Refuse exit layers beyond a model of ``num_blocks`` blocks, or a weight list that does not give one weight
    per exit."""
    wrong = [layer for layer in exit_layers or [] if layer >= num_blocks]
    if wrong:
        raise InvalidOptionError("exit_layers", exit_layers, f"names block {wrong[0]}, but the model has "
                                 f"{num_blocks} blocks (0..{num_blocks - 1})")
    exits = len([b for b in (range(num_blocks) if exit_layers is None else exit_layers) if b != num_blocks - 1]) + 1
    if not isinstance(loss_weights, str) and len(loss_weights) != exits:
        raise InvalidOptionError("exit_loss_weights", loss_weights, f"needs one weight per exit: {exits} (the "
                                 "exit_layers before the last block, plus the model's own head)")


def validate_exit_config(config, source: str | None = None) -> None:
    """Check the exit fields of a saved multi-exit model's transformers config (``MultiExitClassifierConfig``)
    against the allowed values and the model's depth (``num_hidden_layers``, the backbone's), without building the
    model. Loading such a config (``AutoConfig.from_pretrained``, the Auto model classes, ``pipeline``) runs it;
    ``source`` (e.g. the folder's ``config.json``) opens the message.

    Raises:
        InvalidOptionError: naming ``source``, the field, its value and what it allows.
    """
    depth = getattr(config, "num_hidden_layers", None)
    try:
        check_exit_fields(config, depth if isinstance(depth, int) and depth > 0 else None)
    except InvalidOptionError as exc:
        exc.args = (f"{source or 'multi-exit model config'}: {exc.args[0]}",)
        raise


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
        for name, value in check_exit_fields(self).items():
            setattr(self, name, value)
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
        if self.slenderize is not None:
            if not isinstance(self.slenderize, dict) or not self.slenderize or not all(
                    k in SLENDER_STRUCTURES and is_number(v) and 0 < v < 1 for k, v in self.slenderize.items()):
                raise InvalidOptionError("slenderize", self.slenderize, "must map heads and/or ffn to a fraction in "
                                         "(0, 1), e.g. {'heads': 0.5, 'ffn': 0.5} (width only: exits need every "
                                         "block and read the hidden size)")
        _choice("slenderize_importance", self.slenderize_importance, SLENDER_IMPORTANCES)
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
