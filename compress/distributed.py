"""Working under several processes (``torchrun``, ``accelerate launch``): the same decisions on every rank.

The HF ``Trainer`` wraps the model in ``DistributedDataParallel`` when it runs under several processes. Four
things then need care, and this module holds them:

* statistics gathered from the training batches (importance, input means) see only the local shard of each
  batch: :func:`all_reduce_mean` / :func:`all_reduce_sum` combine them so that every rank decides on the
  global batch, as one process would;
* a structural decision (which channels go) must be the same on every rank: :func:`check_same_on_ranks`
  compares it and fails loudly instead of letting the replicas drift apart;
* the ``Trainer`` multiplies the loss of any model whose ``forward`` takes ``**kwargs`` by the number of
  processes, assuming the model divides it by the global token count: :func:`mark_mean_loss` tells it that
  sequence classifiers and T5 return the batch mean instead;
* pruning during training replaces trainable parameters, which ``DistributedDataParallel`` registered when it
  wrapped the model: :func:`refresh_ddp` re-registers them. Sharded parameters (FSDP, DeepSpeed ZeRO-3) cannot
  be pruned in place: :func:`check_unsharded` says what to do instead.

The process count, rank, barrier, reductions and gathering are accelerate's (``PartialState``,
``accelerate.utils.reduce`` / ``gather_object``), as the ``Trainer`` sees them. Everything here is a no-op in a
single process.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import gather_object, reduce
from torch import nn

from compress._compat import DDP_REBUILD_METHODS, active_ddp_module, is_fsdp_flat_parameter, rebuild_ddp_buckets
from compress.errors import CompressError

logger = logging.getLogger(__name__)


def _state() -> PartialState:
    """accelerate's view of the processes, which the ``Trainer`` shares.

    ``TrainingArguments`` sets it up for the run; before that (``compress.prune_model`` under ``torchrun``, a
    recipe's first check) it is made here, for the CPU on a machine without an accelerator: ``PartialState()``
    alone would take each of ``torchrun``'s gloo processes for a single one. A process group of another size
    than accelerate's (made by hand after accelerate looked, or a ``Trainer`` set to its GPU default on a machine
    without one) would silently skip the reductions and checks: that is refused.
    """
    state = PartialState(cpu=torch.accelerator.current_accelerator() is None)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        processes = torch.distributed.get_world_size()
        if processes != state.num_processes:
            raise CompressError(
                f"torch.distributed runs {processes} processes but accelerate's state (the Trainer's) sees "
                f"{state.num_processes}, so the ranks would not combine their statistics: on a machine without "
                "GPUs pass TrainingArguments(use_cpu=True), or create accelerate.PartialState(cpu=True) before "
                "anything else; a process group started by hand must exist before accelerate's state is created")
    return state


def world_size() -> int:
    """The number of processes (1 in a single process)."""
    return _state().num_processes


def rank() -> int:
    """This process's index among them (0 in a single process)."""
    return _state().process_index


def is_main_process() -> bool:
    """Whether this process writes artifacts and reports (rank 0, or the only process)."""
    return _state().is_main_process


def wait_for_everyone() -> None:
    """Block until every rank gets here (no-op in one process): e.g. before other ranks read what the main
    process has just written."""
    _state().wait_for_everyone()


def all_reduce_sum(tensors: list[torch.Tensor]) -> None:
    """Sum ``tensors`` in place over every rank, in a fixed order (no-op in one process)."""
    _reduce_in_place(tensors, "sum")


def all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    """Average ``tensors`` in place over every rank (no-op in one process).

    Under ``DistributedDataParallel`` each rank's loss is the mean over its shard of the batch, so the mean of
    the ranks' gradients is the gradient of the global batch's loss: the same statistic one process computes.
    """
    _reduce_in_place(tensors, "mean")


def _reduce_in_place(tensors: list[torch.Tensor], reduction: str) -> None:
    # the statistics live in gradients and buffers that their owners keep referring to: reduce() returns new
    # tensors, so the results are copied back
    if not tensors or _state().num_processes == 1:
        return
    for tensor, reduced in zip(tensors, reduce(list(tensors), reduction=reduction), strict=True):
        tensor.copy_(reduced)


