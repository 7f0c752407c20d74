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
from compress.pruning.arch import ArchSpec, AttentionSite, FFNSite, HiddenSite, LayerStack
from compress.pruning.spec import InvalidOptionError

logger = logging.getLogger(__name__)


@dataclass
class Unit:
    """A prunable structure instance: ``structure`` in :data:`compress.pruning.spec.STRUCTURES`, scored per
    channel."""

    structure: str
    key: str
    size: int
    site: AttentionSite | FFNSite | LayerStack | HiddenSite


@dataclass
class GateStats:
    """Per-unit statistics over calibration batches: accumulated gate gradients, and the summed magnitude of
    each channel's activation over real (non-padding) tokens with how many tokens that was."""

    abs_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    sq_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    activation_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    activation_count: dict[str, float] = field(default_factory=dict)
    batches: int = 0

    def add_activation(self, key: str, total: torch.Tensor, count: float) -> None:
        previous = self.activation_sum.get(key)
        self.activation_sum[key] = total if previous is None else previous + total
        self.activation_count[key] = self.activation_count.get(key, 0.0) + count


def sum_over_real_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, float]:
    """Sum of ``x`` over every position except padding (``mask`` 0), and how many positions that was."""
    x = x.detach().float()
    positions = x.reshape(-1, x.shape[-1])
    if mask is not None and tuple(mask.shape) == tuple(x.shape[:-1]):
        weights = mask.reshape(-1, 1).to(positions.dtype)
        return (positions * weights).sum(0), float(weights.sum())
    # no mask given, or one that does not fit these states: every position counts
    return positions.sum(0), float(positions.shape[0])


class TokenMasks:
    """The padding masks of the forward pass in progress, and which one belongs to a module's states.

    Modules of an encoder-decoder model's decoder stack see decoder tokens: ``decoder_attention_mask`` (every
    position counts when none is given), never the encoder's ``attention_mask``, even when both have the same
    length. Every other module uses ``attention_mask``. Register :meth:`capture` as the model's forward pre-hook
    (``with_kwargs=True``); the masks are read from keyword arguments.
    """

    def __init__(self, model: nn.Module) -> None:
        decoder = getattr(model, "decoder", None)
        is_encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
        self._decoder = set(decoder.modules()) if is_encoder_decoder and isinstance(decoder, nn.Module) else set()
        self._current: dict[str, torch.Tensor | None] = {}

    def capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the model: remember the masks of the pass that starts."""
        self._current = {name: kwargs.get(name) for name in ("attention_mask", "decoder_attention_mask")}

    def mask_name(self, module: nn.Module) -> str:
        """Which keyword argument holds the mask of ``module``'s states (decided when a hook is registered)."""
        return "decoder_attention_mask" if module in self._decoder else "attention_mask"

    def get(self, name: str) -> torch.Tensor | None:
        """The mask ``name`` of the forward pass in progress (``None`` when the caller passed none)."""
        return self._current.get(name)


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
    if "hidden" in wanted:
        site = arch.hidden_site()
        units.append(Unit("hidden", "hidden", site.width, site))
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


def _output_gate_hook(gate: torch.Tensor):
    def hook(module, args, output):
        return output * gate.to(output.dtype)

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
            elif unit.structure == "hidden":
                # one gate on the residual stream: every module whose output is the stream is multiplied by it
                gate = torch.ones(unit.size, device=site.embeddings[0].weight.device, requires_grad=True)
                for module in site.gate_points:
                    handles.append(module.register_forward_hook(_output_gate_hook(gate)))
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


@contextlib.contextmanager
def record_activations(model: nn.Module, units: list[Unit], stats: GateStats) -> Iterator[None]:
    """While open, add to ``stats`` the magnitude of each unit's channels on every forward pass (real tokens
    only, see :class:`TokenMasks`): |input| of the FFN output projection per neuron, the L2 norm of each head's
    output, and |output| of every norm on the residual stream per hidden channel (the normalised hidden state, as
    in Minitron)."""
    masks = TokenMasks(model)
    handles = []

    def ffn_hook(key: str, mask: str):
        def hook(module, args):
            stats.add_activation(key, *sum_over_real_tokens(args[0].abs(), masks.get(mask)))
        return hook

    def heads_hook(key: str, head_dim: int, mask: str):
        def hook(module, args):
            x = args[0]
            per_head = x.detach().float().reshape(*x.shape[:-1], -1, head_dim).norm(dim=-1)
            stats.add_activation(key, *sum_over_real_tokens(per_head, masks.get(mask)))
        return hook

    def hidden_hook(key: str, mask: str):
        def hook(module, args, output):
            stats.add_activation(key, *sum_over_real_tokens(output.abs(), masks.get(mask)))
        return hook

    try:
        handles.append(model.register_forward_pre_hook(masks.capture, with_kwargs=True))
        for unit in units:
            site = unit.site
            if unit.structure == "ffn":
                hook = ffn_hook(unit.key, masks.mask_name(site.output))
                handles.append(site.output.register_forward_pre_hook(hook))
            elif unit.structure == "heads":
                hook = heads_hook(unit.key, site.head_dim, masks.mask_name(site.o))
                handles.append(site.o.register_forward_pre_hook(hook))
            elif unit.structure == "hidden":
                handles += [norm.register_forward_hook(hidden_hook(unit.key, masks.mask_name(norm)))
                            for norm, _ in site.norms]
        yield
    finally:
        for handle in handles:
            handle.remove()


