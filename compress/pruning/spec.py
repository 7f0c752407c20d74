"""What to prune and how, in one validated object shared by the engine, the PEFT configs and the CLI.

The same names are used everywhere: ``sparsity`` (the fraction of a structure removed, per structure),
``param_sparsity`` (the fraction of the model's parameters removed, the structures' shares chosen by the engine),
``mode``, ``importance``, ``normalize``, ``max_keep``, ``min_keep``, ``round_to``, ``compensate_bias``,
``reconstruct``, ``damping``; the command line spells them ``--sparsity``, ``--param-sparsity``, ``--mode``,
``--min-keep``, ...
Invalid values raise :class:`InvalidOptionError`, which names the option, so each caller can print it in its
own spelling.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

# InvalidOptionError lives in compress.errors (importance raises it too); `from compress.pruning.spec import
# InvalidOptionError` keeps working
from compress.errors import InvalidOptionError

#: prunable structures: FFN neurons, query heads (an equal number per kv group), whole kv heads, whole layers,
#: and hidden channels (the residual stream every block reads and writes)
STRUCTURES = ("ffn", "heads", "kv_heads", "layers", "hidden")
#: how reports, model cards and the command line name each structure's widths
STRUCTURE_LABELS = {"ffn": "FFN width per layer", "heads": "attention heads per layer",
                    "kv_heads": "kv heads per layer", "layers": "layers per stack", "hidden": "hidden size"}
#: ``uniform``: every layer keeps the same width (plain transformers configs); ``global``: ranked across layers
MODES = ("uniform", "global")
#: per-layer scaling of scores before ranking them across layers (``global`` mode); ``standardize`` subtracts
#: each layer's mean and divides by its standard deviation (FLAP's adaptive structure)
NORMALIZATIONS = ("none", "mean", "l2", "standardize")
#: how the kept weights are set: ``none`` keeps them as they are; ``least_squares`` prunes block by block on the
#: calibration stream of the already pruned blocks and refits each output projection's kept columns
RECONSTRUCTIONS = ("none", "least_squares")
#: the structures whose removal least-squares reconstruction compensates (input channels of an output projection)
RECONSTRUCTED_STRUCTURES = ("ffn", "heads", "kv_heads")
#: the default ridge of least-squares reconstruction, relative to the mean variance of the kept channels
DEFAULT_DAMPING = 0.01
#: the structures ``param_sparsity`` can take parameters from (ranked against each other by what each removal frees)
BUDGETED_STRUCTURES = ("ffn", "heads", "kv_heads")


def is_number(value: Any) -> bool:
    """An int or float, not a bool (``True`` is an int to Python, never a sparsity or a weight here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(name: str, value: Any) -> int:
    """``value`` if it is an int >= 1 (not a bool), else :class:`InvalidOptionError` naming option ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidOptionError(name, value, "must be a positive integer")
    return value


def _fraction(value: Any, allow_zero: bool = False, key: str | None = None) -> float:
    interval = "[0, 1)" if allow_zero else "(0, 1)"
    if not is_number(value) or not math.isfinite(value) or not ((0.0 <= value) if allow_zero else (0.0 < value)) \
            or value >= 1.0:
        raise InvalidOptionError("sparsity", value, f"a sparsity is the fraction removed: a number in {interval}",
                                 key=key)
    return float(value)


def structure_names(structures: Iterable[str] | str | None) -> list[str] | None:
    """``"ffn"`` or ``"ffn,heads"`` or ``("ffn", "heads")`` -> a list of names (a string is not read letter
    by letter)."""
    if structures is None:
        return None
    if isinstance(structures, str):
        names = [s.strip() for s in structures.split(",")]
    elif isinstance(structures, Iterable):
        names = list(structures)
    else:
        raise InvalidOptionError("structures", structures, "give structure names: 'ffn', 'ffn,heads' or a list")
    for name in names:
        if not isinstance(name, str) or name not in STRUCTURES:
            raise InvalidOptionError("structures", structures, f"unknown structure {name!r}; choose from "
                                     f"{', '.join(STRUCTURES)}")
    if len(set(names)) != len(names):
        raise InvalidOptionError("structures", structures, "names a structure twice")
    return names


def sparsity_by_structure(sparsity: float | Mapping[str, float], structures: Iterable[str] | str | None = None,
                          allow_zero: bool = False) -> dict[str, float]:
    """``0.5`` with ``structures=("ffn", "heads")`` -> ``{"ffn": 0.5, "heads": 0.5}``; a mapping is checked
    against ``structures`` when both are given. Without ``structures`` a single number applies to ``ffn``.
    With ``allow_zero``, zero entries are accepted and dropped."""
    names = structure_names(structures)
    if isinstance(sparsity, Mapping):
        by_structure = {}
        for name, value in sparsity.items():
            if name not in STRUCTURES:
                raise InvalidOptionError("sparsity", dict(sparsity), f"unknown structure {name!r}; choose from "
                                         f"{', '.join(STRUCTURES)}")
            by_structure[str(name)] = _fraction(value, allow_zero, key=name)
        if names is not None and set(names) != set(by_structure):
            raise InvalidOptionError("structures", structures, f"disagrees with the structures in sparsity "
                                     f"({', '.join(by_structure)}): give one of them, or make them agree")
    else:
        value = _fraction(sparsity, allow_zero)
        by_structure = {name: value for name in (names if names is not None else ["ffn"])}
    by_structure = {name: value for name, value in by_structure.items() if value > 0.0}
    if not by_structure:
        raise InvalidOptionError("sparsity", sparsity, f"nothing to prune: give a sparsity above 0 for at least "
                                 f"one of {', '.join(STRUCTURES)}")
    if "heads" in by_structure and "kv_heads" in by_structure:
        raise InvalidOptionError("sparsity", dict(by_structure), "prune either 'heads' (query heads per kv group) "
                                 "or 'kv_heads' (whole kv heads with their query heads), not both")
    return by_structure


def parse_sparsity(text: str) -> float | dict[str, float]:
    """Command-line form: ``"0.5"`` or ``"ffn=0.5,heads=0.25"`` (each structure once)."""
    text = text.strip()
    if "=" not in text:
        try:
            return float(text)
        except ValueError:
            raise InvalidOptionError("sparsity", text, "must be a number in (0, 1), or per structure, e.g. "
                                     "ffn=0.5,heads=0.25") from None
    parsed: dict[str, float] = {}
    for part in text.split(","):
        key, sep, value = (piece.strip() for piece in part.partition("="))
        if not sep or not key:
            raise InvalidOptionError("sparsity", text, f"cannot parse {part!r}; write 0.5 or ffn=0.5,heads=0.25")
        if key in parsed:
            raise InvalidOptionError("sparsity", text, f"names {key!r} twice; give each structure once")
        try:
            parsed[key] = float(value)
        except ValueError:
            raise InvalidOptionError("sparsity", text, f"the value for {key!r} must be a number in (0, 1), got "
                                     f"{value!r}") from None
    return parsed


@dataclass(frozen=True)
class PruningSpec:
    """What to prune and how; validated on construction (:class:`InvalidOptionError` names the option).

    Args:
        sparsity: fraction removed per structure, e.g. ``{"ffn": 0.5, "heads": 0.25}``. Build from a single
            number and a list of structures with :meth:`from_options`. With ``param_sparsity``, the structures the
            parameters come from, each mapped to ``None`` (the allocation decides its share), e.g.
            ``{"ffn": None, "heads": None}``.
        mode: ``uniform`` (the same width in every layer, so a plain transformers config expresses the result)
            or ``global`` (units ranked across layers; per-layer widths need ``import compress`` to load).
        importance: a criterion name (``taylor``, ``taylor_elementwise``, ``fisher``, ``activation``,
            ``flap``, ``wanda_sp``, ``block_influence``, ``magnitude``/``l2``, ``l1``, ``random`` or one
            registered with :func:`compress.register_importance`) or an :class:`~compress.Importance`. A
            criterion that cannot score a structure (e.g. ``activation`` and ``layers``) is refused here.
        normalize: ``global`` mode: ``"mean"``/``"l2"`` divide each layer's scores by their mean / L2 norm,
            ``"standardize"`` subtracts their mean and divides by their standard deviation, before ranking
            across layers; ``"none"`` ranks raw scores.
        max_keep: ``global`` mode: the largest fraction of its FFN neurons and of its heads one layer keeps (at
            least ``1 - sparsity``); ``None``: no cap.
        min_keep: ``global`` mode: the smallest fraction of its FFN neurons, of its query heads and of its kv
            heads one layer keeps (at most ``1 - sparsity``); ``None``: one neuron, one head per kv group.
        round_to: keep FFN widths and the hidden size a multiple of this.
        compensate_bias: add removed channels' mean contribution, measured on calibration data, to the bias of
            the projection they fed. Families whose output projections have no bias get one where their config
            can say so (Llama: ``mlp_bias`` / ``attention_bias``); where it cannot (Qwen2, T5) it is refused.
        reconstruct: ``"none"`` (default) or ``"least_squares"``: prune block by block, each block's
            statistics taken on the calibration stream of the already pruned blocks, and refit the kept columns
            of each FFN / attention output projection by ridge least squares so that it reproduces its
            unpruned output. The bias is fit too where the projection has one or the family's config can give it
            one (Llama: ``mlp_bias`` / ``attention_bias``, as ``compensate_bias`` sets them); where it cannot
            (Qwen2) the fit is uncentred and the bias stays; the report's notes say which. Needs calibration
            data; applies to ``ffn``, ``heads`` and ``kv_heads``.
        damping: the ridge of ``reconstruct="least_squares"``, relative to the mean variance of the kept input
            channels: larger values keep the weights closer to plain removal (with a bias, FLAP's bias
            compensation in the limit), smaller ones fit the calibration data more closely.
        param_sparsity: the fraction of all the model's parameters to remove (tied tensors counted once, biases
            the pruning adds included), taken from the structures of ``sparsity`` (``ffn``, ``heads``,
            ``kv_heads``). ``global`` mode ranks every candidate removal of every structure and layer in one list
            (an FFN neuron, a row of query heads (one per kv group), a whole kv group with its query heads) by its
            per-layer normalised score (``normalize``, which must not be ``"none"`` with several structures), each
            taking the parameters it frees from the budget, above the ``min_keep`` floors. ``uniform`` mode takes
            one structure and sets its per-layer fraction from the budget. ``None`` (default): ``sparsity`` gives
            the fraction of each structure.
    """

    sparsity: Mapping[str, float | None] = field(default_factory=lambda: {"ffn": 0.5})
    mode: str = "uniform"
    importance: Any = "taylor"
    normalize: str = "none"
    max_keep: float | None = None
    min_keep: float | None = None
    round_to: int = 1
    compensate_bias: bool = False
    reconstruct: str = "none"
    damping: float = DEFAULT_DAMPING
    param_sparsity: float | None = None

    @classmethod
    def from_options(cls, sparsity: float | Mapping[str, float] | None = None,
                     structures: Iterable[str] | str | None = None, **options: Any) -> PruningSpec:
        """A spec from a single sparsity for ``structures`` (default ``ffn``) or a mapping per structure; or, with
        ``param_sparsity``, from the ``structures`` the parameters come from (``sparsity`` then stays ``None``).
        Without either, half of each structure (``sparsity=0.5``)."""
        if options.get("param_sparsity") is not None:
            if sparsity is not None:
                raise InvalidOptionError("param_sparsity", options["param_sparsity"], "replaces sparsity: give the "
                                         "fraction of each structure (sparsity) or of the model's parameters "
                                         "(param_sparsity, with structures), not both")
            names = structure_names(structures) or ["ffn"]
            return cls(sparsity=dict.fromkeys(names), **options)
        return cls(sparsity=sparsity_by_structure(0.5 if sparsity is None else sparsity, structures), **options)

    def __post_init__(self) -> None:
        from compress.pruning.importance import Importance, available_importances, check_scorable, importance_entry

        if not isinstance(self.sparsity, Mapping):
            raise InvalidOptionError("sparsity", self.sparsity, "must map structures to fractions, e.g. "
                                     "{'ffn': 0.5}; use PruningSpec.from_options for one number")
        if self.param_sparsity is None:
            object.__setattr__(self, "sparsity", sparsity_by_structure(self.sparsity))
        else:
            self._check_param_sparsity()
        if self.mode not in MODES:
            raise InvalidOptionError("mode", self.mode, f"choose one of {', '.join(MODES)}")
        if self.normalize not in NORMALIZATIONS:
            raise InvalidOptionError("normalize", self.normalize, f"choose one of {', '.join(NORMALIZATIONS)}")
        if not isinstance(self.importance, Importance):
            if not isinstance(self.importance, str) or self.importance.lower() not in available_importances():
                raise InvalidOptionError("importance", self.importance, f"choose one of "
                                         f"{', '.join(available_importances())}, or pass an Importance instance")
            object.__setattr__(self, "importance", self.importance.lower())
        check_scorable(self.importance, self.sparsity)  # here, not after a calibration pass that cannot score them
        positive_int("round_to", self.round_to)
        if not isinstance(self.compensate_bias, bool):
            raise InvalidOptionError("compensate_bias", self.compensate_bias, "must be True or False")
        self._check_max_keep()
        self._check_min_keep()
        self._check_reconstruct()
        if getattr(importance_entry(self.importance), "requires_reconstruction", False) \
                and self.reconstruct != "least_squares":
            raise InvalidOptionError("importance", self.importance_name, "chooses channels by the error of the "
                                     "least-squares refit of the kept ones: set reconstruct='least_squares', or use "
                                     "flap, whose score is the same cost with uncorrelated inputs")

    def _check_param_sparsity(self) -> None:
        value = self.param_sparsity
        if not is_number(value) or not math.isfinite(value) or not 0.0 < value < 1.0:
            raise InvalidOptionError("param_sparsity", value, "the fraction of the model's parameters to remove must "
                                     "be a number in (0, 1)")
        names = list(self.sparsity)
        structure_names(names)  # unknown or repeated names
        if any(v is not None for v in self.sparsity.values()):
            raise InvalidOptionError("sparsity", dict(self.sparsity), "with param_sparsity the allocation decides "
                                     "each structure's share: name the structures only (structures=... or "
                                     "{'ffn': None, 'heads': None})")
        outside = [n for n in names if n not in BUDGETED_STRUCTURES]
        if outside or not names:
            raise InvalidOptionError("param_sparsity", value, f"takes parameters from "
                                     f"{', '.join(BUDGETED_STRUCTURES)}, not {', '.join(outside) or 'nothing'}: "
                                     "prune those in a separate call with sparsity")
        if "heads" in names and "kv_heads" in names:
            # the structures are what the caller named here (sparsity holds no fractions): name them
            raise InvalidOptionError("structures", ",".join(names), "param_sparsity takes parameters from either "
                                     "'heads' (query heads per kv group) or 'kv_heads' (whole kv heads with their "
                                     "query heads), not both: keep one of them")
        object.__setattr__(self, "sparsity", dict.fromkeys(names))
        if self.mode == "uniform" and len(names) > 1:
            raise InvalidOptionError("param_sparsity", value, f"in uniform mode cannot split the parameters between "
                                     f"{' and '.join(names)}: use mode='global' (one ranking across structures and "
                                     "layers), or give each structure's fraction with sparsity")
        if self.mode == "global" and len(names) > 1 and self.normalize == "none":
            raise InvalidOptionError("normalize", self.normalize, f"param_sparsity ranks {' and '.join(names)} in one "
                                     "list, whose raw scores are not comparable: set normalize='standardize' "
                                     "(FLAP's per-layer standardisation) or 'mean' / 'l2'")

    def _check_max_keep(self) -> None:
        if self.max_keep is None:
            return
        if self.param_sparsity is not None:
            raise InvalidOptionError("max_keep", self.max_keep, "is not combined with param_sparsity: leave it out "
                                     "(min_keep sets the floor of every layer)")
        if not is_number(self.max_keep) or not 0.0 < self.max_keep <= 1.0:
            raise InvalidOptionError("max_keep", self.max_keep, "the largest fraction of its channels one layer may "
                                     "keep must be in (0, 1]")
        if self.mode != "global":
            raise InvalidOptionError("max_keep", self.max_keep, "caps per-layer widths in global mode; uniform "
                                     "mode already keeps 1 - sparsity in every layer")
        for name in ("ffn", "heads", "kv_heads"):
            if name in self.sparsity and self.max_keep < 1.0 - self.sparsity[name] - 1e-9:
                raise InvalidOptionError("max_keep", self.max_keep, f"would remove more than the {name} sparsity "
                                         f"{self.sparsity[name]:g}: set it to at least {1 - self.sparsity[name]:.2f}")

    def _check_min_keep(self) -> None:
        if self.min_keep is None:
            return
        if not is_number(self.min_keep) or not 0.0 < self.min_keep <= 1.0:
            raise InvalidOptionError("min_keep", self.min_keep, "the smallest fraction of its channels one layer "
                                     "keeps must be in (0, 1]")
        if self.mode != "global":
            raise InvalidOptionError("min_keep", self.min_keep, "sets a floor on per-layer widths in global mode; "
                                     "uniform mode already keeps 1 - sparsity in every layer")
        for name in ("ffn", "heads", "kv_heads"):
            if self.sparsity.get(name) is not None and self.min_keep > 1.0 - self.sparsity[name] + 1e-9:
                raise InvalidOptionError("min_keep", self.min_keep, f"leaves too little to remove the {name} "
                                         f"sparsity {self.sparsity[name]:g}: set it to at most "
                                         f"{1 - self.sparsity[name]:.2f}")

    def _check_reconstruct(self) -> None:
        if self.reconstruct not in RECONSTRUCTIONS:
            raise InvalidOptionError("reconstruct", self.reconstruct, f"choose one of {', '.join(RECONSTRUCTIONS)}")
        if not is_number(self.damping) or not math.isfinite(self.damping) or self.damping <= 0:
            raise InvalidOptionError("damping", self.damping, "the ridge of least-squares reconstruction must be a "
                                     "positive number (relative to the mean variance of the kept channels)")
        if self.reconstruct == "none":
            if self.damping != DEFAULT_DAMPING:
                raise InvalidOptionError("damping", self.damping, "is the ridge of reconstruct='least_squares'; "
                                         "set reconstruct too, or leave damping out")
            return
        if "hidden" in self.sparsity:
            raise InvalidOptionError("reconstruct", self.reconstruct, "refits the output projections of the FFN "
                                     "and attention blocks, which does not apply to 'hidden': prune the hidden size "
                                     "in a separate call without reconstruct")
        if not set(self.sparsity) & set(RECONSTRUCTED_STRUCTURES):
            raise InvalidOptionError("reconstruct", self.reconstruct, f"has nothing to refit: it applies to "
                                     f"{', '.join(RECONSTRUCTED_STRUCTURES)}, and the sparsity names only "
                                     f"{', '.join(self.sparsity)}")

    @property
    def importance_name(self) -> str:
        """The criterion's name (its class name for an :class:`~compress.Importance` instance)."""
        return self.importance if isinstance(self.importance, str) else type(self.importance).__name__

    def to_dict(self) -> dict[str, Any]:
        """The spec as JSON-able values (an importance instance becomes its class name)."""
        return {**asdict(self), "sparsity": dict(self.sparsity), "importance": self.importance_name}
