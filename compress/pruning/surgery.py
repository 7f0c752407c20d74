"""Removing planned channels, heads and blocks from a model, and rewriting what depends on their shapes.

Removal goes through torch-pruning's dependency graph, which finds every layer coupled to the pruned
channels (FFN in/out projections, q/k/v/o of an attention block). Attention heads of grouped-query
(Llama/Qwen2) and T5 models are the exception: the graph couples query and key/value channels one-to-one and
misplaces T5's per-head position bias, so those are sliced with torch-pruning's pruning functions by explicit
head groups. Layers that wrap a base layer with adapters (:class:`PrunableLayer`) prune themselves; modules that
PEFT keeps in several copies (``modules_to_save``: the original and a trained copy per adapter) are pruned in
every copy.
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch_pruning as tp
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn

from compress.errors import CompressError
from compress.pruning.arch import ArchSpec, AttentionSite, HiddenSite, Widths
from compress.pruning.importance import Unit


@runtime_checkable
class PrunableLayer(Protocol):
    """What a layer wrapping a base ``nn.Linear`` (e.g. a PEFT adapter layer) offers the pruning engine.

    Such a layer removes channels from its base layer and from every tensor of its own that shares the
    dimension (adapter matrices, bias buffers), so that the wrapped model stays consistent.
    """

    def prune_output_channels(self, removed: list[int]) -> None:
        """Remove these output channels (rows of the base weight) and their counterparts."""

    def prune_input_channels(self, removed: list[int]) -> None:
        """Remove these input channels (columns of the base weight) and their counterparts."""


#: parameters replaced by pruning: ``id(old) -> (old, new, dim, kept indices)``, what
#: :func:`compress.pruning.optim.remap_optimizer` follows (holding ``old`` keeps its id from being reused)
Replaced = dict[int, tuple[nn.Parameter, nn.Parameter, int, torch.Tensor]]


def _saved_copies(module: nn.Module) -> list[nn.Module] | None:
    """For PEFT's ``modules_to_save`` wrapper: the original module and every adapter's trained copy, else ``None``."""
    if not isinstance(module, ModulesToSaveWrapper):
        return None
    return [module.original_module, *module.modules_to_save.values()]


def module_copies(model: nn.Module) -> dict[nn.Module, list[nn.Module]]:
    """Every module PEFT keeps in several copies (a ``modules_to_save`` wrapper, or a module inside its original or
    copies) mapped to all of them. Forward runs one copy, and which one depends on the active adapter, so pruning
    must shrink them all."""
    out: dict[nn.Module, list[nn.Module]] = {}
    for module in model.modules():
        holders = _saved_copies(module)
        if holders is None:
            continue
        out[module] = holders
        for name, _ in holders[0].named_modules():
            # the wrapper resolves attribute paths (e.g. classifier.dense) to the active copy's submodule
            same = [holder.get_submodule(name) for holder in holders]
            for member in same:
                out[member] = same
    return out


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
        # T5's sequence classifier reads the decoder's state at the input's last <eos>, so the decoder inputs have
        # the input's length and the input ends in <eos>
        eos = getattr(model.config, "eos_token_id", None)
        if isinstance(eos, int):
            ids[:, -1] = eos
        inputs["decoder_input_ids"] = ids.clone()
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
            # RMS norms' weights are "unwrapped parameters" to torch-pruning; prune_hidden slices them itself
            warnings.filterwarnings("ignore", message=".*unwrapped.*")
            warnings.filterwarnings("ignore", message=".*last non-singleton.*")
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=example_inputs(model), output_transform=first_tensor
            )
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _channels(heads: list[int], head_dim: int) -> list[int]:
    return [h * head_dim + d for h in heads for d in range(head_dim)]


def _group_layers(dg: tp.DependencyGraph, root: nn.Module, idxs: list[int]) -> set[nn.Module]:
    group = dg.get_pruning_group(root, tp.prune_linear_out_channels, idxs=idxs)
    return {dep.target.module for dep, _ in group if isinstance(dep.target.module, (nn.Linear, nn.Embedding))}


def _check_group(dg: tp.DependencyGraph, root: nn.Module, idxs: list[int], expected: set[nn.Module],
                 what: str) -> None:
    touched = _group_layers(dg, root, idxs)
    if touched != expected:
        # The graph found a coupling we did not expect: refuse rather than prune something silently.
        raise CompressError(f"dependency graph for {what} couples {len(touched)} layers, expected "
                            f"{len(expected)}; this architecture variant is not supported")


def _prune_group(dg: tp.DependencyGraph, root: nn.Module, idxs: list[int]) -> None:
    dg.get_pruning_group(root, tp.prune_linear_out_channels, idxs=idxs).prune()


def _prune_out(module: nn.Module, idxs: list[int]) -> None:
    if isinstance(module, PrunableLayer):
        module.prune_output_channels(idxs)
    else:
        tp.prune_linear_out_channels(module, idxs)


def _prune_in(module: nn.Module, idxs: list[int]) -> None:
    if isinstance(module, PrunableLayer):
        module.prune_input_channels(idxs)
    else:
        tp.prune_linear_in_channels(module, idxs)


def _dead_kv_groups(site: AttentionSite, dead_q: list[int]) -> list[int]:
    """The kv heads that lose every query head of their group; raises unless the removal keeps
    heads // kv_heads an integer (equal removals per group, or whole groups only)."""
    n_kv, per = site.num_kv_heads, site.num_heads // site.num_kv_heads
    counts = [sum(1 for h in dead_q if h // per == g) for g in range(n_kv)]
    if len(set(counts)) > 1 and not set(counts) <= {0, per}:
        raise CompressError(f"{site.name}: remove an equal number of query heads from every kv group, "
                            "or whole kv groups (structure 'kv_heads')")
    return [g for g in range(n_kv) if counts[g] == per]


def _prune_heads_explicitly(site: AttentionSite, dead_q: list[int]) -> None:
    dead_kv = _dead_kv_groups(site, dead_q)
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


def remove_unit_channels(unit: Unit, removed: list[int]) -> None:
    """Remove ``removed`` neurons (``ffn``) or query heads (``heads``, with their kv heads when a whole kv group
    goes) of one unit from its declared layers directly, without the dependency graph (the caller has checked the
    removal with :func:`check_removals`, and refreshes the architecture afterwards)."""
    site = unit.site
    if unit.structure == "ffn":
        for lin in site.inputs:
            _prune_out(lin, removed)
        _prune_in(site.output, removed)
    elif unit.structure == "heads":
        _prune_heads_explicitly(site, removed)
    else:
        raise CompressError(f"internal: {unit.structure} units have no channels to remove")  # pragma: no cover


def is_wrapped(module: nn.Module) -> bool:
    """Whether a layer wraps its base layer with adapters (a peft tuner layer, or any :class:`PrunableLayer`)."""
    return isinstance(module, (PrunableLayer, BaseTunerLayer))


def declared_layers(unit: Unit) -> list[nn.Module]:
    """Every layer a unit's channels live in, as its site declares them (none for whole blocks)."""
    site = unit.site
    if unit.structure == "ffn":
        return [*site.inputs, site.output]
    if unit.structure == "heads":
        return [site.q, site.k, site.v, site.o]
    return site.modules() if unit.structure == "hidden" else []


def check_hidden_group(model: nn.Module, site: HiddenSite, dg: tp.DependencyGraph) -> None:
    """Refuse to prune the hidden size when torch-pruning's dependency graph, traced from the embeddings,
    couples other layers to the stream than the architecture spec declares (e.g. a task head it does not know)."""
    names = {module: name for name, module in model.named_modules()}
    owners: dict[int, nn.Module] = {}
    for module in site.modules():
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), module)
    declared = set(site.modules())
    found: set[nn.Module] = set()
    unknown: list[str] = []
    for root in site.roots:
        if root not in dg.module2node:
            raise CompressError(f"hidden: {names.get(root, root)} is not used by the model's forward pass; this "
                                "architecture variant is not supported")
        for dep, _ in dg.get_pruning_group(root, tp.prune_embedding_out_channels, idxs=[0]):
            target = dep.target.module
            if isinstance(target, nn.Parameter):
                owner = owners.get(id(target))
                if owner is None:
                    unknown.append(next((n for n, p in model.named_parameters() if p is target), "a parameter"))
                else:
                    found.add(owner)
            elif isinstance(target, (nn.Linear, nn.Embedding, nn.LayerNorm)):
                if target in declared:
                    found.add(target)
                else:
                    unknown.append(names.get(target, type(target).__name__))
    shared = {id(p) for m in found for p in m.parameters(recurse=False)}
    missing = [names.get(m, type(m).__name__) for m in declared - found
               if not any(id(p) in shared for p in m.parameters(recurse=False))]
    if unknown or missing:
        problem = f"also couples {sorted(unknown)[:3]}" if unknown else f"does not reach {sorted(missing)[:3]}"
        raise CompressError(f"hidden: the dependency graph of {type(model).__name__} {problem}, which the "
                            f"{type(model).__name__} spec does not declare; pruning the hidden size of this model or "
                            "task head is not supported")