def collect_gate_stats(model: nn.Module, units: list[Unit], batches: list[dict],
                       progress: bool = False, gradients: bool = True) -> GateStats:
    """Run the calibration batches once, accumulating |dL/dg| and (dL/dg)^2 for every gate (with
    ``gradients``) and the activation magnitudes of every unit (:func:`record_activations`). Without
    ``gradients`` the passes are forward-only and need no labels."""
    if not batches:
        raise CalibrationError("no calibration batches: pass `data` (a datasets.Dataset or an iterable of "
                               "model-input dicts) or use importance='magnitude' / 'random'.")
    stats = GateStats()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # dropout off: scores should reflect the model, not the noise
    try:
        with frozen(model), record_activations(model, units, stats), \
                attach_gates(units if gradients else []) as gates:
            for batch in tqdm(batches, desc="scoring", disable=not progress, leave=False):
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                if not gradients:
                    with torch.no_grad():  # labels stay: seq2seq models make their decoder inputs from them
                        model(**batch)
                    stats.batches += 1
                    continue
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
    #: whether those statistics include gate gradients of the task loss (else forward passes suffice)
    needs_gradients: bool = True
    #: the structures this criterion can score (``None``: every one); checked when the options are validated
    structures: tuple[str, ...] | None = None

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
        elif unit.structure == "hidden":
            score = torch.zeros(n)
            seen: set[int] = set()  # tied tensors count once
            rows = [(m.weight, 1) for m in (*site.embeddings, *site.readers)] + [(m.weight, 0) for m in site.writers]
            rows += [(norm.weight, 0) for norm, _ in site.norms]
            for weight, dim in rows:
                if id(weight) not in seen:
                    seen.add(id(weight))
                    score = score + self._norm(weight.detach().movedim(dim, 0).contiguous(), n).cpu()
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


class ActivationImportance(Importance):
    """Mean activation magnitude per channel over the calibration batches (Minitron's criterion, no labels):
    |input of the FFN output projection| per neuron, the L2 norm of each head's output, and |normalised hidden
    state| per hidden channel, summed over every norm on the residual stream."""

    needs_calibration = True
    needs_gradients = False
    # a block's output has no per-block activation to measure: whole layers need a loss or weight criterion
    structures = ("ffn", "heads", "kv_heads", "hidden")

    def __call__(self, unit: Unit, stats: GateStats | None) -> torch.Tensor:
        if stats is None or unit.key not in stats.activation_sum:
            raise CalibrationError(f"no activations recorded for {unit.key}: calibration did not run for this unit")
        return (stats.activation_sum[unit.key] / max(stats.activation_count[unit.key], 1.0)).cpu()


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
                    "fisher": FisherImportance, "random": RandomImportance,
                    "activation": ActivationImportance}.items():
    register_importance(_name, _imp)


def available_importances() -> list[str]:
    return sorted(_IMPORTANCES)


def check_scorable(importance: str | Importance, structures: Iterable[str]) -> None:
    """Refuse structures that ``importance`` (a registered name or an instance) cannot score, before any data is
    run through the model.

    Raises:
        InvalidOptionError: naming the criterion, the structures, and what to use for them.
    """
    entry = importance if isinstance(importance, Importance) else _IMPORTANCES.get(str(importance).lower())
    allowed = getattr(entry, "structures", None)
    unscorable = [] if allowed is None else [s for s in dict.fromkeys(structures) if s not in allowed]
    if unscorable:
        names = ", ".join(repr(s) for s in unscorable)
        name = importance if isinstance(importance, str) else type(importance).__name__
        raise InvalidOptionError("importance", name, f"cannot score {names}: use taylor, fisher or magnitude to "
                                 f"prune {names}, or leave {names} out of the sparsity")


def get_importance(importance: str | Importance) -> Importance:
    """Resolve a name or pass an :class:`Importance` instance through."""
    if isinstance(importance, Importance):
        return importance
    entry = _IMPORTANCES.get(str(importance).lower())
    if entry is None:
        raise CompressError(f"unknown importance {importance!r}; choose one of {', '.join(available_importances())}"
                            " or pass an Importance instance")
    return entry() if isinstance(entry, type) else entry
