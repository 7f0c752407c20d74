"""Structured pruning of Hugging Face models: score, choose, remove, rewrite the config.

Removal goes through torch-pruning's dependency graph, which finds every layer coupled to the pruned
channels (FFN in/out projections, q/k/v/o of an attention block, T5's shared relative position bias).
Attention heads of grouped-query (Llama/Qwen2) and T5 models are the exception: the graph couples query
and key/value channels one-to-one and misplaces T5's per-head position bias, so those are sliced with
torch-pruning's pruning functions by explicit head groups.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field

import torch
import torch_pruning as tp
from torch import nn

from compress.errors import CalibrationError, CompressError, NothingToPruneError, UnsupportedStructureError
from compress.pruning.arch import ArchAdapter, AttentionSite, get_adapter
from compress.pruning.compensate import add_to_bias, bias_shifts, record_input_means
from compress.pruning.importance import (
    STRUCTURES,
    GateStats,
    Importance,
    Unit,
    collect_gate_stats,
    get_importance,
    units_for,
)

logger = logging.getLogger(__name__)

MODES = ("uniform", "global")


@dataclass
class PruneReport:
    """What :func:`prune_model` did: ratios, widths and parameter counts before and after."""

    model_type: str
    mode: str
    importance: str
    ratios: dict[str, float]
    params_before: int
    params_after: int
    widths_before: dict[str, list[int]]
    widths_after: dict[str, list[int]]
    removed: dict[str, list[int]] = field(default_factory=dict)
    #: the fraction of each structure actually removed; whole channels, heads and blocks make it differ
    #: from ``ratios`` (the request) by rounding, or more when ``round_to`` or a minimum width limits it
    achieved_ratios: dict[str, float] = field(default_factory=dict)

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before

    def to_dict(self) -> dict:
        return asdict(self)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _structure_names(structures: Iterable[str] | str | None) -> list[str] | None:
    """``"ffn"`` or ``"ffn,heads"`` -> a list of names (a string is not read letter by letter)."""
    if structures is None:
        return None
    if isinstance(structures, str):
        return [s.strip() for s in structures.split(",")]
    names = list(structures)
    bad = [s for s in names if not isinstance(s, str)]
    if bad:
        raise CompressError(f"structures must be names such as 'ffn' or 'heads', got {bad[0]!r}")
    return names


def _ratio_value(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CompressError(f"ratio for {name!r} must be a number in (0, 1), got {value!r} "
                            f"({type(value).__name__})")
    return float(value)


def normalize_ratios(ratio: float | Mapping[str, float], structures: Iterable[str] | str | None) -> dict[str, float]:
    """``ratio=0.5, structures=("ffn","heads")`` -> ``{"ffn": 0.5, "heads": 0.5}``, validated."""
    names = _structure_names(structures)
    if names is not None and len(set(names)) != len(names):
        raise CompressError(f"structures={names} names a structure twice")
    if isinstance(ratio, Mapping):
        ratios = {str(k): _ratio_value(str(k), v) for k, v in ratio.items()}
        if names is not None and set(names) != set(ratios):
            raise CompressError(f"ratio names {sorted(ratios)} but structures={sorted(names)}; "
                                "pass one of them or make them agree")
    else:
        ratios = {name: _ratio_value(name, ratio) for name in (names if names is not None else ["ffn"])}
    if not ratios:
        raise CompressError(f"no structures to prune; choose from {', '.join(STRUCTURES)}")
    for name, value in ratios.items():
        if name not in STRUCTURES:
            raise UnsupportedStructureError(f"unknown structure {name!r}; choose from {', '.join(STRUCTURES)}")
        if not (math.isfinite(value) and 0.0 < value < 1.0):
            raise CompressError(f"ratio for {name!r} is {value}; it must be in (0, 1): the fraction to remove")
    if "heads" in ratios and "kv_heads" in ratios:
        raise UnsupportedStructureError("prune either 'heads' (query heads per kv group) or 'kv_heads' "
                                        "(whole kv heads with their query heads), not both")
    return ratios


def check_support(adapter: ArchAdapter, ratios: Mapping[str, float], mode: str) -> None:
    """Raise a clear error for a structure/mode the architecture cannot express."""
    if mode not in MODES:
        raise CompressError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    allowed = adapter.uniform_structures if mode == "uniform" else adapter.supported_structures
    for name in ratios:
        if name in allowed:
            continue
        if name in adapter.supported_structures:
            raise UnsupportedStructureError(
                f"{adapter.family}: pruning {name!r} in mode='uniform' cannot be expressed by the standard "
                f"config ({_uniform_reason(adapter.family, name)}); use mode='global', whose artifacts load "
                f"with `import compress`. Uniform mode supports: {', '.join(adapter.uniform_structures)}"
            )
        raise UnsupportedStructureError(
            f"{adapter.family}: pruning {name!r} is not supported; supported structures: "
            f"{', '.join(adapter.supported_structures)}"
        )


def _uniform_reason(family: str, structure: str) -> str:
    if family == "bert" and structure == "heads":
        return "BertConfig derives the head size as hidden_size / num_attention_heads"
    return "the config holds a single width for every layer"


@contextlib.contextmanager
def _identity_rotary(model: nn.Module) -> Iterator[None]:
    """Tracing rotary embeddings never finishes in torch-pruning: swap them for identity while tracing."""
    module = sys.modules.get(type(model.base_model).__module__)
    original = getattr(module, "apply_rotary_pos_emb", None)
    if original is not None:
        module.apply_rotary_pos_emb = lambda q, k, *args, **kwargs: (q, k)
    try:
        yield
    finally:
        if original is not None:
            module.apply_rotary_pos_emb = original


def example_inputs(model: nn.Module, seq_len: int = 8) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    ids = torch.full((1, seq_len), 5, dtype=torch.long, device=device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if getattr(model.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids[:, :4].clone()
    return inputs


@contextlib.contextmanager
def preserve_training_modes(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's train/eval flag on exit (torch-pruning's tracing calls ``model.eval()``)."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def build_dependency_graph(model: nn.Module) -> tp.DependencyGraph:
    """torch-pruning's dependency graph of an HF model (rotary embeddings neutralised while tracing)."""

    def first_tensor(out):
        if hasattr(out, "logits"):
            return out.logits
        if hasattr(out, "last_hidden_state"):
            return out.last_hidden_state
        return out[0]

    # Tracing follows autograd, so frozen (PEFT) backbones are made to require grad while tracing.
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(True)
        with _identity_rotary(model), preserve_training_modes(model), warnings.catch_warnings():
            # norms' weights are "unwrapped parameters" to torch-pruning; we never prune the hidden size
            warnings.filterwarnings("ignore", message=".*unwrapped.*")
            warnings.filterwarnings("ignore", message=".*last non-singleton.*")
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=example_inputs(model), output_transform=first_tensor
            )
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


