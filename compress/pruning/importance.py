"""Importance criteria behind one small interface: ``Importance.__call__(unit, stats) -> scores``.

A *unit* is one prunable structure instance (the FFN of one layer, the heads of one attention block,
the blocks of one stack) and the scores hold one value per channel/head/block; higher means keep.

Data-driven criteria (Taylor, Fisher) do not need weight gradients: every unit gets a gate of ones
multiplied into its output, the backbone's parameters are frozen, and only the gates receive gradients.
The gradient of the task loss with respect to a gate is the first-order estimate of what removing that
channel would cost, which keeps scoring as cheap in memory as an adapter's forward/backward.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.errors import CalibrationError, CompressError
from compress.pruning.arch import ArchSpec, AttentionSite, FFNSite, LayerStack
from compress.pruning.spec import STRUCTURES  # noqa: F401  (transitional: plugins/pruning_adapter imports it from here)

logger = logging.getLogger(__name__)


@dataclass
class Unit:
    """A prunable structure instance: ``structure`` in :data:`STRUCTURES`, scored per channel."""

    structure: str
    key: str
    size: int
    site: AttentionSite | FFNSite | LayerStack


@dataclass
class GateStats:
    """Per-unit accumulated gate gradients over calibration batches."""

    abs_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    sq_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    batches: int = 0


def units_for(arch: ArchSpec, structures: Iterable[str]) -> list[Unit]:
    """Enumerate the units of ``structures``. ``kv_heads`` is scored through its query heads."""
    units: list[Unit] = []
    wanted = set(structures)
    if "ffn" in wanted:
        units += [Unit("ffn", s.name, s.width, s) for s in arch.ffn_sites()]
    if wanted & {"heads", "kv_heads"}:
        units += [Unit("heads", s.name, s.num_heads, s) for s in arch.attention_sites()]
    if "layers" in wanted:
        units += [Unit("layers", s.name, len(s.blocks), s) for s in arch.stacks()]
    return units


# -- gates --------------------------------------------------------------------------------------------
def _ffn_gate_hook(gate: torch.Tensor):
    def hook(module, args):
        return (args[0] * gate.to(args[0].dtype),) + tuple(args[1:])

    return hook


def _head_gate_hook(gate: torch.Tensor, head_dim: int):
    def hook(module, args):
        x = args[0]
        shaped = x.view(*x.shape[:-1], -1, head_dim) * gate.to(x.dtype)[:, None]
        return (shaped.view_as(x),) + tuple(args[1:])

    return hook


def _layer_gate_hook(gate: torch.Tensor):
    # out' = in + g * (out - in): g=1 is the layer as is, g=0 removes it (residual stream passes through)
    def hook(module, args, kwargs, output):
        hidden_in = args[0] if args else kwargs["hidden_states"]
        hidden_out = output[0] if isinstance(output, tuple) else output
        gated = hidden_in + gate.to(hidden_out.dtype) * (hidden_out - hidden_in)
        return (gated,) + tuple(output[1:]) if isinstance(output, tuple) else gated

    return hook


@contextlib.contextmanager
def attach_gates(units: list[Unit]) -> Iterator[dict[str, torch.Tensor]]:
    """Attach gates of ones (requires_grad) to every unit; yields ``{unit.key: gate}``; removes hooks."""
    gates: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for unit in units:
            site = unit.site
            if unit.structure == "ffn":
                gate = torch.ones(unit.size, device=site.output.weight.device, requires_grad=True)
                handles.append(site.output.register_forward_pre_hook(_ffn_gate_hook(gate)))
            elif unit.structure == "heads":
                gate = torch.ones(unit.size, device=site.o.weight.device, requires_grad=True)
                handles.append(site.o.register_forward_pre_hook(_head_gate_hook(gate, site.head_dim)))
            else:
                device = next(site.blocks.parameters()).device
                gate = torch.ones(unit.size, device=device, requires_grad=True)
                for i, block in enumerate(site.blocks):
                    handles.append(block.register_forward_hook(_layer_gate_hook(gate[i]), with_kwargs=True))
            gates[unit.key] = gate
        yield gates
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Temporarily set ``requires_grad=False`` on every parameter, restoring the flags afterwards."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def task_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The model's own loss for ``batch``; causal LMs without labels use next-token prediction."""
    inputs = dict(batch)
    if "labels" not in inputs and "input_ids" in inputs and _is_causal_lm(model):
        inputs["labels"] = inputs["input_ids"]
    out = model(**inputs)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise CalibrationError(
            "the model returned no loss for a calibration batch: data-driven importance (taylor, fisher) "
            "needs batches with `labels` (or a causal LM, where input_ids serve as labels). Add labels "
            "to the data or use importance='magnitude'."
        )
    return loss


def _is_causal_lm(model: nn.Module) -> bool:
    return type(model).__name__.endswith("ForCausalLM")


