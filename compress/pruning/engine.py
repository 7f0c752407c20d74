"""Structured pruning of Hugging Face models: score, choose, remove, rewrite the config.

:func:`prune_model` is the entry point. Scoring lives in :mod:`compress.pruning.importance`, choosing in
:mod:`compress.pruning.plan`, removal in :mod:`compress.pruning.surgery`, and the options in
:class:`compress.pruning.spec.PruningSpec`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from compress.distributed import check_same_on_ranks, check_unsharded, mark_mean_loss
from compress.errors import (
    CalibrationError,
    CompressError,
    InvalidOptionError,
    NothingToPruneError,
    UnsupportedStructureError,
)
from compress.pruning.arch import ArchSpec, arch_spec
from compress.pruning.compensate import add_to_bias, bias_shifts, record_input_means
from compress.pruning.importance import (
    GateStats,
    Importance,
    InputStatisticsImportance,
    MagnitudeImportance,
    Unit,
    check_scorable,
    collect_gate_stats,
    get_importance,
    is_causal_lm,
    units_for,
)
from compress.pruning.plan import (
    achieved_sparsity,
    channel_parameters,
    normalize_scores,
    nothing_removed_error,
    plan_parameter_budget,
    plan_removals,
)
from compress.pruning.reconstruct import bias_fit_structures, check_reconstructable, prune_sequentially
from compress.pruning.spec import RECONSTRUCTED_STRUCTURES, STRUCTURE_LABELS, PruningSpec, positive_int
from compress.pruning.surgery import apply_checked, check_removals, preserve_training_modes, widths_after

logger = logging.getLogger(__name__)


@dataclass
class PruneReport:
    """What :func:`prune_model` did: the sparsity asked for and achieved, widths and parameters before and after."""

    model_type: str
    mode: str
    importance: str
    #: fraction of each structure the caller asked to remove
    sparsity: dict[str, float]
    params_before: int
    params_after: int
    widths_before: dict[str, list[int]]
    widths_after: dict[str, list[int]]
    removed: dict[str, list[int]] = field(default_factory=dict)
    #: fraction of each structure actually removed: whole channels, heads and blocks make it differ from
    #: ``sparsity`` by rounding, or more when ``round_to`` or a minimum width limits it
    achieved_sparsity: dict[str, float] = field(default_factory=dict)
    #: sentences for the model card: what else changed (biases the config now enables, refit weights)
    notes: list[str] = field(default_factory=list)
    #: the fraction of all parameters the caller asked to remove (``param_sparsity``), or ``None``
    param_sparsity: float | None = None
    #: the fraction of all parameters removed: 1 - params_after / params_before
    achieved_param_sparsity: float = 0.0

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before

    def to_dict(self) -> dict:
        return asdict(self)


def check_support(arch: ArchSpec | type[ArchSpec], sparsity: Iterable[str], mode: str) -> None:
    """Raise a clear error for a structure the architecture cannot prune, or cannot express in ``mode``; given a
    model's :class:`ArchSpec` (not only its family's class), also uniform mode on a model whose layers already
    differ in width."""
    allowed = arch.uniform_structures if mode == "uniform" else arch.supported_structures
    for name in sparsity:
        if name in allowed:
            continue
        if name in arch.supported_structures:
            reason = arch.uniform_reasons.get(name, "the config holds a single width for every layer")
            raise UnsupportedStructureError(
                f"{arch.family}: pruning {name!r} in uniform mode cannot be expressed by the standard config "
                f"({reason}); use global mode, whose artifacts load with `import compress`. Uniform mode "
                f"supports: {', '.join(arch.uniform_structures)}")
        raise UnsupportedStructureError(f"{arch.family}: pruning {name!r} is not supported; supported structures: "
                                        f"{', '.join(arch.supported_structures)}")
    if mode == "uniform" and isinstance(arch, ArchSpec) and not arch.fits_standard_config():
        unequal = [f"{STRUCTURE_LABELS[name]} {widths}" for name, widths in arch.widths().items()
                   if len(set(widths)) > 1]
        raise UnsupportedStructureError(
            f"{arch.family}: uniform mode keeps one width in every layer so that the standard config expresses the "
            f"result, and this model's layers already differ "
            f"({'; '.join(unequal) or 'widths its standard config cannot express: a compact model'}): prune it "
            "with mode='global' (the result loads with `import compress`)")


def check_uniform_result(arch: ArchSpec, spec: PruningSpec) -> None:
    """In uniform mode with a ``sparsity`` per structure, the widths follow from the options alone: refuse, before
    any calibration, a result the family's config cannot express (a model on the meta device will do). Other
    prunes are checked once planned, before anything changes.

    Raises:
        UnsupportedStructureError: from :meth:`~compress.pruning.arch.ArchSpec.check_config_expresses`.
    """
    if spec.mode != "uniform" or spec.param_sparsity is not None:
        return
    units = units_for(arch, spec.sparsity)
    unscored = {u.key: torch.zeros(u.size) for u in units}  # uniform counts do not depend on the scores
    planned = plan_removals(arch, units, unscored, spec.sparsity, "uniform", round_to=spec.round_to)
    arch.check_config_expresses(widths_after(arch, units, planned))


def forward_passes(model: nn.Module, batches: list[dict]) -> None:
    """Inference over ``batches`` (labels dropped, dropout off), e.g. to measure activations."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                model(**{k: v.to(device) for k, v in batch.items() if k != "labels"})
    finally:
        model.train(was_training)