# -- choosing what to remove -----------------------------------------------------------------------
def _n_remove(n: int, ratio: float, min_keep: int = 1, multiple: int = 1) -> int:
    keep = max(min_keep, n - int(math.floor(ratio * n + 0.5)))
    if multiple > 1:
        keep = min(n, max(multiple, int(math.ceil(keep / multiple) * multiple)))
    return n - keep


def _lowest(scores: torch.Tensor, count: int) -> list[int]:
    if count <= 0:
        return []
    return sorted(torch.argsort(scores.float(), stable=True)[:count].tolist())


def _global_counts(units: list[Unit], scores: dict[str, torch.Tensor], ratio: float,
                   min_keep: dict[str, int], min_remove: Mapping[str, int] | None = None) -> dict[str, int]:
    """Pool every channel of the units, remove the lowest ``ratio`` of them, respecting ``min_keep``.

    ``min_remove`` (the ``max_keep`` cap) is taken first from each unit's lowest scores and counts
    against the same budget, so the total removed is unchanged.
    """
    pooled = sorted((float(s), u.key) for u in units for s in scores[u.key])
    budget = int(math.floor(ratio * sum(u.size for u in units) + 0.5))
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


def check_max_keep(max_keep: float | None, ratios: Mapping[str, float], mode: str) -> None:
    """Raise a clear error for a ``max_keep`` that is out of range, meaningless, or removes more than asked."""
    if max_keep is None:
        return
    if not 0.0 < max_keep <= 1.0:
        raise CompressError(f"max_keep={max_keep}: the largest fraction of its channels one layer may keep "
                            "must be in (0, 1]")
    if mode != "global":
        raise CompressError(f"max_keep={max_keep} caps per-layer widths in mode='global'; mode={mode!r} already "
                            "keeps 1 - sparsity in every layer: drop max_keep or use mode='global'")
    for name in ("ffn", "heads", "kv_heads"):
        if name in ratios and max_keep < 1.0 - ratios[name] - 1e-9:
            raise CompressError(f"max_keep={max_keep} would remove more than the {name} sparsity "
                                f"{ratios[name]}: every layer keeping at most {max_keep:.0%} removes at least "
                                f"{1 - max_keep:.0%}; set max_keep >= {1 - ratios[name]:.2f}")


