"""Sequential pruning with least-squares reconstruction of the output projections.

Removing input channels of a block's output projection (``down_proj`` / ``o_proj``, BERT's ``output.dense``)
changes that projection's output. Given the second moments of its inputs over calibration tokens, the kept
columns can be refit so that the projection reproduces its unpruned output as closely as possible: the
structured form of optimal brain surgeon (as in ZipLM and SlimGPT). With ``W`` the dense weight, ``K`` the kept and
``R`` the removed input channels and ``S`` the covariance of the inputs (their second moment when no bias takes
part), the refit is

    W'_K = W_K + W_R S_RK (S_KK + lambda I)^-1,        b' = b + W_R mu_R - (W'_K - W_K) mu_K,

the ridge solution of min E||W x + b - W'_K x_K - b'||^2 + lambda ||W'_K - W_K||^2. ``lambda`` is ``damping`` times
the mean variance of the kept channels. Nothing removed leaves the weights exactly as they were; a large damping
leaves only the bias term (FLAP's bias compensation, measured on the pruned stream).

The pruning runs block by block: the calibration stream (the input states of the first block, one tensor per batch)
is kept, and for each block in order the inputs of each output projection are measured on that stream, which has
already passed through the pruned earlier blocks (and, for the FFN, through this block's pruned attention); then the
channels are chosen, the projection refit, the channels removed, and the stream run through the finished block.
Memory: the stream (tokens x hidden size), and the count, sum and Gram matrix of one projection at a time. In
families whose blocks add their output projections' outputs to the residual stream (pre-norm: Llama, Qwen2), the
FFN's output projection, the last term such a block adds, is measured in the same pass that runs the block, its inputs
held until it is refit (one projection's inputs over the calibration tokens), which saves running the block a second
time. The attention's output projection never is: the FFN reads the stream it writes to, so a block where only heads
go is measured up to its attention's output projection and then run again whole.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from compress.errors import CalibrationError, CompressError, UnsupportedStructureError
from compress.pruning.arch import ArchSpec, LayerStack
from compress.pruning.importance import (
    Importance,
    InputMoments,
    InputStatisticsImportance,
    OptimalBrainSurgeonImportance,
    Unit,
    output_projection,
    real_token_rows,
)
from compress.pruning.plan import reselect
from compress.pruning.surgery import declared_layers, is_wrapped, remove_unit_channels

logger = logging.getLogger(__name__)

__all__ = [
    "BlockStream", "ProjectionStatistics", "SequentialResult", "bias_fit_structures", "check_reconstructable",
    "least_squares_update", "obs_select", "prune_sequentially",
]


class ProjectionStatistics:
    """The count, per-channel sum and Gram matrix (sum of products) of a projection's inputs over real
    (non-padding) calibration tokens, accumulated in float64 about a shift (the first batch's mean), so that channels
    with a large mean keep their covariance through rounding."""

    def __init__(self, width: int, device: torch.device | str = "cpu") -> None:
        self.count = 0.0
        self.shift: torch.Tensor | None = None
        self.total = torch.zeros(width, dtype=torch.float64, device=device)
        self.gram = torch.zeros(width, width, dtype=torch.float64, device=device)

    def add(self, states: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add the tokens of ``states`` (``... x width``) where ``mask`` (of the states' leading shape) is not 0."""
        rows = real_token_rows(states, mask).float()
        if rows.shape[0] == 0:
            return
        if self.shift is None:
            self.shift = rows.double().mean(0)
        rows = rows - self.shift.float()
        self.count += rows.shape[0]
        self.total += rows.sum(0).double()
        self.gram += (rows.T @ rows).double()  # float32 per batch, float64 across batches

    @property
    def mean(self) -> torch.Tensor:
        mean = self.total / max(self.count, 1.0)
        return mean if self.shift is None else mean + self.shift

    def second_moment(self, centred: bool) -> torch.Tensor:
        """E[x x^T], or the covariance E[(x - mu)(x - mu)^T] when ``centred``."""
        count = max(self.count, 1.0)
        offset = self.total / count  # the mean of x - shift
        covariance = self.gram / count - torch.outer(offset, offset)
        return covariance if centred else covariance + torch.outer(self.mean, self.mean)

    def moments(self) -> InputMoments:
        """The per-channel moments (what input-statistics criteria score from)."""
        return InputMoments(count=self.count, total=self.total.clone(), squares=self.gram.diagonal().clone(),
                            shift=None if self.shift is None else self.shift.clone())


def least_squares_update(weight: torch.Tensor, bias: torch.Tensor | None, stats: ProjectionStatistics,
                         removed: list[int], damping: float,
                         fit_bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kept columns of ``weight`` (out x in) refit after input channels ``removed`` go, and the new bias.

    With ``fit_bias`` the fit is centred and the bias absorbs the mean (``bias`` ``None`` counts as zero); without,
    the fit uses the uncentred second moment and ``bias`` is returned unchanged. See the module docstring.

    Returns:
        ``(weight of shape out x kept, bias)`` in float32.
    """
    width = weight.shape[1]
    dead = torch.zeros(width, dtype=torch.bool)
    dead[torch.as_tensor(removed, dtype=torch.long)] = True
    keep, gone = (~dead).nonzero().flatten(), dead.nonzero().flatten()
    w = weight.detach().double()
    if len(gone) == 0:
        return w.float(), bias
    moment = stats.second_moment(centred=fit_bias).to(w.device)
    kept_moment = moment[keep][:, keep]
    ridge = damping * float(kept_moment.diagonal().mean())
    if ridge <= 0.0:  # every kept channel constant (or zero): nothing to regress on, the ridge only keeps H regular
        ridge = damping
    hessian = kept_moment + ridge * torch.eye(len(keep), dtype=moment.dtype, device=moment.device)
    factor, info = torch.linalg.cholesky_ex(hessian)
    target = moment[keep][:, gone] @ w[:, gone].T  # S_KR W_R^T: kept x out
    if int(info) == 0:
        correction = torch.cholesky_solve(target, factor).T
    else:  # not positive definite in floating point: a least-squares solve still gives the ridge solution
        correction = torch.linalg.lstsq(hessian, target).solution.T
    new_weight = w[:, keep] + correction
    if not fit_bias:
        return new_weight.float(), bias
    mean = stats.mean.to(w.device)
    base = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) if bias is None else bias.detach().double()
    new_bias = base + w[:, gone] @ mean[gone] - correction @ mean[keep]
    return new_weight.float(), new_bias.float()


def _ridge_inverse(moment: torch.Tensor, damping: float) -> torch.Tensor:
    """(S + lambda I)^-1 in float64, lambda = ``damping`` times the mean of S's diagonal (as in
    :func:`least_squares_update`)."""
    ridge = damping * float(moment.diagonal().mean())
    if ridge <= 0.0:
        ridge = damping
    hessian = moment.double() + ridge * torch.eye(moment.shape[0], dtype=torch.float64, device=moment.device)
    factor, info = torch.linalg.cholesky_ex(hessian)
    return torch.cholesky_inverse(factor) if int(info) == 0 else torch.linalg.pinv(hessian, hermitian=True)


def _remove_block(weight: torch.Tensor, inverse: torch.Tensor, block: torch.Tensor) -> None:
    """The optimal brain surgeon update, in place, for removing input channels ``block``: the kept columns of
    ``weight`` take over what the removed ones predicted (W -= W_B [(H^-1)_BB]^-1 (H^-1)_B:), and ``inverse``
    becomes the inverse Hessian of the remaining channels (rows and columns of ``block`` zero)."""
    rows = inverse[block]  # B x d
    solve = torch.linalg.solve(rows[:, block], rows)  # [(H^-1)_BB]^-1 (H^-1)_B:
    weight -= weight[:, block] @ solve
    inverse -= rows.T @ solve
    weight[:, block] = 0.0
    inverse[block] = 0.0
    inverse[:, block] = 0.0


def _block_cost(weight: torch.Tensor, inverse: torch.Tensor, block: torch.Tensor) -> float:
    """tr(W_B [(H^-1)_BB]^-1 W_B^T): the output error removing ``block`` leaves after the refit of the rest."""
    columns = weight[:, block]
    return float((columns * torch.linalg.solve(inverse[block][:, block], columns.T).T).sum())


def obs_select(unit: Unit, planned: list[int], weight: torch.Tensor, stats: ProjectionStatistics, damping: float,
               centred: bool, whole_kv_groups: bool, block_size: int = 16, min_steps: int = 64) -> list[int]:
    """The channels (FFN neurons) or query heads of ``unit`` to remove, as many and in the shape of ``planned`` (see
    :func:`~compress.pruning.plan.reselect`), chosen greedily by structured optimal brain surgeon on the inputs of
    its output projection (``weight``, out x in) with ``stats``.

    With H = S + lambda I (S the covariance of the inputs, their second moment unless ``centred``; lambda
    ``damping`` times the mean of S's diagonal), removing channel j and refitting the others by least squares costs
    ||W_j||^2 / (H^-1)_jj; a head (a block B of ``head_dim`` channels) tr(W_B [(H^-1)_BB]^-1 W_B^T). FFN neurons go
    several at a time, the lowest costs of the step, followed by the exact update of W and H^-1 for the block
    (ZipLM, SlimGPT): at most ``block_size`` per step, fewer when that would take under ``min_steps`` steps (one at a
    time is the exact greedy order, and costs a pass over H^-1 per neuron); heads one at a time (grouped-query
    attention: as many from every kv group as planned; ``whole_kv_groups``: whole groups).
    """
    inverse = _ridge_inverse(stats.second_moment(centred=centred).to(weight.device), damping)
    current = weight.detach().double().clone()
    count = len(planned)
    if unit.structure == "ffn":
        removed: list[int] = []
        dead = torch.zeros(current.shape[1], dtype=torch.bool, device=current.device)
        step = max(1, min(block_size, math.ceil(count / min_steps)))
        while len(removed) < count:
            cost = current.pow(2).sum(0) / inverse.diagonal().clamp_min(torch.finfo(torch.float64).tiny)
            cost[dead] = float("inf")
            block = torch.topk(cost, min(step, count - len(removed)), largest=False).indices
            _remove_block(current, inverse, block)
            dead[block] = True
            removed += block.tolist()
        return sorted(removed)
    site = unit.site
    n_kv = site.num_kv_heads
    per = unit.size // n_kv
    if whole_kv_groups or not site.is_gqa:  # whole kv groups: blocks of every channel of their heads
        members = [[g * per + j for j in range(per)] for g in range(n_kv)]
        quota, bucket, wanted = {0: count // per}, [0] * n_kv, count // per
    else:  # query heads: as many from every kv group
        members = [[h] for h in range(unit.size)]
        quota, bucket, wanted = dict.fromkeys(range(n_kv), count // n_kv), [h // per for h in range(unit.size)], count
    channels = [torch.tensor([h * site.head_dim + c for h in heads for c in range(site.head_dim)],
                             device=current.device) for heads in members]
    gone: list[int] = []
    while len(gone) < wanted:
        open_blocks = [i for i in range(len(members)) if i not in gone and quota[bucket[i]] > 0]
        if not open_blocks:
            break
        best = min(open_blocks, key=lambda i: _block_cost(current, inverse, channels[i]))
        _remove_block(current, inverse, channels[best])
        quota[bucket[best]] -= 1
        gone.append(best)
    return sorted(h for i in gone for h in members[i])


class _Stop(Exception):
    """Raised by a hook to end a forward pass once what it measures has been seen."""


@dataclass
class _Entry:
    hidden: torch.Tensor
    args: tuple
    kwargs: dict
    mask: torch.Tensor | None


class BlockStream:
    """The calibration stream of a stack: for each batch, the states entering the next block to run and the other
    arguments the model passes every block (masks, position embeddings), captured at the stack's first block."""

    def __init__(self, entries: list[_Entry]) -> None:
        self.entries = entries

    @classmethod
    def capture(cls, model: nn.Module, first_block: nn.Module, batches: list[dict]) -> BlockStream:
        """Run ``model`` on each batch up to ``first_block`` and keep what it receives."""
        device = next(model.parameters()).device
        entries: list[_Entry] = []
        mask: list[torch.Tensor | None] = [None]

        def grab(module, args, kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            entries.append(_Entry(hidden.detach(), tuple(args[1:]), kwargs, mask[0]))
            raise _Stop

        handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                for batch in batches:
                    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items() if k != "labels"}
                    mask[0] = inputs.get("attention_mask")
                    if getattr(model.config, "use_cache", None) is not None:
                        inputs["use_cache"] = False  # a cache would grow with every replay of a block
                    try:
                        model(**inputs)
                    except _Stop:
                        continue
                    raise CompressError("internal: the model's forward pass did not reach its first block")
        finally:
            handle.remove()
        return cls(entries)

    @property
    def tokens(self) -> int:
        """How many real (non-padding) tokens the stream carries."""
        return int(sum(e.mask.sum() if e.mask is not None else e.hidden.shape[:-1].numel() for e in self.entries))

    def _run(self, block: nn.Module, entry: _Entry) -> torch.Tensor:
        out = block(entry.hidden, *entry.args, **entry.kwargs)
        return out[0] if isinstance(out, tuple) else out

    def measure(self, block: nn.Module, projection: nn.Module) -> ProjectionStatistics:
        """The statistics of ``projection``'s inputs when ``block`` runs on the stream (each pass ends there)."""
        stats = ProjectionStatistics(projection.in_features, device=projection.weight.device)
        current: list[torch.Tensor | None] = [None]

        def record(module, args):
            stats.add(args[0], current[0])
            raise _Stop

        handle = projection.register_forward_pre_hook(record)
        try:
            with torch.no_grad():
                for entry in self.entries:
                    current[0] = entry.mask
                    try:
                        self._run(block, entry)
                    except _Stop:
                        continue
                    raise CompressError("internal: the block's forward pass did not reach its output projection")
        finally:
            handle.remove()
        return stats

    def advance(self, block: nn.Module) -> None:
        """Run ``block`` on the stream: its outputs become the states entering the next block."""
        with torch.no_grad():
            for entry in self.entries:
                entry.hidden = self._run(block, entry).detach()

    def measure_and_advance(self, block: nn.Module, projection: nn.Module) -> tuple[ProjectionStatistics,
                                                                                  list[torch.Tensor]]:
        """Measure ``projection``'s inputs and run ``block`` to its end in the same pass, with the projection's
        output left out: for a block that adds that output to the residual stream unchanged as the last thing it
        does (nothing later in the block reads it: a pre-norm block's FFN output projection, not its attention's),
        the stream then lacks only the projection's term, which :meth:`add_projection` adds once the projection is
        refit. Returns the statistics and the projection's inputs, one tensor per batch (kept until then)."""
        stats = ProjectionStatistics(projection.in_features, device=projection.weight.device)
        current: list[torch.Tensor | None] = [None]
        held: list[torch.Tensor] = []

        def record(module, args):
            stats.add(args[0], current[0])
            held.append(args[0].detach())

        def leave_out(module, args, output):
            return torch.zeros_like(output)

        handles = [projection.register_forward_pre_hook(record), projection.register_forward_hook(leave_out)]
        try:
            with torch.no_grad():
                for entry in self.entries:
                    current[0] = entry.mask
                    count = len(held)
                    entry.hidden = self._run(block, entry).detach()
                    if len(held) != count + 1:
                        raise CompressError("internal: the block did not run its output projection once per pass")
        finally:
            for handle in handles:
                handle.remove()
        return stats, held

    def add_projection(self, projection: nn.Module, inputs: list[torch.Tensor], kept: torch.Tensor) -> None:
        """Add ``projection`` (refit, on the ``kept`` input channels) of each batch's held ``inputs`` to the
        stream (see :meth:`measure_and_advance`)."""
        with torch.no_grad():
            for entry, states in zip(self.entries, inputs, strict=True):
                entry.hidden = entry.hidden + projection(states.index_select(-1, kept.to(states.device)))


@dataclass
class SequentialResult:
    """What :func:`prune_sequentially` removed (indices per unit key, as :func:`~compress.pruning.plan.plan_removals`
    gives them) and over how many calibration tokens the projections were refit."""

    removed: dict[str, list[int]] = field(default_factory=dict)
    tokens: int = 0
    #: the refit projections' paths inside a block, e.g. ``["self_attn.o_proj", "mlp.down_proj"]``
    projections: list[str] = field(default_factory=list)
    #: those of ``projections`` whose bias was fit with the weights (the others: uncentred, bias unchanged)
    biased: list[str] = field(default_factory=list)


def bias_fit_structures(arch: ArchSpec, structures: Iterable[str]) -> tuple[list[str], list[str]]:
    """``structures`` (of ``ffn``, ``heads``, ``kv_heads``) split into those whose output projections have a bias or
    can get one through the family's config (:meth:`~compress.pruning.arch.ArchSpec.add_output_biases`), where the
    refit fits the bias too, and those whose projections cannot hold one (Qwen2), refit without a bias."""
    with_bias, without = [], []
    for structure in structures:
        try:
            arch.check_output_biases([structure])
        except UnsupportedStructureError:
            without.append(structure)
        else:
            with_bias.append(structure)
    return with_bias, without


def check_reconstructable(arch: ArchSpec) -> None:
    """Refuse a family whose blocks cannot be run one by one on a stored stream (before any calibration)."""
    if arch.sequential_reason is not None:
        raise UnsupportedStructureError(f"{arch.family}: reconstruct='least_squares' runs one stack's blocks one at a "
                                        f"time on the calibration stream, which {arch.family} does not allow "
                                        f"({arch.sequential_reason}); use reconstruct='none'")
    if len(arch.stacks()) != 1:  # pragma: no cover - every family with a sequential path has one stack
        raise UnsupportedStructureError(f"{arch.family}: reconstruct='least_squares' needs a single stack of blocks")


def _units_by_block(stack: LayerStack, units: list[Unit]) -> Iterator[tuple[nn.Module, list[Unit]]]:
    """Each block of ``stack`` with its channel units, attention before FFN (the order of the block's forward)."""
    order = {"heads": 0, "ffn": 1}
    owner = {id(module): i for i, block in enumerate(stack.blocks) for module in block.modules()}
    by_block: dict[int, list[Unit]] = {}
    for unit in units:
        index = owner.get(id(output_projection(unit)))
        if index is not None:
            by_block.setdefault(index, []).append(unit)
    for i, block in enumerate(stack.blocks):
        yield block, sorted(by_block.get(i, []), key=lambda u: order[u.structure])


def _path_in(block: nn.Module, module: nn.Module) -> str:
    """``module``'s path inside ``block`` (``mlp.down_proj``, ``output.dense``)."""
    return next((name for name, m in block.named_modules() if m is module), type(module).__name__)


def prune_sequentially(model: nn.Module, arch: ArchSpec, units: list[Unit], removals: Mapping[str, list[int]],
                       criterion: Importance, batches: list[dict], *, damping: float,
                       fit_bias: bool | Collection[str], whole_kv_groups: bool,
                       progress: bool = False) -> SequentialResult:
    """Carry out ``removals`` block by block on the calibration stream, refitting each output projection.

    Whole blocks (``layers`` units) go first; then, for each remaining block in order and each of its FFN / heads
    units with planned removals: measure the output projection's inputs on the stream, choose the channels again
    from those statistics when ``criterion`` is an :class:`~compress.pruning.importance.InputStatisticsImportance`
    (as many per layer as planned, see :func:`~compress.pruning.plan.reselect`; other criteria keep the planned
    channels), refit the kept columns (:func:`least_squares_update`; the bias with ``fit_bias``: ``True`` for every
    unit, or the structures whose units' bias is fit, e.g. ``("ffn",)``; the projection must have a bias), remove the
    channels, and run the finished block on the stream.

    Raises:
        CompressError: a layer to refit is wrapped by adapters, or has no bias to fit.
        CalibrationError: no calibration batches.
    """
    if not batches:
        raise CalibrationError("reconstruct='least_squares' needs calibration batches: pass `data`")
    check_reconstructable(arch)
    channel_units = [u for u in units if u.structure in ("ffn", "heads") and removals.get(u.key)]
    if isinstance(fit_bias, bool):
        biased_kinds = {"ffn", "heads"} if fit_bias else set()
    else:  # kv_heads units are heads units removing whole groups: the same output projection
        biased_kinds = {"heads" if s == "kv_heads" else s for s in fit_bias}
    for unit in channel_units:
        wrapped = [m for m in declared_layers(unit) if is_wrapped(m)]
        if wrapped:
            raise CompressError(f"{unit.key}: reconstruct='least_squares' rewrites the weights of the output "
                                "projections, which adapter layers wrap here; prune the base model before adding "
                                "adapters")
        if unit.structure in biased_kinds and output_projection(unit).bias is None:
            raise CompressError(f"internal: {unit.key}'s output projection has no bias to fit")  # pragma: no cover
    result = SequentialResult(removed={k: list(v) for k, v in removals.items() if v})
    for unit in units:
        if unit.structure == "layers" and removals.get(unit.key):
            arch.remove_blocks(unit.site, [i for i in range(unit.size) if i not in removals[unit.key]])
    stack = arch.stacks()[0]
    stream = BlockStream.capture(model, stack.blocks[0], batches)
    result.tokens = stream.tokens
    rescore = isinstance(criterion, InputStatisticsImportance)
    names: dict[str, bool] = {}  # projection path -> whether its bias was fit
    blocks = list(_units_by_block(stack, channel_units))
    last = max((i for i, (_, block_units) in enumerate(blocks) if block_units), default=-1)
    for block, block_units in tqdm(blocks[:last + 1], desc="reconstructing", disable=not progress, leave=False):
        held: list[torch.Tensor] | None = None
        for unit in block_units:
            projection = output_projection(unit)
            with_bias = unit.structure in biased_kinds
            if arch.residual_outputs and unit.structure == "ffn":
                # the FFN adds the block's last term to the stream: one pass measures it and runs the block; the
                # attention's output cannot be left out that way, the FFN after it reads it
                stats, held = stream.measure_and_advance(block, projection)
            else:
                stats = stream.measure(block, projection)
            if stats.count < 1:
                raise CalibrationError(f"{unit.key}: no calibration tokens reached its output projection")
            planned = removals[unit.key]
            if isinstance(criterion, OptimalBrainSurgeonImportance):
                chosen = obs_select(unit, planned, projection.weight, stats, damping, with_bias, whole_kv_groups)
            elif rescore:
                chosen = reselect(unit, planned, criterion.score(unit, stats.moments()), whole_kv_groups)
            else:
                chosen = sorted(planned)
            channels = chosen if unit.structure == "ffn" else \
                [h * unit.site.head_dim + j for h in chosen for j in range(unit.site.head_dim)]
            weight, bias = least_squares_update(projection.weight, projection.bias, stats, channels, damping,
                                                with_bias)
            remove_unit_channels(unit, chosen)
            projection = output_projection(unit)  # surgery may have replaced the parameters, not the module
            with torch.no_grad():
                projection.weight.copy_(weight.to(projection.weight.dtype))
                if with_bias:
                    projection.bias.copy_(bias.to(projection.bias.dtype))
            arch.refresh()  # head counts and kv groups of this block, before it runs again
            result.removed[unit.key] = chosen
            names[_path_in(block, projection)] = with_bias
            del stats
        if held is not None:  # ``projection`` and ``channels`` are the block's last unit's
            kept = torch.tensor(sorted(set(range(held[0].shape[-1])) - set(channels)), dtype=torch.long)
            stream.add_projection(projection, held, kept)
        else:
            stream.advance(block)
    result.projections = list(names)
    result.biased = [name for name, biased in names.items() if biased]
    return result