def score_units(model: nn.Module, units: list[Unit], importance: Importance,
                batches: list[dict] | None, progress: bool = False) -> dict[str, torch.Tensor]:
    """Scores for every unit; runs calibration once when the criterion needs it."""
    return _score_units(model, units, importance, batches, progress)[0]


def _score_units(model: nn.Module, units: list[Unit], importance: Importance, batches: list[dict] | None,
                 progress: bool) -> tuple[dict[str, torch.Tensor], GateStats | None]:
    """:func:`score_units`, and the calibration statistics (``None`` when the criterion needs none)."""
    check_scorable(importance, [u.structure for u in units])
    stats: GateStats | None = None
    if importance.needs_calibration:
        if not batches:
            raise CalibrationError(
                f"importance {type(importance).__name__} needs calibration data: pass `data=` (a "
                "datasets.Dataset with input_ids/labels, or an iterable of model-input dicts), or use "
                "importance='magnitude' or 'random'")
        stats = collect_gate_stats(model, units, batches, progress=progress,
                                   gradients=getattr(importance, "needs_gradients", True),
                                   weight_gradients=getattr(importance, "needs_weight_gradients", False))
    return {u.key: importance(u, stats).detach().float().cpu() for u in units}, stats


def _head_spreads(units: list[Unit], criterion: Importance, stats: GateStats | None) -> dict[str, float]:
    """The channel-level spread of each heads unit's scores, for criteria that score channels (see
    :meth:`~compress.pruning.importance.InputStatisticsImportance.channel_spread`)."""
    if not isinstance(criterion, InputStatisticsImportance) or stats is None:
        return {}
    return {u.key: criterion.channel_spread(u, stats.inputs[u.key]) for u in units
            if u.structure == "heads" and u.key in stats.inputs}


def _added_bias_parameters(arch: ArchSpec, structures: Iterable[str]) -> int:
    """How many parameters :meth:`~compress.pruning.arch.ArchSpec.add_output_biases` adds for ``structures``."""
    flags = arch.bias_flags()
    total = 0
    for kind in arch._bias_kinds(structures):
        for stack in arch.stacks():
            for block in stack.blocks:
                for layer in flags[kind].layers(block):
                    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
                    total += base.out_features if base.bias is None else 0
    return total


