"""Choosing what to remove: per layer (``uniform``) or pooled across layers (``global``), from unit scores.

Everything here works on scores and sizes only; nothing touches a model. :func:`plan_removals` returns the
indices to remove per unit, which :func:`compress.pruning.surgery.apply_removals` then removes.

torch-pruning's pruners do their own counting (``round_to``, group normalisers, global ranking) inside
``MetaPruner.step``, which needs dependency-graph groups for every unit; heads of grouped-query models must
go in equal numbers per kv group, T5's heads together across a stack, and ``max_keep`` caps layers, none of
which its pruners express, so the counting is done here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from compress.errors import CompressError, InvalidOptionError, NothingToPruneError
from compress.pruning.arch import ArchSpec
from compress.pruning.importance import Unit
from compress.pruning.spec import NORMALIZATIONS


def _n_remove(n: int, sparsity: float, min_keep: int = 1, multiple: int = 1) -> int:
    keep = max(min_keep, n - int(math.floor(sparsity * n + 0.5)))
    if multiple > 1:
        keep = min(n, max(multiple, int(math.ceil(keep / multiple) * multiple)))
    return n - keep


def _lowest(scores: torch.Tensor, count: int) -> list[int]:
    if count <= 0:
        return []
    return sorted(torch.argsort(scores.float(), stable=True)[:count].tolist())


def _global_counts(units: list[Unit], scores: dict[str, torch.Tensor], sparsity: float,
                   min_keep: dict[str, int], min_remove: Mapping[str, int] | None = None) -> dict[str, int]:
    """Pool every channel of the units, remove the lowest ``sparsity`` of them, respecting ``min_keep``.

    ``min_remove`` (the ``max_keep`` cap) is taken first from each unit's lowest scores and counts
    against the same budget, so the total removed is unchanged.
    """
    pooled = sorted((float(s), u.key) for u in units for s in scores[u.key])
    budget = int(math.floor(sparsity * sum(u.size for u in units) + 0.5))
    removable = {u.key: u.size - min_keep[u.key] for u in units}
    forced = {u.key: min(removable[u.key], (min_remove or {}).get(u.key, 0)) for u in units}
    counts = dict(forced)
    budget -= sum(forced.values())
    seen = {u.key: 0 for u in units}
    for _, key in pooled:
        if budget <= 0:
            break
        seen[key] += 1
        if seen[key] <= forced[key]:
            continue  # one of the unit's lowest channels, already counted by the cap
        if counts[key] < removable[key]:
            counts[key] += 1
            budget -= 1
    return counts


def _forced(size: int, cap: int | None, per: int = 1) -> int:
    """How many of a unit's ``size`` channels a width cap of ``cap`` removes at least; with groups of
    ``per`` channels (a row of query heads, one per kv group) the cap is rounded up to whole groups."""
    if cap is None:
        return 0
    return max(0, size - max(1, math.ceil(cap / per)) * per)


def width_cap(size: int, sparsity: float, max_keep: float) -> int:
    """The most channels of ``size`` one layer may keep under ``max_keep`` when ``sparsity`` of them are removed
    overall: ``max_keep`` of ``size``, but never below what ``sparsity`` keeps on average (whole channels per
    layer could otherwise force more removals than the sparsity asks)."""
    return max(int(math.floor(max_keep * size + 1e-9)), math.ceil((1.0 - sparsity) * size - 1e-9))


def _cap(size: int, sparsity: float, max_keep: float | None, max_width: int | None) -> int | None:
    if max_width is not None:
        return max_width
    return None if max_keep is None else width_cap(size, sparsity, max_keep)


def normalize_scores(units: list[Unit], scores: Mapping[str, torch.Tensor], how: str,
                     spreads: Mapping[str, float] | None = None) -> dict[str, torch.Tensor]:
    """Scale each unit's channel scores by their mean (``"mean"``) or L2 norm (``"l2"``), or standardise them
    (``"standardize"``: minus their mean, over their standard deviation, as FLAP's adaptive structure does) before
    global ranking. ``spreads`` (``"standardize"``) replaces the standard deviation of some units, e.g. a heads
    unit's by that of its channels' scores (see
    :meth:`~compress.pruning.importance.InputStatisticsImportance.channel_spread`).

    Gradient-based scores grow towards the loss, so ranking raw scores across layers strips early layers
    and leaves the last one whole; normalising per layer ranks channels by how they compare within their
    own layer, while still letting layers end up with different widths. Standardised scores rank a channel by how
    far it stands out from its own layer's typical channel, so a layer whose scores spread widely gives up its
    weakest channels first.
    """
    if how not in NORMALIZATIONS:
        raise InvalidOptionError("normalize", how, f"choose one of {', '.join(NORMALIZATIONS)}")
    out = dict(scores)
    if how == "none":
        return out
    for u in units:
        if u.structure in ("ffn", "heads"):
            s = scores[u.key].float()
            if how == "standardize":
                centred = s - s.mean()
                spread = s.std() if s.numel() > 1 else torch.tensor(0.0)
                if spreads is not None and u.key in spreads:
                    spread = torch.tensor(float(spreads[u.key]))
                out[u.key] = centred / spread if spread > 0 else centred
                continue
            scale = s.mean() if how == "mean" else s.norm()
            out[u.key] = s / scale if scale > 0 else s
    return out


def _floor(size: int, min_keep: float | None, base: int, per: int = 1) -> int:
    """The fewest channels of ``size`` one layer keeps: ``base``, or ``min_keep`` of them rounded up to whole
    groups of ``per`` (a row of query heads, one per kv group), whichever is larger."""
    if min_keep is None:
        return base
    return min(size, max(base, math.ceil(math.ceil(min_keep * size - 1e-9) / per) * per))


def reselect(unit: Unit, planned: list[int], scores: torch.Tensor, whole_kv_groups: bool) -> list[int]:
    """The lowest-scoring channels of ``unit`` removed the way ``planned`` removes them: as many FFN neurons; for
    heads as many whole kv groups (``whole_kv_groups``, or without grouped-query attention) or as many query heads
    from every kv group. Used when a layer's channels are chosen again on new scores (the sequential pass of
    least-squares reconstruction) with the widths planned from the first scores."""
    if unit.structure != "heads":
        return _lowest(scores, len(planned))
    n_kv = unit.site.num_kv_heads
    per = unit.size // n_kv
    if whole_kv_groups or not unit.site.is_gqa:
        dead = _lowest(scores.view(n_kv, per).sum(1), len(planned) // per)
        return [g * per + j for g in dead for j in range(per)]
    per_group = len(planned) // n_kv
    grouped = scores.view(n_kv, per)
    return sorted(g * per + j for g in range(n_kv) for j in _lowest(grouped[g], per_group))


def plan_removals(arch: ArchSpec, units: list[Unit], scores: dict[str, torch.Tensor],
                  sparsity: Mapping[str, float], mode: str, round_to: int = 1,
                  normalize: str = "none", max_keep: float | None = None,
                  max_widths: Mapping[str, int] | None = None, min_keep: float | None = None,
                  spreads: Mapping[str, float] | None = None) -> dict[str, list[int]]:
    """Indices to remove per unit key: channels for ffn, query heads for heads/kv_heads, blocks for layers.

    ``normalize`` and ``spreads`` (global mode): see :func:`normalize_scores`. ``max_keep`` (global mode): no layer
    keeps more than this fraction of its current FFN neurons or heads (see :class:`~compress.pruning.spec.PruningSpec`).
    ``max_widths`` (global mode) caps widths in absolute terms instead, per structure (``ffn``, ``heads``,
    ``kv_heads``): for pruning in several steps, where the cap refers to the widths before the first.
    ``min_keep`` (global mode): every layer keeps at least this fraction of its FFN neurons, query heads (whole
    rows, one head per kv group) and kv heads.
    """
    if min_keep is not None and mode != "global":
        raise CompressError("min_keep sets a floor on per-layer widths in mode='global' only")
    if max_widths is not None and mode != "global":
        raise CompressError("max_widths caps per-layer widths in mode='global' only")
    caps = dict(max_widths or {})
    removals: dict[str, list[int]] = {}
    if mode == "global":
        scores = normalize_scores(units, scores, normalize, spreads)
    ffn_units = [u for u in units if u.structure == "ffn"]
    if ffn_units:
        fraction = sparsity["ffn"]
        if mode == "global":
            floors = {u.key: _floor(u.size, min_keep, min(u.size, round_to), per=round_to) for u in ffn_units}
            counts = _global_counts(ffn_units, scores, fraction, floors,
                                    {u.key: _forced(u.size, _cap(u.size, fraction, max_keep, caps.get("ffn")))
                                     for u in ffn_units})
            if round_to > 1:
                counts = {u.key: u.size - max(round_to, (u.size - counts[u.key]) // round_to * round_to)
                          for u in ffn_units}
        else:
            counts = {u.key: _n_remove(u.size, fraction, 1, round_to) for u in ffn_units}
        for u in ffn_units:
            removals[u.key] = _lowest(scores[u.key], counts[u.key])

    head_units = [u for u in units if u.structure == "heads"]
    if head_units and ("heads" in sparsity or "kv_heads" in sparsity):
        head_mode = "uniform" if "heads" in arch.uniform_only_structures else mode
        removals.update(_plan_heads(head_units, scores, sparsity, head_mode, max_keep, caps, min_keep))

    for u in units:
        if u.structure == "hidden":  # one residual stream: the same count in either mode
            removals[u.key] = _lowest(scores[u.key], _n_remove(u.size, sparsity["hidden"], 1, round_to))
        if u.structure == "layers":
            candidates = [i for i in range(u.size) if i not in u.site.protected]
            count = min(_n_remove(u.size, sparsity["layers"]), len(candidates))
            cand_scores = scores[u.key][candidates]
            removals[u.key] = sorted(candidates[i] for i in _lowest(cand_scores, count))
    return removals


def _plan_heads(units: list[Unit], scores: dict[str, torch.Tensor], sparsity: Mapping[str, float],
                mode: str, max_keep: float | None = None,
                caps: Mapping[str, int] | None = None, min_keep: float | None = None) -> dict[str, list[int]]:
    caps = caps or {}
    removals: dict[str, list[int]] = {}
    whole_kv = "kv_heads" in sparsity
    fraction = sparsity["kv_heads" if whole_kv else "heads"]

    # T5: heads shared across the layers of a stack are scored and removed together.
    shared: dict[str, list[Unit]] = {}
    for u in units:
        if u.site.shared_heads_key:
            shared.setdefault(u.site.shared_heads_key, []).append(u)
    for members in shared.values():
        total = sum(scores[u.key] for u in members)
        idxs = _lowest(total, _n_remove(members[0].size, fraction))
        for u in members:
            removals[u.key] = idxs
    free = [u for u in units if not u.site.shared_heads_key]
    if not free:
        return removals

    def groups_of(u: Unit) -> tuple[int, int]:
        n_kv = u.site.num_kv_heads
        return n_kv, u.size // n_kv

    # without GQA every head is its own kv group, so pruning heads means pruning whole groups
    if whole_kv or not any(u.site.is_gqa for u in free):
        kv_scores = {u.key: scores[u.key].view(*groups_of(u)).sum(1) for u in free}
        kv_units = [Unit("kv_heads", u.key, groups_of(u)[0], u.site) for u in free]
        cap_key = "kv_heads" if whole_kv else "heads"  # without GQA, kv groups are the heads
        if mode == "global":
            floors = {u.key: _floor(u.size, min_keep, 1) for u in kv_units}
            counts = _global_counts(kv_units, kv_scores, fraction, floors,
                                    {u.key: _forced(u.size, _cap(u.size, fraction, max_keep, caps.get(cap_key)))
                                     for u in kv_units})
        else:
            counts = {u.key: _n_remove(u.size, fraction) for u in kv_units}
        for u in free:
            n_kv, per = groups_of(u)
            dead_kv = _lowest(kv_scores[u.key], counts[u.key])
            removals[u.key] = [g * per + j for g in dead_kv for j in range(per)]
        return removals

    # query heads: an equal number from every kv group, so heads // kv_heads stays an integer
    if mode == "global":
        # the cap counts whole rows (one head per kv group), so the equal-per-group rounding below keeps it
        floors = {u.key: _floor(u.size, min_keep, groups_of(u)[0], per=groups_of(u)[0]) for u in free}
        counts = _global_counts(free, scores, fraction, floors,
                                {u.key: _forced(u.size, _cap(u.size, fraction, max_keep, caps.get("heads")),
                                                per=groups_of(u)[0]) for u in free})
    else:
        counts = {u.key: _n_remove(u.size, fraction, min_keep=groups_of(u)[0]) for u in free}
    for u in free:
        n_kv, per = groups_of(u)
        per_group = min(per - 1, int(math.floor(counts[u.key] / n_kv + 0.5)))
        grouped = scores[u.key].view(n_kv, per)
        removals[u.key] = sorted(g * per + j for g in range(n_kv) for j in _lowest(grouped[g], per_group))
    return removals


# -- a parameter budget (``param_sparsity``) ------------------------------------------------------------------------
def _base(layer: nn.Module) -> nn.Module:
    return layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer


def _row(layer: nn.Module, with_bias: bool) -> int:
    """The parameters of one output row of ``layer``: its inputs, and its bias entry if it has one or gets one."""
    base = _base(layer)
    return base.in_features + (1 if base.bias is not None or with_bias else 0)


def channel_parameters(unit: Unit, with_bias: bool = False) -> tuple[int, int]:
    """The parameters removing one channel of ``unit`` frees: ``(per FFN neuron or query head, more per whole kv
    group)``. A neuron takes its row of every input projection and its column of the output projection; a query head
    its ``head_dim`` rows of the query projection and columns of the output projection; a kv group also the rows of
    its key and value projections (without grouped-query attention every head is its own kv group). Bias entries
    count where the projections have a bias, or get one (``with_bias``: the config flag that gives the output
    projection a bias gives these projections one too)."""
    site = unit.site
    if unit.structure == "ffn":
        return sum(_row(layer, with_bias) for layer in site.inputs) + _base(site.output).out_features, 0
    if unit.structure != "heads":
        raise CompressError(f"internal: no parameter count per channel of {unit.structure!r}")  # pragma: no cover
    head_dim = site.head_dim
    query = head_dim * (_row(site.q, with_bias) + _base(site.o).out_features)
    return query, head_dim * (_row(site.k, with_bias) + _row(site.v, with_bias))


@dataclass
class _Candidate:
    score: float
    unit: int
    position: int
    parameters: int
    indices: list[int]


@dataclass
class BudgetPlan:
    """What :func:`plan_parameter_budget` chose: indices to remove per unit key (as :func:`plan_removals` gives them),
    the parameters they free, and the most the units could free above their floors."""

    removals: dict[str, list[int]]
    freed: int
    available: int
    #: the fewest parameters any single candidate removal frees
    smallest: int


def _candidates(index: int, unit: Unit, scores: torch.Tensor, costs: tuple[int, int], whole_kv_groups: bool,
                round_to: int, min_keep: float | None) -> list[_Candidate]:
    """A unit's candidate removals, weakest first: chunks of ``round_to`` FFN neurons; rows of query heads (the r-th
    weakest head of every kv group, scored by their mean); or whole kv groups (scored by their heads' mean)."""
    per_channel, per_group = costs
    out: list[_Candidate] = []
    if unit.structure == "ffn":
        order = torch.argsort(scores.float(), stable=True).tolist()
        floor = _floor(unit.size, min_keep, min(unit.size, round_to), per=round_to)
        stop = unit.size - floor
        start = 0
        while start < stop:
            step = (unit.size % round_to or round_to) if start == 0 else round_to
            chunk = order[start:min(start + step, stop)]
            out.append(_Candidate(float(scores[chunk].float().mean()), index, len(out), per_channel * len(chunk),
                                  sorted(chunk)))
            start += step
        return out
    n_kv = unit.site.num_kv_heads
    per = unit.size // n_kv
    grouped = scores.float().view(n_kv, per)
    if whole_kv_groups or not unit.site.is_gqa:
        group_scores = grouped.mean(1)
        floor = _floor(n_kv, min_keep, 1)
        for g in torch.argsort(group_scores, stable=True).tolist()[:n_kv - floor]:
            out.append(_Candidate(float(group_scores[g]), index, len(out), per * per_channel + per_group,
                                  [g * per + j for j in range(per)]))
        return out
    values, order = torch.sort(grouped, dim=1, stable=True)
    rows_floor = _floor(unit.size, min_keep, n_kv, per=n_kv) // n_kv
    for r in range(per - rows_floor):
        out.append(_Candidate(float(values[:, r].mean()), index, len(out), n_kv * per_channel,
                              sorted(g * per + int(order[g, r]) for g in range(n_kv))))
    return out


def plan_parameter_budget(units: list[Unit], scores: Mapping[str, torch.Tensor], budget: int, *,
                          costs: Mapping[str, tuple[int, int]], whole_kv_groups: bool, round_to: int = 1,
                          min_keep: float | None = None) -> BudgetPlan:
    """Remove about ``budget`` parameters from ``units`` (FFN and heads units of any layers) by one ranking.

    Every unit offers its candidate removals weakest first (see :func:`_candidates`), each freeing the parameters
    ``costs[unit.key]`` gives per channel and per kv group (:func:`channel_parameters`). All candidates are ranked by
    score (``scores`` should be normalised per layer, e.g. standardised, so that different layers and structures
    compare) and taken in that order while they fit in the budget; one that does not fit ends its unit's removals
    (a unit's removals go weakest first), and smaller ones further down may still fill the rest. The parameters
    freed are thus at most ``budget``, and short of it by less than the smallest candidate still open. ``min_keep``
    is the floor of every layer (FFN neurons, query heads in whole rows, kv groups), as in :func:`plan_removals`.
    """
    candidates = []
    for i, unit in enumerate(units):
        offered = _candidates(i, unit, scores[unit.key], costs[unit.key], whole_kv_groups, round_to, min_keep)
        for previous, candidate in zip(offered, offered[1:]):  # a unit's removals rank in their order
            candidate.score = max(candidate.score, previous.score)
        candidates += offered
    candidates.sort(key=lambda c: (c.score, c.unit, c.position))
    removals: dict[str, list[int]] = {u.key: [] for u in units}
    closed: set[int] = set()
    freed = 0
    for candidate in candidates:
        if candidate.unit in closed:
            continue
        if freed + candidate.parameters > budget:
            closed.add(candidate.unit)
            continue
        removals[units[candidate.unit].key].extend(candidate.indices)
        freed += candidate.parameters
    return BudgetPlan(removals={k: sorted(v) for k, v in removals.items()}, freed=freed,
                      available=sum(c.parameters for c in candidates),
                      smallest=min((c.parameters for c in candidates), default=0))


def achieved_sparsity(units: list[Unit], removals: Mapping[str, list[int]],
                      sparsity: Mapping[str, float]) -> dict[str, float]:
    """The fraction of each requested structure that ``removals`` takes away (whole units, so it may differ
    from ``sparsity``): FFN neurons, query heads, kv heads (whole kv groups) or blocks, over the model."""
    achieved = {}
    for structure in sparsity:
        kind = "heads" if structure == "kv_heads" else structure
        members = [u for u in units if u.structure == kind]
        if structure == "kv_heads":
            removed = total = 0
            for u in members:
                n_kv, per = u.site.num_kv_heads, u.size // u.site.num_kv_heads
                dead = set(removals.get(u.key, []))
                removed += sum(all(g * per + j in dead for j in range(per)) for g in range(n_kv))
                total += n_kv
        else:
            removed = sum(len(removals.get(u.key, [])) for u in members)
            total = sum(u.size for u in members)
        achieved[structure] = removed / total if total else 0.0
    return achieved


def nothing_removed_error(structure: str, sparsity: float, units: list[Unit], round_to: int) -> NothingToPruneError:
    kind = "heads" if structure == "kv_heads" else structure
    sizes = sorted({u.size for u in units if u.structure == kind})
    what = {
        "ffn": f"FFN widths {sizes}" + (f", kept a multiple of round_to={round_to}" if round_to > 1 else ""),
        "heads": f"attention blocks with {sizes} heads; every block keeps at least one head per kv group",
        "kv_heads": "attention blocks whose kv heads cannot lose one and keep at least one",
        "layers": f"stacks of {sizes} removable layers",
        "hidden": f"hidden size {sizes}" + (f", kept a multiple of round_to={round_to}" if round_to > 1 else ""),
    }[structure]
    hint = " or lower round_to" if structure in ("ffn", "hidden") and round_to > 1 else ""
    return NothingToPruneError(f"{structure}: sparsity {sparsity:g} removes nothing from this model ({what}); raise "
                               f"the sparsity{hint}, or leave {structure} out")
