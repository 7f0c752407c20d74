"""Configuration of Ladder Side-Tuning: the side network's size, its ladders and gates, and how it is
initialised from the frozen backbone."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from peft.config import PeftConfig
from peft.utils.constants import DUMMY_TARGET_MODULES

from compress.pruning.spec import InvalidOptionError, is_number, positive_int
from compress.registry import PeftMethodType

LADDER_SIDE = PeftMethodType("LADDER_SIDE")

SIDE_INITS = ("pruned", "random")
#: importances that score the backbone for the pruned initialisation (fisher needs calibration data)
SIDE_IMPORTANCES = ("fisher", "magnitude")
#: task types the side network serves
TASK_TYPES = ("SEQ_CLS", "CAUSAL_LM", "SEQ_2_SEQ_LM", "TOKEN_CLS", "FEATURE_EXTRACTION")
#: what a sequence classifier's head reads: the side network's states pooled per input segment, or its last state
#: in the backbone's place, pooled by the task model as it pools the backbone's
POOLINGS = ("segments", "model")


@dataclass
class LadderSideConfig(PeftConfig):
    """Configuration for :class:`LadderSideModel`: Ladder Side-Tuning (Sung, Cho, Bansal, NeurIPS 2022).

    A small side network of the backbone's own block type, ``1/r`` as wide, reads the frozen backbone's hidden
    states through ladders (learned down-projections) and makes the prediction; no gradient flows through the
    backbone, so its activations are not kept for backward. Side block ``j`` takes
    ``g_j * down_j(h_i) + (1 - g_j) * s_{j-1}``, where ``h_i`` is the output of backbone block ``i`` (the
    ``j``-th entry of ``side_layers``), ``s_{j-1}`` the previous side block's output (for the first block: the
    ladder from the backbone's embedding output) and ``g_j = sigmoid(alpha_j / gate_temperature)``. The last side
    state is projected up to the backbone's width and replaces the backbone's final hidden state before the task
    head (the backbone's own LM head for ``CAUSAL_LM``, frozen; a new head for classification).

    Args:
        r: reduction factor: the side network's hidden size, FFN width and number of attention heads are the
            backbone's divided by ``r`` (at least one head, one per kv group with grouped-query attention when
            ``r`` exceeds the group). ``r`` must divide the hidden size.
        side_layers: indices of the backbone blocks whose outputs feed ladders; the side network has one block
            per entry, initialised from that backbone block. Fewer entries drop side layers (the paper's layer
            dropping). Default: every block.
        gate_temperature: ``T`` in ``sigmoid(alpha / T)``; a small ``T`` lets the gates move quickly.
        gate_init: initial ``alpha`` of every gate (``0`` mixes ladder and side state half and half).
        side_init: ``pruned`` copies the backbone's blocks structurally pruned to ``1/r`` width by
            :func:`compress.prune_model` (the paper's initialisation; the ladders start as the selection of the
            kept hidden channels and the up-projection as its transpose); ``random`` initialises the side network
            and ladders randomly.
        importance: how the pruned initialisation chooses what to keep: ``fisher`` (squared gradients of the task
            loss with respect to structure gates, on calibration data: pass it to
            :func:`~compress.plugins.ladder_side.apply_ladder_side` or ``model.base_model.init_side(data)``; until
            then the side network is initialised by ``magnitude``) or ``magnitude`` (no data).
        add_backbone_output: add the up-projected side state to the backbone's own final hidden state instead of
            replacing it; the up-projection then starts at zero, so training starts from the frozen backbone's
            predictions and the side network learns a correction. Off by default (the paper's design).
        pooling: what an encoder's sequence classifier (``SEQ_CLS`` on BERT/RoBERTa) reads. ``segments``: the side
            network's last states mean-pooled over each input segment (``u`` over the first, ``v`` over the second,
            told apart by ``token_type_ids``, or for RoBERTa, which has none, by the first separator token; a
            single sentence is one segment and ``v`` is zero), combined as ``[u, v, |u - v|, u * v]``
            (Sentence-BERT's pair features) and projected by a trained layer to the backbone's width, in place of
            the pooled first token (BERT's ``pooler_output``, RoBERTa's first token); through a frozen pooler on
            the first token, a side network a few dozen channels wide learns sentence pairs more slowly.
            ``model``: the task model pools the side network's last state as it pools the
            backbone's (BERT: its frozen pooler on the first token). Default: ``segments`` for an encoder's
            ``SEQ_CLS``, ``model`` otherwise (the only choice there); an adapter saved without this field loads
            with ``model``, as it was trained.
        side_config: the side network's transformers config, filled in when it is built and saved with the
            adapter so that ``PeftModel.from_pretrained`` rebuilds the same shapes. Do not set by hand.
    """

    r: int = field(default=8, metadata={"help": "Reduction factor: side width = backbone width / r."})
    side_layers: list[int] | None = field(
        default=None, metadata={"help": "Backbone blocks that feed ladders, one side block each (default: all)."})
    gate_temperature: float = field(default=0.1, metadata={"help": "T in gate = sigmoid(alpha / T)."})
    gate_init: float = field(default=0.0, metadata={"help": "Initial alpha of every gate."})
    side_init: str = field(default="pruned", metadata={"help": "pruned (from the backbone) or random."})
    importance: str = field(default="fisher", metadata={"help": "Pruned initialisation: fisher or magnitude."})
    add_backbone_output: bool = field(
        default=False, metadata={"help": "Add the side output to the backbone's final state (zero-init up)."})
    pooling: str | None = field(
        default=None, metadata={"help": "What an encoder's sequence classifier reads: segments (the side states pooled "
                                        "per input segment) or model (the task model's own pooling); default: "
                                        "segments for SEQ_CLS on BERT/RoBERTa, model otherwise."})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained and saved in full, e.g. the classifier."})
    side_config: dict[str, Any] | None = field(
        default=None, metadata={"help": "Filled when the side network is built; do not set by hand."})
    target_modules: str | None = field(
        default=DUMMY_TARGET_MODULES, metadata={"help": "Not used: the side network replaces no backbone module."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = LADDER_SIDE
        positive_int("r", self.r)
        if self.side_layers is not None:
            layers = self.side_layers
            if not isinstance(layers, (list, tuple)) or not layers or not all(
                    isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers):
                raise InvalidOptionError("side_layers", layers, "must be a non-empty list of backbone block indices "
                                         "(integers >= 0), or None for every block")
            if len(set(layers)) != len(layers):
                raise InvalidOptionError("side_layers", layers, "names a block twice")
            self.side_layers = sorted(layers)
        for name in ("gate_temperature", "gate_init"):
            value = getattr(self, name)
            if not (is_number(value) and math.isfinite(value)):
                raise InvalidOptionError(name, value, "must be a finite number")
        if self.gate_temperature <= 0:
            raise InvalidOptionError("gate_temperature", self.gate_temperature, "must be > 0")
        if not isinstance(self.add_backbone_output, bool):
            raise InvalidOptionError("add_backbone_output", self.add_backbone_output, "must be True or False")
        if self.side_init not in SIDE_INITS:
            raise InvalidOptionError("side_init", self.side_init, f"choose one of {', '.join(SIDE_INITS)}")
        if self.importance not in SIDE_IMPORTANCES:
            raise InvalidOptionError("importance", self.importance, f"choose one of {', '.join(SIDE_IMPORTANCES)}")
        if self.pooling is not None and self.pooling not in POOLINGS:
            raise InvalidOptionError("pooling", self.pooling, f"choose one of {', '.join(POOLINGS)}")
        if self.pooling is None and self.side_config is not None:
            # saved before `pooling` existed: its classifier was trained on the task model's own pooling
            self.pooling = "model"
        if self.task_type is not None and str(self.task_type) not in TASK_TYPES:
            raise InvalidOptionError("task_type", self.task_type, f"Ladder Side-Tuning serves {', '.join(TASK_TYPES)}")
        if self.modules_to_save is not None and (not isinstance(self.modules_to_save, (list, tuple)) or not all(
                isinstance(n, str) and n for n in self.modules_to_save)):
            raise InvalidOptionError("modules_to_save", self.modules_to_save, "must be a list of module names")
        if self.side_config is not None and not (isinstance(self.side_config, dict)
                                                 and isinstance(self.side_config.get("model_type"), str)):
            raise InvalidOptionError("side_config", "...", "is filled in by the method (a transformers config as a "
                                     "dict with its model_type); remove it from adapter_config.json to rebuild")
        if self.target_modules != DUMMY_TARGET_MODULES:
            raise InvalidOptionError("target_modules", self.target_modules, "is not used by Ladder Side-Tuning: the "
                                     "side network adds modules beside the backbone instead of adapting its layers; "
                                     "leave it out")