def _plan_budget(arch: ArchSpec, units: list[Unit], scores: dict[str, torch.Tensor], spec: PruningSpec,
                 params_before: int, biased: Iterable[str], spreads: Mapping[str, float]) -> dict[str, list[int]]:
    """The removals of ``spec.param_sparsity``: ``params_before`` times it, plus the biases the pruning adds, taken
    by one ranking across structures and layers (``global``), or by one per-layer fraction of the single structure
    (``uniform``).

    Raises:
        InvalidOptionError: the structures cannot free that many parameters (above the ``min_keep`` floors).
        NothingToPruneError: the budget is smaller than any single removal.
    """
    bias_kinds = {"ffn" if s == "ffn" else "heads" for s in biased}
    whole_kv = "kv_heads" in spec.sparsity
    costs = {u.key: channel_parameters(u, u.structure in bias_kinds) for u in units}
    added = _added_bias_parameters(arch, biased)
    budget = int(round(spec.param_sparsity * params_before)) + added
    names = ", ".join(spec.sparsity)
    if spec.mode == "uniform":  # one structure (checked by the spec): the fraction of it the budget comes to
        (structure,) = spec.sparsity
        per_unit = [u.size * costs[u.key][0] if structure == "ffn" or (u.site.is_gqa and not whole_kv)
                    else u.site.num_kv_heads * (u.size // u.site.num_kv_heads * costs[u.key][0] + costs[u.key][1])
                    for u in units]
        fraction = budget / sum(per_unit)
        if not fraction < 1.0:
            raise InvalidOptionError("param_sparsity", spec.param_sparsity, f"asks for {budget:,} parameters, and "
                                     f"all of {names} holds {sum(per_unit):,}: lower it")
        removals = plan_removals(arch, units, scores, {structure: fraction}, "uniform", round_to=spec.round_to)
        if not any(removals.values()):
            raise NothingToPruneError(f"param_sparsity {spec.param_sparsity:g} comes to {fraction:.2%} of {names} "
                                      "per layer, which removes nothing: raise it")
        return removals
    shared = sorted({u.site.shared_heads_key for u in units if u.structure == "heads" and u.site.shared_heads_key})
    if shared:
        raise UnsupportedStructureError(f"{arch.family}: heads go with the same indices in every layer of a stack "
                                        f"({', '.join(shared)}), which param_sparsity cannot allocate per layer: "
                                        "prune heads with sparsity in uniform mode")
    scores = normalize_scores(units, scores, spec.normalize, spreads)
    plan = plan_parameter_budget(units, scores, budget, costs=costs, whole_kv_groups=whole_kv,
                                 round_to=spec.round_to, min_keep=spec.min_keep)
    if plan.available < budget:
        floors = " above the min_keep floors" if spec.min_keep is not None else ""
        raise InvalidOptionError("param_sparsity", spec.param_sparsity, f"asks for {budget:,} parameters "
                                 f"({'including ' + format(added, ',') + ' added biases, ' if added else ''}of "
                                 f"{params_before:,}), and {names} can free at most {plan.available:,}{floors} "
                                 f"({plan.available / params_before:.1%} of the model): lower it"
                                 f"{', lower min_keep' if floors else ''} or add structures")
    if plan.freed == 0:
        raise NothingToPruneError(f"param_sparsity {spec.param_sparsity:g} comes to {budget:,} parameters, fewer "
                                  f"than the smallest removal from {names} frees ({plan.smallest:,}): raise it")
    return plan.removals


def _num_parameters(model: nn.Module) -> int:
    # shared (tied) tensors count once, as in PreTrainedModel.num_parameters
    return model.num_parameters() if hasattr(model, "num_parameters") else \
        sum(p.numel() for p in model.parameters())


def _report_widths(arch: ArchSpec, spec: PruningSpec) -> dict[str, list[int]]:
    """Per-layer widths for the report, plus ``"hidden": [size]`` when the hidden size is pruned."""
    widths = arch.widths()
    if "hidden" in spec.sparsity:
        widths["hidden"] = [arch.hidden_site().width]
    return widths


def _refit_notes(model: nn.Module, result, damping: float) -> list[str]:
    """The report's sentences on least-squares reconstruction: which projections were refit, with or without their
    bias, on how many tokens."""
    how = f"by ridge least squares (damping {damping:g}) on {result.tokens:,} calibration tokens, block by block on " \
          "the pruned stream"
    notes = []
    if result.biased:
        notes.append(f"{'/'.join(result.biased)} kept weights and biases refit {how}")
    unbiased = [name for name in result.projections if name not in result.biased]
    if unbiased:
        model_type = getattr(model.config, "model_type", "the model")
        notes.append(f"{'/'.join(unbiased)} kept weights refit {how}, without a bias (uncentred: the {model_type} "
                     "config cannot give these projections one)")
    return notes


def prune_model(
    model: nn.Module,
    sparsity: float | Mapping[str, float] | None = None,
    structures: Iterable[str] | str | None = None,
    importance: str | Importance = "taylor",
    data=None,
    mode: str = "uniform",
    num_batches: int = 8,
    batch_size: int = 16,
    round_to: int = 1,
    tokenizer=None,
    progress: bool = False,
    normalize: str = "none",
    compensate_bias: bool = False,
    max_keep: float | None = None,
    *,
    min_keep: float | None = None,
    reconstruct: str = "none",
    damping: float | None = None,
    param_sparsity: float | None = None,
    spec: PruningSpec | None = None,
) -> PruneReport:
    """Structurally prune ``model`` in place and rewrite its config.

    Args:
        model: a supported transformers model (``compress.supported_model_types()``).
        sparsity: fraction of each structure to remove, in (0, 1): one number for all ``structures`` or a
            mapping such as ``{"ffn": 0.5, "heads": 0.25}``. Default 0.5, unless ``param_sparsity`` is given.
        structures: any of ``ffn`` (FFN neurons), ``heads`` (query heads; with grouped-query attention an
            equal number per kv group), ``kv_heads`` (whole kv heads with their query heads), ``layers`` (whole
            blocks), ``hidden`` (channels of the residual stream, removed from every tensor that carries it;
            BERT/RoBERTa need ``mode="global"``); a list or a comma-separated string. Default: ``ffn``, or the
            keys of a ``sparsity`` mapping.
        importance: ``taylor`` (default; gate gradients, LLM-Pruner's vector-wise first-order Taylor),
            ``taylor_elementwise`` (LLM-Pruner's element-wise form), ``fisher``, ``activation`` (mean activation
            magnitude, no labels needed; scores every structure but ``layers``), ``flap`` (FLAP's fluctuation:
            input variance times squared weight column), ``wanda_sp`` (weight magnitude times input norm),
            ``block_influence`` (ShortGPT, ``layers`` only), ``magnitude``/``l2``, ``l1``, ``random``, a name
            registered with :func:`compress.register_importance`, or an
            :class:`~compress.pruning.importance.Importance` instance.
        data: calibration data for data-driven criteria, ``compensate_bias`` and ``reconstruct``: a tokenized
            ``datasets.Dataset`` or any iterable of model-input dicts (tensors). For gradient criteria
            (``taylor``, ``taylor_elementwise``, ``fisher``), batches need ``labels`` unless the model is a
            causal LM.
        mode: ``uniform`` keeps one width per layer so plain transformers reloads the result; ``global`` ranks
            channels across layers (widths differ per layer; reloading needs ``import compress``).
        num_batches, batch_size: how much calibration data to use.
        round_to: keep FFN widths and the hidden size a multiple of this (e.g. 8 for faster kernels).
        tokenizer: pads a tokenized Dataset's rows into batches.
        progress: show a progress bar while scoring.
        normalize, compensate_bias, max_keep, min_keep, reconstruct, damping: see
            :class:`~compress.pruning.spec.PruningSpec` (``damping=None``: its default).
        param_sparsity: instead of ``sparsity``, the fraction of all the model's parameters to remove, from the
            ``structures`` (``ffn``, ``heads``, ``kv_heads``); in ``global`` mode the engine decides how much each
            structure and layer loses, by one ranking of every candidate removal (an FFN neuron, a row of query
            heads, a kv group) on its normalised score, each weighing the parameters it frees (see
            :class:`~compress.pruning.spec.PruningSpec`). The report gives the fraction achieved.
        spec: a ready :class:`~compress.pruning.spec.PruningSpec`, used instead of ``sparsity``, ``structures``,
            ``importance``, ``mode``, ``round_to``, ``normalize``, ``compensate_bias``, ``max_keep``, ``min_keep``,
            ``reconstruct``, ``damping`` and ``param_sparsity``.

    Returns:
        A :class:`PruneReport` with the sparsity asked for and achieved (whole units). The model is modified
        in place; in ``global`` mode with unequal widths it becomes its compact subclass
        (``CompressedBertForSequenceClassification`` etc.). Its and every submodule's train/eval mode is as
        before the call.

    Raises:
        InvalidOptionError: an option has a bad value (the error names it).
        NothingToPruneError: a requested structure would lose nothing (e.g. ``round_to`` larger than the FFN
            width, heads of a one-head model); raised before the model changes.
        UnsupportedStructureError: the family cannot prune a structure in this mode, cannot express
            ``compensate_bias`` in its config (Qwen2, T5), or cannot run ``reconstruct`` (T5); raised before
            calibration.
        CompressError: the removal cannot be carried out on this model (e.g. the hidden size of a task head
            the architecture spec does not know); raised before the model changes.
    """
    if spec is None:
        extra = {} if damping is None else {"damping": damping}
        if param_sparsity is not None:
            extra["param_sparsity"] = param_sparsity
        spec = PruningSpec.from_options(sparsity, structures, mode=mode, importance=importance, normalize=normalize,
                                        max_keep=max_keep, min_keep=min_keep, round_to=round_to,
                                        compensate_bias=compensate_bias, reconstruct=reconstruct, **extra)
    positive_int("num_batches", num_batches)
    positive_int("batch_size", batch_size)
    with preserve_training_modes(model):
        return _prune(model, spec, data, num_batches, batch_size, tokenizer, progress)


def _prune(model: nn.Module, spec: PruningSpec, data, num_batches: int, batch_size: int, tokenizer,
           progress: bool) -> PruneReport:
    from compress.pruning.compact import make_compact

    check_unsharded(model, "prune the model")
    arch = arch_spec(model)
    check_support(arch, spec.sparsity, spec.mode)
    criterion = get_importance(spec.importance)
    reconstruct = spec.reconstruct == "least_squares"
    if (criterion.needs_calibration or spec.compensate_bias or reconstruct) and data is None:
        if criterion.needs_calibration:
            needs = f"importance={spec.importance_name!r} scores structures on calibration data"
        elif reconstruct:
            needs = "reconstruct='least_squares' refits weights on calibration activations"
        else:
            needs = "compensate_bias=True measures mean activations"
        raise CalibrationError(f"{needs} and needs `data`; pass calibration data or use "
                               "importance='magnitude'/'random' without compensate_bias or reconstruct")
    if reconstruct:
        check_reconstructable(arch)
    refit = [s for s in spec.sparsity if s in RECONSTRUCTED_STRUCTURES]
    biased = refit if spec.compensate_bias else []
    arch.check_output_biases(biased)  # before any calibration: refused where the config cannot hold a bias
    if reconstruct and not spec.compensate_bias:
        # the refit takes the bias along wherever the projections have one or the config can give them one (the
        # same commands then run on every family); elsewhere it is an uncentred fit, and the notes say which
        biased, _ = bias_fit_structures(arch, refit)
    if isinstance(criterion, MagnitudeImportance) and is_causal_lm(model):
        logger.warning("importance=%r on a causal LM: weight norms miss the activation outliers of real LLMs and "
                       "can break the model; flap or wanda_sp score with activations", spec.importance_name)
    batches = None
    if data is not None:
        from compress.data import calibration_batches

        batches = calibration_batches(data, batch_size=batch_size, num_batches=num_batches, tokenizer=tokenizer)

    widths_before = _report_widths(arch, spec)
    params_before = _num_parameters(model)
    units = units_for(arch, spec.sparsity)
    check_uniform_result(arch, spec)
    recorder = None
    if reconstruct and spec.mode == "uniform" and isinstance(criterion, InputStatisticsImportance):
        # widths are fixed and the sequential pass chooses every channel on the pruned stream: no dense pass
        scores, spreads = {u.key: torch.zeros(u.size) for u in units}, {}
    else:
        compensating = spec.compensate_bias and not reconstruct
        with record_input_means(model, units) if compensating else contextlib.nullcontext() as recorder:
            scores, stats = _score_units(model, units, criterion, batches if criterion.needs_calibration else None,
                                         progress)
            spreads = _head_spreads(units, criterion, stats) if spec.normalize == "standardize" else {}
            del stats
            if recorder is not None and not criterion.needs_calibration:
                forward_passes(model, batches)
    if spec.param_sparsity is not None:
        removals = _plan_budget(arch, units, scores, spec, params_before, biased, spreads)
    else:
        removals = plan_removals(arch, units, scores, spec.sparsity, spec.mode, round_to=spec.round_to,
                                 normalize=spec.normalize, max_keep=spec.max_keep, min_keep=spec.min_keep,
                                 spreads=spreads)
    check_same_on_ranks(removals, "the channels, heads and blocks chosen for removal")
    achieved = achieved_sparsity(units, removals, spec.sparsity)
    for structure, value in achieved.items():
        if value == 0.0 and spec.param_sparsity is None:  # checked before anything changes: the model is as it was
            raise nothing_removed_error(structure, spec.sparsity[structure], units, spec.round_to)
    # every check of the removal runs before bias compensation changes a tensor: a refused removal (e.g. the
    # hidden size of an unknown task head) leaves the model as it was
    arch.check_config_expresses(widths_after(arch, units, removals))  # global mode: widths known once planned
    checked = check_removals(model, arch, units, removals)
    notes = arch.add_output_biases(biased)
    if reconstruct:
        result = prune_sequentially(model, arch, units, removals, criterion, batches, damping=spec.damping,
                                    fit_bias=biased, whole_kv_groups="kv_heads" in spec.sparsity,
                                    progress=progress)
        check_same_on_ranks(result.removed, "the channels and heads chosen on the pruned stream")
        removals = result.removed
        notes.extend(_refit_notes(model, result, spec.damping))
    else:
        if recorder is not None:
            shifts, _ = bias_shifts(units, removals, recorder.means())
            add_to_bias(units, shifts)
        apply_checked(checked)
    arch = arch_spec(model)
    if spec.mode == "uniform" and not arch.fits_standard_config():
        raise CompressError("internal: uniform pruning produced unequal layer widths")  # pragma: no cover
    if not arch.fits_standard_config():
        make_compact(model)
    mark_mean_loss(model)  # the pruned model is fine-tuned next: the same gradients under torchrun as in one process
    report = PruneReport(
        model_type=model.config.model_type,
        mode=spec.mode,
        importance=spec.importance_name,
        sparsity={k: v for k, v in spec.sparsity.items() if v is not None},
        params_before=params_before,
        params_after=_num_parameters(model),
        widths_before=widths_before,
        widths_after=_report_widths(arch, spec),
        removed={k: v for k, v in removals.items() if v},
        achieved_sparsity=achieved,
        notes=notes,
        param_sparsity=spec.param_sparsity,
    )
    report.achieved_param_sparsity = 1.0 - report.params_after / report.params_before
    logger.info("pruned %s: %d -> %d params", report.model_type, params_before, report.params_after)
    return report