def prune_hidden(arch: ArchSpec, removed: list[int]) -> Replaced:
    """Remove hidden channels ``removed`` from every tensor on the residual stream and rescale RMS-style norms
    (weight by sqrt(n / kept), epsilon by n / kept).

    Tied tensors (input and output embeddings, T5's shared embedding) are sliced once and stay shared; this is
    done here rather than with torch-pruning's per-module functions, which would give each owner a copy.
    :class:`PrunableLayer` readers and writers prune themselves (and record what they replaced); modules PEFT
    keeps in several copies (:func:`module_copies`) are sliced in every copy.

    Returns:
        The parameters sliced here (not those of :class:`PrunableLayer` modules), so that an optimizer holding
        trainable ones (e.g. PEFT's trained copies of norms or of a classifier) can follow.
    """
    site = arch.hidden_site()
    width = site.width
    keep = torch.tensor(sorted(set(range(width)) - set(removed)), dtype=torch.long)
    copies = module_copies(arch.model)
    sliced: dict[int, nn.Parameter] = {}
    replaced: Replaced = {}

    def every_copy(modules: list[nn.Module]) -> list[nn.Module]:
        return list(dict.fromkeys(copy for module in modules for copy in copies.get(module, [module])))

    def cut(module: nn.Module, name: str, dim: int) -> None:
        old = getattr(module, name, None)
        if old is None:
            return
        new = sliced.get(id(old))
        if new is None:
            new = nn.Parameter(old.data.index_select(dim, keep.to(old.device)).clone(), requires_grad=old.requires_grad)
            sliced[id(old)] = new
            replaced[id(old)] = (old, new, dim, keep)
        setattr(module, name, new)

    for embedding in every_copy(site.embeddings):
        cut(embedding, "weight", 1)
        embedding.embedding_dim = len(keep)
    for reader in every_copy(site.readers):
        if isinstance(reader, PrunableLayer):
            reader.prune_input_channels(removed)
        else:
            cut(reader, "weight", 1)
            reader.in_features = len(keep)
    for writer in every_copy(site.writers):
        if isinstance(writer, PrunableLayer):
            writer.prune_output_channels(removed)
        else:
            cut(writer, "weight", 0)
            cut(writer, "bias", 0)
            writer.out_features = len(keep)
    rescaled: set[int] = set()
    for wrapped, rescale in site.norms:
        for norm in every_copy([wrapped]):
            cut(norm, "weight", 0)
            cut(norm, "bias", 0)
            if isinstance(norm, nn.LayerNorm):
                norm.normalized_shape = (len(keep),)
                continue
            # RMS-style norm: the mean of squares now runs over fewer channels. Scaling its epsilon by n / kept and
            # (where the output is not rescaled downstream) its weight by sqrt(n / kept) keeps the output of the
            # channels that stay exactly as it was whenever the removed channels carried nothing.
            if hasattr(norm, "variance_epsilon"):
                norm.variance_epsilon = norm.variance_epsilon * width / len(keep)
            if rescale and id(norm.weight) not in rescaled:
                rescaled.add(id(norm.weight))
                with torch.no_grad():
                    norm.weight.mul_(math.sqrt(width / len(keep)))
    arch.refresh()
    return replaced


