"""Configuration of sparse fine-tuning for model soups: which weights are pruned, in what pattern, and what
trains on the kept ones."""

from __future__ import annotations

import math
import re
from dataclasses import InitVar, dataclass, field

from peft.tuners.lora import LoraConfig

from compress.pruning.spec import InvalidOptionError, is_number
from compress.registry import PeftMethodType
from compress.tuner import check_lora_options, take_deprecated_init_weights

SPARSE_SOUP = PeftMethodType("SPARSE_SOUP")

SCOPES = ("layer", "global")
IMPORTANCES = ("magnitude", "wanda")
TRAINED = ("weights", "lora")
_N_M = re.compile(r"(\d+):(\d+)")


def parse_n_m(pattern: str) -> tuple[int, int] | None:
    """``(n, m)`` of an ``"n:m"`` pattern (``n`` weights kept in every group of ``m``), ``None`` for
    ``"unstructured"``."""
    if pattern == "unstructured":
        return None
    match = _N_M.fullmatch(str(pattern))
    if match is None:
        raise InvalidOptionError("pattern", pattern, "choose 'unstructured' or 'n:m' with whole numbers, e.g. "
                                 "'2:4' (keep 2 weights of every 4)")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise InvalidOptionError("pattern", pattern, "needs 0 < n < m: n weights kept of every m (e.g. '2:4')")
    return n, m