def _forced(size: int, cap: int | None, per: int = 1) -> int:
    """How many of a unit's ``size`` channels a width cap of ``cap`` removes at least; with groups of
    ``per`` channels (a row of query heads, one per kv group) the cap is rounded up to whole groups."""
    if cap is None:
        return 0
    return max(0, size - max(1, math.ceil(cap / per)) * per)


def width_cap(size: int, ratio: float, max_keep: float) -> int:
    """The most channels of ``size`` one layer may keep under ``max_keep`` when ``ratio`` of them are removed
    overall: ``max_keep`` of ``size``, but never below what ``ratio`` keeps on average (whole channels per
    layer could otherwise force more removals than the ratio asks)."""
    return max(int(math.floor(max_keep * size + 1e-9)), math.ceil((1.0 - ratio) * size - 1e-9))


def _cap(size: int, ratio: float, max_keep: float | None, max_width: int | None) -> int | None:
    if max_width is not None:
        return max_width
    return None if max_keep is None else width_cap(size, ratio, max_keep)


NORMALIZATIONS = ("none", "mean", "l2")


def normalize_scores(units: list[Unit], scores: Mapping[str, torch.Tensor], how: str) -> dict[str, torch.Tensor]:
    """Scale each unit's channel scores by their mean (``"mean"``) or L2 norm (``"l2"``) before global ranking.

    Gradient-based scores grow towards the loss, so ranking raw scores across layers strips early layers
    and leaves the last one whole; normalising per layer ranks channels by how they compare within their
    own layer, while still letting layers end up with different widths.
    """
    if how not in NORMALIZATIONS:
        raise CompressError(f"score normalization {how!r}; choose one of {', '.join(NORMALIZATIONS)}")
    out = dict(scores)
    if how == "none":
        return out
    for u in units:
        if u.structure in ("ffn", "heads"):
            s = scores[u.key].float()
            scale = s.mean() if how == "mean" else s.norm()
            out[u.key] = s / scale if scale > 0 else s
    return out