@dataclass
class CheckedRemovals:
    """Removals that passed every check of :func:`check_removals`; :func:`apply_checked` carries them out."""

    model: nn.Module
    arch: ArchSpec
    units: list[Unit]
    removals: Mapping[str, list[int]]
    #: torch-pruning's dependency graph of the model when plain layers are pruned through it, else ``None``
    graph: tp.DependencyGraph | None


def widths_after(arch: ArchSpec, units: list[Unit], removals: Mapping[str, list[int]]) -> Widths:
    """The :class:`~compress.pruning.arch.Widths` the model will have once ``removals`` are applied (the sites of
    removed blocks left out; a kv head goes with the last query head of its group)."""
    removed_blocks = {(u.site.name, i) for u in units if u.structure == "layers" for i in removals.get(u.key, [])}
    by_key = {u.key: u for u in units}

    def removed(site, structure: str) -> list[int]:
        unit = by_key.get(site.name)
        return removals.get(site.name, []) if unit is not None and unit.structure == structure else []

    ffn = [s.width - len(removed(s, "ffn")) for s in arch.ffn_sites() if (s.stack, s.layer) not in removed_blocks]
    sites = arch.attention_sites()
    heads, kv_heads = [], []
    for site in sites:
        if (site.stack, site.layer) in removed_blocks:
            continue
        dead = set(removed(site, "heads"))
        group = site.num_heads // site.num_kv_heads
        heads.append(site.num_heads - len(dead))
        kv_heads.append(site.num_kv_heads - sum(set(range(g * group, (g + 1) * group)) <= dead
                                                for g in range(site.num_kv_heads)))
    kept_blocks = {s.name: [i for i in range(len(s.blocks)) if (s.name, i) not in removed_blocks]
                   for s in arch.stacks()}
    layers = [len(kept) for kept in kept_blocks.values()]
    hidden = arch.hidden_width() - sum(len(removals.get(u.key, [])) for u in units if u.structure == "hidden")
    return Widths(ffn=ffn, heads=heads, kv_heads=kv_heads, layers=layers, hidden=hidden,
                  head_dim=sites[0].head_dim if sites else None,
                  kept_blocks=kept_blocks if removed_blocks else None)


