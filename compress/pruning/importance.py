"""Importance criteria behind one small interface: ``Importance.__call__(unit, stats) -> scores``.

A *unit* is one prunable structure instance (the FFN of one layer, the heads of one attention block,
the blocks of one stack) and the scores hold one value per channel/head/block; higher means keep.

Gate criteria (``taylor``, ``fisher``) do not need weight gradients: every unit gets a gate of ones
multiplied into its output, the backbone's parameters are frozen, and only the gates receive gradients.
The gradient of the task loss with respect to a gate is the first-order estimate of what removing that
channel would cost, which keeps scoring as cheap in memory as an adapter's forward/backward.

Input-statistics criteria (``flap``, ``wanda_sp``, :class:`InputStatisticsImportance`) score the input channels
of each unit's output projection (FFN down / attention output) from their moments over calibration tokens and
that projection's weight; the sequential pass of least-squares reconstruction
(:mod:`compress.pruning.reconstruct`) re-scores them on the stream of the already pruned blocks.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.errors import CalibrationError, CompressError, InvalidOptionError
from compress.pruning.arch import ArchSpec, AttentionSite, FFNSite, HiddenSite, LayerStack

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
class InputMoments:
    """Per-channel moments of a projection's inputs over real (non-padding) calibration tokens, in float64: how many
    tokens, and the sum and sum of squares of ``x - shift``. The shift (the first batch's mean, set by
    :meth:`add_states`) keeps the variance of a channel with a large mean and little spread from vanishing in
    rounding."""

    count: float = 0.0
    total: torch.Tensor | None = None
    squares: torch.Tensor | None = None
    shift: torch.Tensor | None = None

    def add(self, total: torch.Tensor, squares: torch.Tensor, count: float) -> None:
        """Add sums of ``x - shift`` (of ``x`` while no shift is set) over ``count`` tokens."""
        total, squares = total.detach().double(), squares.detach().double()
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares
        self.count += count

    def add_states(self, states: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add the tokens of ``states`` (``... x channels``) where ``mask`` (of the states' leading shape) is not 0."""
        rows = real_token_rows(states, mask).double()
        if rows.shape[0] == 0:
            return
        if self.shift is None:
            self.shift = rows.mean(0)
        rows = rows - self.shift
        self.add(rows.sum(0), (rows * rows).sum(0), rows.shape[0])

    def _checked(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.total is None or self.squares is None or self.count < 1:
            raise CalibrationError("no calibration tokens reached this projection: nothing to measure")
        return self.total, self.squares

    @property
    def mean(self) -> torch.Tensor:
        total, _ = self._checked()
        mean = total / self.count
        return mean if self.shift is None else mean + self.shift

    @property
    def variance(self) -> torch.Tensor:
        """The sample variance per channel (divided by count - 1)."""
        total, squares = self._checked()
        if self.count < 2:
            return torch.zeros_like(total)
        return ((squares - total * total / self.count) / (self.count - 1)).clamp_min(0.0)

    @property
    def mean_square(self) -> torch.Tensor:
        """E[x^2] per channel."""
        total, squares = self._checked()
        if self.shift is None:
            return squares / self.count
        return (squares + 2 * self.shift * total) / self.count + self.shift * self.shift


def real_token_rows(states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``states`` (``... x channels``) as rows, one per position where ``mask`` is not 0 (every position when no
    mask is given or it does not fit the states' leading shape)."""
    states = states.detach()
    if mask is not None and tuple(mask.shape) == tuple(states.shape[:-1]):
        return states[mask.to(states.device).bool()]
    return states.reshape(-1, states.shape[-1])


@dataclass
class GateStats:
    """Per-unit statistics over calibration batches: accumulated gate gradients, the summed magnitude of each
    channel's activation over real (non-padding) tokens with how many tokens that was, the moments of each FFN /
    attention output projection's inputs (``inputs``), each block's summed cosine similarity between its input and
    output states (``block_cosine``, for ``layers`` units), and, for criteria that need them, the weight gradients
    summed over batches (``weight_grad_sum``, keyed by ``id`` of the parameter)."""

    abs_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    sq_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    activation_sum: dict[str, torch.Tensor] = field(default_factory=dict)
    activation_count: dict[str, float] = field(default_factory=dict)
    inputs: dict[str, InputMoments] = field(default_factory=dict)
    block_cosine: dict[str, torch.Tensor] = field(default_factory=dict)
    block_count: dict[str, torch.Tensor] = field(default_factory=dict)
    weight_grad_sum: dict[int, torch.Tensor] = field(default_factory=dict)
    batches: int = 0

    def add_activation(self, key: str, total: torch.Tensor, count: float) -> None:
        previous = self.activation_sum.get(key)
        self.activation_sum[key] = total if previous is None else previous + total
        self.activation_count[key] = self.activation_count.get(key, 0.0) + count

    def add_inputs(self, key: str, states: torch.Tensor, mask: torch.Tensor | None) -> None:
        self.inputs.setdefault(key, InputMoments()).add_states(states, mask)

    def add_block_cosine(self, key: str, size: int, index: int, total: float, count: float) -> None:
        if key not in self.block_cosine:
            self.block_cosine[key] = torch.zeros(size, dtype=torch.float64)
            self.block_count[key] = torch.zeros(size, dtype=torch.float64)
        self.block_cosine[key][index] += total
        self.block_count[key][index] += count


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
    if "labels" not in inputs and "input_ids" in inputs and is_causal_lm(model):
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


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` is a causal language model (its class name ends in ``ForCausalLM``)."""
    return type(model).__name__.endswith("ForCausalLM")


@contextlib.contextmanager
def record_activations(model: nn.Module, units: list[Unit], stats: GateStats) -> Iterator[None]:
    """While open, add to ``stats`` the magnitude of each unit's channels on every forward pass (real tokens
    only, see :class:`TokenMasks`): |input| of the FFN output projection per neuron, the L2 norm of each head's
    output, and |output| of every norm on the residual stream per hidden channel (the normalised hidden state, as
    in Minitron); the moments of every FFN / attention output projection's inputs (:class:`InputMoments`); and for
    ``layers`` units the cosine similarity between each block's input and output states per token."""
    masks = TokenMasks(model)
    handles = []

    def ffn_hook(key: str, mask: str):
        def hook(module, args):
            stats.add_activation(key, *sum_over_real_tokens(args[0].abs(), masks.get(mask)))
            stats.add_inputs(key, args[0], masks.get(mask))
        return hook

    def heads_hook(key: str, head_dim: int, mask: str):
        def hook(module, args):
            x = args[0]
            per_head = x.detach().float().reshape(*x.shape[:-1], -1, head_dim).norm(dim=-1)
            stats.add_activation(key, *sum_over_real_tokens(per_head, masks.get(mask)))
            stats.add_inputs(key, x, masks.get(mask))
        return hook

    def block_hook(key: str, size: int, index: int, mask: str):
        def hook(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            hidden_out = output[0] if isinstance(output, tuple) else output
            cosine = torch.nn.functional.cosine_similarity(hidden_in.detach().float(), hidden_out.detach().float(),
                                                           dim=-1)
            total, count = sum_over_real_tokens(cosine.unsqueeze(-1), masks.get(mask))
            stats.add_block_cosine(key, size, index, float(total), count)
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
            elif unit.structure == "layers":
                handles += [block.register_forward_hook(block_hook(unit.key, unit.size, i, masks.mask_name(block)),
                                                        with_kwargs=True) for i, block in enumerate(site.blocks)]
        yield
    finally:
        for handle in handles:
            handle.remove()


def collect_gate_stats(model: nn.Module, units: list[Unit], batches: list[dict],
                       progress: bool = False, gradients: bool = True, weight_gradients: bool = False) -> GateStats:
    """Run the calibration batches once, accumulating |dL/dg| and (dL/dg)^2 for every gate (with
    ``gradients``), the gradients of the units' weights summed over batches (with ``weight_gradients``; see
    :func:`unit_tensors`) and the activation statistics of every unit (:func:`record_activations`). Without
    either kind of gradient the passes are forward-only and need no labels."""
    if not batches:
        raise CalibrationError("no calibration batches: pass `data` (a datasets.Dataset or an iterable of "
                               "model-input dicts) or use importance='magnitude' / 'random'.")
    stats = GateStats()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # dropout off: scores should reflect the model, not the noise
    weights = list({id(t): t for u in units for t, _ in unit_tensors(u)}.values()) if weight_gradients else []
    try:
        with frozen(model), record_activations(model, units, stats), \
                attach_gates(units if gradients else []) as gates, _requiring_grad(weights):
            for batch in tqdm(batches, desc="scoring", disable=not progress, leave=False):
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                if not gradients and not weight_gradients:
                    with torch.no_grad():  # labels stay: seq2seq models make their decoder inputs from them
                        model(**batch)
                    stats.batches += 1
                    continue
                loss = task_loss(model, batch)
                grads = torch.autograd.grad(loss, [*gates.values(), *weights], allow_unused=True)
                for key, grad in zip(gates, grads[:len(gates)]):
                    g = torch.zeros_like(gates[key]) if grad is None else grad.detach().float()
                    stats.abs_sum[key] = stats.abs_sum.get(key, 0) + g.abs()
                    stats.sq_sum[key] = stats.sq_sum.get(key, 0) + g.pow(2)
                for weight, grad in zip(weights, grads[len(gates):]):
                    if grad is not None:
                        previous = stats.weight_grad_sum.get(id(weight))
                        grad = grad.detach().float()
                        stats.weight_grad_sum[id(weight)] = grad if previous is None else previous + grad
                stats.batches += 1
    finally:
        model.train(was_training)
    return stats


@contextlib.contextmanager
def _requiring_grad(tensors: list[torch.Tensor]) -> Iterator[None]:
    """Let autograd reach ``tensors`` (inside :func:`frozen`), and freeze them again afterwards."""
    try:
        for tensor in tensors:
            tensor.requires_grad_(True)
        yield
    finally:
        for tensor in tensors:
            tensor.requires_grad_(False)


def unit_tensors(unit: Unit) -> list[tuple[torch.Tensor, int]]:
    """Every weight that belongs to a unit's channels, with the dimension that indexes them: the FFN output
    projection's columns and its input projections' rows; the query and output projections' rows/columns of each
    head (plus keys and values without grouped-query attention, where each head has its own); for ``hidden``
    every embedding, reader, writer and norm on the residual stream (tied tensors once); for ``layers`` every
    parameter of each block (dimension -1: the whole tensor belongs to one block)."""
    site = unit.site
    if unit.structure == "ffn":
        return [(site.output.weight, 1), *((lin.weight, 0) for lin in site.inputs)]
    if unit.structure == "heads":
        tensors = [(site.q.weight, 0), (site.o.weight, 1)]
        return tensors if site.is_gqa else [*tensors, (site.k.weight, 0), (site.v.weight, 0)]
    if unit.structure == "hidden":
        rows = [(m.weight, 1) for m in (*site.embeddings, *site.readers)] + [(m.weight, 0) for m in site.writers]
        rows += [(norm.weight, 0) for norm, _ in site.norms]
        return _first_of_each(rows)  # tied tensors count once
    return [(p, -1) for block in site.blocks for p in block.parameters()]


def _first_of_each(rows: list[tuple[torch.Tensor, int]]) -> list[tuple[torch.Tensor, int]]:
    seen: set[int] = set()
    out = []
    for weight, dim in rows:
        if id(weight) not in seen:
            seen.add(id(weight))
            out.append((weight, dim))
    return out


def per_channel_sums(unit: Unit, values: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``values(tensor)`` (a tensor of the same shape) summed per channel/head/block of ``unit`` over
    :func:`unit_tensors`, on the CPU in float32."""
    if unit.structure == "layers":
        site = unit.site
        return torch.stack([sum(values(p).detach().float().sum().cpu() for p in block.parameters())
                            for block in site.blocks])
    score = torch.zeros(unit.size)
    for tensor, dim in unit_tensors(unit):
        per = values(tensor).detach().float().movedim(dim, 0).reshape(unit.size, -1).sum(1)
        score = score + per.cpu()
    return score


# -- criteria -----------------------------------------------------------------------------------------
class Importance(ABC):
    """Scores every channel of a unit. Subclass and register with :func:`register_importance`."""

    #: whether scores need :class:`GateStats` from calibration batches
    needs_calibration: bool = False
    #: whether those statistics include gate gradients of the task loss (else forward passes suffice)
    needs_gradients: bool = True
    #: whether they include gradients of the task loss with respect to the units' weights (:func:`unit_tensors`)
    needs_weight_gradients: bool = False
    #: the structures this criterion can score (``None``: every one); checked when the options are validated
    structures: tuple[str, ...] | None = None

    @abstractmethod
    def __call__(self, unit: Unit, stats: GateStats | None) -> torch.Tensor:
        """Return a 1-D float tensor of length ``unit.size``; higher means more important."""


class MagnitudeImportance(Importance):
    """L_p norm of the weights that belong to each channel/head/block (no data needed; see :func:`unit_tensors`)."""

    # Not torch-pruning's MagnitudeImportance: it scores dependency-graph groups, and grouped-query heads, T5's
    # shared heads and whole layers are not graph groups here (see compress.pruning.surgery).

    def __init__(self, p: int = 2):
        self.p = p

    def __call__(self, unit: Unit, stats: GateStats | None) -> torch.Tensor:
        return per_channel_sums(unit, lambda weight: weight.detach().float().abs().pow(self.p)).pow(1.0 / self.p)


class TaylorImportance(Importance):
    """First-order Taylor estimate of removing each whole channel/head/block: sum over calibration batches of
    |g * dL/dg| at g = 1, for a gate g on the structure's output.

    This is LLM-Pruner's *vector-wise* importance of the structure: for an FFN neuron, dL/dg is the sum over tokens
    of x * dL/dx for its activation x, which equals <W, dL/dW> over the neuron's column of the output projection (and
    over its row of the up projection); LLM-Pruner's ``vectorize`` option adds the gate projection's row as a
    further term. The absolute value is taken per batch (of the batch-mean gradient), not per example, so
    effects of opposite sign within one batch cancel (the same holds for ``fisher``, which squares that gradient);
    smaller calibration batches give finer-grained estimates. ``taylor_elementwise`` is the element-wise form.
    """

    needs_calibration = True

    def __call__(self, unit: Unit, stats: GateStats | None) -> torch.Tensor:
        return _stat(stats, unit, "abs_sum")


class ElementwiseTaylorImportance(Importance):
    """LLM-Pruner's *element-wise* first-order Taylor importance: |w * dL/dw| for every weight of the structure
    (:func:`unit_tensors`), with dL/dw summed over the calibration batches, then summed per channel/head/block.

    Each weight's own first-order effect counts with its absolute value, so effects of opposite sign within one
    structure do not cancel (``taylor``, the vector-wise form, lets them cancel). Needs gradients of the scored
    weights: memory for one gradient per scored weight.
    """

    needs_calibration = True
    needs_gradients = False  # no gates
    needs_weight_gradients = True

    def __call__(self, unit: Unit, stats: GateStats | None) -> torch.Tensor:
        if stats is None or not stats.weight_grad_sum:
            raise CalibrationError(f"no weight gradients for {unit.key}: calibration did not run for this unit")

        def first_order(weight: torch.Tensor) -> torch.Tensor:
            grad = stats.weight_grad_sum.get(id(weight))
            return torch.zeros_like(weight, dtype=torch.float32) if grad is None else \
                (weight.detach().float() * grad).abs()

        return per_channel_sums(unit, first_order)


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


def effective_weight(layer: nn.Module) -> torch.Tensor:
    """The weight a layer applies (float32, detached): an adapter layer's base weight plus its unmerged low-rank
    updates."""
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    weight = base.weight.detach().float()
    if base is not layer and not getattr(layer, "merged", False) and not getattr(layer, "disable_adapters", False):
        for adapter in layer.active_adapters:
            if adapter in getattr(layer, "lora_A", {}):
                weight = weight + layer.get_delta_weight(adapter).detach().float()
    return weight


def output_projection(unit: Unit) -> nn.Module:
    """The layer whose *input* channels a unit's channels are (FFN output / attention output projection)."""
    return unit.site.output if unit.structure == "ffn" else unit.site.o


class InputStatisticsImportance(Importance):
    """A criterion computed from the moments of the inputs of a unit's output projection and that projection's
    weight: one score per input channel (:meth:`channel_scores`), summed over each head's channels for ``heads``.

    The calibration pass measures the moments on the dense model; with ``reconstruct="least_squares"`` the
    sequential pass measures them again on the stream of the already pruned blocks and re-chooses each layer's
    channels (the number per layer stays as planned). Subclass and implement :meth:`channel_scores`.
    """

    needs_calibration = True
    needs_gradients = False
    structures = ("ffn", "heads", "kv_heads")

    @abstractmethod
    def channel_scores(self, moments: InputMoments, weight: torch.Tensor) -> torch.Tensor:
        """One score per input channel of a projection with ``weight`` (out x in, float32) whose inputs have
        ``moments``; higher means keep."""

    def score(self, unit: Unit, moments: InputMoments) -> torch.Tensor:
        """Scores of ``unit``'s channels (neurons or heads) from the moments of its output projection's inputs."""
        weight = effective_weight(output_projection(unit))
        channels = self.channel_scores(moments, weight).float().cpu()
        if unit.structure == "heads":
            channels = channels.view(unit.size, -1).sum(1)
        return channels

    def channel_spread(self, unit: Unit, moments: InputMoments) -> float:
        """The standard deviation of the unit's per-channel scores over its channels, in the unit of its scores (a
        head's score sums its ``head_dim`` channels, so ``head_dim`` times the channels' deviation).
        ``normalize="standardize"`` divides a heads unit's scores by it: a head then ranks by how far its channels
        stand out among the layer's channels, as FLAP standardises attention, instead of among a handful of heads."""
        channels = self.channel_scores(moments, effective_weight(output_projection(unit))).double()
        spread = float(channels.std()) if channels.numel() > 1 else 0.0
        return spread * (unit.site.head_dim if unit.structure == "heads" else 1)

    def __call__(self, unit: Unit, stats: GateStats | None) -> torch.Tensor:
        if stats is None or unit.key not in stats.inputs:
            raise CalibrationError(f"no input statistics for {unit.key}: calibration did not run for this unit")
        return self.score(unit, stats.inputs[unit.key])


class FluctuationImportance(InputStatisticsImportance):
    """FLAP's fluctuation metric (An et al. 2024): the sample variance of each input channel of the output
    projection over calibration tokens times the squared L2 norm of the weight column it meets, i.e. how much the
    projection's output varies through that channel, which a bias cannot absorb. A head scores the sum over its
    channels (FLAP's own code squares the channel scores before that sum).
    """

    def channel_scores(self, moments: InputMoments, weight: torch.Tensor) -> torch.Tensor:
        return moments.variance.to(weight.device) * weight.double().pow(2).sum(0)


class WandaStructuredImportance(InputStatisticsImportance):
    """Wanda-sp (the structured Wanda of FLAP's comparison): |W| times the L2 norm of the input channel over
    calibration tokens, averaged over the output rows of the projection per input channel; a head scores the sum
    over its channels.
    """

    def channel_scores(self, moments: InputMoments, weight: torch.Tensor) -> torch.Tensor:
        norms = (moments.mean_square * moments.count).sqrt().to(weight.device)
        return weight.double().abs().mean(0) * norms


class OptimalBrainSurgeonImportance(FluctuationImportance):
    """Structured optimal brain surgeon, the selection of ZipLM and SlimGPT, for ``reconstruct="least_squares"``.

    Removing input channels R of an output projection W and refitting the kept ones by least squares leaves the
    error tr(W_R [(H^-1)_RR]^-1 W_R^T), with H = S + lambda I the (ridge-regularised) covariance of the inputs.
    In the sequential pass each layer's channels are removed greedily by that cost, ||W_j||^2 / (H^-1)_jj for one
    channel (a head: its channels as one block), updating W and H^-1 after each step
    (:func:`compress.pruning.reconstruct.obs_select`), so that a channel the kept ones predict well goes first. On
    the dense calibration pass (the widths of ``global`` mode and ``param_sparsity``) a channel scores the same
    cost with the covariance's diagonal, (H^-1)_jj = 1 / S_jj: FLAP's fluctuation.
    """

    #: chooses its channels inside the least-squares pass (refused without ``reconstruct="least_squares"``)
    requires_reconstruction = True


class BlockInfluenceImportance(Importance):
    """ShortGPT's block influence (Men et al. 2024) for depth pruning: 1 - the mean cosine similarity between a
    block's input and output hidden states over calibration tokens. A block that barely turns the residual stream
    scores low and goes first. Forward passes only (no labels).
    """

    needs_calibration = True
    needs_gradients = False
    structures = ("layers",)

    def __call__(self, unit: Unit, stats: GateStats | None) -> torch.Tensor:
        if stats is None or unit.key not in stats.block_cosine:
            raise CalibrationError(f"no block statistics for {unit.key}: calibration did not run for this unit")
        mean_cosine = stats.block_cosine[unit.key] / stats.block_count[unit.key].clamp_min(1.0)
        return (1.0 - mean_cosine).float()


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
    """Make a criterion available by name (CLI ``--importance`` and every ``importance=`` argument).

    Names are case-insensitive: ``"MyCrit"`` is stored as ``"mycrit"``, and ``importance="MyCrit"`` or
    ``"mycrit"`` both find it. Registering a name again with the same criterion does nothing.

    Raises:
        CompressError: ``name`` is empty or not a string, ``importance`` is neither an :class:`Importance`
            subclass nor an instance, or another criterion already has the name (in any case).
    """
    if not isinstance(name, str) or not name.strip():
        raise CompressError(f"register_importance: the name must be a non-empty string, got {name!r}")
    is_class = isinstance(importance, type) and issubclass(importance, Importance)
    if not (is_class or isinstance(importance, Importance)):
        raise CompressError(f"register_importance({name!r}, ...): give an Importance subclass or instance, got "
                            f"{importance!r}")
    key = name.strip().lower()
    existing = _IMPORTANCES.get(key)
    if existing is not None and existing is not importance:
        raise CompressError(f"register_importance: the name {name!r} is taken by {_describe(existing)} (names are "
                            "case-insensitive); register your criterion under another name")
    _IMPORTANCES[key] = importance


def _describe(entry: type[Importance] | Importance) -> str:
    return entry.__name__ if isinstance(entry, type) else f"an instance of {type(entry).__name__}"


for _name, _imp in {"magnitude": MagnitudeImportance, "l2": MagnitudeImportance,
                    "l1": MagnitudeImportance(p=1), "taylor": TaylorImportance,
                    "taylor_elementwise": ElementwiseTaylorImportance,
                    "fisher": FisherImportance, "random": RandomImportance,
                    "activation": ActivationImportance, "flap": FluctuationImportance,
                    "wanda_sp": WandaStructuredImportance, "obs": OptimalBrainSurgeonImportance,
                    "block_influence": BlockInfluenceImportance}.items():
    register_importance(_name, _imp)


def available_importances() -> list[str]:
    return sorted(_IMPORTANCES)


def importance_entry(importance: str | Importance) -> type[Importance] | Importance | None:
    """The registered class or instance behind a criterion name (an instance as it is; ``None``: not registered)."""
    return importance if isinstance(importance, Importance) else _IMPORTANCES.get(str(importance).lower())


def check_scorable(importance: str | Importance, structures: Iterable[str]) -> None:
    """Refuse structures that ``importance`` (a registered name or an instance) cannot score, before any data is
    run through the model.

    Raises:
        InvalidOptionError: naming the criterion, the structures, and what to use for them.
    """
    entry = importance_entry(importance)
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