def plan_removals(adapter: ArchAdapter, units: list[Unit], scores: dict[str, torch.Tensor],
                  ratios: Mapping[str, float], mode: str, round_to: int = 1,
                  normalize: str = "none", max_keep: float | None = None,
                  max_widths: Mapping[str, int] | None = None) -> dict[str, list[int]]:
    """Indices to remove per unit key: channels for ffn, query heads for heads/kv_heads, blocks for layers.

    ``normalize`` (global mode): see :func:`normalize_scores`. ``max_keep`` (global mode): no layer keeps
    more than this fraction of its current FFN neurons or heads (see :func:`prune_model`).
    ``max_widths`` (global mode) caps widths in absolute terms instead, per structure (``ffn``, ``heads``,
    ``kv_heads``): for pruning in several steps, where the cap refers to the widths before the first.
    """
    if max_widths is not None and mode != "global":
        raise CompressError("max_widths caps per-layer widths in mode='global' only")
    caps = dict(max_widths or {})
    check_max_keep(max_keep, ratios, mode)
    removals: dict[str, list[int]] = {}
    if mode == "global":
        scores = normalize_scores(units, scores, normalize)
    ffn_units = [u for u in units if u.structure == "ffn"]
    if ffn_units:
        ratio = ratios["ffn"]
        if mode == "global":
            counts = _global_counts(ffn_units, scores, ratio, {u.key: min(u.size, round_to) for u in ffn_units},
                                    {u.key: _forced(u.size, _cap(u.size, ratio, max_keep, caps.get("ffn")))
                                     for u in ffn_units})
            if round_to > 1:
                counts = {u.key: u.size - max(round_to, (u.size - counts[u.key]) // round_to * round_to)
                          for u in ffn_units}
        else:
            counts = {u.key: _n_remove(u.size, ratio, 1, round_to) for u in ffn_units}
        for u in ffn_units:
            removals[u.key] = _lowest(scores[u.key], counts[u.key])

    head_units = [u for u in units if u.structure == "heads"]
    if head_units and ("heads" in ratios or "kv_heads" in ratios):
        head_mode = "uniform" if "heads" in adapter.uniform_only_structures else mode
        removals.update(_plan_heads(head_units, scores, ratios, head_mode, max_keep, caps))

    for u in units:
        if u.structure == "layers":
            candidates = [i for i in range(u.size) if i not in u.site.protected]
            count = min(_n_remove(u.size, ratios["layers"]), len(candidates))
            cand_scores = scores[u.key][candidates]
            removals[u.key] = sorted(candidates[i] for i in _lowest(cand_scores, count))
    return removals


def _plan_heads(units: list[Unit], scores: dict[str, torch.Tensor], ratios: Mapping[str, float],
                mode: str, max_keep: float | None = None,
                caps: Mapping[str, int] | None = None) -> dict[str, list[int]]:
    caps = caps or {}
    removals: dict[str, list[int]] = {}
    whole_kv = "kv_heads" in ratios
    ratio = ratios["kv_heads" if whole_kv else "heads"]

    # T5: heads shared across the layers of a stack are scored and removed together.
    shared: dict[str, list[Unit]] = {}
    for u in units:
        if u.site.shared_heads_key:
            shared.setdefault(u.site.shared_heads_key, []).append(u)
    for members in shared.values():
        total = sum(scores[u.key] for u in members)
        idxs = _lowest(total, _n_remove(members[0].size, ratio))
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
            counts = _global_counts(kv_units, kv_scores, ratio, {u.key: 1 for u in kv_units},
                                    {u.key: _forced(u.size, _cap(u.size, ratio, max_keep, caps.get(cap_key)))
                                     for u in kv_units})
        else:
            counts = {u.key: _n_remove(u.size, ratio) for u in kv_units}
        for u in free:
            n_kv, per = groups_of(u)
            dead_kv = _lowest(kv_scores[u.key], counts[u.key])
            removals[u.key] = [g * per + j for g in dead_kv for j in range(per)]
        return removals

    # query heads: an equal number from every kv group, so heads // kv_heads stays an integer
    if mode == "global":
        # the cap counts whole rows (one head per kv group), so the equal-per-group rounding below keeps it
        counts = _global_counts(free, scores, ratio, {u.key: groups_of(u)[0] for u in free},
                                {u.key: _forced(u.size, _cap(u.size, ratio, max_keep, caps.get("heads")),
                                                per=groups_of(u)[0]) for u in free})
    else:
        counts = {u.key: _n_remove(u.size, ratio, min_keep=groups_of(u)[0]) for u in free}
    for u in free:
        n_kv, per = groups_of(u)
        per_group = min(per - 1, int(math.floor(counts[u.key] / n_kv + 0.5)))
        grouped = scores[u.key].view(n_kv, per)
        removals[u.key] = sorted(g * per + j for g in range(n_kv) for j in _lowest(grouped[g], per_group))
    return removals


def achieved_ratios(units: list[Unit], removals: Mapping[str, list[int]],
                    ratios: Mapping[str, float]) -> dict[str, float]:
    """The fraction of each requested structure that ``removals`` takes away (whole units, so it may differ
    from ``ratios``): FFN neurons, query heads, kv heads (whole kv groups) or blocks, over the model."""
    achieved = {}
    for structure in ratios:
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


def _nothing_removed(structure: str, ratio: float, units: list[Unit], round_to: int) -> NothingToPruneError:
    kind = "heads" if structure == "kv_heads" else structure
    sizes = sorted({u.size for u in units if u.structure == kind})
    what = {
        "ffn": f"FFN widths {sizes}" + (f", kept a multiple of round_to={round_to}" if round_to > 1 else ""),
        "heads": f"attention blocks with {sizes} heads; every block keeps at least one head per kv group",
        "kv_heads": "attention blocks whose kv heads cannot lose one and keep at least one",
        "layers": f"stacks of {sizes} removable layers",
    }[structure]
    hint = " or lower round_to" if structure == "ffn" and round_to > 1 else ""
    return NothingToPruneError(f"{structure}: ratio {ratio:g} removes nothing from this model ({what}); raise the "
                               f"ratio{hint}, or leave {structure} out")


# -- removing -----------------------------------------------------------------------------------------
def _channels(heads: list[int], head_dim: int) -> list[int]:
    return [h * head_dim + d for h in heads for d in range(head_dim)]


def _prune_group(dg: tp.DependencyGraph, root: nn.Module, idxs: list[int], expected: set[nn.Module],
                 what: str) -> None:
    group = dg.get_pruning_group(root, tp.prune_linear_out_channels, idxs=idxs)
    touched = {dep.target.module for dep, _ in group if isinstance(dep.target.module, (nn.Linear, nn.Embedding))}
    if touched != expected:
        # The graph found a coupling we did not expect: refuse rather than prune something silently.
        raise CompressError(f"dependency graph for {what} couples {len(touched)} layers, expected "
                            f"{len(expected)}; this architecture variant is not supported")
    group.prune()


def _prune_out(module: nn.Module, idxs: list[int]) -> None:
    # adapter layers (e.g. Pruning-Adapter's) prune their base layer and their own matrices together
    if hasattr(module, "prune_output_channels"):
        module.prune_output_channels(idxs)
    else:
        tp.prune_linear_out_channels(module, idxs)


def _prune_in(module: nn.Module, idxs: list[int]) -> None:
    if hasattr(module, "prune_input_channels"):
        module.prune_input_channels(idxs)
    else:
        tp.prune_linear_in_channels(module, idxs)


def _prune_heads_explicitly(site: AttentionSite, dead_q: list[int]) -> None:
    n_kv, per = site.num_kv_heads, site.num_heads // site.num_kv_heads
    counts = [sum(1 for h in dead_q if h // per == g) for g in range(n_kv)]
    dead_kv = [g for g in range(n_kv) if counts[g] == per]
    if len(set(counts)) > 1 and not set(counts) <= {0, per}:
        # heads // kv_heads must stay an integer: equal removals per group, or whole groups only
        raise CompressError(f"{site.name}: remove an equal number of query heads from every kv group, "
                            "or whole kv groups (structure 'kv_heads')")
    hd = site.head_dim
    q_channels = _channels(dead_q, hd)
    _prune_out(site.q, q_channels)
    _prune_in(site.o, q_channels)
    if dead_kv:
        kv_channels = _channels(dead_kv, hd)
        _prune_out(site.k, kv_channels)
        _prune_out(site.v, kv_channels)
    if site.relative_bias is not None:
        tp.prune_embedding_out_channels(site.relative_bias, dead_q)


def _has_adapter_layers(units: list[Unit]) -> bool:
    return any(hasattr(m, "prune_output_channels") for u in units if u.structure == "ffn" for m in u.site.inputs) or \
        any(hasattr(u.site.q, "prune_output_channels") for u in units if u.structure == "heads")


def apply_removals(model: nn.Module, adapter: ArchAdapter, units: list[Unit],
                   removals: Mapping[str, list[int]]) -> None:
    """Physically remove the planned channels, heads and blocks, then rewrite config and attributes.

    Plain models go through torch-pruning's dependency graph, checked against the couplings each site
    declares. Models wrapped with adapter layers prune each site's declared layers directly, so that the
    adapter matrices shrink with their base layers.
    """
    # torch-pruning replaces pruned parameters with new ones that require grad: keep frozen ones frozen
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    channel_units = [u for u in units if u.structure in ("ffn", "heads") and removals.get(u.key)]
    wrapped = _has_adapter_layers(channel_units)
    use_graph = not wrapped and any(u.structure == "ffn" or not _explicit_heads(adapter) for u in channel_units)
    dg = build_dependency_graph(model) if use_graph else None
    for u in channel_units:
        idxs, site = removals[u.key], u.site
        if u.structure == "ffn" and dg is not None:
            _prune_group(dg, site.inputs[0], idxs, {*site.inputs, site.output}, u.key)
        elif u.structure == "ffn":
            for lin in site.inputs:
                _prune_out(lin, idxs)
            _prune_in(site.output, idxs)
        elif dg is None or _explicit_heads(adapter):
            _prune_heads_explicitly(site, idxs)
        else:
            _prune_group(dg, site.q, _channels(idxs, site.head_dim), {site.q, site.k, site.v, site.o}, u.key)
    for name, param in model.named_parameters():
        param.requires_grad_(requires_grad.get(name, param.requires_grad))
    adapter.refresh()
    for u in units:
        if u.structure == "layers" and removals.get(u.key):
            adapter.remove_blocks(u.site, [i for i in range(u.size) if i not in removals[u.key]])
    adapter.refresh()


def _explicit_heads(adapter: ArchAdapter) -> bool:
    # The graph maps channel indices one-to-one across q/k/v/o. That is wrong for GQA (fewer kv
    # channels) and for T5's relative position bias (one column per head, shared by the whole stack).
    return adapter.family in ("llama", "t5")


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


# -- public entry point ---------------------------------------------------------------------------------
def score_units(model: nn.Module, units: list[Unit], importance: Importance,
                batches: list[dict] | None, progress: bool = False) -> dict[str, torch.Tensor]:
    """Scores for every unit; runs calibration once when the criterion needs it."""
    stats: GateStats | None = None
    if importance.needs_calibration:
        if not batches:
            raise CalibrationError(
                f"importance {type(importance).__name__} needs calibration data: pass `data=` (a "
                "datasets.Dataset with input_ids/labels, or an iterable of model-input dicts), or use "
                "importance='magnitude' or 'random'")
        stats = collect_gate_stats(model, units, batches, progress=progress)
    return {u.key: importance(u, stats).detach().float().cpu() for u in units}


def prune_model(
    model: nn.Module,
    ratio: float | Mapping[str, float] = 0.5,
    structures: Iterable[str] | str | None = ("ffn",),
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
) -> PruneReport:
    """Structurally prune ``model`` in place and rewrite its config.

    Args:
        model: a supported transformers model (``compress.supported_model_types()``).
        ratio: fraction of each structure to remove, in (0, 1); a float for all ``structures`` or a dict
            ``{"ffn": 0.5, "heads": 0.25}``.
        structures: any of ``ffn`` (FFN neurons), ``heads`` (query heads; with grouped-query attention an
            equal number per kv group), ``kv_heads`` (whole kv heads with their query heads), ``layers``.
        importance: ``taylor`` (default), ``fisher``, ``magnitude``/``l2``, ``l1``, ``random``, or an
            :class:`~compress.pruning.importance.Importance` instance.
        data: calibration data for ``taylor``/``fisher``: a tokenized ``datasets.Dataset`` or any iterable of
            model-input dicts (tensors). Batches need ``labels`` unless the model is a causal LM.
        mode: ``uniform`` keeps one width per layer so plain transformers reloads the result; ``global``
            ranks channels across layers (widths differ per layer; reloading needs ``import compress``).
        num_batches, batch_size: how much calibration data to use.
        round_to: keep FFN widths a multiple of this (e.g. 8 for faster kernels).
        tokenizer: pads a tokenized Dataset's rows into batches.
        progress: show a progress bar while scoring.
        normalize: ``global`` mode: ``"mean"``/``"l2"`` scale each layer's scores before ranking across layers
            (:func:`normalize_scores`); ``"none"`` ranks raw scores.
        compensate_bias: add the mean contribution of removed FFN neurons/heads, measured on ``data``, to the
            bias of the projection they fed (:mod:`compress.pruning.compensate`); needs ``data``. Projections
            without a bias (Llama, Qwen2, T5) are left as they are.
        max_keep: ``global`` mode: the largest fraction of its FFN neurons and of its heads any one layer
            keeps (e.g. ``0.6``; at least ``1 - ratio``). Global ranking can leave a layer nearly whole; with
            activation checkpointing the training peak is one layer's recomputation, so the widest layer
            sets it. Per layer the cap is rounded up to whole channels (and, with grouped-query attention,
            to whole rows of one head per kv group) so the total removed is always what ``ratio`` asks.
            ``None`` (default): no cap.

    Returns:
        A :class:`PruneReport` with the ratios asked for and those achieved (whole units). The model is
        modified in place; in ``global`` mode with unequal widths it becomes its compact subclass
        (``CompressedBertForSequenceClassification`` etc.). Its and every submodule's train/eval mode is as
        before the call.

    Raises:
        NothingToPruneError: a requested structure would lose nothing (e.g. ``round_to`` larger than the FFN
            width, heads of a one-head model); raised before the model changes.
    """
    with preserve_training_modes(model):
        return _prune_model(model, ratio, structures, importance, data, mode, num_batches, batch_size, round_to,
                            tokenizer, progress, normalize, compensate_bias, max_keep)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CompressError(f"{name} must be a positive integer, got {value!r}")
    return value


def _prune_model(model, ratio, structures, importance, data, mode, num_batches, batch_size, round_to, tokenizer,
                 progress, normalize, compensate_bias, max_keep) -> PruneReport:
    from compress.pruning.compact import make_compact

    for name, value in (("round_to", round_to), ("num_batches", num_batches), ("batch_size", batch_size)):
        _positive_int(name, value)
    if normalize not in NORMALIZATIONS:
        raise CompressError(f"normalize={normalize!r}; choose one of {', '.join(NORMALIZATIONS)}")
    adapter = get_adapter(model)
    ratios = normalize_ratios(ratio, structures)
    check_support(adapter, ratios, mode)
    check_max_keep(max_keep, ratios, mode)
    criterion = get_importance(importance)
    batches = None
    if (criterion.needs_calibration or compensate_bias) and data is None:
        needs = f"importance={importance!r} scores structures with the task loss" if criterion.needs_calibration \
            else "compensate_bias=True measures mean activations"
        raise CalibrationError(f"{needs} and needs `data`; pass calibration data or use "
                               "importance='magnitude'/'random' without compensate_bias")
    if data is not None:
        from compress.data import calibration_batches

        batches = calibration_batches(data, batch_size=batch_size, num_batches=num_batches, tokenizer=tokenizer)

    widths_before = adapter.widths()
    params_before = count_params(model)
    units = units_for(adapter, ratios)
    with record_input_means(model, units) if compensate_bias else contextlib.nullcontext() as recorder:
        scores = score_units(model, units, criterion, batches if criterion.needs_calibration else None,
                             progress=progress)
        if recorder is not None and not criterion.needs_calibration:
            forward_passes(model, batches)
    removals = plan_removals(adapter, units, scores, ratios, mode, round_to=round_to, normalize=normalize,
                             max_keep=max_keep)
    achieved = achieved_ratios(units, removals, ratios)
    for structure, value in achieved.items():
        if value == 0.0:  # checked before anything changes: the model is left as it was
            raise _nothing_removed(structure, ratios[structure], units, round_to)
    if recorder is not None:
        shifts, _ = bias_shifts(units, removals, recorder.means())
        add_to_bias(units, shifts)
    apply_removals(model, adapter, units, removals)
    adapter = get_adapter(model)
    if mode == "uniform" and not adapter.fits_standard_config():
        raise CompressError("internal: uniform pruning produced unequal layer widths")  # pragma: no cover
    if not adapter.fits_standard_config():
        make_compact(model)
    report = PruneReport(
        model_type=model.config.model_type,
        mode=mode,
        importance=importance if isinstance(importance, str) else type(importance).__name__,
        ratios=dict(ratios),
        params_before=params_before,
        params_after=count_params(model),
        widths_before=widths_before,
        widths_after=adapter.widths(),
        removed={k: v for k, v in removals.items() if v},
        achieved_ratios=achieved,
    )
    logger.info("pruned %s: %d -> %d params", report.model_type, params_before, report.params_after)
    return report