def check_removals(model: nn.Module, arch: ArchSpec, units: list[Unit],
                   removals: Mapping[str, list[int]]) -> CheckedRemovals:
    """Run every check the removal needs, changing nothing: the couplings torch-pruning's dependency graph finds
    against those each site declares (hidden size included), query-head removals per kv group, and adapter
    wrappers that cannot lose channels. Whether the family's config can express the result is the caller's to
    check (:meth:`~compress.pruning.arch.ArchSpec.check_config_expresses` on :func:`widths_after`): a step of a
    pruning schedule may pass through widths that only its last step must make expressible.

    Callers that change tensors before the removal (bias compensation) call this first, so that a refused removal
    leaves the model as it was; then :func:`apply_checked`.

    Raises:
        CompressError: the removal cannot be carried out on this model (the message says why).
    """
    channel_units = [u for u in units if u.structure in ("ffn", "heads") and removals.get(u.key)]
    hidden_units = [u for u in units if u.structure == "hidden" and removals.get(u.key)]
    copies = module_copies(model) if hidden_units else {}
    declared = [m for u in (*channel_units, *hidden_units) for m in declared_layers(u)]
    foreign = [m for m in declared if is_wrapped(m) and not isinstance(m, PrunableLayer)]
    if foreign:
        layer = foreign[0]
        name = next((n for n, m in model.named_modules() if m is layer), type(layer).__name__)
        raise CompressError(f"{name} is a {type(layer).__module__}.{type(layer).__name__}, whose adapters cannot "
                            "lose channels: prune the base model before adding these adapters, or use "
                            "Pruning-Adapter")
    # Any wrapped layer (or, on the residual stream, a module PEFT keeps in several copies) sends every unit to
    # direct pruning of its declared layers: the graph would find the adapter matrices as extra couplings.
    wrapped = any(is_wrapped(m) for m in declared) or any(m in copies for u in hidden_units
                                                           for m in u.site.modules())
    use_graph = not wrapped and (bool(hidden_units) or any(u.structure == "ffn" or not arch.explicit_head_groups
                                                           for u in channel_units))
    dg = build_dependency_graph(model) if use_graph else None
    if dg is not None:
        for u in hidden_units:
            check_hidden_group(model, u.site, dg)
    for u in channel_units:
        idxs, site = removals[u.key], u.site
        if u.structure == "ffn" and dg is not None:
            _check_group(dg, site.inputs[0], idxs, {*site.inputs, site.output}, u.key)
        elif u.structure == "ffn":
            continue
        elif dg is None or arch.explicit_head_groups:
            _dead_kv_groups(site, idxs)
        else:
            _check_group(dg, site.q, _channels(idxs, site.head_dim), {site.q, site.k, site.v, site.o}, u.key)
    return CheckedRemovals(model, arch, units, removals, dg)