def check_same_on_ranks(value: Any, what: str) -> None:
    """Raise unless every rank holds an equal ``value`` (a picklable object, e.g. the removed indices).

    A structural decision that differs between ranks would give replicas of different shapes; this turns that
    into one clear error instead of a hang or a silently inconsistent model.
    """
    if _state().num_processes == 1:
        return
    gathered = gather_object([value])  # one entry per rank, in rank order
    differing = [r for r, other in enumerate(gathered) if other != gathered[0]]
    if differing:
        raise CompressError(
            f"{what} differ between ranks (rank {differing[0]} disagrees with rank 0): every rank must score on "
            "the same statistics. Calibration data must be the same on every rank; training-batch statistics are "
            "reduced across ranks by peft-compress, so a difference means a rank ran a different configuration")


#: model classes whose loss is the mean over their own batch although ``forward`` takes ``**kwargs``: sequence
#: classifiers (``...ForSequenceClassification``) and T5 (a token mean with ``CrossEntropyLoss``); transformers'
#: causal language models divide by ``num_items_in_batch`` as the ``Trainer`` expects
MEAN_LOSS_CLASSES = ("T5ForConditionalGeneration",)


def mark_mean_loss(model: nn.Module) -> None:
    """Tell the HF ``Trainer`` that ``model``'s loss is the mean over its batch.

    The ``Trainer`` takes a ``forward`` with ``**kwargs`` to mean a loss normalised by the global
    ``num_items_in_batch``, and under several processes multiplies the loss by their number to undo DDP's
    averaging. Sequence classifiers and T5 take ``**kwargs`` but return the plain batch mean, so their gradients
    came out ``world_size`` times too large and ``torchrun`` trained differently from one process.
    ``accepts_loss_kwargs`` is the ``Trainer``'s own switch for this; other models are left alone.
    """
    name = type(model).__name__
    if name.endswith("ForSequenceClassification") or name in MEAN_LOSS_CLASSES:
        model.accepts_loss_kwargs = False


def active_ddp() -> nn.Module | None:
    """The ``DistributedDataParallel`` wrapper whose forward is running now, if any (call from a forward hook)."""
    return active_ddp_module()


def refresh_ddp(ddp: nn.Module) -> None:
    """Re-register a ``DistributedDataParallel`` wrapper's parameters after its module's were replaced.

    DDP binds the trainable parameters (their objects and shapes) into its gradient buckets when it wraps the
    model; a pruning step replaces them with smaller ones. This builds the buckets again from the parameters the
    module has now, exactly as DDP's constructor does, keeping the wrapper object the ``Trainer`` holds. Call it
    between steps (after the optimizer step, before the next forward).
    """
    if not all(hasattr(ddp, name) for name in DDP_REBUILD_METHODS):
        raise CompressError(
            f"this torch ({torch.__version__}) has a DistributedDataParallel that peft-compress cannot re-register "
            "after pruning: prune before training (model.base_model.prune(data=...)) and then train with DDP, or "
            "install the torch version pinned in pyproject.toml")
    count = rebuild_ddp_buckets(ddp)
    logger.info("re-registered %d trainable parameters with DistributedDataParallel after pruning", count)


def check_unsharded(model: nn.Module, action: str) -> None:
    """Refuse ``action`` on a model whose parameters are sharded (FSDP, DeepSpeed ZeRO-3).

    Structural pruning slices whole weight matrices; a rank holding a shard cannot do that, and gathering and
    re-sharding in the middle of training is what these wrappers are built to avoid.
    """
    sharded = None
    for name, param in model.named_parameters():
        if hasattr(param, "ds_id") or hasattr(param, "ds_status"):  # DeepSpeed ZeRO-3 partitioned parameter
            sharded = ("DeepSpeed ZeRO-3", name)
        elif is_fsdp_flat_parameter(param):
            sharded = ("FSDP", name)
        elif _is_dtensor(param):
            sharded = ("FSDP2 (DTensor)", name)
        if sharded:
            break
    if sharded:
        wrapper, name = sharded
        raise CompressError(
            f"cannot {action}: the model's parameters are sharded by {wrapper} (e.g. {name!r}). Prune before "
            "sharding: prune the model first (compress.prune_model, or model.base_model.prune(data=...) for "
            "Pruning-Adapter's oneshot), then train the pruned model with FSDP/ZeRO; or train with DDP "
            "(torchrun / accelerate launch without FSDP), which the progressive schedule supports")


def _is_dtensor(param: torch.Tensor) -> bool:
    if not torch.distributed.is_available():  # torch built without distributed support
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)
