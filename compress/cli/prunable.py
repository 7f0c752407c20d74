"""What ``compress prune`` can remove from a given model folder, per mode: ``info`` lists it and ``prune`` refuses
the rest before loading weights, so that the two always agree.

A family's tables (:class:`~compress.pruning.arch.ArchSpec`: ``uniform_structures``, ``supported_structures``)
say what its standard models allow. Two kinds of saved model allow less:

- a multi-exit model (``model_type`` ``multi_exit``, from merging a multi-exit or Pruning-Adapter-with-exits
  adapter): its backbone is pruned, scored on every exit's loss, but its exits sit after given blocks and read the
  hidden size, so blocks and hidden channels stay;
- a model whose layers already differ in width (a compact model from ``--mode global``): uniform mode cannot make
  them equal again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from compress.pruning.spec import MODES

from .errors import UsageError

#: a multi-exit model's model_type (``multi_exit_<family>`` in folders of the earlier format)
MULTI_EXIT = "multi_exit"

_MULTI_EXIT_LIMITS = {
    "layers": "its exits sit after given blocks (exit_layers), which removing blocks would move or drop",
    "hidden": "its exit heads read the hidden size",
}


@dataclass(frozen=True)
class Prunable:
    """The structures ``compress prune`` can remove from one model, per mode, and why it allows less than its family
    (``reasons``: a structure or a mode -> one clause)."""

    family: str
    modes: dict[str, tuple[str, ...]]
    family_modes: dict[str, tuple[str, ...]]
    kind: str = "model"
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def limited(self) -> bool:
        """Whether this model allows less than a standard model of its family."""
        return self.modes != self.family_modes

    def available(self) -> str:
        """What can be pruned, as command-line flags."""
        parts = [f"--mode {mode} --structures {','.join(found)}" for mode, found in self.modes.items() if found]
        return " or ".join(parts) if parts else "nothing"


def is_multi_exit(model_type: str) -> bool:
    return model_type.startswith(MULTI_EXIT)


def family_type(config: dict) -> str:
    """The ``model_type`` whose family tables apply: a multi-exit model's backbone's (``compressed_bert``, ...)."""
    model_type = str(config.get("model_type", ""))
    backbone = config.get("backbone")
    if model_type == MULTI_EXIT and isinstance(backbone, dict):
        return str(backbone.get("model_type", ""))
    return model_type.removeprefix(MULTI_EXIT + "_")  # the earlier format: multi_exit_<family>


def pruned_module(model):
    """The module the engine prunes: a multi-exit model's backbone (the exit heads stay), else the model."""
    backbone = getattr(model, "backbone", None)
    return backbone if is_multi_exit(str(getattr(model.config, "model_type", ""))) and backbone is not None else model


def prunable(spec_cls, model_type: str, per_layer_widths: bool = False) -> Prunable:
    """What ``compress prune`` can remove from a model of ``model_type`` (family tables ``spec_cls``); pass
    ``per_layer_widths`` when its layers differ in width (``not arch_spec(model).fits_standard_config()``)."""
    family = {"uniform": tuple(spec_cls.uniform_structures), "global": tuple(spec_cls.supported_structures)}
    modes = dict(family)
    reasons: dict[str, str] = {}
    kind = "model"
    if per_layer_widths:
        kind = "model with per-layer widths"
        modes["uniform"] = ()
        reasons["uniform"] = "its layers already differ in width (a compact model, e.g. from --mode global), and " \
                             "uniform mode cannot make them equal again"
    if is_multi_exit(model_type):
        kind = "multi-exit " + kind
        modes = {mode: tuple(s for s in found if s not in _MULTI_EXIT_LIMITS) for mode, found in modes.items()}
        reasons.update(_MULTI_EXIT_LIMITS)
    return Prunable(family=spec_cls.__name__.removesuffix("Spec").lower(), modes=modes, family_modes=family,
                    kind=kind, reasons=reasons)


def refuse_unavailable(allowed: Prunable, sparsity, mode: str, where: str) -> None:
    """Refuse, before any work, a request this model cannot serve though its family could, naming why and what it
    can do instead. Requests its family cannot serve are left to :func:`compress.pruning.engine.check_support`."""
    if not allowed.limited:
        return
    requested = [s for s in sparsity if any(s in found for found in allowed.family_modes.values())]
    instead = f"it can be pruned with {allowed.available()}" if allowed.available() != "nothing" else \
        "compress prune can remove nothing from it"
    if requested and not allowed.modes[mode]:
        raise UsageError(f"{where}: --mode {mode} cannot prune this {allowed.kind}: {allowed.reasons[mode]}; "
                         f"{instead}")
    for structure in requested:
        if structure in allowed.modes[mode]:
            continue
        if structure in allowed.reasons:
            why = allowed.reasons[structure]
        elif any(structure in found for found in allowed.modes.values()):
            why = f"this {allowed.kind} prunes it in --mode {'global' if mode == 'uniform' else 'uniform'} only"
        else:
            needed = "global" if mode == "uniform" else "uniform"
            why = f"{allowed.family} prunes it in --mode {needed} only, and {allowed.reasons[needed]}"
        raise UsageError(f"{where}: cannot prune {structure} from this {allowed.kind}: {why}; {instead}")


def describe(allowed: Prunable, uniform_only: tuple[str, ...] = ()) -> list[str]:
    """``compress info``'s lines on what can be pruned (``uniform_only``: structures that stay equal across layers
    even in global mode)."""
    same = f"; {', '.join(uniform_only)} stay equal across layers" if uniform_only else ""
    notes = {"uniform": ("loads with `import compress`, as any multi-exit model" if "multi-exit" in allowed.kind
                         else "result loads with plain transformers"),
             "global": f"per-layer widths need `import compress` to load{same}"}
    lines = ["prunable structures (compress prune --structures ...):"]
    for mode in MODES:
        found = allowed.modes[mode]
        label = f"  --mode {mode}:".ljust(18)
        if not found:
            lines.append(f"{label}none ({allowed.reasons.get(mode, 'not available for this model')})")
            continue
        extra = [s for s in found if s not in allowed.modes["uniform"]] if mode == "global" else []
        only = f"; {', '.join(extra)} only in global mode" if extra and allowed.modes["uniform"] else ""
        lines.append(f"{label}{', '.join(found)}  ({notes[mode]}){only}")
    refused = [s for s in allowed.reasons if s not in MODES]
    if refused:
        lines.append("  not prunable:   " + "; ".join(f"{s}: {allowed.reasons[s]}" for s in refused))
    return lines