def apply_checked(checked: CheckedRemovals) -> Replaced:
    """Physically remove the planned channels, heads, blocks and hidden channels that :func:`check_removals`
    checked, then rewrite config and attributes.

    Plain models go through torch-pruning's dependency graph. Models wrapped with adapter layers (or with PEFT's
    ``modules_to_save`` copies on the residual stream) prune each site's declared layers directly, so that the
    adapter matrices and copies shrink with them.

    Returns:
        The parameters replaced outside :class:`PrunableLayer` modules by hidden pruning (see
        :func:`prune_hidden`); adapter layers record their own.
    """
    model, arch, units, removals, dg = checked.model, checked.arch, checked.units, checked.removals, checked.graph
    # torch-pruning replaces pruned parameters with new ones that require grad: keep frozen ones frozen
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    for u in units:
        idxs, site = removals.get(u.key), u.site
        if u.structure not in ("ffn", "heads") or not idxs:
            continue
        if u.structure == "ffn" and dg is not None:
            _prune_group(dg, site.inputs[0], idxs)
        elif u.structure == "ffn":
            for lin in site.inputs:
                _prune_out(lin, idxs)
            _prune_in(site.output, idxs)
        elif dg is None or arch.explicit_head_groups:
            _prune_heads_explicitly(site, idxs)
        else:
            _prune_group(dg, site.q, _channels(idxs, site.head_dim))
    _restore_requires_grad(model, requires_grad)
    arch.refresh()
    for u in units:
        if u.structure == "layers" and removals.get(u.key):
            arch.remove_blocks(u.site, [i for i in range(u.size) if i not in removals[u.key]])
    replaced: Replaced = {}
    for u in units:
        if u.structure != "hidden" or not removals.get(u.key):
            continue
        requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}  # blocks renumbered
        replaced.update(prune_hidden(arch, removals[u.key]))
        _restore_requires_grad(model, requires_grad)
    arch.refresh()
    return replaced


def apply_removals(model: nn.Module, arch: ArchSpec, units: list[Unit],
                   removals: Mapping[str, list[int]]) -> Replaced:
    """:func:`check_removals`, then :func:`apply_checked`: nothing changes unless every check passes."""
    return apply_checked(check_removals(model, arch, units, removals))


def _restore_requires_grad(model: nn.Module, flags: Mapping[str, bool]) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(flags.get(name, param.requires_grad))