@dataclass
class SparseSoupConfig(LoraConfig):
    """Configuration for :class:`SparseSoupModel`: fine-tuning under a fixed sparsity mask, so that several
    fine-tunes from the same sparse start average into a soup with the same mask (Sparse Model Soups, Zimmer,
    Spiegel, Pokutta, ICLR 2024).

    A ``LoraConfig``: with ``train="lora"`` the updates are peft's LoRA layers and take LoRA's options (``r``,
    ``lora_alpha``, ``lora_dropout``, ``use_rslora``, ``init_lora_weights``, ``rank_pattern``, ...), except those
    that change the base weights or the layer's computation (DoRA and the other LoRA variants,
    PiSSA/OLoRA/CorDA/LoftQ/EVA/LoRA-GA initialisations, ``bias``, ``target_parameters``, ...).

    ``get_peft_model`` computes the mask of every target layer and from then on the layer computes with
    ``(W + delta) * mask``: only kept weights change, and a pruned weight stays exactly zero however long the
    training runs (its gradient is zero, so neither the update nor weight decay can revive it). The base
    weights are never modified; ``merge_and_unload()`` writes the masked weights into them.

    Args:
        target_modules: the linear layers to sparsify (names or a regex, as in peft); default every linear layer
            inside the transformer blocks (attention and FFN projections; embeddings and the task head stay
            dense).
        sparsity: the fraction of each target layer's weights set to zero (``unstructured``), in ``[0, 1)``.
            With an ``n:m`` pattern it is ``1 - n/m`` and may be left out.
        pattern: ``unstructured``, or ``n:m``: in every group of ``m`` consecutive weights along a row (input
            dimension), ``n`` are kept (``2:4`` is the pattern sparse tensor cores accelerate).
        scope: ``layer`` (every target layer loses ``sparsity`` of its weights) or ``global`` (one magnitude
            threshold over all target layers, so layers lose different fractions); ``n:m`` is per group, so it
            ignores ``scope``.
        importance: ``magnitude`` (``|W|``) or ``wanda`` (``|W| * ||x||``: the weight times the L2 norm of its
            input feature over calibration tokens, Sun et al. 2023). ``wanda`` needs calibration data:
            :func:`~compress.plugins.sparse_soup.apply_sparse_soup` or ``model.base_model.prune(data)`` before
            the first forward.
        train: what learns on the kept weights: ``weights`` (a dense update ``delta`` of every target layer:
            the kept weights fine-tune in full, as SMS retrains) or ``lora`` (a low-rank update ``B @ A`` of rank
            ``r``, masked like the weights, so that merging keeps the mask exactly).
        r: LoRA rank (``train="lora"``).
        lora_alpha: LoRA scaling numerator (``train="lora"``); default 16.
        lora_dropout: dropout on the LoRA input (``train="lora"``).
        init_lora_weights: ``True`` (default) starts the update at zero (the model computes as the masked base
            model); ``False`` starts it random (for tests); ``train="lora"`` also takes ``"gaussian"`` and
            ``"orthogonal"`` (LoRA's).
        init_weights: deprecated name of ``init_lora_weights`` (True or False), read for one more release.
        modules_to_save: modules trained and saved in full, e.g. the classifier (peft adds it for ``SEQ_CLS``).
    """

    sparsity: float | None = field(default=None, metadata={"help": "Fraction of weights set to zero, in [0, 1)."})
    pattern: str = field(default="unstructured", metadata={"help": "unstructured, or n:m such as 2:4."})
    scope: str = field(default="layer", metadata={"help": "layer or global threshold (unstructured)."})
    importance: str = field(default="magnitude", metadata={"help": "magnitude or wanda (needs calibration data)."})
    train: str = field(default="weights", metadata={"help": "What trains on the kept weights: weights or lora."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA alpha (train='lora')."})
    init_weights: InitVar[bool | None] = None  # deprecated: init_lora_weights

    def __post_init__(self, init_weights: bool | None = None) -> None:
        take_deprecated_init_weights(self, init_weights)
        check_lora_options(self, "sparse soups")  # before LoraConfig's own checks, which assume the types
        super().__post_init__()
        self.peft_type = SPARSE_SOUP
        n_m = parse_n_m(self.pattern)
        if n_m is None:
            if self.sparsity is None:
                raise InvalidOptionError("sparsity", None, "is needed for an unstructured pattern: a fraction in "
                                         "[0, 1), e.g. 0.5")
        elif self.sparsity is None:
            self.sparsity = 1 - n_m[0] / n_m[1]
        elif not (is_number(self.sparsity) and math.isclose(self.sparsity, 1 - n_m[0] / n_m[1])):
            raise InvalidOptionError("sparsity", self.sparsity, f"contradicts pattern {self.pattern!r}, which "
                                     f"removes {1 - n_m[0] / n_m[1]:g}; leave sparsity out")
        if not (is_number(self.sparsity) and 0 <= self.sparsity < 1):
            raise InvalidOptionError("sparsity", self.sparsity, "must be a fraction in [0, 1)")
        self.sparsity = float(self.sparsity)
        if self.scope not in SCOPES:
            raise InvalidOptionError("scope", self.scope, f"choose one of {', '.join(SCOPES)}")
        if self.importance not in IMPORTANCES:
            raise InvalidOptionError("importance", self.importance, f"choose one of {', '.join(IMPORTANCES)}")
        if self.scope == "global" and self.importance == "wanda":
            raise InvalidOptionError("scope", self.scope, "does not combine with importance='wanda': its scores "
                                     "carry each layer's input scale, so one threshold would empty whole layers; use "
                                     "scope='layer' (or magnitude)")
        if self.train not in TRAINED:
            raise InvalidOptionError("train", self.train, f"choose one of {', '.join(TRAINED)}")
        if self.train == "weights" and not isinstance(self.init_lora_weights, bool):
            raise InvalidOptionError("init_lora_weights", self.init_lora_weights, "train='weights' starts the dense "
                                     "update at zero (True) or random (False)")
        if self.task_type is not None and str(self.task_type) not in ("SEQ_CLS", "CAUSAL_LM", "SEQ_2_SEQ_LM",
                                                                        "TOKEN_CLS", "FEATURE_EXTRACTION"):
            raise InvalidOptionError("task_type", self.task_type, "choose a peft task type (SEQ_CLS, CAUSAL_LM, "
                                     "SEQ_2_SEQ_LM, TOKEN_CLS, FEATURE_EXTRACTION)")

    @property
    def n_m(self) -> tuple[int, int] | None:
        """``(n, m)`` of an ``n:m`` pattern, else ``None``."""
        return parse_n_m(self.pattern)