def collect_gate_stats(model: nn.Module, units: list[Unit], batches: list[dict],
                       progress: bool = False) -> GateStats:
    """Run the calibration batches once, accumulating |dL/dg| and (dL/dg)^2 for every gate."""
    if not batches:
        raise CalibrationError("no calibration batches: pass `data` (a datasets.Dataset or an iterable of "
                               "model-input dicts) or use importance='magnitude' / 'random'.")
    stats = GateStats()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # dropout off: scores should reflect the model, not the noise
    try:
        with frozen(model), attach_gates(units) as gates:
            for batch in tqdm(batches, desc="scoring", disable=not progress, leave=False):
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                loss = task_loss(model, batch)
                grads = torch.autograd.grad(loss, list(gates.values()), allow_unused=True)
                for key, grad in zip(gates, grads):
                    g = torch.zeros_like(gates[key]) if grad is None else grad.detach().float()
                    stats.abs_sum[key] = stats.abs_sum.get(key, 0) + g.abs()
                    stats.sq_sum[key] = stats.sq_sum.get(key, 0) + g.pow(2)
                stats.batches += 1
    finally:
        model.train(was_training)
    return stats


# -- criteria -----------------------------------------------------------------------------------------
class Importance(ABC):
    """Scores every channel of a unit. Subclass and register with :func:`register_importance`."""

    #: whether scores need :class:`GateStats` from calibration batches
    needs_calibration: bool = False

    @abstractmethod
    def __call__(self, unit: Unit, stats: GateStats | None) -> torch.Tensor:
        """Return a 1-D float tensor of length ``unit.size``; higher means more important."""


class MagnitudeImportance(Importance):
    """L_p norm of the weights that belong to each channel/head/block (no data needed)."""

    # Not torch-pruning's MagnitudeImportance: it scores dependency-graph groups, and grouped-query heads, T5's
    # shared heads and whole layers are not graph groups here (see compress.pruning.surgery).

    def __init__(self, p: int = 2):
        self.p = p

    def _norm(self, rows: torch.Tensor, groups: int) -> torch.Tensor:
        return rows.detach().float().reshape(groups, -1).abs().pow(self.p).sum(1)

    def __call__(self, unit: Unit, stats: GateStats | None) -> torch.Tensor:
        site = unit.site
        n = unit.size
        if unit.structure == "ffn":
            score = self._norm(site.output.weight.t(), n)
            for lin in site.inputs:
                score = score + self._norm(lin.weight, n)
        elif unit.structure == "heads":
            score = self._norm(site.q.weight, n) + self._norm(site.o.weight.t().contiguous(), n)
            if not site.is_gqa:
                score = score + self._norm(site.k.weight, n) + self._norm(site.v.weight, n)
        else:
            score = torch.stack([
                sum(p.detach().float().abs().pow(self.p).sum() for p in block.parameters()) for block in site.blocks
            ])
        return score.pow(1.0 / self.p)


class TaylorImportance(Importance):
    """First-order Taylor: sum over calibration batches of |g * dL/dg| at g = 1.

    The absolute value is taken per batch (of the batch-mean gradient), not per example, so effects of
    opposite sign within one batch cancel (the same holds for ``fisher``, which squares that gradient);
    smaller calibration batches give finer-grained estimates.
    """

    needs_calibration = True

    def __call__(self, unit: Unit, stats: GateStats | None) -> torch.Tensor:
        return _stat(stats, unit, "abs_sum")


class FisherImportance(Importance):
    """Empirical Fisher of the gates: sum over calibration batches of (dL/dg)^2."""

    needs_calibration = True

    def __call__(self, unit: Unit, stats: GateStats | None) -> torch.Tensor:
        return _stat(stats, unit, "sq_sum")


class RandomImportance(Importance):
    """Uniform random scores: the baseline every criterion should beat."""

    # Not torch-pruning's RandomImportance: seeded per instance, so a run is reproducible.

    def __init__(self, seed: int = 0):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, unit: Unit, stats: GateStats | None) -> torch.Tensor:
        return torch.rand(unit.size, generator=self.generator)


def _stat(stats: GateStats | None, unit: Unit, name: str) -> torch.Tensor:
    if stats is None or unit.key not in getattr(stats, name):
        raise CalibrationError(f"no gate statistics for {unit.key}: calibration did not run for this unit")
    return getattr(stats, name)[unit.key].cpu()


_IMPORTANCES: dict[str, type[Importance] | Importance] = {}


def register_importance(name: str, importance: type[Importance] | Importance) -> None:
    """Make a criterion available by name (CLI ``--importance`` and every ``importance=`` argument)."""
    _IMPORTANCES[name] = importance


for _name, _imp in {"magnitude": MagnitudeImportance, "l2": MagnitudeImportance,
                    "l1": MagnitudeImportance(p=1), "taylor": TaylorImportance,
                    "fisher": FisherImportance, "random": RandomImportance}.items():
    register_importance(_name, _imp)


def available_importances() -> list[str]:
    return sorted(_IMPORTANCES)


def get_importance(importance: str | Importance) -> Importance:
    """Resolve a name or pass an :class:`Importance` instance through."""
    if isinstance(importance, Importance):
        return importance
    entry = _IMPORTANCES.get(str(importance).lower())
    if entry is None:
        raise CompressError(f"unknown importance {importance!r}; choose one of {', '.join(available_importances())}"
                            " or pass an Importance instance")
    return entry() if isinstance(entry, type) else entry
